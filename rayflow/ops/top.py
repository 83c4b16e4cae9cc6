"""``rf.ops.Top``: the rows with the largest value of each event-time window (ties kept), emitted
as the watermark closes the window (DESIGN §11, §12)."""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayflow._internal.watermarks import check_event_time_column
from rayflow._internal.windowing import (
    event_millis,
    fixed_repr,
    fixed_sizes,
    fixed_windows,
    floor_div,
    key_codes,
)
from rayflow.errors import ConfigError, InputError
from rayflow.ops.base import WATERMARK_NONE, Operator, filled_event_time
from rayflow.ops.window import WINDOW_END, WINDOW_START, _output_time

#: Internal column: the group code of a row while the maximum of its group is found.
_GROUP = "_rayflow_top_group"

#: ``_State.due`` when nothing is open: no watermark reaches it.
_NEVER = 2**63

#: Schema metadata of a snapshot: the operator's watermark and late-row counter.
_META_WATERMARK = b"rayflow.top.watermark"
_META_LATE_ROWS = b"rayflow.top.late_rows"
#: ... and the held rows' Arrow schema (IPC, base64): Parquet does not keep every type as it is
#: (``timestamp("s")`` comes back as ``"ms"``), and the rows must come out as they went in.
_META_SCHEMA = b"rayflow.top.schema"


def _orderable(t: pa.DataType) -> bool:
    """Whether ``t`` is a type whose maximum Top finds: numbers and points in time (pyarrow's
    grouped ``max`` has no kernel for half floats and durations)."""
    return (
        pa.types.is_integer(t)
        or (pa.types.is_floating(t) and not pa.types.is_float16(t))
        or pa.types.is_decimal(t)
        or pa.types.is_timestamp(t)
        or pa.types.is_date(t)
        or pa.types.is_time(t)
    )


def _is_time(t: pa.DataType) -> bool:
    return pa.types.is_int64(t) or pa.types.is_timestamp(t)


@dataclass(frozen=True)
class _Store:
    """The rows held for the windows ending at one instant (immutable).

    ``merged``: the result of the last reduction of these windows (their top
    rows as of then; after a restore, the snapshot's rows, possibly not
    reduced). ``pending``: tables of rows added since, each the top rows of
    one batch alone, not yet reduced against ``merged``. Invariant: every row
    held is a real (row, window) pair of the input, and every row of a window
    whose value is the window's maximum so far is held. So the top rows of
    the window are the top rows of what is held, whatever was reduced.
    """

    merged: pa.Table
    pending: tuple[pa.Table, ...] = ()
    pending_rows: int = 0

    @property
    def tables(self) -> list[pa.Table]:
        return [self.merged, *self.pending]

    @property
    def num_rows(self) -> int:
        return self.merged.num_rows + self.pending_rows


@dataclass(frozen=True)
class _State:
    """One partition's Top state (immutable: each call returns a new one).

    ``stores``: window end (int64 ms) -> :class:`_Store`. ``watermark``: the
    last one :meth:`Top.on_watermark` saw (rows are late against it).
    ``due``: the lowest watermark at which ``on_watermark`` has something to
    emit, so an advance before it costs O(1).
    """

    stores: dict
    watermark: int = WATERMARK_NONE
    late_rows: int = 0
    due: int = _NEVER


class Top(Operator):
    """The rows with the largest ``value`` of each event-time window (and ``by`` group), ties kept.

    ``value`` names the column to maximize: an integer, float (32 or 64
    bits), decimal, timestamp, date or time column. ``by`` is
    a column or list of columns: the top rows are found per window *and*
    group (``()``: per window only; nulls in ``by`` form a group, as in SQL).
    Exactly one way to give the windows:

    - ``tumbling_s=size``: windows ``[k*size, (k+1)*size)`` of the event-time
      column, aligned to epoch 0, as ``rf.ops.Window`` assigns them.
    - ``hopping_s=(size, slide)``: windows ``[k*slide, k*slide + size)``; a row
      is in each of them that contains it (``slide <= size``).
    - ``window=(start_column, end_column)``: the rows already carry their
      window (the output of an upstream ``rf.ops.Window`` or ``Top``: int64 ms or
      Arrow timestamps); rows with equal start and end are one window. The
      event-time column is not read (``event_time=`` is refused), but the
      pipeline still needs one: its watermark closes the windows.

    ``event_time`` (tumbling and hopping) names the event-time column (int64
    milliseconds or an Arrow timestamp of any unit and time zone); ``None``
    takes the pipeline's. A null event time (``window=``: a null window
    bound) is refused with an :class:`InputError`, as by ``rf.ops.Window``.

    **Output.** When a window closes, every row of it (and of its group)
    whose ``value`` equals the maximum, each once, with all its input
    columns (``_source`` of a multi-input pipeline included: drop it in an
    ``rf.ops.Map`` after if unwanted) and, for tumbling and hopping windows,
    ``window_start`` and ``window_end`` in front (int64 ms for an int64 event
    time, else ``timestamp("ms", tz)`` of the input's time zone, exactly as
    ``rf.ops.Window``); with ``window=`` the rows keep their columns as they
    came. A hopping row may be emitted once per window it tops. Schema
    metadata of the input is not carried over. Null values never win: a
    window (or group) whose values are all null emits nothing; NaN never wins
    either (pyarrow's ``max`` skips it), so neither does an all-NaN window.
    Rows come out in no particular order.

    **Closing.** A window ``[start, end)`` closes when the partition's
    watermark reaches ``end``: it is emitted, once, and its state dropped.
    At the end of a bounded input the watermark reaches the end of time and
    every window closes. A row whose window is already closed (its end is at
    or below the watermark the operator last saw) is late: dropped and
    counted in ``late_rows`` (:meth:`metrics`, checkpointed), once per window
    missed for a hopping row. There is no allowed lateness, side output or
    update of an emitted window (as ``rf.ops.Window``'s ``late="drop"``).

    **Partitions and stages.** The rows are grouped by window (and ``by``),
    not by the pipeline's key, so :attr:`group_columns` is ``None``: any key
    is accepted. What a partition emits is then the top of *that partition's*
    rows of the window. It is the final answer when every group lies in one
    partition: the pipeline's key columns are among the ``by`` columns (with
    ``window=``: among the window and ``by`` columns). Otherwise it is a
    candidate set that a next stage keyed by the window reduces with
    ``Top(window=...)``: the maximum of the partitions' maxima is the
    window's maximum, and a row equal to it
    equals its own partition's maximum too, so it is among that partition's
    candidates; the next stage keeps exactly those. Nexmark q7 runs so:
    stage 1 keyed by auction, ``Top(value="price", tumbling_s=10)``; stage 2
    keyed by ``window_start``, ``Top(value="price", window=("window_start",
    "window_end"))``. Stage 2's watermark must trail its event time by enough
    that the last partition's candidates of a window arrive before it closes,
    else they are late there.

    **Guarantees.** Each window is emitted exactly once across commits,
    failures and restores: :meth:`process` emits nothing, :meth:`on_watermark`
    emits the windows the watermark closes and returns a state without them,
    and the snapshot carries the operator's watermark, so advancing a
    restored state to the committed watermark emits nothing. Rows within the
    out-of-orderness bound are never late, and then the output equals SQL's
    ``QUALIFY value = max(value) OVER (PARTITION BY window, by)`` over all
    rows.

    **Costs and state.** Vectorized, no per-row Python: a batch's rows are
    assigned to windows with numpy (hopping: first reduced to the top rows
    of each pane, the ``gcd(size, slide)`` spans windows are made of, so only
    those are copied into their several windows), then reduced, with the rows
    held for the windows it touches, by one ``group_by`` max per window and
    group and a filter on ``value == max``. The state holds, per open window
    and group, the rows equal to its running maximum. To keep a batch's cost
    O(its rows) when a window holds many groups, a window's held rows are
    reduced again only once the rows added since reach their number (until
    then a batch's top rows are kept beside them): at most about twice the
    candidates are held. With ``by=()`` that is every batch. Ties are all
    held, so a window whose rows all share one value holds all of them.
    """

    stateful = True

    def __init__(
        self,
        value: str,
        by: str | Sequence[str] = (),
        *,
        tumbling_s: float | None = None,
        hopping_s: tuple[float, float] | None = None,
        window: tuple[str, str] | None = None,
        event_time: str | None = None,
    ):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"rf.ops.Top needs value=, the name of the column to maximize, got {value!r}")
        self.value = value
        self.by = [by] if isinstance(by, str) else list(by) if isinstance(by, (list, tuple)) else None
        if self.by is None or not all(isinstance(c, str) and c for c in self.by):
            raise ConfigError(f"rf.ops.Top: by= is a column name or a list of them (or ()), got {by!r}")
        if len(set(self.by)) != len(self.by):
            raise ConfigError(f"rf.ops.Top: by={self.by} names a column twice")
        if event_time is not None and not isinstance(event_time, str):
            raise ConfigError(f"rf.ops.Top: event_time must be a column name, got {event_time!r}")
        self.event_time = event_time
        kinds = {"tumbling_s": tumbling_s, "hopping_s": hopping_s, "window": window}
        given = [k for k, v in kinds.items() if v is not None]
        if len(given) != 1:
            raise ConfigError(
                "rf.ops.Top needs exactly one way to give the windows: tumbling_s=size, "
                "hopping_s=(size, slide) (seconds of event time), or window=(start_column, "
                f"end_column) when the rows already carry their window; got {given or 'none'}"
            )
        self.kind = given[0].removesuffix("_s")
        self.size_ms = self.slide_ms = 0
        if tumbling_s is not None or hopping_s is not None:
            self.size_ms, self.slide_ms = fixed_sizes("rf.ops.Top", tumbling_s, hopping_s)
        else:
            if not (
                isinstance(window, (tuple, list))
                and len(window) == 2
                and all(isinstance(c, str) and c for c in window)
                and window[0] != window[1]
            ):
                raise ConfigError(
                    "rf.ops.Top: window= is (start_column, end_column), two distinct column names "
                    f"(e.g. ('window_start', 'window_end')), got {window!r}"
                )
            if event_time is not None:
                raise ConfigError(
                    f"rf.ops.Top: event_time={event_time!r} is not used with window=: the rows carry "
                    "their window, which closes when the watermark passes its end; drop event_time="
                )
        #: The window columns of the output (and, with ``window=``, of the input).
        self.window = (WINDOW_START, WINDOW_END) if window is None else (window[0], window[1])
        clash = sorted(set(self.window) & set(self.by))
        if clash:
            raise ConfigError(
                f"rf.ops.Top: by={self.by} names the window column(s) {clash}; rows are always "
                "grouped by their window: leave them out of by="
            )
        if _GROUP in self.by or value == _GROUP:
            raise ConfigError(f"rf.ops.Top: the column name {_GROUP!r} is reserved; rename it in a Map")

    # ------------------------------------------------------------------ description
    def _window_spec(self) -> dict:
        if self.kind == "tumbling":
            return {"kind": "tumbling", "size_ms": self.size_ms}
        if self.kind == "hopping":
            return {"kind": "hopping", "size_ms": self.size_ms, "slide_ms": self.slide_ms}
        return {"kind": "given", "columns": list(self.window)}

    def spec(self) -> dict:
        return {
            "type": "Top",
            "value": self.value,
            "by": self.by,
            "window": self._window_spec(),
            "event_time": self.event_time,
        }

    def __repr__(self) -> str:
        kind = fixed_repr(self.kind, self.size_ms, self.slide_ms)
        if kind is None:
            return f"rf.ops.Top(value={self.value!r}, by={self.by}, window={self.window!r})"
        return f"rf.ops.Top(value={self.value!r}, by={self.by}, event_time={self.event_time!r}, {kind})"

    @property
    def uses_event_time(self) -> bool:
        return True  # with window= too: the partition's watermark closes the windows

    def with_event_time(self, column: str | None) -> Top:
        if self.kind == "window":  # the rows carry their windows: no column to read
            return self
        return filled_event_time(self, column)

    @property
    def group_columns(self) -> list[str] | None:
        """``None``: windows span partitions, and a partition's top rows are candidates that a
        next stage may reduce (see the class doc, *Partitions and stages*)."""
        return None

    def check_input(self, schema: pa.Schema) -> pa.Schema:
        """The columns must be there with types Top can use; returns the output schema."""
        self._check_columns(schema)
        if self.kind == "window":
            return pa.schema(list(schema))
        time = _output_time(schema.field(self.event_time).type)
        return pa.schema([pa.field(WINDOW_START, time), pa.field(WINDOW_END, time), *schema])

    def _check_columns(self, schema: pa.Schema) -> None:
        """Raise :class:`InputError` (or :class:`ConfigError`: no event time) for an input Top
        cannot process, saying what to do. Cheap: :meth:`process` calls it for every batch."""
        if self.kind != "window" and self.event_time is None:
            self.with_event_time(None)  # raises: no event-time column
        needed = [self.value, *self.by] + (list(self.window) if self.kind == "window" else [])
        missing = list(dict.fromkeys(c for c in needed if c not in schema.names))
        if missing:
            raise InputError(
                f"{self!r} uses column(s) {missing} that the input does not have; its columns are "
                f"{schema.names}"
                + (
                    " (window= names the columns of the window each row carries, e.g. the output of "
                    "an rf.ops.Window)"
                    if set(missing) & set(self.window)
                    else ""
                )
            )
        t = schema.field(self.value).type
        if not _orderable(t):
            raise InputError(
                f"{self!r}: the value column {self.value!r} has type {t}; Top maximizes integers, "
                "floats (32 or 64 bits), decimals, timestamps, dates or times: cast it in an "
                "rf.ops.Map before (with output_schema=)"
            )
        if self.kind == "window":
            for c in self.window:
                ct = schema.field(c).type
                if not _is_time(ct):
                    raise InputError(
                        f"{self!r}: the window column {c!r} has type {ct}; window bounds are int64 "
                        "milliseconds or Arrow timestamps, as rf.ops.Window emits them: cast it in "
                        "an rf.ops.Map before (with output_schema=)"
                    )
            return
        check_event_time_column(schema, self.event_time, what=repr(self))
        clash = [c for c in (WINDOW_START, WINDOW_END, _GROUP) if c in schema.names]
        if clash:
            raise InputError(
                f"{self!r} adds the columns {list(self.window)}, but the input already has {clash}: "
                "if the rows carry their window already (the output of an rf.ops.Window or Top), use "
                f"Top(value={self.value!r}, window=({WINDOW_START!r}, {WINDOW_END!r})); else rename "
                "them in an rf.ops.Map before"
            )

    # ------------------------------------------------------------------ state
    def init_state(self) -> _State:
        return _State(stores={})

    def metrics(self, state: _State) -> dict[str, int]:
        """``late_rows`` (counter, checkpointed), ``open_windows`` (the distinct window ends
        held: with ``window=``, windows sharing an end count once) and ``state_rows`` (rows
        held: the candidates, a hopping row once per window holding it, plus batches' top
        rows not reduced against them yet)."""
        rows = sum(s.num_rows for s in state.stores.values())
        return {"late_rows": state.late_rows, "open_windows": len(state.stores), "state_rows": rows}

    def state_to_table(self, state: _State) -> pa.Table:
        """The rows held, in the output's form (window columns and input columns), with the
        watermark and the late-row counter in the schema metadata (Parquet keeps it). Nothing is
        reduced: the rows are copied as they are held, and :meth:`state_from_table` gives back
        a state holding the same rows. An empty state is a table of no rows with the window
        columns (type null). The rows' schema is kept in the metadata too, so that they come
        back with their exact types."""
        tables = [t for s in state.stores.values() for t in s.tables]
        if not tables:
            table = pa.table({c: pa.array([], pa.null()) for c in self.window})
        elif len(tables) == 1:
            table = tables[0]
        else:
            table = pa.concat_tables(tables, promote_options="permissive")
        meta = {
            _META_WATERMARK: str(state.watermark).encode(),
            _META_LATE_ROWS: str(state.late_rows).encode(),
        }
        if tables:
            meta[_META_SCHEMA] = base64.b64encode(table.schema.serialize().to_pybytes())
        return table.replace_schema_metadata(meta)

    def state_from_table(self, table: pa.Table) -> _State:
        meta = table.schema.metadata or {}
        watermark = int(meta.get(_META_WATERMARK, WATERMARK_NONE))
        late_rows = int(meta.get(_META_LATE_ROWS, 0))
        state = _State(stores={}, watermark=watermark, late_rows=late_rows)
        if table.num_rows == 0:
            return state
        if _META_SCHEMA in meta:
            schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(meta[_META_SCHEMA])))
            table = table.select(schema.names).cast(schema)
        table = table.replace_schema_metadata(None)
        ends = event_millis(table.column(self.window[1]), self.window[1], repr(self))
        stores = {end: _Store(merged=t) for end, t in _split(table, ends)}
        return replace(state, stores=stores, due=min(stores))

    # ------------------------------------------------------------------ process
    def process(self, state: _State, table: pa.Table) -> tuple[_State, None]:
        """Add one batch's rows to the candidates of their windows; emits nothing."""
        if table.num_rows == 0:
            return state, None
        self._check_columns(table.schema)
        table = table.replace_schema_metadata(None)
        if self.kind == "window":
            pairs, ends, late = self._given(state, table)
        elif self.slide_ms == self.size_ms:
            pairs, ends, late = self._tumbling(state, table)
        else:
            pairs, ends, late = self._hopping(state, table)
        if late:
            state = replace(state, late_rows=state.late_rows + late)
        if pairs.num_rows == 0:
            return state, None
        stores = self._add(state.stores, pairs, ends)
        return replace(state, stores=stores, due=min(state.due, int(ends.min()))), None

    def _tumbling(self, state: _State, table: pa.Table) -> tuple[pa.Table, np.ndarray, int]:
        """The batch's (row, window) pairs that are not late, with window columns, their window
        ends (ms) and the number of late pairs."""
        col = table.column(self.event_time)
        ts = event_millis(col, self.event_time, repr(self))
        ends = floor_div(ts, self.size_ms) * self.size_ms + self.size_ms
        late = 0
        if ends.min() <= state.watermark:
            live = ends > state.watermark
            late = len(ends) - int(live.sum())
            table, ends = table.filter(pa.array(live)), ends[live]
        return self._with_window(table, ends, _output_time(col.type)), ends, late

    def _hopping(self, state: _State, table: pa.Table) -> tuple[pa.Table, np.ndarray, int]:
        """As :meth:`_tumbling`; the rows are first reduced to the top rows of each pane (spans of
        ``gcd(size, slide)``: every window is a union of whole panes, so a row of a pane is in the
        same windows as the pane's start), and only those are copied into their windows."""
        col = table.column(self.event_time)
        ts = event_millis(col, self.event_time, repr(self))
        size, slide = self.size_ms, self.slide_ms
        late = 0
        if state.watermark != WATERMARK_NONE:
            # Window k ([k*slide, k*slide + size)) is closed when k <= last_closed; a row is in
            # windows first..last.
            last_closed = (state.watermark - size) // slide
            last = floor_div(ts, slide)
            if int(last.min()) <= last_closed:
                first = floor_div(ts - size, slide) + 1
                late = int(np.clip(np.minimum(last, last_closed) - first + 1, 0, None).sum())
                live = last > last_closed
                if not live.all():
                    table, ts = table.filter(pa.array(live)), ts[live]
                if len(ts) == 0:
                    return table, ts, late
        pane = math.gcd(size, slide)
        panes = floor_div(ts, pane) * pane
        keep = self._top_mask(table, panes, self.by)
        table, panes = table.filter(pa.array(keep)), panes[keep]
        if len(panes) == 0:  # every value null
            return table, panes, late
        rows, starts = fixed_windows(panes, size, slide)
        ends = starts + size
        if ends.min() <= state.watermark:  # a pane's first windows may be closed already
            live = ends > state.watermark
            rows, ends = rows[live], ends[live]
        return self._with_window(table.take(rows), ends, _output_time(col.type)), ends, late

    def _with_window(self, table: pa.Table, ends: np.ndarray, time: pa.DataType) -> pa.Table:
        """``table`` with ``window_start`` and ``window_end`` (of type ``time``) in front."""
        end = pa.array(ends, pa.int64())
        start = pc.subtract(end, pa.scalar(self.size_ms, pa.int64()))
        return table.add_column(0, WINDOW_END, end.cast(time)).add_column(0, WINDOW_START, start.cast(time))

    def _given(self, state: _State, table: pa.Table) -> tuple[pa.Table, np.ndarray, int]:
        """``window=``: the rows as they are, their window ends (ms), the number of late rows."""
        for c in self.window:
            nulls = table.column(c).null_count
            if nulls:
                raise InputError(
                    f"{self!r}: the window column {c!r} has {nulls} null value(s) in a batch of "
                    f"{table.num_rows} rows; every row needs its window. Drop or fill them in an "
                    "rf.ops.Map before this operator"
                )
        ends = event_millis(table.column(self.window[1]), self.window[1], repr(self))
        late = 0
        if ends.min() <= state.watermark:
            live = ends > state.watermark
            late = len(ends) - int(live.sum())
            table, ends = table.filter(pa.array(live)), ends[live]
        return table, ends, late

    def _add(self, stores: dict, pairs: pa.Table, ends: np.ndarray) -> dict:
        """``stores`` with the (row, window) ``pairs`` (window ends ``ends``) added, in one
        reduction: the pairs with the rows held for the windows they touch that are due a
        reduction (those whose rows added since their last one, these pairs included, reach
        the rows it left), alone for the others (their top rows kept beside the held ones)."""
        touched, counts = np.unique(ends, return_counts=True)
        fold = set()
        for end, n in zip(touched.tolist(), counts.tolist(), strict=True):
            s = stores.get(end)
            if s is not None and s.pending_rows + n >= s.merged.num_rows:
                fold.add(end)
        parts, part_ends = [pairs], [ends]
        for end in fold:
            for t in stores[end].tables:
                parts.append(t)
                part_ends.append(np.full(t.num_rows, end, dtype=np.int64))
        if len(parts) > 1:
            pairs = pa.concat_tables(parts, promote_options="permissive")
            ends = np.concatenate(part_ends)
        keep = self._top_mask(pairs, ends, self._group_columns)
        out = {end: s for end, s in stores.items() if end not in fold}
        for end, t in _split(pairs.filter(pa.array(keep)), ends[keep]):
            s = out.get(end)
            if s is None:  # a new window, or one just reduced
                out[end] = _Store(merged=t)
            else:
                out[end] = _Store(s.merged, s.pending + (t,), s.pending_rows + t.num_rows)
        return out

    @property
    def _group_columns(self) -> list[str]:
        """The columns that, with the window end, tell a row's group: the ``by`` columns (and,
        with ``window=``, the start: windows may share an end)."""
        return ([self.window[0]] if self.kind == "window" else []) + self.by

    def _top_mask(self, table: pa.Table, base: np.ndarray, columns: list[str]) -> np.ndarray:
        """Which rows of ``table`` hold their group's largest non-null ``value``; the group of a
        row is its ``base`` value (a window end, a pane) and its values of ``columns``.

        One ``group_by`` max over dense group codes, the maxima mapped back to the rows with
        ``index_in``, then ``value == max`` (null where the value or the maximum is null: not
        kept). A single group (the common batch of one window, ``by=()``) needs one ``max``.
        """
        values = table.column(self.value)
        codes = None
        if columns or int(base.min()) != int(base.max()):
            codes = key_codes(table.append_column(_GROUP, pa.array(base, pa.int64())), [_GROUP, *columns])
            if int(codes.min()) == int(codes.max()):
                codes = None
        if codes is None:
            top = pc.max(values)
            if not top.is_valid:
                return np.zeros(table.num_rows, dtype=bool)
            equal = pc.equal(values, top)
        else:
            group = pa.array(codes, pa.int64())
            maxima = (
                pa.table({_GROUP: group, "v": values})
                .group_by(_GROUP, use_threads=False)
                .aggregate([("v", "max")])
            )
            row_max = maxima.column("v_max").take(
                pc.index_in(group, value_set=maxima.column(_GROUP).combine_chunks())
            )
            equal = pc.equal(values, row_max)
        return np.asarray(pc.fill_null(equal, False).to_numpy(zero_copy_only=False), dtype=bool)

    # ------------------------------------------------------------------ advance
    def on_watermark(
        self, state: _State, watermark_ms: int, *, version: int
    ) -> tuple[_State, pa.Table | None]:
        """Emit the top rows of the windows the watermark closes (their end at or below it) and
        drop them; O(1) when nothing is due. ``version`` is unused (the output is append-only)."""
        watermark = max(int(watermark_ms), state.watermark)
        if watermark < state.due:
            return (state if watermark == state.watermark else replace(state, watermark=watermark)), None
        closing = [(end, s) for end, s in state.stores.items() if end <= watermark]
        stores = {end: s for end, s in state.stores.items() if end > watermark}
        state = replace(state, stores=stores, watermark=watermark, due=min(stores, default=_NEVER))
        tables = [t for _, s in closing for t in s.tables]
        if not tables:
            return state, None
        rows = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
        ends = np.concatenate(
            [np.full(t.num_rows, end, dtype=np.int64) for end, s in closing for t in s.tables]
        )
        out = rows.filter(pa.array(self._top_mask(rows, ends, self._group_columns)))
        return state, (out if out.num_rows else None)


def _split(table: pa.Table, ends: np.ndarray) -> list[tuple[int, pa.Table]]:
    """``table`` cut by the distinct values of ``ends`` (aligned with its rows): ``[(end, rows)]``."""
    if len(ends) == 0:
        return []
    lo, hi = int(ends.min()), int(ends.max())
    if lo == hi:
        return [(lo, table)]
    order = np.argsort(ends, kind="stable")
    ordered = ends[order]
    cuts = [0, *(np.flatnonzero(ordered[1:] != ordered[:-1]) + 1).tolist(), len(ordered)]
    table = table.take(pa.array(order))
    return [(int(ordered[a]), table.slice(a, b - a)) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
