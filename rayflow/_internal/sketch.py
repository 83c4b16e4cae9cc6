"""A mergeable heavy-hitters summary of key hashes (pure, numpy): the hottest keys (DESIGN §7).

:class:`HeavyHitters` is the Misra-Gries summary in its mergeable form (Agarwal,
Cormode, Huang, Phillips, Wei, Yi: *Mergeable Summaries*, PODS 2012; Misra-Gries
and Space-Saving are the same summary, counted from the other side). It holds at
most ``capacity`` (``k``) counters, each a key hash with an estimated count, and
``total``: the weight ``N`` of everything it summarizes.

**Guarantee.** For every key ``x`` with true count ``f(x)`` in the summarized
stream, whatever the order of updates and merges (any batches, any merge tree):

    f(x) - error_rows  <=  count(x)  <=  f(x),      error_rows = (N - sum of counters) / (k + 1)

(``count(x)`` is 0 for a key without a counter), so ``error_rows <= N / (k + 1)``:
every key with more than ``N / (k + 1)`` rows has a counter, and a key's share is
known to within ``1 / (k + 1)``. Tests hold this against exact counts
(``tests/unit/test_sketch.py``, Hypothesis).

**Updates are vectorized.** A batch is summarized exactly first (``np.unique`` of
its hashes with counts: a summary with no error), then merged: the counters of
both are added, and when more than ``k`` remain, the ``(k+1)``-th largest count is
subtracted from all of them and those left at or below zero are dropped (each
subtraction takes at least ``k + 1`` times its amount out of the counters, which
is where the bound comes from). No Python runs per row; per batch, Python runs
per new counter only (at most ``k``), to fetch its key's value.

**Keys, not only hashes.** Each counter keeps one representative key value (the
first row seen with that hash), so the hottest *keys* can be shown. Caveat: two
keys with the same 64-bit hash share a counter (one of the two names it); at 2**64
hash values this is negligible.

**Sampling.** :func:`sample_stride` bounds the work per batch: a batch of more than
``max_rows`` rows is summarized from every ``s``-th row, each counting ``s`` rows.
The bound above then holds for that weighted sample, not the stream: a key's count
gains a sampling error (a key with ``f`` rows in a batch is counted as a multiple
of ``s`` within about ``s * sqrt(f / s)`` of ``f`` for rows in random order; rows
placed periodically, every ``s``-th row one key, can fool it). Batches up to
``max_rows`` are summarized exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

#: Counters per summary: a key with more than 1/65 of the rows is always found, and shares are
#: within 1.5 percentage points; ~2 KB per summary.
DEFAULT_CAPACITY = 64
#: Rows of a batch summarized exactly; a bigger batch is sampled (see :func:`sample_stride`).
#: ~0.2-0.35 ms a batch at 8192 (bench/skew.py measures it); summarizing all of a 1M-row batch
#: would take ~30 ms, as long as hashing it.
DEFAULT_MAX_ROWS = 1 << 13


def sample_stride(num_rows: int, max_rows: int) -> int:
    """The stride ``s`` that summarizes at most ``max_rows`` of ``num_rows`` rows (1: all)."""
    if max_rows <= 0 or num_rows <= max_rows:
        return 1
    return -(-num_rows // max_rows)


def distinct_counts(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of ``hashes`` (sorted) and how often each occurs: one ``np.sort``
    (``np.unique`` asked for first indices or an inverse argsorts, several times slower)."""
    s = np.sort(hashes)
    if s.size == 0:
        return s, np.empty(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
    return s[starts], np.diff(np.append(starts, s.size)).astype(np.int64)


def _cut(hashes: np.ndarray, counts: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """The Misra-Gries step on distinct counters: subtract the ``(capacity+1)``-th largest count
    from all, drop those left at or below 0 (at most ``capacity`` remain; order kept)."""
    if counts.size <= capacity:
        return hashes, counts
    cut = np.partition(counts, counts.size - capacity - 1)[counts.size - capacity - 1]
    s = counts - cut
    keep = s > 0
    return hashes[keep], s[keep]


def _reduce(hashes: np.ndarray, counts: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum the counts of equal hashes, then keep at most ``capacity`` counters (the Misra-Gries
    step: subtract the ``(capacity+1)``-th largest count, drop what is left at or below 0).
    Returns the surviving hashes (sorted) and their counts."""
    if hashes.size == 0:
        return hashes, counts
    u, inv = np.unique(hashes, return_inverse=True)
    if u.size == hashes.size:
        order = np.argsort(hashes, kind="stable")
        s = counts[order]
    else:
        # int64 sums through float64: exact below 2**53 rows.
        s = np.bincount(inv.ravel(), weights=counts, minlength=u.size).astype(np.int64)
    return _cut(u, s, capacity)


@dataclass(eq=False)
class HeavyHitters:
    """A mergeable Misra-Gries summary of key hashes with one key value per counter.

    ``hashes`` (uint64, sorted), ``counts`` (int64, > 0) and ``keys`` (object array of key
    values) are aligned, at most ``capacity`` long; ``total`` is the weight of all the rows
    summarized. See the module doc for the guarantee.
    """

    capacity: int = DEFAULT_CAPACITY
    total: int = 0
    hashes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))
    counts: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    keys: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=object))

    def __post_init__(self) -> None:
        if not isinstance(self.capacity, int) or self.capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {self.capacity!r}")

    @property
    def error_rows(self) -> float:
        """The most any count may be below the true one: ``(total - sum(counts)) / (k + 1)``."""
        return max(0, self.total - int(self.counts.sum())) / (self.capacity + 1)

    def update(
        self,
        hashes: np.ndarray,
        keys_of: Callable[[np.ndarray], Sequence],
        *,
        weights: np.ndarray | None = None,
        weight: int = 1,
    ) -> None:
        """Add a batch: ``hashes`` of its rows (uint64), each counting ``weight`` rows (or
        ``weights[i]``). ``keys_of(rows)``: the key values of the given row indices (called
        once, with at most ``capacity`` rows: those that got a new counter)."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        if hashes.size == 0:
            return
        u, first, inv = np.unique(hashes, return_index=True, return_inverse=True)
        if weights is None:
            c = np.bincount(inv.ravel(), minlength=u.size).astype(np.int64) * weight
        else:
            c = np.bincount(inv.ravel(), weights=weights, minlength=u.size).astype(np.int64)
        self.update_unique(u, c, first, keys_of)

    def update_unique(
        self,
        hashes: np.ndarray,
        counts: np.ndarray,
        rows: np.ndarray,
        keys_of: Callable[[np.ndarray], Sequence],
    ) -> None:
        """Add an exact summary of a batch: distinct sorted ``hashes`` with their ``counts`` and
        ``rows`` (a row index of each, for ``keys_of``)."""
        self.update_counts(hashes, counts, _Lazy(hashes, rows, keys_of))

    def update_counts(self, hashes: np.ndarray, counts: np.ndarray, source) -> None:
        """Add distinct sorted ``hashes`` with their ``counts``; ``source.keys_for(hashes)``
        gives the key values of those that get a new counter. The batch's counters are cut to
        ``capacity`` first (a Misra-Gries summary of the batch: O(distinct), no sort), then
        merged: the bound holds as for any merge."""
        if hashes.size == 0:
            return
        counts = counts.astype(np.int64, copy=False)
        self.total += int(counts.sum())
        hashes, counts = _cut(hashes, counts, self.capacity)
        self._absorb(hashes, counts, source)

    def merge(self, other: HeavyHitters) -> HeavyHitters:
        """A new summary of both streams (the inputs are left as they were). Its capacity is
        the smaller of the two; the guarantee holds with that capacity and the summed totals."""
        out = HeavyHitters(
            capacity=min(self.capacity, other.capacity),
            total=self.total,
            hashes=self.hashes,
            counts=self.counts,
            keys=self.keys,
        )
        out.total += other.total
        out._absorb(other.hashes, other.counts, _Known(other.hashes, other.keys))
        return out

    def _absorb(self, hashes: np.ndarray, counts: np.ndarray, source) -> None:
        u, s = _reduce(
            np.concatenate([self.hashes, hashes]), np.concatenate([self.counts, counts]), self.capacity
        )
        keys = np.empty(u.size, dtype=object)
        if self.hashes.size:
            pos = np.minimum(np.searchsorted(self.hashes, u), self.hashes.size - 1)
            old = self.hashes[pos] == u
            keys[old] = self.keys[pos[old]]
        else:
            old = np.zeros(u.size, dtype=bool)
        if not old.all():
            keys[~old] = source.keys_for(u[~old])
        self.hashes, self.counts, self.keys = u, s, keys

    def top(self, n: int) -> list[dict]:
        """The ``n`` largest counters, largest first (ties by hash): ``key``, ``hash``,
        ``count`` (a lower bound of the true count), ``share`` (``count / total``) and
        ``error_rows`` (the true count is at most ``count + error_rows``)."""
        if self.counts.size == 0:
            return []
        order = np.lexsort((self.hashes, -self.counts))[:n]
        err = self.error_rows
        return [
            {
                "key": self.keys[i],
                "hash": int(self.hashes[i]),
                "count": int(self.counts[i]),
                "share": float(self.counts[i]) / self.total if self.total else 0.0,
                "error_rows": err,
            }
            for i in order
        ]

    def estimate(self, key_hash: int) -> int:
        """The count of one hash (0 without a counter)."""
        i = int(np.searchsorted(self.hashes, np.uint64(key_hash)))
        return int(self.counts[i]) if i < self.hashes.size and int(self.hashes[i]) == key_hash else 0

    def to_dict(self) -> dict:
        """As plain data (for actor stats): lists, key values as they are."""
        return {
            "capacity": self.capacity,
            "total": self.total,
            "hashes": self.hashes.tolist(),
            "counts": self.counts.tolist(),
            "keys": self.keys.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> HeavyHitters:
        return cls(
            capacity=int(d["capacity"]),
            total=int(d["total"]),
            hashes=np.asarray(d["hashes"], dtype=np.uint64),
            counts=np.asarray(d["counts"], dtype=np.int64),
            keys=_objects(d["keys"]),
        )


def _objects(values: Sequence) -> np.ndarray:
    """An object array of key values, at most a summary's capacity of them (filled one by one:
    numpy would make a 2-D array of tuples' parts)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


class _Known:
    """Key values of a summary being merged in: looked up by hash."""

    def __init__(self, hashes: np.ndarray, keys: np.ndarray):
        self.hashes, self.keys = hashes, keys

    def keys_for(self, wanted: np.ndarray) -> np.ndarray:
        return self.keys[np.searchsorted(self.hashes, wanted)]


class _Lazy:
    """Key values of a batch: fetched from its rows only for the hashes that got a counter."""

    def __init__(self, hashes: np.ndarray, rows: np.ndarray, keys_of: Callable[[np.ndarray], Sequence]):
        self.hashes, self.rows, self.keys_of = hashes, rows, keys_of

    def keys_for(self, wanted: np.ndarray) -> np.ndarray:
        return _objects(self.keys_of(self.rows[np.searchsorted(self.hashes, wanted)]))


def _cut_groups(
    groups: np.ndarray, hashes: np.ndarray, counts: np.ndarray, capacity: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_cut` within each group at once (vectorized): per group, subtract its
    ``(capacity+1)``-th largest count (0 if it has no more than ``capacity``), drop what is left
    at or below 0. Returns ``(groups, hashes, counts)`` of the survivors, in no useful order."""
    if counts.size == 0:
        return groups, hashes, counts
    top = int(counts.max()) + 1
    if (int(groups.max()) + 1) * top < 1 << 62:  # one argsort of a composite key: ~4x a lexsort
        order = np.argsort(groups * top + (top - 1 - counts))
    else:
        order = np.lexsort((-counts, groups))  # by group, then largest count first
    g, h, c = groups[order], hashes[order], counts[order]
    n = g.size
    starts = np.flatnonzero(np.concatenate(([True], g[1:] != g[:-1])))
    sizes = np.diff(np.append(starts, n))
    group_of = np.repeat(np.arange(starts.size), sizes)
    rank = np.arange(n) - starts[group_of]
    at = rank == capacity  # the (capacity+1)-th largest of its group
    cut = np.zeros(starts.size, dtype=np.int64)
    cut[group_of[at]] = c[at]
    c = c - cut[group_of]
    keep = c > 0
    return g[keep], h[keep], c[keep]


class PartitionedHeavyHitters:
    """One :class:`HeavyHitters` per partition, held in flat arrays so that a batch updates all
    of them with a fixed number of numpy calls (none per partition): the source actor's hot
    path. Each partition's counters obey the guarantee of the module doc with its own total
    (the same Misra-Gries steps, done per group at once: :func:`_cut_groups`).
    """

    def __init__(self, partitions: int, capacity: int = DEFAULT_CAPACITY):
        self.partitions, self.capacity = partitions, capacity
        self.totals = np.zeros(partitions, dtype=np.int64)
        self.hashes = np.empty(0, dtype=np.uint64)  # sorted
        self.counts = np.empty(0, dtype=np.int64)
        self.groups = np.empty(0, dtype=np.int64)
        self.keys = np.empty(0, dtype=object)

    def update(self, hashes: np.ndarray, counts: np.ndarray, groups: np.ndarray, source) -> None:
        """Add distinct sorted ``hashes`` with their ``counts`` and partitions (``groups``);
        ``source.keys_for(hashes)`` gives the key values of those that get a new counter."""
        if hashes.size == 0:
            return
        groups = groups.astype(np.int64, copy=False)
        counts = counts.astype(np.int64, copy=False)
        self.totals += np.bincount(groups, weights=counts, minlength=self.partitions).astype(np.int64)
        g, h, c = _cut_groups(groups, hashes, counts, self.capacity)  # the batch's own summary
        # Merge: add the counters of equal hashes (a hash is in one partition), cut again.
        g = np.concatenate([self.groups, g])
        h = np.concatenate([self.hashes, h])
        c = np.concatenate([self.counts, c])
        order = np.argsort(h, kind="stable")
        h, g, c = h[order], g[order], c[order]
        if h.size:
            starts = np.flatnonzero(np.concatenate(([True], h[1:] != h[:-1])))
            h, g, c = h[starts], g[starts], np.add.reduceat(c, starts)
        g, h, c = _cut_groups(g, h, c, self.capacity)
        order = np.argsort(h)
        h, g, c = h[order], g[order], c[order]
        keys = np.empty(h.size, dtype=object)
        if self.hashes.size:
            pos = np.minimum(np.searchsorted(self.hashes, h), self.hashes.size - 1)
            old = self.hashes[pos] == h
            keys[old] = self.keys[pos[old]]
        else:
            old = np.zeros(h.size, dtype=bool)
        self.hashes, self.counts, self.groups, self.keys = h, c, g, keys
        if not old.all():
            keys[~old] = source.keys_for(h[~old])

    def summaries(self) -> list[HeavyHitters]:
        """One :class:`HeavyHitters` per partition."""
        out = []
        for p in range(self.partitions):
            m = self.groups == p
            out.append(
                HeavyHitters(
                    capacity=self.capacity,
                    total=int(self.totals[p]),
                    hashes=self.hashes[m],
                    counts=self.counts[m],
                    keys=self.keys[m],
                )
            )
        return out


class DeferredKeys:
    """Key values for several summaries updated from one batch, fetched in one pass at the end
    (:meth:`resolve`): one ``searchsorted`` of the batch's hashes and one ``take``, instead of
    one of each per summary. Until then the new counters' keys are None."""

    def __init__(self) -> None:
        self._asks: list[tuple[HeavyHitters, np.ndarray]] = []

    def source_for(self, summary: HeavyHitters | PartitionedHeavyHitters):
        """The ``source`` to pass to ``summary.update_counts``."""
        return _Ask(self, summary)

    def resolve(
        self, hashes: np.ndarray, keys_of: Callable[[np.ndarray], Sequence], *, stride: int = 1
    ) -> None:
        """Fill the keys asked for: ``hashes`` the batch's (sampled) hashes, where row ``i`` is
        row ``i * stride`` of the batch that ``keys_of`` reads."""
        if not self._asks:
            return
        wanted = np.sort(np.concatenate([w for _, w in self._asks]))
        pos = np.minimum(np.searchsorted(wanted, hashes), wanted.size - 1)
        rows = np.flatnonzero(wanted[pos] == hashes)
        first = np.zeros(wanted.size, dtype=np.int64)
        first[pos[rows]] = rows  # any row with the hash will do (every wanted hash is in the batch)
        values = _objects(keys_of(first * stride))
        for summary, w in self._asks:
            summary.keys[np.searchsorted(summary.hashes, w)] = values[np.searchsorted(wanted, w)]
        self._asks = []


class _Ask:
    def __init__(self, deferred: DeferredKeys, summary: HeavyHitters):
        self.deferred, self.summary = deferred, summary

    def keys_for(self, wanted: np.ndarray) -> np.ndarray:
        self.deferred._asks.append((self.summary, wanted))
        return np.full(wanted.size, None, dtype=object)


def merge_all(summaries: Sequence[HeavyHitters], capacity: int = DEFAULT_CAPACITY) -> HeavyHitters:
    """One summary of all of ``summaries`` (an empty one for none)."""
    out = HeavyHitters(capacity=capacity)
    for s in summaries:
        out = out.merge(s)
    return out
