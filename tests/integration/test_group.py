"""The consumer group on real Ray: live scaling, crashes, zombies; results equal DuckDB's."""

from __future__ import annotations

import os
import signal

import pyarrow as pa
import pytest
import ray
from ray._common.test_utils import wait_for_condition

import rayflow as rf
from rayflow._internal.checkpoint.commit import CommitRecord
from rayflow.testing import KEYED_SQL, assert_same_rows, duckdb_reference, throttle

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def data() -> pa.Table:
    return rf.sources.Synthetic(events=300_000, keys=20_000, seed=7).to_table()


@pytest.fixture(scope="module")
def expected(data) -> pa.Table:
    return duckdb_reference(KEYED_SQL, events=data)


def throttled(name, data, tmp_path, *, consumers, rows_per_s=150_000, **cfg) -> rf.Pipeline:
    """A job slow enough (~2-4 s on 2 cores) to act on while it runs."""
    return rf.Pipeline(
        name=name,
        source=rf.sources.Table(data, batch_rows=10_000),
        key="key",
        partitions=8,
        operator=[
            throttle(rows_per_s),
            rf.ops.Aggregate(by="key", aggs=[("value", "count"), ("value", "sum")]),
        ],
        consumers=consumers,
        checkpoint_dir=str(tmp_path / "ck"),
        checkpoint_interval_s=0.2,
        config=rf.EngineConfig(fetch_max_bytes=200_000, heartbeat_interval_s=0.1, **cfg),
        progress=False,
    )


def progressed(run, fraction, total):
    return lambda: run.status()["processed_rows"] >= fraction * total


def test_scale_up_and_down_mid_job(ray_session, tmp_path, data, expected):
    run = throttled("scale", data, tmp_path, consumers=2).start()
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
