"""Event-time window arithmetic for ``rf.ops.Window`` (pure numpy/Arrow, no per-row Python).

- :func:`event_millis`: an event-time column as int64 milliseconds.
- :func:`floor_div`: floored int64 division, fast.
- :func:`fixed_windows`: every (row, window) pair of tumbling or hopping windows aligned to epoch 0.
- :func:`window_rows`: the same pairs grouped by window: each window's rows.
- :func:`key_codes`: one dense int64 code per distinct key (nulls are a key, as in ``group_by``).
- :func:`merge_intervals`: per key, the connected components of half-open intervals (sessions).
- :func:`split_sorted`: a table cut into slices by the distinct values of an int64 column.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayflow._internal.watermarks import TO_MS, check_event_time_column
from rayflow.errors import ConfigError, InputError


def event_millis(col: pa.ChunkedArray | pa.Array, column: str, who: str) -> np.ndarray:
    """``col`` (int64 ms or a timestamp of any unit) as an int64 numpy array of milliseconds.

    Sub-millisecond timestamps are floored (towards the past, also before 1970:
    a window holds the instants of its span).
    Null event times raise :class:`InputError` with their count: a row without
    a time belongs to no window.
    """
    check_event_time_column(pa.schema([pa.field(column, col.type)]), column, what=who)
    if col.null_count:
        raise InputError(
            f"{who}: the event-time column {column!r} has {col.null_count} null value(s) in a batch of "
            f"{len(col)} rows; every row needs an event time. Drop or fill them in an rf.ops.Map "
            f"before this operator (e.g. table.filter(pc.is_valid(table[{column!r}])))"
        )
    mul, div = (1, 1)
    if pa.types.is_timestamp(col.type):
        mul, div = TO_MS[col.type.unit]
        col = pc.cast(col, pa.int64())
    ms = np.asarray(col.to_numpy(), dtype=np.int64)
    if div != 1:
        return ms // div
    if mul != 1:
        return ms * mul
    return ms


#: Below this magnitude a float64 quotient floors exactly (its rounding error stays under 1/d).
_FLOAT_EXACT = 2**52


def floor_div(x: np.ndarray, d: int) -> np.ndarray:
    """``x // d`` (floored, also below zero), by a float division where it is exact: several
    times faster than numpy's int64 division."""
    if len(x) and max(-int(x.min()), int(x.max())) < _FLOAT_EXACT:
        return np.floor(x / float(d)).astype(np.int64)
    return x // d


def fixed_windows(ts: np.ndarray, size: int, slide: int) -> tuple[np.ndarray | None, np.ndarray]:
    """Every (row, window) pair: ``(rows, starts)``, windows ``[start, start + size)``, starts
    multiples of ``slide`` (``slide <= size``). ``rows`` is ``None`` for tumbling windows
    (``slide == size``: one window per row, in row order)."""
    if slide == size:
        return None, floor_div(ts, size) * size
    last = floor_div(ts, slide)  # the last window starting at or before ts
    first = floor_div(ts - size, slide) + 1  # the first window ending after ts
    counts = last - first + 1
    total = int(counts.sum())
    rows = np.repeat(np.arange(len(ts), dtype=np.int64), counts)
    offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, (np.repeat(first, counts) + offsets) * slide


#: Up to this many windows in a batch, :func:`window_rows` finds each one's rows with a comparison
#: per window (a few passes over the times each); past it, one sort of all (row, window) pairs.
_FEW_WINDOWS = 16


def window_rows(ts: np.ndarray, size: int, slide: int) -> list[tuple[int, np.ndarray | None]]:
    """The windows ``[start, start + size)`` (starts multiples of ``slide``, ``slide <= size``)
    holding at least one of the times ``ts``, with their rows: ``[(start, rows)]``, starts
    ascending; ``rows`` is ascending row indices, or ``None`` for every row (a batch within one
    window: the common case, found from the minimum and maximum alone). A hopping row is in
    each of its windows. A batch spanning few windows costs a comparison pass per window;
    many, a sort of its (row, window) pairs."""
    if len(ts) == 0:
        return []
    lo, hi = int(ts.min()), int(ts.max())
    first = (lo - size) // slide + 1  # the first window ending after lo
    last = hi // slide  # the last window starting at or before hi
    if last - first < _FEW_WINDOWS:
        out = []
        for w in range(first, last + 1):
            start = w * slide
            if start <= lo and hi < start + size:
                out.append((start, None))
                continue
            rows = np.flatnonzero((ts >= start) & (ts < start + size))
            if len(rows):
                out.append((start, rows))
        return out
    if slide == size:
        rows, starts = None, floor_div(ts, size) * size
    else:
        rows, starts = fixed_windows(ts, size, slide)
    order = np.argsort(starts, kind="stable")  # stable: each window's rows stay ascending
    ordered = starts[order]
    if rows is not None:
        order = rows[order]
    cuts = [0, *(np.flatnonzero(ordered[1:] != ordered[:-1]) + 1).tolist(), len(ordered)]
    n = len(ts)
    return [
        (int(ordered[a]), None if b - a == n else order[a:b])
        for a, b in zip(cuts[:-1], cuts[1:], strict=True)
    ]


def key_codes(table: pa.Table, by: list[str]) -> np.ndarray:
    """One int64 code per row, equal for rows with equal ``by`` values (nulls included)."""
    codes, card = np.zeros(table.num_rows, dtype=np.int64), 1
    for name in by:
        col = table.column(name).combine_chunks()
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        enc = pc.dictionary_encode(col, null_encoding="encode")
        n = max(len(enc.dictionary), 1)
        if card * n >= 2**62:  # re-number densely before the product could overflow
            uniq, codes = np.unique(codes, return_inverse=True)
            card = len(uniq)
        codes = codes * n + np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
        card *= n
    return codes


class Sessions(NamedTuple):
    """Connected components of intervals (see :func:`merge_intervals`)."""

    #: The component of each interval, in input order (components are numbered 0, 1, ...).
    of_row: np.ndarray
    #: The input index of each component's first interval (by start).
    first_row: np.ndarray
    #: Each component's start and end: ``[start, end)``.
    start: np.ndarray
    end: np.ndarray


def merge_intervals(
    codes: np.ndarray, start: np.ndarray, end: np.ndarray, *, equal_lengths: bool = False
) -> Sessions:
    """Connected components of the half-open intervals ``[start, end)`` of each key (``codes``).

    Two intervals of a key are in one component when a chain of overlapping
    intervals joins them (touching ``[a, b)`` and ``[b, c)`` do not overlap).
    Vectorized: sort by key and start, then a running maximum of ``end``
    within each key, made segment-wise by ranking the ends and offsetting
    each key's ranks above the previous key's; an interval starting at or
    after it begins a component. With ``equal_lengths`` (every interval as
    long: rows and a session gap) the ends are sorted as the starts are, and
    the running maximum is the previous end.
    """
    n = len(codes)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Sessions(empty, empty, empty, empty)
    lo, span = int(start.min()), int(start.max()) - int(start.min()) + 1
    if int(codes.max()) < 2**62 // span:  # one int64 sort key: faster than a lexsort
        order = np.argsort(codes * span + (start - lo), kind="stable")
    else:
        order = np.lexsort((start, codes))
    c, s, e = codes[order], start[order], end[order]
    begins = np.empty(n, dtype=bool)
    begins[0] = True
    np.not_equal(c[1:], c[:-1], out=begins[1:])
    if equal_lengths:
        running_end = e
    else:
        seg = np.cumsum(begins) - 1
        ends, rank = np.unique(e, return_inverse=True)
        shift = seg * len(ends)
        running_end = ends[np.maximum.accumulate(shift + rank) - shift]
    begins[1:] |= s[1:] >= running_end[:-1]
    firsts = np.flatnonzero(begins)
    of_row = np.empty(n, dtype=np.int64)
    of_row[order] = np.cumsum(begins) - 1
    return Sessions(of_row, order[firsts], s[firsts], np.maximum.reduceat(e, firsts))


def split_sorted(table: pa.Table, column: str) -> list[tuple[int, pa.Table]]:
    """``table`` cut by the distinct values of its int64 ``column``: ``[(value, rows)]``."""
    values = np.asarray(table.column(column).to_numpy(), dtype=np.int64)
    if len(values) == 0:
        return []
    lo, hi = int(values.min()), int(values.max())
    if lo == hi:
        return [(lo, table)]
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    cuts = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
    bounds = [0, *cuts.tolist(), len(values)]
    sorted_table = table.take(order)
    return [
        (int(ordered[a]), sorted_table.slice(a, b - a)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def millis(seconds, what: str, *, who: str) -> int:
    """``seconds`` as a whole positive number of milliseconds, else a :class:`ConfigError` that
    names the operator (``who``) and the argument (``what``)."""
    ok = isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and math.isfinite(seconds)
    ms = seconds * 1000 if ok else None
    if not ok or ms <= 0 or abs(ms - round(ms)) > 1e-6:
        raise ConfigError(
            f"{who}: {what} must be a positive number of seconds that is a whole number of "
            f"milliseconds (e.g. 60 or 0.25), got {seconds!r}"
        )
    return int(round(ms))


def fixed_sizes(who: str, tumbling_s, hopping_s) -> tuple[int, int]:
    """``(size_ms, slide_ms)`` of tumbling (``tumbling_s``) or hopping (``hopping_s=(size_s,
    slide_s)``) windows, checked; exactly one of them is given."""
    if tumbling_s is not None:
        size = millis(tumbling_s, "tumbling_s", who=who)
        return size, size
    if not (isinstance(hopping_s, (tuple, list)) and len(hopping_s) == 2):
        raise ConfigError(f"{who}: hopping_s is (size_s, slide_s), got {hopping_s!r}")
    size = millis(hopping_s[0], "the size of hopping_s", who=who)
    slide = millis(hopping_s[1], "the slide of hopping_s", who=who)
    if slide > size:
        raise ConfigError(
            f"{who}: hopping_s={tuple(hopping_s)!r} slides further than the window is long, so rows "
            "between windows would belong to none; give slide <= size"
        )
    return size, slide


def fixed_repr(kind: str, size_ms: int, slide_ms: int) -> str | None:
    """The argument that made tumbling or hopping windows (for an operator's repr), else None."""
    if kind == "tumbling":
        return f"tumbling_s={size_ms / 1000:g}"
    if kind == "hopping":
        return f"hopping_s=({size_ms / 1000:g}, {slide_ms / 1000:g})"
    return None
