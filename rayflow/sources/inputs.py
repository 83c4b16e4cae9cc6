"""Several inputs in one pipeline (DESIGN §12): :class:`Input`, and their union :class:`Inputs`.

A join needs both of its sides in the same partition: persons by ``id`` and
auctions by ``seller`` must hash alike. So each input names its own key
columns; its rows are hashed by those, and equal key values of different
inputs land in the same partition (the key columns must be alike by position:
integers with integers, strings with strings).

The operators see **one schema**, the union of the inputs' columns, so one
chain (a ``Filter``, a ``Join``) can run over rows of every input:

- the columns of every input, in input order (a name's first occurrence gives
  its place); a name that two inputs share must have one type in both
  (``rename=`` one of them otherwise);
- in each input's rows, the columns it lacks are nulls;
- last, :data:`SOURCE_COLUMN` (``_source``, a string): the name of the input
  the row came from;
- the schema's metadata :data:`INPUTS_METADATA` maps each input's name to its
  own columns, in its order (what ``rf.ops.Join`` outputs of each side).

Splits are named ``<input>/<split name>``: positions, watermarks and
fingerprints are kept per input split, exactly as for one source. The union is
*dynamic* when any input is (every input is listed again while the job runs),
and *unbounded* when any input is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from rayflow.errors import ConfigError, InputError
from rayflow.partitioning import _is_int_like, key_columns
from rayflow.sources.base import Source, Split

__all__ = ["INPUTS_METADATA", "SOURCE_COLUMN", "Input", "Inputs", "input_columns"]

#: The column that names each row's input.
SOURCE_COLUMN = "_source"
#: Schema metadata: JSON ``{input name: [its columns]}``.
INPUTS_METADATA = b"rayflow.inputs"

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


def input_columns(schema: pa.Schema) -> dict[str, list[str]] | None:
    """Each input's own columns from a multi-input schema's :data:`INPUTS_METADATA`
    (``{"person": ["id", "name", ...], ...}``), or ``None`` when the schema does not carry it
    (one input, or an ``rf.ops.Map`` that dropped the metadata)."""
    raw = (schema.metadata or {}).get(INPUTS_METADATA)
    if raw is None:
        return None
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(c, str) for c in v)
        for k, v in parsed.items()
    ):
        raise InputError(
            f"the schema metadata {INPUTS_METADATA!r} must be JSON {{input name: [column, ...]}}, "
            f"got {raw[:200]!r}"
        )
    return {k: list(v) for k, v in parsed.items()}


class Input:
    """One named input of a pipeline with several: ``rf.sources.Input("person", source, key="id")``.

    ``name`` is what the ``_source`` column holds for its rows (letters, digits,
    ``_`` and ``-``, starting with a letter; it also prefixes its splits' names,
    so renaming an input is a new input to a resumed job). ``key``: its key
    columns (a name or a list), hashed to pick the partition; ``None`` takes the
    pipeline's ``key``. ``rename``: ``{old: new}`` column names, applied first
    (the key, the event-time column and the union schema use the new names).
    """

    def __init__(
        self,
        name: str,
        source: Source,
        *,
        key: str | Sequence[str] | None = None,
        rename: dict[str, str] | None = None,
    ):
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConfigError(
                f"an input's name must be 1-64 letters, digits, '_' or '-', starting with a letter "
                f"(it is the value of the {SOURCE_COLUMN} column and prefixes its splits), got {name!r}"
            )
        if not isinstance(source, Source):
            raise ConfigError(f"rf.sources.Input({name!r}) needs an rf.sources source, got {source!r}")
        if isinstance(source, Inputs):
            raise ConfigError(f"rf.sources.Input({name!r}): inputs cannot be nested")
        rename = dict(rename or {})
        if not all(isinstance(k, str) and isinstance(v, str) and v for k, v in rename.items()):
            raise ConfigError(f"rename must map column names to new names, got {rename!r}")
        self.name = name
        self.source = source
        self.rename = rename
        self.key = None if key is None else tuple([key] if isinstance(key, str) else key)
        if self.key is not None and (not self.key or not all(isinstance(k, str) and k for k in self.key)):
            raise ConfigError(f"rf.sources.Input({name!r}): key must name at least one column, got {key!r}")

    def __repr__(self) -> str:
        key = "" if self.key is None else f", key={list(self.key)}"
        return f"rf.sources.Input({self.name!r}, {self.source!r}{key})"

    @property
    def schema(self) -> pa.Schema:
        """The input's own schema, renamed."""
        s = self.source.schema
        names = [self.rename.get(n, n) for n in s.names]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"rf.sources.Input({self.name!r}): rename gives two columns the name(s) {dup}")
        if SOURCE_COLUMN in names:
            raise ConfigError(
                f"rf.sources.Input({self.name!r}) has a column {SOURCE_COLUMN!r}, which the union of "
                "inputs uses to name each row's input: rename it (rename={...})"
            )
        return pa.schema([f.with_name(n) for f, n in zip(s, names)])


class Inputs(Source):
    """The union of several :class:`Input`\\ s, one source to the engine (see the module doc).

    ``Pipeline(source=[Input(...), ...])`` builds it; ``key`` is the pipeline's
    key, for inputs that name none.
    """

    def __init__(self, inputs: Sequence[Input], *, key: Sequence[str] | None = None):
        inputs = list(inputs)
        if not inputs or not all(isinstance(i, Input) for i in inputs):
            raise ConfigError(
                "source=[...] takes rf.sources.Input(name, source, key=...) items, one per input, got "
                f"{inputs!r}"
            )
        names = [i.name for i in inputs]
        if len(set(names)) != len(names):
            raise ConfigError(f"the inputs' names must differ, got {names}")
        for i in inputs:
            if i.key is None and not key:
                raise ConfigError(
                    f"the input {i.name!r} names no key: give rf.sources.Input({i.name!r}, ..., "
                    "key='<column>') or the pipeline a key="
                )
        self.inputs = inputs
        #: Each input's key columns, by input name (the pipeline's for an input that names none).
        self.keys: dict[str, tuple[str, ...]] = {i.name: i.key or tuple(key) for i in inputs}
        self.dynamic = any(i.source.dynamic for i in inputs)
        self._schema: pa.Schema | None = None

    def __repr__(self) -> str:
        return f"rf.sources.Inputs({self.inputs!r})"

    @property
    def unbounded(self) -> bool:
        return any(i.source.unbounded for i in self.inputs)

    @property
    def schema(self) -> pa.Schema:
        if self._schema is None:
            self._schema = self._union()
        return self._schema

    def _union(self) -> pa.Schema:
        fields: dict[str, pa.Field] = {}
        owner: dict[str, str] = {}
        own: dict[str, list[str]] = {}
        for i in self.inputs:
            s = i.schema
            own[i.name] = list(s.names)
            for f in s:
                was = fields.get(f.name)
                if was is None:
                    fields[f.name], owner[f.name] = f.with_nullable(True), i.name
                elif was.type != f.type:
                    raise ConfigError(
                        f"the column {f.name!r} is {was.type} in the input {owner[f.name]!r} but {f.type} "
                        f"in {i.name!r}: the inputs share one schema, so a name has one type. Rename it "
                        f"in one of them (rf.sources.Input({i.name!r}, ..., rename={{{f.name!r}: ...}})) "
                        "or read it with the other type"
                    )
        self._check_keys()
        meta = {INPUTS_METADATA: json.dumps(own).encode()}
        return pa.schema([*fields.values(), pa.field(SOURCE_COLUMN, pa.string())], metadata=meta)

    def _check_keys(self) -> None:
        first = self.inputs[0].name
        kinds = None
        for i in self.inputs:
            s, key = i.schema, self.keys[i.name]
            key_columns(s, list(key))
            mine = ["int" if _is_int_like(_plain(s.field(k).type)) else "bytes" for k in key]
            if kinds is None:
                kinds = mine
            elif mine != kinds:
                raise ConfigError(
                    f"the inputs' keys must match column by column for their rows to meet in one "
                    f"partition: {first!r} has key {list(self.keys[first])} ({kinds}), {i.name!r} has "
                    f"{list(key)} ({mine}); integers hash alike with integers, strings with strings"
                )

    def splits(self) -> list[Split]:
        schema = self.schema
        out: list[Split] = []
        for i in self.inputs:
            own = i.schema
            key = self.keys[i.name]
            out.extend(_InputSplit(s, i.name, key, i.rename, own, schema) for s in i.source.splits())
        return out

    def complete(self) -> bool:
        """Every input that gains splits while the job runs has given its last ones."""
        return all(i.source.complete() for i in self.inputs if i.source.dynamic)

    def on_commit(self, positions: dict[str, int]) -> None:
        for i in self.inputs:
            prefix = i.name + "/"
            mine = {k[len(prefix) :]: v for k, v in positions.items() if k.startswith(prefix)}
            if mine:
                i.source.on_commit(mine)

    def close(self) -> None:
        for i in self.inputs:
            i.source.close()


def _plain(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


class _InputSplit(Split):
    """A split of one input, its batches conformed to the union schema (see the module doc)."""

    def __init__(
        self,
        inner: Split,
        input_name: str,
        key: tuple[str, ...],
        rename: dict[str, str],
        own: pa.Schema,
        union: pa.Schema,
    ):
        self.inner = inner
        self.input_name = input_name
        self.name = f"{input_name}/{inner.name}"
        #: The columns this split's rows are hashed by (the source actor reads it).
        self.key = key
        self.rename = rename
        self.own = own
        self.union = union
        self.unbounded = inner.unbounded
        self.dense = inner.dense

    def __repr__(self) -> str:
        return f"_InputSplit({self.name!r})"

    def conform(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """``batch`` (of the inner split) in the union schema: renamed, missing columns null,
        ``_source`` last. No copy of the input's own columns."""
        n = batch.num_rows
        if self.rename:
            batch = batch.rename_columns([self.rename.get(c, c) for c in batch.schema.names])
        have = set(batch.schema.names)
        cols = []
        for f in self.union:
            if f.name == SOURCE_COLUMN:
                cols.append(pa.repeat(pa.scalar(self.input_name, pa.string()), n))
            elif f.name in have:
                col = batch.column(f.name)
                cols.append(col if col.type == f.type else col.cast(f.type))
            else:
                cols.append(pa.nulls(n, f.type))
        return pa.RecordBatch.from_arrays(cols, schema=self.union)

    def read(self, position: int) -> Iterator[tuple[pa.RecordBatch, int]]:
        it = self.inner.read(position)
        try:
            for batch, end in it:
                yield self.conform(batch), end
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def row_positions(self, batch: pa.RecordBatch) -> np.ndarray:
        if self.rename:  # the inner split reads its own column names
            back = {v: k for k, v in self.rename.items()}
            batch = batch.rename_columns([back.get(c, c) for c in batch.schema.names])
        return self.inner.row_positions(batch)

    def fingerprint(self) -> str | None:
        return self.inner.fingerprint()

    def bind(self, *, job_started_ms: int) -> Split:
        bound = self.inner.bind(job_started_ms=job_started_ms)
        if bound is self.inner:
            return self
        return _InputSplit(bound, self.input_name, self.key, self.rename, self.own, self.union)

    def available(self) -> int | None:
        return self.inner.available()
