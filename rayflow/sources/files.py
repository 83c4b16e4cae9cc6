"""File sources: :class:`Parquet`, :class:`CSV` and :class:`JSON` (a file, a directory or a glob),
and :class:`Files` (a directory, local or a ``pyarrow.fs`` URI, optionally watched for new files)."""

from __future__ import annotations

import copy
import glob as _glob
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from rayflow.errors import ConfigError, EmptyInputError, MalformedInputError, SourceNotFoundError
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
class _Pinned:
    """What a file of :class:`Files` was when it was taken; reading checks it still is that file.

    Positions are rows of the file as it was taken: a file that changed since
    would replay other rows at the same positions, so a read refuses it. The
    pin lives in the instance that took the file; across runs and source actor
    restarts its :meth:`fingerprint` (recorded in the job's catalog) does the
    same (``Split.fingerprint``).
    """

    size: int
    mtime_ns: int | None
    #: Parquet: the footer's row count. A read from this position on needs nothing from the
    #: file, so a file deleted after it was read to the end is never opened again.
    rows: int | None = None

    def fingerprint(self) -> str:
        """Size and mtime, what a read checks (:func:`_check_pinned`). Not ``rows``: it is derived
        from the bytes, and a take whose footer read failed (a transient error) has none, so
        the same file would read as another."""
        return f"size={self.size} mtime_ns={self.mtime_ns}"


def _check_pinned(fs: pafs.FileSystem, path: str, name: str, pinned: _Pinned, position: int) -> None:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise SourceNotFoundError(
            f"the file {name!r} of the watched directory is gone (deleted or moved), but the job "
            f"still has to read it from row {position}: its remaining rows cannot be read. Delete "
            "or move a file only after its rows are committed (and, for CSV/JSON, only while the "
            "job is stopped: a restarted source re-opens its files), or start a new job"
        )
    if (info.size, info.mtime_ns) != (pinned.size, pinned.mtime_ns):
        raise MalformedInputError(
            f"the file {name!r} of the watched directory changed after it was taken (size "
            f"{pinned.size} -> {info.size} bytes, mtime_ns {pinned.mtime_ns} -> {info.mtime_ns}): "
            "a file must not change once complete, or replaying it would give other rows. Write "
            "each file under a temporary name (.tmp, .part, .inprogress, or a leading . or _) and "
            "rename it into place when done, and never reuse a name"
        )


def _open_failed(name: str, fmt: str, e: BaseException) -> Exception:
    if isinstance(e, FileNotFoundError):
        return SourceNotFoundError(f"{fmt} input file {name!r} is gone: {e}")
    return MalformedInputError(f"{name!r} is not a readable {fmt} file: {e}")


@dataclass(frozen=True)
class _ParquetSplit(Split):
    name: str
    batch_rows: int
    columns: tuple[str, ...] | None
    schema: pa.Schema | None = None  # the source's unified schema; files lacking a column get nulls
    #: Where to open the file: ``name`` made absolute in the driver, so an actor whose working
    #: directory differs opens the same file. (``name`` stays as given: it keys positions.)
    path: str | None = None
    #: The filesystem ``path`` is on (``pyarrow.fs``: a URI source); ``None``: the local one.
    fs: pafs.FileSystem | None = None
    #: Set by :class:`Files`: the file as it was taken (see :class:`_Pinned`).
    pinned: _Pinned | None = None
    #: The row groups ``[first, stop)`` of the file this split reads (:func:`row_group_ranges`);
    #: ``None``: all of them. Positions count rows from the first row of ``first``.
    row_groups: tuple[int, int] | None = None

    def fingerprint(self) -> str | None:
        """The pinned file's size and mtime (:class:`Files`); None for a plain Parquet source."""
        return None if self.pinned is None else self.pinned.fingerprint()

    def read(self, position: int) -> Iterator[tuple[pa.RecordBatch, int]]:
        where = self.path or self.name
        if self.pinned is not None:
            if self.pinned.rows is not None and position >= self.pinned.rows:
                return  # read to the end already: nothing to open (the file may be gone)
            _check_pinned(self.fs or pafs.LocalFileSystem(), where, self.name, self.pinned, position)
        try:
            pf = pq.ParquetFile(where, filesystem=self.fs)
        except (pa.ArrowInvalid, OSError) as e:
            raise _open_failed(self.name, "Parquet", e) from e
        md = pf.metadata
        first, stop = self.row_groups or (0, md.num_row_groups)
        if stop > md.num_row_groups:
            raise MalformedInputError(
                f"the Parquet file {where!r} has {md.num_row_groups} row groups, but the split "
                f"{self.name!r} reads row groups {first}-{stop - 1}: the file was replaced after the "
                "job split it, and its committed positions would read other rows. Restore the file, "
                "or start afresh with a new checkpoint_dir or name"
            )
        start_row = 0
        # Skip whole row groups before the position, using the footer only.
        while first < stop and start_row + md.row_group(first).num_rows <= position:
            start_row += md.row_group(first).num_rows
            first += 1
        if first >= stop:
            return

        def raw() -> Iterator[pa.RecordBatch]:
            cols = list(self.columns) if self.columns else None
            for i in range(first, stop):
                if md.row_group(i).num_rows <= _WHOLE_ROW_GROUP_ROWS:
                    # Reading a row group whole is about twice as fast as iter_batches. No
                    # combine_chunks(): a row group reads as one chunk per column (then it is a
                    # no-op), and where it does not, _regrid joins the pieces of a batch anyway:
                    # joining here too would copy them twice.
                    yield from pf.read_row_group(i, columns=cols, use_threads=False).to_batches()
                else:  # a huge row group: stream it in bounded batches
                    yield from pf.iter_batches(batch_size=self.batch_rows, row_groups=[i], columns=cols)

        def batches() -> Iterator[pa.RecordBatch]:
            skip = position - start_row
            for b in raw():
                if skip:
                    cut = min(skip, b.num_rows)
                    b, skip = b.slice(cut), skip - cut
                if b.num_rows:
                    yield _conform(b, self.schema, self.name)

        yield from _regrid(batches(), position, self.batch_rows)


def _conform(batch: pa.RecordBatch, schema: pa.Schema | None, name: str = "") -> pa.RecordBatch:
    """``batch`` in ``schema``'s column order, with nulls for the columns it lacks (and without
    the ones ``schema`` lacks); a column that cannot be cast is a :class:`MalformedInputError`."""
    if schema is None or batch.schema.equals(schema):
        return batch
    try:
        cols = [
            batch.column(f.name).cast(f.type)
            if f.name in batch.schema.names
            else pa.nulls(batch.num_rows, f.type)
            for f in schema
        ]
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
        raise MalformedInputError(
            f"the file {name!r} does not fit the source's schema {schema}: {e}. Give the source "
            "an explicit schema= that every file fits, or fix the file"
        ) from e
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


#: Rows a :class:`Parquet` split holds at least (whole row groups, the file's last split
#: excepted): a 10M-row file of 1M-row row groups is 10 splits, enough for the source actors of
#: a 16-CPU machine to share it, while each split still amortizes opening the file and its
#: footer over a million rows.
PARQUET_SPLIT_ROWS = 1_000_000


def row_group_ranges(rows_per_group: Sequence[int], split_rows: int | None) -> list[tuple[int, int]]:
    """The splits of one Parquet file: ranges ``[first, stop)`` of its row groups, in order,
    covering every row group once. Row groups are taken whole, in order, until a range holds at
    least ``split_rows`` rows (the last range may hold fewer); ``split_rows=None``: one range.

    A function of the footer's row counts alone (pure): every process, and every resume of a
    job with the same ``split_rows``, cuts a file the same way, so split names stay stable.
    A file without row groups is one (empty) range.
    """
    n = len(rows_per_group)
    if split_rows is None or n <= 1:
        return [(0, n)]
    out, first, acc = [], 0, 0
    for i, rows in enumerate(rows_per_group):
        acc += rows
        if acc >= split_rows:
            out.append((first, i + 1))
            first, acc = i + 1, 0
    if first < n:
        out.append((first, n))
    return out


def row_group_split_name(file: str, first: int, stop: int, groups: int) -> str:
    """The name of the split of ``file`` that reads row groups ``[first, stop)`` of its
    ``groups``: ``<file>#rg<first>-<last>`` (last inclusive), or ``<file>`` alone when it reads
    the whole file (the name every file had when a file was one split, so a checkpoint of a
    job over single-split files resumes as it was)."""
    if (first, stop) == (0, groups) or groups == 0:
        return file
    return f"{file}#rg{first}-{stop - 1}"


class Parquet(_FileSource):
    """Parquet file(s): a file, a directory or a glob.

    **Splits.** A file is cut into splits of whole row groups, each of at least
    ``split_rows`` rows (the file's last split may hold fewer; see
    :func:`row_group_ranges`), so several source actors read one big file in
    parallel. A split is named ``<file>#rg<first>-<last>`` (row groups, last
    inclusive), or ``<file>`` when it is the whole file (a file of one row group,
    or smaller than ``split_rows``). Positions are row offsets within the split.
    ``split_rows=None`` makes each file one split, named ``<file>``: that is how
    rayflow before row-group splits read every file, and how a checkpoint it wrote
    (whose split names are whole files) resumes. Keep ``split_rows`` the same
    across the runs of a job: the names depend on it, and a resume whose source
    lacks a split with committed positions is refused
    (:class:`~rayflow.errors.IncompatibleCheckpointError`).

    The schema is the files' schemas unified: a column that only some files
    have is read as nulls from the others (so a dataset can gain columns).
    ``columns=`` reads only those columns (the engine also projects a Parquet
    source to the columns its job uses, when the operators say which,
    :meth:`with_columns`).

    Caveat: a file must not be replaced while a job has positions in it; a
    replaced file with fewer row groups than a split reads raises
    :class:`~rayflow.errors.MalformedInputError`.
    """

    fmt = "Parquet"

    def __init__(
        self,
        path,
        *,
        columns: Sequence[str] | None = None,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        split_rows: int | None = PARQUET_SPLIT_ROWS,
    ):
        super().__init__(path, batch_rows=batch_rows)
        if split_rows is not None and (
            isinstance(split_rows, bool) or not isinstance(split_rows, int) or split_rows < 1
        ):
            raise ConfigError(
                f"rf.sources.Parquet: split_rows must be an integer >= 1 (rows per split), or None "
                f"(one split per file), got {split_rows!r}"
            )
        self._columns = tuple(columns) if columns else None
        self._split_rows = split_rows

    def with_columns(self, columns: Sequence[str]) -> Parquet:
        """This source reading only ``columns`` (in the schema's order): the same files, splits
        and split names; raises :class:`ConfigError` for a column the schema lacks."""
        missing = [c for c in columns if c not in self.schema.names]
        if missing:
            raise ConfigError(f"{self!r} has no column(s) {missing}; its columns are {self.schema.names}")
        projected = copy.copy(self)
        projected.__dict__.pop("schema", None)  # cached_property: recomputed for the columns
        projected._columns = tuple(c for c in self.schema.names if c in set(columns))
        return projected

    @property
    def splits_files(self) -> bool:
        """Some file is read as several splits (names with ``#rg``)."""
        return any(len(ranges) > 1 for _, ranges in self._ranges.values())

    @cached_property
    def _ranges(self) -> dict[str, tuple[int, list[tuple[int, int]]]]:
        """Per file: its row count and its row-group ranges (from the footers, read once)."""
        out = {}
        for f in self._files:
            try:
                md = pq.ParquetFile(f).metadata
            except pa.ArrowInvalid as e:
                raise MalformedInputError(f"{f!r} is not a readable Parquet file: {e}") from e
            groups = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
            out[f] = (md.num_rows, row_group_ranges(groups, self._split_rows))
        return out

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
        """Each file's row-group splits, files in name order, a file's splits in row order."""
        ranges = self._ranges
        if sum(rows for rows, _ in ranges.values()) == 0:
            raise EmptyInputError(f"the Parquet input {self._path!r} holds no rows")
        schema = self.schema
        out: list[Split] = []
        for f, (_, rs) in ranges.items():
            groups = rs[-1][1]
            for first, stop in rs:
                out.append(
                    _ParquetSplit(
                        row_group_split_name(f, first, stop, groups), self._batch_rows, self._columns,
                        schema, path=os.path.abspath(f),
                        row_groups=None if (first, stop) == (0, groups) else (first, stop),
                    )
                )  # fmt: skip
        return out


@dataclass(frozen=True)
class _TextSplit(Split):
    """A CSV or JSON-lines file. Text cannot seek by row: ``read`` parses from the top."""

    name: str
    fmt: str
    batch_rows: int
    options: dict = field(default_factory=dict)
    path: str | None = None  # as in _ParquetSplit: the absolute path to open
    #: As in _ParquetSplit: the filesystem, the schema every batch is conformed to, the pinned file.
    fs: pafs.FileSystem | None = None
    schema: pa.Schema | None = None
    pinned: _Pinned | None = None

    def fingerprint(self) -> str | None:
        """As :meth:`_ParquetSplit.fingerprint`."""
        return None if self.pinned is None else self.pinned.fingerprint()

    def _stream(self) -> Iterator[pa.RecordBatch]:
        where = self.path or self.name
        try:
            # Through a filesystem: an input stream, which also undoes .gz/.bz2/... by extension.
            src = self.fs.open_input_stream(where) if self.fs is not None else where
            if self.fmt == "CSV":
                reader = pacsv.open_csv(src, **self.options)
                yield from reader
            else:
                yield from pajson.read_json(src, **self.options).to_batches()
        except FileNotFoundError as e:
            raise _open_failed(self.name, self.fmt, e) from e
        except pa.ArrowInvalid as e:
            raise MalformedInputError(
                f"{self.fmt} file {self.name!r} could not be parsed: {e}. "
                "Fix or remove the offending row, or give explicit parse options."
            ) from e

    def read(self, position: int) -> Iterator[tuple[pa.RecordBatch, int]]:
        if self.pinned is not None:
            where = self.path or self.name
            _check_pinned(self.fs or pafs.LocalFileSystem(), where, self.name, self.pinned, position)

        def from_position() -> Iterator[pa.RecordBatch]:
            skip = position
            for b in self._stream():
                if skip:
                    cut = min(skip, b.num_rows)
                    b, skip = b.slice(cut), skip - cut
                if b.num_rows:
                    yield _conform(b, self.schema, self.name)

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


# ----------------------------------------------------------------------------- Files: a watched directory

#: Endings of the names writers use while writing (they rename the file into place when done).
TEMP_SUFFIXES = (".tmp", ".part", ".inprogress")

_FORMATS = {"parquet": "Parquet", "csv": "CSV", "json": "JSON"}


def is_temporary(rel: str) -> bool:
    """A name :class:`Files` never takes: a part of the path starts with ``.`` or ``_`` (hidden
    files, ``_SUCCESS``, ``_pending/``), or the name ends with one of :data:`TEMP_SUFFIXES`."""
    parts = rel.split("/")
    return any(p.startswith((".", "_")) for p in parts) or parts[-1].endswith(TEMP_SUFFIXES)


class Files(Source):
    """The files of a directory, local or a ``pyarrow.fs`` URI (``s3://bucket/prefix?...``), in
    ``format`` ``"parquet"``, ``"csv"`` (with a header row) or ``"json"`` (newline-delimited);
    with ``watch=True`` (the default) files that arrive while the job runs are read too, and the
    job runs until ``run.stop()``.

    **Each file is read exactly once.** A file is one split, named by its path relative to the
    directory (``2024/06/part-7.parquet``): the name keys its committed position, so a job that
    is stopped and started again (same ``name`` and ``checkpoint_dir``) resumes each file where
    it was committed, and reads the files that arrived while it was stopped from their top.
    (Unlike :class:`Parquet`, a file is never cut into row-group splits: a watched directory's
    parallelism comes from its many files, and a dynamic source is not held to its old split
    names on resume, so renaming the splits of a file already read would read it again.)

    **When a file is complete** (taken). The directory is searched recursively, once per *poll*;
    every file there is read as ``format``, whatever its extension (keep other files out, or
    give them a temporary name).

    - Never taken: names a writer writes to before renaming into place: a part of the path
      starting with ``.`` or ``_``, or a name ending in ``.tmp``, ``.part`` or ``.inprogress``
      (see :func:`is_temporary`); and empty files (just created).
    - Any other file is taken at the first poll that sees it with the same size and mtime as the
      poll before, polls being at least ``poll_s`` apart: it was not written for ``poll_s``. With
      ``assume_renamed=True`` it is taken at the first poll that sees it (every writer renames
      into place, or the store shows objects only once whole, as S3 does): saves one poll of
      latency. A file renamed into place is complete by the first rule and taken by the second.
    - Caveat: a writer that writes under the final name and pauses longer than ``poll_s`` has
      its half-written file taken. Write under a temporary name and rename (atomic on a local
      filesystem; S3 objects appear whole), or raise ``poll_s`` above the longest pause.

    Polls happen in :meth:`splits`, which the engine calls at start and then every
    ``EngineConfig.discovery_interval_s``; a call less than ``poll_s`` after the previous poll
    lists nothing and returns what the previous poll found. The instance remembers the size and
    mtime of the files still pending between polls (and travels with that memory to the source
    actor, which counts the hand-over as a poll: so no file is taken before it was stable for
    ``poll_s``). The first poll of an instance lists twice, ``poll_s`` apart, so the files that
    are complete when the job starts are read from the start: starting takes ``poll_s`` longer.
    One caller at a time: ``splits()`` is not thread-safe.

    **Order.** ``splits()`` returns the complete files in name order, but a file is taken as
    soon as it is complete: a later name may be taken before an earlier one still being written,
    and rows of different files are read concurrently (no order across files is promised).

    **Rules for writers.** A complete file must not change, and a name must never be reused:
    a read checks the file's size and mtime against those it was taken with and raises
    :class:`MalformedInputError` otherwise (replaying a changed file would give other rows).
    With ``watch=True`` the job's catalog records them the first time the job takes a name, so
    a job started again (or a source actor restarted) that finds another file under a name it
    has read refuses it the same way, before reading any of its rows, even when the old file was
    read to the end and deleted: move the new file to a name the job has never seen. (A bounded
    ``watch=False`` job is checked within a run only, like the Parquet/CSV/JSON sources.)
    A file may be deleted or moved away once its rows are committed. A file that is gone while
    the running job still has rows of it to read raises :class:`SourceNotFoundError` rather
    than skip them. For Parquet the footer's row count (read once, when the file is taken) tells a file
    read to the end, which is never opened again; CSV/JSON rows cannot be counted without
    parsing, so a source that restarts re-opens (and re-parses up to the committed row) the
    CSV/JSON files it holds: delete those only while the job is stopped. A job started again
    does not see files deleted in between, and a file deleted before its rows were all committed
    is then skipped unnoticed: delete only what is committed.

    **Schema.** ``schema=`` (a ``pyarrow.Schema``), or the schema of the first complete file
    (by name) at start: a directory that holds no complete file at start then raises
    :class:`EmptyInputError` (pass ``schema=``). Every file is read into it: columns a file lacks
    are nulls, columns the schema lacks are dropped, types are cast (CSV columns are parsed as
    the schema's types, JSON fields too); a file that does not fit raises
    :class:`MalformedInputError` naming the file.

    **Many files.** Each poll lists the whole directory tree (on S3 one request per 1000 keys)
    and the engine keeps one split per file seen: comfortable up to ~100k files, beyond which
    polls and restarts slow down. Move or delete committed files, or start a new job on a new
    directory per day, to keep the listing short.

    With ``watch=False`` it is a bounded source over the files present now (all taken at once,
    as :class:`Parquet`/:class:`CSV`/:class:`JSON` do); no files is :class:`EmptyInputError`.
    Extra keyword ``options`` go to ``pyarrow.csv.open_csv`` / ``pyarrow.json.read_json``. CSV and
    JSON files are parsed from their top on every (re)start of their read (text cannot seek).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        format: str = "parquet",
        watch: bool = True,
        schema: pa.Schema | None = None,
        poll_s: float = 1.0,
        assume_renamed: bool = False,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        **options,
    ):
        if format not in _FORMATS:
            raise ConfigError(f"rf.sources.Files format must be one of {sorted(_FORMATS)}, got {format!r}")
        if options and format == "parquet":
            raise ConfigError(
                f"rf.sources.Files(format='parquet') takes no reader options, got {sorted(options)}"
            )
        if not isinstance(poll_s, (int, float)) or not poll_s > 0:
            raise ConfigError(f"poll_s must be a number of seconds > 0, got {poll_s!r}")
        if schema is not None and not isinstance(schema, pa.Schema):
            raise ConfigError(f"schema must be a pyarrow.Schema, got {type(schema).__name__}")
        _check_batch_rows(batch_rows)
        self._path = os.fspath(path)
        self._fmt = _FORMATS[format]
        self.dynamic = bool(watch)
        self._given_schema = schema
        self.poll_s = float(poll_s)
        self._assume_renamed = assume_renamed or not watch  # a bounded read takes what is there
        self._batch_rows = batch_rows
        self._options = options
        self._remote = "://" in self._path and not self._path.startswith("file://")
        if "://" in self._path:
            try:
                self._fs, base = pafs.FileSystem.from_uri(self._path)
            except (pa.ArrowInvalid, OSError) as e:
                raise ConfigError(f"rf.sources.Files cannot use the URI {self._path!r}: {e}") from e
        else:
            self._fs, base = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(self._path))
        self._base = base.rstrip("/")
        # Memory between polls (see the class doc). Test hooks: _clock and _sleep.
        self._clock = time.monotonic
        self._sleep = time.sleep
        self._polled_at: float | None = None
        self._pending: dict[str, tuple[int, int | None]] = {}  # name -> (size, mtime_ns) last seen
        self._taken: dict[str, tuple[str, _Pinned]] = {}  # name -> (path on the fs, pinned)
        self._listed: set[str] = set()  # the names of the last listing
        self._splits: dict[str, Split] = {}  # name -> its split, made once

    def __repr__(self) -> str:
        return f"rf.sources.Files({self._path!r}, format={self._fmt.lower()!r}, watch={self.dynamic})"

    def __setstate__(self, state: dict) -> None:
        # Unpickled in another process (a source actor): its clock is not the driver's. Counting
        # the hand-over as the last poll keeps "stable for poll_s" true: the next poll comes at
        # least poll_s after it, so after the driver's poll too.
        self.__dict__.update(state)
        if self._polled_at is not None:
            self._polled_at = self._clock()

    # ------------------------------------------------------------------ polls
    def _list(self) -> dict[str, pafs.FileInfo]:
        """One listing: every file under the directory that may be taken, by relative name."""
        # A remote prefix exists only while it holds objects: an empty one is an empty directory.
        sel = pafs.FileSelector(self._base, recursive=True, allow_not_found=self._remote)
        try:
            infos = self._fs.get_file_info(sel)
        except FileNotFoundError as e:
            raise SourceNotFoundError(
                f"the directory {self._path!r} does not exist; create it (rf.sources.Files watches "
                "a directory, its files may come later) or fix the path"
            ) from e
        except NotADirectoryError as e:
            raise ConfigError(
                f"{self._path!r} is a file; rf.sources.Files reads a directory (for one file use "
                f"rf.sources.{self._fmt})"
            ) from e
        cut = len(self._base) + 1
        return {
            i.path[cut:]: i
            for i in infos
            if i.type == pafs.FileType.File and i.size and not is_temporary(i.path[cut:])
        }

    def _observe(self, listing: dict[str, pafs.FileInfo]) -> None:
        """Take the listed files seen with the same size and mtime at the previous poll."""
        pending = {}
        for name, info in listing.items():
            if name in self._taken:
                continue
            seen = (info.size, info.mtime_ns)
            if self._assume_renamed or self._pending.get(name) == seen:
                self._take(name, info)
            else:
                pending[name] = seen
        self._pending = pending  # a pending file that vanished is forgotten
        self._listed = set(listing)

    def _take(self, name: str, info: pafs.FileInfo) -> None:
        rows = None
        if self._fmt == "Parquet":
            try:
                rows = pq.ParquetFile(info.path, filesystem=self._fs).metadata.num_rows
            except (pa.ArrowInvalid, OSError):
                pass  # unreadable: the read raises, naming the file
        self._taken[name] = (info.path, _Pinned(info.size, info.mtime_ns, rows))

    def _poll(self) -> None:
        now = self._clock()
        if self._polled_at is not None and now - self._polled_at < self.poll_s:
            return  # too soon: stability is judged across polls poll_s apart
        if self._polled_at is None and not self._assume_renamed:
            # The first poll has nothing to compare with: look twice, so what is complete at
            # start is read from the start.
            self._observe(self._list())
            self._sleep(self.poll_s)
            now = self._clock()
        self._observe(self._list())
        self._polled_at = now

    # ------------------------------------------------------------------ Source
    def splits(self) -> list[Split]:
        """The complete files now, in name order (one listing at most; see the class doc)."""
        if self.dynamic:
            self._poll()
        elif self._polled_at is None:  # bounded: the files present at the first call, once
            self._poll()
            if not self._taken:
                raise EmptyInputError(f"the directory {self._path!r} holds no {self._fmt} files")
        names = sorted(n for n in self._taken if n in self._listed)
        if not names:
            return []
        schema = self.schema
        return [self._split(n, schema) for n in names]

    def _split(self, name: str, schema: pa.Schema) -> Split:
        split = self._splits.get(name)
        if split is None:
            path, pinned = self._taken[name]
            if self._fmt == "Parquet":
                # Only the schema's columns (a column a file lacks is skipped by the reader).
                split = _ParquetSplit(
                    name, self._batch_rows, tuple(schema.names), schema, path=path, fs=self._fs, pinned=pinned
                )
            else:
                split = _TextSplit(
                    name, self._fmt, self._batch_rows, self._typed_options(schema), path=path,
                    fs=self._fs, schema=schema, pinned=pinned,
                )  # fmt: skip
            self._splits[name] = split
        return split

    def _typed_options(self, schema: pa.Schema) -> dict:
        """The reader options, parsing the schema's types (unless the caller set those options)."""
        opts = dict(self._options)
        if self._fmt == "CSV" and "convert_options" not in opts:
            opts["convert_options"] = pacsv.ConvertOptions(column_types=schema)
        if self._fmt == "JSON" and "parse_options" not in opts:
            opts["parse_options"] = pajson.ParseOptions(
                explicit_schema=schema, unexpected_field_behavior="ignore"
            )
        return opts

    @cached_property
    def schema(self) -> pa.Schema:
        """``schema=``, or the schema of the first complete file (by name) at start."""
        if self._given_schema is not None:
            return self._given_schema
        if self._polled_at is None:
            self._poll()
        for name in sorted(self._taken):
            path, _ = self._taken[name]
            if self._fmt == "Parquet":
                try:
                    return pq.read_schema(path, filesystem=self._fs).remove_metadata()
                except (pa.ArrowInvalid, OSError) as e:
                    raise _open_failed(name, "Parquet", e) from e
            first = _TextSplit(name, self._fmt, self._batch_rows, self._options, path=path, fs=self._fs)
            for batch in first._stream():
                return batch.schema
        pending = f" ({len(self._pending)} still being written)" if self._pending else ""
        raise EmptyInputError(
            f"the directory {self._path!r} holds no complete {self._fmt} file with rows{pending} "
            "to take the schema from; pass schema= (a pyarrow.Schema) to watch a directory "
            "before its first file arrives"
        )
