"""The operator contract (:class:`Operator`), side streams and watermark constants.

An operator turns one partition's Arrow table into output, and may keep
per-partition state. State is Arrow data, never one Python object per key,
so it is cheap to merge, to snapshot to Parquet and to restore.

A list of operators is a chain (``rayflow/_internal/chain.py``): each one's
output is the next one's input, and what a stateful operator emits when the
input ends (:meth:`Operator.finish`), at a commit (:meth:`Operator.flush`) or
when the partition's watermark advances (:meth:`Operator.on_watermark`) flows
through the rest.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pyarrow as pa

from rayflow.errors import ConfigError

#: Schema metadata that marks a table as a *side stream* (its value: the stream's name, see
#: :meth:`Operator.side_sinks`): the chain hands it to that stream's sink, past the operators
#: after the one that emitted it (late rows of a Window go to its ``late_sink``).
SIDE_STREAM_METADATA = b"rayflow.side_stream"


#: The watermark before any event time is known, and at the end of a bounded input (int64 ms).
WATERMARK_NONE = -(2**63)
WATERMARK_END = 2**63 - 1


def side_stream(table: pa.Table, name: str) -> pa.Table:
    """``table`` marked as the side stream ``name`` (see :data:`SIDE_STREAM_METADATA`)."""
    meta = dict(table.schema.metadata or {})
    meta[SIDE_STREAM_METADATA] = name.encode()
    return table.replace_schema_metadata(meta)


def without_side_stream(table: pa.Table) -> pa.Table:
    """``table`` without the side-stream mark (as a sink stores it: a later reader of the file
    must not take its rows for a side stream)."""
    meta = table.schema.metadata
    if not meta or SIDE_STREAM_METADATA not in meta:
        return table
    return table.replace_schema_metadata({k: v for k, v in meta.items() if k != SIDE_STREAM_METADATA} or None)


def filled_event_time(op: Operator, column: str | None) -> Operator:
    """``op`` (an operator with an ``event_time`` attribute) with the pipeline's event-time
    ``column`` where it names none: a shallow copy, so the user's object is left as it was.
    Raises :class:`ConfigError` when neither names one."""
    if op.event_time is not None:
        return op
    if column is None:
        raise ConfigError(
            f"{op!r} needs an event-time column: pass event_time= to it, or give the pipeline "
            "event_time='<column>'"
        )
    filled = copy.copy(op)
    filled.event_time = column
    return filled


def side_stream_of(table: pa.Table) -> str | None:
    """The side stream ``table`` belongs to, or ``None`` for the main output."""
    raw = (table.schema.metadata or {}).get(SIDE_STREAM_METADATA)
    return raw.decode() if raw is not None else None


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

    def for_input(self, *, unbounded: bool) -> Operator:
        """This operator as it runs over a bounded or an unbounded input (the consumer asks once,
        at start); the default runs the same either way."""
        return self

    @property
    def emits_changes(self) -> bool:
        """Whether :meth:`flush` emits at each commit (and :meth:`finish` is not called)."""
        return False

    def flush(self, state, *, version: int) -> tuple[object, pa.Table | None]:
        """A commit is about to snapshot ``state``: return ``(new_state, output or None)``, the
        output being what changed since the previous flush, as an upsert stream whose
        ``_version`` column is ``version`` (see ``rayflow/sinks/base.py``).

        Guarantee the engine relies on (exactly-once): the returned state
        carries no change that the output lacks, so the snapshot taken right
        after and the output staged with it describe the same history, and a
        new owner restored from that snapshot emits exactly the keys changed
        after it. Called only when :attr:`emits_changes`.
        """
        return state, None

    def state_to_table(self, state) -> pa.Table:
        raise NotImplementedError

    def state_from_table(self, table: pa.Table):
        raise NotImplementedError

    @property
    def incremental(self) -> bool:
        """Whether a commit may write only what changed (:meth:`state_delta`) instead of the whole
        state (DESIGN §5: commit cost follows change, not size)."""
        return False

    def state_delta(self, state) -> tuple[object, pa.Table]:
        """``(new_state, delta)``: what changed since the previous call, as a state table that
        :meth:`merge_states` folds into the snapshot before it. Called at every commit of an
        :attr:`incremental` operator (whether the commit then writes the delta or the whole
        state), so the returned state tracks changes from here on."""
        raise NotImplementedError

    def merge_states(self, tables: list[pa.Table]) -> pa.Table:
        """One state table from a snapshot (:meth:`state_to_table`) and the deltas after it, in
        commit order; what :meth:`state_from_table` then restores (incremental operators)."""
        raise NotImplementedError

    def state_from_tables(self, tables: list[pa.Table]):
        """Restore state from a snapshot and the deltas after it (one table: a snapshot alone).
        An operator may keep them apart and fold them lazily, as long as it behaves as if they
        were folded by :meth:`merge_states`."""
        return self.state_from_table(tables[0] if len(tables) == 1 else self.merge_states(tables))

    # ------------------------------------------------------------------ state and memory
    def bound_state(self, state, *, max_bytes: int, spill_dir: str, key: list[str]):
        """The consumer grants one partition's ``state`` about ``max_bytes`` of memory: return the
        state to go on with. An operator that can keep the cold part of its state on local disk
        does so under ``spill_dir`` (its own directory, for this partition and operator); it must
        stay exact, and delete its files in :meth:`release_state`. ``key`` is the job's key,
        which need not name columns of the operator's input (a multi-input job's is
        ``("a:x", "b:x")``): hash by the operator's own columns (``Aggregate``: its ``by``).

        Called from a worker thread (I/O is allowed) when a partition's state is
        created or restored, and again with a new share when the consumer's
        partitions change (``rayflow/_internal/runs.py``: ``state_share``). The
        default keeps everything in memory and returns ``state`` as it is.
        """
        return state

    @property
    def restores_bound(self) -> bool:
        """Whether :meth:`restore_bound` is implemented (derived: an operator overrides it): the
        consumer then restores a running partition's state by streaming its checkpoint files
        through it, never whole in memory."""
        return type(self).restore_bound is not Operator.restore_bound

    def restore_bound(self, chain, *, max_bytes: int, spill_dir: str, key: list[str]):
        """A state restored from ``chain`` (the checkpoint's files for this operator, a base then
        its deltas: each an iterable of tables, read a batch at a time) and bound as
        :meth:`bound_state` binds one: it must equal ``bound_state(state_from_tables(whole
        tables))`` and keep at most about ``max_bytes`` in memory. Only called where
        :attr:`restores_bound` is true."""
        raise NotImplementedError

    def state_nbytes(self, state) -> tuple[int, int]:
        """``(bytes in memory, bytes on local disk)`` of one partition's ``state``, for the
        consumer's status. The default counts the Arrow data the state holds (tables, arrays,
        in tuples, lists and dicts) and no disk."""
        return _arrow_nbytes(state), 0

    def release_state(self, state) -> None:
        """The partition leaves this consumer (released, moved, fenced, or the consumer stops):
        delete what :meth:`bound_state` put on disk. The default does nothing."""

    def spec(self) -> dict:
        """What a resumed run checks against the checkpoint (``_internal/compat.py``)."""
        return {"type": type(self).__name__}

    def check_input(self, schema: pa.Schema) -> pa.Schema | None:
        """Refuse, before the job starts, an input this operator cannot process.

        ``schema`` is the schema of the tables the operator will get. Raises
        :class:`~rayflow.errors.InputError` naming the operator, the column, its
        type and what to do. Returns the schema of the operator's output, or
        ``None`` when it cannot be known before running (then the operators
        after this one are not checked at start). The base class knows nothing
        of the output: ``None``.
        """
        return None

    def columns_used(self, schema: pa.Schema) -> list[str] | None:
        """The input columns this operator's output depends on (all it reads or passes on), or
        ``None``: unknown, or all of them (the default).

        The engine reads only these (with the key and the event-time column) from a source
        that can project (``rf.sources.Parquet``) when this is the first operator of the
        chain; so an operator that says which columns it uses must give the same output from a
        table holding just those.
        """
        return None

    # ------------------------------------------------------------------ event time (DESIGN §11)
    #: The event-time column the operator reads (int64 milliseconds or an Arrow timestamp), or
    #: ``None``: the pipeline's ``event_time`` (:meth:`with_event_time`). Only operators that
    #: use event time (:attr:`uses_event_time`) have one.
    event_time: str | None = None

    @property
    def uses_event_time(self) -> bool:
        """Whether the operator needs an event-time column and the partition's watermark."""
        return False

    def with_event_time(self, column: str | None) -> Operator:
        """This operator with the pipeline's event-time column filled in where it names none
        (the Pipeline calls this once). Raises :class:`ConfigError` when it uses event time and
        neither names a column. The default (no event time) returns ``self``."""
        return self

    def on_watermark(self, state, watermark_ms: int, *, version: int) -> tuple[object, pa.Table | None]:
        """The partition's watermark is now ``watermark_ms``: return ``(new_state, output or None)``.

        Called by the chain after each processed batch (so an operator may
        also emit what its last ``process`` changed, e.g. an updated window),
        and when the watermark moves without new rows (an idle split skipped).
        At the end of a bounded input the chain advances it to
        :data:`WATERMARK_END` (every window closes) and :meth:`finish` is not
        called for operators that use event time.
        ``watermark_ms`` never goes back. ``version`` is the ``_version`` an
        upsert stream emitted now must carry (it grows with the rows the
        partition processed, see ``rf.ops.Aggregate``).

        Exactly-once relies on: the state returned holds no emission its
        output lacks, and advancing a state restored from a commit with the
        watermark committed with it emits nothing (the commit's outputs
        already hold it). The default does nothing.
        """
        return state, None

    def metrics(self, state) -> dict[str, int]:
        """Counters and gauges of one partition's ``state`` for ``run.status()`` and Prometheus
        (e.g. ``late_rows``, ``open_windows``, ``state_rows``); summed over partitions where shown
        in total. Counters must live in the state (checkpointed), so they are exact across
        failures. The default: none."""
        return {}

    def side_sinks(self) -> dict[str, object]:
        """Side streams this operator emits (stream name -> its ``rf.sinks`` sink); stream names
        are unique in a chain. The default: none."""
        return {}

    @property
    def group_columns(self) -> list[str] | None:
        """The columns a stateful operator groups its state by; they must include the pipeline's
        key (else a group would span partitions: the Pipeline refuses it). ``None``: no groups."""
        return None

    @property
    def emits_upserts(self) -> bool:
        """Whether the output is an upsert stream (new values of keys, no retractions): a Filter
        or another stateful operator cannot follow it (see ``_internal/chain.py``)."""
        return self.emits_changes


def _arrow_nbytes(obj, depth: int = 0) -> int:
    """Bytes of the Arrow data in ``obj`` (a table, batch or array, or containers of them)."""
    if isinstance(obj, (pa.Table, pa.RecordBatch, pa.Array, pa.ChunkedArray)):
        return obj.nbytes
    if depth < 4 and isinstance(obj, (tuple, list)):
        return sum(_arrow_nbytes(x, depth + 1) for x in obj)
    if depth < 4 and isinstance(obj, dict):
        return sum(_arrow_nbytes(x, depth + 1) for x in obj.values())
    return 0


def _columns(schema: pa.Schema) -> list[tuple[str, str]]:
    return [(f.name, str(f.type)) for f in schema]


def _empty(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def _first_line(e: BaseException) -> str:
    """pyarrow's message without the schema dump some errors append."""
    return str(e).split("\n", 1)[0]


def as_chain(operator: Operator | Sequence[Operator] | None) -> list[Operator]:
    if operator is None:
        return []
    ops = [operator] if isinstance(operator, Operator) else list(operator)
    for op in ops:
        if not isinstance(op, Operator):
            raise ConfigError(f"operator must be an rf.ops operator or a list of them, got {op!r}")
    return ops
