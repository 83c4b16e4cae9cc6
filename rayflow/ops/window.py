"""``rf.ops.Window``: per-key aggregates over event-time windows, emitted as the watermark closes
them (DESIGN §11)."""

from __future__ import annotations

import json
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
    key_codes,
    merge_intervals,
    millis,
    split_sorted,
    window_rows,
)
from rayflow.errors import ConfigError, InputError
from rayflow.ops.aggregate import Partials, as_upserts, parse_aggs
from rayflow.ops.base import WATERMARK_NONE, Operator, filled_event_time, side_stream
from rayflow.sinks.base import VERSION_COLUMN, Sink

#: What happens to a row whose window is already closed: see :class:`Window`.
LATE_MODES = ("drop", "side", "update")

#: The output columns naming a window (int64 ms, or the event-time column's timestamp type).
WINDOW_START, WINDOW_END = "window_start", "window_end"

#: The name of the side stream of late rows (``late="side"``).
LATE_STREAM = "late"

#: Pending partial rows a window (or the session store) gathers before they are merged, at least:
#: below it a merge costs more in calls than it saves in rows.
_MIN_MERGE_ROWS = 65_536

#: Bytes of input rows a partition holds in its open fixed windows before aggregating them (all
#: of them, into partials): bounds the memory of long windows and the work of a snapshot, while
#: windows of up to about a million narrow rows per partition are aggregated once, when they close.
_MAX_RAW_BYTES = 16 * 2**20

#: Batches' rows a window buffers, as many tables at most, before aggregating them: each table
#: costs a tuple slot copied per batch and a chunk in the ``group_by``, so many small batches
#: are aggregated in groups of this many instead.
_MAX_RAW_TABLES = 256

#: ``_State.due`` when nothing is open: no watermark reaches it.
_NEVER = 2**63

#: Schema metadata of a snapshot: the operator's watermark, late-row counter and time type.
_META_WATERMARK = b"rayflow.window.watermark"
_META_LATE_ROWS = b"rayflow.window.late_rows"
_META_TIME = b"rayflow.window.time"

#: The key of the one store holding every open session (fixed windows key stores by window end).
_SESSIONS = 0

#: Internal column: a row's session within the rows being merged.
_SESSION_ID = "_rayflow_session"


def _millis(seconds, what: str) -> int:
    return millis(seconds, what, who="rf.ops.Window")


@dataclass(frozen=True)
class _Store:
    """The rows of one window end (fixed windows) or of every open session.

    Partial rows: columns ``by`` + ``window_start`` + ``window_end`` (int64 ms)
    + the partial columns; ``merged`` holds one row per window and key,
    ``pending`` partial tables not merged into it yet. ``raw`` (fixed windows
    only): input rows of the window not aggregated yet, the ``by`` and
    aggregated columns only, copied out of their batches (``raw_rows`` and
    ``raw_bytes`` of them). ``changed`` (``late="update"``): the windows and
    keys a row reached after the window fired, to emit again.

    Immutable, but for one memo: a snapshot compacts a fixed window's store
    into one partial table and remembers it (:meth:`remember`); it is the
    same value, and every later use (:meth:`settled`) takes it in place of
    the rows it sums up, so a row is compacted at most once however many
    snapshots see it.
    """

    merged: pa.Table | None = None
    pending: tuple[pa.Table, ...] = ()
    pending_rows: int = 0
    raw: tuple[pa.Table, ...] = ()
    raw_rows: int = 0
    raw_bytes: int = 0
    changed: tuple[pa.Table, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "_compacted", [])  # a list: appending to it is atomic

    @property
    def tables(self) -> list[pa.Table]:
        """The partial tables (not the raw rows)."""
        return ([self.merged] if self.merged is not None else []) + list(self.pending)

    @property
    def num_rows(self) -> int:
        """Rows held: partial rows plus raw rows (after a snapshot: the rows of its compaction)."""
        if self._compacted:
            return self._compacted[0].num_rows
        return (self.merged.num_rows if self.merged is not None else 0) + self.pending_rows + self.raw_rows

    @property
    def whole(self) -> pa.Table | None:
        """The store's one partial table (one row per window and key), if it is held as one."""
        if self._compacted:
            return self._compacted[0]
        if not self.raw and len(self.tables) == 1:
            return self.tables[0]
        return None

    def remember(self, compacted: pa.Table) -> None:
        """Keep ``compacted``, this store's rows as one partial table (see the class doc)."""
        if not self._compacted:
            self._compacted.append(compacted)

    def settled(self) -> _Store:
        """The same store, held as its compaction if a snapshot made one."""
        if not self._compacted:
            return self
        return _Store(merged=self._compacted[0], changed=self.changed)

    def with_raw(self, rows: pa.Table) -> _Store:
        return _Store(
            merged=self.merged,
            pending=self.pending,
            pending_rows=self.pending_rows,
            raw=self.raw + (rows,),
            raw_rows=self.raw_rows + rows.num_rows,
            raw_bytes=self.raw_bytes + rows.nbytes,
            changed=self.changed,
        )


@dataclass(frozen=True)
class _State:
    """One partition's window state (immutable: each call returns a new one; a store may
    remember a snapshot's compaction of itself, the same value, see :class:`_Store`).

    ``stores``: window end -> :class:`_Store` (sessions: one store,
    :data:`_SESSIONS`). ``watermark``: the last one :meth:`Window.advance` saw
    (rows are late against it). ``due``: the lowest watermark at which
    ``advance`` has anything to do, so an advance before it costs O(1).
    ``time``: the event-time column's type (``None`` before the first row).
    """

    stores: dict
    watermark: int = WATERMARK_NONE
    late_rows: int = 0
    due: int = _NEVER
    time: pa.DataType | None = None


class Window(Operator):
    """Per-key aggregates over tumbling, hopping or session windows of event time.

    ``by`` is a column or list of columns and must include the pipeline's key
    columns. ``aggs`` is a list of ``(column, function)``, function one of
    ``count``, ``sum``, ``min``, ``max``, ``mean`` (outputs ``<column>_<function>``,
    as :class:`Aggregate`; ``count_distinct`` is not offered: it is not
    mergeable without keeping every distinct value). ``event_time`` names the
    event-time column (int64 milliseconds since the epoch, or an Arrow
    timestamp of any unit and time zone); ``None`` takes the pipeline's.
    Exactly one window kind:

    - ``tumbling_s=size``: windows ``[k*size, (k+1)*size)``, aligned to epoch 0.
    - ``hopping_s=(size, slide)``: windows ``[k*slide, k*slide + size)``; a row
      is in each of them that contains it (``slide <= size``).
    - ``session_gap_s=gap``: per key, rows less than ``gap`` apart (in event
      time) chain into one session ``[first, last + gap)``; a row that
      bridges two sessions merges them. A row exactly ``gap`` after the
      previous one starts a new session (windows are half-open).

    Sizes are whole milliseconds. Output: ``window_start``, ``window_end``
    (int64 ms for an int64 event time, else ``timestamp("ms", tz)`` of the
    input's time zone), the ``by`` columns, the aggregates.

    **Closing.** A window ``[start, end)`` closes when the partition's
    watermark reaches ``end + allowed_lateness_s``: with ``late="drop"`` or
    ``"side"`` it is then emitted, once, and its state dropped. The state
    holds only open windows. At the end of a bounded input the watermark
    reaches the end of time and every window closes.

    **Late rows.** A row whose window is closed (its end plus lateness is at or
    below the watermark the operator last saw) is late; a row of a hopping
    window may be late for some of its windows only, and counts once per
    window it missed. Sessions decide after merging: a row that joins an open
    session is not late, a row whose session would already be closed is.
    ``late`` says what happens:

    - ``"drop"`` (default): dropped and counted (``late_rows`` in
      :meth:`metrics`, checkpointed with the state).
    - ``"side"``: also counted, and sent to ``late_sink`` (required): the
      input's columns plus ``window_start`` and ``window_end`` of the window
      missed, as the side stream ``"late"``.
    - ``"update"``: a window *fires* (is emitted) when the watermark reaches
      its end, and is kept until end + lateness; a row for a fired window
      makes it emitted again, whole, at the next watermark advance. The output
      is then an upsert stream (``_version`` and the key ``by`` +
      ``window_start`` + ``window_end`` in the schema metadata, see
      ``rayflow/sinks/base.py``): the latest row of each window is its value
      over every row not dropped. Rows past end + lateness are dropped and
      counted. Not for sessions (a merge changes a window's key, and an
      upsert stream cannot retract the old one).

    **Guarantees.** Each window is emitted exactly once (``"update"``: its
    latest emission is final) across commits, failures and restores: nothing
    is emitted by :meth:`process`; :meth:`on_watermark` emits what the new
    watermark closes (or fires, or what changed in fired windows) and returns
    a state without it, and the snapshot carries the operator's watermark, so
    advancing a restored state to the committed watermark emits nothing.
    Whether a row is late depends on the watermark when its batch is
    processed, so with late rows the result depends on batch timing, as in
    every watermark-based engine; rows within the out-of-orderness bound are
    never late, and then the output equals SQL over all rows.

    **Costs.** Fixed windows: each batch is assigned to windows with numpy (a
    batch within one window, the common case, from its smallest and largest
    event time alone; a hopping row goes to each of its windows), and its
    rows, the ``by`` and aggregated columns only, are copied into their
    windows' buffers: a batch costs O(its rows), nothing is aggregated
    then. A window's rows are aggregated by one pyarrow ``group_by`` when
    it closes (``late="update"``: fires). Once a partition's buffered rows
    pass 16 MiB (``_MAX_RAW_BYTES``) they are all aggregated into mergeable
    partials, merged when their window closes, which bounds the memory of
    long windows; so are a window's rows once they come from 256 batches
    (``_MAX_RAW_TABLES``), which bounds the cost of many small batches.
    Rows reaching a window that already fired are aggregated with their
    batch. A snapshot aggregates what is still buffered, and the state
    keeps the result for the close and later snapshots. So each row is
    aggregated once; partials (of folds and snapshots) are merged lazily,
    once they outgrow what is merged, and at the close. An advance that
    closes nothing is O(1); one that closes windows aggregates only theirs.
    Sessions aggregate each batch with one ``group_by`` and merge the
    partials lazily; they sort the batch by key and time to merge
    intervals; an advance that may close a session, and a batch with rows
    whose session alone would be closed (late candidates), merge with
    every open session (O(open sessions), not O(rows seen)). ``count``
    counts non-null values, nulls in ``by`` form groups, as in SQL.
    """

    stateful = True

    def __init__(
        self,
        by: str | Sequence[str],
        aggs: Sequence[tuple[str, str]],
        *,
        event_time: str | None = None,
        tumbling_s: float | None = None,
        hopping_s: tuple[float, float] | None = None,
        session_gap_s: float | None = None,
        allowed_lateness_s: float = 0.0,
        late: str = "drop",
        late_sink: Sink | None = None,
    ):
        self.by = [by] if isinstance(by, str) else list(by)
        if not self.by or not all(isinstance(c, str) for c in self.by):
            raise ConfigError(f"rf.ops.Window needs one or more group column names in by=, got {by!r}")
        self.aggs = parse_aggs(aggs, "rf.ops.Window")
        self._aggs = Partials(self.aggs)
        if event_time is not None and not isinstance(event_time, str):
            raise ConfigError(f"rf.ops.Window: event_time must be a column name, got {event_time!r}")
        self.event_time = event_time
        kinds = {"tumbling_s": tumbling_s, "hopping_s": hopping_s, "session_gap_s": session_gap_s}
        given = [k for k, v in kinds.items() if v is not None]
        if len(given) != 1:
            raise ConfigError(
                "rf.ops.Window needs exactly one window kind: tumbling_s=size, hopping_s=(size, slide) "
                f"or session_gap_s=gap (seconds); got {given or 'none'}"
            )
        self.kind = given[0][: -len("_s")]
        if tumbling_s is not None or hopping_s is not None:
            self.size_ms, self.slide_ms = fixed_sizes("rf.ops.Window", tumbling_s, hopping_s)
        else:
            self.gap_ms = _millis(session_gap_s, "session_gap_s")
        if allowed_lateness_s == 0:
            self.lateness_ms = 0
        else:
            self.lateness_ms = _millis(allowed_lateness_s, "allowed_lateness_s (or 0)")
        if late not in LATE_MODES:
            raise ConfigError(f"rf.ops.Window: late must be one of {LATE_MODES}, got {late!r}")
        if late == "side" and late_sink is None:
            raise ConfigError(
                "rf.ops.Window: late='side' sends late rows to late_sink=, which is missing; give "
                "an rf.sinks sink (e.g. rf.sinks.Parquet('late/')), or use late='drop'"
            )
        if late_sink is not None and late != "side":
            raise ConfigError(
                f"rf.ops.Window: late_sink= is given but late={late!r}; only late='side' sends rows "
                "to it: set late='side' or drop late_sink"
            )
        if late_sink is not None and not isinstance(late_sink, Sink):
            raise ConfigError(f"rf.ops.Window: late_sink must be an rf.sinks sink, got {late_sink!r}")
        if late_sink is not None and late_sink.keeps_output_list:
            raise ConfigError(
                f"rf.ops.Window: late_sink={late_sink!r} hands its rows back as result.output, which "
                "holds the main output; give the late rows a sink of their own (rf.sinks.Parquet, "
                "rf.sinks.DuckDB or rf.sinks.Kafka)"
            )
        if late == "update" and self.kind == "session_gap":
            raise ConfigError(
                "rf.ops.Window: late='update' is not offered for session windows: a late row can "
                "merge two emitted sessions into one with another start, and an upsert stream "
                "cannot retract the old rows; use late='drop' or 'side' with allowed_lateness_s"
            )
        self.late = late
        self.late_sink = late_sink
        reserved = {WINDOW_START, WINDOW_END} | ({VERSION_COLUMN} if late == "update" else set())
        clash = sorted(reserved & set(self.by + [a.out for a in self.aggs]))
        if clash:
            raise ConfigError(
                f"rf.ops.Window: {clash} are output columns of the window itself; rename the "
                "input column(s) in an rf.ops.Map before it"
            )
        self._keys = self.by + [WINDOW_START, WINDOW_END]

    # ------------------------------------------------------------------ description
    def _window_spec(self) -> dict:
        if self.kind == "tumbling":
            return {"kind": "tumbling", "size_ms": self.size_ms}
        if self.kind == "hopping":
            return {"kind": "hopping", "size_ms": self.size_ms, "slide_ms": self.slide_ms}
        return {"kind": "session", "gap_ms": self.gap_ms}

    def spec(self) -> dict:
        return {
            "type": "Window",
            "by": self.by,
            "aggs": [[a.column, a.fn] for a in self.aggs],
            "window": self._window_spec(),
            "allowed_lateness_ms": self.lateness_ms,
            "late": self.late,
            "event_time": self.event_time,
        }

    def __repr__(self) -> str:
        if self.kind in ("tumbling", "hopping"):
            kind = fixed_repr(self.kind, self.size_ms, self.slide_ms)
        else:
            kind = f"session_gap_s={self.gap_ms / 1000:g}"
        extra = f", allowed_lateness_s={self.lateness_ms / 1000:g}" if self.lateness_ms else ""
        extra += f", late={self.late!r}" if self.late != "drop" else ""
        return (
            f"rf.ops.Window(by={self.by}, aggs={[(a.column, a.fn) for a in self.aggs]}, "
            f"event_time={self.event_time!r}, {kind}{extra})"
        )

    @property
    def uses_event_time(self) -> bool:
        return True

    def with_event_time(self, column: str | None) -> Window:
        return filled_event_time(self, column)

    @property
    def group_columns(self) -> list[str]:
        return self.by

    @property
    def emits_upserts(self) -> bool:
        return self.late == "update"

    def side_sinks(self) -> dict[str, object]:
        return {LATE_STREAM: self.late_sink} if self.late == "side" else {}

    def columns_used(self, schema: pa.Schema) -> list[str] | None:
        """The ``by`` columns, the aggregated ones and the event time; ``None`` (all) with
        ``late="side"``, which sends late input rows, every column, to ``late_sink``."""
        if self.late == "side" or self.event_time is None:
            return None
        return list(dict.fromkeys(self.by + [a.column for a in self.aggs] + [self.event_time]))

    def check_input(self, schema: pa.Schema) -> pa.Schema:
        """Every column must be there, the event time int64 or a timestamp, each aggregation's
        type accepted (checked by pyarrow, as :class:`Aggregate`); returns the output schema."""
        if self.event_time is None:
            self.with_event_time(None)  # raises: no event-time column
        needed = self.by + [a.column for a in self.aggs]
        missing = list(dict.fromkeys(c for c in needed if c not in schema.names))
        if missing:
            raise InputError(
                f"{self!r} uses column(s) {missing} that the input does not have; its columns "
                f"are {schema.names}"
            )
        check_event_time_column(schema, self.event_time, what=repr(self))
        self._aggs.check_input(schema, self.by, repr(self))
        out = self._aggs.empty_output(schema, self.by, repr(self))
        time = _output_time(schema.field(self.event_time).type)
        out = out.add_column(0, WINDOW_END, pa.array([], time)).add_column(
            0, WINDOW_START, pa.array([], time)
        )
        return self._finish_output(out, 0).schema

    # ------------------------------------------------------------------ state
    def init_state(self) -> _State:
        return _State(stores={})

    def metrics(self, state: _State) -> dict[str, int]:
        """``late_rows`` (counter, checkpointed), ``open_windows`` (fixed windows: the distinct
        open ``[start, end)`` over all keys; sessions: the sessions held, where parts of one not
        merged yet count apart) and ``state_rows`` (rows held: partial rows, a key's window
        counted once per partial table holding it until they are merged, plus the input rows
        fixed windows buffer unaggregated, a hopping row once per window holding it)."""
        rows = sum(s.num_rows for s in state.stores.values())
        windows = len(state.stores) if self.kind != "session_gap" else rows
        return {"late_rows": state.late_rows, "open_windows": windows, "state_rows": rows}

    def state_to_table(self, state: _State) -> pa.Table:
        """The open windows as partial rows, one per window and key, with the watermark, the
        late-row counter and the event-time type in the schema metadata (Parquet keeps it).

        Fixed windows: a window held as one partial table is taken as it is;
        the others (buffered input rows, several partial tables) are compacted
        in as few ``group_by`` calls as possible, and each store remembers its
        compaction (:meth:`_Store.remember`), so a later snapshot or close
        does not redo it: O(rows not compacted yet), each row compacted by
        snapshots at most once. Sessions: their fragments merged. The
        ``late="update"`` change set is not in it: every :meth:`on_watermark`
        empties it, and a snapshot follows one.
        """
        if self.kind == "session_gap":
            tables = [t for s in state.stores.values() for t in s.tables]
            table = self._merge_sessions(tables) if tables else None
        else:
            table = self._snapshot_windows(state.stores)
        if table is None:
            table = pa.table({c: pa.array([], pa.null()) for c in self._keys})
        meta = {
            _META_WATERMARK: str(state.watermark).encode(),
            _META_LATE_ROWS: str(state.late_rows).encode(),
        }
        if state.time is not None:
            meta[_META_TIME] = json.dumps(_time_to_json(state.time)).encode()
        return table.replace_schema_metadata(meta)

    def _snapshot_windows(self, stores: dict) -> pa.Table | None:
        """Every open fixed window as partial rows, one per window and key (see
        :meth:`state_to_table`)."""
        tables, todo = [], []
        for end, store in stores.items():
            whole = store.whole
            if whole is not None:
                tables.append(whole)
            else:
                todo.append((end, store))
        if todo:
            done = self._compact(todo)
            if len(todo) == 1:
                todo[0][1].remember(done)
            else:
                for end, rows in split_sorted(done, WINDOW_END):
                    stores[end].remember(rows)
            tables.append(done)
        if not tables:
            return None
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")

    def state_from_table(self, table: pa.Table) -> _State:
        meta = table.schema.metadata or {}
        watermark = int(meta.get(_META_WATERMARK, WATERMARK_NONE))
        late_rows = int(meta.get(_META_LATE_ROWS, 0))
        time = _time_from_json(json.loads(meta[_META_TIME])) if _META_TIME in meta else None
        state = _State(stores={}, watermark=watermark, late_rows=late_rows, time=time)
        if table.num_rows == 0:
            return state
        table = table.select(self._keys + self._aggs.state_columns).replace_schema_metadata(None)
        if self.kind == "session_gap":
            stores = {_SESSIONS: _Store(merged=table)}
        else:
            stores = {end: _Store(merged=t) for end, t in split_sorted(table, WINDOW_END)}
        return replace(state, stores=stores, due=self._due(stores, watermark))

    def _due(self, stores: dict, watermark: int) -> int:
        """The lowest watermark at which :meth:`on_watermark` has something to do with ``stores``."""
        if self.kind == "session_gap":
            store = stores.get(_SESSIONS)
            if store is None or store.num_rows == 0:
                return _NEVER
            return min(_min(t, WINDOW_END) for t in store.tables) + self.lateness_ms
        due = _NEVER
        for end, store in stores.items():
            if self.late == "update" and store.changed:
                return watermark  # changes of a fired window: emit at the next advance
            fires = end if self.late == "update" and end > watermark else end + self.lateness_ms
            due = min(due, fires)
        return due

    # ------------------------------------------------------------------ process
    def process(self, state: _State, table: pa.Table) -> tuple[_State, pa.Table | None]:
        """Add one batch's rows to their windows; emits nothing but late rows (``late="side"``)."""
        if table.num_rows == 0:
            return state, None
        col = table.column(self.event_time)
        ts = event_millis(col, self.event_time, repr(self))
        if state.time is None:
            state = replace(state, time=_output_time(col.type))
        if self.kind == "session_gap":
            return self._process_sessions(state, table, ts)
        groups = window_rows(ts, self.size_ms, self.slide_ms)
        closed = state.watermark - self.lateness_ms  # a window ending at or before it is closed
        late = [(start, rows) for start, rows in groups if start + self.size_ms <= closed]
        side = None
        if late:  # the first windows: starts ascend
            groups = groups[len(late) :]
            missed = sum(table.num_rows if rows is None else len(rows) for _, rows in late)
            state = replace(state, late_rows=state.late_rows + missed)
            if self.late == "side":
                side = self._late_windows(state, table, late)
        if not groups:
            return state, side
        data = table.select(list(dict.fromkeys(self.by + [a.column for a in self.aggs])))
        stores = dict(state.stores)
        for start, rows in groups:
            end = start + self.size_ms
            store = stores.get(end, _Store()).settled()
            if self.late == "update" and end <= state.watermark:
                # A fired window: aggregated now, its keys marked to emit again at the next advance.
                part = self._raw_partials([(end, (data if rows is None else data.take(rows),))])
                stores[end] = self._add(store, part, changed=True)
            else:
                store = store.with_raw(_copy(data) if rows is None else data.take(rows))
                stores[end] = self._fold(end, store) if len(store.raw) >= _MAX_RAW_TABLES else store
        if sum(s.raw_bytes for s in stores.values()) > _MAX_RAW_BYTES:
            stores = {end: self._fold(end, s) if s.raw else s for end, s in stores.items()}
        return replace(state, stores=stores, due=self._due(stores, state.watermark)), side

    def _add(self, store: _Store, part: pa.Table, *, changed: bool) -> _Store:
        """``store`` with the partial rows ``part``; merged once the pending rows outgrow it."""
        store = _Store(
            merged=store.merged,
            pending=store.pending + (part,),
            pending_rows=store.pending_rows + part.num_rows,
            raw=store.raw,
            raw_rows=store.raw_rows,
            raw_bytes=store.raw_bytes,
            changed=store.changed + ((part.select(self._keys),) if changed else ()),
        )
        merged_rows = store.merged.num_rows if store.merged is not None else 0
        if store.pending_rows >= max(_MIN_MERGE_ROWS, merged_rows):
            merge = self._merge_sessions if self.kind == "session_gap" else self._merge_windows
            store = replace(store, merged=merge(store.tables), pending=(), pending_rows=0)
        return store

    def _fold(self, end: int, store: _Store) -> _Store:
        """``store`` (of the window ending at ``end``) with its raw rows aggregated into partials."""
        store = store.settled()
        if not store.raw:
            return store
        part = self._raw_partials([(end, store.raw)])
        kept = _Store(
            merged=store.merged, pending=store.pending, pending_rows=store.pending_rows, changed=store.changed
        )
        return self._add(kept, part, changed=False)

    def _raw_partials(self, raws: list[tuple[int, tuple[pa.Table, ...]]]) -> pa.Table:
        """Raw rows of fixed windows (``(window end, tables)``) as partial rows, one per window and
        key, in one ``group_by``: by the ``by`` columns alone for one window (cheaper than with
        the start), else by them and the window start."""
        if len(raws) == 1:
            end, tables = raws[0]
            t = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")
            part = self._aggs.partial(t, self.by)
            n, at = part.num_rows, len(self.by)
            part = part.add_column(at, WINDOW_START, _constant(end - self.size_ms, n))
            return part.add_column(at + 1, WINDOW_END, _constant(end, n))
        t = pa.concat_tables(
            [
                r.append_column(WINDOW_START, _constant(end - self.size_ms, r.num_rows))
                for end, rs in raws
                for r in rs
            ],
            promote_options="permissive",
        )
        return self._with_end(self._aggs.partial(t, self.by + [WINDOW_START]))

    def _compact(self, stores: list[tuple[int, _Store]]) -> pa.Table | None:
        """The rows of fixed windows' stores (``(window end, store)``) as partial rows, one per
        window and key: a store held as one partial table as it is, the raw rows of stores that
        hold nothing else in one ``group_by``, and the other stores' tables in one merge."""
        whole, raws, parts = [], [], []
        for end, store in stores:
            one = store.whole
            if one is not None:
                whole.append(one)
            elif not store.tables:
                raws.append((end, store.raw))
            else:
                parts += store.tables + ([self._raw_partials([(end, store.raw)])] if store.raw else [])
        if raws:
            whole.append(self._raw_partials(raws))
        if parts:
            whole.append(self._merge_windows(parts))
        if not whole:
            return None
        return whole[0] if len(whole) == 1 else pa.concat_tables(whole, promote_options="permissive")

    def _merge_windows(self, tables: list[pa.Table]) -> pa.Table:
        """Fixed windows' partial rows merged per key and window (grouped by the start only: the
        end follows from it)."""
        return self._with_end(self._aggs.merge(tables, self.by + [WINDOW_START]))

    def _with_end(self, merged: pa.Table) -> pa.Table:
        """``merged`` (``by`` + ``window_start`` + ...) with ``window_end`` after the start."""
        end = pc.add(merged.column(WINDOW_START), pa.scalar(self.size_ms, pa.int64()))
        return merged.add_column(len(self.by) + 1, WINDOW_END, end)

    def _late_windows(
        self, state: _State, table: pa.Table, late: list[tuple[int, np.ndarray | None]]
    ) -> pa.Table:
        """The rows of ``table`` in the closed windows ``late`` (``(start, rows)``), once per
        window, with the window missed, as the side stream of late rows."""
        rows = [np.arange(table.num_rows, dtype=np.int64) if r is None else r for _, r in late]
        starts = np.repeat(np.array([start for start, _ in late], dtype=np.int64), [len(r) for r in rows])
        return self._late_table(state, table.take(np.concatenate(rows)), starts, starts + self.size_ms)

    def _late_table(self, state: _State, rows: pa.Table, starts: np.ndarray, ends: np.ndarray) -> pa.Table:
        """Late ``rows`` with the window each one missed, as the side stream of late rows."""
        out = rows.append_column(WINDOW_START, _time_array(starts, state.time))
        out = out.append_column(WINDOW_END, _time_array(ends, state.time))
        return side_stream(out, LATE_STREAM)

    # ------------------------------------------------------------------ sessions
    def _sessions(self, table: pa.Table, starts: np.ndarray, ends: np.ndarray, partials: bool) -> pa.Table:
        """Merge the intervals ``[starts, ends)`` of ``table``'s rows per key into sessions:
        ``by`` + window bounds + the partials of the rows (input rows if not ``partials``, else
        partial rows, merged)."""
        found = merge_intervals(key_codes(table, self.by), starts, ends, equal_lengths=not partials)
        keyed = table.append_column(_SESSION_ID, pa.array(found.of_row, pa.int64()))
        if partials:
            res = self._aggs.merge([keyed.select([_SESSION_ID, *self._aggs.state_columns])], [_SESSION_ID])
        else:
            res = self._aggs.partial(keyed, [_SESSION_ID])
        ids = np.asarray(res.column(_SESSION_ID).to_numpy(), dtype=np.int64)
        out = table.select(self.by).take(found.first_row[ids])
        out = out.append_column(WINDOW_START, pa.array(found.start[ids], pa.int64()))
        out = out.append_column(WINDOW_END, pa.array(found.end[ids], pa.int64()))
        for name in self._aggs.state_columns:
            out = out.append_column(name, res.column(name))
        return out

    def _merge_sessions(self, tables: list[pa.Table]) -> pa.Table:
        """Session fragments (partial rows) merged where they overlap: one row per session."""
        t = pa.concat_tables(tables, promote_options="permissive")
        starts = np.asarray(t.column(WINDOW_START).to_numpy(), dtype=np.int64)
        ends = np.asarray(t.column(WINDOW_END).to_numpy(), dtype=np.int64)
        return self._sessions(t, starts, ends, partials=True)

    def _process_sessions(
        self, state: _State, table: pa.Table, ts: np.ndarray
    ) -> tuple[_State, pa.Table | None]:
        ends = ts + self.gap_ms
        closed = state.watermark - self.lateness_ms
        side = None
        if int(ends.min()) <= closed:
            late = self._late_session_rows(state, table, ts, ends, closed)
            if late.any():
                state = replace(state, late_rows=state.late_rows + int(late.sum()))
                if self.late == "side":
                    side = self._late_sessions(state, table.filter(late), ts[late])
                keep = ~late
                table, ts, ends = table.filter(keep), ts[keep], ends[keep]
        if table.num_rows == 0:
            return state, side
        needed = list(dict.fromkeys(self.by + [a.column for a in self.aggs]))
        part = self._sessions(table.select(needed), ts, ends, partials=False)
        stores = dict(state.stores)
        stores[_SESSIONS] = self._add(stores.get(_SESSIONS, _Store()), part, changed=False)
        due = min(state.due, _min(part, WINDOW_END) + self.lateness_ms)
        return replace(state, stores=stores, due=due), side

    def _late_session_rows(
        self, state: _State, table: pa.Table, ts: np.ndarray, ends: np.ndarray, closed: int
    ) -> np.ndarray:
        """Which rows are late: merged with the open sessions, their session ends by ``closed``.

        An open session ends after ``closed`` (else the last advance closed
        it), so a session holding one is open: only sessions of new rows alone
        can be closed, and their rows are late.
        """
        held = [t.select(self._keys) for t in state.stores[_SESSIONS].tables] if state.stores else []
        rows = table.select(self.by)
        rows = rows.append_column(WINDOW_START, pa.array(ts, pa.int64()))
        rows = rows.append_column(WINDOW_END, pa.array(ends, pa.int64()))
        t = pa.concat_tables([rows, *held], promote_options="permissive")
        starts = np.asarray(t.column(WINDOW_START).to_numpy(), dtype=np.int64)
        all_ends = np.asarray(t.column(WINDOW_END).to_numpy(), dtype=np.int64)
        found = merge_intervals(key_codes(t, self.by), starts, all_ends)
        return found.end[found.of_row[: table.num_rows]] <= closed

    def _late_sessions(self, state: _State, rows: pa.Table, ts: np.ndarray) -> pa.Table:
        """Late rows with the bounds of the (closed) session they form, per key, as late rows."""
        found = merge_intervals(key_codes(rows, self.by), ts, ts + self.gap_ms, equal_lengths=True)
        starts, ends = found.start[found.of_row], found.end[found.of_row]
        return self._late_table(state, rows, starts, ends)

    # ------------------------------------------------------------------ advance
    def on_watermark(
        self, state: _State, watermark_ms: int, *, version: int
    ) -> tuple[_State, pa.Table | None]:
        """Emit what the watermark closes (``late="update"``: fires, or changed since it fired)
        and drop the windows past their lateness; O(1) when nothing is due."""
        watermark = max(int(watermark_ms), state.watermark)
        if watermark < state.due:
            return (state if watermark == state.watermark else replace(state, watermark=watermark)), None
        closed = watermark - self.lateness_ms
        if self.kind == "session_gap":
            sessions = self._merge_sessions(state.stores[_SESSIONS].tables)
            ends = np.asarray(sessions.column(WINDOW_END).to_numpy(), dtype=np.int64)
            done = ends <= closed
            out, kept = sessions.filter(done), sessions.filter(~done)
            stores = {_SESSIONS: _Store(merged=kept)} if kept.num_rows else {}
        elif self.late == "update":
            stores, out = self._advance_updates(state, watermark)
        else:
            out = self._compact([(end, s) for end, s in state.stores.items() if end <= closed])
            stores = {end: s for end, s in state.stores.items() if end > closed}
        state = replace(state, stores=stores, watermark=watermark, due=self._due(stores, watermark))
        if out is None or out.num_rows == 0:
            return state, None
        return state, self._output(out, state.time, version)

    def _advance_updates(self, state: _State, watermark: int) -> tuple[dict, pa.Table | None]:
        """``late="update"``: windows that fire now (whole, compacted as at a close) and the changed
        rows of windows that fired before (one marked merge); windows past end + lateness are
        dropped."""
        closed = watermark - self.lateness_ms
        fire, again = [], []
        for end, store in state.stores.items():
            if state.watermark < end <= watermark:  # fires now: every row
                fire.append((end, store))
            elif store.changed:  # fired before: the windows rows reached since
                again.append((end, store.settled()))
        touched = {end for end, _ in fire + again}
        stores = {end: s for end, s in state.stores.items() if end > closed and end not in touched}
        outs = []
        if fire:
            fired = self._compact(fire)
            self._keep(stores, fired, closed)
            outs.append(fired)
        if again:
            marked = [(t, True) for _, s in again for t in s.changed]
            for end, s in again:
                tables = s.tables + ([self._raw_partials([(end, s.raw)])] if s.raw else [])
                marked += [(t, False) for t in tables]
            merged, is_marked = self._aggs.merge_marked(marked, self.by + [WINDOW_START])
            merged = self._with_end(merged)
            self._keep(stores, merged, closed)
            outs.append(merged.filter(is_marked))
        if not outs:
            return stores, None
        return stores, outs[0] if len(outs) == 1 else pa.concat_tables(outs, promote_options="permissive")

    def _keep(self, stores: dict, merged: pa.Table, closed: int) -> None:
        """Keep in ``stores`` the windows of ``merged`` (partial rows) still open at ``closed``."""
        ends = np.asarray(merged.column(WINDOW_END).to_numpy(), dtype=np.int64)
        if len(ends) and int(ends.min()) <= closed:
            merged = merged.filter(ends > closed)
        for end, t in split_sorted(merged, WINDOW_END):
            stores[end] = _Store(merged=t)

    def _output(self, merged: pa.Table, time: pa.DataType, version: int) -> pa.Table:
        """Merged partial rows as output rows: window bounds, ``by``, the aggregates."""
        out = self._aggs.present(merged, self.by)
        start = merged.column(WINDOW_START).cast(time)
        end = merged.column(WINDOW_END).cast(time)
        out = out.add_column(0, WINDOW_END, end).add_column(0, WINDOW_START, start)
        return self._finish_output(out, version)

    def _finish_output(self, out: pa.Table, version: int) -> pa.Table:
        if self.late != "update":
            return out
        return as_upserts(out, self._keys, version)


def _constant(value: int, n: int) -> pa.Array:
    """An int64 column of ``n`` times ``value``."""
    return pa.array(np.full(n, value, dtype=np.int64))


def _copy(table: pa.Table) -> pa.Table:
    """``table`` in buffers of its own: rows a state keeps must not pin their whole batch (its
    other columns, the shared-memory object it was read from)."""
    cols = [
        pa.chunked_array([pa.concat_arrays([c]) for c in col.chunks], type=col.type) for col in table.columns
    ]
    return pa.Table.from_arrays(cols, schema=table.schema)


def _min(table: pa.Table, column: str) -> int:
    return int(np.asarray(table.column(column).to_numpy()).min())


def _output_time(t: pa.DataType) -> pa.DataType:
    """The type of ``window_start`` / ``window_end`` for an event-time column of type ``t``."""
    return pa.timestamp("ms", t.tz) if pa.types.is_timestamp(t) else pa.int64()


def _time_array(ms: np.ndarray, time: pa.DataType) -> pa.Array:
    return pa.array(ms, pa.int64()).cast(time)


def _time_to_json(t: pa.DataType) -> dict:
    return {"timestamp": True, "tz": t.tz} if pa.types.is_timestamp(t) else {"timestamp": False}


def _time_from_json(d: dict) -> pa.DataType:
    return pa.timestamp("ms", d.get("tz")) if d.get("timestamp") else pa.int64()
