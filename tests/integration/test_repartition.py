"""A different partition count on resume (DESIGN §3): 16 -> 32 -> 8, exact against DuckDB."""

from __future__ import annotations

import json
import time

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from ray._common.test_utils import wait_for_condition

import rayflow as rf
from rayflow.errors import RepartitionError
from rayflow.partitioning import PartitionMap, hash_table
from rayflow.testing import KEYED_SQL, assert_same_rows, duckdb_reference, throttle
from tests.conftest import KEYED_AGGS, make_job

pytestmark = pytest.mark.ray


def _catalog(ck) -> tuple[list, list, dict]:
    """(latest positions per partition of the current map, repartition events, meta map)."""
    con = duckdb.connect(str(ck / "repart" / "catalog.duckdb"), read_only=True)
    try:
        # Consumers commit under the map the manager resolved (not the driver's version 1).
        versions = con.execute("SELECT DISTINCT map_version FROM commits WHERE member <> 'repartition'")
        assert {v for (v,) in versions.fetchall()} <= {1, 2, 3}
        newest = con.execute("SELECT map_version FROM commits ORDER BY commit_id DESC LIMIT 1").fetchone()
        current = json.loads(con.execute("SELECT value FROM meta WHERE key = 'partition_map'").fetchone()[0])
        assert newest is None or newest[0] == current["version"]
        latest = con.execute(
            """SELECT positions FROM commits WHERE map_version = (SELECT max(map_version) FROM commits)
               QUALIFY row_number() OVER (PARTITION BY partition ORDER BY commit_id DESC) = 1"""
        ).fetchall()
        events = [
            json.loads(d)
            for (d,) in con.execute(
                "SELECT detail FROM events WHERE kind = 'repartition' ORDER BY ts"
            ).fetchall()
        ]
        meta = json.loads(con.execute("SELECT value FROM meta WHERE key = 'partition_map'").fetchone()[0])
    finally:
        con.close()
    return [json.loads(p) for (p,) in latest], events, meta


def test_partition_count_changes_on_resume(ray_session, tmp_path):
    data = rf.sources.Synthetic(events=40_000, keys=4_000, seed=7).to_table()
    expected = duckdb_reference(KEYED_SQL, events=data)
    ck = tmp_path / "ck"

    def pipeline(partitions: int, first=None) -> rf.Pipeline:
        return make_job(
            tmp_path,
            "repart",
            data,
            batch_rows=2_000,
            partitions=partitions,
            operator=[first or throttle(25_000), rf.ops.Aggregate(by="key", aggs=KEYED_AGGS)],
            checkpoint_interval_s=0.1,
            # Small queues and no spill: the sources read little ahead, so a stop leaves input unread.
            config=rf.EngineConfig(heartbeat_interval_s=0.1, queue_max_rows=400, spill_max_bytes=0),
        )

    def committed(run) -> int:
        return sum(p["committed_rows"] for p in run.status()["partitions"])

    # 16 partitions, stopped part-way, partition 0 slow: it stands behind the others (its full
    # queue holds the source back, so it always has rows left when the stop comes).
    slow = pa.array(
        np.unique(data["key"].filter(PartitionMap.uniform(16).route(hash_table(data, ["key"])) == 0))
    )

    def hold_partition_0(t: pa.Table) -> pa.Table:
        if pc.any(pc.is_in(t["key"], value_set=slow)).as_py():
            time.sleep(t.num_rows / 2_000)
        return t

    run = pipeline(16, first=rf.ops.Map(hold_partition_0)).start()
    wait_for_condition(lambda: committed(run) >= 6_000, timeout=60, retry_interval_ms=50)
    run.stop()
    positions, _, _ = _catalog(ck)
    assert len(positions) == 16
    assert len({json.dumps(p, sort_keys=True) for p in positions}) > 1

    # 8 now would merge partitions that stand at different positions: refused, nothing changed.
    with pytest.raises(RepartitionError, match="consistent cut"):
        pipeline(8).run(timeout_s=60)
    assert _catalog(ck)[0] == positions

    # 32: every new partition is half of one old one (a pure split, always exact).
    run = pipeline(32).start()
    wait_for_condition(lambda: committed(run) >= 20_000, timeout=60, retry_interval_ms=50)
    result = run.stop(drain=True)
    assert result.stats["drained"] is True
    positions, events, meta = _catalog(ck)
    assert len(positions) == 32 and meta["version"] == 2
    assert len({json.dumps(p, sort_keys=True) for p in positions}) == 1  # one consistent cut
    assert 0 < max(positions[0].values()) < 40_000  # stopped part-way: input left unread

    # 8: four old partitions each, merged at the cut; runs to the end.
    result = pipeline(8).run(timeout_s=120)
    assert_same_rows(result.output, expected)
    _, events, meta = _catalog(ck)
    assert meta["version"] == 3
    assert [(e["old_partitions"], e["new_partitions"]) for e in events] == [(16, 32), (32, 8)]
    assert all(e["bytes_moved"] > 0 and e["state_rows"] > 0 for e in events)
    assert pc.sum(result.output.column("value_count")).as_py() == 40_000
