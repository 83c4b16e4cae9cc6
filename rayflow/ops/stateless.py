"""The stateless operators: :class:`Map` (a function per batch) and :class:`Filter` (an expression)."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from rayflow.errors import ConfigError, InputError
from rayflow.ops.base import Operator, _columns, _empty, _first_line


class Map(Operator):
    """Apply ``fn`` (Arrow table -> Arrow table or record batch) to every batch.

    What ``fn`` returns cannot be known before it runs, so the operators after
    a Map are not checked against the input at start, unless ``output_schema``
    declares the columns (names and types) ``fn`` returns: then they are, and
    every output of ``fn`` is checked against it (an :class:`InputError` if it
    differs).

    An exception raised by ``fn`` fails the job, and ``run()`` / ``wait()``
    raise that same exception (with a note naming the operator, the partition
    and the consumer), not a wrapper.
    """

    def __init__(
        self,
        fn: Callable[[pa.Table], pa.Table | pa.RecordBatch],
        *,
        output_schema: pa.Schema | None = None,
    ):
        if not callable(fn):
            raise ConfigError(f"rf.ops.Map needs a callable, got {fn!r}")
        if output_schema is not None and not isinstance(output_schema, pa.Schema):
            raise ConfigError(f"rf.ops.Map: output_schema must be a pyarrow.Schema, got {output_schema!r}")
        self.fn = fn
        self.output_schema = output_schema

    def __repr__(self) -> str:
        return f"rf.ops.Map({getattr(self.fn, '__qualname__', self.fn)})"

    def check_input(self, schema: pa.Schema) -> pa.Schema | None:
        return self.output_schema

    def process(self, state, table):
        out = self.fn(table)
        if isinstance(out, pa.RecordBatch):
            out = pa.Table.from_batches([out])
        if not isinstance(out, pa.Table):
            raise InputError(
                f"{self!r}: the function returned {type(out).__name__}; it must return a pyarrow "
                "Table or RecordBatch"
            )
        if self.output_schema is not None and _columns(out.schema) != _columns(self.output_schema):
            raise InputError(
                f"{self!r}: the function returned columns {_columns(out.schema)}, but its declared "
                f"output_schema is {_columns(self.output_schema)}; return those columns (cast them "
                "with table.cast(schema)) or fix output_schema"
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

    def __repr__(self) -> str:
        return f"rf.ops.Filter({self.expr})"

    def check_input(self, schema: pa.Schema) -> pa.Schema | None:
        """The expression must bind to the input's columns and types; the output keeps the schema."""
        try:
            _empty(schema).filter(self.expr)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            raise InputError(
                f"{self!r} cannot run on the input: {_first_line(e)}. The input's columns are "
                f"{_columns(schema)}; fix the expression, or cast the column in an rf.ops.Map "
                "before it (with output_schema=, so that the Filter is checked against it)"
            ) from None
        return schema

    def process(self, state, table):
        return state, table.filter(self.expr)
