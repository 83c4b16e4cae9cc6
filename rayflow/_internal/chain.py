"""Running a chain of operators over one partition's tables (pure, no Ray)."""

from __future__ import annotations

import pyarrow as pa

from rayflow.errors import ConfigError
from rayflow.ops.base import WATERMARK_END, Operator, side_stream, side_stream_of
from rayflow.ops.stateless import Filter

#: Attribute set on an exception raised inside an operator: the driver hands such an
#: exception back to the user as it is (``operator_error``), not wrapped in Ray's error.
_OPERATOR_ATTR = "_rayflow_operator"


def operator_error(e: BaseException) -> BaseException | None:
    """The exception an operator raised, if ``e`` is one (or a Ray error whose cause is one)."""
    cause = getattr(e, "cause", None)  # RayTaskError keeps the remote exception as .cause
    for x in (cause, e):
        if isinstance(x, BaseException) and _OPERATOR_ATTR in getattr(x, "__dict__", {}):
            return x
    return None


def _tag(e: Exception, index: int, op: Operator, partition: int | None) -> None:
    """Name the operator (and partition) on an exception it raised, once, in a note."""
    if _OPERATOR_ATTR in e.__dict__:
        return  # raised by a later operator of the same chain, already named
    where = f" of partition {partition}" if partition is not None else ""
    setattr(e, _OPERATOR_ATTR, f"#{index} {op!r}")
    e.add_note(f"raised by operator #{index} {op!r}{where}")


def _check_after_changes(ops: list[Operator], changes: list[int]) -> None:
    """Refuse what cannot follow an upsert stream (an operator emitting changes, or a Window that
    updates its windows with late rows).

    The stream carries new values of keys, never retractions: a ``Filter``
    that drops a key's new value would leave its old value in the view, and
    another stateful operator would aggregate every version as a new event.
    A ``Map`` may follow: it must keep one row per key, the key values and
    ``_version`` (the sinks check that the key columns and ``_version`` are
    there; a Map that drops or re-keys rows cannot be checked and would leave
    stale rows in the view).
    """
    if not changes:
        return
    first = changes[0]
    for i in range(first + 1, len(ops)):
        op = ops[i]
        if op.stateful or isinstance(op, Filter):
            raise ConfigError(
                f"operator #{i} {op!r} follows #{first} {ops[first]!r}, which emits the changed "
                "keys at each commit (an upsert stream: a live source, or emit='changes'). Upserts "
                "carry no retractions, so a Filter would leave a key's old value in the view and "
                "a second Aggregate would count every version again: filter before the "
                "Aggregate, run the rollup as a second stage over the first one's output, or use "
                "emit='final' over a bounded input"
            )


class Chain:
    """A list of operators run in order; stateful ones absorb input and emit at the end
    (:meth:`finish`) or at each commit (:meth:`flush`, operators that emit changes).

    States are a list aligned with the operators (``None`` for stateless ones).
    An exception raised by an operator propagates unchanged, with a note that
    names the operator and the partition (see :func:`operator_error`).
    """

    def __init__(self, ops: list[Operator]):
        self.ops = ops
        self.stateful_indices = [i for i, op in enumerate(ops) if op.stateful]
        #: Stateful operators that emit their changes at each commit (:meth:`flush`).
        self.changes_indices = [i for i in self.stateful_indices if ops[i].emits_changes]
        #: Operators that use event time: advanced with the partition's watermark (:meth:`advance`).
        self.event_indices = [i for i, op in enumerate(ops) if op.uses_event_time]
        _check_after_changes(ops, [i for i, op in enumerate(ops) if op.emits_upserts])
        #: Side streams (``Operator.side_sinks``), named ``op<index>-<name>`` in the chain.
        self.side_sinks = {
            _side_name(i, name): sink for i, op in enumerate(ops) for name, sink in op.side_sinks().items()
        }

    def for_input(self, *, unbounded: bool) -> Chain:
        """The chain as it runs over a bounded or an unbounded input (``Operator.for_input``:
        an ``Aggregate(emit=None)`` emits changes over an unbounded one)."""
        return Chain([op.for_input(unbounded=unbounded) for op in self.ops])

    def init_states(self) -> list:
        return [op.init_state() for op in self.ops]

    def check_input(self, schema: pa.Schema) -> pa.Schema | None:
        """Check each operator against the schema of its input, before the job starts; returns
        the chain's output schema, or ``None`` when it is unknown.

        The schema flows from one operator to the next while it is known: a
        ``Filter`` keeps it, an ``Aggregate`` gives its output's; after an
        operator whose output is unknown (a ``Map`` without ``output_schema``)
        the rest is checked only when it runs.
        """
        for op in self.ops:
            schema = op.check_input(schema)
            if schema is None:
                return None
        return schema

    def _run_from(
        self, states: list, start: int, table: pa.Table | None, out: list[pa.Table], partition: int | None
    ) -> None:
        """Run ``table`` (the output of operator ``start - 1``) through operators ``start`` on.
        A side stream goes to ``out`` as it is, past the rest (renamed for the chain)."""
        for i in range(start, len(self.ops)):
            if table is None:
                return
            side = side_stream_of(table) if i > 0 else None
            if side is not None:
                table = side_stream(table, _side_name(i - 1, side))
                break
            try:
                states[i], table = self.ops[i].process(states[i], table)
            except Exception as e:
                _tag(e, i, self.ops[i], partition)
                raise
        else:
            if table is not None and self.ops and (side := side_stream_of(table)) is not None:
                table = side_stream(table, _side_name(len(self.ops) - 1, side))
        if table is not None and table.num_rows:
            out.append(table)

    def process(self, states: list, table: pa.Table, *, partition: int | None = None) -> list[pa.Table]:
        """Feed one table; states are updated in place; returns the outputs."""
        out: list[pa.Table] = []
        self._run_from(states, 0, table, out, partition)
        return out

    def advance(
        self, states: list, watermark_ms: int, *, version: int, partition: int | None = None
    ) -> list[pa.Table]:
        """The partition's watermark is ``watermark_ms``: each operator that uses event time
        emits what it closes, in chain order, through the rest (a later one sees an earlier one's
        output before its own advance). States are updated in place; returns the outputs."""
        out: list[pa.Table] = []
        for i in self.event_indices:
            try:
                states[i], table = self.ops[i].on_watermark(states[i], watermark_ms, version=version)
            except Exception as e:
                _tag(e, i, self.ops[i], partition)
                raise
            self._run_from(states, i + 1, table, out, partition)
        return out

    def finish(self, states: list, *, version: int = 0, partition: int | None = None) -> list[pa.Table]:
        """End of input: each stateful operator's final output flows through the rest.

        An operator that emits changes flushes instead (its last changes, as
        ``version``): its earlier flushes already emitted the rest. An operator
        that uses event time is advanced to the end of time instead
        (:data:`WATERMARK_END`): every window closes.
        """
        out: list[pa.Table] = []
        for i in sorted(set(self.stateful_indices) | set(self.event_indices)):
            op = self.ops[i]
            try:
                if op.uses_event_time:
                    states[i], table = op.on_watermark(states[i], WATERMARK_END, version=version)
                elif op.emits_changes:
                    states[i], table = op.flush(states[i], version=version)
                else:
                    table = op.finish(states[i])
            except Exception as e:
                _tag(e, i, op, partition)
                raise
            self._run_from(states, i + 1, table, out, partition)
        return out

    def flush(self, states: list, *, version: int, partition: int | None = None) -> list[pa.Table]:
        """A commit is due: each change-emitting operator's changes since its last flush, with
        ``version``, flow through the rest (in chain order, so a later one flushes what an
        earlier one's changes changed in it). States are updated in place.

        The caller stages the outputs with the commit it is about to write, and
        never calls this twice for one commit: the changes are gone from the
        states once returned (see ``Operator.flush``).
        """
        out: list[pa.Table] = []
        for i in self.changes_indices:
            try:
                states[i], table = self.ops[i].flush(states[i], version=version)
            except Exception as e:
                _tag(e, i, self.ops[i], partition)
                raise
            self._run_from(states, i + 1, table, out, partition)
        return out

    def metrics(self, states: list) -> dict[str, int]:
        """The operators' metrics (``Operator.metrics``) of one partition, summed by name."""
        out: dict[str, int] = {}
        for i in self.stateful_indices:
            for k, v in self.ops[i].metrics(states[i]).items():
                out[k] = out.get(k, 0) + v
        return out

    def spec(self) -> list[dict]:
        return [op.spec() for op in self.ops]


def _side_name(index: int, name: str) -> str:
    """A side stream's name in the chain: the operator's index keeps two Windows' apart."""
    return f"op{index}-{name}"
