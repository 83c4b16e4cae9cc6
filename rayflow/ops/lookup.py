"""``rf.ops.Lookup``: enriches each row with the matching row of a table that every consumer holds
(a lookup join, DESIGN §12): a Parquet file or directory, or a table of a DuckDB database file."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayflow.errors import ConfigError, InputError, SourceNotFoundError, UnsupportedKeyTypeError
from rayflow.ops.base import Operator
from rayflow.ops.join import _on, join_key_type, normalized_keys
from rayflow.partitioning import check_key_type, hash_arrays

#: How a stream row without a match is treated: see :class:`Lookup`.
HOWS = ("left", "inner")

#: The suffix of an added column whose name the stream already has.
SUFFIX = "_lookup"

#: How often, by default, a consumer checks whether the table changed: a stat of its file(s),
#: cheap, and a change is picked up within seconds.
DEFAULT_RELOAD_S = 10.0

#: File names in a Parquet directory that are not (yet) part of the table: hidden or metadata
#: files, and files being written (as ``rf.sources.Files`` skips them).
_SKIP_PREFIXES = (".", "_")
_SKIP_SUFFIXES = (".tmp", ".part", ".inprogress")

#: The clock of reload checks (tests replace it).
_monotonic = time.monotonic


@dataclass(frozen=True)
class _Loaded:
    """One version of the table, indexed (per process, never pickled).

    ``values``: the columns the lookup adds, as named in the output.
    ``keys``: the table's key columns (dictionaries decoded), rows as in
    ``values``; rows with a null key are left out (they never match).
    ``hashes``: the rows' key hashes sorted, ``order`` the row of each.
    ``exact``: no two distinct keys share a hash, so a lookup is one binary
    search per row plus one comparison; else lookups use Arrow's hash join.
    """

    fingerprint: tuple
    values: pa.Table
    keys: list[pa.ChunkedArray]
    hashes: np.ndarray
    order: np.ndarray
    exact: bool
    checked_at: float


class Lookup(Operator):
    """Adds to each row the columns of the row of a table with the same key (a lookup join).

    ``path`` is a Parquet file, a directory of Parquet files (local, or a
    ``pyarrow.fs`` URI such as ``s3://bucket/dim/``), or, with ``table=``, a
    DuckDB database file holding that table (opened read-only). ``on`` is the
    key: a column name, a list of names (the same in the stream and the
    table), or a pair ``(stream columns, table columns)``. The table's key
    must be unique (an :class:`~rayflow.errors.InputError` names a duplicate);
    its rows with a null key are ignored, and a stream row with a null key
    matches nothing (as in SQL).

    ``how="left"`` (default) keeps every row, with nulls where the table has
    no match; ``"inner"`` drops the rows without one. ``columns`` names the
    table columns to add (default: all but the key, as the table first loaded
    by the consumer has them; name them to pin them). An added column whose
    name the stream already has gets the suffix ``_lookup``. The output is the
    stream's columns (and schema metadata), then the added ones, rows in input
    order.

    **Loading.** Each consumer loads the table lazily, at its first batch, and
    indexes it once (sorted key hashes: a lookup costs a binary search per
    row, whatever the table's size). At most every ``reload_s`` seconds it
    checks the file's (or files') size and modification time and reloads the
    table when they changed (``reload_s=0``: at every batch). A reload that
    cannot read the table (a DuckDB file locked by its writer, a Parquet file
    half written) keeps the previous version and retries at the next check;
    replace files atomically (write, then rename) to avoid that. A reloaded
    table must still have the added columns (cast to their first types) and a
    unique key, or the job fails.

    **Caveat (as Flink's lookup join).** The table is external, not part of
    the checkpointed state: a row is joined with the table as it is when the
    row is processed. Exactly-once of the output still holds (each row is
    emitted once, by the run that commits it), but a row replayed after a
    failure is joined with the table as it is at replay time, so if the
    table changed in between it may carry other values than the lost
    attempt saw; and consumers may pick up a change a few seconds apart.

    Picklable: the loaded table and any connection stay in the process that
    loaded them.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        on: str | Sequence[str] | tuple,
        table: str | None = None,
        how: str = "left",
        columns: Sequence[str] | None = None,
        reload_s: float = DEFAULT_RELOAD_S,
    ):
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise ConfigError(
                f"rf.ops.Lookup: path must be a Parquet file or directory or a DuckDB file, got {path!r}"
            )
        path = os.fspath(path)
        self.uri = "://" in path
        self.path = path if self.uri else os.path.abspath(path)  # consumers may run elsewhere
        if table is not None and (not isinstance(table, str) or not table):
            raise ConfigError(f"rf.ops.Lookup: table= names a table of the DuckDB file, got {table!r}")
        if table is None and path.lower().endswith((".duckdb", ".db", ".ddb")):
            raise ConfigError(
                f"rf.ops.Lookup: {path!r} looks like a DuckDB database; name the table to read with "
                "table='...' (without it, path is read as Parquet)"
            )
        if table is not None and self.uri:
            raise ConfigError(f"rf.ops.Lookup: a DuckDB database must be a local file, got {path!r}")
        self.table = table
        self.stream_on, self.table_on = _on(on, "rf.ops.Lookup")
        if how not in HOWS:
            raise ConfigError(f"rf.ops.Lookup: how must be one of {HOWS}, got {how!r}")
        self.how = how
        if columns is not None:
            columns = [columns] if isinstance(columns, str) else list(columns)
            if not all(isinstance(c, str) and c for c in columns) or len(set(columns)) != len(columns):
                raise ConfigError(f"rf.ops.Lookup: columns must be distinct column names, got {columns!r}")
        self.columns = columns
        if (
            isinstance(reload_s, bool)
            or not isinstance(reload_s, (int, float))
            or not math.isfinite(reload_s)
            or reload_s < 0
        ):
            raise ConfigError(
                f"rf.ops.Lookup: reload_s must be a number of seconds >= 0 (how often a consumer checks "
                f"whether the table changed), got {reload_s!r}"
            )
        self.reload_s = float(reload_s)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._loaded: _Loaded | None = None
        self._fields: pa.Schema | None = None  # the added columns as first loaded (names, types)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        for k in ("_loaded", "_fields", "_lock"):
            d.pop(k, None)
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self._init_runtime()

    def __repr__(self) -> str:
        on = self.stream_on if self.stream_on == self.table_on else (self.stream_on, self.table_on)
        tbl = f", table={self.table!r}" if self.table is not None else ""
        return f"rf.ops.Lookup({self.path!r}{tbl}, on={on!r}, how={self.how!r})"

    def spec(self) -> dict:
        return {
            "type": "Lookup",
            "path": self.path,
            "table": self.table,
            "on": [self.stream_on, self.table_on],
            "how": self.how,
            "columns": self.columns,
        }

    # ------------------------------------------------------------------ the table
    def _files(self) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
        """The filesystem and the file(s) holding the table, or :class:`SourceNotFoundError`."""
        if self.uri:
            fs, root = pafs.FileSystem.from_uri(self.path)
        else:
            fs, root = pafs.LocalFileSystem(), self.path
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise SourceNotFoundError(f"{self!r}: the lookup table {self.path!r} does not exist")
        if info.type != pafs.FileType.Directory:
            return fs, [info]
        files = [
            f
            for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if f.type == pafs.FileType.File
            and not any(
                part.startswith(_SKIP_PREFIXES) for part in os.path.relpath(f.path, root).split(os.sep)
            )
            and not f.base_name.endswith(_SKIP_SUFFIXES)
        ]
        if not files:
            raise SourceNotFoundError(f"{self!r}: the directory {self.path!r} holds no Parquet file")
        return fs, sorted(files, key=lambda f: f.path)

    def _fingerprint(self) -> tuple:
        """What changes when the table changes: each file's path, size and mtime (a DuckDB
        database: its file and its write-ahead log)."""
        if self.table is not None:
            out = []
            for p in (self.path, self.path + ".wal"):
                try:
                    st = os.stat(p)
                except FileNotFoundError:
                    if p == self.path:
                        raise SourceNotFoundError(
                            f"{self!r}: the DuckDB database {p!r} does not exist"
                        ) from None
                    continue
                out.append((p, st.st_size, st.st_mtime_ns))
            return tuple(out)
        _, files = self._files()
        return tuple((f.path, f.size, f.mtime_ns) for f in files)

    def _read(self, *, schema_only: bool = False) -> pa.Table:
        """The table as it is now (``schema_only``: no rows)."""
        if self.table is not None:
            import duckdb  # only where a DuckDB lookup runs

            name = ".".join('"' + part.replace('"', '""') + '"' for part in self.table.split("."))
            limit = " LIMIT 0" if schema_only else ""
            if not os.path.exists(self.path):
                raise SourceNotFoundError(f"{self!r}: the DuckDB database {self.path!r} does not exist")
            con = duckdb.connect(self.path, read_only=True)
            try:
                return con.sql(f"SELECT * FROM {name}{limit}").to_arrow_table()
            except duckdb.CatalogException as e:
                raise InputError(
                    f"{self!r}: {str(e).splitlines()[0]}; name a table of {self.path!r}"
                ) from None
            finally:
                con.close()
        fs, files = self._files()
        if schema_only:
            return pq.read_schema(files[0].path, filesystem=fs).empty_table()
        paths = [f.path for f in files]
        return pq.read_table(paths[0] if len(paths) == 1 else paths, filesystem=fs)

    def _added(self, schema: pa.Schema) -> list[str]:
        """The table columns the lookup adds."""
        missing = [c for c in self.table_on + (self.columns or []) if c not in schema.names]
        if missing:
            raise InputError(
                f"{self!r}: the lookup table has no column(s) {missing}; its columns are {schema.names}"
            )
        for c in self.table_on:
            try:
                check_key_type(c, schema.field(c).type)
            except UnsupportedKeyTypeError as e:
                raise UnsupportedKeyTypeError(f"{self!r}: in the lookup table, {e}") from None
        if self.columns is not None:
            return list(self.columns)
        return [c for c in schema.names if c not in self.table_on]

    def _index(self, table: pa.Table, fingerprint: tuple, now: float) -> _Loaded:
        """``table`` indexed by its key (see :class:`_Loaded`); refuses a duplicate key."""
        added = self._added(table.schema)
        values = table.select(added)
        if self._fields is None:
            self._fields = values.schema.remove_metadata()
        else:
            lost = [f.name for f in self._fields if f.name not in values.column_names]
            if lost:
                raise InputError(
                    f"{self!r}: the lookup table was reloaded without column(s) {lost}, which rows "
                    "were enriched with so far; restore them, or run the job again with columns= "
                    "naming those it has"
                )
            try:
                values = values.select(self._fields.names).cast(self._fields)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise InputError(
                    f"{self!r}: the reloaded lookup table's columns no longer cast to their first "
                    f"types {self._fields}: {str(e).splitlines()[0]}"
                ) from None
        keys = []
        for c in self.table_on:
            col = table.column(c)
            keys.append(col.cast(col.type.value_type) if pa.types.is_dictionary(col.type) else col)
        valid = None
        for k in keys:
            if k.null_count:
                v = pc.is_valid(k)
                valid = v if valid is None else pc.and_(valid, v)
        if valid is not None:
            values = values.filter(valid)
            keys = [k.filter(valid) for k in keys]
        h = hash_arrays(keys) if values.num_rows else np.zeros(0, np.uint64)
        order = np.argsort(h, kind="stable")
        hashes = h[order]
        exact = True
        if len(hashes) > 1 and (hashes[1:] == hashes[:-1]).any():  # a repeated key, or a collision
            names = [f"k{i}" for i in range(len(keys))]
            counts = pa.Table.from_arrays(keys, names=names).group_by(names).aggregate([([], "count_all")])
            dup = counts.filter(pc.greater(counts["count_all"], 1))
            if dup.num_rows:
                example = {c: dup.column(n)[0].as_py() for c, n in zip(self.table_on, names)}
                raise InputError(
                    f"{self!r}: the lookup table has {dup.num_rows} key(s) on several rows, e.g. "
                    f"{example} ({dup['count_all'][0].as_py()} rows); a lookup table's key "
                    f"{self.table_on} must be unique: keep one row per key (e.g. SELECT DISTINCT "
                    "ON (key) ... in DuckDB)"
                )
            exact = False  # distinct keys sharing a 64-bit hash: look up with a hash join
        return _Loaded(
            fingerprint=fingerprint,
            values=values.combine_chunks(),
            keys=keys,
            hashes=hashes,
            order=order.astype(np.int64),
            exact=exact,
            checked_at=now,
        )

    def _current(self) -> _Loaded:
        """The loaded table, checked for changes at most every ``reload_s`` (see the class doc)."""
        loaded, now = self._loaded, _monotonic()
        if loaded is not None and now - loaded.checked_at < self.reload_s:
            return loaded
        with self._lock:
            loaded = self._loaded
            if loaded is not None and now - loaded.checked_at < self.reload_s:
                return loaded
            try:
                fingerprint = self._fingerprint()
                if loaded is None or fingerprint != loaded.fingerprint:
                    table = self._read()
            except Exception as e:
                if loaded is None:
                    if isinstance(e, InputError):
                        raise
                    raise InputError(
                        f"{self!r}: cannot read the lookup table: {str(e).splitlines()[0]}"
                    ) from e
                # Being replaced, or locked by its writer: keep the version loaded, retry later.
                self._loaded = replace(loaded, checked_at=now)
                return self._loaded
            if loaded is not None and fingerprint == loaded.fingerprint:
                self._loaded = replace(loaded, checked_at=now)
            else:
                self._loaded = self._index(table, fingerprint, now)
            return self._loaded

    # ------------------------------------------------------------------ stream
    def _names(self, stream: pa.Schema, added: Sequence[str]) -> list[str]:
        """The output names of the added columns (``_lookup`` where the stream has the name)."""
        out = []
        for c in added:
            name = c if c not in stream.names else c + SUFFIX
            if name in stream.names or name in out:
                raise InputError(
                    f"{self!r}: the table column {c!r} would be named {name!r}, which the stream "
                    "already has; name the columns to add with columns=, or rename it in an rf.ops.Map"
                )
            out.append(name)
        return out

    def _key_types(self, stream: pa.Schema, table: Sequence[pa.DataType]) -> list[pa.DataType]:
        missing = [c for c in self.stream_on if c not in stream.names]
        if missing:
            raise InputError(
                f"{self!r}: the input has no column(s) {missing}; its columns are {stream.names}"
            )
        out = []
        for c, tc, tt in zip(self.stream_on, self.table_on, table):
            st = stream.field(c).type
            kt = join_key_type(st, tt)
            if kt is None:
                raise InputError(
                    f"{self!r}: the input's key column {c!r} ({st}) cannot be compared with the "
                    f"table's {tc!r} ({tt}); cast one in an rf.ops.Map (the input's) or in the table"
                )
            out.append(kt)
        return out

    def check_input(self, schema: pa.Schema) -> pa.Schema:
        """The table must exist with its key and ``columns``, the input's key columns must compare
        with the table's; returns the output schema (the input's, then the added columns)."""
        table = self._read(schema_only=True).schema
        added = self._added(table)
        self._key_types(schema, [table.field(c).type for c in self.table_on])
        fields = [
            table.field(c).with_name(n).remove_metadata() for c, n in zip(added, self._names(schema, added))
        ]
        return pa.schema(list(schema) + fields, metadata=schema.metadata)

    def process(self, state, table: pa.Table) -> tuple[None, pa.Table | None]:
        if table.num_rows == 0:
            return state, None
        loaded = self._current()
        types = self._key_types(table.schema, [k.type for k in loaded.keys])
        skeys = normalized_keys(table, self.stream_on, types, repr(self))
        match = self._match(loaded, skeys, types)
        out = table
        if self.how == "inner":
            hit = match >= 0
            if not hit.all():
                out, match = table.filter(pa.array(hit)), match[hit]
        values = loaded.values.take(pa.array(match, mask=match < 0))
        for name, col in zip(self._names(table.schema, loaded.values.column_names), values.columns):
            out = out.append_column(name, col)
        return state, (out if out.num_rows else None)

    def _match(self, loaded: _Loaded, skeys: list, types: list[pa.DataType]) -> np.ndarray:
        """The table row of each stream row (-1: none); ``skeys`` are the stream's key columns as
        ``types``. The table's keys are cast to them only where compared (O(batch))."""
        n = len(skeys[0])
        match = np.full(n, -1, dtype=np.int64)
        if not len(loaded.hashes):
            return match
        if not loaded.exact:
            return _hash_join_rows(skeys, [k.cast(t) for k, t in zip(loaded.keys, types)], n)
        h = hash_arrays(skeys)
        pos = np.minimum(np.searchsorted(loaded.hashes, h), len(loaded.hashes) - 1)
        cand = np.flatnonzero(loaded.hashes[pos] == h)
        if not len(cand):
            return match
        rows = loaded.order[pos[cand]]
        idx, take = pa.array(cand), pa.array(rows)
        same = _equal(
            [k.take(idx) for k in skeys], [k.take(take).cast(t) for k, t in zip(loaded.keys, types)]
        )
        match[cand[same]] = rows[same]
        return match


def _equal(a: list, b: list) -> np.ndarray:
    """Row-wise equality of two lists of key columns; a null equals nothing."""
    eq = None
    for x, y in zip(a, b):
        e = pc.fill_null(pc.equal(x, y), False)
        eq = e if eq is None else pc.and_(eq, e)
    return np.asarray(eq.to_numpy(zero_copy_only=False), dtype=bool)


def _hash_join_rows(skeys: list, tkeys: list, n: int) -> np.ndarray:
    """The table row of each stream row by Arrow's hash join (-1: none); for a table whose
    distinct keys collide in 64 bits, which the index cannot tell apart."""
    names = [f"k{i}" for i in range(len(skeys))]
    s = pa.Table.from_arrays([*skeys, pa.array(np.arange(n, dtype=np.int64))], names=[*names, "s"])
    t = pa.Table.from_arrays(
        [*tkeys, pa.array(np.arange(len(tkeys[0]), dtype=np.int64))], names=[*names, "t"]
    )
    j = s.join(t, keys=names, join_type="inner", use_threads=False)
    match = np.full(n, -1, dtype=np.int64)
    match[np.asarray(j.column("s").to_numpy())] = np.asarray(j.column("t").to_numpy())
    return match
