"""The commit path's defects of issue 8, each reproduced through the public API.

Every test here failed on the engine before the fix (the note on issue 8 lists
which); each checks the result against the input, never against timing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import duckdb
import pyarrow as pa
import pytest

import rayflow as rf
from rayflow.sources import Source, Split
from rayflow.testing import Fault, FaultPlan, assert_same_rows, keyed_reference

pytestmark = pytest.mark.ray

FAST = rf.EngineConfig(heartbeat_interval_s=0.1, session_timeout_s=5.0, commit_retry_initial_s=0.05)


def five_rows() -> pa.Table:
    return pa.table({"key": pa.array([1, 2, 3, 4, 5], pa.int64()), "value": [1.0, 2.0, 3.0, 4.0, 5.0]})


def pending_files(root) -> list[str]:
    return sorted(str(p) for p in root.rglob("*.parquet") if "_pending" in p.parts)


def glob_count(out) -> int:
    """What a reader that globs every Parquet file below the sink sees (DuckDB does)."""
    con = duckdb.connect()
    try:
        return con.execute(f"SELECT count(*) FROM read_parquet('{out}/**/*.parquet')").fetchone()[0]
    finally:
        con.close()


def map_job(name, tmp_path, table, *, sink, faults, consumers=1, config=FAST, partitions=1):
    return rf.Pipeline(
        name=name,
        source=rf.sources.Table(table, batch_rows=2),
        key="key",
        partitions=partitions,
        operator=rf.ops.Map(lambda t: t),
        sink=sink,
        consumers=consumers,
        checkpoint_dir=str(tmp_path / "ck"),
        checkpoint_interval_s=0.05,
        config=config,
        faults=faults,
        progress=False,
    )


# ----------------------------------------------------------------------------- defect 1
def test_failure_after_the_catalog_record_does_not_duplicate(ray_session, tmp_path):
    """Recorded, then an error before the reply: the consumer learns it landed (was: 8 rows of 5)."""
    plan = FaultPlan([Fault(point="manager.after_record", action="raise", nth=1)], dir=str(tmp_path / "f"))
    out = tmp_path / "out"
    map_job("dup5", tmp_path, five_rows(), sink=rf.sinks.Parquet(out), faults=plan).run(timeout_s=120)
    assert plan.fired(), plan
    assert glob_count(out) == 5
    assert pending_files(out) == []


def test_lost_reply_of_the_final_commit_still_publishes(ray_session, tmp_path):
    """No new input after the failure: the repeat must publish, and Collect must read every file."""
    faults = [Fault(point="manager.after_record", action="raise") for _ in range(2)]
    plan = FaultPlan(faults, dir=str(tmp_path / "f"))
    result = map_job("final", tmp_path, five_rows(), sink=None, faults=plan).run(timeout_s=120)
    assert plan.fired(), plan
    assert_same_rows(result.output, five_rows())


def test_three_failures_after_record_leave_nothing_pending(ray_session, tmp_path):
    """A globbing reader (DuckDB) sees every row exactly once, and nothing stays in _pending/."""
    data = rf.sources.Synthetic(events=20_000, keys=500, seed=3).to_table().select(["key", "value"])
    plan = FaultPlan(
        [Fault(point="manager.after_record", action="raise") for _ in range(3)],
        dir=str(tmp_path / "f"),
    )
    out = tmp_path / "out"
    job = rf.Pipeline(
        name="three",
        source=rf.sources.Table(data, batch_rows=1_000),
        key="key",
        partitions=4,
        operator=rf.ops.Map(lambda t: t),
        sink=rf.sinks.Parquet(out),
        consumers=2,
        checkpoint_dir=str(tmp_path / "ck"),
        checkpoint_interval_s=0.05,
        config=FAST,
        faults=plan,
        progress=False,
    )
    job.run(timeout_s=180)
    assert len(plan.fired()) == 3, plan
    assert pending_files(out) == []
    assert glob_count(out) == data.num_rows
    con = duckdb.connect()
    dupes = con.execute(
        f"SELECT count(*) FROM (SELECT key, value, count(*) c FROM read_parquet('{out}/**/*.parquet') "
        "GROUP BY ALL HAVING c > 1)"
    ).fetchone()[0]
    expected_dupes = con.execute(
        "SELECT count(*) FROM (SELECT key, value, count(*) c FROM data GROUP BY ALL HAVING c > 1)"
    ).fetchone()[0]
    con.close()
    assert dupes == expected_dupes


# ----------------------------------------------------------------------------- defect 3
def test_a_commit_that_keeps_failing_fails_the_job_and_cleans_up(ray_session, tmp_path):
    """Backoff, not a tight loop; then PipelineFailedError naming the cause; no orphan files."""
    # Each Fault counts its own arrivals from the last firing on: nth=1 each = consecutive failures.
    faults = [Fault(point="consumer.after_state_write", action="raise") for _ in range(40)]
    plan = FaultPlan(faults, dir=str(tmp_path / "f"))
    config = rf.EngineConfig(
        heartbeat_interval_s=0.1,
        commit_retry_initial_s=0.05,
        commit_retry_max_s=0.2,
        commit_max_attempts=4,
    )
    job = map_job("failing", tmp_path, five_rows(), sink=None, faults=plan, config=config)
    with pytest.raises(rf.errors.PipelineFailedError) as err:
        job.run(timeout_s=120)
    msg = str(err.value)
    assert "InjectedFault" in msg and "4 times" in msg and "commit_max_attempts" in msg, msg
    assert len(plan.fired()) == 4, "each attempt waits for its backoff: exactly 4 attempts"
    root = tmp_path / "ck" / "failing"
    con = duckdb.connect(str(root / "catalog.duckdb"), read_only=True)
    named = {f for (r,) in con.execute("SELECT state_files FROM commits").fetchall() for f in json.loads(r)}
    con.close()
    on_disk = {str(p.relative_to(root)) for p in (root / "state").rglob("*.parquet")}
    assert on_disk <= named, f"files of failed attempts left behind: {sorted(on_disk - named)}"
    assert pending_files(root) == []


def test_a_transient_commit_failure_is_retried(ray_session, tmp_path):
    faults = [Fault(point="consumer.before_state_write", action="raise") for _ in range(3)]
    plan = FaultPlan(faults, dir=str(tmp_path / "f"))
    result = map_job("transient", tmp_path, five_rows(), sink=None, faults=plan).run(timeout_s=120)
    assert len(plan.fired()) == 3
    assert_same_rows(result.output, five_rows())


# ----------------------------------------------------------------------------- defect 4
def test_a_step_slower_than_the_session_timeout_does_not_expire_the_consumer(ray_session, tmp_path):
    """A Map costing 20 us per row; one fetch would take ~4 s against a 1 s session (was: livelock)."""
    data = rf.sources.Synthetic(events=200_000, keys=2_000, seed=5).to_table()

    def slow(t: pa.Table) -> pa.Table:
        time.sleep(t.num_rows * 20e-6)
        return t

    job = rf.Pipeline(
        name="slow",
        source=rf.sources.Table(data, batch_rows=50_000),
        key="key",
        partitions=4,
        operator=[rf.ops.Map(slow), rf.ops.Aggregate(by="key", aggs=[("value", "count"), ("value", "sum")])],
        consumers=1,
        checkpoint_dir=str(tmp_path / "ck"),
        checkpoint_interval_s=0.5,
        config=rf.EngineConfig(heartbeat_interval_s=0.1, session_timeout_s=1.0, step_max_s=0.2),
        progress=False,
    )
    result = job.run(timeout_s=240)
    assert result.stats["recoveries"] == 0, "the consumer was expired while it worked"
    assert_same_rows(result.output, keyed_reference(data))


# ----------------------------------------------------------------------------- defect 6
class _GappySplit(Split):
    """A broken custom split: its positions skip 10 rows after the first batch."""

    name = "gappy"

    def __init__(self, table: pa.Table):
        self.table = table

    def read(self, position: int) -> Iterator[tuple[pa.RecordBatch, int]]:
        batches = self.table.to_batches(max_chunksize=5)
        end = 0
        for i, b in enumerate(batches):
            end += b.num_rows + (10 if i == 1 else 0)
            if end > position:
                yield b, end


class _Gappy(Source):
    def __init__(self, table: pa.Table):
        self.table = table

    @property
    def schema(self) -> pa.Schema:
        return self.table.schema

    def splits(self) -> list[Split]:
        return [_GappySplit(self.table)]


def test_a_gap_in_positions_fails_with_the_split_and_positions(ray_session, tmp_path):
    table = pa.table({"key": pa.array([7] * 20, pa.int64()), "value": [1.0] * 20})
    job = rf.Pipeline(
        name="gap",
        source=_Gappy(table),
        key="key",
        partitions=1,
        consumers=1,
        checkpoint_dir=str(tmp_path / "ck"),
        config=FAST,
        progress=False,
    )
    with pytest.raises(rf.errors.PositionGapError) as err:
        job.run(timeout_s=120)
    assert err.value.split == "gappy" and (err.value.position, err.value.start) == (5, 15), err.value
    assert "[5, 15)" in str(err.value)
