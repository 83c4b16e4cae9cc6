"""Stages (DESIGN §12): a job that needs a second key runs as two consumer groups, the second
reading what the first publishes. Exactly-once must hold end to end when an actor of either
stage dies, and across a stop and a resume; the result is checked against DuckDB."""

from __future__ import annotations

import concurrent.futures
import time

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from ray._common.test_utils import wait_for_condition

import rayflow as rf
from rayflow.testing import Fault, FaultPlan, assert_same_rows, duckdb_reference

pytestmark = pytest.mark.ray

BUCKETS = 13
SQL = (
    f"SELECT key % {BUCKETS} AS bucket, count(value) AS value_count, sum(value) AS value_sum "
    "FROM events GROUP BY bucket"
)


@pytest.fixture(scope="module")
def data() -> pa.Table:
    return rf.sources.Synthetic(events=120_000, keys=5_000, seed=5).to_table()


def with_bucket(t: pa.Table) -> pa.Table:
    """Stage 1's work: the second key (a vectorized modulo)."""
    key = t.column("key")
    return t.append_column("bucket", pc.subtract(key, pc.multiply(pc.divide(key, BUCKETS), BUCKETS)))


SCHEMA = pa.schema([("key", pa.int64()), ("value", pa.float64()), ("ts", pa.int64()), ("bucket", pa.int64())])


def slow_with_bucket(t: pa.Table) -> pa.Table:
    """:func:`with_bucket`, slow enough (150k rows/s) for the kills to land midway."""
    time.sleep(t.num_rows / 150_000)
    return with_bucket(t)


def staged(name, data, tmp_path, *, slow=True, faults=None):
    ops = [rf.ops.Map(slow_with_bucket if slow else with_bucket, output_schema=SCHEMA)]
    return rf.Pipeline(
        name=name,
        source=rf.sources.Table(data, batch_rows=5_000),
        key="key",
        partitions=4,
        operator=ops,
        stages=[
            rf.Stage(
                key="bucket",
                partitions=3,
                operator=rf.ops.Aggregate(by="bucket", aggs=[("value", "count"), ("value", "sum")]),
            )
        ],
        sink=rf.sinks.Parquet(str(tmp_path / "out")),
        consumers=2,
        checkpoint_dir=str(tmp_path / "ck"),
        checkpoint_interval_s=0.2,
        config=rf.EngineConfig(fetch_max_bytes=100_000, heartbeat_interval_s=0.1, session_timeout_s=5.0),
        progress=False,
        faults=faults,
    )


def _check(tmp_path, data) -> None:
    got = _read(tmp_path / "out")
    assert_same_rows(got, duckdb_reference(SQL, events=data), columns=["bucket", "value_count"])
    exp = duckdb_reference(SQL, events=data).sort_by("bucket")
    got = got.sort_by("bucket")
    assert pc.max(pc.abs(pc.subtract(got.column("value_sum"), exp.column("value_sum")))).as_py() < 1e-3


def _read(path) -> pa.Table:
    import pyarrow.dataset as pads

    return pads.dataset(str(path), format="parquet").to_table()


def test_two_stages_equal_duckdb_with_a_consumer_killed_in_each(ray_session, data, tmp_path):
    # A SIGKILL as each stage starts a commit: stage 1's second, stage 2's first (stage 2 reads
    # the exchange in bursts, one per listing, so a kill by time could land after it is done).
    plans = [
        FaultPlan([Fault(point="consumer.before_state_write", actor=a, nth=n)], dir=str(tmp_path / f"f{i}"))
        for i, (a, n) in enumerate([("consumer-0", 2), ("consumer-1", 1)])
    ]
    result = staged("stg-kill", data, tmp_path, slow=True, faults=plans).run(timeout_s=180)
    stages = result.stats["stages"]
    assert all(p.fired() for p in plans), plans
    assert stages[0]["recoveries"] >= 1 and stages[1]["recoveries"] >= 1, stages
    assert stages[1]["events"] == data.num_rows  # every row crossed the exchange once
    _check(tmp_path, data)


def test_a_stopped_staged_job_resumes_exactly(ray_session, data, tmp_path):
    # Stage 2's consumers are held after their first step, so the stop lands while rows are
    # crossing the exchange (stage 1 may have ended by then: it is fast).
    hold = FaultPlan(
        [Fault(point="consumer.step", actor=f"consumer-{i}", nth=1, action="pause") for i in (0, 1)],
        dir=str(tmp_path / "hold"),
    )
    run = staged("stg-resume", data, tmp_path, slow=True, faults=[None, hold]).start()
    stopping = None
    try:
        wait_for_condition(lambda: len(hold.fired()) >= 1, timeout=60)
        stopping = concurrent.futures.ThreadPoolExecutor(1).submit(run.stop)
    finally:
        hold.resume()
        stopped = stopping.result(timeout=120) if stopping is not None else run.stop()
    second = stopped.stats["stages"][1]
    assert second["stopped"] and 0 < second["events"] < data.num_rows, stopped.stats  # mid-way
    result = staged("stg-resume", data, tmp_path, slow=False).run(timeout_s=180)
    assert not result.stats["stopped"]
    assert result.stats["stages"][1]["events"] + second["events"] == data.num_rows  # each row once
    _check(tmp_path, data)


def test_an_upsert_stream_is_not_a_stage_input(ray_session, tmp_path):
    live = rf.Pipeline(
        name="ups",
        source=rf.sources.Synthetic(rate=1000),
        key="key",
        operator=rf.ops.Aggregate(by="key", aggs=[("value", "count")]),
        sink=rf.sinks.Parquet(str(tmp_path / "o")),
        checkpoint_dir=str(tmp_path / "ck"),
    )
    with pytest.raises(rf.errors.ConfigError, match="upsert"):
        rf.sources.Upstream(live)
    with pytest.raises(rf.errors.ConfigError, match="Parquet"):
        rf.sources.Upstream(rf.Pipeline(name="c", source=rf.sources.Table(pa.table({"key": [1]})), key="key"))
