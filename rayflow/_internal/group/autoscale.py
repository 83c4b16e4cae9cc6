"""The autoscaler's policy: how many consumers a job needs (pure; DESIGN §4, docs/autoscaling.md).

State in, decision and state out (the shape of Ray Serve's ``autoscaling_policy.py``): the
driver's thin shell (``_internal/autoscaler.py``) measures an :class:`Observation` every
interval, calls :func:`decide` with the :class:`PolicyState` the last call returned, and applies
the :class:`Decision`. Nothing here touches Ray or a clock.

**The recommendation** (DS2, Kalavri et al., OSDI'18): a consumer's *true* processing rate is
the rows it processed over the seconds it was busy processing them, not over wall time, so it
does not depend on how idle the consumer was; the group needs

    ceil((input rate + backlog / catch_up_s) / (true rate per consumer * target_utilization))

consumers: the input, plus the backlog (the lag beyond what a group that keeps up has in
flight, :func:`backlog`) worked off within ``catch_up_s``, each consumer busy
``target_utilization`` of the time. One step to the needed count, where a lag-threshold policy
(KEDA's Kafka scaler: ``ceil(lag / threshold)``) creeps up as lag builds and drops when it has
drained, the next oscillation already on its way.

Where DS2's model breaks: a consumer's rows per busy second are not constant but fall with its
load (each fetch and step has a fixed cost; a lightly loaded consumer pays it for small
batches). So a lightly loaded group (:data:`LIGHT_LOAD`) is sized by the last rate measured
under load, when that is higher and recent; without it, a group that has just shed load keeps
consumers it no longer needs.

**The guards**, in this order:

1. Bounds: the recommendation is clamped to ``[min_consumers, max_consumers]``; a scale-up also
   to the partitions (a consumer without a partition does nothing) and to the consumers the
   cluster can schedule now (``Observation.schedulable``). A group outside the bounds (resized
   by hand, or started so) is brought back at once.
2. Cooldown: for ``cooldown_s`` after a scaling action nothing is decided and the observations
   are dropped: the partitions that moved pause and restore, so lag and busy time describe the
   rebalance, not the load.
3. Up: at once (after the cooldown), to the recommendation, once more than
   :data:`UP_TOLERANCE` above the current count is needed.
4. Down: only once the observations since the cooldown span ``stabilization_s``, only after
   ``scale_down_delay_s`` since the last action, and only to the largest recommendation over
   the stabilization window, so a dip must last the whole window to count and a count that any
   recent moment needed is kept.

5. Effect: the first interval under load after a scale-up's cooldown measures the capacity it
   added; less than :data:`INEFFECTIVE_GAIN` of what was expected blocks further scale-ups for
   :data:`INEFFECTIVE_BLOCK_S` or until a scale-down (the bottleneck is not the consumers); so
   does a lightly loaded interval with a backlog whose throughput did not grow (starved
   consumers). A later interval at that count that finds the scale-up effective lifts it.

The count is also **granular** (:func:`granular`): partitions are dealt whole, so the group is
sized for its busiest consumer: with 8 partitions, 5 to 7 consumers leave some with 2
partitions, no better than 4; the policy picks 4 or 8.

Caveats: the true rate is the group's (rows over busy seconds, summed over consumers), and
the granular count assumes partitions of even load, so a group whose partitions carry very
unequal load is sized as if they did not (a hot partition needs splitting, not consumers);
a measurement that swings across a boundary of the ceiling can still add a consumer that the
window later takes back (the stabilization window makes that rare, not impossible).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from rayflow.config import Autoscale

#: Busy seconds (over all consumers, in one interval) below which no true rate is measured: a
#: few milliseconds of work say more about the per-step overhead than about the rate.
MIN_BUSY_S = 0.05

#: A scale-up needs more than this fraction above the current count (as Kubernetes' HPA
#: tolerance): at 6 consumers, 6.14 needed is a utilization of 0.72 for a target of 0.7, within
#: what the measurement's noise gives; one more consumer would cost a rebalance for nothing.
UP_TOLERANCE = 0.1

#: A group busy less than this fraction of ``target_utilization`` is lightly loaded: its
#: measured true rate understates what a consumer can do. Each fetch and step has a fixed cost,
#: and a lightly loaded consumer fetches often, in small batches, so its rows per busy second
#: fall with its load (16 cores, 2 us a row: 415k rows per busy s at 2 consumers 62% busy,
#: 240k at 8 consumers 25% busy, on the same 500k rows/s). Sized by that rate, a group that
#: has just shed load keeps consumers it does not need, and every consumer added lowers the
#: rate again; so a light interval is sized by the last rate measured under load, when that is
#: higher and recent (:data:`RATE_MEMORY_S`). Under load the measured rate is used as it is, so a
#: real fall in capacity (heavier rows) shows at once.
LIGHT_LOAD = 0.5

#: How long a rate measured under load sizes lightly loaded intervals (seconds).
RATE_MEMORY_S = 300.0

#: A scale-up is *ineffective* when the group's capacity (true rate x consumers), measured
#: under load after the cooldown, grew by less than this fraction of what the added consumers
#: were expected to add (Flink's autoscaler: ``scaling.effectiveness.threshold``). The
#: bottleneck is then elsewhere (the sources, a hot partition, CPUs shared by more processes
#: than cores): more consumers only slow each other down.
INEFFECTIVE_GAIN = 0.1

#: After an ineffective scale-up, further scale-ups wait this long (seconds), or for a
#: scale-down, or for an interval that finds the scale-up effective after all; the block is
#: renewed when the interval at its end still finds it ineffective. Each such hold is recorded
#: (reason starting ``capped``).
INEFFECTIVE_BLOCK_S = 300.0

HOLD, UP, DOWN = "hold", "scale_up", "scale_down"


@dataclass(frozen=True, kw_only=True)
class Observation:
    """What the driver measured over one decision interval (rates in rows/s, times in s).

    ``busy_fraction`` and ``rows`` are per consumer over the interval (``interval_s`` long);
    ``lag_rows`` per partition: rows read or available at the sources that are not processed
    yet (the rows processed and awaiting their commit are not backlog: they are gone at the next
    commit). ``uncommitted_rows``: Kafka's consumer lag (rows not yet committed, in flight ones
    included), for the lag-threshold policy; ``None``: the sum of ``lag_rows``.
    ``schedulable``: the most consumers the cluster can run now (the current ones plus what
    its free resources hold), ``None``: not limited (consumers reserve no resources).
    ``inflight_s``: seconds of input that are in flight in a group that keeps up (read, on
    their way to a consumer or to the source's trim after their commit): lag up to
    ``input_rows_per_s * inflight_s`` is not backlog (the shell gives the checkpoint interval).
    """

    now_s: float
    interval_s: float
    input_rows_per_s: float
    busy_fraction: tuple[float, ...]
    rows: tuple[int, ...]
    lag_rows: tuple[int, ...]
    consumers: int
    partitions: int
    schedulable: int | None = None
    uncommitted_rows: int | None = None
    inflight_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class PolicyState:
    """What one decision hands the next."""

    #: When the last scaling action was decided (``None``: never).
    last_action_s: float | None = None
    #: The last true rate per consumer that sized the group (rows per busy second), used when an
    #: interval measures none (the group was idle).
    rows_per_busy_s: float | None = None
    #: ``(time, rate)``: the last true rate measured under load (:data:`LIGHT_LOAD`).
    loaded_rate: tuple[float, float] | None = None
    #: Rows and busy seconds of light intervals, added up until they make a measure
    #: (:data:`MIN_BUSY_S`): a nearly idle group is measured over several intervals.
    pending: tuple[int, float] = (0, 0.0)
    #: When the current run of observations began (after the last action's cooldown).
    observing_since_s: float | None = None
    #: ``(time, recommendation)`` of the observations within the stabilization window.
    window: tuple[tuple[float, int], ...] = ()
    #: ``(from, to, capacity before)`` of the last scale-up, until its effect is measured.
    scale_up_check: tuple[int, int, float] | None = None
    #: ``(since, why)``: scale-ups are blocked after an ineffective one (:data:`INEFFECTIVE_GAIN`).
    blocked: tuple[float, str] | None = None
    #: Rows/s the group processed when the last scale-up was decided: what a lightly loaded
    #: group's throughput after it is compared with.
    scale_up_rows_per_s: float = 0.0
    #: ``(from, to, capacity before, rows/s before)`` of the scale-up that set ``blocked``:
    #: judged again while the block lasts.
    blocked_by: tuple[int, int, float, float] | None = None


@dataclass(frozen=True, kw_only=True)
class Decision:
    """A decision and the numbers that made it (recorded as an ``autoscale`` event)."""

    action: str  # HOLD, UP or DOWN
    reason: str
    current: int
    #: Consumers wanted after this decision (``current`` for a hold).
    target: int
    #: This interval's recommendation, clamped to the bounds (``None``: no rate measured yet).
    recommended: int | None
    #: The unrounded consumers needed at the target utilization (``None``: no rate).
    needed: float | None
    input_rows_per_s: float
    lag_rows: int
    #: The lag beyond what is in flight in a group that keeps up (``Observation.inflight_s``).
    backlog_rows: int
    #: Rows/s the group must process: the input plus the backlog over ``catch_up_s``.
    demand_rows_per_s: float
    #: The true rate per consumer that sized the group: this interval's, or under light load the
    #: last one measured under load when higher (:data:`LIGHT_LOAD`).
    rows_per_busy_s: float | None
    #: This interval's own measurement (``None``: too little work to tell, or a cooldown).
    measured_rows_per_busy_s: float | None
    busy_fraction: float
    #: The most consumers a scale-up may reach now (max, partitions, cluster).
    ceiling: int

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = round(v, 4)
        return d


def true_rate(obs: Observation, pending: tuple[int, float] = (0, 0.0)) -> float | None:
    """Rows per busy second of one consumer (the group's rows over its busy seconds, with the
    ``pending`` ones of earlier light intervals), or ``None`` when there was too little work to
    tell (:data:`MIN_BUSY_S`)."""
    rows, busy = _work(obs, pending)
    if busy < MIN_BUSY_S or rows <= 0:
        return None
    return rows / busy


def _work(obs: Observation, pending: tuple[int, float]) -> tuple[int, float]:
    return pending[0] + sum(obs.rows), pending[1] + sum(obs.busy_fraction) * obs.interval_s


def _measure(obs: Observation, state: PolicyState, cfg: Autoscale) -> tuple[PolicyState, float | None]:
    """The state with the true rate that sizes the group (this interval's; the last one when it
    measured none, its work kept pending; the last one measured under load when the group is
    lightly loaded and that is higher, :data:`LIGHT_LOAD`), and this interval's own measurement.
    Within the cooldown the interval is dropped (guard 2): it measures the rebalance."""
    if state.last_action_s is not None and obs.now_s - state.last_action_s < cfg.cooldown_s:
        return replace(state, pending=(0, 0.0)), None
    measured = true_rate(obs, state.pending)
    if measured is None:
        return replace(state, pending=_work(obs, state.pending)), None
    busy = _mean_busy(obs)
    if busy >= LIGHT_LOAD * cfg.target_utilization:
        return replace(
            state, rows_per_busy_s=measured, loaded_rate=(obs.now_s, measured), pending=(0, 0.0)
        ), measured
    rate, loaded = measured, state.loaded_rate
    if loaded is not None and obs.now_s - loaded[0] <= RATE_MEMORY_S:
        rate = max(rate, loaded[1])
    return replace(state, rows_per_busy_s=rate, pending=(0, 0.0)), measured


def _mean_busy(obs: Observation) -> float:
    return sum(obs.busy_fraction) / len(obs.busy_fraction) if obs.busy_fraction else 0.0


def backlog(obs: Observation) -> int:
    """The lag to catch up: beyond the rows a group that keeps up has in flight."""
    return max(0, int(sum(obs.lag_rows) - max(0.0, obs.input_rows_per_s) * obs.inflight_s))


def ceiling(obs: Observation, cfg: Autoscale) -> int:
    """The most consumers a scale-up may reach now: ``max_consumers``, the partitions, and what
    the cluster can schedule; never below ``min_consumers`` (what the cluster cannot schedule
    then waits in Ray's queue, as the first consumers would)."""
    top = min(cfg.max_consumers, obs.partitions)
    if obs.schedulable is not None:
        top = min(top, max(obs.schedulable, obs.consumers))
    return max(top, cfg.min_consumers)


def decide(obs: Observation, state: PolicyState, cfg: Autoscale) -> tuple[Decision, PolicyState]:
    """The rayflow policy: DS2's true rates, one step to the needed count, guarded (module doc)."""
    state, measured = _measure(obs, state, cfg)
    rate = state.rows_per_busy_s
    demand = max(0.0, obs.input_rows_per_s) + backlog(obs) / cfg.catch_up_s
    if rate is None:
        needed = None
        recommended = None
    else:
        needed = demand / (rate * cfg.target_utilization)
        recommended = _clamp(granular(needed, obs.partitions), cfg)
    state = _check_scale_up(obs, state, cfg, measured)
    blocked = state.blocked
    if blocked is not None and obs.now_s - blocked[0] >= INEFFECTIVE_BLOCK_S:
        # Expired, and not renewed by this interval (_check_scale_up): dropped.
        state, blocked = replace(state, blocked=None, blocked_by=None), None
    d, new = _guard(
        obs, state, cfg, recommended=recommended, needed=needed, demand=demand, rate=rate, measured=measured,
        blocked=None if blocked is None else blocked[1],
    )  # fmt: skip
    if d.action == UP and rate is not None:
        new = replace(
            new, scale_up_check=(d.current, d.target, rate * d.current), scale_up_rows_per_s=_throughput(obs)
        )
    elif d.action == DOWN:
        new = replace(new, scale_up_check=None, blocked=None, blocked_by=None)
    return d, new


def _check_scale_up(
    obs: Observation, state: PolicyState, cfg: Autoscale, measured: float | None
) -> PolicyState:
    """The last scale-up's effect, at the first interval after its cooldown that measures a
    rate: ineffective (:data:`INEFFECTIVE_GAIN`) blocks further scale-ups. A lightly loaded
    group with a backlog is starved (the sources, or one hot partition, hold it back): that
    blocks too, where a spiral of scale-ups on the growing lag would follow. A lightly loaded
    group without one, or one resized meanwhile, tells nothing: the check is dropped.

    One interval is one measure: a pause in it (a slow restore, a long commit) reads as lost
    capacity. So while the block lasts, each later interval at the same count judges the
    scale-up again: one that finds it effective lifts the block, and one at the block's end
    that still finds it ineffective renews it (a starved group stays at its count instead of
    trying the next step every :data:`INEFFECTIVE_BLOCK_S`)."""
    if measured is None:
        return state
    if state.scale_up_check is not None:
        check = (*state.scale_up_check, state.scale_up_rows_per_s)
        state = replace(state, scale_up_check=None)
        verdict, why = _judge(obs, cfg, measured, check)
        if verdict is False:
            return replace(state, blocked=(obs.now_s, why), blocked_by=check)
        return state
    if state.blocked is not None and state.blocked_by is not None:
        verdict, _ = _judge(obs, cfg, measured, state.blocked_by)
        if verdict is True:
            return replace(state, blocked=None, blocked_by=None)
        since, why = state.blocked
        if verdict is False and obs.now_s - since >= INEFFECTIVE_BLOCK_S:
            return replace(state, blocked=(obs.now_s, why))
    return state


def _throughput(obs: Observation) -> float:
    return sum(obs.rows) / obs.interval_s if obs.interval_s > 0 else 0.0


def _judge(
    obs: Observation, cfg: Autoscale, measured: float, check: tuple[int, int, float, float]
) -> tuple[bool | None, str]:
    """A scale-up's effect on this interval: ``True`` effective, ``False`` ineffective (with
    why), ``None`` nothing to tell (module doc, guard 5)."""
    before_n, after_n, before, rows_before = check
    # A scale-up from no consumers (the bounds guard) has no capacity of before to compare with.
    if before_n < 1 or obs.consumers != after_n:
        return None, ""
    if _mean_busy(obs) < LIGHT_LOAD * cfg.target_utilization:
        # Lightly loaded with rows still waiting: either starved (the sources read slower than
        # the input arrives, one hot partition), and then the group processes no more than
        # before the scale-up; or bound by something each consumer does outside its busy time
        # (fetching), and then it processes more. Without a backlog a light group tells nothing.
        if backlog(obs) <= 0:
            return None, ""
        rows = _throughput(obs)
        if rows - rows_before >= INEFFECTIVE_GAIN * rows_before / before_n * (after_n - before_n):
            return True, ""
        return False, (
            f"capped: the last scale-up ({before_n} -> {after_n}) left the consumers "
            f"{_mean_busy(obs):.0%} busy processing {rows:,.0f} rows/s (before: {rows_before:,.0f}) with "
            f"{backlog(obs):,} rows of backlog; the bottleneck is elsewhere (the sources, or a hot "
            f"partition), so scale-ups wait {INEFFECTIVE_BLOCK_S:g} s"
        )
    expected = before / before_n * (after_n - before_n)
    gained = measured * after_n - before
    if gained >= INEFFECTIVE_GAIN * expected:
        return True, ""
    return False, (
        f"capped: the last scale-up ({before_n} -> {after_n}) added {max(0.0, gained):,.0f} rows/s of "
        f"capacity, expected {expected:,.0f}; the bottleneck is elsewhere (sources, a hot "
        f"partition, or fewer cores than processes), so scale-ups wait {INEFFECTIVE_BLOCK_S:g} s"
    )


def granular(needed: float, partitions: int) -> int:
    """The fewest consumers whose busiest member stays within ``needed``'s utilization, when the
    partitions (of even load) are dealt whole: a consumer may hold ``floor(N / needed)``
    partitions of ``N``, so ``ceil(N / that)`` consumers are needed, never fewer than
    ``ceil(needed)`` (pure).

    With 8 partitions and 5.7 consumers' worth of work, 6 consumers leave two of them with 2
    partitions, each 2 / 8 of the work: 1.43 consumers' worth, over the target, and the same
    holds for 7; only 8 (one partition each) keep every consumer within it. A partition that
    alone needs more than a consumer gets one of its own (``partitions``; split it instead).
    """
    if needed <= 0:
        return 0
    # A hair of tolerance: 3.0000001 consumers' worth of float error is 3, not 4.
    n = math.ceil(needed - 1e-9)
    per_consumer = math.floor(partitions / needed + 1e-9)  # partitions one consumer can take
    if per_consumer < 1:
        return partitions
    return max(n, math.ceil(partitions / per_consumer))


def keda_recommendation(lag_rows: int, *, lag_threshold_rows: float, cfg: Autoscale) -> int:
    """KEDA's Kafka scaler: ``ceil(total lag / lagThreshold)``, clamped to the bounds."""
    return _clamp(math.ceil(max(0, lag_rows) / lag_threshold_rows), cfg)


def decide_keda(
    obs: Observation, state: PolicyState, cfg: Autoscale, *, lag_threshold_rows: float
) -> tuple[Decision, PolicyState]:
    """The lag-threshold policy of KEDA's Kafka scaler, behind the same guards (for the
    benchmark's comparison only: the same cooldown and scale-down stabilization that
    Kubernetes' HPA applies after KEDA, so that only the signal differs)."""
    lag = obs.uncommitted_rows if obs.uncommitted_rows is not None else sum(obs.lag_rows)
    rec = keda_recommendation(lag, lag_threshold_rows=lag_threshold_rows, cfg=cfg)
    state, measured = _measure(obs, state, cfg)
    return _guard(
        obs, state, cfg, recommended=rec, needed=lag / lag_threshold_rows, demand=obs.input_rows_per_s,
        rate=state.rows_per_busy_s, measured=measured, basis=f"lag / {lag_threshold_rows:g} rows",
    )  # fmt: skip


def _clamp(n: int, cfg: Autoscale) -> int:
    return max(cfg.min_consumers, min(cfg.max_consumers, n))


def _guard(
    obs: Observation,
    state: PolicyState,
    cfg: Autoscale,
    *,
    recommended: int | None,
    needed: float | None,
    demand: float,
    rate: float | None,
    measured: float | None = None,
    basis: str | None = None,
    blocked: str | None = None,
) -> tuple[Decision, PolicyState]:
    """Apply the guards (module doc, 1-4) to a recommendation."""
    now, cur = obs.now_s, obs.consumers
    top = ceiling(obs, cfg)
    busy = _mean_busy(obs)

    def out(action: str, target: int, reason: str, new_state: PolicyState) -> tuple[Decision, PolicyState]:
        if action != HOLD:
            # A new configuration: what was observed before it says nothing about it.
            new_state = replace(new_state, last_action_s=now, observing_since_s=None, window=())
        d = Decision(
            action=action, reason=reason, current=cur, target=target, recommended=recommended,
            needed=needed, input_rows_per_s=obs.input_rows_per_s, lag_rows=sum(obs.lag_rows),
            backlog_rows=backlog(obs), demand_rows_per_s=demand, rows_per_busy_s=rate,
            measured_rows_per_busy_s=measured, busy_fraction=busy, ceiling=top,
        )  # fmt: skip
        return d, new_state

    # 1. Bounds, whatever else holds.
    if cur < cfg.min_consumers:
        return out(UP, cfg.min_consumers, f"below min_consumers ({cfg.min_consumers})", state)
    if cur > cfg.max_consumers:
        return out(DOWN, cfg.max_consumers, f"above max_consumers ({cfg.max_consumers})", state)
    # 2. Cooldown.
    since = math.inf if state.last_action_s is None else now - state.last_action_s
    if since < cfg.cooldown_s:
        return out(HOLD, cur, f"cooldown ({since:.1f} of {cfg.cooldown_s:g} s since the last action)", state)
    if recommended is None:
        return out(HOLD, cur, "no processing measured yet", state)
    observing = state.observing_since_s if state.observing_since_s is not None else now
    window = tuple((t, r) for t, r in state.window if t > now - cfg.stabilization_s) + ((now, recommended),)
    state = replace(state, observing_since_s=observing, window=window)
    # 3. Up, at once, as far as the ceiling allows (beyond a tolerance).
    if recommended > cur and needed is not None and needed <= cur * (1 + UP_TOLERANCE):
        return out(HOLD, cur, f"within tolerance ({needed:.2f} needed)", state)
    if recommended > cur:
        if blocked is not None:
            return out(HOLD, cur, blocked, state)
        if top <= cur:
            return out(HOLD, cur, _capped(obs, cfg, recommended), state)
        target = min(recommended, top)
        wanted = math.ceil(needed - 1e-9) if needed is not None else recommended
        why = f"needs {needed:.2f} consumers ({basis or f'at {cfg.target_utilization:g} utilization'})"
        if target < wanted:
            why += "; " + _capped(obs, cfg, wanted)
        return out(UP, target, why, state)
    if recommended == cur:
        if needed is not None and math.ceil(needed - 1e-9) > cur:
            return out(HOLD, cur, _capped(obs, cfg, math.ceil(needed - 1e-9)), state)
        return out(HOLD, cur, "at target", state)
    # 4. Down, guarded.
    if now - observing < cfg.stabilization_s:
        return out(
            HOLD, cur, f"stabilizing ({now - observing:.1f} of {cfg.stabilization_s:g} s observed)", state
        )
    if since < cfg.scale_down_delay_s:
        return out(
            HOLD, cur, f"scale-down delay ({since:.1f} of {cfg.scale_down_delay_s:g} s since the last action)", state
        )  # fmt: skip
    stable = max(r for _, r in window)
    if stable >= cur:
        return out(HOLD, cur, f"needed {stable} within the last {cfg.stabilization_s:g} s", state)
    return out(DOWN, stable, f"at most {stable} needed over the last {cfg.stabilization_s:g} s", state)


def _capped(obs: Observation, cfg: Autoscale, wanted: int) -> str:
    """Why a scale-up to ``wanted`` stops short (the tightest bound first)."""
    if obs.partitions <= cfg.max_consumers and wanted > obs.partitions:
        return f"capped at the {obs.partitions} partitions"
    if obs.schedulable is not None and obs.schedulable < min(cfg.max_consumers, obs.partitions):
        return f"capped: the cluster can schedule {obs.schedulable} consumers"
    return f"capped at max_consumers ({cfg.max_consumers})"
