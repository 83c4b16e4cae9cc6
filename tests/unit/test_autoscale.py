"""The autoscaler's policy (pure, no Ray): known inputs, expected decisions; bounds and no
flapping as properties (docs/autoscaling.md)."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import rayflow as rf
from rayflow._internal.autoscaler import observation, sample_of
from rayflow._internal.group.autoscale import (
    DOWN,
    HOLD,
    INEFFECTIVE_BLOCK_S,
    RATE_MEMORY_S,
    UP,
    UP_TOLERANCE,
    Observation,
    PolicyState,
    decide,
    decide_keda,
    granular,
    keda_recommendation,
    true_rate,
)
from rayflow._internal.runtime import leaving_members
from rayflow.errors import ConfigError

# Round numbers: target utilization 0.5, so a consumer of 100k rows per busy second takes 50k/s.
CFG = rf.Autoscale(
    min_consumers=1,
    max_consumers=8,
    target_utilization=0.5,
    interval_s=1.0,
    catch_up_s=10.0,
    stabilization_s=10.0,
    cooldown_s=5.0,
    scale_down_delay_s=20.0,
)
NOW = 1000.0


def obs(*, rate=100_000.0, consumers=2, busy=0.5, per_busy_s=100_000.0, lag=0, partitions=840, **kw):
    """``consumers`` consumers, each ``busy`` of a 1 s interval at ``per_busy_s`` rows per busy s;
    840 partitions (divisible by 1 to 8) unless given, so that whole partitions do not round."""
    return Observation(
        now_s=kw.pop("now_s", NOW),
        interval_s=1.0,
        input_rows_per_s=rate,
        busy_fraction=(busy,) * consumers,
        rows=(int(busy * per_busy_s),) * consumers,
        lag_rows=(lag,),
        consumers=consumers,
        partitions=partitions,
        **kw,
    )


# fmt: off
CASES = [
    # name, observation, state, expected action, target, a word of the reason
    ("nothing measured yet", obs(busy=0.0), PolicyState(), HOLD, 2, "no processing"),
    ("at target", obs(rate=100_000), PolicyState(), HOLD, 2, "at target"),
    # 300k/s over 50k/s per consumer (100k per busy s at 0.5): 6, in one step.
    ("up in one step to the needed count", obs(rate=300_000), PolicyState(), UP, 6, "needs 6.00"),
    # The true rate, not the busy fraction: 2 consumers 20% busy at 500k per busy s = 250k/s each.
    ("true rate", obs(rate=600_000, busy=0.2, per_busy_s=500_000), PolicyState(), UP, 3, "needs"),
    # 100k/s plus a backlog of 1M over catch_up_s 10 s: 200k/s, 4 consumers.
    ("backlog to catch up", obs(rate=100_000, lag=1_000_000), PolicyState(), UP, 4, "needs 4.00"),
    # Within the tolerance: 2.1 consumers needed at 2 (a utilization of 0.525 for 0.5).
    ("within the tolerance", obs(rate=105_000), PolicyState(), HOLD, 2, "within tolerance"),
    ("beyond the tolerance", obs(rate=115_000), PolicyState(), UP, 3, "needs 2.30"),
    # One second of input in flight (inflight_s=1) is not backlog: 150k lag is 50k of backlog.
    ("in-flight rows are not backlog", obs(rate=100_000, lag=150_000, inflight_s=1.0), PolicyState(), HOLD,
     2, "within tolerance"),
    # Partitions are dealt whole: 5.7 consumers' worth over 8 partitions needs 8 (at 6 or 7,
    # some hold 2 partitions, 1.43 consumers' worth); over 12 partitions, 6.
    ("partitions dealt whole", obs(rate=285_000, partitions=8), PolicyState(), UP, 8, "needs 5.70"),
    ("partitions dealt whole, finer", obs(rate=285_000, partitions=12), PolicyState(), UP, 6, "needs 5.70"),
    ("capped at max_consumers", obs(rate=1_000_000), PolicyState(), UP, 8, "max_consumers"),
    ("capped at max, held there", obs(rate=1_000_000, consumers=8), PolicyState(), HOLD, 8, "capped"),
    ("capped at the partitions", obs(rate=300_000, partitions=4), PolicyState(), UP, 4, "partitions"),
    ("capped by the cluster", obs(rate=300_000, schedulable=3), PolicyState(), UP, 3, "cluster"),
    ("cluster full: hold", obs(rate=300_000, schedulable=2), PolicyState(), HOLD, 2, "cluster"),
    ("cooldown after an action", obs(rate=300_000), PolicyState(last_action_s=NOW - 2), HOLD, 2, "cooldown"),
    ("below min_consumers", obs(consumers=0, busy=0.0), PolicyState(), UP, 1, "min_consumers"),
    ("above max_consumers", obs(consumers=9), PolicyState(last_action_s=NOW - 1), DOWN, 8, "max_consumers"),
    # An idle interval: the last measured rate sizes the group (2 consumers for 100k/s).
    ("idle: last rate", obs(consumers=4, busy=0.0), PolicyState(rows_per_busy_s=1e5, last_action_s=0.0,
     observing_since_s=NOW - 50), DOWN, 2, "at most 2"),
    # Down: 1 needed now, but the window saw 3 five seconds ago: down to 3, not 1.
    ("down to the window's max", obs(rate=40_000, consumers=5),
     PolicyState(last_action_s=NOW - 100, observing_since_s=NOW - 50, window=((NOW - 5, 3),)), DOWN, 3,
     "at most 3"),
    # A recommendation older than the window is forgotten.
    ("old recommendation forgotten", obs(rate=40_000, consumers=5),
     PolicyState(last_action_s=NOW - 100, observing_since_s=NOW - 50, window=((NOW - 11, 6),)), DOWN, 1,
     "at most 1"),
    ("window still needs the count", obs(rate=40_000, consumers=5),
     PolicyState(last_action_s=NOW - 100, observing_since_s=NOW - 50, window=((NOW - 5, 5),)), HOLD, 5,
     "needed 5"),
    ("down waits for the stabilization window", obs(rate=40_000, consumers=5),
     PolicyState(last_action_s=NOW - 100, observing_since_s=NOW - 3), HOLD, 5, "stabilizing"),
    ("down waits for the scale-down delay", obs(rate=40_000, consumers=5),
     PolicyState(last_action_s=NOW - 15, observing_since_s=NOW - 10), HOLD, 5, "scale-down delay"),
    ("first observation starts the window", obs(rate=40_000, consumers=5), PolicyState(), HOLD, 5,
     "stabilizing"),
    ("up is not delayed by the down delay", obs(rate=300_000),
     PolicyState(last_action_s=NOW - 6), UP, 6, "needs"),
]
# fmt: on


@pytest.mark.parametrize(("name", "o", "state", "action", "target", "why"), CASES, ids=[c[0] for c in CASES])
def test_decisions(name, o, state, action, target, why):
    d, new = decide(o, state, CFG)
    assert (d.action, d.target) == (action, target), d
    assert why in d.reason, d.reason
    if action != HOLD:
        assert new.last_action_s == NOW and new.window == () and new.observing_since_s is None
    assert d.to_dict()["current"] == o.consumers


# Light load (busy below LIGHT_LOAD x target utilization, here 0.25): 4 consumers 10% busy at
# 50k rows per busy s carry 20k rows/s; the rate measured under load 20 s ago was 200k.
LIGHT = dict(rate=20_000, consumers=4, busy=0.1, per_busy_s=50_000)
SETTLED = dict(last_action_s=NOW - 100, observing_since_s=NOW - 50)


def test_light_load_is_sized_by_the_rate_measured_under_load():
    state = PolicyState(loaded_rate=(NOW - 20, 200_000.0), **SETTLED)
    # 80k/s needs 0.8 consumers at 200k per busy s, but 3.2 (so 4: no change) at 50k.
    d, new = decide(obs(**{**LIGHT, "rate": 80_000}), state, CFG)
    assert (d.action, d.target) == (DOWN, 1), d
    assert d.rows_per_busy_s == 200_000 and d.measured_rows_per_busy_s == pytest.approx(50_000)
    assert new.loaded_rate == (NOW - 20, 200_000.0)  # a light interval does not replace it


def test_without_a_recent_loaded_rate_the_light_rate_sizes_the_group():
    for state in (PolicyState(**SETTLED), PolicyState(loaded_rate=(NOW - RATE_MEMORY_S - 1, 2e5), **SETTLED)):
        d, _ = decide(obs(**{**LIGHT, "rate": 80_000}), state, CFG)
        assert (d.action, d.target, d.rows_per_busy_s) == (HOLD, 4, pytest.approx(50_000)), d


def test_under_load_the_measured_rate_is_used_even_when_lower():
    """Heavier rows: a fall in capacity measured under load counts at once (no memory)."""
    state = PolicyState(loaded_rate=(NOW - 20, 200_000.0), **SETTLED)
    d, new = decide(obs(rate=80_000, consumers=2, busy=0.8, per_busy_s=50_000), state, CFG)
    assert (d.action, d.target) == (UP, 4) and d.rows_per_busy_s == pytest.approx(50_000), d
    assert new.loaded_rate == (NOW, pytest.approx(50_000))


# A scale-up 2 -> 4 made at 100k rows per busy s (capacity 200k rows/s): after the cooldown,
# 4 consumers 80% busy needing more.
AFTER_UP = PolicyState(last_action_s=NOW - 6, scale_up_check=(2, 4, 200_000.0))


def test_an_ineffective_scale_up_blocks_the_next():
    # 52k rows per busy s at 4: 208k of capacity, 8k gained of 200k expected (under 10%).
    d, new = decide(obs(rate=400_000, consumers=4, busy=0.8, per_busy_s=52_000), AFTER_UP, CFG)
    assert (d.action, d.target) == (HOLD, 4) and d.reason.startswith("capped: the last scale-up (2 -> 4)"), d
    assert new.blocked is not None and new.scale_up_check is None
    # Still blocked later; at INEFFECTIVE_BLOCK_S renewed while the evidence holds (a starved
    # group stays put rather than trying the next step every 5 minutes) ...
    later = obs(rate=400_000, consumers=4, busy=0.8, per_busy_s=52_000, now_s=NOW + 60)
    assert decide(later, new, CFG)[0].action == HOLD
    end = NOW + INEFFECTIVE_BLOCK_S + 1
    d, renewed = decide(obs(rate=400_000, consumers=4, busy=0.8, per_busy_s=52_000, now_s=end), new, CFG)
    assert d.action == HOLD and renewed.blocked[0] == end
    # ... and dropped when the interval at its end tells nothing (lightly loaded, no backlog).
    d, after = decide(obs(rate=10_000, consumers=4, busy=0.1, per_busy_s=52_000, now_s=end), new, CFG)
    assert after.blocked is None and after.blocked_by is None


def test_an_effective_scale_up_does_not_block():
    d, new = decide(obs(rate=400_000, consumers=4, busy=0.8, per_busy_s=95_000), AFTER_UP, CFG)
    assert d.action == UP and new.blocked is None
    assert new.scale_up_check == (4, d.target, pytest.approx(95_000 * 4))  # the next one is checked too


def test_a_scale_up_is_not_judged_under_light_load_and_a_scale_down_unblocks():
    d, new = decide(obs(rate=40_000, consumers=4, busy=0.1, per_busy_s=52_000), AFTER_UP, CFG)
    assert new.blocked is None and new.scale_up_check is None
    blocked = PolicyState(
        last_action_s=NOW - 100, observing_since_s=NOW - 50, blocked=(NOW - 10, "capped: x")
    )
    d, new = decide(obs(rate=40_000, consumers=5), blocked, CFG)
    assert d.action == DOWN and new.blocked is None


def test_decision_carries_its_numbers():
    d, _ = decide(obs(rate=300_000, lag=500_000), PolicyState(), CFG)
    assert d.rows_per_busy_s == pytest.approx(100_000)
    assert d.demand_rows_per_s == pytest.approx(350_000)
    assert d.needed == pytest.approx(7.0)
    assert d.busy_fraction == pytest.approx(0.5)
    assert (d.lag_rows, d.backlog_rows, d.ceiling, d.recommended) == (500_000, 500_000, 8, 7)


def test_true_rate_needs_enough_busy_time():
    assert true_rate(obs(busy=0.01, consumers=1)) is None  # 10 ms of work: not a measure
    assert true_rate(obs(busy=0.25, per_busy_s=80_000)) == pytest.approx(80_000)


@pytest.mark.parametrize(
    ("needed", "partitions", "expected"),
    [(5.7, 8, 8), (4.0, 8, 4), (4.01, 8, 8), (3.2, 8, 4), (5.7, 16, 8), (5.7, 12, 6), (20, 8, 8),
     (0.3, 8, 1), (0, 8, 0), (7.0, 840, 7)],
)  # fmt: skip
def test_granular_count(needed, partitions, expected):
    assert granular(needed, partitions) == expected


def test_keda_style_policy():
    assert keda_recommendation(250_000, lag_threshold_rows=100_000, cfg=CFG) == 3
    assert keda_recommendation(0, lag_threshold_rows=100_000, cfg=CFG) == 1  # clamped to min
    assert keda_recommendation(10**9, lag_threshold_rows=100_000, cfg=CFG) == 8
    d, _ = decide_keda(obs(uncommitted_rows=450_000), PolicyState(), CFG, lag_threshold_rows=100_000)
    assert (d.action, d.target) == (UP, 5)


def test_observation_from_two_status_samples():
    def status(rows_read, busy, done, lag, processed, committed):
        return {
            "rows_read": rows_read,
            "unread_rows": 100,
            "lag_rows": lag,
            "consumers": {"consumer-0": {"busy_s": busy, "rows_processed": done}},
            "partitions": [{"lag_rows": lag, "processed_rows": processed, "committed_rows": committed}],
        }

    a = sample_of(status(1_000, 1.0, 800, 200, 800, 800), t=10.0)
    b = sample_of(status(3_000, 1.5, 2_800, 300, 2_800, 2_700), t=12.0)
    o = observation(a, b, consumers=2, partitions=4, schedulable=None, inflight_s=1.0)
    assert o.input_rows_per_s == pytest.approx(1_000)  # 2,000 more rows over 2 s
    assert o.busy_fraction == (0.25,) and o.rows == (2_000,)
    assert o.lag_rows == (200,)  # 300 uncommitted, of which 100 processed: 200 wait
    assert o.uncommitted_rows == 300 and o.consumers == 2 and o.interval_s == 2.0 and o.inflight_s == 1.0
    assert true_rate(o) == pytest.approx(4_000)


def test_a_consumer_missing_from_the_previous_sample_is_left_out_unless_new():
    """A consumer that did not answer one status poll (skipped, not waited for) reappears with
    everything it did since it started: counted from zero, its rows would swell the true rate
    and shrink the group. Only a consumer never seen before counts from zero."""

    def sample(t, consumers):
        return {"t": t, "arrived": 0, "consumers": consumers, "lag": (0,), "uncommitted": 0}

    a = sample(10.0, {"consumer-0": (1.0, 1_000)})  # consumer-1 was slow to answer here
    b = sample(11.0, {"consumer-0": (1.5, 1_500), "consumer-1": (50.0, 900_000), "consumer-2": (0.2, 100)})
    kw = {"consumers": 3, "partitions": 4, "schedulable": None}
    o = observation(a, b, **kw, seen={"consumer-0", "consumer-1"})
    assert o.rows == (500, 100) and o.busy_fraction == pytest.approx((0.5, 0.2))
    assert true_rate(o) == pytest.approx(600 / 0.7)
    # Without what was seen before, every consumer absent from prev is new (as before).
    assert observation(a, b, **kw).rows == (500, 900_000, 100)


@pytest.mark.parametrize(
    "kw",
    [
        {"min_consumers": 0},
        {"min_consumers": 3, "max_consumers": 2},
        {"target_utilization": 1.5},
        {"target_utilization": 0},
        {"interval_s": 0},
        {"interval_s": float("inf")},  # the loop's wait would raise OverflowError: a dead thread
        {"interval_s": 1e300},
        {"cooldown_s": -1},
        {"cooldown_s": 30, "scale_down_delay_s": 10},
        {"catch_up_s": "30"},
        {"max_consumers": True},
    ],
)
def test_config_is_validated(kw):
    with pytest.raises(ConfigError):
        rf.Autoscale(**kw)


def test_pipeline_starting_size():
    src = rf.sources.Synthetic(events=1000)
    p = rf.Pipeline(name="a", source=src, key="key", autoscale=rf.Autoscale(min_consumers=3, max_consumers=5))
    assert p.consumers == 3
    p = rf.Pipeline(name="a", source=src, key="key", consumers=4, autoscale=rf.Autoscale(max_consumers=5))
    assert p.consumers == 4
    assert rf.Pipeline(name="a", source=src, key="key").consumers == 2
    with pytest.raises(ConfigError, match="outside the autoscaler's bounds"):
        rf.Pipeline(name="a", source=src, key="key", consumers=6, autoscale=rf.Autoscale(max_consumers=5))
    with pytest.raises(ConfigError, match="rf.Autoscale"):
        rf.Pipeline(name="a", source=src, key="key", autoscale={"max_consumers": 5})
    with pytest.raises(ConfigError, match="nothing to own"):
        rf.Pipeline(name="a", source=src, key="key", partitions=2, autoscale=rf.Autoscale(min_consumers=3))


# ----------------------------------------------------------------------------- properties

observations = st.builds(
    lambda rate, n, busy, per, lag, parts, sched: obs(
        rate=rate, consumers=n, busy=busy, per_busy_s=per, lag=lag, partitions=parts, schedulable=sched
    ),
    rate=st.floats(0, 1e7),
    n=st.integers(CFG.min_consumers, CFG.max_consumers),
    busy=st.floats(0, 1),
    per=st.floats(1e3, 1e7),
    lag=st.integers(0, 10**8),
    parts=st.integers(1, 32),
    sched=st.none() | st.integers(0, 16),
)
states = st.builds(
    lambda last, since, rate, recs: PolicyState(
        last_action_s=None if last is None else NOW - last,
        observing_since_s=None if since is None else NOW - since,
        rows_per_busy_s=rate,
        window=tuple((NOW - age, r) for age, r in recs),
    ),
    last=st.none() | st.floats(0, 100),
    since=st.none() | st.floats(0, 100),
    rate=st.none() | st.floats(1e3, 1e7),
    recs=st.lists(st.tuples(st.floats(0.001, 30), st.integers(1, 8)), max_size=5),
)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(o=observations, state=states)
def test_target_stays_in_bounds(o, state):
    d, _ = decide(o, state, CFG)
    assert CFG.min_consumers <= d.target <= CFG.max_consumers
    if d.action == UP:  # never past what the partitions and the cluster allow
        assert d.target <= max(d.ceiling, CFG.min_consumers) and d.target > o.consumers
    if d.action == DOWN:
        assert d.target < o.consumers
    if d.action == HOLD:
        assert d.target == o.consumers


@settings(max_examples=40, derandomize=True, deadline=None)
@given(
    rate=st.integers(1_000, 2_000_000),
    per_busy_s=st.integers(100_000, 1_000_000),
    start=st.integers(CFG.min_consumers, CFG.max_consumers),
)
def test_constant_input_does_not_flap(rate, per_busy_s, start):
    """A constant input, simulated for 10 minutes (decisions every 2 s) with the backlog it
    builds while the group is short: at most two actions (up, then down once the backlog is
    gone), none in the second half, and the group ends at the count the input needs."""
    exact = rate / (per_busy_s * CFG.target_utilization)
    assume(abs(exact - round(exact)) > 0.01)  # on a boundary, rounding of the rows may add one
    n, lag, state, actions, dt = start, 0.0, PolicyState(), [], 2.0
    for t in range(0, 600, int(dt)):
        capacity = n * per_busy_s
        work = min(capacity, rate + lag / dt)  # rows/s the group can do over this interval
        lag = max(0.0, lag + (rate - work) * dt)
        o = Observation(
            now_s=float(t),
            interval_s=dt,
            input_rows_per_s=float(rate),
            busy_fraction=(work / capacity,) * n,
            rows=(int(work * dt / n),) * n,
            lag_rows=(int(lag),),
            consumers=n,
            partitions=16,
        )
        d, state = decide(o, state, CFG)
        if d.action != HOLD:
            actions.append((t, d.action))
            n = d.target
    assert len(actions) <= 2, actions
    assert all(t < 300 for t, _ in actions), actions  # settled in the first half
    if len(actions) == 2:
        assert [a for _, a in actions] == [UP, DOWN], actions
    need = max(CFG.min_consumers, min(CFG.max_consumers, granular(exact, 16)))
    tolerated = n < need and exact <= n * (1 + UP_TOLERANCE)  # a hair over n: n is kept
    assert n == need or tolerated, (n, need, actions)


# ----------------------------------------------------------------------------- priority tiers


def test_tiers_are_checked_against_min_consumers():
    """The autoscaler may shrink the group to min_consumers: a tier's dedicated consumers (and
    the shared one the other partitions need) must fit in it, not only in the starting size."""
    src = rf.sources.Synthetic(events=1000)
    tier = rf.Tier(name="vip", priority=1, partitions=[0], dedicated_consumers=1)
    kw = {"name": "a", "source": src, "key": "key", "partitions": 4, "tiers": [tier]}
    with pytest.raises(rf.errors.TierError, match="min_consumers"):
        rf.Pipeline(**kw, consumers=3, autoscale=rf.Autoscale(min_consumers=1, max_consumers=4))
    p = rf.Pipeline(**kw, autoscale=rf.Autoscale(min_consumers=2, max_consumers=4))
    assert p.consumers == 2


def test_a_scale_down_removes_shared_consumers_before_dedicated_ones():
    members = ["consumer-0", "consumer-1", "consumer-2", "consumer-10"]
    assert leaving_members(members, 2) == ["consumer-2", "consumer-10"]  # the newest
    # consumer-10 holds a tier's role: it stays, the newest shared ones go.
    assert leaving_members(members, 2, dedicated={"consumer-10"}) == ["consumer-1", "consumer-2"]
    assert leaving_members(members, 1, dedicated={"consumer-2", "consumer-10"}) == [
        "consumer-10", "consumer-0", "consumer-1",
    ]  # fmt: skip
    assert leaving_members(members, 4, dedicated={"consumer-0"}) == []


def test_the_cooldown_drops_its_observations():
    """During the cooldown the partitions that moved pause and restore: the rate measured then
    describes the rebalance, so it must not be kept for a later interval too light to measure."""
    state = PolicyState(last_action_s=NOW - 1.0, rows_per_busy_s=100_000.0)
    _, state = decide(obs(per_busy_s=10_000.0), state, CFG)  # within the 5 s cooldown
    assert state.rows_per_busy_s == 100_000.0 and state.pending == (0, 0.0)
    # After it, an interval with too little work to measure uses the rate of before the action.
    light = obs(now_s=NOW + 10, busy=0.001, per_busy_s=100_000.0, rate=100_000.0, consumers=2)
    d, _ = decide(light, state, CFG)
    assert d.rows_per_busy_s == 100_000.0
