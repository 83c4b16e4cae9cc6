"""``rf.ops.Dedup``: drops the retries of an event within a span of event time (DESIGN §11)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayflow._internal.watermarks import check_event_time_column
from rayflow._internal.windowing import event_millis
from rayflow.errors import ConfigError, InputError, UnsupportedKeyTypeError
from rayflow.ops.base import WATERMARK_END, WATERMARK_NONE, Operator, filled_event_time
from rayflow.partitioning import check_key_type, hash_table

#: The state table's column holding each kept row's event time (int64 ms); a ``by`` column
#: cannot have this name.
KEPT_COLUMN = "_rayflow_kept_ms"

#: Schema metadata of the state table: the watermark and the counters, as JSON.
STATE_METADATA = b"rayflow.dedup"

#: Event times (ms) must lie within +-2**61 (73 million years either side of 1970), so that
#: differences of two of them and the bounds derived from the watermark fit in int64.
MAX_ABS_MS = 2**61

#: A segment is rewritten without its expired rows once about this fraction of them has expired
#: (and dropped whole once all have): memory stays within about 1 / (1 - fraction) of the live
#: rows, and each row is copied O(1) times by expiry. Expired rows left in place never match a row that is
#: not late (see the class doc): they cost memory, never a wrong answer.
COMPACT_FRACTION = 0.25

#: Segments holding more than this many key-column chunks are combined into one chunk when
#: merged (Arrow's ``take`` is cheaper over few chunks).
MAX_CHUNKS = 8

_LOW32 = np.uint64(0xFFFFFFFF)
_HIGH32 = np.uint64(0xFFFFFFFF_00000000)


def _packed(hashes: np.ndarray, first_row: int = 0) -> np.ndarray:
    """Index entries ``(hash >> 32) << 32 | row`` for rows ``first_row, first_row + 1, ...``:
    sorted, they group rows by the top half of their hash and name each row (< 2**32)."""
    rows = np.arange(first_row, first_row + hashes.shape[0], dtype=np.uint64)
    return (hashes & _HIGH32) | rows


@dataclass(frozen=True)
class _Segment:
    """Kept rows, with a sorted index over their key hashes (immutable).

    ``index`` is ``_packed(hashes)`` sorted; a lookup is one ``searchsorted`` of
    the batch's (sorted) hashes into it. ``compact_at`` is the
    :data:`COMPACT_FRACTION` quantile of the kept times (of an even sample of
    them, for a large segment): once the expiry bound reaches it, about that
    fraction of the rows has expired.
    """

    keys: pa.Table  # the ``by`` columns of each row (dictionaries decoded)
    kept_ms: np.ndarray  # int64: each row's event time
    hashes: np.ndarray  # uint64: hash_table(keys, by) of each row
    index: np.ndarray  # uint64, sorted: (hash >> 32) << 32 | row
    min_kept: int
    max_kept: int
    compact_at: int

    @property
    def num_rows(self) -> int:
        return int(self.kept_ms.shape[0])

    @classmethod
    def of(
        cls, keys: pa.Table, kept_ms: np.ndarray, hashes: np.ndarray, index: np.ndarray | None = None
    ) -> _Segment:
        n = kept_ms.shape[0]
        if n >= 1 << 32:
            raise InputError(
                f"rf.ops.Dedup: one partition would hold {n} ids (at most 2**32); use more "
                "partitions or a shorter within_s"
            )
        # The quantile of an even sample of at most 2**16 times: about that fraction (it bounds
        # memory, never the answer), without a pass of np.partition over the whole segment.
        sample = kept_ms[:: max(1, n >> 16)]
        k = int(sample.shape[0] * COMPACT_FRACTION)
        return cls(
            keys=keys,
            kept_ms=kept_ms,
            hashes=hashes,
            index=np.sort(_packed(hashes)) if index is None else index,
            min_kept=int(kept_ms.min()),
            max_kept=int(kept_ms.max()),
            compact_at=int(np.partition(sample, k)[k]),
        )

    def merged(self, other: _Segment) -> _Segment:
        """This segment's rows, then ``other``'s: two sorted indexes merged by a stable sort
        (timsort merges the two runs in one pass)."""
        keys = pa.concat_tables([self.keys, other.keys], promote_options="permissive")
        if keys.column(0).num_chunks > MAX_CHUNKS:
            keys = keys.combine_chunks()
        index = np.concatenate([self.index, other.index + np.uint64(self.num_rows)])
        return _Segment.of(
            keys,
            np.concatenate([self.kept_ms, other.kept_ms]),
            np.concatenate([self.hashes, other.hashes]),
            np.sort(index, kind="stable"),
        )

    def filtered(self, keep: np.ndarray) -> _Segment | None:
        """The rows where ``keep``; the index is filtered and renumbered, not sorted again."""
        n_keep = int(np.count_nonzero(keep))
        if n_keep == 0:
            return None
        new_row = (np.cumsum(keep, dtype=np.int64) - 1).astype(np.uint64)
        rows = (self.index & _LOW32).astype(np.intp)
        sel = keep[rows]
        index = (self.index[sel] & _HIGH32) | new_row[rows[sel]]
        return _Segment.of(self.keys.filter(pa.array(keep)), self.kept_ms[keep], self.hashes[keep], index)


@dataclass(frozen=True)
class _State:
    """One partition's Dedup state: the kept rows (ids) that may still match a row, as
    segments, oldest first, each less than half the size of the one before (a new batch's
    kept rows become a segment, merged into the previous one while it is not more than
    twice as large: O(log n) segments, each row merged O(log n) times), so that a small
    batch costs O(batch log state), not a copy of the state.

    Never mutated: :meth:`Dedup.process` and :meth:`Dedup.advance` return a new one, sharing
    the segments that did not change.
    """

    segments: tuple[_Segment, ...] = ()
    watermark: int = WATERMARK_NONE
    late_rows: int = 0
    duplicates_dropped: int = 0

    @property
    def num_rows(self) -> int:
        """Rows held, expired ones not yet dropped included."""
        return sum(s.num_rows for s in self.segments)


def _keys_equal(a: pa.Table, b: pa.Table) -> np.ndarray:
    """Row-wise equality of two tables of the same key columns; a null equals a null (SQL's
    GROUP BY, and the key hash, treat nulls as one key)."""
    eq = np.ones(a.num_rows, dtype=bool)
    for x, y in zip(a.columns, b.columns):
        same = pc.fill_null(pc.equal(x, y), False)
        if x.null_count or y.null_count:
            same = pc.or_(same, pc.and_(pc.is_null(x), pc.is_null(y)))
        eq &= np.asarray(same.to_numpy(zero_copy_only=False), dtype=bool)
    return eq


def _first_of_runs(values: np.ndarray) -> np.ndarray:
    """Whether each position of ``values`` starts a run of equal values."""
    first = np.ones(values.shape[0], dtype=bool)
    first[1:] = values[1:] != values[:-1]
    return first


class Dedup(Operator):
    """Drops a row whose ``by`` values were already kept within ``within_s`` of event time.

    The idempotency window of producers that retry (DESIGN §11): the copies of
    an event sent again within the window reach the output once. The output is
    the input rows that survive, with the input's schema and in input order.

    **Semantics.** Let ``W`` be ``within_s`` in milliseconds (rounded, at least
    1) and ``wm`` the partition's watermark (the last value :meth:`on_watermark` gave; before any,
    nothing is late). The rows of a batch are decided one at a time, in order
    of (event time, arrival within the batch), batches in arrival order. A row
    with key ``k`` and event time ``t`` is:

    1. *late* if ``t < wm - W``: dropped and counted in ``late_rows`` (its
       key's earlier rows may have been forgotten; dropping it never risks a
       double). Late comes first: a late row is never counted as a duplicate;
    2. else a *duplicate* if a row of ``k`` was kept earlier (an earlier batch,
       or earlier in this batch's order) with event time ``t0`` and
       ``|t - t0| < W``: dropped and counted in ``duplicates_dropped``;
    3. else *kept*: emitted, and remembered as ``(k, t)``.

    Guarantees that follow: no two output rows of one key are less than ``W``
    apart in event time (across batches, snapshots and restores); every
    dropped row that is not late is within ``W`` of an output row of its key;
    if the copies of an event all lie within ``W`` of each other, none is late
    and no other event of the key is within ``W`` of them, exactly one copy is
    emitted: within one batch, the one with the lowest event time (ties: the
    first to arrive); across batches, one from the first batch holding a copy.
    A key reused after the window is a new event (kept again). The watermark
    decides only which rows are late: whether a row that is not late is a
    duplicate depends on neither the watermark nor when ids are forgotten.

    **State** is the kept rows (key values and event time) that may still
    match a row that is not late: those with ``t0 > wm - 2W`` (a row ``t >=
    wm - W`` matches only ``t0 > t - W >= wm - 2W``). :meth:`on_watermark` forgets
    the others (all at :data:`WATERMARK_END`), so the state holds the ids of
    about ``2W`` plus the out-of-orderness of event time. It is checkpointed as
    a table (the ``by`` columns and the kept event time; watermark and counters
    in the schema metadata) and restored exactly. Advancing never emits.

    **Keys.** ``by`` is a column or a list of columns (integers, strings,
    binaries, dates or timestamps, as the partitioning key); it must include
    the pipeline's key. A null key is a key like any other (nulls equal each
    other, as in SQL's GROUP BY). Lookup goes through the 64-bit key hash
    (``rayflow.partitioning.hash_table``) and every hash hit is confirmed by
    comparing the key values, so a hash collision never drops a distinct key.

    **Event time** is the column ``event_time`` (or the pipeline's, see
    :meth:`with_event_time`): int64 milliseconds (any integer type) or an Arrow
    timestamp of any unit and time zone (floored to milliseconds). A null event
    time is an :class:`~rayflow.errors.InputError`.

    Vectorized, no Python per row: per batch, a hash of the keys, one sort of
    the batch's hashes (which also finds the copies within it), a
    ``searchsorted`` of them into each state segment's sorted index (see
    :class:`_State`), and key comparisons on the hash hits only.
    """

    stateful = True

    def __init__(self, by: str | Sequence[str], *, within_s: float, event_time: str | None = None):
        self.by = [by] if isinstance(by, str) else list(by)
        if not self.by or not all(isinstance(c, str) for c in self.by):
            raise ConfigError(f"rf.ops.Dedup needs the key column(s) in by=, e.g. by='event_id'; got {by!r}")
        if KEPT_COLUMN in self.by:
            raise ConfigError(
                f"rf.ops.Dedup: {KEPT_COLUMN!r} is the name of its state's event-time column; "
                "rename that column (in an rf.ops.Map before the Dedup)"
            )
        if (
            isinstance(within_s, bool)
            or not isinstance(within_s, (int, float))
            or not math.isfinite(within_s)
            or within_s <= 0
        ):
            raise ConfigError(
                f"rf.ops.Dedup: within_s must be a positive number of seconds (the span of event "
                f"time in which a copy of an event is a duplicate), got {within_s!r}"
            )
        within_ms = round(within_s * 1000)
        if not 1 <= within_ms <= MAX_ABS_MS // 2:
            raise ConfigError(
                f"rf.ops.Dedup: within_s={within_s!r} is {within_s * 1000!r} ms; it must be at "
                f"least 0.001 (one millisecond) and at most {MAX_ABS_MS // 2000} seconds"
            )
        if event_time is not None and not isinstance(event_time, str):
            raise ConfigError(f"rf.ops.Dedup: event_time must be a column name, got {event_time!r}")
        self.within_s = within_s
        self.within_ms = within_ms
        self.event_time = event_time

    def __repr__(self) -> str:
        ev = f", event_time={self.event_time!r}" if self.event_time is not None else ""
        return f"rf.ops.Dedup(by={self.by}, within_s={self.within_s!r}{ev})"

    def spec(self) -> dict:
        return {"type": "Dedup", "by": self.by, "within_ms": self.within_ms, "event_time": self.event_time}

    @property
    def uses_event_time(self) -> bool:
        return True

    @property
    def group_columns(self) -> list[str]:
        return self.by

    def with_event_time(self, column: str | None) -> Dedup:
        if self.event_time is not None:
            return self
        if column is None:
            return filled_event_time(self, column)  # raises, saying what to do
        return Dedup(self.by, within_s=self.within_s, event_time=column)

    def _event_column(self) -> str:
        if self.event_time is None:
            raise ConfigError(
                f"{self!r} has no event-time column: pass event_time= (or call with_event_time)"
            )
        return self.event_time

    # ------------------------------------------------------------------ input
    def check_input(self, schema: pa.Schema) -> pa.Schema:
        """The ``by`` columns must be keys, the event time int milliseconds or a timestamp;
        returns ``schema`` (the output is the surviving input rows)."""
        ev = self._event_column()
        missing = [c for c in dict.fromkeys(self.by + [ev]) if c not in schema.names]
        if missing:
            raise InputError(
                f"{self!r} uses column(s) {missing} that the input does not have; its columns are "
                f"{schema.names}"
            )
        for c in self.by:
            try:
                check_key_type(c, schema.field(c).type)
            except UnsupportedKeyTypeError as e:
                raise UnsupportedKeyTypeError(
                    f"{self!r}: {e} Cast it in an rf.ops.Map before the Dedup (with output_schema=)"
                ) from None
        check_event_time_column(schema, ev, what=repr(self))
        return schema

    def _event_ms(self, table: pa.Table) -> np.ndarray:
        """The event-time column as int64 milliseconds (timestamps floored), validated."""
        ev = self._event_column()
        if ev not in table.column_names:
            raise InputError(
                f"{self!r}: the input has no event-time column {ev!r}; its columns are {table.column_names}"
            )
        values = event_millis(table.column(ev), ev, repr(self))
        if values.shape[0] and max(-int(values.min()), int(values.max())) > MAX_ABS_MS:
            raise InputError(
                f"{self!r}: event-time column {ev!r} has values more than 2**61 ms (73 million "
                "years) away from 1970; give it event times in milliseconds (or a timestamp type)"
            )
        return np.ascontiguousarray(values, dtype=np.int64)

    def _keys(self, table: pa.Table) -> pa.Table:
        """The ``by`` columns, one chunk each, dictionaries decoded (what the state keeps)."""
        cols = []
        for c in self.by:
            if c not in table.column_names:
                raise InputError(
                    f"{self!r}: the input has no column {c!r}; its columns are {table.column_names}"
                )
            col = table.column(c)
            if pa.types.is_dictionary(col.type):
                col = col.cast(col.type.value_type)
            cols.append(col)
        return pa.Table.from_arrays(cols, names=self.by).combine_chunks()

    # ------------------------------------------------------------------ state
    def init_state(self) -> _State:
        return _State()

    def _late_below(self, watermark: int) -> int | None:
        """Rows with an event time below this are late (``None``: none is)."""
        return None if watermark == WATERMARK_NONE else watermark - self.within_ms

    def _expired_up_to(self, watermark: int) -> int | None:
        """Kept rows with an event time up to this can match no row that is not late
        (``None``: none has expired)."""
        if watermark == WATERMARK_NONE:
            return None
        if watermark == WATERMARK_END:
            return WATERMARK_END
        return watermark - 2 * self.within_ms

    def _live(self, state: _State) -> list[tuple[_Segment, np.ndarray | None]]:
        """Each segment with the mask of its rows that have not expired (``None``: all)."""
        bound = self._expired_up_to(state.watermark)
        out = []
        for seg in state.segments:
            if bound is None or seg.min_kept > bound:
                out.append((seg, None))
            elif seg.max_kept > bound:
                out.append((seg, seg.kept_ms > bound))
        return out

    def metrics(self, state: _State) -> dict[str, int]:
        live = sum(seg.num_rows if m is None else int(np.count_nonzero(m)) for seg, m in self._live(state))
        return {
            "late_rows": state.late_rows,
            "duplicates_dropped": state.duplicates_dropped,
            "state_rows": live,
        }

    def on_watermark(self, state: _State, watermark_ms: int, *, version: int) -> tuple[_State, None]:
        """Move the watermark (never back) and forget expired ids; emits nothing.

        A segment whose rows have all expired is dropped; one with more than
        :data:`COMPACT_FRACTION` of them expired is rewritten without them; the
        others are left as they are (O(1) each).
        """
        if watermark_ms <= state.watermark:
            return state, None
        bound = self._expired_up_to(watermark_ms)
        segments = []
        for seg in state.segments:
            if seg.max_kept <= bound:
                continue
            if seg.compact_at <= bound:
                seg = seg.filtered(seg.kept_ms > bound)
            if seg is not None:
                segments.append(seg)
        return replace(state, watermark=int(watermark_ms), segments=tuple(segments)), None

    def _appended(self, state: _State, seg: _Segment) -> tuple[_Segment, ...]:
        segments = list(state.segments)
        while segments and segments[-1].num_rows <= 2 * seg.num_rows:
            seg = segments.pop().merged(seg)
        return (*segments, seg)

    def state_to_table(self, state: _State) -> pa.Table:
        """The ids that can still match (``by`` columns + :data:`KEPT_COLUMN`), the watermark and
        counters in the schema metadata."""
        parts = [
            seg.keys.append_column(KEPT_COLUMN, pa.array(seg.kept_ms))
            if m is None
            else seg.keys.filter(pa.array(m)).append_column(KEPT_COLUMN, pa.array(seg.kept_ms[m]))
            for seg, m in self._live(state)
        ]
        if parts:
            table = pa.concat_tables(parts, promote_options="permissive")
        else:
            table = pa.table({**{c: pa.nulls(0) for c in self.by}, KEPT_COLUMN: pa.array([], pa.int64())})
        meta = {
            "watermark": state.watermark,
            "late_rows": state.late_rows,
            "duplicates_dropped": state.duplicates_dropped,
            "within_ms": self.within_ms,
        }
        return table.replace_schema_metadata({STATE_METADATA: json.dumps(meta).encode()})

    def state_from_table(self, table: pa.Table) -> _State:
        raw = (table.schema.metadata or {}).get(STATE_METADATA)
        meta = json.loads(raw) if raw is not None else {}
        state = _State(
            watermark=int(meta.get("watermark", WATERMARK_NONE)),
            late_rows=int(meta.get("late_rows", 0)),
            duplicates_dropped=int(meta.get("duplicates_dropped", 0)),
        )
        if table.num_rows == 0:
            return state
        missing = [c for c in self.by + [KEPT_COLUMN] if c not in table.column_names]
        if missing:
            raise InputError(
                f"{self!r}: the state table lacks column(s) {missing}; it has {table.column_names}"
            )
        keys = table.select(self.by).combine_chunks()
        kept_ms = np.ascontiguousarray(table.column(KEPT_COLUMN).to_numpy(), dtype=np.int64)
        return replace(state, segments=(_Segment.of(keys, kept_ms, hash_table(keys, self.by)),))

    # ------------------------------------------------------------------ data path
    def process(self, state: _State, table: pa.Table) -> tuple[_State, pa.Table]:
        n = table.num_rows
        if n == 0:
            return state, table
        t = self._event_ms(table)
        keys = self._keys(table)
        h = hash_table(keys, self.by)

        late_below = self._late_below(state.watermark)
        rows = np.flatnonzero(t >= late_below) if late_below is not None else np.arange(n)
        n_late = n - rows.shape[0]
        n_candidates = rows.shape[0]
        # One sort of (hash >> 32) << 32 | position groups the rows by hash (arrival order within
        # a group): the state is probed in that order (sorted needles: one sequential pass over
        # each segment's index), and the copies within the batch are the groups of several rows.
        order = np.sort(_packed(h[rows]))
        rows, hi = rows[(order & _LOW32).astype(np.intp)], order & _HIGH32
        for seg in state.segments:
            if rows.shape[0]:
                fresh = ~self._in_segment(seg, keys, h, t, rows, hi)
                rows, hi = rows[fresh], hi[fresh]
        kept = self._first_in_batch(keys, h, t, rows, hi)

        mask = np.zeros(n, dtype=bool)
        mask[kept] = True
        out = table.filter(pa.array(mask))
        segments = state.segments
        if kept.shape[0]:
            new_keys = keys.filter(pa.array(mask)) if kept.shape[0] != n else keys
            segments = self._appended(state, _Segment.of(new_keys, t[mask], h[mask]))
        state = replace(
            state,
            segments=segments,
            late_rows=state.late_rows + n_late,
            duplicates_dropped=state.duplicates_dropped + n_candidates - kept.shape[0],
        )
        return state, out

    def _in_segment(
        self, seg: _Segment, keys: pa.Table, h: np.ndarray, t: np.ndarray, rows: np.ndarray, hi: np.ndarray
    ) -> np.ndarray:
        """For each of ``rows`` (sorted by ``hi``, their hash's top half), whether ``seg`` holds
        a row of its key within ``W`` of its event time.

        ``searchsorted`` finds each row's first index entry with the same top
        half; the entries from there on are read one per round (all rows at
        once) while the top half matches. An entry whose full hash matches and
        whose time is within ``W`` is a candidate; candidates are confirmed by
        comparing the key values, so a 64-bit hash collision keeps the row.
        """
        n_index = seg.index.shape[0]
        pos = np.searchsorted(seg.index, hi)
        active = np.flatnonzero(pos < n_index)
        pos = pos[active]
        cand_q, cand_r = [], []
        while active.shape[0]:
            entry = seg.index[pos]
            same = (entry & _HIGH32) == hi[active]
            active, pos, entry = active[same], pos[same], entry[same]
            if not active.shape[0]:
                break
            r = (entry & _LOW32).astype(np.intp)
            q = rows[active]
            near = (seg.hashes[r] == h[q]) & (np.abs(t[q] - seg.kept_ms[r]) < self.within_ms)
            cand_q.append(active[near])
            cand_r.append(r[near])
            pos += 1
            more = pos < n_index
            active, pos = active[more], pos[more]
        dup = np.zeros(rows.shape[0], dtype=bool)
        q = np.concatenate(cand_q) if cand_q else np.empty(0, np.intp)
        if q.shape[0]:
            r = np.concatenate(cand_r)
            same = _keys_equal(keys.take(pa.array(rows[q])), seg.keys.take(pa.array(r)))
            dup[q[same]] = True
        return dup

    def _first_in_batch(
        self, keys: pa.Table, h: np.ndarray, t: np.ndarray, rows: np.ndarray, hi: np.ndarray
    ) -> np.ndarray:
        """The rows kept among ``rows`` (none late, none a duplicate of the state), which come
        grouped by ``hi`` (the top 32 bits of their hash), in arrival order within a group.

        A row alone in its group is kept. A group whose rows share the full
        hash and the key values and span less than ``W`` keeps its lowest
        (event time, arrival) row: the common case of retries. Any other group
        (a key reused after ``W`` within the batch, or a hash collision) goes to
        :meth:`_first_exact`.
        """
        if rows.shape[0] <= 1:
            return rows
        same_as_prev = hi[1:] == hi[:-1]
        multi = np.zeros(rows.shape[0], dtype=bool)
        multi[1:] = same_as_prev
        multi[:-1] |= same_as_prev
        if not multi.any():
            return rows
        single = rows[~multi]
        r, g_first = rows[multi], _first_of_runs(hi[multi])
        g_starts = np.flatnonzero(g_first)
        g_idx = np.cumsum(g_first) - 1
        r_first = r[g_starts][g_idx]
        tt = t[r]
        simple = h[r] == h[r_first]
        check = simple.copy()
        check[g_starts] = False  # a group's first row is its own key
        simple[check] = _keys_equal(keys.take(pa.array(r[check])), keys.take(pa.array(r_first[check])))
        t_min = np.minimum.reduceat(tt, g_starts)
        t_max = np.maximum.reduceat(tt, g_starts)
        g_simple = np.logical_and.reduceat(simple, g_starts) & (t_max - t_min < self.within_ms)
        is_simple = g_simple[g_idx]
        # Simple groups: the first row (arrival order) at the group's lowest event time.
        cand = np.flatnonzero(is_simple & (tt == t_min[g_idx]))
        chosen = cand[_first_of_runs(g_idx[cand])]
        kept = [single, r[chosen]]
        if not is_simple.all():
            kept.append(self._first_exact(keys, h, t, np.sort(r[~is_simple])))
        return np.concatenate(kept)

    def _first_exact(self, keys: pa.Table, h: np.ndarray, t: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The kept rows among ``rows`` (ascending), exactly: sorted by (hash, key values, event
        time, arrival), a key's rows are decided in order, each kept iff at least ``W`` after the
        key's previous kept row (a greedy chain, found by pointer doubling)."""
        m = rows.shape[0]
        sub = keys.take(pa.array(rows))
        tt = t[rows]
        work = sub.append_column("__h", pa.array(h[rows])).append_column("__t", pa.array(tt))
        work = work.append_column("__arrival", pa.array(np.arange(m)))
        sort_keys = [("__h", "ascending")] + [(c, "ascending") for c in self.by]
        sort_keys += [("__t", "ascending"), ("__arrival", "ascending")]
        order = pc.sort_indices(work, sort_keys=sort_keys).to_numpy()
        hs, ts, ks = h[rows][order], tt[order], sub.take(pa.array(order))
        new_key = np.ones(m, dtype=bool)
        new_key[1:] = hs[1:] != hs[:-1]
        same_h = np.flatnonzero(~new_key)
        if same_h.shape[0]:
            eq = _keys_equal(ks.take(pa.array(same_h)), ks.take(pa.array(same_h - 1)))
            new_key[same_h[~eq]] = True
        keep = _greedy_chains(ts, new_key, self.within_ms)
        return np.sort(rows[order[keep]])


def _greedy_chains(t: np.ndarray, group_start: np.ndarray, within_ms: int) -> np.ndarray:
    """Mask of the rows kept by the greedy rule over groups sorted by ``t``: a group's first row
    is kept, then each next row at least ``within_ms`` after the last kept one.

    ``nxt[i]``, the first row of ``i``'s group at least ``within_ms`` after it, comes from one
    ``searchsorted`` over a monotone time axis: consecutive gaps capped at ``within_ms`` (which
    keeps ``t_j - t_i >= within_ms`` exact inside a group) and ``within_ms + 1`` between groups.
    The kept rows are the chain ``start, nxt[start], nxt[nxt[start]], ...``, marked in
    O(n log chain) by pointer doubling.
    """
    m = t.shape[0]
    if m * (within_ms + 1) >= 2**62:  # the axis would overflow: decide one round at a time
        return _greedy_rounds(t, group_start, within_ms)
    gap = np.empty(m, dtype=np.int64)
    gap[1:] = np.minimum(np.diff(t), within_ms)
    gap[group_start] = within_ms + 1
    gap[0] = 0
    axis = np.cumsum(gap)
    nxt = np.searchsorted(axis, axis + within_ms, side="left")
    # Past the group's last row, the search lands on the next group's first row (or at m).
    ends = np.append(group_start, True)
    nxt[ends[nxt]] = m
    jump = np.append(nxt, m)  # row m: the end, jumping to itself
    # P_0 = the starts; P_(k+1) = P_k + jump_k(P_k), jump_(k+1) = jump_k o jump_k: P_k holds
    # each chain's first 2**k rows.
    on = np.zeros(m + 1, dtype=bool)
    on[np.flatnonzero(group_start)] = True
    while True:
        at = np.flatnonzero(on[:m])
        to = jump[at]
        to = to[to < m]
        if to.shape[0] == 0:  # every chain ended: the jumps from P_k lead nowhere
            break
        on[to] = True
        jump = jump[jump]
    return on[:m]


def _greedy_rounds(t: np.ndarray, group_start: np.ndarray, within_ms: int) -> np.ndarray:
    """:func:`_greedy_chains` one kept row per group per round (for extreme ``within_ms``)."""
    m = t.shape[0]
    gid = np.cumsum(group_start) - 1
    keep = np.zeros(m, dtype=bool)
    open_rows = np.arange(m)
    while open_rows.shape[0]:
        g = gid[open_rows]
        first = _first_of_runs(g)
        keep[open_rows[first]] = True
        anchor = np.repeat(t[open_rows[first]], np.diff(np.append(np.flatnonzero(first), g.shape[0])))
        later = t[open_rows] - anchor >= within_ms
        open_rows = open_rows[later & ~first]
    return keep
