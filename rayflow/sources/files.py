"""File sources: :class:`Parquet`, :class:`CSV` and :class:`JSON` (a file, a directory or a glob)."""

from __future__ import annotations

import glob as _glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.json as pajson
import pyarrow.parquet as pq

from rayflow.errors import EmptyInputError, MalformedInputError, SourceNotFoundError
from rayflow.sources.base import DEFAULT_BATCH_ROWS, Source, Split, _check_batch_rows, _regrid


def _resolve_files(path: str | os.PathLike | Sequence[str], fmt: str) -> list[str]:
    """A file, a directory (searched recursively by pyarrow.dataset) or a glob, to file paths."""
    if not isinstance(path, (str, os.PathLike)):
        files = [os.fspath(p) for p in path]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise SourceNotFoundError(f"{fmt} input file(s) not found: {missing}")
        return sorted(files)
    p = os.fspath(path)
    if any(ch in p for ch in "*?["):
        files = sorted(f for f in _glob.glob(p, recursive=True) if os.path.isfile(f))
        if not files:
            raise SourceNotFoundError(f"the glob {p!r} matched no {fmt} files; check the pattern")
        return files
    if not os.path.exists(p):
        raise SourceNotFoundError(
            f"{fmt} input {p!r} does not exist; pass an existing file, directory or glob"
        )
    if os.path.isdir(p):
        files = sorted(pads.dataset(p, format=_DATASET_FORMAT[fmt]).files)
        if not files:
            raise EmptyInputError(f"the directory {p!r} holds no {fmt} files")
        return files
    return [p]


_DATASET_FORMAT = {"Parquet": "parquet", "CSV": "csv", "JSON": "json"}


#: Row groups up to this size are read whole; larger ones are streamed in batches.
_WHOLE_ROW_GROUP_ROWS = 4_000_000


@dataclass(frozen=True)
class _ParquetSplit(Split):
    name: str
    batch_rows: int
    columns: tuple[str, ...] | None
    schema: pa.Schema | None = None  # the source's unified schema; files lacking a column get nulls
    #: Where to open the file: ``name`` made absolute in the driver, so an actor whose working
    #: directory differs opens the same file. (``name`` stays as given: it keys positions.)
    path: str | None = None

    def read(self, position: int) -> Iterator[tuple[pa.RecordBatch, int]]:
        pf = pq.ParquetFile(self.path or self.name)
        md = pf.metadata
        first = 0
        start_row = 0
        # Skip whole row groups before the position, using the footer only.
        while first < md.num_row_groups and start_row + md.row_group(first).num_rows <= position:
            start_row += md.row_group(first).num_rows
            first += 1
        if first >= md.num_row_groups:
            return

        def raw() -> Iterator[pa.RecordBatch]:
            cols = list(self.columns) if self.columns else None
            for i in range(first, md.num_row_groups):
                if md.row_group(i).num_rows <= _WHOLE_ROW_GROUP_ROWS:
                    # Reading a row group whole is about twice as fast as iter_batches.
                    yield from (
                        pf.read_row_group(i, columns=cols, use_threads=False).combine_chunks().to_batches()
                    )
                else:  # a huge row group: stream it in bounded batches
                    yield from pf.iter_batches(batch_size=self.batch_rows, row_groups=[i], columns=cols)

        def batches() -> Iterator[pa.RecordBatch]:
            skip = position - start_row
            for b in raw():
                if skip:
                    cut = min(skip, b.num_rows)
                    b, skip = b.slice(cut), skip - cut
                if b.num_rows:
                    yield _conform(b, self.schema)

        yield from _regrid(batches(), position, self.batch_rows)


def _conform(batch: pa.RecordBatch, schema: pa.Schema | None) -> pa.RecordBatch:
    """``batch`` in ``schema``'s column order, with nulls for the columns it lacks."""
    if schema is None or batch.schema.equals(schema):
        return batch
    cols = [
        batch.column(f.name).cast(f.type)
        if f.name in batch.schema.names
        else pa.nulls(batch.num_rows, f.type)
        for f in schema
    ]
    return pa.RecordBatch.from_arrays(cols, schema=schema)


class _FileSource(Source):
    fmt = ""

    def __init__(self, path, *, batch_rows: int = DEFAULT_BATCH_ROWS):
        _check_batch_rows(batch_rows)
        self._path = path
        self._batch_rows = batch_rows

    @cached_property
    def _files(self) -> list[str]:
        return _resolve_files(self._path, self.fmt)

    def __repr__(self) -> str:
        return f"rf.sources.{type(self).__name__}({self._path!r})"


class Parquet(_FileSource):
    """Parquet file(s): a file, a directory or a glob. One split per file.

    The schema is the files' schemas unified: a column that only some files
    have is read as nulls from the others (so a dataset can gain columns).
    """

    fmt = "Parquet"

    def __init__(self, path, *, columns: Sequence[str] | None = None, batch_rows: int = DEFAULT_BATCH_ROWS):
        super().__init__(path, batch_rows=batch_rows)
        self._columns = tuple(columns) if columns else None

    @cached_property
    def schema(self) -> pa.Schema:
        """The files' schemas unified: a column some files lack is read as nulls there."""
        schemas = []
        for f in self._files:
            try:
                schemas.append(pq.read_schema(f))
            except pa.ArrowInvalid as e:
                raise MalformedInputError(f"{f!r} is not a readable Parquet file: {e}") from e
        try:
            s = pa.unify_schemas(schemas, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise MalformedInputError(
                f"the Parquet files of {self._path!r} have clashing schemas: {e}"
            ) from e
        s = s.remove_metadata()
        return pa.schema([s.field(c) for c in self._columns]) if self._columns else s

    def splits(self) -> list[Split]:
        rows = 0
        for f in self._files:
            try:
                rows += pq.ParquetFile(f).metadata.num_rows
            except pa.ArrowInvalid as e:
                raise MalformedInputError(f"{f!r} is not a readable Parquet file: {e}") from e
        if rows == 0:
            raise EmptyInputError(f"the Parquet input {self._path!r} holds no rows")
        schema = self.schema
        return [
            _ParquetSplit(f, self._batch_rows, self._columns, schema, path=os.path.abspath(f))
            for f in self._files
        ]


@dataclass(frozen=True)
class _TextSplit(Split):
    """A CSV or JSON-lines file. Text cannot seek by row: ``read`` parses from the top."""

    name: str
    fmt: str
    batch_rows: int
    options: dict = field(default_factory=dict)
    path: str | None = None  # as in _ParquetSplit: the absolute path to open

    def _stream(self) -> Iterator[pa.RecordBatch]:
        try:
            if self.fmt == "CSV":
                reader = pacsv.open_csv(self.path or self.name, **self.options)
                yield from reader
            else:
                yield from pajson.read_json(self.path or self.name, **self.options).to_batches()
        except pa.ArrowInvalid as e:
            raise MalformedInputError(
                f"{self.fmt} file {self.name!r} could not be parsed: {e}. "
                "Fix or remove the offending row, or give explicit parse options."
            ) from e

    def read(self, position: int) -> Iterator[tuple[pa.RecordBatch, int]]:
        def from_position() -> Iterator[pa.RecordBatch]:
            skip = position
            for b in self._stream():
                if skip:
                    cut = min(skip, b.num_rows)
                    b, skip = b.slice(cut), skip - cut
                if b.num_rows:
                    yield b

        yield from _regrid(from_position(), position, self.batch_rows)


class _TextSource(_FileSource):
    def __init__(self, path, *, batch_rows: int = DEFAULT_BATCH_ROWS, **options):
        super().__init__(path, batch_rows=batch_rows)
        self._options = options

    @cached_property
    def schema(self) -> pa.Schema:
        split = _TextSplit(self._files[0], self.fmt, self._batch_rows, self._options)
        for batch in split._stream():
            return batch.schema
        raise EmptyInputError(f"the {self.fmt} file {self._files[0]!r} holds no rows")

    def splits(self) -> list[Split]:
        self.schema  # noqa: B018 - raises early on an empty or unparsable first file
        return [
            _TextSplit(f, self.fmt, self._batch_rows, self._options, path=os.path.abspath(f))
            for f in self._files
        ]


class CSV(_TextSource):
    """CSV file(s) with a header row: a file, a directory or a glob. One split per file.

    Extra keyword options go to ``pyarrow.csv.open_csv`` (``read_options``,
    ``parse_options``, ``convert_options``). Caveat: text cannot seek, so a
    resume re-parses each file from its top up to the committed position.
    """

    fmt = "CSV"


class JSON(_TextSource):
    """Newline-delimited JSON file(s): a file, a directory or a glob. One split per file.

    Extra keyword options go to ``pyarrow.json.read_json``. Same caveat as CSV.
    """

    fmt = "JSON"
