"""The autoscale loop: a thin shell in the driver over the pure policy (``group/autoscale.py``).

Every ``Autoscale.interval_s`` a daemon thread of the driver measures the job
(:meth:`Run.status`: the manager's partitions, the sources' reads, the
consumers' busy time), turns two consecutive samples into an
:class:`~rayflow._internal.group.autoscale.Observation`, asks the policy, and
applies a scaling decision with :meth:`Run.scale` (graceful on the way down: each
leaving consumer's partitions are revoked, committed, then released).

What it leaves behind:

- **Events.** Every scaling action is recorded in the catalog's ``events`` table as
  kind ``autoscale`` with the decision's numbers (:meth:`Decision.to_dict`). Holds
  are recorded only when the group is *capped* (it needs more consumers than
  ``max_consumers``, the partitions or the cluster allow: something an operator can
  act on), and then once per reason and at most every :data:`HOLD_EVENT_EVERY_S`.
- **Status.** ``run.status()["autoscale"]``: the config, the target, the last
  :data:`DECISIONS_KEPT` decisions (holds included), and errors.
- **Metrics.** ``rayflow_autoscale_target_consumers``,
  ``rayflow_autoscale_needed_consumers`` and ``rayflow_autoscale_actions``
  (``metrics.AutoscaleMetrics``).

Robustness: a failing interval (an actor slow to answer, a failed scale) is logged
and counted, never raised: the job goes on at its current size, and the next
interval measures afresh.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Collection

import ray

from rayflow._internal.driver_loop import DriverLoop
from rayflow._internal.group import autoscale as policy
from rayflow._internal.metrics import AutoscaleMetrics
from rayflow.config import Autoscale

logger = logging.getLogger(__name__)

#: Decisions kept for ``run.status()["autoscale"]["decisions"]``.
DECISIONS_KEPT = 20
#: Observations kept for benchmarks (``Autoscaler.samples``): an hour at a 1 s interval.
SAMPLES_KEPT = 3600
#: The input rate is measured over this many intervals: a paced or batched input arrives in
#: steps (a batch every 50-250 ms), so one short interval holds one batch more or less.
RATE_INTERVALS = 2
#: A capped hold is recorded as an event at most this often (per reason, once when it changes).
HOLD_EVENT_EVERY_S = 60.0

Policy = Callable[
    [policy.Observation, policy.PolicyState, Autoscale], tuple[policy.Decision, policy.PolicyState]
]


class Autoscaler(DriverLoop):
    """Sizes a :class:`Run`'s consumer group on a daemon thread (module doc).

    ``decide``: the policy (default :func:`policy.decide`; benchmarks pass the
    lag-threshold one). :meth:`start` begins; :meth:`stop` ends it and waits for an
    action in progress (``Run.stop`` and the end of the run call it).
    """

    doing = "autoscaling"

    def __init__(self, run, config: Autoscale, *, decide: Policy | None = None):
        super().__init__(run, config.interval_s, "autoscale")
        self.config = config
        self.decide = decide or policy.decide
        self.state = policy.PolicyState()
        self.decisions: deque[dict] = deque(maxlen=DECISIONS_KEPT)
        #: One dict per interval: time, consumers, lag, rates, busy fraction, the decision.
        self.samples: deque[dict] = deque(maxlen=SAMPLES_KEPT)
        self.target = len(run.consumers)
        self.actions = 0
        self.t0 = time.monotonic()
        self._prev: dict | None = None
        #: Consumers that answered a status poll before (``observation``'s ``seen``).
        self._seen: set[str] = set()
        self._arrivals: deque[tuple[float, int]] = deque(maxlen=RATE_INTERVALS + 1)
        self._hold_event: tuple[str | None, float] = (None, -math.inf)
        self._metrics = AutoscaleMetrics(run.spec.name)

    def status(self) -> dict:
        """For ``run.status()["autoscale"]``."""
        return {
            "config": {k: getattr(self.config, k) for k in self.config.__dataclass_fields__},
            "target": self.target,
            "consumers": len(self.run.consumers),
            "actions": self.actions,
            "decisions": list(self.decisions),
            "errors": self.errors,
            "last_error": self.last_error,
        }

    # ------------------------------------------------------------------ the loop
    def step(self) -> policy.Decision | None:
        """One interval: measure, decide, act, record. ``None`` for the first sample (no interval)."""
        cur = self._sample()
        prev, self._prev = self._prev, cur
        seen, self._seen = self._seen, self._seen | set(cur["consumers"])
        if prev is not None and prev["map_version"] != cur["map_version"]:
            # A split or merge restarted the actors: their counters began again from zero.
            prev = None
            self._arrivals.clear()
            self._seen = set(cur["consumers"])
        self._arrivals.append((cur["t"], cur["arrived"]))
        if prev is None or cur["t"] <= prev["t"]:
            return None
        obs = observation(
            prev, cur, consumers=len(self.run.consumers), partitions=self.run.map.num_partitions,
            schedulable=self._schedulable(), inflight_s=self.run.spec.config.checkpoint_interval_s,
            seen=seen,
        )  # fmt: skip
        (t0, a0), (t1, a1) = self._arrivals[0], self._arrivals[-1]
        if t1 > t0:  # the input rate over the last RATE_INTERVALS intervals (not reset by actions)
            obs = dataclasses.replace(obs, input_rows_per_s=max(0.0, (a1 - a0) / (t1 - t0)))
        decision, self.state = self.decide(obs, self.state, self.config)
        if decision.action != policy.HOLD and not self.halted:
            self.run.scale(consumers=decision.target)
            self.actions += 1
            self._prev = None  # the consumers changed: the next interval starts afresh
        self.target = decision.target
        self._record(obs, decision)
        return decision

    def _sample(self) -> dict:
        st = self.run.status()
        return {**sample_of(st, t=time.monotonic()), "map_version": st.get("map_version")}

    def _schedulable(self) -> int | None:
        """The consumers the cluster can run now: the current ones plus those its free
        resources hold (``consumer_num_cpus`` and ``consumer_resources``); ``None`` when a
        consumer reserves nothing."""
        cfg = self.run.spec.config
        need = {"CPU": cfg.consumer_num_cpus, **cfg.consumer_resources}
        need = {k: v for k, v in need.items() if v > 0}
        if not need:
            return None
        free = ray.available_resources()
        more = min(int(free.get(k, 0.0) // v) for k, v in need.items())
        return len(self.run.consumers) + more

    def _record(self, obs: policy.Observation, d: policy.Decision) -> None:
        detail = {"t_s": round(obs.now_s - self.t0, 3), **d.to_dict()}
        self.decisions.append(detail)
        self.samples.append(
            {**detail, "consumers": len(self.run.consumers), "uncommitted_rows": obs.uncommitted_rows}
        )
        self._metrics.publish(d, consumers=len(self.run.consumers))
        if d.action == policy.HOLD:
            if not d.reason.startswith("capped"):
                return
            last_reason, last_t = self._hold_event
            if d.reason == last_reason and obs.now_s - last_t < HOLD_EVENT_EVERY_S:
                return
            self._hold_event = (d.reason, obs.now_s)
        try:  # fire and forget: the manager queues it on its I/O thread (order kept)
            self.run.manager.record_event.remote("autoscale", detail)
        except Exception as e:
            logger.warning("rayflow: recording an autoscale event of %r failed: %s", self.run.spec.name, e)


def sample_of(st: dict, *, t: float) -> dict:
    """The figures of one ``Run.status()`` the policy needs (pure)."""
    parts = st["partitions"]
    return {
        "t": t,
        # Rows that reached the input so far: read by the sources, or available to read.
        "arrived": st.get("rows_read", 0) + (st.get("unread_rows") or 0),
        "consumers": {n: (c["busy_s"], c["rows_processed"]) for n, c in st.get("consumers", {}).items()},
        # Backlog: not processed yet (lag counts rows processed and awaiting their commit too).
        "lag": tuple(
            max(0, p.get("lag_rows", 0) - max(0, p["processed_rows"] - p["committed_rows"])) for p in parts
        ),
        "uncommitted": int(st.get("lag_rows", 0)),
    }


def observation(
    prev: dict,
    cur: dict,
    *,
    consumers: int,
    partitions: int,
    schedulable: int | None,
    inflight_s: float = 0.0,
    seen: Collection[str] = (),
) -> policy.Observation:
    """The interval between two samples as the policy's input (pure). A consumer new since
    ``prev`` counts from zero; one gone since is left out, and so is one missing from ``prev``
    that was ``seen`` before (it did not answer that status poll in time: its work over this
    interval is unknown, and counted from zero it would bring everything it ever did)."""
    dt = cur["t"] - prev["t"]
    busy, rows = [], []
    for name, (b, r) in cur["consumers"].items():
        if name not in prev["consumers"] and name in seen:
            continue
        b0, r0 = prev["consumers"].get(name, (0.0, 0))
        busy.append(min(1.0, max(0.0, (b - b0) / dt)))
        rows.append(max(0, r - r0))
    return policy.Observation(
        now_s=cur["t"],
        interval_s=dt,
        input_rows_per_s=max(0.0, (cur["arrived"] - prev["arrived"]) / dt),
        busy_fraction=tuple(busy),
        rows=tuple(rows),
        lag_rows=cur["lag"],
        consumers=consumers,
        partitions=partitions,
        schedulable=schedulable,
        uncommitted_rows=cur["uncommitted"],
        # Read rows wait up to a checkpoint interval for their commit, then for the source's trim.
        inflight_s=inflight_s,
    )
