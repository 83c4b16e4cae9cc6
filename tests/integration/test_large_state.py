"""State larger than memory end to end (issue 13, part 3): a keyed job whose state passes the
consumer's budget (a tiny ``consumer_max_bytes``) spills runs to ``spill_dir``, reports them in
the consumer's status, and finishes exactly against DuckDB, with a consumer killed mid-run."""

from __future__ import annotations

import os
import signal

import duckdb
import pyarrow as pa
import pytest
import ray
from ray._common.test_utils import wait_for_condition

import rayflow as rf
from rayflow._internal import naming
from rayflow.testing import KEYED_SQL, Fault, FaultPlan, assert_same_rows, duckdb_reference, throttle
from tests.conftest import make_job

pytestmark = pytest.mark.ray

AGG = [("value", "count"), ("value", "sum")]


@pytest.fixture(scope="module")
def data() -> pa.Table:
    return rf.sources.Synthetic(events=160_000, keys=60_000, seed=31).to_table()


def _consumer_status(name: str, member: str) -> dict | None:
    try:
        handle = ray.get_actor(naming.consumer_name(name, member), namespace=naming.NAMESPACE)
        return ray.get(handle.status.remote(), timeout=10)
    except (ValueError, ray.exceptions.RayError):
        return None  # not started yet, or killed by the plan


def _wait_spilled(name: str) -> dict:
    """Wait until a live consumer of job ``name`` reports state in runs; its status."""
    seen: dict = {}

    def spilled() -> bool:
        st = _consumer_status(name, "consumer-1")
        if st is not None:
            seen.update(st)
        return bool(st) and st["state_spilled_bytes"] > 0

    wait_for_condition(spilled, timeout=60, retry_interval_ms=200)
    return seen


def _kill_when_spilled(plan, spill, name: str, member: str):
    """Wait for ``member`` of job ``name`` to pause at its planned fault; check its runs are on
    disk (it had spilled); SIGKILL its process (as the fault's ``"kill"`` would: a crash)."""
    wait_for_condition(lambda: bool(plan.fired()), timeout=60, retry_interval_ms=100)
    dirs = list(spill.glob(f"rayflow-state-{name}-{member}-*"))
    assert len(dirs) == 1, dirs
    assert any(dirs[0].rglob("run-*.parquet")), f"{member} had not spilled when it was killed"
    os.kill(int(dirs[0].name.rsplit("-", 1)[1]), signal.SIGKILL)  # the dir name ends with its pid
    return dirs[0]


def _no_state_dirs_left(spill) -> bool:
    """The job's end wiped every consumer's spill directory (the killed one's included)."""
    return not list(spill.glob("rayflow-state-*"))


def large_state_job(tmp_path, name, data, *, fault: Fault, emit: str | None = None, **kw):
    """The keyed job under a consumer budget of 256 KiB (128 KiB per partition, the state is ~4x
    that), spilling to ``tmp_path / "spill"``, with ``fault`` planned."""
    plan = FaultPlan([fault], dir=str(tmp_path / "faults"))
    pipeline = make_job(
        tmp_path,
        name,
        data,
        batch_rows=4_000,
        operator=[throttle(60_000), rf.ops.Aggregate(by="key", aggs=AGG, emit=emit)],
        checkpoint_interval_s=0.2,
        config=rf.EngineConfig(
            fetch_max_bytes=100_000,
            heartbeat_interval_s=0.1,
            session_timeout_s=5.0,
            consumer_max_bytes=256 * 1024,
            spill_dir=str(tmp_path / "spill"),
        ),
        faults=plan,
        **kw,
    )
    return pipeline, plan


def test_state_past_the_budget_spills_and_stays_exact_under_a_kill(ray_session, tmp_path, data):
    spill = tmp_path / "spill"
    pipeline, plan = large_state_job(
        tmp_path,
        "large-state",
        data,
        fault=Fault(point="consumer.after_state_write", actor="consumer-0", nth=6, action="pause"),
    )
    run = pipeline.start()
    seen = _wait_spilled("large-state")
    assert 0 < seen["state_bytes"] and seen["state_spilled_bytes"] > 0, seen
    dead = _kill_when_spilled(plan, spill, "large-state", "consumer-0")
    result = run.wait(timeout_s=120)
    assert_same_rows(result.output, duckdb_reference(KEYED_SQL, events=data))
    # the killed process's runs are wiped by the next consumer on the node, the live ones' at the
    # end (teardown asks each consumer before it kills it): no run file, no directory is left
    assert not dead.exists()
    wait_for_condition(lambda: _no_state_dirs_left(spill), timeout=20)


def test_changes_of_a_spilled_state_are_exact_under_a_kill(ray_session, tmp_path, data):
    """emit="changes": each commit looks the changed keys up in the runs; the upserted view
    equals DuckDB's group-by, with a consumer killed after a commit (once it had spilled)."""
    db = tmp_path / "view.duckdb"
    pipeline, plan = large_state_job(
        tmp_path,
        "large-changes",
        data,
        fault=Fault(point="consumer.after_commit", actor="consumer-1", nth=5, action="pause"),
        emit="changes",
        sink=rf.sinks.DuckDB(db, "view"),
    )
    run = pipeline.start()
    _wait_spilled("large-changes")
    _kill_when_spilled(plan, tmp_path / "spill", "large-changes", "consumer-1")
    run.wait(timeout_s=120)
    con = duckdb.connect(str(db), read_only=True)
    view = con.sql("SELECT key, value_count, value_sum FROM view").to_arrow_table()
    con.close()
    assert_same_rows(view, duckdb_reference(KEYED_SQL, events=data))
    wait_for_condition(lambda: _no_state_dirs_left(tmp_path / "spill"), timeout=20)
