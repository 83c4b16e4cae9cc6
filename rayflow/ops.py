"""Operators: what a consumer does to each partition's batches (DESIGN §2.4).

An operator turns one partition's Arrow table into output, and may keep
per-partition state. State is Arrow data, never one Python object per key,
so it is cheap to merge, to snapshot to Parquet and to restore.

- :class:`Map` — ``fn(table) -> table``, stateless.
- :class:`Filter` — keeps the rows where a ``pyarrow.compute`` expression holds.
- :class:`Aggregate` — per-key aggregates over the whole (bounded) stream,
  emitted once, when the input ends. Supports ``count``, ``sum``, ``min``,
  ``max`` and ``mean`` with pyarrow's output naming (``value_count``, ...).

A list of operators is a chain: each one's output is the next one's input, and
what a stateful operator emits when the input ends flows through the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from rayflow.errors import ConfigError, InputError

__all__ = ["Aggregate", "Filter", "Map", "Operator"]


class Operator:
    """Base class. Stateless operators only implement :meth:`process`."""

    #: Whether the operator keeps per-partition state that must be checkpointed.
    stateful = False

    def init_state(self):
        return None

    def process(self, state, table: pa.Table) -> tuple[object, pa.Table | None]:
        """Return ``(new_state, output or None)`` for one input table."""
        raise NotImplementedError

    def finish(self, state) -> pa.Table | None:
        """Output to emit when the bounded input ends (stateful operators)."""
        return None

    def state_to_table(self, state) -> pa.Table:
        raise NotImplementedError

    def state_from_table(self, table: pa.Table):
        raise NotImplementedError

    def spec(self) -> dict:
        """What a resumed run checks against the checkpoint (``_internal/compat.py``)."""
        return {"type": type(self).__name__}


class Map(Operator):
    """Apply ``fn`` (Arrow table -> Arrow table or record batch) to every batch."""

    def __init__(self, fn: Callable[[pa.Table], pa.Table | pa.RecordBatch]):
        if not callable(fn):
            raise ConfigError(f"rf.ops.Map needs a callable, got {fn!r}")
        self.fn = fn

    def process(self, state, table):
        out = self.fn(table)
        if isinstance(out, pa.RecordBatch):
            out = pa.Table.from_batches([out])
        if not isinstance(out, pa.Table):
            raise InputError(
                f"rf.ops.Map function {getattr(self.fn, '__name__', self.fn)!r} returned "
                f"{type(out).__name__}; it must return a pyarrow Table or RecordBatch"
            )
        return state, out


class Filter(Operator):
    """Keep the rows for which ``expr`` (a ``pyarrow.compute.Expression``) is true."""

    def __init__(self, expr: pc.Expression):
        if not isinstance(expr, pc.Expression):
            raise ConfigError(
                f"rf.ops.Filter needs a pyarrow.compute expression such as "
                f"pc.field('value') > 10, got {expr!r}"
            )
        self.expr = expr

    def process(self, state, table):
        return state, table.filter(self.expr)


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
SUPPORTED_AGGS = ("count", "sum", "min", "max", "mean")


class Aggregate(Operator):
    """Per-key aggregates over the whole stream, emitted when the input ends.

    ``by`` is a column or list of columns and must include the pipeline's key
    columns (so a group never spans two partitions). ``aggs`` is a list of
    ``(column, function)`` with function one of ``count``, ``sum``, ``min``,
    ``max``, ``mean``; outputs are named ``<column>_<function>``.

    State is one Arrow table per partition: the group columns plus mergeable
    partials (``mean`` keeps a sum and a count). Each batch is aggregated with
    pyarrow's ``group_by``; partials are merged into the state lazily, once
    they outgrow it, so the cost per batch does not grow with the key count.
    ``count`` counts non-null values, as pyarrow and SQL's ``count(col)`` do.
    """

    stateful = True

    def __init__(self, by: str | Sequence[str], aggs: Sequence[tuple[str, str]]):
        self.by = [by] if isinstance(by, str) else list(by)
        if not self.by:
            raise ConfigError("rf.ops.Aggregate needs at least one group column in by=")
        if not aggs:
            raise ConfigError("rf.ops.Aggregate needs at least one (column, function) in aggs=")
        parsed = []
        for a in aggs:
            if not (isinstance(a, (tuple, list)) and len(a) == 2):
                raise ConfigError(f"rf.ops.Aggregate: each agg is (column, function), got {a!r}")
            col, fn = a
            if fn not in SUPPORTED_AGGS:
                raise ConfigError(
                    f"rf.ops.Aggregate: function {fn!r} on column {col!r} is not supported; "
                    f"use one of {', '.join(SUPPORTED_AGGS)}"
                )
            parsed.append(_Agg(col, fn))
        self.aggs = parsed
        self._partials = list(dict.fromkeys(p for a in parsed for p in a.partials()))

    def spec(self) -> dict:
        return {"type": "Aggregate", "by": self.by, "aggs": [[a.column, a.fn] for a in self.aggs]}

    def check_input(self, schema: pa.Schema) -> None:
        missing = [c for c in self.by + [a.column for a in self.aggs] if c not in schema.names]
        if missing:
            raise InputError(
                f"rf.ops.Aggregate uses column(s) {missing} that the input does not have; "
                f"its columns are {schema.names}"
            )

    # State: (merged table or None, [pending partial tables], pending rows)
    def init_state(self):
        return (None, [], 0)

    def _partial(self, table: pa.Table) -> pa.Table:
        res = table.group_by(self.by, use_threads=False).aggregate([(c, f) for c, f, _ in self._partials])
        names = self.by + [s for _, _, s in self._partials]
        cols = [res.column(c) for c in self.by] + [res.column(f"{c}_{f}") for c, f, _ in self._partials]
        return pa.Table.from_arrays(cols, names=names)

    def _merge(self, tables: list[pa.Table]) -> pa.Table:
        t = pa.concat_tables(tables, promote_options="permissive")
        res = t.group_by(self.by, use_threads=False).aggregate([(s, _MERGE[f]) for _, f, s in self._partials])
        cols = [res.column(c) for c in self.by] + [
            res.column(f"{s}_{_MERGE[f]}") for _, f, s in self._partials
        ]
        return pa.Table.from_arrays(cols, names=self.by + [s for _, _, s in self._partials])

    def process(self, state, table):
        merged, pending, pending_rows = state
        if table.num_rows == 0:
            return state, None
        part = self._partial(table)
        pending = pending + [part]
        pending_rows += part.num_rows
        # Merge once the partials outgrow the state: amortized O(rows) per batch.
        if pending_rows >= max(65_536, merged.num_rows if merged is not None else 0):
            merged = self._merge(([merged] if merged is not None else []) + pending)
            pending, pending_rows = [], 0
        return (merged, pending, pending_rows), None

    def _compact(self, state) -> pa.Table | None:
        merged, pending, _ = state
        if not pending:
            return merged
        return self._merge(([merged] if merged is not None else []) + pending)

    def finish(self, state) -> pa.Table | None:
        t = self._compact(state)
        if t is None:
            return None
        cols, names = [t.column(c) for c in self.by], list(self.by)
        for a in self.aggs:
            if a.fn == "mean":
                s, n = t.column(f"{a.column}_sum"), t.column(f"{a.column}_count")
                col = pc.if_else(pc.equal(n, 0), None, pc.divide(pc.cast(s, pa.float64()), n))
            else:
                col = t.column(a.out)
            cols.append(col)
            names.append(a.out)
        return pa.Table.from_arrays(cols, names=names)

    def state_to_table(self, state) -> pa.Table:
        t = self._compact(state)
        return t if t is not None else pa.table({c: pa.array([], pa.null()) for c in self.by})

    def state_from_table(self, table: pa.Table):
        """Restore state; partials the checkpoint lacks start empty (schema evolution).

        The resume check (``_internal/compat.py``) only lets an aggregation be
        added over a column that is new in the input, whose past rows had no
        value: for those an empty partial (count 0, else null) is exact.
        """
        if table.num_rows == 0:
            return self.init_state()
        for _, fn, col in self._partials:
            if col not in table.column_names:
                fill = (
                    pa.array([0] * table.num_rows, pa.int64()) if fn == "count" else pa.nulls(table.num_rows)
                )
                table = table.append_column(col, fill)
        return (table.select(self.by + [s for _, _, s in self._partials]), [], 0)


def as_chain(operator: Operator | Sequence[Operator] | None) -> list[Operator]:
    if operator is None:
        return []
    ops = [operator] if isinstance(operator, Operator) else list(operator)
    for op in ops:
        if not isinstance(op, Operator):
            raise ConfigError(f"operator must be an rf.ops operator or a list of them, got {op!r}")
    return ops
