"""Checkpoints and the Parquet sink on S3 (a moto server on loopback): the durable catalog is
the commit log in the bucket, so a manager with no local catalog rebuilds it and resumes."""

from __future__ import annotations

import json
import shutil

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest
from ray._common.test_utils import wait_for_condition

import rayflow as rf
from rayflow._internal.checkpoint.catalog import Catalog, catalog_path
from rayflow._internal.checkpoint.store import join
from rayflow.testing import KEYED_SQL, Fault, FaultPlan, assert_same_rows, duckdb_reference, throttle

pytestmark = pytest.mark.ray


def test_s3_checkpoints_sink_and_rebuilt_catalog(ray_session, s3_query, tmp_path):
    data = rf.sources.Synthetic(events=150_000, keys=5_000, seed=9).to_table()
    ck = f"s3://rayflow-test/ck{s3_query}"
    out = f"s3://rayflow-test/out{s3_query}"

    def job(faults=None, partitions=4):
        return rf.Pipeline(
            name="s3job", source=rf.sources.Table(data, batch_rows=10_000), key="key", partitions=partitions,
            operator=[throttle(100_000), rf.ops.Aggregate(by="key", aggs=[("value", "count"), ("value", "sum")])],
            sink=rf.sinks.Parquet(out), consumers=2, checkpoint_dir=ck, checkpoint_interval_s=0.2,
            config=rf.EngineConfig(fetch_max_bytes=100_000), faults=faults, progress=False,
        )  # fmt: skip

    plan = FaultPlan(
        [Fault(point="consumer.after_state_write", actor="consumer-0", nth=1)], dir=str(tmp_path / "f")
    )
    run = job(plan).start()
    wait_for_condition(lambda: any(p["committed_rows"] > 0 for p in run.status()["partitions"]), timeout=60)
    run.stop()
    assert plan.fired(), plan
    # A new node: no local catalog. The manager rebuilds it from the log in the bucket.
    local = catalog_path(join(ck, "s3job"))
    shutil.rmtree(local.rsplit("/", 1)[0])
    # ... and goes on with 8 partitions: the state is re-split (a map change logged in the bucket).
    result = job(partitions=8).run(timeout_s=180)
    assert 0 < result.stats["events"] < data.num_rows
    got = pads.dataset(
        out.split("?")[0].removeprefix("s3://"), filesystem=pafs.FileSystem.from_uri(out)[0]
    ).to_table()
    assert_same_rows(got, duckdb_reference(KEYED_SQL, events=data))
    # Another new node rebuilds the new map from the log alone.
    shutil.rmtree(local.rsplit("/", 1)[0])
    rebuilt = Catalog(local, log_root=join(ck, "s3job"))
    try:
        latest = rebuilt.latest_commits()
        assert sorted(latest) == list(range(8)) and {c.map_version for c in latest.values()} == {2}
        assert json.loads(rebuilt.get_meta()["partition_map"])["version"] == 2
    finally:
        rebuilt.close()
