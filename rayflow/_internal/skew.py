"""Skew: each partition's input rate against the mean, and the hottest keys (DESIGN §7).

Measured where all traffic is seen cheaply: the source actor has every row's key
hash and partition when it routes a batch. :class:`SkewTracker` (one per source
actor) keeps a heavy-hitters summary per partition (``_internal/sketch.py``) over
a sliding window; :func:`add_skew` (pure) merges the summaries of all the source
actors per partition and adds to a status:

- per partition ``input_rows`` (rows routed to it in the window, over all sources; from the
  weighted sample for batches over ``max_rows``, so an estimate there),
  ``rate_ratio`` (its input rate over the mean partition's: ``input_rows`` over their
  mean; 1.0 is a fair share, None before any row) and ``hot_keys`` (its hottest keys,
  largest first: ``key``, ``count``, ``share`` of the partition's rows, ``error_rows``);
- overall ``skew`` (the largest ``rate_ratio``), ``hot_partition`` (that partition)
  and ``hot_keys`` (the job's hottest keys, ``share`` of all rows, with their
  ``partition``), ``skew_window_s`` (how many seconds the figures cover), and
  ``combined_rows`` (``Aggregate(combine_at_source=True)``: the rows the sources queued
  after combining, since they started; None without combining).

**The window.** Each tracker keeps two generations of summaries, the current and
the previous one, and starts a new one every ``window_s``; figures cover the two,
so between ``window_s`` and ``2 * window_s`` of input (all of it, until then). A
skew that began an hour into a job shows within a window, undiluted by the hour
before. Merging two generations keeps the summary's guarantee (it is a merge).

**Cost.** Per batch: one ``np.unique`` of at most ``max_rows`` hashes (a bigger
batch is summarized from a strided sample: see ``sketch.sample_stride`` for what that
does to the bound), the partitions of the distinct hashes, and per partition
present one small merge of at most ``k`` + distinct counters. ``bench/skew.py``
measures it.

Caveat: the rates are *input* rates (what the sources route), the load a partition
is given; its processing rate is ``rate_rows_per_s``, and its lag shows whether it keeps up.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from rayflow._internal.sketch import (
    DEFAULT_CAPACITY,
    DEFAULT_MAX_ROWS,
    DeferredKeys,
    HeavyHitters,
    PartitionedHeavyHitters,
    distinct_counts,
    merge_all,
    sample_stride,
)

#: A new generation of summaries every this many seconds: the figures cover the last one to two.
WINDOW_S = 60.0
#: Hot keys shown per partition and for the job (status, metrics, history).
HOT_KEYS_SHOWN = 5

#: Columns of ``history_skew`` (one row per partition and sample) and their SQL types.
SKEW_COLUMNS = (
    ("ts", "TIMESTAMP"), ("partition", "INTEGER"), ("input_rows", "BIGINT"), ("rate_ratio", "DOUBLE"),
)  # fmt: skip
#: Columns of ``history_hot_keys`` (one row per partition, rank and sample). ``key``: the key's
#: value as text (a composite key as a tuple); ``key_hash``: its hash, 16 hex digits.
HOT_KEY_COLUMNS = (
    ("ts", "TIMESTAMP"), ("partition", "INTEGER"), ("rank", "INTEGER"), ("key", "VARCHAR"),
    ("key_hash", "VARCHAR"), ("count", "BIGINT"), ("share", "DOUBLE"), ("error_rows", "DOUBLE"),
)  # fmt: skip


def key_values(batch: pa.RecordBatch | pa.Table, columns: Sequence[str], rows: np.ndarray) -> list:
    """The key of each of ``rows`` (a scalar, or a tuple for a composite key) as Python values."""
    idx = pa.array(np.asarray(rows, dtype=np.int64))
    parts = [batch.column(c).take(idx).to_pylist() for c in columns]
    return parts[0] if len(parts) == 1 else list(zip(*parts))


class SkewTracker:
    """Heavy hitters per partition over a sliding window, fed by a source actor's batches.

    Not thread-safe: one reading thread calls :meth:`observe` at a time (the source actor
    guards it with a lock: unbounded splits are read by threads of their own).
    """

    def __init__(
        self,
        partitions: int,
        *,
        capacity: int = DEFAULT_CAPACITY,
        max_rows: int = DEFAULT_MAX_ROWS,
        window_s: float = WINDOW_S,
        clock=time.monotonic,
    ):
        self.partitions, self.capacity, self.max_rows, self.window_s = (
            partitions,
            capacity,
            max_rows,
            window_s,
        )
        self._clock = clock
        self._since = clock()
        self._current = self._fresh()
        self._previous: PartitionedHeavyHitters | None = None
        self._previous_since = self._since

    def _fresh(self) -> PartitionedHeavyHitters:
        return PartitionedHeavyHitters(self.partitions, self.capacity)

    def _rotate(self) -> None:
        now = self._clock()
        if now - self._since >= self.window_s:
            self._previous, self._previous_since = self._current, self._since
            self._current, self._since = self._fresh(), now

    def observe(self, hashes: np.ndarray, route, keys_of) -> None:
        """Add a batch: its rows' ``hashes``; ``route(hashes)``: their partitions (the partition
        map's ``route``); ``keys_of(rows)``: the key values of row indices of the batch. A fixed
        number of numpy calls per batch, whatever the partitions (``PartitionedHeavyHitters``)."""
        self._rotate()
        n = hashes.shape[0]
        if n == 0:
            return
        s = sample_stride(n, self.max_rows)
        h = hashes[::s]
        u, c = distinct_counts(h)
        c *= s
        deferred = DeferredKeys()
        self._current.update(u, c, np.asarray(route(u)), deferred.source_for(self._current))
        deferred.resolve(h, keys_of, stride=s)

    def snapshot(self) -> dict:
        """The summaries of the window as plain data: ``window_s`` (seconds covered) and
        ``partitions`` (one ``HeavyHitters.to_dict`` each)."""
        self._rotate()
        if self._previous is None:
            summaries, since = self._current.summaries(), self._since
        else:
            pairs = zip(self._previous.summaries(), self._current.summaries())
            summaries, since = [a.merge(b) for a, b in pairs], self._previous_since
        return {"window_s": self._clock() - since, "partitions": [s.to_dict() for s in summaries]}


def add_skew(st: dict, sources: list[dict]) -> None:
    """Add the skew figures (see the module doc) to a status, from the source actors' stats
    (their ``skew``: :meth:`SkewTracker.snapshot`); pure, in place. Sources that report no
    ``skew`` are left out; with none, every figure is None (hot keys empty)."""
    parts = st["partitions"]
    snaps = [s["skew"] for s in sources if s.get("skew")]
    merged: list[HeavyHitters | None] = []
    for part in parts:
        p = part["partition"]
        ss = [HeavyHitters.from_dict(x["partitions"][p]) for x in snaps if p < len(x["partitions"])]
        merged.append(
            merge_all(ss, capacity=min((s.capacity for s in ss), default=DEFAULT_CAPACITY)) if ss else None
        )
    totals = [m.total if m is not None else 0 for m in merged]
    mean = sum(totals) / len(totals) if totals else 0.0
    everything = sum(totals)
    hot: list[dict] = []
    for part, m, total in zip(parts, merged, totals):
        part["input_rows"] = total if snaps else None
        part["rate_ratio"] = total / mean if mean > 0 else None
        part["hot_keys"] = m.top(HOT_KEYS_SHOWN) if m is not None else []
        if m is not None:
            for x in m.top(HOT_KEYS_SHOWN):
                hot.append({**x, "partition": part["partition"], "share": x["count"] / everything})
    ratios = [(part["rate_ratio"], part["partition"]) for part in parts if part["rate_ratio"] is not None]
    top = max(ratios, default=None)
    st["skew"] = top[0] if top else None
    st["hot_partition"] = top[1] if top else None
    # Partitions hold disjoint hashes: the job's hottest keys are the partitions' hottest.
    st["hot_keys"] = sorted(hot, key=lambda x: (-x["count"], x["hash"]))[:HOT_KEYS_SHOWN]
    st["skew_window_s"] = max((x["window_s"] for x in snaps), default=None)
    combined = [s["combined_rows"] for s in sources if s.get("combined_rows") is not None]
    st["combined_rows"] = sum(combined) if combined else None


def history_rows(st: dict, *, ts) -> tuple[list[tuple], list[tuple]]:
    """The ``history_skew`` and ``history_hot_keys`` rows of one sample (a status with
    :func:`add_skew` applied; none when it was not: the sources did not all answer)."""
    skew, hot = [], []
    for part in st["partitions"]:
        if "rate_ratio" not in part:
            continue
        p = part["partition"]
        skew.append((ts, p, part.get("input_rows"), part.get("rate_ratio")))
        for rank, x in enumerate(part.get("hot_keys") or [], start=1):
            hot.append(
                (ts, p, rank, str(x["key"]), f"{x['hash']:016x}", x["count"], x["share"], x["error_rows"])
            )
    return skew, hot
