"""Review probes of incremental commits (issue 15 part 2) with Ray: manager kills, rebalances,
upserts, stop/resume and schema evolution, each with a compaction after every delta or two;
results against DuckDB, and no commit row naming a missing state file."""

from __future__ import annotations

import json

import duckdb
import pyarrow as pa
import pytest
from ray._common.test_utils import wait_for_condition

import rayflow as rf
from rayflow.testing import KEYED_SQL, Fault, FaultPlan, assert_same_rows, duckdb_reference, throttle
from tests.conftest import make_job

pytestmark = pytest.mark.ray

AGG = [("value", "count"), ("value", "sum")]
COLUMNS = ["key", "value_count", "value_sum"]


@pytest.fixture(scope="module")
def data() -> pa.Table:
    return rf.sources.Synthetic(events=40_000, keys=3_000, seed=31).to_table().select(["key", "value"])


@pytest.fixture(scope="module")
def expected(data) -> pa.Table:
    return duckdb_reference(KEYED_SQL, events=data)


def job(tmp_path, name, data, *, faults=None, rows_per_s=60_000, deltas_max=1, emit=None, sink=None, **kw):
    return make_job(
        tmp_path,
        name,
        data,
        batch_rows=1_000,
        partitions=kw.pop("partitions", 4),
        operator=[throttle(rows_per_s), rf.ops.Aggregate(by="key", aggs=kw.pop("aggs", AGG), emit=emit)],
        consumers=kw.pop("consumers", 2),
        checkpoint_interval_s=0.05,
        config=rf.EngineConfig(
            fetch_max_bytes=30_000,
            heartbeat_interval_s=0.1,
            session_timeout_s=3.0,
            commit_retry_initial_s=0.05,
            state_deltas_max=deltas_max,
        ),
        faults=faults,
        **({"sink": sink} if sink is not None else {}),
        **kw,
    )


def check_files(root) -> tuple[set[str], set[str]]:
    """Every state file any commit row names exists; returns (named, on disk)."""
    con = duckdb.connect(str(root / "catalog.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT state_files FROM commits").fetchall()
    finally:
        con.close()
    named = {f for (r,) in rows for f in json.loads(r)}
    missing = sorted(f for f in named if not (root / f).exists())
    assert not missing, f"commit rows name missing state files: {missing}"
    on_disk = {str(p.relative_to(root)) for p in (root / "state").rglob("*.parquet")}
    return named, on_disk


def consumer_sum(run, key: str) -> int:
    return sum(c.get(key, 0) for c in run.status()["consumers"].values())


def test_manager_kills_and_lost_replies_with_compactions_are_exact(ray_session, tmp_path, data, expected):
    plan = FaultPlan(
        [
            Fault(point="manager.after_record", actor="manager", nth=6),  # killed: recorded, no reply
            Fault(point="manager.after_record", actor="manager", nth=14, action="raise"),  # reply lost
            Fault(point="consumer.after_compaction", actor="consumer-1", nth=2),
            Fault(point="consumer.after_state_write", actor="consumer-0", nth=10),
        ],
        dir=str(tmp_path / "faults"),
    )
    result = job(tmp_path, "mgr", data, faults=plan).run(timeout_s=90)
    assert len(plan.fired()) >= 3, plan.fired()
    assert_same_rows(result.output, expected)
    assert result.stats["compactions"] > 0, result.stats
    check_files(tmp_path / "ck" / "mgr")


def test_rebalances_with_compactions_are_exact_and_leave_few_orphans(ray_session, tmp_path, data, expected):
    run = job(tmp_path, "scale", data, rows_per_s=30_000).start()
    wait_for_condition(lambda: consumer_sum(run, "compactions") > 0, timeout=30)
    run.scale(consumers=3)
    wait_for_condition(lambda: len(run.status()["consumers"]) == 3, timeout=30)
    run.scale(consumers=1)
    result = run.wait(timeout_s=90)
    assert_same_rows(result.output, expected)
    root = tmp_path / "ck" / "scale"
    named, on_disk = check_files(root)
    orphans = on_disk - named
    # Retirement deletes what no row names; what is left is garbage no fresh start collected yet.
    assert len(orphans) <= 4, sorted(orphans)


def test_upserts_with_deltas_and_kills_are_exact(ray_session, tmp_path, data, expected):
    db = tmp_path / "view.duckdb"
    plan = FaultPlan(
        [
            Fault(point="consumer.after_compaction", actor="consumer-0", nth=1),
            Fault(point="manager.after_record", actor="manager", nth=8, action="raise"),
            Fault(point="consumer.after_commit", actor="consumer-1", nth=6),
        ],
        dir=str(tmp_path / "faults"),
    )
    job(tmp_path, "ups", data, faults=plan, emit="changes", sink=rf.sinks.DuckDB(db, "view")).run(
        timeout_s=90
    )
    assert len(plan.fired()) >= 2, plan.fired()
    con = duckdb.connect(str(db), read_only=True)
    view = con.sql("SELECT * FROM view").to_arrow_table()
    con.close()
    assert_same_rows(view, expected, columns=COLUMNS)
    check_files(tmp_path / "ck" / "ups")


def test_resume_adding_an_aggregation_over_a_new_column_from_base_and_deltas(ray_session, tmp_path, data):
    """Resumed from chains holding deltas, with ``("extra", "sum")`` over a column the input
    gained: exact, and ``rayflow sql``'s state view shows the new aggregation."""
    import pyarrow.parquet as pq

    from rayflow.cli import _open_copy

    d = tmp_path / "in"
    d.mkdir()
    pq.write_table(data, d / "a.parquet")

    def evolve(aggs, rows_per_s):
        return make_job(
            tmp_path,
            "evolve",
            rf.sources.Parquet(str(d), batch_rows=1_000),
            partitions=2,
            consumers=1,
            operator=[throttle(rows_per_s), rf.ops.Aggregate(by="key", aggs=aggs)],
            checkpoint_interval_s=0.05,
            config=rf.EngineConfig(fetch_max_bytes=30_000, num_sources=1, state_deltas_max=50),
        )

    run = evolve(AGG, 20_000).start()
    wait_for_condition(lambda: consumer_sum(run, "state_deltas") >= 4, timeout=30)
    run.stop()
    b = pa.table({"key": [1, 4, 7], "value": [10.0, 20.0, 30.0], "extra": pa.array([7, None, 9], pa.int64())})
    pq.write_table(b, d / "b.parquet")
    aggs = AGG + [("extra", "sum")]
    out = evolve(aggs, 10**9).run(timeout_s=60).output
    both = pa.concat_tables([data, b], promote_options="default")
    expected = duckdb_reference(
        "SELECT key, count(value) AS value_count, sum(value) AS value_sum, sum(extra) AS extra_sum "
        "FROM t GROUP BY key",
        t=both,
    )
    assert_same_rows(out, expected, columns=COLUMNS + ["extra_sum"])
    root = tmp_path / "ck" / "evolve"
    check_files(root)
    con, _ = _open_copy(str(root))
    try:
        cols = [r[0] for r in con.execute("DESCRIBE state").fetchall()]
        assert "extra_sum" in cols, cols
        got = con.execute("SELECT extra_sum FROM state WHERE key = 1").fetchone()[0]
    finally:
        con.close()
    assert got == expected.filter(pa.compute.equal(expected["key"], 1))["extra_sum"][0].as_py()
