"""Exactly-once under failure: crash any actor at any point of the commit path, then compare
the final result with DuckDB over the same input (DESIGN §5). Seeds are fixed, and the fault
schedule is in every assertion message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest
import ray
from ray._common.test_utils import wait_for_condition

import rayflow as rf
from rayflow.testing import (
    KEYED_SQL,
    Fault,
    FaultPlan,
    assert_same_rows,
    duckdb_reference,
    kill_actor,
    throttle,
)
from tests.conftest import make_job

pytestmark = pytest.mark.ray

AGG = [("value", "count"), ("value", "sum")]


@pytest.fixture(scope="module")
def data() -> pa.Table:
    return rf.sources.Synthetic(events=200_000, keys=20_000, seed=11).to_table()


@pytest.fixture(scope="module")
def expected(data) -> pa.Table:
    return duckdb_reference(KEYED_SQL, events=data)


def job(name, data, tmp_path, *, consumers, faults=None, operator=None, sink=None, rows_per_s=200_000):
    """A throttled keyed job, slow enough for faults to land midway."""
    return make_job(
        tmp_path,
        name,
        data,
        batch_rows=10_000,
        partitions=6,
        operator=operator or [throttle(rows_per_s), rf.ops.Aggregate(by="key", aggs=AGG)],
        sink=sink,
        consumers=consumers,
        checkpoint_interval_s=0.15,
        config=rf.EngineConfig(fetch_max_bytes=150_000, heartbeat_interval_s=0.1, session_timeout_s=5.0),
        faults=faults,
    )


def check_catalog(root) -> None:
    """A commit row never points at a missing file; no unpublished output is left behind."""
    con = duckdb.connect(str(root / "catalog.duckdb"), read_only=True)
    rows = con.execute("SELECT state_files FROM commits").fetchall()
    con.close()
    for (files,) in rows:
        for f in json.loads(files):
            assert (root / f).exists(), f"a commit points at the missing state file {f}"


CONSUMER_POINTS = [
    "consumer.step",
    "consumer.before_state_write",
    "consumer.after_state_write",
    "consumer.after_commit",
]


@pytest.mark.parametrize("consumers", [1, 3])
@pytest.mark.parametrize("point", CONSUMER_POINTS)
def test_consumer_killed_at_each_point(ray_session, tmp_path, data, expected, point, consumers):
    plan = FaultPlan([Fault(point=point, actor="consumer-0", nth=2)], dir=str(tmp_path / "faults"))
    result = job(f"c{consumers}-{point.split('.')[1]}", data, tmp_path, consumers=consumers, faults=plan).run(
        timeout_s=180
    )
    assert plan.fired(), f"{plan} never fired"
    assert_same_rows(result.output, expected)
    assert result.stats["recoveries"] >= 1
    check_catalog(tmp_path / "ck" / f"c{consumers}-{point.split('.')[1]}")


@pytest.mark.parametrize(
    "fault",
    [
        Fault(point="consumer.before_state_write", action="raise", nth=2),  # a failed snapshot write
        Fault(point="consumer.after_state_write", action="raise", nth=2),  # files written, commit lost
        Fault(point="manager.before_record", action="raise", nth=3),  # a failed catalog transaction
        Fault(point="manager.after_record", action="raise", nth=3),  # recorded, the reply lost
    ],
    ids=["snapshot-write", "after-write", "catalog-commit", "after-catalog"],
)
def test_failed_writes_are_retried(ray_session, tmp_path, data, expected, fault):
    plan = FaultPlan([fault], dir=str(tmp_path / "faults"))
    result = job("fail", data, tmp_path, consumers=2, faults=plan).run(timeout_s=180)
    assert plan.fired(), f"{plan} never fired"
    assert_same_rows(result.output, expected)
    check_catalog(tmp_path / "ck" / "fail")


@pytest.mark.parametrize("point", ["manager.before_record", "manager.after_record"])
def test_manager_killed_mid_commit(ray_session, tmp_path, data, expected, point):
    plan = FaultPlan([Fault(point=point, actor="manager", nth=4)], dir=str(tmp_path / "faults"))
    result = job("mgr", data, tmp_path, consumers=2, faults=plan).run(timeout_s=180)
    assert plan.fired(), f"{plan} never fired"
    assert_same_rows(result.output, expected)
    check_catalog(tmp_path / "ck" / "mgr")


@pytest.mark.parametrize("consumers", [1, 2])
def test_source_killed_replays_exactly(ray_session, tmp_path, data, expected, consumers):
    plan = FaultPlan([Fault(point="source.batch", actor="source-0", nth=8)], dir=str(tmp_path / "faults"))
    result = job(f"src{consumers}", data, tmp_path, consumers=consumers, faults=plan).run(timeout_s=180)
    assert plan.fired(), f"{plan} never fired"
    assert_same_rows(result.output, expected)


def test_manager_restart_keeps_leases(ray_session, tmp_path, data, expected):
    """What the README promises: after the manager is SIGKILLed and restarted by Ray, every
    consumer keeps every lease it held, under the same epoch (a reload would come with a new
    one), as both the manager and the consumers see it; and the result is exact."""
    run = job("keep", data, tmp_path, consumers=2, rows_per_s=30_000).start()
    wait_for_condition(lambda: run.status()["processed_rows"] > 20_000, timeout=60)

    def held() -> dict[int, tuple[str, int]]:  # the consumers' own view: partition -> (owner, epoch)
        st = {name: ray.get(c.status.remote(), timeout=30) for name, c in run.consumers.items()}
        return {p: (name, e) for name, s in st.items() for p, e in s["partitions"].items()}

    def leases() -> dict[int, tuple[str, int]]:  # the manager's view
        st = ray.get(run.manager.status.remote(), timeout=30)
        return {p["partition"]: (p["owner"], p["lease_epoch"]) for p in st["partitions"] if not p["final"]}

    pid = ray.get(run.manager.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    before, now = held(), leases()
    assert before and all(now[p] == v for p, v in before.items() if p in now), (before, now)
    kill_actor("keep", "manager")

    def rejoined() -> bool:
        st = ray.get(run.manager.status.remote(), timeout=30)
        return not st["ghosts"] and len(st["members"]) == 2

    wait_for_condition(rejoined, timeout=60)
    assert ray.get(run.manager.__ray_call__.remote(lambda self: os.getpid()), timeout=30) != pid
    after_manager, after = leases(), held()
    live = set(after_manager)  # partitions that became final meanwhile are left out
    assert {p: before[p] for p in before if p in live} == {p: after_manager[p] for p in before if p in live}
    assert {p: before[p] for p in before if p in live} == {p: after.get(p) for p in before if p in live}
    assert_same_rows(run.wait(timeout_s=180).output, expected)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_seeded_chaos_schedule(ray_session, tmp_path, data, expected, seed):
    plan = FaultPlan.random(seed=seed, dir=str(tmp_path / "faults"), count=4)
    result = job(f"chaos{seed}", data, tmp_path, consumers=2, faults=plan).run(timeout_s=240)
    try:
        assert_same_rows(result.output, expected)
    except AssertionError as e:
        raise AssertionError(f"{e}; schedule {plan}, fired {plan.fired()}") from e
    check_catalog(tmp_path / "ck" / f"chaos{seed}")


def test_parquet_sink_is_exactly_once_under_kills(ray_session, tmp_path, data):
    """Map outputs are emitted all along: no row may be missing or doubled in the dataset."""
    plan = FaultPlan(
        [
            Fault(point="consumer.after_state_write", actor="consumer-0", nth=3),
            Fault(point="manager.after_record", actor="manager", nth=6),
        ],
        dir=str(tmp_path / "faults"),
    )
    out = tmp_path / "out"
    job(
        "sink",
        data,
        tmp_path,
        consumers=2,
        faults=plan,
        sink=rf.sinks.Parquet(str(out)),
        operator=[throttle(200_000), rf.ops.Map(lambda t: t.select(["key", "value", "ts"]))],
    ).run(timeout_s=180)
    assert len(plan.fired()) == 2, plan
    got = pads.dataset(str(out), format="parquet").to_table()
    assert_same_rows(got, data)


def test_duckdb_sink_is_exactly_once_under_kills(ray_session, tmp_path, data):
    plan = FaultPlan(
        [
            Fault(point="consumer.after_state_write", actor="consumer-1", nth=2),
            Fault(point="manager.after_record", actor="manager", nth=5),
        ],
        dir=str(tmp_path / "faults"),
    )
    db = tmp_path / "out.duckdb"
    result = job(
        "duck",
        data,
        tmp_path,
        consumers=2,
        faults=plan,
        sink=rf.sinks.DuckDB(str(db), "events"),
        operator=[throttle(200_000), rf.ops.Filter(pc.field("value") < 500.0)],
    ).run(timeout_s=180)
    assert len(plan.fired()) == 2, plan
    assert result.output is None and result.output_path == str(db)
    con = duckdb.connect(str(db), read_only=True)
    got = con.sql("SELECT key, value, ts FROM events").to_arrow_table()
    con.close()
    assert_same_rows(got, duckdb_reference("SELECT * FROM d WHERE value < 500", d=data))


DRIVER = textwrap.dedent(
    """
    import os, sys
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray, rayflow as rf
    from rayflow.testing import throttle
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2)
    data = rf.sources.Synthetic(events=200_000, keys=20_000, seed=11).to_table()
    rf.Pipeline(
        name="driver", source=rf.sources.Table(data, batch_rows=5_000), key="key", partitions=6, consumers=2,
        operator=[throttle(20_000), rf.ops.Aggregate(by="key", aggs=[("value", "count"), ("value", "sum")])],
        checkpoint_dir=sys.argv[1], checkpoint_interval_s=0.1, progress=False,
        config=rf.EngineConfig(fetch_max_bytes=100_000),
    ).run()
    """
)


def test_driver_crash_then_rerun_resumes(ray_session, tmp_path, data, expected):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    ck = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, str(script), str(ck)], start_new_session=True)
    try:

        def committed() -> int:
            if not (ck / "driver" / "catalog.duckdb").exists():
                return 0
            from rayflow._internal.checkpoint.catalog import snapshot_copy

            con = duckdb.connect(snapshot_copy(str(ck / "driver" / "catalog.duckdb")), read_only=True)
            n = con.execute("SELECT count(*) FROM commits").fetchone()[0]
            con.close()
            return n

        wait_for_condition(lambda: committed() >= 6, timeout=120, retry_interval_ms=200)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, as a crash
        proc.wait()
    result = rf.Pipeline(
        name="driver",
        source=rf.sources.Table(data, batch_rows=5_000),
        key="key",
        partitions=6,
        consumers=2,
        # The same chain (a Map's spec is its type): paced 10x faster than the crashed driver's,
        # which had to be slow for the crash to land midway; the rerun only has to finish.
        operator=[throttle(200_000), rf.ops.Aggregate(by="key", aggs=AGG)],
        checkpoint_dir=str(ck),
        checkpoint_interval_s=0.1,
        progress=False,
    ).run(timeout_s=180)
    assert 0 < result.stats["events"] < 200_000
    assert_same_rows(result.output, expected)
    assert ray.is_initialized()
