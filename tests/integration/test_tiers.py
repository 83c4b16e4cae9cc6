"""Priority tiers on real Ray (docs/tiers.md): under overload the critical partitions keep a low
lag while the bulk ones fall behind; a dedicated consumer serves only its tier; exact result."""

from __future__ import annotations

import pytest
import ray
from ray._common.test_utils import wait_for_condition

import rayflow as rf
from rayflow.testing import KEYED_SQL, assert_same_rows, duckdb_reference, throttle
from tests.conftest import make_job

pytestmark = pytest.mark.ray


def test_overloaded_job_throttles_the_bulk_tier_first(ray_session, tmp_path):
    """40k events/s over 4 partitions (about 10k/s each) into consumers that process 20k/s.

    - "critical" (the partition of key 0, partition 0) has a dedicated consumer: it owns that
      partition alone, and keeps up.
    - "standard" (partition 1) shares the other consumer with the default tier (2 and 3): 30k/s
      there for 20k/s of capacity. The consumer serves "standard" first, so its lag stays low,
      while the default tier gets what is left and falls behind.

    (That the source spills the lowest tier first is a pure rule, tested in tests/unit/test_tiers.py
    and measured by bench/tiers.py: asserting it here would hang on byte counts of the moment.)
    """
    src = rf.sources.Synthetic(events=120_000, keys=10_000, seed=7, rate=40_000)
    run = make_job(
        tmp_path,
        "tiers",
        src,
        partitions=4,
        consumers=2,
        operator=[throttle(20_000), rf.ops.Aggregate(by="key", aggs=[("value", "count"), ("value", "sum")])],
        checkpoint_interval_s=0.3,
        config=rf.EngineConfig(num_sources=1),
        tiers=[
            rf.Tier(name="critical", priority=10, keys=[0], dedicated_consumers=1),
            rf.Tier(name="standard", priority=5, partitions=[1]),
        ],
    ).start()
    # Backlog: rows read but not processed yet (lag_rows less the processed, uncommitted ones,
    # as the autoscaler reads it). Lag itself would also count commit latency and a share of the
    # rows not read yet, which is spread over all partitions whatever their tier: both grow on a
    # loaded machine and say nothing about the order a consumer serves its partitions in.
    peak = {"critical": 0, "standard": 0, "default": 0}
    seen: dict = {}

    def bulk_fell_behind() -> bool:
        st = run.status()
        backlog = {"critical": 0, "standard": 0, "default": 0}
        for p in st["partitions"]:
            backlog[p["tier"]] += max(0, p["queued_rows"] - max(0, p["processed_rows"] - p["committed_rows"]))
        for k, v in backlog.items():
            peak[k] = max(peak[k], v)
        seen["status"], seen["default"] = st, backlog["default"]
        # Relative, so a hiccup of the higher tiers on a loaded machine waits for the bulk to
        # fall further behind rather than failing: the claim is the order, not a number of rows.
        return backlog["default"] >= max(20_000, 2.5 * max(peak["critical"], peak["standard"]))

    wait_for_condition(bulk_fell_behind, timeout=60, retry_interval_ms=100)
    st = seen["status"]
    tiers = {p["partition"]: p["tier"] for p in st["partitions"]}
    assert tiers == {0: "critical", 1: "standard", 2: "default", 3: "default"}
    owners = {p["partition"]: p["owner"] for p in st["partitions"]}
    assert st["dedicated"] == {owners[0]: "critical"}
    assert {owners[1], owners[2], owners[3]} == {next(m for m in st["members"] if m != owners[0])}
    # The bulk tier (two partitions) fell 20k rows behind while the higher tiers' backlogs stayed
    # under 1/2.5 of it: with no tier order (round-robin) "standard" would be at about half of it.
    assert 2.5 * max(peak["critical"], peak["standard"]) <= seen["default"], peak
    print("tier backlog peaks", peak)
    result = run.wait(timeout_s=120)
    assert_same_rows(result.output, duckdb_reference(KEYED_SQL, events=src.to_table()))


def test_dedicated_consumer_dies_then_a_resume_changes_the_tiers(ray_session, tmp_path):
    """The dedicated consumer is killed: its tier moves on (to the shared consumer until a
    replacement joins: the coordinator test in tests/unit/test_assignment_tiers.py pins that
    step), and the driver's replacement takes the role back while the tier still has work; the
    job stops and resumes with other tiers (not part of the checkpoint); the result is exact."""
    # Paced (6 s of input at 20k/s; the resume catches up at full speed): the critical tier
    # keeps getting rows until the input ends, whatever the speed of this machine, so the
    # replacement has seconds to take its role back, not what was left of an unpaced backlog
    # (about half a second: the shared consumer serves the critical tier first).
    src = rf.sources.Synthetic(events=120_000, keys=10_000, seed=3, rate=20_000)
    aggs = rf.ops.Aggregate(by="key", aggs=[("value", "count"), ("value", "sum")])

    def job(tiers):
        return make_job(
            tmp_path, "tiers-resume", src, partitions=4, consumers=2,
            operator=[throttle(100_000), aggs], checkpoint_interval_s=0.2, tiers=tiers,
        )  # fmt: skip

    run = job([rf.Tier(name="critical", priority=1, partitions=[0], dedicated_consumers=1)]).start()
    wait_for_condition(
        lambda: sum(p["processed_rows"] for p in run.status()["partitions"]) > 10_000, timeout=60
    )
    st = run.status()
    (dedicated,) = st["dedicated"]
    owners = {p["partition"]: p["owner"] for p in st["partitions"]}
    assert owners[0] == dedicated and dedicated not in (owners[1], owners[2], owners[3])
    ray.kill(run.consumers[dedicated])

    def taken_back() -> bool:  # status() replaces the dead consumer, which then takes the role
        st = run.status()
        roles = st["dedicated"]
        return len(roles) == 1 and dedicated not in roles and st["partitions"][0]["owner"] in roles

    wait_for_condition(taken_back, timeout=30, retry_interval_ms=100)
    assert not run.status()["partitions"][0]["final"]  # the role was taken while the tier had work
    run.stop()
    result = job([rf.Tier(name="other", priority=1, partitions=[3])]).run(timeout_s=120)
    assert_same_rows(result.output, duckdb_reference(KEYED_SQL, events=src.to_table()))
