"""Hot-range splits (and cold merges) at runtime: the policy, the split point, the new map (pure).

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
- :func:`split_map` cuts one range of a map at a hash; :func:`merge_map` joins two
  adjacent ranges (``Run.merge``: exact only at a consistent cut, which it drains to).

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
    """When to split and merge (the knobs of ``rf.Splits``, see ``rayflow/config.py``)."""

    factor: float
    window_s: float
    cooldown_s: float
    max_partitions: int
    #: Merge two adjacent partitions whose smoothed ratios add up to less than this (None: never).
    merge_below: float | None = None
    #: Never merge below this many partitions.
    min_partitions: int = 1
    #: Do not split a partition whose hottest key carries at least this share of its rows: the
    #: key stays whole in one child, so the split would pause the job and halve nothing.
    max_key_share: float = 0.5
    #: Weight of a new sample in the smoothed ratio (an exponential moving average).
    smoothing: float = 0.5


@dataclass(frozen=True)
class PolicyState:
    """What :func:`decide` remembers between calls."""

    #: partition -> smoothed rate ratio.
    smoothed: Mapping[int, float] = field(default_factory=dict)
    #: partition -> since when its smoothed ratio has been above the factor.
    hot_since: Mapping[int, float] = field(default_factory=dict)
    #: partition -> since when it and the next one together have been below ``merge_below``.
    cold_since: Mapping[int, float] = field(default_factory=dict)
    #: When the last split or merge was decided (None: never).
    last_change: float | None = None


@dataclass(frozen=True)
class Decision:
    """A ``kind`` ("split", or "merge" of ``partition`` with the next one) of ``partition``
    (None: no change now), and why, with the smoothed ratio that made it."""

    partition: int | None
    reason: str
    ratio: float | None = None
    kind: str = "split"


def decide(
    state: PolicyState,
    rates: Mapping[int, float | None],
    now: float,
    config: PolicyConfig,
    key_shares: Mapping[int, float] | None = None,
) -> tuple[PolicyState, Decision]:
    """The policy. ``rates``: each partition's ``rate_ratio`` now (None: no figure yet, or a
    finished partition: it is counted in the map's size, never split nor merged).

    A partition is *hot* while its smoothed ratio exceeds ``config.factor``; it is
    split once it has been hot for ``config.window_s`` (the hottest such one), unless
    the map has ``config.max_partitions`` already, and not one whose hottest key
    carries ``config.max_key_share`` or more of its rows (``key_shares``: partition ->
    that share, from the skew sketch; a range is cut between hashes, so that key would
    stay whole in one child: ``combine_at_source`` is the remedy). Failing a split, two adjacent
    partitions whose smoothed ratios add up to less than ``config.merge_below`` for
    ``window_s`` are merged (the coldest such pair), unless the map has
    ``config.min_partitions`` or fewer. One change per call, none within
    ``config.cooldown_s`` of the last (the rates measured right after a change still
    mix the old map's). After a change the caller starts afresh with a new state
    (partition numbers mean other ranges), keeping ``last_change``.
    """
    a = config.smoothing
    smoothed: dict[int, float] = {}
    for p, r in rates.items():
        if r is None:
            continue
        old = state.smoothed.get(p)
        smoothed[p] = float(r) if old is None else a * float(r) + (1 - a) * old
    hot_since = {p: state.hot_since.get(p, now) for p, r in sorted(smoothed.items()) if r > config.factor}
    pairs = {p: r + smoothed[p + 1] for p, r in sorted(smoothed.items()) if p + 1 in smoothed}
    cold_since = {}
    if config.merge_below is not None:
        cold_since = {p: state.cold_since.get(p, now) for p, r in pairs.items() if r < config.merge_below}
    state = replace(state, smoothed=smoothed, hot_since=hot_since, cold_since=cold_since)
    cooling = state.last_change is not None and now - state.last_change < config.cooldown_s
    shares = key_shares or {}
    ripe = [p for p, t in hot_since.items() if now - t >= config.window_s]
    whole = [p for p in ripe if shares.get(p, 0.0) >= config.max_key_share]
    ripe = [p for p in ripe if p not in whole]
    # A split that cannot happen (one key, or no room) leaves the way open for a merge.
    held = None
    if whole and not ripe:
        p = whole[0]
        held = Decision(
            None,
            f"partition {p}'s hottest key carries {shares[p]:.0%} of its rows: a split cannot halve "
            "one key (Aggregate(combine_at_source=True) can)",
            smoothed[p],
        )
    elif ripe:
        p = max(ripe, key=lambda q: (smoothed[q], -q))
        if cooling:
            return state, Decision(None, f"cooling down ({config.cooldown_s} s)", smoothed[p])
        if len(rates) >= config.max_partitions:
            held = Decision(None, f"at max_partitions ({config.max_partitions})", smoothed[p])
        else:
            return replace(state, last_change=now, hot_since={}, cold_since={}), Decision(
                p, f"ratio {smoothed[p]:.2f} > {config.factor} for {now - hot_since[p]:.1f} s", smoothed[p]
            )
    cold = [p for p, t in cold_since.items() if now - t >= config.window_s]
    if cold and len(rates) > config.min_partitions and not cooling:
        p = min(cold, key=lambda q: (pairs[q], q))
        return replace(state, last_change=now, hot_since={}, cold_since={}), Decision(
            p,
            f"ratios of {p} and {p + 1} add up to {pairs[p]:.2f} < {config.merge_below} "
            f"for {now - cold_since[p]:.1f} s",
            pairs[p],
            kind="merge",
        )
    if held is not None:
        return state, held
    if hot_since:
        return state, Decision(None, f"hot for less than {config.window_s} s")
    return state, Decision(None, "no partition above the factor")


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


def merge_map(pmap: PartitionMap, partition: int) -> PartitionMap:
    """``pmap`` with ``partition`` and ``partition + 1`` made one range: partitions above are
    numbered one lower; version + 1; ``requested`` kept (see :func:`split_map`)."""
    if not 0 <= partition < pmap.num_partitions - 1:
        raise ValueError(f"partition {partition} has no next partition to merge with")
    bounds = pmap.bounds[: partition + 1] + pmap.bounds[partition + 2 :]
    requested = pmap.requested if pmap.requested is not None else pmap.num_partitions
    return PartitionMap(version=pmap.version + 1, bounds=bounds, requested=requested)
