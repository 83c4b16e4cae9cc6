"""Splits and merges at runtime (docs/partitioning.md "Splits at runtime"): exact against DuckDB."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from ray._common.test_utils import wait_for_condition

import rayflow as rf
from rayflow.partitioning import PartitionMap, hash_table
from rayflow.testing import KEYED_SQL, assert_same_rows, duckdb_reference, kill_actor, throttle
from tests.conftest import KEYED_AGGS, make_job

pytestmark = pytest.mark.ray


def _skewed(events: int, seed: int) -> pa.Table:
    """Keyed events where about 70% of the rows go to partition 0 of 4 (over its many keys)."""
    data = rf.sources.Synthetic(events=events, keys=4_000, seed=seed).to_table()
    keys = data["key"].to_numpy()
    p0 = np.unique(keys[PartitionMap.uniform(4).route(hash_table(data, ["key"])) == 0])
    rng = np.random.default_rng(seed)
    hot = rng.random(len(keys)) < 0.6
    keys = np.where(hot, rng.choice(p0, len(keys)), keys)
    return data.set_column(data.schema.get_field_index("key"), "key", pa.array(keys, data["key"].type))


def _catalog(ck, name: str = "splits") -> tuple[dict, list[dict]]:
    con = duckdb.connect(str(ck / name / "catalog.duckdb"), read_only=True)
    try:
        pmap = json.loads(con.execute("SELECT value FROM meta WHERE key = 'partition_map'").fetchone()[0])
        rows = con.execute(
            "SELECT kind, detail FROM events WHERE kind IN ('split', 'merge', 'repartition') ORDER BY ts"
        )
        events = [{"kind": k, **json.loads(d)} for k, d in rows.fetchall()]
    finally:
        con.close()
    return pmap, events


def test_split_and_merge_at_runtime_under_a_consumer_kill_then_resume(ray_session, tmp_path):
    data = _skewed(24_000, seed=11)
    expected = duckdb_reference(KEYED_SQL, events=data)
    ck = tmp_path / "ck"

    def pipeline(**kw) -> rf.Pipeline:
        return make_job(
            tmp_path,
            "splits",
            data,
            batch_rows=1_500,
            partitions=4,
            operator=[throttle(25_000), rf.ops.Aggregate(by="key", aggs=KEYED_AGGS)],
            checkpoint_interval_s=0.1,
            config=rf.EngineConfig(heartbeat_interval_s=0.1, queue_max_rows=3_000, spill_max_bytes=0),
            **kw,
        )

    def committed(run) -> int:
        return sum(p["committed_rows"] for p in run.status()["partitions"])

    run = pipeline().start()
    try:
        wait_for_condition(lambda: committed(run) >= 3_000, timeout=60, retry_interval_ms=50)
        hot = run.status()["hot_partition"]
        assert hot == 0
        kill_actor("splits", "consumer-0")  # dies around the split: its partitions resume from their commits
        event = run.split(hot)
        lo, hi = PartitionMap.uniform(4).range_of(0)
        assert lo < int(event["at_hash"]) < hi
        st = run.status()
        assert (st["map_version"], st["partitions_now"]) == (2, 5)
        assert st["partition_splits"] == [{"kind": "split", **event}]
        assert len(st["partitions"]) == 5
        # The children share the hot traffic: each processes rows of its own (a child's
        # committed_rows starts at its parent's, which it inherits).
        inherited = [p["committed_rows"] for p in st["partitions"][:2]]
        wait_for_condition(
            lambda: all(p["committed_rows"] > n for p, n in zip(run.status()["partitions"][:2], inherited)),
            timeout=60,
        )
        # The cold old partitions 2 and 3 (now 3 and 4) merge, at a consistent cut.
        merged = run.merge(3)
        assert (merged["new_version"], merged["partitions"]) == (3, 4)
        assert run.status()["map_version"] == 3
        run.stop()
    finally:
        run.stop()
    pmap, events = _catalog(ck)
    assert pmap["version"] == 3 and len(pmap["bounds"]) == 5 and pmap["requested"] == 4
    assert [e["kind"] for e in events] == ["repartition", "split", "repartition", "merge"]

    # Tiers name partitions of the uniform map: a resume with tiers over a split map is refused.
    with pytest.raises(rf.errors.IncompatibleCheckpointError, match="splits at runtime"):
        pipeline(tiers=[rf.Tier(name="hot", priority=1, partitions=[0])]).start()
    # Resumed with the same partitions=4: the split map stands (read back from the catalog).
    result = pipeline().run(timeout_s=120)
    assert_same_rows(result.output, expected)
    assert pc.sum(result.output.column("value_count")).as_py() == 24_000
    pmap, events = _catalog(ck)
    assert pmap["version"] == 3 and len(pmap["bounds"]) == 5


def test_the_splitter_thread_splits_the_hot_partition_a_stop_mid_split_resumes_exactly(ray_session, tmp_path):
    """The policy path on real Ray: the sources' sketches -> rate_ratio -> the policy -> run.split
    from the splitter's thread; run.stop() from another thread while that split restarts the
    actors (wait() running meanwhile) leaves a checkpoint that resumes to DuckDB's answer."""
    name = "splitter"
    data = _skewed(24_000, seed=5)
    expected = duckdb_reference(KEYED_SQL, events=data)
    ck = tmp_path / "ck"
    # Partition 0 carries ~70% of the rows (ratio ~2.8): hot at once; split once only (max 5).
    policy = rf.Splits(factor=2.0, window_s=0.2, cooldown_s=60.0, interval_s=0.1, max_partitions=5)

    def pipeline(rows_per_s: float) -> rf.Pipeline:
        return make_job(
            tmp_path,
            name,
            data,
            batch_rows=1_000,
            partitions=4,
            operator=[throttle(rows_per_s), rf.ops.Aggregate(by="key", aggs=KEYED_AGGS)],
            checkpoint_interval_s=0.1,
            config=rf.EngineConfig(heartbeat_interval_s=0.1, queue_max_rows=3_000, spill_max_bytes=0),
        )

    def splitter_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == f"rayflow-splits-{name}"]

    # Throttled: partition 0 alone takes its consumer ~4 s, so the job is still running when the
    # policy (ripe after window_s) splits it.
    run = pipeline(5_000).start()
    with ThreadPoolExecutor(1) as pool:
        try:
            waiting = pool.submit(run.wait, timeout_s=60)  # as a user's run.wait() would be
            splitter = run.start_splitter(policy)
            assert len(splitter_threads()) == 1
            # Past the split's point of no return: the policy decided it and the new map is set
            # (the actors start again under it: the stop below usually lands mid-split).
            wait_for_condition(
                lambda: any(d["partition"] is not None for d in splitter.decisions) and run.map.version == 2,
                timeout=30,
                retry_interval_ms=20,
            )
            stopped = run.stop()  # waits for the split in progress, then stops
        finally:
            run.stop()
        assert waiting.result(timeout=30) is stopped  # wait() hands back the stop's result
    assert stopped.stats["stopped"] and splitter_threads() == []
    assert [(d["kind"], d["partition"]) for d in splitter.decisions] == [("split", 0)]
    # Carried out through the thread (the policy's reason), not by a direct call.
    (split,) = run.partition_splits
    assert split["kind"] == "split" and split["reason"] == splitter.decisions[0]["reason"]
    assert split["reason"].startswith("ratio ") and (split["old_version"], split["partitions"]) == (1, 5)
    assert split["rate_ratio"] is not None and split["rate_ratio"] > policy.factor
    pmap, events = _catalog(ck, name)
    assert pmap["version"] == 2 and len(pmap["bounds"]) == 6
    assert [e["kind"] for e in events] == ["repartition", "split"]
    assert events[1]["reason"] == split["reason"] and events[1]["at_hash"] == split["at_hash"]
    assert stopped.stats["events"] < 24_000  # stopped before the end: the resume has work left

    # Resumed under the split map (faster: the chain's kinds are what a resume checks), with a
    # splitter (at max_partitions: it holds) until the end.
    run = pipeline(50_000).start()
    try:
        splitter = run.start_splitter(policy)
        result = run.wait(timeout_s=60)
    finally:
        run.stop()
    assert splitter_threads() == []  # stopped with the run's end
    assert list(splitter.decisions) == []  # it held: 5 partitions are its max_partitions
    assert_same_rows(result.output, expected)
    assert pc.sum(result.output.column("value_count")).as_py() == 24_000
    pmap, events = _catalog(ck, name)
    assert pmap["version"] == 2 and [e["kind"] for e in events] == ["repartition", "split"]
