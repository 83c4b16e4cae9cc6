"""Combining at the source: the hot-key remedy for decomposable aggregates (docs/skew.md).

One hot key cannot be split by range: all its rows hash to one value, so one partition, so
one consumer. But an ``rf.ops.Aggregate`` needs only partial aggregates of them, and partials
merge exactly (counts and sums add, min and max combine; ``mean`` is a sum and a count). With
``rf.ops.Aggregate(..., combine_at_source=True)`` as the chain's first operator, each source
actor combines every per-partition sub-batch it queues into one row per group
(:meth:`Combiner.combine`: one ``group_by`` over the sub-batch, after routing), and the
consumer's Aggregate merges those partials instead of aggregating rows. A hot key's
thousands of rows in a batch reach its consumer as one row.

**Exact, positions unchanged.** A combined sub-batch covers the same positions as the rows
it replaces (``[first, end)`` of its split); it is made after routing, so a replay that cuts a
batch at a committed position cuts the raw rows first. Restarts, replays and hand-overs see
the same partials the first run did, and the result equals the uncombined run (tested against
DuckDB).

**Rows stay input rows.** A combined sub-batch carries ``_rayflow_rows`` (the input rows of
each group): the sources count queued and routed rows, and the consumers processed and
committed rows, as input rows (:func:`input_rows`), so lag, rates, the skew figures and
``result.stats["events"]`` mean what they mean without combining.

**Opt-in**, because it has a price: a ``group_by`` per sub-batch at the source (worth it when
batches repeat keys, which skew is; a cost when every key is new) and it only fits some jobs.
:func:`combiner_for` refuses, with a :class:`ConfigError` that says why, a job where the
Aggregate is not the first operator (the source sees raw input rows only), one with event time
(a combined row has no single event time), one that reads several inputs with their own keys,
and one with splits whose positions have gaps (Kafka: a served batch may be cut at a row's
position, which a combined row no longer has).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from rayflow.errors import ConfigError

#: The column of a combined sub-batch that holds each group's number of input rows.
COMBINED_ROWS = "_rayflow_rows"
#: Schema metadata that marks a combined sub-batch (an input column that happens to be named
#: ``_rayflow_rows`` is not taken for one).
COMBINED_KEY = b"rayflow.combined"


@dataclass(frozen=True)
class Combiner:
    """Combines a sub-batch into one row per group of ``by``: the group columns, then one
    column per partial ``(input column, pyarrow function, state column)``, then
    :data:`COMBINED_ROWS`. Picklable (it travels in the job file)."""

    by: tuple[str, ...]
    partials: tuple[tuple[str, str, str], ...]

    def combine(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        t = pa.Table.from_batches([batch]).group_by(list(self.by), use_threads=False)
        res = t.aggregate([(c, f) for c, f, _ in self.partials] + [([], "count_all")])
        cols = [res.column(c) for c in self.by] + [res.column(f"{c}_{f}") for c, f, _ in self.partials]
        cols.append(res.column("count_all"))
        names = list(self.by) + [s for _, _, s in self.partials] + [COMBINED_ROWS]
        out = pa.Table.from_arrays(cols, names=names).combine_chunks()
        out = out.replace_schema_metadata({COMBINED_KEY: b"1"})
        batches = out.to_batches()
        return batches[0] if batches else pa.RecordBatch.from_pylist([], schema=out.schema)


def is_combined(table: pa.Table | pa.RecordBatch) -> bool:
    """Whether ``table`` is made of combined sub-batches (:meth:`Combiner.combine`)."""
    meta = table.schema.metadata
    return bool(meta) and COMBINED_KEY in meta and COMBINED_ROWS in table.schema.names


def input_rows(table: pa.Table | pa.RecordBatch) -> int:
    """The input rows a (sub-)batch stands for: its ``_rayflow_rows`` summed when combined, else
    its row count."""
    if is_combined(table):
        return int(pc.sum(table.column(COMBINED_ROWS)).as_py() or 0)
    return table.num_rows


def combiner_for(
    operators: Sequence,
    *,
    key: Sequence[str],
    event_time=None,
    splits: Sequence = (),
    multi_input: bool = False,
) -> Combiner | None:
    """The job's combiner (pure): None unless some operator asks for ``combine_at_source``;
    a :class:`ConfigError` where it cannot be exact (see the module doc)."""
    from rayflow.ops.aggregate import Aggregate

    asking = [i for i, op in enumerate(operators) if getattr(op, "combine_at_source", False)]
    if not asking:
        return None
    op = operators[asking[0]]
    why = None
    if asking[0] != 0:
        why = (
            f"it is operator {asking[0]} of the chain; the sources see the input rows, so only the "
            "chain's first operator can be combined there: put the Aggregate first (a Map or "
            "Filter before it can often be folded into the input), or drop combine_at_source"
        )
    elif not isinstance(op, Aggregate):
        why = f"{type(op).__name__} cannot combine at the source; only rf.ops.Aggregate can"
    elif event_time is not None:
        why = "the pipeline has event_time, and a combined row has no single event time: drop one of the two"
    elif multi_input:
        why = "the pipeline reads several inputs, each with its own key: drop combine_at_source"
    else:
        why = _gaps(splits)
    if why is not None:
        raise ConfigError(f"{op!r} has combine_at_source=True, but {why}")
    missing = [c for c in key if c not in op.by]
    if missing:  # Aggregate.check_input says so too; here for a job checked in another order
        raise ConfigError(f"{op!r}: by= must include the pipeline's key columns; {missing} are missing")
    return Combiner(by=tuple(op.by), partials=tuple(op._aggs.partials))


def _gaps(splits: Sequence) -> str | None:
    """Why ``splits`` cannot be combined (None: they can): one has positions with gaps."""
    gaps = next((s.name for s in splits if not getattr(s, "dense", True)), None)
    if gaps is None:
        return None
    return (
        f"split {gaps!r} has positions with gaps (a Kafka partition); a batch of it may be cut "
        "at a row's position, which a combined row does not have: drop combine_at_source"
    )


def check_new_splits(combiner: Combiner | None, splits: Sequence) -> None:
    """Splits a dynamic source lists after the start (pure): a :class:`ConfigError` if the job
    combines and one has positions with gaps. :func:`combiner_for` checks the splits of the
    start only, and a dynamic source may list none then (or other kinds later)."""
    why = _gaps(splits) if combiner is not None else None
    if why is not None:
        raise ConfigError(f"Aggregate(combine_at_source=True) over {combiner.by}: {why}")
