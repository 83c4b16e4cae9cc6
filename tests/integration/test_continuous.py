"""Continuous results (DESIGN §11): an Aggregate that emits its changes at each commit, applied as
upserts by the DuckDB sink (a live, exactly-once materialized view) or kept per commit by the
Parquet sink (``latest``), under failures. Every check compares with DuckDB's GROUP BY over the
same input; none depends on timing."""

from __future__ import annotations

import subprocess
import sys
import time

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
from ray._common.test_utils import wait_for_condition

import rayflow as rf
from rayflow.sources import Source, Split
from rayflow.testing import (
    Fault,
    FaultPlan,
    assert_same_rows,
    keyed_reference,
    kill_actor,
    scale_out_while_held,
    throttle,
)
from tests.conftest import KEYED_AGGS, make_job

pytestmark = pytest.mark.ray

FAST = rf.EngineConfig(
    heartbeat_interval_s=0.1, session_timeout_s=5.0, commit_retry_initial_s=0.05, fetch_max_bytes=60_000
)
COLUMNS = ["key", "value_count", "value_sum"]


@pytest.fixture(scope="module")
def data() -> pa.Table:
    return rf.sources.Synthetic(events=20_000, keys=5_000, seed=7).to_table().select(["key", "value"])


@pytest.fixture(scope="module")
def expected(data) -> pa.Table:
    return keyed_reference(data)


def changes_job(tmp_path, name, data, *, sink, faults=None, rows_per_s=40_000, **kw):
    """The keyed job emitting changes over a bounded input: 20 batches, a commit every 50 ms."""
    return make_job(
        tmp_path,
        name,
        rf.sources.Table(data, batch_rows=1_000),
        partitions=kw.pop("partitions", 2),
        operator=[throttle(rows_per_s), rf.ops.Aggregate(by="key", aggs=KEYED_AGGS, emit="changes")],
        sink=sink,
        checkpoint_interval_s=kw.pop("checkpoint_interval_s", 0.05),
        config=FAST,
        faults=faults,
        **kw,
    )


def read_view(db, table="view") -> pa.Table:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.sql(f"SELECT * FROM {table}").to_arrow_table()
    finally:
        con.close()


def applied(db) -> int:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute("SELECT count(*) FROM _rayflow_applied").fetchone()[0]
    finally:
        con.close()


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``rayflow ARGS`` in this process (no Ray: a subprocess would pay ~2 s of imports):
    the exit code, stdout and stderr."""
    from rayflow.cli import main

    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_duckdb_view_of_the_changes_equals_group_by(ray_session, tmp_path, data, expected, capsys):
    db = tmp_path / "view.duckdb"
    changes_job(tmp_path, "upsert", data, sink=rf.sinks.DuckDB(db, "view")).run(timeout_s=180)
    view = read_view(db)
    assert_same_rows(view, expected, columns=COLUMNS)
    assert "_version" in view.column_names
    assert applied(db) > 2 * 2  # several commits per partition: the view was built incrementally
    rc, stdout, stderr = run_cli(capsys, "sql", "--output", str(db), "SELECT sum(value_count) AS n FROM view")
    assert rc == 0, stderr
    assert stdout.split() == ["n", str(data.num_rows)]


def test_parquet_changes_keep_every_version_and_latest_equals_group_by(
    ray_session, tmp_path, data, expected, capsys
):
    out = tmp_path / "out"
    changes_job(tmp_path, "pq", data, sink=rf.sinks.Parquet(out)).run(timeout_s=180)
    versions = duckdb.sql(
        f"SELECT key, count(*) AS n FROM read_parquet('{out}/*.parquet') GROUP BY key ORDER BY n DESC LIMIT 1"
    ).fetchall()[0]
    assert versions[1] > 1, "the raw upsert stream should hold several versions of a key"
    to = tmp_path / "latest.parquet"
    rc, _, stderr = run_cli(capsys, "sql", "--output", str(out), "--to", str(to), "SELECT * FROM latest")
    assert rc == 0, stderr
    assert_same_rows(pq.read_table(to), expected, columns=COLUMNS)


@pytest.mark.parametrize(
    "faults",
    [
        [Fault(point="consumer.after_state_write", actor="consumer-0", nth=3)],  # killed: files, no commit
        [Fault(point="consumer.after_commit", actor="consumer-1", nth=3)],  # killed: committed, no trim
        [Fault(point="consumer.after_state_write", action="raise", nth=3)],  # commit call lost
        [Fault(point="manager.after_record", action="raise", nth=3)],  # recorded, the reply lost
        [Fault(point="manager.publish", action="raise", nth=n) for n in (2, 1)],  # published late
        [Fault(point="manager.before_record", actor="manager", nth=4)],  # the manager dies mid-commit
    ],
    ids=["kill-after-write", "kill-after-commit", "raise-after-write", "lost-reply", "publish", "manager"],
)
def test_the_view_stays_exact_under_commit_faults(ray_session, tmp_path, data, expected, faults):
    """No change lost or applied twice, whatever becomes of an attempt (its flush stays staged)."""
    plan = FaultPlan(faults, dir=str(tmp_path / "faults"))
    db = tmp_path / "view.duckdb"
    changes_job(tmp_path, "faults", data, sink=rf.sinks.DuckDB(db, "view"), faults=plan).run(timeout_s=180)
    assert len(plan.fired()) == len(faults), plan
    assert_same_rows(read_view(db), expected, columns=COLUMNS)


def test_the_live_view_is_read_while_the_job_runs_and_survives_a_killed_consumer(
    ray_session, tmp_path, data, expected
):
    db = tmp_path / "view.duckdb"
    run = changes_job(tmp_path, "live", data, sink=rf.sinks.DuckDB(db, "view"), rows_per_s=2_000).start()
    try:

        def rows() -> int:
            try:
                return run.query("SELECT count(*) AS n FROM view").column("n")[0].as_py()
            except rf.errors.ConfigError:  # the table is created by the first publication
                return 0

        wait_for_condition(lambda: rows() > 0, timeout=60)
        assert not run.status()["done"], "the input is paced to last well beyond the first commits"
        with pytest.raises(rf.errors.ConfigError, match="may only read"):
            run.query("DELETE FROM view")
        address = ray.get_runtime_context().gcs_address
        cli = subprocess.run(
            [sys.executable, "-m", "rayflow.cli", "sql", "--pipeline", "live", "--address", address,
             "SELECT count(*) AS n, max(_version) AS v FROM view"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr[-3000:]
        assert cli.stdout.splitlines()[0].split() == ["n", "v"], cli.stdout
        kill_actor("live", "consumer-0", how="ray.kill")
        result = run.wait(timeout_s=180)
    finally:
        run.stop()
    assert result.stats["recoveries"] >= 1
    assert_same_rows(read_view(db), expected, columns=COLUMNS)
    assert_same_rows(run.query("SELECT * FROM view"), expected, columns=COLUMNS)  # after the run


def test_partitions_handed_over_mid_run_flush_before_their_last_commit(ray_session, tmp_path, data, expected):
    """Scaling up revokes partitions (each commits, flushing first, then moves); scaling down
    stops consumers (the same, through stop()): the new owners emit only what changed after.

    Periodic commits are kept out of the way (a long interval), and consumer-0 is held right after
    a step, so the revocation finds processed rows that no commit has flushed yet."""
    plan = FaultPlan(
        [Fault(point="consumer.step", actor="consumer-0", nth=2, action="pause")], dir=str(tmp_path / "f")
    )
    db = tmp_path / "view.duckdb"
    run = changes_job(
        tmp_path,
        "handover",
        data,
        sink=rf.sinks.DuckDB(db, "view"),
        rows_per_s=2_000,
        partitions=4,
        consumers=1,
        checkpoint_interval_s=60.0,
        faults=plan,
    ).start()
    try:
        scale_out_while_held(run, plan, consumers=3)  # its revocations wait for the held step
        assert not run.status()["done"]
        run.scale(consumers=1)  # consumers 1 and 2 stop: each flushes and commits first
        result = run.wait(timeout_s=180)
    finally:
        plan.resume()
        run.stop()
    assert result.stats["rebalances"] >= 2
    assert_same_rows(read_view(db), expected, columns=COLUMNS)


# ----------------------------------------------------------------------------- unbounded input


class _ThenIdle(Split):
    """An unbounded split whose rows end after ``table``: then it only yields idle ticks."""

    unbounded = True

    def __init__(self, table: pa.Table, batch_rows: int):
        self.table, self.batch_rows, self.name = table, batch_rows, "then-idle"

    def read(self, position: int):
        n, b = self.table.num_rows, self.batch_rows
        while position < n:
            end = min(n, (position // b + 1) * b)  # ends on a fixed grid (the Split contract)
            yield self.table.slice(position, end - position).combine_chunks().to_batches()[0], end
            position = end
        empty = pa.RecordBatch.from_pylist([], schema=self.table.schema)
        while True:  # an idle tick now and then, as the contract asks
            time.sleep(0.1)
            yield empty, n


class ThenIdle(Source):
    def __init__(self, table: pa.Table):
        self.table = table

    @property
    def unbounded(self) -> bool:
        return True

    @property
    def schema(self) -> pa.Schema:
        return self.table.schema

    def splits(self) -> list[Split]:
        return [_ThenIdle(self.table, 2_000)]


def test_an_unbounded_source_makes_a_default_aggregate_emit_changes(ray_session, tmp_path, data, expected):
    """No end of input, so no final result: the view converges to the GROUP BY through upserts."""
    db = tmp_path / "view.duckdb"
    run = make_job(
        tmp_path,
        "unbounded",
        ThenIdle(data),
        partitions=2,
        sink=rf.sinks.DuckDB(db, "view"),
        checkpoint_interval_s=0.1,
        config=FAST,
    ).start()
    try:

        def view() -> pa.Table | None:
            try:
                return run.query("SELECT key, value_count, value_sum FROM view")
            except rf.errors.ConfigError:
                return None

        def converged() -> bool:
            v = view()
            return v is not None and pc.sum(v.column("value_count")).as_py() == data.num_rows

        wait_for_condition(converged, timeout=120)
        assert not run.status()["done"]
        assert_same_rows(view(), expected, columns=COLUMNS)
    finally:
        run.stop()
