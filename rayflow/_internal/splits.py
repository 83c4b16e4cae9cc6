"""Hot-range splits at runtime: the policy, the split point and the new map (pure).

A partition whose input rate stays above ``factor`` times the mean partition's
for ``window_s`` is split in two at the median hash of its traffic; the new
map (``split_map``) has one more range and version + 1. The run carries the
split out (``Run.split``, ``docs/partitioning.md`` "Splits at runtime").

- :func:`decide` is the policy: a pure function of the per-partition
  ``rate_ratio`` (``_internal/skew.py``), smoothed, and of its own small state
  (:class:`PolicyState`): ``(state, rates, now) -> (state, decision)``.
- :class:`HashReservoir` (one per source actor) keeps a bounded sample of the
  hashes routed to each partition (a strided sample of every batch, the newest
  kept): the split point is their median (:func:`split_point`), so each child
  gets about half of the partition's *traffic*, not half of its keys or of its
  range.
- :func:`split_map` cuts one range of a map at a hash.

Caveat: a range is split between hashes. One hot key is one hash: a partition
whose traffic is one key cannot be split so that both halves carry load (the
median is that hash; the child above it gets the key, the other little).
``Aggregate(combine_at_source=True)`` is the remedy there (``docs/skew.md``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from rayflow.partitioning import PartitionMap

#: Hashes kept per partition by a source's reservoir (the median of 512 samples is within a few
#: percent of the traffic's median: ample for halving a load).
RESERVOIR_HASHES = 512
#: Hashes sampled from one batch (a strided sample): the reservoir follows recent traffic.
SAMPLE_PER_BATCH = 64


@dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    """When to split (the knobs of ``rf.Splits``, see ``rayflow/config.py``)."""

    factor: float
    window_s: float
    cooldown_s: float
    max_partitions: int
    #: Weight of a new sample in the smoothed ratio (an exponential moving average).
    smoothing: float = 0.5


@dataclass(frozen=True)
class PolicyState:
    """What :func:`decide` remembers between calls."""

    #: partition -> smoothed rate ratio.
    smoothed: Mapping[int, float] = field(default_factory=dict)
    #: partition -> since when its smoothed ratio has been above the factor.
    hot_since: Mapping[int, float] = field(default_factory=dict)
    #: When the last split was decided (None: never).
    last_split: float | None = None


@dataclass(frozen=True)
class Decision:
    """A split of ``partition`` (None: none now), and why, with the numbers that made it."""

    partition: int | None
    reason: str
    ratio: float | None = None


def decide(
    state: PolicyState,
    rates: Mapping[int, float | None],
    now: float,
    config: PolicyConfig,
) -> tuple[PolicyState, Decision]:
    """The policy. ``rates``: each partition's ``rate_ratio`` now (None: no figure yet).

    A partition is *hot* while its smoothed ratio exceeds ``config.factor``; it is
    split once it has been hot for ``config.window_s`` (the hottest such one, one
    split per call), unless the map has ``config.max_partitions`` already or the
    last split was less than ``config.cooldown_s`` ago (the rates measured right
    after a split still mix the old map's). A partition number not in ``rates``
    is forgotten (after a split every number from the split one up means
    another range: the caller starts afresh with a new state).
    """
    a = config.smoothing
    smoothed: dict[int, float] = {}
    for p, r in rates.items():
        if r is None:
            continue
        old = state.smoothed.get(p)
        smoothed[p] = float(r) if old is None else a * float(r) + (1 - a) * old
    hot_since = {p: state.hot_since.get(p, now) for p, r in sorted(smoothed.items()) if r > config.factor}
    state = replace(state, smoothed=smoothed, hot_since=hot_since)
    if not hot_since:
        return state, Decision(None, "no partition above the factor")
    ripe = [p for p, t in hot_since.items() if now - t >= config.window_s]
    if not ripe:
        return state, Decision(None, f"hot for less than {config.window_s} s")
    p = max(ripe, key=lambda q: (smoothed[q], -q))
    if len(rates) >= config.max_partitions:
        return state, Decision(None, f"at max_partitions ({config.max_partitions})", smoothed[p])
    if state.last_split is not None and now - state.last_split < config.cooldown_s:
        return state, Decision(None, f"cooling down ({config.cooldown_s} s)", smoothed[p])
    return replace(state, last_split=now, hot_since={}), Decision(
        p, f"ratio {smoothed[p]:.2f} > {config.factor} for {now - hot_since[p]:.1f} s", smoothed[p]
    )


def split_point(hashes: Sequence[np.ndarray], lo: int, hi: int) -> int:
    """Where to cut range ``[lo, hi)``: the median of the sampled ``hashes`` that lie in it
    (the arrays of several sources together), moved strictly inside the range; the middle
    of the range when there is no sample in it. The lower child is ``[lo, point)``."""
    h = np.concatenate([np.asarray(x, dtype=np.uint64) for x in hashes]) if hashes else np.zeros(0, np.uint64)
    if hi < 1 << 64:
        h = h[(h >= np.uint64(lo)) & (h < np.uint64(hi))]
    else:
        h = h[h >= np.uint64(lo)]
    if h.size == 0:
        point = lo + (hi - lo) // 2
    else:
        h.sort()
        # The upper median: a key whose hash it is goes to the upper child (half or more of the
        # samples lie below it, so the lower child is never left empty of traffic by the cut).
        point = int(h[h.size // 2])
    return min(max(point, lo + 1), hi - 1)


def split_map(pmap: PartitionMap, partition: int, at: int) -> PartitionMap:
    """``pmap`` with ``partition`` cut in two at hash ``at`` (strictly inside its range):
    partitions above it are numbered one higher; version + 1. ``requested`` (the count the
    user asked for) is kept, so a resume that asks for it again keeps this map."""
    lo, hi = pmap.range_of(partition)
    if not lo < at < hi:
        raise ValueError(f"split point {at} is not inside partition {partition}'s range [{lo}, {hi})")
    bounds = pmap.bounds[: partition + 1] + (at,) + pmap.bounds[partition + 1 :]
    requested = pmap.requested if pmap.requested is not None else pmap.num_partitions
    return PartitionMap(version=pmap.version + 1, bounds=bounds, requested=requested)


class HashReservoir:
    """The newest sampled hashes routed to each partition (at most ``capacity`` each).

    ``observe`` takes a strided sample of a batch (``SAMPLE_PER_BATCH`` rows) and appends
    it per partition: one argsort of the sample, a loop over the partitions present in it,
    never over rows."""

    def __init__(self, capacity: int = RESERVOIR_HASHES, per_batch: int = SAMPLE_PER_BATCH):
        self.capacity = capacity
        self.per_batch = per_batch
        self._held: dict[int, np.ndarray] = {}

    def observe(self, hashes: np.ndarray, routed: np.ndarray) -> None:
        n = len(hashes)
        if n == 0:
            return
        stride = max(1, n // self.per_batch)
        h = np.asarray(hashes, dtype=np.uint64)[::stride]
        r = np.asarray(routed)[::stride]
        order = np.argsort(r, kind="stable")
        r, h = r[order], h[order]
        parts, starts = np.unique(r, return_index=True)
        ends = list(starts[1:]) + [len(r)]
        for p, s, e in zip(parts.tolist(), starts.tolist(), ends):
            old = self._held.get(p)
            new = h[s:e] if old is None else np.concatenate([old, h[s:e]])
            self._held[p] = new[-self.capacity :]

    def of(self, partition: int) -> np.ndarray:
        return self._held.get(partition, np.zeros(0, np.uint64)).copy()

    def clear(self) -> None:
        self._held.clear()


def renumber(values: Mapping[int, object], partition: int) -> dict[int, object]:
    """Per-partition ``values`` under the map after ``partition`` was split: the split one's
    entry is dropped (its two children start afresh), those above move up by one."""
    return {(q if q < partition else q + 1): v for q, v in values.items() if q != partition}
