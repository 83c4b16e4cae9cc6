"""``rf.ops.Aggregate``: per-key aggregates, as a final result or an upsert stream (DESIGN §11)."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from rayflow._internal.combine import is_combined
from rayflow._internal.runs import RunSet, iter_ranges, runs_to_merge
from rayflow.errors import ConfigError, InputError
from rayflow.ops.base import Operator, _columns, _empty, _first_line
from rayflow.partitioning import hash_table
from rayflow.sinks.base import UPSERT_KEY_METADATA, VERSION_COLUMN


@dataclass(frozen=True)
class _Agg:
    column: str
    fn: str

    @property
    def out(self) -> str:
        return f"{self.column}_{self.fn}"

    def partials(self) -> list[tuple[str, str, str]]:
        """(input column, pyarrow function, state column) of the partial aggregates.

        ``mean`` keeps a sum and a count, shared with an explicit sum or count
        of the same column.
        """
        fns = ("sum", "count") if self.fn == "mean" else (self.fn,)
        return [(self.column, f, f"{self.column}_{f}") for f in fns]


_MERGE = {"count": "sum", "sum": "sum", "min": "min", "max": "max"}
#: Schema metadata of an incremental state file: ``{"by": [...], "merge": {column: function},
#: "zero": [count columns]}``, how a base and its deltas fold into one state (as SQL aggregates
#: over their union; a count column a file lacks counts 0, see ``Aggregate.state_from_table``).
STATE_MERGE_KEY = b"rayflow.state_merge"
SUPPORTED_AGGS = ("count", "sum", "min", "max", "mean")


def parse_aggs(aggs, who: str) -> list[_Agg]:
    """``aggs`` as given to an operator (``(column, function)`` pairs), checked; ``who`` names
    the operator in the :class:`ConfigError` raised for a bad one."""
    if not aggs:
        raise ConfigError(f"{who} needs at least one (column, function) in aggs=")
    parsed = []
    for a in aggs:
        if not (isinstance(a, (tuple, list)) and len(a) == 2):
            raise ConfigError(f"{who}: each agg is (column, function), got {a!r}")
        col, fn = a
        if fn not in SUPPORTED_AGGS:
            raise ConfigError(
                f"{who}: function {fn!r} on column {col!r} is not supported; "
                f"use one of {', '.join(SUPPORTED_AGGS)}"
            )
        parsed.append(_Agg(col, fn))
    return parsed


class Partials:
    """Mergeable partial aggregates of a list of :class:`_Agg` (shared by Aggregate and Window).

    A partial table holds group columns (``keys``) plus one state column per
    partial (``mean`` keeps a sum and a count). Partials of the same group in
    several tables merge exactly (counts and sums add, min and max combine),
    so a stream can be aggregated batch by batch and merged lazily.
    """

    def __init__(self, aggs: list[_Agg]):
        self.aggs = aggs
        self.partials = list(dict.fromkeys(p for a in aggs for p in a.partials()))

    @property
    def state_columns(self) -> list[str]:
        return [s for _, _, s in self.partials]

    def partial(self, table: pa.Table, keys: list[str]) -> pa.Table:
        """The partials of ``table`` per group of ``keys``: ``keys`` + the state columns."""
        res = table.group_by(keys, use_threads=False).aggregate([(c, f) for c, f, _ in self.partials])
        cols = [res.column(c) for c in keys] + [res.column(f"{c}_{f}") for c, f, _ in self.partials]
        return pa.Table.from_arrays(cols, names=keys + self.state_columns)

    def merge(self, tables: list[pa.Table], keys: list[str], extra: list[tuple[str, str]] = ()) -> pa.Table:
        """Merge partial tables by group; ``extra`` are further (column, function) aggregations."""
        t = pa.concat_tables(tables, promote_options="permissive")
        merges = [(s, _MERGE[f]) for _, f, s in self.partials]
        res = t.group_by(keys, use_threads=False).aggregate(merges + list(extra))
        names = keys + self.state_columns + [f"{c}_{f}" for c, f in extra]
        cols = [res.column(c) for c in keys] + [res.column(f"{s}_{m}") for s, m in merges]
        cols += [res.column(f"{c}_{f}") for c, f in extra]
        return pa.Table.from_arrays(cols, names=names)

    def merge_marked(
        self, tables: list[tuple[pa.Table, bool]], keys: list[str]
    ) -> tuple[pa.Table, pa.ChunkedArray]:
        """Merge partial tables, each flagged: ``(merged, marked)``, ``marked`` telling the groups
        that have a row in a table flagged ``True``, in one ``group_by``.

        A flagged table may hold only the ``keys`` (the groups to mark): its
        partial columns are null, which every merge function skips. Null groups
        match as in the merge itself (a join would not match them).
        """
        flag = "_rayflow_marked"
        marked = [t.append_column(flag, pa.repeat(pa.scalar(f), t.num_rows)) for t, f in tables]
        res = self.merge(marked, keys, extra=[(flag, "any")])
        return res.drop_columns([f"{flag}_any"]), res.column(f"{flag}_any")

    def empty_output(self, schema: pa.Schema, keys: list[str], who: str) -> pa.Table:
        """The output (``keys`` + aggregates) of an empty input of ``schema``: its types; an
        :class:`InputError` if pyarrow cannot aggregate it."""
        try:
            return self.present(self.partial(_empty(schema), keys), keys)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            raise InputError(f"{who} cannot run on the input {_columns(schema)}: {_first_line(e)}") from None

    def present(self, t: pa.Table, keys: list[str]) -> pa.Table:
        """The output columns (``keys`` + aggregates) of a merged partial table."""
        cols, names = [t.column(c) for c in keys], list(keys)
        for a in self.aggs:
            if a.fn == "mean":
                s, n = t.column(f"{a.column}_sum"), t.column(f"{a.column}_count")
                col = pc.if_else(pc.equal(n, 0), None, pc.divide(pc.cast(s, pa.float64()), n))
            else:
                col = t.column(a.out)
            cols.append(col)
            names.append(a.out)
        return pa.Table.from_arrays(cols, names=names)

    def check_input(self, schema: pa.Schema, keys: list[str], who: str) -> None:
        """Raise :class:`InputError` for an input column whose type an aggregation refuses.

        The types are checked by pyarrow itself, on an empty table of the
        input's schema: what it accepts here it accepts on every batch.
        """
        empty = _empty(schema)
        for a in self.aggs:
            for col, fn, _ in a.partials():
                try:
                    empty.group_by(keys, use_threads=False).aggregate([(col, fn)])
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
                    raise InputError(
                        f"{who}: ({a.column!r}, {a.fn!r}) cannot aggregate column {col!r} of type "
                        f"{schema.field(col).type} ({_first_line(e)}). Give the column a type it accepts: "
                        f"cast it in an rf.ops.Map before this operator (with output_schema=), "
                        f"or read it with that type (for CSV: rf.sources.CSV(..., convert_options="
                        f"pyarrow.csv.ConvertOptions(column_types={{{col!r}: pyarrow.float64()}})))"
                    ) from None


def as_upserts(t: pa.Table, key: list[str], version: int) -> pa.Table:
    """``t`` as an upsert stream (``rayflow/sinks/base.py``): the version column, and the key
    columns named in the schema metadata."""
    t = t.append_column(VERSION_COLUMN, pa.repeat(pa.scalar(version, pa.int64()), t.num_rows))
    return t.replace_schema_metadata({UPSERT_KEY_METADATA: json.dumps(key).encode()})


#: What an Aggregate emits: ``"final"`` (once, at the end of a bounded input) or ``"changes"``
#: (at each commit, the keys changed since the previous one: an upsert stream).
EMIT_MODES = ("final", "changes")


class Aggregate(Operator):
    """Per-key aggregates: the final result of a bounded input, or an upsert stream.

    ``by`` is a column or list of columns and must include the pipeline's key
    columns (so a group never spans two partitions). ``aggs`` is a list of
    ``(column, function)`` with function one of ``count``, ``sum``, ``min``,
    ``max``, ``mean``; outputs are named ``<column>_<function>``.

    ``emit`` says what is emitted, and when:

    - ``"final"``: every group once, when the bounded input ends (the columns
      ``by`` + outputs); over an unbounded input, never.
    - ``"changes"``: at each commit of a partition, the groups that changed
      since its previous commit, with their new cumulative values: an upsert
      stream (DESIGN §11). Columns ``by`` + outputs + ``_version`` (int64);
      the schema metadata ``rayflow.upsert_key`` names the ``by`` columns
      (``rayflow/sinks/base.py``). The latest row of a group (highest
      ``_version``) is its current value; at the end of a bounded input, the
      latest rows equal the ``"final"`` result. ``rf.sinks.DuckDB`` applies
      the stream as upserts into a keyed table; over a Parquet sink ``rayflow
      sql`` offers the view ``latest``.
    - ``None`` (default): ``"changes"`` when the source is unbounded (its job
      never ends, so a final result never comes), else ``"final"``.

    ``_version`` is the number of rows of the partition processed so far (its
    whole history): it increases across the commits of a partition, across
    failed and retried attempts (rows of one output file may repeat a key: the
    highest version wins), across owners and across a reload under the same
    lease epoch (each restarts from the last recorded commit, which no
    published version exceeds). Only a ``rf.ops.Map`` may follow the
    Aggregate in the chain, and it must keep one row per key, the key values
    and ``_version`` (a Map that drops or re-keys rows leaves stale rows in
    the view: nothing can check that); a Filter or another stateful operator
    is refused (upserts carry no retractions).

    Exactly-once (see :meth:`Operator.flush`): the change set is not part of
    the checkpoint; every commit flushes it first and stages its output with
    that commit, so the committed state never holds a change its committed
    outputs lack, and a new owner restored from it emits exactly the groups
    changed after it. An operator after the Aggregate sees the upserts as
    batches: a ``Filter`` keeps the stream keyed; a ``Map`` must keep the key
    columns, ``_version`` and the schema metadata for a sink to upsert (else
    the rows are appended).

    State is one Arrow table per partition: the group columns plus mergeable
    partials (``mean`` keeps a sum and a count). Each batch is aggregated with
    pyarrow's ``group_by``; partials are merged into the state lazily, once
    they outgrow it, so the cost per batch does not grow with the key count.
    In ``"changes"`` mode the groups a batch touched are kept as Arrow key
    columns until the next flush, which merges the state and marks the
    changed groups in one ``group_by`` (as costly as the snapshot that
    follows it anyway). ``count`` counts non-null values, as pyarrow and SQL's
    ``count(col)`` do; null groups are groups, as in SQL.

    ``combine_at_source=True`` (opt-in; the chain's first operator only) has every source
    combine its batches into partials per group before queueing them, and this operator
    merge those: the remedy for a hot key, whose rows cannot be spread over partitions
    (``docs/skew.md``; exact, positions and row counts unchanged; refused with a
    :class:`ConfigError` where it cannot be exact, see ``_internal/combine.py``).

    Past its share of the consumer's memory (``EngineConfig.consumer_max_bytes``,
    see :meth:`bound_state`) the merged state goes to sorted runs on local disk
    and the operator keeps working, exactly (``docs/large-state.md``).
    """

    stateful = True

    def __init__(
        self,
        by: str | Sequence[str],
        aggs: Sequence[tuple[str, str]],
        *,
        emit: str | None = None,
        combine_at_source: bool = False,
    ):
        self.by = [by] if isinstance(by, str) else list(by)
        if not isinstance(combine_at_source, bool):
            raise ConfigError(
                f"rf.ops.Aggregate: combine_at_source must be True or False, got {combine_at_source!r}"
            )
        #: The hot-key remedy (``_internal/combine.py``, docs/skew.md): the sources send partials.
        self.combine_at_source = combine_at_source
        if not self.by:
            raise ConfigError("rf.ops.Aggregate needs at least one group column in by=")
        if emit is not None and emit not in EMIT_MODES:
            raise ConfigError(
                f"rf.ops.Aggregate: emit must be one of {EMIT_MODES} (or None: changes over an "
                f"unbounded source, final otherwise), got {emit!r}"
            )
        parsed = parse_aggs(aggs, "rf.ops.Aggregate")
        self.aggs = parsed
        self.emit = emit
        self._emit_given = emit  # what the user wrote: the repr names it, not what for_input resolved
        if emit != "final" and VERSION_COLUMN in self.by + [a.out for a in parsed]:
            raise ConfigError(
                f"rf.ops.Aggregate: {VERSION_COLUMN!r} is the version column of the upsert stream "
                "it emits; rename that column (in an rf.ops.Map before it), or use emit='final'"
            )
        self._aggs = Partials(parsed)
        self._partials = self._aggs.partials

    def spec(self) -> dict:
        out = {"type": "Aggregate", "by": self.by, "aggs": [[a.column, a.fn] for a in self.aggs]}
        if self.emit == "changes":  # absent for "final", as in every checkpoint written before it
            out["emit"] = self.emit
        return out

    def __repr__(self) -> str:
        given = getattr(self, "_emit_given", self.emit)
        emit = f", emit={given!r}" if given is not None else ""
        emit += ", combine_at_source=True" if getattr(self, "combine_at_source", False) else ""
        return f"rf.ops.Aggregate(by={self.by}, aggs={[(a.column, a.fn) for a in self.aggs]}{emit})"

    def for_input(self, *, unbounded: bool) -> Aggregate:
        """Resolve ``emit=None``: ``"changes"`` over an unbounded input, ``"final"`` otherwise.
        ``emit="final"`` over an unbounded input would never emit: a :class:`ConfigError`."""
        if self.emit == "final" and unbounded:
            raise ConfigError(
                f"{self!r} has emit='final', but its source is live (it never ends), so it would "
                "never emit anything: leave emit unset (the changed keys are emitted at each "
                "commit) or read a bounded input"
            )
        if self.emit is not None:
            return self
        resolved = copy.copy(self)
        resolved.emit = "changes" if unbounded else "final"
        return resolved

    @property
    def emits_changes(self) -> bool:
        return self.emit == "changes"

    @property
    def group_columns(self) -> list[str]:
        return self.by

    def columns_used(self, schema: pa.Schema) -> list[str]:
        """The ``by`` columns and the aggregated ones: the output depends on nothing else."""
        return list(dict.fromkeys(self.by + [a.column for a in self.aggs]))

    def check_input(self, schema: pa.Schema) -> pa.Schema:
        """Every column must be there, with a type its aggregation accepts; returns the output schema.

        The types are checked by pyarrow itself (:meth:`Partials.check_input`).
        (With ``emit=None`` the schema returned is the final one, without
        ``_version``: the source decides the mode only when the job runs.)
        """
        missing = [c for c in self.by + [a.column for a in self.aggs] if c not in schema.names]
        if missing:
            raise InputError(
                f"rf.ops.Aggregate uses column(s) {missing} that the input does not have; "
                f"its columns are {schema.names}"
            )
        self._aggs.check_input(schema, self.by, repr(self))
        out = self._aggs.empty_output(schema, self.by, repr(self))
        if self.emits_changes:
            out = self._upserts(out, 0)
        return out.schema

    # State: (merged table or None, [pending partial tables], pending rows,
    #         [key tables of the groups changed since the last flush] ("changes" mode only),
    #         [partial tables since the last state_delta] (what an incremental commit writes),
    #         _Spill or None (the memory share and the runs on disk, see bound_state))
    # With runs, the state is the merge of merged, pending and every run (partials merge in any
    # order); a group may have a row in several of them.
    def init_state(self):
        return (None, [], 0, [], [], None)

    def _partial(self, table: pa.Table) -> pa.Table:
        return self._aggs.partial(table, self.by)

    def _merge(self, tables: list[pa.Table], extra: list[tuple[str, str]] = ()) -> pa.Table:
        """Merge partial tables by group; ``extra`` are further (column, function) aggregations."""
        return self._aggs.merge(tables, self.by, extra)

    def process(self, state, table):
        merged, pending, pending_rows, changed, delta, spill = state
        if table.num_rows == 0:
            return state, None
        if is_combined(table):  # partials already (combine_at_source): merged
            part = self._merge([table.select(self.by + self._aggs.state_columns)])
        else:
            part = self._partial(table)
        pending = pending + [part]
        pending_rows += part.num_rows
        if self.emits_changes:  # the batch's groups, unique already: a zero-copy selection
            changed = changed + [part.select(self.by)]
        delta = delta + [part]  # shares the partial's buffers with ``pending``: no copy
        # Merge once the partials outgrow the state: amortized O(rows) per batch. With a memory
        # share, also once they hold a quarter of it (a merge shrinks them to one row a group).
        if pending_rows >= max(65_536, merged.num_rows if merged is not None else 0) or (
            spill is not None and _nbytes(pending) >= spill.max_bytes // 4
        ):
            merged = self._merge(([merged] if merged is not None else []) + pending)
            pending, pending_rows = [], 0
        # The delta, too, is folded once it outgrows the state (or 64k rows): it never holds
        # more rows than the state has groups, even if no commit takes it for a long time. A
        # spilled state's memory part is small: then once it doubles (amortized O(rows) too).
        if len(delta) > 1 and sum(d.num_rows for d in delta) >= max(
            65_536,
            merged.num_rows if merged is not None else 0,
            2 * delta[0].num_rows if spill is not None else 0,
        ):
            delta = [self._merge(delta)]
        state = (merged, pending, pending_rows, changed, delta, spill)
        return self._spill_if_over(state), None

    # ------------------------------------------------------------------ state past memory
    def bound_state(self, state, *, max_bytes: int, spill_dir: str, key: list[str]):
        """Keep at most about ``max_bytes`` of this partition's merged state in memory; the rest
        goes to sorted runs under ``spill_dir`` (``rayflow/_internal/runs.py``), hashed by the
        operator's own group columns ``by``. ``key`` (the job's key) is not used: runs are read
        only by this operator, which looks groups up by ``by``, and the job's key need not name
        columns (a multi-input job's key is ``("a:x", "b:x")``); a checkpoint hashes by the key
        again when it writes.

        Half the share holds the merged state, a quarter the pending partials; the
        rest is left to the delta and the change set, which a commit empties. Past
        that, the merged state is written as a run and memory starts over: a
        group then has rows in memory and in runs, which every read merges
        (partials merge in any order), so results are exact in every emit mode.
        Runs of a size tier are merged once there are 4 (``runs_to_merge``).
        Called again with a new share when the consumer's partitions change;
        spills at once if the state is over it (a restored state, read whole).
        """
        merged, pending, pending_rows, changed, delta, spill = state
        if spill is None:
            spill = _Spill(max_bytes, RunSet(spill_dir, self.by))
        else:
            spill.max_bytes = max_bytes
        return self._spill_if_over((merged, pending, pending_rows, changed, delta, spill))

    def restore_bound(self, chain, *, max_bytes: int, spill_dir: str, key: list[str]):
        """The checkpoint's base and deltas (each an iterable of tables), read a batch at a time
        into a bound state, never whole in memory; equal to :meth:`state_from_tables` then
        :meth:`bound_state`. The base (one row per group) is the merged state, its batches
        written as runs as they pass half the share (no merge needed); the deltas are pending
        partials, folded and spilled as a batch's are. The delta and the change set start
        empty, as :meth:`state_from_tables` leaves them."""
        state = self.bound_state(self.init_state(), max_bytes=max_bytes, spill_dir=spill_dir, key=key)
        spill = state[5]
        files = iter(chain)
        held: list[pa.Table] = []
        for t in next(files, ()):
            if t.num_rows:
                held.append(self._filled(t))
                if _nbytes(held) > max_bytes // 2:
                    self._add_run(spill, pa.concat_tables(held))
                    held = []
        merged = pa.concat_tables(held) if len(held) > 1 else (held[0] if held else None)
        state = (merged, [], 0, [], [], spill)
        for tables in files:
            for t in tables:
                if t.num_rows:
                    merged, pending, rows, changed, delta, _ = state
                    part = self._filled(t)
                    state = (merged, pending + [part], rows + part.num_rows, changed, delta, spill)
                    state = self._spill_if_over(state)
        return state

    def _add_run(self, spill: _Spill, table: pa.Table) -> None:
        """Write ``table`` (one row per group) as a run; merge runs by tier."""
        spill.runs.write(table)
        merge = runs_to_merge([r.nbytes for r in spill.runs.runs])
        if merge:
            spill.runs.merge(merge, self._merge_runs, range_bytes=max(1, spill.max_bytes // 2))

    def _spill_if_over(self, state):
        """Write the in-memory state as a run once it passes half its share; merge runs by tier."""
        merged, pending, pending_rows, changed, delta, spill = state
        if spill is None:
            return state
        small = merged is None or merged.nbytes <= spill.max_bytes // 2
        if small and _nbytes(pending) < spill.max_bytes // 4:
            return state
        mem = self._compact(state)
        if mem is not None and mem.nbytes > spill.max_bytes // 2:
            self._add_run(spill, mem)
            mem = None
        return (mem, [], 0, changed, delta, spill)

    def _merge_runs(self, tables: list[pa.Table]) -> pa.Table:
        """Partials read from runs, merged (one table: a run's rows are one per group already)."""
        return tables[0] if len(tables) == 1 else self._merge(tables)

    def _ranges(self, state):
        """The whole state, merged, one hash range at a time (a spilled state; see ``iter_ranges``)."""
        spill = state[5]
        for parts in iter_ranges(
            spill.runs, self._compact(state), spill.runs.key, range_bytes=max(1, spill.max_bytes // 2)
        ):
            yield self._merge_runs(parts)

    def state_nbytes(self, state) -> tuple[int, int]:
        """(bytes of this state in memory, bytes in runs on local disk). The memory figure counts
        the delta's buffers again where it shares them with the pending partials."""
        merged, pending, _, changed, delta, spill = state
        mem = (merged.nbytes if merged is not None else 0) + _nbytes(pending) + _nbytes(changed)
        return mem + _nbytes(delta), (spill.runs.nbytes if spill is not None else 0)

    def release_state(self, state) -> None:
        """The partition leaves this consumer: delete its runs."""
        if state is not None and state[5] is not None:
            state[5].runs.delete()

    def _compact(self, state) -> pa.Table | None:
        merged, pending = state[0], state[1]
        if not pending:
            return merged
        return self._merge(([merged] if merged is not None else []) + pending)

    def _present(self, t: pa.Table) -> pa.Table:
        """The output columns (``by`` + aggregates) of a merged partial table."""
        return self._aggs.present(t, self.by)

    def _upserts(self, t: pa.Table, version: int) -> pa.Table:
        return as_upserts(t, self.by, version)

    def finish(self, state) -> pa.Table | None:
        """Every group's final values. A spilled state is merged one hash range at a time;
        the result is one table (the operator's output), as large as the result itself."""
        if _spilled(state):
            outs = [self._present(t) for t in self._ranges(state)]
            return pa.concat_tables(outs, promote_options="permissive") if outs else None
        t = self._compact(state)
        if t is None:
            return None
        return self._present(t)

    def flush(self, state, *, version: int) -> tuple[object, pa.Table | None]:
        """The groups changed since the last flush, with their cumulative values (see the class doc).

        One ``group_by`` over the state, the pending partials and the changed
        keys (flagged) merges the state and tells the changed groups at once
        (:meth:`Partials.merge_marked`).
        The change set is emptied: the returned state carries no unflushed change.
        """
        merged, pending, _, changed, delta, spill = state
        if not changed:
            return state, None
        keys = pa.concat_tables(changed, promote_options="permissive")
        if _spilled(state):
            # The changed groups' rows in the runs join the merge; they stay in the runs (the
            # memory part keeps only what it had: a group's rows are never counted twice).
            mem = self._compact(state)
            cold = spill.runs.lookup(hash_table(keys, spill.runs.key))
            base = ([mem] if mem is not None else []) + cold
            every, is_changed = self._aggs.merge_marked([(t, False) for t in base] + [(keys, True)], self.by)
            out = self._present(every.filter(is_changed))
            return self._spill_if_over((mem, [], 0, [], delta, spill)), self._upserts(out, version)
        base = ([merged] if merged is not None else []) + pending
        merged, is_changed = self._aggs.merge_marked([(t, False) for t in base] + [(keys, True)], self.by)
        out = self._present(merged.filter(is_changed))
        return (merged, [], 0, [], delta, spill), self._upserts(out, version)

    def state_to_table(self, state) -> pa.Table:
        """The whole state as one table (a base). A spilled state is merged one hash range at a
        time, but the table returned holds it all: a whole snapshot needs memory for the
        whole state (incremental commits write deltas, and need not)."""
        if _spilled(state):
            parts = list(self._ranges(state))
            if parts:
                return pa.concat_tables(parts, promote_options="permissive")
        t = self._compact(state)
        return t if t is not None else pa.table({c: pa.array([], pa.null()) for c in self.by})

    def state_from_table(self, table: pa.Table):
        """Restore state; partials the checkpoint lacks start empty (schema evolution).

        The resume check (``_internal/compat.py``) only lets an aggregation be
        added over a column that is new in the input, whose past rows had no
        value: for those an empty partial (count 0, else null) is exact. The
        change set starts empty: a snapshot is taken right after a flush.
        """
        if table.num_rows == 0:
            return self.init_state()
        return (self._filled(table), [], 0, [], [], None)

    def _filled(self, table: pa.Table) -> pa.Table:
        """``table``'s group and partial columns, a partial it lacks filled as empty (count 0,
        else null: see :meth:`state_from_table`)."""
        for _, fn, col in self._partials:
            if col not in table.column_names:
                fill = (
                    pa.array([0] * table.num_rows, pa.int64()) if fn == "count" else pa.nulls(table.num_rows)
                )
                table = table.append_column(col, fill)
        return table.select(self.by + [s for _, _, s in self._partials])

    @property
    def incremental(self) -> bool:
        return True

    def state_delta(self, state) -> tuple[object, pa.Table]:
        """The partials of the rows processed since the last call, one row per group they touched.

        Partials merge exactly (counts and sums add, min and max combine), so
        the state equals :meth:`merge_states` of the last snapshot and every
        delta since, in any order. Costs O(rows since the last call), not
        O(state): the delta is kept as the per-batch partials, already computed.
        """
        merged, pending, pending_rows, changed, delta, spill = state
        if not delta:
            out = self._filled(pa.table({c: pa.array([], pa.null()) for c in self.by}))
        else:
            out = delta[0] if len(delta) == 1 else self._merge(delta)
        return (merged, pending, pending_rows, changed, [], spill), self._with_merge_spec(out)

    def merge_states(self, tables: list[pa.Table]) -> pa.Table:
        """One state table from a snapshot and its deltas (see :meth:`state_delta`)."""
        tables = [self._filled(t) for t in tables if t.num_rows]
        if not tables:
            return self._filled(pa.table({c: pa.array([], pa.null()) for c in self.by}))
        return self._with_merge_spec(tables[0] if len(tables) == 1 else self._merge(tables))

    def state_from_tables(self, tables: list[pa.Table]):
        """The snapshot as the merged state, its deltas as pending partials: no merge at restore
        (a new owner starts at once); they fold in later, as every batch's partials do."""
        tables = [t for t in tables if t.num_rows]
        if len(tables) <= 1:
            return self.state_from_table(tables[0]) if tables else self.init_state()
        first, *rest = (self._filled(t) for t in tables)
        return (first, rest, sum(t.num_rows for t in rest), [], [], None)

    def _with_merge_spec(self, t: pa.Table) -> pa.Table:
        """``t`` with how its rows fold (``STATE_MERGE_KEY`` metadata), so ``rayflow sql`` can show
        a base and its deltas as one state without the pipeline at hand."""
        spec = {
            "by": self.by,
            "merge": {col: _MERGE[fn] for _, fn, col in self._partials},
            "zero": [col for _, fn, col in self._partials if fn == "count"],  # a missing count is 0
        }
        return t.replace_schema_metadata({**(t.schema.metadata or {}), STATE_MERGE_KEY: json.dumps(spec)})


@dataclass
class _Spill:
    """A partition's memory share (bytes) and its runs on local disk (``Aggregate.bound_state``)."""

    max_bytes: int
    runs: RunSet


def _spilled(state) -> bool:
    """Whether part of ``state`` is in runs on disk."""
    return state[5] is not None and bool(state[5].runs.runs)


def _nbytes(tables: list[pa.Table]) -> int:
    return sum(t.nbytes for t in tables)
