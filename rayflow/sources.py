"""Sources: where events come from (DESIGN §2.1).

A source is a set of *splits*. A split reads Arrow record batches, and every
batch has a *position*: the row offset, within the split, of the next row to
read after it. The contract every split keeps, and that exact recovery rests
on:

- ``read(position)`` yields ``(batch, next_position)`` pairs starting at row
  ``position``; ``next_position`` of one pair is where the next one starts,
  and the first starts exactly at ``position`` (never earlier: be careful of
  off-by-one errors, a row before ``position`` must not come again).
- Reading from a position is deterministic: the same position yields the same
  rows, in the same order, in any process, on any machine.
- Batches end on a fixed grid of positions (multiples of ``batch_rows``, or
  the generator's blocks), whatever position reading starts from: so a
  position that ended one batch ends a batch in every later read, and a
  resumed read never cuts an already processed batch in two.
- A split holds no reading state of its own: everything comes from the
  position passed to ``read``, never from the constructor, so a restarted
  source actor can resume any split from a committed position.

Built in: :class:`Table` (in memory), :class:`Parquet`, :class:`CSV` and
:class:`JSON` (a file, a directory or a glob, through ``pyarrow.dataset``) and
:class:`Synthetic`, the standard event generator of WORKLOAD.md.
"""

from __future__ import annotations

import glob as _glob
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.json as pajson
import pyarrow.parquet as pq

from rayflow.errors import (
    ConfigError,
    EmptyInputError,
    MalformedInputError,
    SourceNotFoundError,
)

__all__ = ["CSV", "JSON", "Parquet", "Source", "Split", "Synthetic", "Table"]

#: Rows per batch a split yields: large enough that Ray's per-call cost and
#: Arrow's per-kernel cost vanish per row, small enough to keep progress smooth.
DEFAULT_BATCH_ROWS = 1_000_000


class Split(ABC):
    """One independently readable, replayable part of a source. Picklable."""

    #: A stable name (file path, block range); recorded with committed positions.
    name: str

    @abstractmethod
    def read(self, position: int) -> Iterator[tuple[pa.RecordBatch, int]]:
        """Yield ``(batch, next_position)`` from row ``position`` on (see module doc)."""


class Source(ABC):
    """A set of splits sharing one schema."""

    @abstractmethod
    def splits(self) -> list[Split]:
        """Resolve the splits. Raises :class:`SourceNotFoundError` / :class:`EmptyInputError`."""

    @property
    @abstractmethod
    def schema(self) -> pa.Schema:
        """The schema of every batch."""


def _regrid(
    batches: Iterator[pa.RecordBatch], position: int, batch_rows: int
) -> Iterator[tuple[pa.RecordBatch, int]]:
    """Re-cut a stream that starts at row ``position`` into batches that end on multiples of
    ``batch_rows`` (the first one may be shorter).

    The grid is absolute, not relative to ``position``: reading from any batch
    boundary yields the same batches as reading from the top. A restarted
    source may resume from a different position than the one a consumer has
    processed up to, and positions on one grid never cut a batch in two.
    """
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    want = batch_rows - position % batch_rows
    for b in batches:
        while b.num_rows:
            take = min(want - pending_rows, b.num_rows)
            pending.append(b.slice(0, take))
            pending_rows += take
            b = b.slice(take)
            if pending_rows == want:
                position += pending_rows
                yield _concat(pending), position
                pending, pending_rows, want = [], 0, batch_rows
    if pending_rows:
        yield _concat(pending), position + pending_rows


def _concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]


# ----------------------------------------------------------------------------- in memory


@dataclass(frozen=True)
class _TableSplit(Split):
    name: str
    table: pa.Table
    batch_rows: int

    def read(self, position: int) -> Iterator[tuple[pa.RecordBatch, int]]:
        n = self.table.num_rows
        start = position
        while start < n:
            end = min((start // self.batch_rows + 1) * self.batch_rows, n)  # the absolute grid
            chunk = self.table.slice(start, end - start).combine_chunks()
            batches = chunk.to_batches()
            batch = batches[0] if batches else pa.RecordBatch.from_pylist([], schema=chunk.schema)
            yield batch, end
            start = end


class Table(Source):
    """An in-memory Arrow table, record batch or list of batches, as one split (tests, demos)."""

    def __init__(
        self,
        data: pa.Table | pa.RecordBatch | Sequence[pa.RecordBatch],
        *,
        batch_rows: int = DEFAULT_BATCH_ROWS,
    ):
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        elif not isinstance(data, pa.Table):
            data = list(data)
            if not data:
                raise EmptyInputError("rf.sources.Table got no batches; pass at least one row")
            data = pa.Table.from_batches(data)
        _check_batch_rows(batch_rows)
        self._table = data
        self._batch_rows = batch_rows

    @property
    def schema(self) -> pa.Schema:
        return self._table.schema

    def splits(self) -> list[Split]:
        if self._table.num_rows == 0:
            raise EmptyInputError("rf.sources.Table holds no rows; pass at least one row")
        return [_TableSplit("table", self._table, self._batch_rows)]


def _check_batch_rows(batch_rows: int) -> None:
    if not isinstance(batch_rows, int) or batch_rows < 1:
        raise ConfigError(f"batch_rows must be an integer >= 1, got {batch_rows!r}")


# ----------------------------------------------------------------------------- files


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


# ----------------------------------------------------------------------------- synthetic

#: WORKLOAD.md constants.
SYNTHETIC_BLOCK_ROWS = 1_000_000
SYNTHETIC_T0_MS = 1_700_000_000_000
SYNTHETIC_RATE = 1_000_000
SYNTHETIC_VALUE_RANGE = 1_024_000
SYNTHETIC_SCHEMA = pa.schema([("key", pa.int64()), ("value", pa.float64()), ("ts", pa.int64())])


@dataclass(frozen=True)
class _SyntheticSplit(Split):
    name: str
    events: int  # all events of the stream (for nothing but the total)
    first: int  # global index of this split's first event
    last: int  # one past its last event
    keys: int
    seed: int
    zipf_s: float

    def read(self, position: int) -> Iterator[tuple[pa.RecordBatch, int]]:
        gen = _SyntheticGenerator(self.keys, self.seed, self.zipf_s)
        i = self.first + position
        while i < self.last:
            block = i // SYNTHETIC_BLOCK_ROWS
            block_start = block * SYNTHETIC_BLOCK_ROWS
            stop = min(block_start + SYNTHETIC_BLOCK_ROWS, self.last)
            batch = gen.block(block, stop - block_start).slice(i - block_start)
            i = stop
            yield batch, i - self.first


_RANK_CELLS = 1 << 18


class _SyntheticGenerator:
    def __init__(self, keys: int, seed: int, zipf_s: float):
        w = 1.0 / np.power(np.arange(1, keys + 1, dtype=np.float64), zipf_s)
        cdf = np.cumsum(w)
        self.cdf = cdf / cdf[-1]
        self.perm = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 2**31]))).permutation(
            keys
        )
        self.keys = keys
        self.seed = seed
        # A lookup table over 2**18 equal cells of [0, 1): the rank range each cell can
        # give. Most draws land in a cell of one rank and skip the binary search.
        grid = np.arange(_RANK_CELLS + 1, dtype=np.float64) / _RANK_CELLS
        self.cell_rank = np.searchsorted(self.cdf, grid, side="right").astype(np.int32)

    def ranks(self, u: np.ndarray) -> np.ndarray:
        """``searchsorted(cdf, u, side="right")`` exactly (WORKLOAD.md), about twice as fast.

        For ``u`` in cell ``[g, g + 1) / C`` the answer lies between the counts of cdf
        values <= ``g / C`` and <= ``(g + 1) / C`` (exact in float64, C a power of two);
        where those agree it is known, elsewhere the search runs on those draws only.
        """
        g = (u * _RANK_CELLS).astype(np.int32)
        lo, hi = self.cell_rank[g], self.cell_rank[g + 1]
        r = lo.astype(np.int64)
        open_ = np.flatnonzero(lo != hi)
        r[open_] = np.searchsorted(self.cdf, u[open_], side="right")
        return r

    def block(self, b: int, rows: int) -> pa.RecordBatch:
        """The first ``rows`` rows of block ``b`` (a prefix of the full block)."""
        u = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, b, 0]))).random(rows)
        r = np.minimum(self.ranks(u), self.keys - 1)
        key = self.perm[r].astype(np.int64, copy=False)
        ints = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, b, 1]))).integers(
            0, SYNTHETIC_VALUE_RANGE, rows, dtype=np.int64
        )
        value = ints / 1024.0
        idx = np.arange(b * SYNTHETIC_BLOCK_ROWS, b * SYNTHETIC_BLOCK_ROWS + rows, dtype=np.int64)
        ts = SYNTHETIC_T0_MS + (idx * 1000) // SYNTHETIC_RATE
        return pa.RecordBatch.from_arrays(
            [pa.array(key), pa.array(value), pa.array(ts)], schema=SYNTHETIC_SCHEMA
        )


class Synthetic(Source):
    """The standard benchmark events of WORKLOAD.md: ``key int64, value float64, ts int64``.

    Deterministic and replayable from any position: a block of 1,000,000 events
    is regenerated from its index alone. ``splits`` cuts the stream into that
    many contiguous ranges of whole blocks, so several source actors can share it.
    """

    def __init__(
        self,
        *,
        events: int = 10_000_000,
        keys: int = 100_000,
        seed: int = 42,
        splits: int = 1,
        zipf_s: float = 1.0,
    ):
        for name, v, lo in (("events", events, 1), ("keys", keys, 1), ("splits", splits, 1)):
            if not isinstance(v, int) or v < lo:
                raise ConfigError(f"rf.sources.Synthetic: {name} must be an integer >= {lo}, got {v!r}")
        self.events, self.keys, self.seed, self.num_splits, self.zipf_s = events, keys, seed, splits, zipf_s

    @property
    def schema(self) -> pa.Schema:
        return SYNTHETIC_SCHEMA

    def splits(self) -> list[Split]:
        blocks = -(-self.events // SYNTHETIC_BLOCK_ROWS)
        n = min(self.num_splits, blocks)
        cuts = [min(self.events, (blocks * j // n) * SYNTHETIC_BLOCK_ROWS) for j in range(n + 1)]
        return [
            _SyntheticSplit(f"synthetic[{a}:{b}]", self.events, a, b, self.keys, self.seed, self.zipf_s)
            for a, b in zip(cuts, cuts[1:])
        ]

    def to_table(self) -> pa.Table:
        """All events as one table (for references and tests)."""
        return pa.Table.from_batches(
            [b for s in self.splits() for b, _ in s.read(0)], schema=SYNTHETIC_SCHEMA
        )

    def __repr__(self) -> str:
        return f"rf.sources.Synthetic(events={self.events}, keys={self.keys}, seed={self.seed})"
