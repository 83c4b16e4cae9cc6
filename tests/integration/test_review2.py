"""Second review of issue 9 (b80fb05 / 396eb05): defects found by a reviewer, each as a failing test."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import ray
from ray._common.test_utils import wait_for_condition

import rayflow as rf
from rayflow.testing import throttle
from tests.conftest import make_job

pytestmark = pytest.mark.ray


def test_a_file_replaced_between_runs_of_a_bounded_files_job_is_refused_not_mixed(ray_session, tmp_path):
    """Files' doc (Rules for writers), unqualified by ``watch``: "The job's catalog records them
    the first time the job takes a name, so a job started again ... that finds another file
    under a name it has read refuses it the same way, before reading any of its rows". Only a
    *dynamic* source's splits are fingerprinted (source_actor.py: ``self.source`` is None unless
    dynamic; ``Files.dynamic = watch``): with ``watch=False`` a run stopped midway and resumed
    over a replaced file reads the new file on from the old one's committed row position."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()

    def write(rows: np.ndarray) -> None:
        tmp = inbox / "a.parquet.tmp"
        pq.write_table(pa.table({"key": rows % 97, "i": rows}), tmp, row_group_size=250)
        tmp.rename(inbox / "a.parquet")

    def job(rows_per_s: float):
        return make_job(
            tmp_path,
            "bounded_replaced",
            rf.sources.Files(str(inbox), format="parquet", watch=False, batch_rows=250),
            partitions=2,
            consumers=1,
            operator=[throttle(rows_per_s), rf.ops.Map(lambda t: t)],
            sink=rf.sinks.Parquet(str(out)),
            checkpoint_interval_s=0.2,
            config=rf.EngineConfig(heartbeat_interval_s=0.1, session_timeout_s=5.0),
        )

    write(np.arange(4_000, dtype=np.int64))
    run = job(500).start()
    try:

        def some_committed() -> bool:
            recs = ray.get(run.manager.recorded.remote([0, 1]), timeout=30)
            return all(r is not None and r.positions.get("a.parquet", 0) >= 500 for r in recs.values())

        wait_for_condition(some_committed, timeout=60)
        assert not run.status()["done"]
    finally:
        run.stop()
    time.sleep(0.05)
    write(np.arange(10_000, 14_000, dtype=np.int64))  # same name, other rows (other mtime)

    try:
        job(1e9).run()
    except (rf.errors.MalformedInputError, rf.errors.IncompatibleCheckpointError):
        return  # refused: what the doc promises
    except Exception as e:  # noqa: BLE001 - a refusal wrapped in the pipeline's error is fine too
        if "fingerprint" in str(e) or "MalformedInput" in repr(e):
            return
        raise
    got = pads.dataset(str(out), format="parquet").to_table()["i"].to_numpy()
    old, new = int((got < 4_000).sum()), int((got >= 10_000).sum())
    assert not (old and new), f"{old} rows of the first file and {new} of its replacement, under one name"
