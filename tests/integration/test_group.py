"""The consumer group on real Ray: live scaling, crashes, zombies; results equal DuckDB's."""

from __future__ import annotations

import os
import signal
import time

import duckdb
import pyarrow as pa
import pytest
import ray
from ray._common.test_utils import wait_for_condition

import rayflow as rf
from rayflow._internal.checkpoint.commit import CommitRecord
from rayflow.testing import KEYED_SQL, Fault, FaultPlan, assert_same_rows, duckdb_reference, throttle
from tests.conftest import make_job

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def data() -> pa.Table:
    return rf.sources.Synthetic(events=300_000, keys=20_000, seed=7).to_table()


@pytest.fixture(scope="module")
def expected(data) -> pa.Table:
    return duckdb_reference(KEYED_SQL, events=data)


def throttled(name, data, tmp_path, *, consumers, rows_per_s=150_000, faults=None, **cfg) -> rf.Pipeline:
    """A job slow enough (~2-4 s on 2 cores) to act on while it runs."""
    return make_job(
        tmp_path,
        name,
        data,
        batch_rows=10_000,
        partitions=8,
        operator=[
            throttle(rows_per_s),
            rf.ops.Aggregate(by="key", aggs=[("value", "count"), ("value", "sum")]),
        ],
        consumers=consumers,
        checkpoint_interval_s=0.2,
        config=rf.EngineConfig(fetch_max_bytes=200_000, heartbeat_interval_s=0.1, **cfg),
        faults=faults,
    )


def progressed(run, fraction, total):
    return lambda: run.status()["processed_rows"] >= fraction * total


def test_scale_up_and_down_mid_job(ray_session, tmp_path, data, expected):
    # Slow enough that the job is still running when the new consumers are in, even when
    # starting them takes seconds (a loaded machine): else every partition is final first.
    run = throttled("scale", data, tmp_path, consumers=2, rows_per_s=40_000).start()
    wait_for_condition(progressed(run, 0.1, data.num_rows), timeout=60)
    run.scale(consumers=4)
    wait_for_condition(lambda: len(run.status()["members"]) == 4, timeout=30)
    wait_for_condition(
        lambda: len({p["owner"] for p in run.status()["partitions"] if not p["final"]} - {None}) >= 3,
        timeout=30,
    )
    wait_for_condition(progressed(run, 0.4, data.num_rows), timeout=60)
    run.scale(consumers=1)
    assert len(run.status()["members"]) == 1
    result = run.wait(timeout_s=120)
    assert_same_rows(result.output, expected)
    assert result.stats["rebalances"] >= 3


@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_killed_consumer_loses_and_doubles_nothing(ray_session, tmp_path, data, expected, how):
    run = throttled(f"kill-{how[:3]}", data, tmp_path, consumers=3).start()
    wait_for_condition(progressed(run, 0.2, data.num_rows), timeout=60)
    victim = run.consumers["consumer-1"]
    owned = set(ray.get(victim.status.remote(), timeout=30)["partitions"])
    if how == "ray.kill":
        ray.kill(victim)
    else:
        os.kill(ray.get(victim.status.remote(), timeout=30)["pid"], signal.SIGKILL)
    # its partitions move to the survivors
    wait_for_condition(
        lambda: all(
            p["owner"] in ("consumer-0", "consumer-2")
            for p in run.status()["partitions"]
            if p["partition"] in owned and not p["final"]
        ),
        timeout=30,
    )
    result = run.wait(timeout_s=120)
    assert_same_rows(result.output, expected)
    assert result.stats["recoveries"] >= 1


def test_zombie_consumer_is_fenced(ray_session, tmp_path, data, expected):
    """A frozen consumer misses its session deadline; when it thaws, its commits are refused."""
    run = throttled("zombie", data, tmp_path, consumers=2, rows_per_s=100_000, session_timeout_s=1.0).start()
    wait_for_condition(progressed(run, 0.15, data.num_rows), timeout=60)
    zombie = run.consumers["consumer-0"]
    st = ray.get(zombie.status.remote(), timeout=30)
    os.kill(st["pid"], signal.SIGSTOP)
    try:
        wait_for_condition(
            lambda: all(p["owner"] != "consumer-0" for p in run.status()["partitions"]), timeout=30
        )
    finally:
        os.kill(st["pid"], signal.SIGCONT)
    # A commit under the old epochs is refused, partition by partition.
    stale = [
        CommitRecord(
            partition=p,
            lease_epoch=e,
            positions={},
            state_files=[],
            output_files=[],
            rows_in=0,
            rows_total=0,
            state_rows=0,
            final=False,
            map_version=1,
        )
        for p, e in st["partitions"].items()
    ]
    reply = ray.get(run.manager.commit.remote("consumer-0", stale), timeout=30)
    assert reply["accepted"] == [] and sorted(reply["fenced"]) == sorted(st["partitions"])
    result = run.wait(timeout_s=120)
    assert_same_rows(result.output, expected)
    assert result.stats["recoveries"] >= 1


def test_rebalance_events_record_moves_and_pauses(ray_session, tmp_path, data):
    run = throttled("events", data, tmp_path, consumers=1).start()
    wait_for_condition(progressed(run, 0.1, data.num_rows), timeout=60)
    run.scale(consumers=2)
    wait_for_condition(lambda: len(ray.get(run.manager.moves_since.remote(0), timeout=30)) >= 1, timeout=30)
    moves = ray.get(run.manager.moves_since.remote(0), timeout=30)
    assert {m["from"] for m in moves} == {"consumer-0"} and {m["to"] for m in moves} == {"consumer-1"}
    assert all(m["why"] == "join" and 0 <= m["pause_s"] < 30 for m in moves)
    run.wait(timeout_s=120)


def test_status_reports_consumers_and_backpressure(ray_session, tmp_path, data):
    run = throttled("status", data, tmp_path, consumers=2).start()
    wait_for_condition(lambda: run.status()["processed_rows"] > 0, timeout=60)
    st = run.status()
    assert set(st["consumers"]) == {"consumer-0", "consumer-1"}
    assert all(c["busy_s"] >= 0 and c["commit_failures"] == 0 for c in st["consumers"].values())
    assert all({"queued_rows", "blocked_s", "lease_epoch", "owner"} <= set(p) for p in st["partitions"])
    run.wait(timeout_s=120)


def catalog_gate(d):
    """Faults that hold the manager's first catalog write until ``d/open`` exists (and create
    ``d/held`` once holding); ``d`` is created here."""
    d.mkdir()

    class Gate:  # defined in a function: pickled by value with the job, no import needed
        def __init__(self, d: str):
            self.d = d

        def hit(self, point: str, actor: str) -> None:
            if point != "manager.before_record" or os.path.exists(os.path.join(self.d, "open")):
                return
            open(os.path.join(self.d, "held"), "w").close()
            deadline = time.monotonic() + 120  # never hang the suite if the test dies first
            while not os.path.exists(os.path.join(self.d, "open")) and time.monotonic() < deadline:
                time.sleep(0.01)

    return Gate(str(d))


def test_failed_publications_are_retried_until_every_row_is_published_once(ray_session, tmp_path, data):
    """Issue 8, defect 1 (manager side): once the catalog has recorded a commit, its outputs are
    published by the manager, retried after failures, never doubled, never left pending."""
    plan = FaultPlan(
        [Fault(point="manager.publish", action="raise", nth=n) for n in (1, 2, 4)], dir=str(tmp_path / "f")
    )
    out = tmp_path / "out"
    small = data.slice(0, 60_000)
    run = rf.Pipeline(
        name="publish",
        source=rf.sources.Table(small, batch_rows=5_000),
        key="key",
        partitions=4,
        operator=[throttle(100_000), rf.ops.Map(lambda t: t.select(["key", "value", "ts"]))],
        sink=rf.sinks.Parquet(str(out)),
        consumers=2,
        checkpoint_dir=str(tmp_path / "ck"),
        checkpoint_interval_s=0.2,
        config=rf.EngineConfig(fetch_max_bytes=100_000, heartbeat_interval_s=0.1),
        faults=plan,
        progress=False,
    ).start()
    wait_for_condition(lambda: ray.get(run.manager.status.remote(), timeout=30)["done"], timeout=180)
    st = ray.get(run.manager.status.remote(), timeout=30)
    run.wait(timeout_s=60)
    assert len(plan.fired()) == 3, plan
    assert st["publish_failures"] >= 3 and st["publish_pending"] == 0 and st["failed"] is None, st
    assert "injected fault at manager.publish" in st["last_publish_error"]
    assert not [p for p in out.rglob("*") if p.is_file() and "_pending" in p.parts]
    con = duckdb.connect()  # a reader that globs every Parquet file below the sink
    got = con.sql(f"SELECT key, value, ts FROM read_parquet('{out}/**/*.parquet')").to_arrow_table()
    con.close()
    assert_same_rows(got, small.select(["key", "value", "ts"]))


def test_heartbeats_are_answered_while_a_catalog_write_is_held(ray_session, tmp_path, data, expected):
    """Issue 8, defect 7: the catalog write of a commit runs on the manager's I/O thread, so the
    event loop keeps answering heartbeats while it is held; the commit lock stays taken
    meanwhile (``recorded`` waits for it), and nothing is lost once it goes through."""
    gate = tmp_path / "gate"
    run = throttled("held", data, tmp_path, consumers=2, faults=catalog_gate(gate)).start()
    try:
        wait_for_condition(lambda: (gate / "held").exists(), timeout=60)
        for _ in range(20):
            reply = ray.get(run.manager.heartbeat.remote("consumer-0", -1, {}), timeout=30)
            assert reply == {"rejoin": True}  # a stale member epoch: answered all the same
            assert ray.get(run.manager.status.remote(), timeout=30)["done"] is False
        waiting = run.manager.recorded.remote([0])
        ready, _ = ray.wait([waiting], timeout=0.2)
        assert not ready  # the commit holds the lock: the 20 round trips happened during it
    finally:
        (gate / "open").touch()
    assert set(ray.get(waiting, timeout=60)) == {0}
    result = run.wait(timeout_s=180)
    assert_same_rows(result.output, expected)
    assert result.stats["recoveries"] == 0


def test_a_member_lost_while_its_commit_is_held_moves_only_after_it(ray_session, tmp_path, data, expected):
    """Issue 8, defect 7's trap: the catalog write is awaited, so a lease must not move between
    a commit's fencing check and its application. The owner dies while its commit is held in
    the catalog write; its partitions reach the replacement only with that commit (the commit
    lock, and grants recorded after it on the same I/O thread), so nothing is counted twice."""
    gate = tmp_path / "gate"
    run = throttled("held-gone", data, tmp_path, consumers=1, faults=catalog_gate(gate)).start()
    victim = run.consumers["consumer-0"]
    try:
        wait_for_condition(lambda: (gate / "held").exists(), timeout=60)
        ray.kill(victim, no_restart=True)

        def dead() -> bool:
            try:
                ray.get(victim.status.remote(), timeout=30)
            except ray.exceptions.RayActorError:
                return True
            return False

        wait_for_condition(dead, timeout=30)  # the manager's watch sees the death as Ray does
    finally:
        (gate / "open").touch()
    result = run.wait(timeout_s=180)  # the driver replaces the dead consumer
    assert_same_rows(result.output, expected)
    assert result.stats["recoveries"] >= 1
