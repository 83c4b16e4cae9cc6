"""``rf.ops.Join``: stream-stream interval and window joins of two inputs (DESIGN §12), and the
multi-input convention the operators read (:data:`SOURCE_COLUMN`, :data:`INPUTS_METADATA`).

A pipeline that reads several inputs (``source=[rf.sources.Input("person", ..., key="id"),
rf.sources.Input("auction", ..., key="seller")]``) hands its operators tables of one *union
schema*: every input's columns (first occurrence gives the position, a name shared by two inputs
has one type; columns an input lacks are null in its rows), then :data:`SOURCE_COLUMN` naming
each row's input. The schema's metadata :data:`INPUTS_METADATA` lists each input's own columns
(:func:`input_columns`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayflow._internal.watermarks import check_event_time_column
from rayflow._internal.windowing import event_millis
from rayflow.errors import ConfigError, InputError, UnsupportedKeyTypeError
from rayflow.ops.base import WATERMARK_END, WATERMARK_NONE, Operator, filled_event_time
from rayflow.ops.window import WINDOW_END, WINDOW_START, _output_time, _time_from_json, _time_to_json
from rayflow.partitioning import check_key_type
from rayflow.sources.inputs import INPUTS_METADATA, SOURCE_COLUMN, input_columns

#: The kinds of join: see :class:`Join`.
HOWS = ("inner", "left", "semi")

#: Event times (ms) must lie within +-2**61 (73 million years either side of 1970), so that the
#: bounds derived from them and from the watermark fit in int64 (as ``rf.ops.Dedup``).
MAX_ABS_MS = 2**61

#: Internal columns: of the state snapshot (side, event time, matched flag) and of the tables
#: handed to Arrow's hash join (normalized keys, row numbers, window start). An input column
#: cannot have a name starting with this prefix.
_PREFIX = "_rayflow_join_"
_SIDE = _PREFIX + "side"
_TIME = _PREFIX + "time"
_MATCHED = _PREFIX + "matched"
_ROW_P = _PREFIX + "p"
_ROW_O = _PREFIX + "o"
_WIN = _PREFIX + "window"

#: Schema metadata of the state snapshot (JSON): the watermark, the late-row counter and the
#: layout (which columns each side emits, see :class:`_Layout`).
STATE_METADATA = b"rayflow.join"

#: The sides, as the snapshot's side column holds them.
_LEFT, _RIGHT = 0, 1

#: A segment whose rows are a slice of at most this fraction of the buffers it pins is copied
#: out of them (purges slice segments; this bounds the memory they hold to about twice the rows).
_MIN_LIVE_FRACTION = 0.5


def _key(i: int) -> str:
    return f"{_PREFIX}k{i}"


# ---------------------------------------------------------------------------------- inputs
def _plain(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def join_key_type(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The type two key columns are compared as (Arrow's hash join accepts it), or ``None``
    when they cannot be compared: the same type; integers of any widths (as int64); strings
    (``string``, ``large_string``, ``string_view``: as one of them) or binaries alike.
    Dictionaries compare as their values."""
    a, b = _plain(a), _plain(b)
    strings = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)
    binaries = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view)
    if any(f(a) for f in strings) and any(f(b) for f in strings):
        return a if a == b and not pa.types.is_string_view(a) else pa.large_string()
    if any(f(a) for f in binaries) and any(f(b) for f in binaries):
        return a if a == b and not pa.types.is_binary_view(a) else pa.large_binary()
    if a == b:
        return a
    if pa.types.is_integer(a) and pa.types.is_integer(b):
        return pa.int64()
    return None


def normalized_keys(table: pa.Table, columns: Sequence[str], types: Sequence[pa.DataType], who: str) -> list:
    """``table``'s key ``columns`` as ``types`` (see :func:`join_key_type`), dictionaries decoded."""
    out = []
    for name, t in zip(columns, types):
        col = table.column(name)
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        if col.type != t:
            try:
                col = col.cast(t)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise InputError(
                    f"{who}: key column {name!r} ({col.type}) cannot be compared as {t}: "
                    f"{str(e).splitlines()[0]}; cast it in an rf.ops.Map before"
                ) from None
        out.append(col)
    return out


def _on(on, who: str = "rf.ops.Join") -> tuple[list[str], list[str]]:
    """``on=`` as (left columns, right columns)."""
    if isinstance(on, str):
        pair = ([on], [on])
    elif isinstance(on, tuple) and len(on) == 2:
        pair = tuple(
            [x] if isinstance(x, str) else list(x) if isinstance(x, (list, tuple)) else None for x in on
        )
    elif isinstance(on, list):
        pair = (list(on), list(on))
    else:
        pair = None
    if (
        pair is None
        or None in pair
        or not pair[0]
        or len(pair[0]) != len(pair[1])
        or not all(isinstance(c, str) and c for c in pair[0] + pair[1])
    ):
        raise ConfigError(
            f"{who}: on= is a column name, a list of names (the same on both sides), or a pair "
            f"(left columns, right columns) of as many names each, e.g. on=('seller', 'id'); got {on!r}"
        )
    return pair


def _ms(seconds, what: str, *, positive: bool) -> int:
    """``seconds`` as a whole number of milliseconds (``positive``: > 0), else a ConfigError."""
    ok = isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and math.isfinite(seconds)
    ms = seconds * 1000 if ok else None
    if not ok or abs(ms - round(ms)) > 1e-6 or (positive and ms <= 0) or abs(ms) > MAX_ABS_MS // 2:
        need = "a positive number" if positive else "a number"
        raise ConfigError(
            f"rf.ops.Join: {what} must be {need} of seconds that is a whole number of milliseconds "
            f"(e.g. 10 or 0.25), got {seconds!r}"
        )
    return int(round(ms))


# ---------------------------------------------------------------------------------- state
@dataclass(frozen=True)
class _Segment:
    """Stored rows of one side, sorted by event time (immutable).

    ``table``: the columns the side keeps, then its normalized key columns
    (``_rayflow_join_k<i>``), with the side's fixed schema. ``t``: each row's
    event time (int64 ms, ascending). ``matched`` (left side of a left outer
    join): whether the row has met a right row. ``base``: the rows of the
    buffers ``table`` is a slice of (see :data:`_MIN_LIVE_FRACTION`).
    """

    table: pa.Table
    t: np.ndarray
    matched: np.ndarray | None
    base: int

    @property
    def num_rows(self) -> int:
        return int(self.t.shape[0])

    @classmethod
    def of(cls, table: pa.Table, t: np.ndarray, matched: np.ndarray | None) -> _Segment:
        """Rows sorted by ``t``, in buffers of their own (``take`` copies: rows kept must not
        pin their whole batch)."""
        order = np.argsort(t, kind="stable")
        table = table.take(pa.array(order))
        if table.num_columns and table.column(0).num_chunks > 1:
            table = table.combine_chunks()
        return cls(table, t[order], _take(matched, order), len(t))

    def slice(self, a: int, b: int, *, compact: bool = True) -> _Segment:
        """Rows ``a:b``; with ``compact``, copied out when they are a small part of the buffers
        they would pin (rows kept; rows on their way out are not worth a copy)."""
        if compact and b - a < self.base * _MIN_LIVE_FRACTION:
            idx = np.arange(a, b)
            return _Segment(
                self.table.take(pa.array(idx)), self.t[a:b].copy(), _take(self.matched, idx), b - a
            )
        matched = None if self.matched is None else self.matched[a:b]
        return _Segment(self.table.slice(a, b - a), self.t[a:b], matched, self.base)

    def filter(self, keep: np.ndarray) -> _Segment | None:
        n = int(np.count_nonzero(keep))
        if n == self.num_rows:
            return self
        if n == 0:
            return None
        return _Segment(self.table.filter(pa.array(keep)), self.t[keep], _take(self.matched, keep), n)

    def with_matched(self, rows: np.ndarray) -> _Segment:
        matched = self.matched.copy()
        matched[rows] = True
        return replace(self, matched=matched)

    def merged(self, other: _Segment) -> _Segment:
        """Both segments' rows as one, sorted by time (two sorted runs: one merge pass)."""
        table = pa.concat_tables([self.table, other.table])
        t = np.concatenate([self.t, other.t])
        matched = None if self.matched is None else np.concatenate([self.matched, other.matched])
        order = np.argsort(t, kind="stable")
        return _Segment(table.take(pa.array(order)).combine_chunks(), t[order], _take(matched, order), len(t))


def _take(a: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
    return None if a is None else a[idx]


def _appended(segments: tuple[_Segment, ...], seg: _Segment) -> tuple[_Segment, ...]:
    """``seg`` added to a side's segments: merged into the last one while that is at most twice
    as large, so a side holds O(log rows) segments and each row is merged O(log rows) times."""
    out = list(segments)
    while out and out[-1].num_rows <= 2 * seg.num_rows:
        seg = out.pop().merged(seg)
    return (*out, seg)


def _search(t: np.ndarray, value: int, side: str) -> int:
    """``np.searchsorted(t, value, side)`` for a Python int that may lie outside int64."""
    n = len(t)
    if n == 0:
        return 0
    first, last = int(t[0]), int(t[-1])
    if value < first or (value == first and side == "left"):
        return 0
    if value > last or (value == last and side == "right"):
        return n
    return int(np.searchsorted(t, value, side=side))


def _split_before(segments: tuple[_Segment, ...], cut: int) -> tuple[tuple[_Segment, ...], list[_Segment]]:
    """Each segment cut at ``cut``: the rows with ``t >= cut`` (kept) and those before (out)."""
    kept, out = [], []
    for seg in segments:
        k = _search(seg.t, cut, "left")
        if k == 0:
            kept.append(seg)
        elif k == seg.num_rows:
            out.append(seg)
        else:
            out.append(seg.slice(0, k, compact=False))
            kept.append(seg.slice(k, seg.num_rows))
    return tuple(kept), out


@dataclass(frozen=True)
class _Rows:
    """Stored rows of one side as one table (slices of segments), with their times, flags and
    where each came from (``seg``: its segment, ``row``: its row there)."""

    table: pa.Table
    t: np.ndarray
    matched: np.ndarray | None
    seg: np.ndarray
    row: np.ndarray

    @classmethod
    def of(cls, segments: Sequence[_Segment], ranges: Sequence[tuple[int, int, int]]) -> _Rows | None:
        """The rows ``a:b`` of segment ``i`` for each ``(i, a, b)``; ``None`` for none."""
        ranges = [(i, a, b) for i, a, b in ranges if b > a]
        if not ranges:
            return None
        tables = [segments[i].table.slice(a, b - a) for i, a, b in ranges]
        flags = None
        if segments[ranges[0][0]].matched is not None:
            flags = np.concatenate([segments[i].matched[a:b] for i, a, b in ranges])
        return cls(
            table=tables[0] if len(tables) == 1 else pa.concat_tables(tables),
            t=np.concatenate([segments[i].t[a:b] for i, a, b in ranges]),
            matched=flags,
            seg=np.concatenate([np.full(b - a, i, dtype=np.int64) for i, a, b in ranges]),
            row=np.concatenate([np.arange(a, b, dtype=np.int64) for i, a, b in ranges]),
        )


def _in_range(segments: tuple[_Segment, ...], lo: int, hi: int) -> _Rows | None:
    """The stored rows with ``lo <= t <= hi`` (two binary searches per segment)."""
    return _Rows.of(
        segments, [(i, _search(s.t, lo, "left"), _search(s.t, hi, "right")) for i, s in enumerate(segments)]
    )


def _all_rows(segments: Sequence[_Segment]) -> _Rows | None:
    return _Rows.of(segments, [(i, 0, s.num_rows) for i, s in enumerate(segments)])


@dataclass(frozen=True)
class _Layout:
    """What a join keeps and emits for one input schema (see :meth:`Join._layout`); held by the
    state once it has seen a batch, and snapshotted with it."""

    left_cols: tuple[str, ...]  # the left rows' output columns
    right_cols: tuple[str, ...]  # the right rows' output columns (input names)
    right_names: tuple[str, ...]  # their output names
    columns: pa.Schema  # the data columns of the stored rows (both sides) and of the snapshot
    time: pa.DataType  # of window_start / window_end
    left_store: pa.Schema  # a left segment's table: kept columns, then normalized keys
    right_store: pa.Schema
    output: pa.Schema

    def to_json(self) -> dict:
        return {
            "left_cols": list(self.left_cols),
            "right_cols": list(self.right_cols),
            "right_names": list(self.right_names),
            "time": _time_to_json(self.time),
        }


@dataclass(frozen=True)
class _State:
    """One partition's join state (immutable: each call returns a new one).

    ``left`` / ``right``: each side's stored rows as segments (see
    :func:`_appended`). ``watermark``: the last one :meth:`Join.on_watermark`
    saw (rows are late against it). ``layout``: the columns kept and emitted,
    once a batch was seen (a snapshot keeps it, so an empty state's snapshot
    has the same columns as any other).
    """

    left: tuple[_Segment, ...] = ()
    right: tuple[_Segment, ...] = ()
    watermark: int = WATERMARK_NONE
    late_rows: int = 0
    layout: _Layout | None = None

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.left) + sum(s.num_rows for s in self.right)


_INTERNAL = pa.schema(
    [pa.field(_SIDE, pa.int8()), pa.field(_TIME, pa.int64()), pa.field(_MATCHED, pa.bool_())]
)


# ---------------------------------------------------------------------------------- operator
class Join(Operator):
    """Joins the rows of two inputs of a pipeline by key, within a span of event time.

    ``left`` and ``right`` name the inputs (values of :data:`SOURCE_COLUMN`;
    the same name twice is a self-join). ``on`` is the key: a column, a list
    of columns with the same names on both sides, or a pair ``(left columns,
    right columns)``, e.g. ``on=("seller", "id")``. Each input must be
    partitioned by (a part of) its join key, so that matching rows meet in
    one partition (:meth:`check_partitioning`). Exactly one kind:

    - ``within_s=(lower, upper)`` (seconds): an **interval join** (Flink's):
      a left row ``L`` and a right row ``R`` match when their keys are equal
      and ``L.t + lower <= R.t <= L.t + upper`` (``lower <= upper``, either
      may be negative).
    - ``tumbling_s=size``: a **window join**: keys equal and both rows in the
      same tumbling window ``[k*size, (k+1)*size)`` of event time (the windows
      of ``rf.ops.Window``, aligned to epoch 0).

    ``how``:

    - ``"inner"``: each matching pair once.
    - ``"left"``: also each left row that matched nothing, once, with null
      right columns.
    - ``"semi"``: each left row that matched at least once, once (its
      columns only: ``right_columns`` does not apply).

    **Output**: a window join's ``window_start``, ``window_end`` (int64 ms for
    an int64 event time, else ``timestamp("ms", tz)``, as ``rf.ops.Window``),
    then the left row's columns, then the right row's. A side's columns are
    ``left_columns`` / ``right_columns`` if given, else its input's columns
    from the schema metadata (:func:`input_columns`), else every column but
    :data:`SOURCE_COLUMN` (the metadata is lost when an ``rf.ops.Map`` before
    the join drops it: name the columns then). A right column whose name is
    already taken gets the suffix ``_<right input>`` (``id`` → ``id_person``).
    Rows of inputs other than ``left`` and ``right`` are ignored.

    **When rows are emitted.** Interval join: a pair as soon as both rows have
    been processed (a new row is joined with the other side's stored rows, and
    with the new rows of the other side in its batch); a semi row at its first
    match; an unmatched left row (``"left"``) when the watermark passes its
    bound ``L.t + upper``. Window join: a window's rows when the watermark
    reaches its end, as ``rf.ops.Window`` closes windows. At the end of a
    bounded input (the chain advances the watermark to the end of time)
    everything pending is emitted.

    **State and lateness.** A row is kept until no row that is not late can
    match it: an interval join keeps a left row until the watermark passes
    ``L.t + upper``, a right row until it passes ``R.t - lower``; a window
    join keeps a window's rows until it closes. A row is *late* when it
    arrives with ``t`` below the watermark the operator last saw (interval
    join, as Flink's: rows it would match may be gone), or in a window already
    closed (window join): it is dropped, even by a left outer join, and
    counted in ``late_rows``. Rows within the pipeline's
    ``max_out_of_orderness_s`` are never late, and then the output equals
    SQL's join over all rows, whatever the batching. A row with a null key
    never matches (as in SQL; a left outer join still emits it); a null event
    time is an :class:`~rayflow.errors.InputError` (as ``rf.ops.Window``).

    **Guarantees.** Every emission happens in :meth:`process` or
    :meth:`on_watermark`, which return a state without it: a pair is found
    once, by whichever of its rows comes second; a semi row leaves the state
    when emitted; an unmatched left row or a window when the watermark passes
    it. The snapshot holds the stored rows, their flags and the watermark, so
    a restored state goes on exactly (advancing it to the committed watermark
    emits nothing). The input's columns must stay the same while a state
    lives (a resumed job with other columns is refused at its first batch).

    **Costs.** Vectorized, no Python per row. Each side's rows are held as
    Arrow tables in a few segments sorted by event time (a batch's rows are
    one segment, merged into the previous one while it is not more than
    twice as large). A batch's rows are joined with the other side's rows in
    the batch's time range (two binary searches per segment) by Arrow's hash
    join over the key columns and row numbers only (so any column type rides
    along), then filtered by time; purging and closing cut each segment at
    one binary search. Acero's output order is not deterministic: pairs are
    sorted by row before output.
    """

    stateful = True

    def __init__(
        self,
        left: str,
        right: str,
        *,
        on: str | Sequence[str] | tuple,
        within_s: tuple[float, float] | None = None,
        tumbling_s: float | None = None,
        how: str = "inner",
        event_time: str | None = None,
        left_columns: Sequence[str] | None = None,
        right_columns: Sequence[str] | None = None,
    ):
        for what, name in (("left", left), ("right", right)):
            if not isinstance(name, str) or not name:
                raise ConfigError(
                    f"rf.ops.Join: {what}= names an input of the pipeline (rf.sources.Input(name, ...)), "
                    f"got {name!r}"
                )
        self.left, self.right = left, right
        self.left_on, self.right_on = _on(on)
        if how not in HOWS:
            raise ConfigError(f"rf.ops.Join: how must be one of {HOWS}, got {how!r}")
        self.how = how
        if (within_s is None) == (tumbling_s is None):
            raise ConfigError(
                "rf.ops.Join needs exactly one of within_s=(lower_s, upper_s) (an interval join: "
                "right.t - left.t within [lower, upper]) or tumbling_s=size (a window join)"
            )
        if within_s is not None:
            if not (isinstance(within_s, (tuple, list)) and len(within_s) == 2):
                raise ConfigError(
                    "rf.ops.Join: within_s is (lower_s, upper_s): right.t - left.t must lie in "
                    f"[lower, upper], e.g. (0, 10) or (-5, 5); got {within_s!r}"
                )
            self.kind = "interval"
            self.lower_ms = _ms(within_s[0], "the lower bound of within_s", positive=False)
            self.upper_ms = _ms(within_s[1], "the upper bound of within_s", positive=False)
            if self.lower_ms > self.upper_ms:
                raise ConfigError(
                    f"rf.ops.Join: within_s={tuple(within_s)!r} has lower > upper, so no pair could "
                    "match; give (lower_s, upper_s) with lower <= upper"
                )
        else:
            self.kind = "window"
            self.size_ms = _ms(tumbling_s, "tumbling_s", positive=True)
        if event_time is not None and not isinstance(event_time, str):
            raise ConfigError(f"rf.ops.Join: event_time must be a column name, got {event_time!r}")
        self.event_time = event_time
        self.left_columns = self._columns_arg(left_columns, "left_columns")
        self.right_columns = self._columns_arg(right_columns, "right_columns")
        if how == "semi" and right_columns is not None:
            raise ConfigError(
                "rf.ops.Join: how='semi' emits the left rows only; drop right_columns= (or use how='inner')"
            )
        self._layouts: dict = {}

    @staticmethod
    def _columns_arg(cols, what: str) -> list[str] | None:
        if cols is None:
            return None
        cols = [cols] if isinstance(cols, str) else list(cols)
        if not all(isinstance(c, str) and c for c in cols) or len(set(cols)) != len(cols):
            raise ConfigError(f"rf.ops.Join: {what} must be a list of distinct column names, got {cols!r}")
        return cols

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_layouts"] = {}  # a cache: rebuilt where the operator runs
        return d

    # ------------------------------------------------------------------ description
    def __repr__(self) -> str:
        if self.left_on == self.right_on:
            on = repr(self.left_on[0] if len(self.left_on) == 1 else self.left_on)
        else:
            pair = [c[0] if len(c) == 1 else c for c in (self.left_on, self.right_on)]
            on = repr(tuple(pair))
        if self.kind == "interval":
            kind = f"within_s=({self.lower_ms / 1000:g}, {self.upper_ms / 1000:g})"
        else:
            kind = f"tumbling_s={self.size_ms / 1000:g}"
        ev = f", event_time={self.event_time!r}" if self.event_time is not None else ""
        return f"rf.ops.Join(left={self.left!r}, right={self.right!r}, on={on}, {kind}, how={self.how!r}{ev})"

    def spec(self) -> dict:
        kind = (
            {"kind": "interval", "lower_ms": self.lower_ms, "upper_ms": self.upper_ms}
            if self.kind == "interval"
            else {"kind": "window", "size_ms": self.size_ms}
        )
        return {
            "type": "Join",
            "left": self.left,
            "right": self.right,
            "on": [self.left_on, self.right_on],
            "join": kind,
            "how": self.how,
            "event_time": self.event_time,
            "left_columns": self.left_columns,
            "right_columns": self.right_columns,
        }

    @property
    def uses_event_time(self) -> bool:
        return True

    def with_event_time(self, column: str | None) -> Join:
        filled = filled_event_time(self, column)
        if filled is not self:
            filled._layouts = {}  # layouts are worked out per event-time column
        return filled

    def _event_column(self) -> str:
        if self.event_time is None:
            raise ConfigError(
                f"{self!r} has no event-time column: pass event_time= (or call with_event_time)"
            )
        return self.event_time

    @property
    def join_keys(self) -> dict[str, list[str]]:
        """The join key columns of each input (one entry for a self-join)."""
        return {self.left: list(self.left_on), self.right: list(self.right_on)}

    def check_partitioning(self, keys: Mapping[str, Sequence[str]]) -> None:
        """Refuse input keys (input name -> its partitioning key columns) that could send
        matching rows to different partitions: each input's key must be join key columns at
        the same positions on both sides (all of them, or some), e.g. auctions by ``seller``
        and persons by ``id`` for ``on=("seller", "id")``. (Integers of any width hash alike,
        and so do strings and large strings, see ``rayflow/partitioning.py``.)"""
        for name in (self.left, self.right):
            if name not in keys:
                raise ConfigError(
                    f"{self!r} joins input {name!r}, which the pipeline does not read; its inputs "
                    f"are {sorted(keys)}"
                )
        lk, rk = list(keys[self.left]), list(keys[self.right])
        pos_l = [self.left_on.index(c) if c in self.left_on else None for c in lk]
        pos_r = [self.right_on.index(c) if c in self.right_on else None for c in rk]
        if not lk or None in pos_l or None in pos_r or pos_l != pos_r:
            raise ConfigError(
                f"{self!r}: the inputs are partitioned by {self.left!r}: {lk} and {self.right!r}: "
                f"{rk}, so rows with equal join keys could land in different partitions and never "
                f"meet; give rf.sources.Input({self.left!r}, ..., key={self.left_on}) and "
                f"rf.sources.Input({self.right!r}, ..., key={self.right_on})"
            )

    # ------------------------------------------------------------------ layout
    def _layout(self, schema: pa.Schema) -> _Layout:
        """What the join keeps and emits for tables of ``schema`` (checked once per schema;
        raises :class:`InputError` saying what to change)."""
        key = (schema, (schema.metadata or {}).get(INPUTS_METADATA))
        found = self._layouts.get(key)
        if found is None:
            found = self._layouts[key] = self._make_layout(schema)
        return found

    def _make_layout(self, schema: pa.Schema) -> _Layout:
        me = repr(self)
        ev = self._event_column()
        names = schema.names
        if SOURCE_COLUMN not in names:
            raise InputError(
                f"{me} joins two inputs, but its input has no {SOURCE_COLUMN!r} column naming each "
                f"row's input: read them as rf.Pipeline(source=[rf.sources.Input({self.left!r}, ..., "
                f"key=...), rf.sources.Input({self.right!r}, ..., key=...)]) and keep that column in "
                "any rf.ops.Map before the join"
            )
        st = _plain(schema.field(SOURCE_COLUMN).type)
        if not (pa.types.is_string(st) or pa.types.is_large_string(st)):
            raise InputError(
                f"{me}: the column {SOURCE_COLUMN!r} must hold input names (strings), it is {st}"
            )
        clash = [c for c in names if c.startswith(_PREFIX)]
        if clash:
            raise InputError(
                f"{me}: columns {clash} use the prefix {_PREFIX!r} of the join's own; rename them"
            )
        inputs = input_columns(schema)
        if inputs is not None:
            for side in (self.left, self.right):
                if side not in inputs:
                    raise InputError(
                        f"{me} joins input {side!r}, but the pipeline's inputs are {sorted(inputs)}"
                    )
        everything = [c for c in names if c != SOURCE_COLUMN]

        def own(side: str) -> list[str]:
            return inputs[side] if inputs is not None else everything

        for side, keys in ((self.left, self.left_on), (self.right, self.right_on)):
            missing = [c for c in dict.fromkeys(keys + [ev]) if c not in own(side) or c not in names]
            if missing:
                raise InputError(
                    f"{me}: input {side!r} has no column(s) {missing} (its columns are {own(side)}); "
                    f"the join reads its key {keys} and the event time {ev!r} from it"
                )
        check_event_time_column(schema, ev, what=me)
        for lc, rc in zip(self.left_on, self.right_on):
            lt, rt = schema.field(lc).type, schema.field(rc).type
            for c, t in ((lc, lt), (rc, rt)):
                try:
                    check_key_type(c, t)
                except UnsupportedKeyTypeError as e:
                    raise UnsupportedKeyTypeError(
                        f"{me}: {e} Cast it in an rf.ops.Map before the join"
                    ) from None
            if join_key_type(lt, rt) is None:
                raise InputError(
                    f"{me}: key columns {lc!r} ({lt}) of {self.left!r} and {rc!r} ({rt}) of "
                    f"{self.right!r} cannot be compared; cast one to the other's type in an rf.ops.Map"
                )

        def columns_of(side: str, given: list[str] | None, what: str) -> list[str]:
            cols = given if given is not None else own(side)
            bad = [c for c in cols if c not in names or c == SOURCE_COLUMN]
            if bad:
                raise InputError(
                    f"{me}: {what} names column(s) {bad} that the input lacks; its columns are {everything}"
                )
            return list(cols)

        left_cols = columns_of(self.left, self.left_columns, "left_columns")
        right_cols = [] if self.how == "semi" else columns_of(self.right, self.right_columns, "right_columns")
        taken = [WINDOW_START, WINDOW_END] if self.kind == "window" else []
        bad = [c for c in left_cols if c in taken]
        if bad:
            raise InputError(
                f"{me}: input {self.left!r} has column(s) {bad}, which the window join adds itself; "
                "leave them out with left_columns= or rename them in an rf.ops.Map"
            )
        taken += left_cols
        right_names = []
        for c in right_cols:
            name = c if c not in taken else f"{c}_{self.right}"
            if name in taken:
                raise InputError(
                    f"{me}: the right column {c!r} would be named {name!r}, which the output already "
                    "has; leave one out with left_columns= / right_columns=, or rename it in an rf.ops.Map"
                )
            taken.append(name)
            right_names.append(name)
        kept = dict.fromkeys(left_cols + self.left_on + right_cols + self.right_on)
        columns = pa.schema([pa.field(c, schema.field(c).type) for c in kept])
        time = _output_time(schema.field(ev).type)
        return self._build_layout(left_cols, right_cols, right_names, columns, time)

    def _build_layout(self, left_cols, right_cols, right_names, columns: pa.Schema, time) -> _Layout:
        """The layout from its parts (also how a snapshot restores it)."""
        key_types = [
            join_key_type(columns.field(lc).type, columns.field(rc).type)
            for lc, rc in zip(self.left_on, self.right_on)
        ]
        keys = [pa.field(_key(i), t) for i, t in enumerate(key_types)]

        def store(cols: list[str], on: list[str]) -> pa.Schema:
            return pa.schema([columns.field(c) for c in dict.fromkeys(cols + on)] + keys)

        fields = [pa.field(WINDOW_START, time), pa.field(WINDOW_END, time)] if self.kind == "window" else []
        fields += [columns.field(c) for c in left_cols]
        fields += [columns.field(c).with_name(n) for c, n in zip(right_cols, right_names)]
        return _Layout(
            left_cols=tuple(left_cols),
            right_cols=tuple(right_cols),
            right_names=tuple(right_names),
            columns=columns,
            time=time,
            left_store=store(list(left_cols), self.left_on),
            right_store=store(list(right_cols), self.right_on),
            output=pa.schema(fields),
        )

    def check_input(self, schema: pa.Schema) -> pa.Schema:
        """The input must be a multi-input table holding both inputs, their key columns
        (comparable types, see :func:`join_key_type`) and the event-time column; returns the
        output schema (see the class doc)."""
        return self._layout(schema).output

    # ------------------------------------------------------------------ state
    def init_state(self) -> _State:
        return _State()

    def metrics(self, state: _State) -> dict[str, int]:
        """``state_rows`` (rows held, both sides), ``late_rows`` (counter, checkpointed) and, for a
        window join, ``open_windows`` (the distinct windows holding rows, over all keys)."""
        out = {"state_rows": state.num_rows, "late_rows": state.late_rows}
        if self.kind == "window":
            wins = [np.unique(s.t // self.size_ms) for s in state.left + state.right if s.num_rows]
            out["open_windows"] = int(np.unique(np.concatenate(wins)).shape[0]) if wins else 0
        return out

    def state_to_table(self, state: _State) -> pa.Table:
        """Both sides' stored rows as one table: the side (0 left, 1 right), the event time in
        ms and the matched flag (``_rayflow_join_*``), then the data columns both sides keep
        (null where a side lacks one); the watermark, the late-row counter and the layout in
        the schema metadata. Its columns are the same for every state once a batch was seen."""
        lay = state.layout
        schema = _INTERNAL if lay is None else pa.schema(list(_INTERNAL) + list(lay.columns))
        parts = []
        for side, segments in ((_LEFT, state.left), (_RIGHT, state.right)):
            for seg in segments:
                n = seg.num_rows
                arrays = [
                    pa.array(np.full(n, side, dtype=np.int8)),
                    pa.array(seg.t, pa.int64()),
                    pa.array(np.zeros(n, bool) if seg.matched is None else seg.matched),
                ]
                names = seg.table.column_names
                arrays += [
                    seg.table.column(f.name) if f.name in names else pa.nulls(n, f.type) for f in lay.columns
                ]
                parts.append(pa.Table.from_arrays(arrays, schema=schema))
        table = pa.concat_tables(parts) if parts else schema.empty_table()
        meta = {
            "watermark": state.watermark,
            "late_rows": state.late_rows,
            "layout": None if lay is None else lay.to_json(),
        }
        return table.replace_schema_metadata({STATE_METADATA: json.dumps(meta).encode()})

    def state_from_table(self, table: pa.Table) -> _State:
        raw = (table.schema.metadata or {}).get(STATE_METADATA)
        meta = json.loads(raw) if raw is not None else {}
        state = _State(
            watermark=int(meta.get("watermark", WATERMARK_NONE)), late_rows=int(meta.get("late_rows", 0))
        )
        saved = meta.get("layout")
        if saved is None:
            return state
        columns = pa.schema(
            [
                pa.field(f.name, f.type)
                for f in table.schema
                if f.name not in _INTERNAL.names and f.name != "_hash"
            ]
        )
        lay = self._build_layout(
            saved["left_cols"],
            saved["right_cols"],
            saved["right_names"],
            columns,
            _time_from_json(saved["time"]),
        )
        state = replace(state, layout=lay)
        if table.num_rows == 0:
            return state
        sides = np.asarray(table.column(_SIDE).to_numpy(), dtype=np.int8)
        segs = {}
        for side in (_LEFT, _RIGHT):
            mask = sides == side
            if not mask.any():
                continue
            rows = table.filter(pa.array(mask))
            t = np.asarray(rows.column(_TIME).to_numpy(), dtype=np.int64)
            matched = None
            if side == _LEFT and self.how == "left":
                matched = np.asarray(rows.column(_MATCHED).to_numpy(zero_copy_only=False), dtype=bool)
            segs[side] = (_Segment.of(self._stored(rows, lay, side), t, matched),)
        return replace(state, left=segs.get(_LEFT, ()), right=segs.get(_RIGHT, ()))

    def _stored(self, rows: pa.Table, lay: _Layout, side: int) -> pa.Table:
        """``rows``' kept columns, then their normalized keys: a segment's table."""
        schema = lay.left_store if side == _LEFT else lay.right_store
        on = self.left_on if side == _LEFT else self.right_on
        n_keys = len(on)
        arrays = [rows.column(f.name) for f in list(schema)[:-n_keys]]
        arrays += normalized_keys(rows, on, [f.type for f in list(schema)[-n_keys:]], repr(self))
        return pa.Table.from_arrays(arrays, schema=schema)

    # ------------------------------------------------------------------ data path
    def _late_below(self, watermark: int) -> int | None:
        """Rows with an event time below this are late (``None``: none is): below the watermark
        (interval join), or in a window that has closed (window join)."""
        if watermark == WATERMARK_NONE:
            return None
        if self.kind == "interval" or watermark == WATERMARK_END:
            return watermark
        return watermark // self.size_ms * self.size_ms  # a window [s, s + size) closed iff s + size <= wm

    def _side_rows(
        self, state: _State, table: pa.Table, lay: _Layout, side: int
    ) -> tuple[_Segment | None, int]:
        """The batch's rows of one side as a new segment, and the number of late rows dropped;
        rows with a null key are dropped too, unless a left outer join must emit them."""
        name = self.left if side == _LEFT else self.right
        src = table.column(SOURCE_COLUMN)
        if pa.types.is_dictionary(src.type):
            src = src.cast(src.type.value_type)
        rows = table.filter(pc.fill_null(pc.equal(src, pa.scalar(name, src.type)), False))
        if rows.num_rows == 0:
            return None, 0
        ev = self._event_column()
        t = event_millis(rows.column(ev), ev, repr(self))
        if max(-int(t.min()), int(t.max())) > MAX_ABS_MS:
            raise InputError(
                f"{self!r}: event-time column {ev!r} has values more than 2**61 ms (73 million years) "
                "away from 1970; give it event times in milliseconds (or a timestamp type)"
            )
        keep = np.ones(rows.num_rows, dtype=bool)
        below = self._late_below(state.watermark)
        if below is not None:
            keep &= t >= below
        late = int(rows.num_rows - np.count_nonzero(keep))
        if side == _RIGHT or self.how != "left":  # a null key never matches: nothing to keep it for
            for c in self.left_on if side == _LEFT else self.right_on:
                col = rows.column(c)
                if col.null_count:
                    keep &= np.asarray(pc.is_valid(col).to_numpy(zero_copy_only=False), dtype=bool)
        if not keep.all():
            if not keep.any():
                return None, late
            rows, t = rows.filter(pa.array(keep)), t[keep]
        matched = np.zeros(rows.num_rows, dtype=bool) if side == _LEFT and self.how == "left" else None
        return _Segment.of(self._stored(rows, lay, side), t, matched), late

    def process(self, state: _State, table: pa.Table) -> tuple[_State, pa.Table | None]:
        """Join one batch's rows of both inputs with the stored rows of the other side (interval
        join) or keep them in their windows (window join); emits the pairs found."""
        if table.num_rows == 0:
            return state, None
        lay = self._layout(table.schema)
        if state.layout is None:
            state = replace(state, layout=lay)
        elif state.layout != lay:
            raise InputError(
                f"{self!r}: the input's columns changed while the join holds rows of the old ones "
                f"(it kept {state.layout.columns.names}, the batch gives {lay.columns.names}); run the "
                "changed job under a new name, or keep the input's columns as they were"
            )
        new_l, late_l = self._side_rows(state, table, lay, _LEFT)
        new_r, late_r = self._side_rows(state, table, lay, _RIGHT)
        if late_l or late_r:
            state = replace(state, late_rows=state.late_rows + late_l + late_r)
        left, right, outs = state.left, state.right, []
        if self.kind == "interval" and new_l is not None:
            new_l, out = self._probe_left(lay, new_l, right)
            outs.append(out)
        if new_l is not None:
            left = _appended(left, new_l)
        if self.kind == "interval" and new_r is not None:
            left, out = self._probe_right(lay, new_r, left)
            outs.append(out)
        if new_r is not None:
            right = _appended(right, new_r)
        return replace(state, left=left, right=right), _concat(outs)

    def _probe_left(
        self, lay: _Layout, new: _Segment, right: tuple[_Segment, ...]
    ) -> tuple[_Segment | None, pa.Table | None]:
        """New left rows against the stored right rows: the new segment to keep (flags set; a
        semi join keeps only the rows that did not match) and the output."""
        cand = _in_range(right, int(new.t[0]) + self.lower_ms, int(new.t[-1]) + self.upper_ms)
        if cand is None:
            return new, None
        li, rj = self._match(new.table, new.t, cand.table, cand.t, left_probes=True)
        if not len(li):
            return new, None
        if self.how == "semi":
            hit = np.zeros(new.num_rows, dtype=bool)
            hit[li] = True
            return new.filter(~hit), self._left_rows(lay, new.table, np.flatnonzero(hit))
        if self.how == "left":
            new = new.with_matched(li)
        return new, self._pairs(lay, new.table, li, cand.table, rj)

    def _probe_right(
        self, lay: _Layout, new: _Segment, left: tuple[_Segment, ...]
    ) -> tuple[tuple[_Segment, ...], pa.Table | None]:
        """New right rows against the stored left rows (the batch's new ones included): the left
        segments (flags set; a semi join takes the rows that matched out) and the output."""
        cand = _in_range(left, int(new.t[0]) - self.upper_ms, int(new.t[-1]) - self.lower_ms)
        if cand is None:
            return left, None
        rj, li = self._match(new.table, new.t, cand.table, cand.t, left_probes=False)
        if not len(li):
            return left, None
        if self.how == "inner":
            order = np.lexsort((rj, li))
            return left, self._pairs(lay, cand.table, li[order], new.table, rj[order])
        hit = np.unique(li)
        if self.how == "semi":
            out = self._left_rows(lay, cand.table, hit)
        else:
            order = np.lexsort((rj, li))
            out = self._pairs(lay, cand.table, li[order], new.table, rj[order])
        segments = list(left)
        for s in np.unique(cand.seg[hit]):
            rows = cand.row[hit[cand.seg[hit] == s]]
            if self.how == "semi":
                keep = np.ones(segments[s].num_rows, dtype=bool)
                keep[rows] = False
                segments[s] = segments[s].filter(keep)
            else:
                segments[s] = segments[s].with_matched(rows)
        return tuple(s for s in segments if s is not None), out

    def _match(
        self, probe: pa.Table, probe_t: np.ndarray, other: pa.Table, other_t: np.ndarray, *, left_probes: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Row pairs (probe row, other row) with equal keys and ``lower <= R.t - L.t <= upper``,
        sorted by probe row, then other row."""
        pi, oj = _hash_join(probe, other, len(self.left_on))
        d = other_t[oj] - probe_t[pi] if left_probes else probe_t[pi] - other_t[oj]
        ok = (d >= self.lower_ms) & (d <= self.upper_ms)
        pi, oj = pi[ok], oj[ok]
        order = np.lexsort((oj, pi))
        return pi[order], oj[order]

    # ------------------------------------------------------------------ output
    def _window_columns(self, lay: _Layout, t: np.ndarray | None) -> list[pa.Array]:
        if self.kind != "window":
            return []
        start = t // self.size_ms * self.size_ms
        return [
            pa.array(start, pa.int64()).cast(lay.time),
            pa.array(start + self.size_ms, pa.int64()).cast(lay.time),
        ]

    def _pairs(
        self,
        lay: _Layout,
        lt: pa.Table,
        li: np.ndarray,
        rt: pa.Table,
        rj: np.ndarray,
        t: np.ndarray | None = None,
    ) -> pa.Table:
        """Output rows of pairs: the left rows ``li`` of ``lt`` with the right rows ``rj`` of
        ``rt`` (``t``: the left rows' event times, for a window join's bounds)."""
        left = lt.select(list(lay.left_cols)).take(pa.array(li))
        right = rt.select(list(lay.right_cols)).take(pa.array(rj))
        arrays = self._window_columns(lay, t) + list(left.columns) + list(right.columns)
        return pa.Table.from_arrays(arrays, schema=lay.output)

    def _left_rows(self, lay: _Layout, lt: pa.Table, li: np.ndarray, t: np.ndarray | None = None) -> pa.Table:
        """Output rows of left rows alone: a semi join's, or unmatched ones (null right columns)."""
        left = lt.select(list(lay.left_cols)).take(pa.array(li))
        nulls = [pa.nulls(len(li), lay.output.field(c).type) for c in lay.right_names]
        arrays = self._window_columns(lay, t) + list(left.columns) + nulls
        return pa.Table.from_arrays(arrays, schema=lay.output)

    # ------------------------------------------------------------------ watermark
    def on_watermark(
        self, state: _State, watermark_ms: int, *, version: int
    ) -> tuple[_State, pa.Table | None]:
        """Interval join: drop the rows that no row that is not late can match any more (a left
        outer join emits those that never matched). Window join: emit the windows the watermark
        closes and drop their rows. At :data:`WATERMARK_END`: everything. O(segments) when
        nothing is due."""
        watermark = max(int(watermark_ms), state.watermark)
        if watermark == state.watermark:
            return state, None
        state = replace(state, watermark=watermark)
        if self.kind == "window":
            return self._close(state)
        end = watermark == WATERMARK_END
        # A left row is kept while wm <= L.t + upper, a right row while wm <= R.t - lower.
        left, gone = _split_before(state.left, WATERMARK_END if end else watermark - self.upper_ms)
        right, _ = _split_before(state.right, WATERMARK_END if end else watermark + self.lower_ms)
        state = replace(state, left=left, right=right)
        rows = _all_rows(gone) if self.how == "left" else None
        if rows is None:
            return state, None
        unmatched = np.flatnonzero(~rows.matched)
        return state, (self._left_rows(state.layout, rows.table, unmatched) if len(unmatched) else None)

    def _close(self, state: _State) -> tuple[_State, pa.Table | None]:
        """Window join: the windows ending at or before the watermark, joined and emitted."""
        cut = self._late_below(state.watermark)
        left, gone_l = _split_before(state.left, cut)
        right, gone_r = _split_before(state.right, cut)
        state = replace(state, left=left, right=right)
        lrows, rrows = _all_rows(gone_l), _all_rows(gone_r)
        if lrows is None:
            return state, None
        lay, lt, ltime = state.layout, lrows.table, lrows.t
        li = rj = np.zeros(0, dtype=np.int64)
        if rrows is not None:
            probe = lt.append_column(_WIN, pa.array(ltime // self.size_ms, pa.int64()))
            other = rrows.table.append_column(_WIN, pa.array(rrows.t // self.size_ms, pa.int64()))
            li, rj = _hash_join(probe, other, len(self.left_on), extra=[_WIN])
            order = np.lexsort((rj, li))
            li, rj = li[order], rj[order]
        outs = []
        if self.how == "semi":
            hit = np.unique(li)
            outs.append(self._left_rows(lay, lt, hit, ltime[hit]))
        else:
            if len(li):
                outs.append(self._pairs(lay, lt, li, rrows.table, rj, ltime[li]))
            if self.how == "left":
                unmatched = np.ones(lt.num_rows, dtype=bool)
                unmatched[li] = False
                idx = np.flatnonzero(unmatched)
                outs.append(self._left_rows(lay, lt, idx, ltime[idx]))
        return state, _concat(outs)


def _hash_join(
    probe: pa.Table, other: pa.Table, num_keys: int, extra: Sequence[str] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers ``(probe row, other row)`` of the pairs whose normalized keys (and ``extra``
    columns) are equal, unordered: Arrow's hash join over the keys and row numbers only (the
    other columns' types do not matter to it); a null key never matches."""
    keys = [_key(i) for i in range(num_keys)] + list(extra)
    p = probe.select(keys).append_column(_ROW_P, pa.array(np.arange(probe.num_rows, dtype=np.int64)))
    o = other.select(keys).append_column(_ROW_O, pa.array(np.arange(other.num_rows, dtype=np.int64)))
    j = p.join(o, keys=keys, join_type="inner", use_threads=False)
    return (
        np.asarray(j.column(_ROW_P).to_numpy(), dtype=np.int64),
        np.asarray(j.column(_ROW_O).to_numpy(), dtype=np.int64),
    )


def _concat(outs: list[pa.Table | None]) -> pa.Table | None:
    outs = [o for o in outs if o is not None and o.num_rows]
    if not outs:
        return None
    return outs[0] if len(outs) == 1 else pa.concat_tables(outs)
