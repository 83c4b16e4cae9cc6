"""The DuckDB sink (committed outputs loaded into a table, each exactly once), and the sinks'
read-only SQL over their published output (:func:`query_files`).

DuckDB is imported here (inside functions) and by the catalog only (DESIGN §9).
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from rayflow.errors import ConfigError
from rayflow.sinks.base import PENDING_DIR, VERSION_COLUMN, Sink, _lost, _under, upsert_key

if TYPE_CHECKING:
    from rayflow._internal.checkpoint.store import Store

#: Statement types a query may run: reads only (DuckDB's own classification of the parsed SQL).
#: Not EXPLAIN: ``EXPLAIN ANALYZE`` executes the statement it explains (a DELETE, too).
_READ_ONLY = ("SELECT",)


class DuckDB(Sink):
    """Write the output to ``table`` in the DuckDB database file ``path`` (created if needed).

    - An **append stream** (a Map/Filter chain, a final Aggregate) is appended:
      each committed output file once, in one transaction with its name in
      ``_rayflow_applied`` (so a load repeated after a crash is skipped).
    - An **upsert stream** (``rf.ops.Aggregate`` over an unbounded input, or
      with ``emit="changes"``; see ``sinks/base.py``) is applied as upserts:
      the table is created with a ``PRIMARY KEY`` on the stream's key columns
      and keeps its ``_version`` column; a row replaces the row of its key
      only if its version is newer (``INSERT ... ON CONFLICT (key) DO UPDATE
      ... WHERE excluded._version > _version``), so an older file published
      late (a publication retried after a newer one) never overwrites newer
      values, and a re-applied file changes nothing. The table is a live
      materialized view, exactly-once: after each published commit it equals
      the aggregate over the input that commit covers.

    Reading it while the job runs: the pipeline's manager holds the database
    open for writing (DuckDB allows one writer process), so other processes
    read through it: ``run.query(sql)`` or ``rayflow sql --pipeline NAME
    "SELECT ..."`` (read-only statements; each sees whole commits, per
    partition: partitions publish independently, so one may be a commit ahead
    of another). After the run, open the file directly. The file must be on a
    filesystem the manager's node can reach.

    Caveats of upserts: key columns may not be null (a ``PRIMARY KEY`` cannot
    hold null; fill them before the Aggregate); an existing table must have
    that primary key (a table created by an append job is refused).
    """

    def __init__(self, path: str | os.PathLike, table: str):
        if not path or not table:
            raise ConfigError("rf.sinks.DuckDB needs a database path and a table name")
        if not table.replace("_", "").isalnum():
            raise ConfigError(f"rf.sinks.DuckDB: table must be a plain identifier, got {table!r}")
        self.path = os.path.abspath(os.fspath(path))
        self.table = table
        self._writer: _DuckDBWriter | None = None

    def root(self, *, pipeline_root: str) -> str:
        return _under(pipeline_root, "duckdb-sink")

    def publish(self, store: Store, name: str) -> None:
        """Load the pending file into the table (skipped if loaded before), then delete it."""
        pending = f"{PENDING_DIR}/{name}"
        if self._writer is None:
            self._writer = _DuckDBWriter(self.path, self.table)
        if not store.exists(pending):
            if self._writer.loaded(name):
                return  # loaded and deleted by an earlier call
            raise _lost(name)
        # An upsert stream says so in its schema (sinks/base.py); else the rows are appended.
        key = upsert_key(pq.read_schema(store.full(pending), filesystem=store.fs))
        self._writer.load(name, store.full(pending), key=key)
        store.delete(pending)

    def query(self, store: Store, sql: str) -> pa.Table:
        """Read-only ``sql`` over the database: on the writer's connection where this process
        holds it (the manager), else on a read-only connection of its own (after the run)."""
        _check_read_only(sql)
        if self._writer is None:
            return query_database(self.path, sql)
        cur = self._writer.con.cursor()
        try:
            return _run(cur, sql)
        finally:
            cur.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __getstate__(self) -> dict:  # an open connection never travels with the sink
        return {**self.__dict__, "_writer": None}

    def __repr__(self) -> str:
        return f"rf.sinks.DuckDB({self.path!r}, {self.table!r})"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


class _DuckDBWriter:
    """Loads committed output files into a DuckDB table, each exactly once.

    The sink's database is opened once, by the manager, on its I/O thread. If
    another process holds it (DuckDB allows one writer), opening fails at once
    and the manager retries publication with backoff, rather than stalling
    its commits behind a lock wait.
    """

    def __init__(self, path: str, table: str):
        import duckdb  # imported by the catalog and this module only (DESIGN §9)

        self.table = table
        try:
            self.con = duckdb.connect(path)
        except duckdb.IOException as e:
            raise ConfigError(
                f"rf.sinks.DuckDB cannot open {path}: {e}. Another process holds it for writing "
                "(DuckDB allows one writer): close it; the pipeline keeps retrying meanwhile."
            ) from e
        self.con.execute(
            "CREATE TABLE IF NOT EXISTS _rayflow_applied (file VARCHAR PRIMARY KEY, applied_at TIMESTAMP)"
        )

    def loaded(self, name: str) -> bool:
        cur = self.con.cursor()
        return bool(cur.execute("SELECT count(*) FROM _rayflow_applied WHERE file = ?", [name]).fetchone()[0])

    def load(self, name: str, parquet_path: str, *, key: list[str] | None = None) -> bool:
        """Apply the rows of ``parquet_path`` unless ``name`` was applied before; one transaction.

        ``key``: the key columns of an upsert stream (then rows are upserted,
        newer versions only), or ``None`` (append). Returns whether it applied.
        """
        cur = self.con.cursor()
        cur.execute("BEGIN TRANSACTION")
        try:
            if cur.execute("SELECT count(*) FROM _rayflow_applied WHERE file = ?", [name]).fetchone()[0]:
                cur.execute("ROLLBACK")
                return False
            src = f"read_parquet({_literal(parquet_path)})"
            if key is None:
                cur.execute(f"CREATE TABLE IF NOT EXISTS {_ident(self.table)} AS SELECT * FROM {src} LIMIT 0")
                cur.execute(f"INSERT INTO {_ident(self.table)} BY NAME SELECT * FROM {src}")
            else:
                self._upsert(cur, src, key)
            now = datetime.now(timezone.utc).replace(tzinfo=None)
            cur.execute("INSERT INTO _rayflow_applied VALUES (?, ?)", [name, now])
            cur.execute("COMMIT")
            return True
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def _upsert(self, cur, src: str, key: list[str]) -> None:
        """Upsert the newest row of each key in ``src`` where it is newer than the table's."""
        described = cur.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()  # (name, type, ...)
        cols, types = [r[0] for r in described], {r[0]: r[1] for r in described}
        table, keys = _ident(self.table), ", ".join(_ident(k) for k in key)
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {table} ("
            + ", ".join(f"{_ident(c)} {types[c]}" for c in cols)
            + f", PRIMARY KEY ({keys}))"
        )
        self._check_primary_key(cur, key)
        # A resumed job may aggregate more (compat lets it add an aggregation over a new input
        # column): the view gains the column, null for the keys no upsert has touched since.
        have = {r[0] for r in cur.execute(f"DESCRIBE {table}").fetchall()}
        for c in cols:
            if c not in have:
                cur.execute(f"ALTER TABLE {table} ADD COLUMN {_ident(c)} {types[c]}")
        nulls = " OR ".join(f"{_ident(k)} IS NULL" for k in key)
        if cur.execute(f"SELECT count(*) FROM {src} WHERE {nulls}").fetchone()[0]:
            raise ConfigError(
                f"rf.sinks.DuckDB: the upsert stream has a null in its key column(s) {key}, which the "
                f"PRIMARY KEY of table {self.table!r} cannot hold. Fill the nulls before the Aggregate "
                "(an rf.ops.Map with pyarrow.compute.fill_null), or use rf.sinks.Parquet"
            )
        updates = ", ".join(f"{_ident(c)} = excluded.{_ident(c)}" for c in cols if c not in key)
        v = _ident(VERSION_COLUMN)
        # One row per key (the newest): a file may hold several, and one statement may not
        # update a row twice. The WHERE keeps a newer row the table already has.
        cur.execute(
            f"INSERT INTO {table} BY NAME SELECT * FROM {src} "
            f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY {v} DESC) = 1 "
            f"ON CONFLICT ({keys}) DO UPDATE SET {updates} WHERE excluded.{v} > {table}.{v}"
        )

    def _check_primary_key(self, cur, key: list[str]) -> None:
        rows = cur.execute(
            "SELECT constraint_column_names FROM duckdb_constraints() "
            "WHERE table_name = ? AND constraint_type = 'PRIMARY KEY'",
            [self.table],
        ).fetchall()
        if not rows or sorted(rows[0][0]) != sorted(key):
            have = f"a primary key on {rows[0][0]}" if rows else "no primary key"
            raise ConfigError(
                f"rf.sinks.DuckDB: table {self.table!r} exists with {have}, but the upsert stream is "
                f"keyed by {key}: upserts need a PRIMARY KEY on exactly those columns. Drop the table "
                "or write to another one"
            )

    def close(self) -> None:
        self.con.close()


def _check_read_only(sql: str) -> None:
    import duckdb

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise ConfigError(f"the query does not parse: {e}") from None
    if len(statements) != 1:
        raise ConfigError(f"a query is one read-only statement, got {len(statements)}")
    kind = statements[0].type.name
    if kind not in _READ_ONLY:
        raise ConfigError(
            f"a query may only read ({', '.join(_READ_ONLY)} statements), got a {kind} statement: "
            "the sink is written by the pipeline alone"
        )


def _run(con, sql: str) -> pa.Table:
    import duckdb

    # Inside a transaction that is always rolled back: whatever the statement might change (on
    # the manager's writer connection, a running view) never lands.
    con.execute("BEGIN TRANSACTION")
    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as e:
        raise ConfigError(f"the query failed: {e}") from None
    finally:
        con.execute("ROLLBACK")


def query_database(path: str, sql: str) -> pa.Table:
    """Read-only ``sql`` over a DuckDB sink's database file that no process holds for writing
    (a running pipeline's manager does: read through it, ``run.query``)."""
    import duckdb

    _check_read_only(sql)
    if not os.path.exists(path):
        raise ConfigError(f"rf.sinks.DuckDB: {path} does not exist yet (nothing is published)")
    try:
        con = duckdb.connect(path, read_only=True)
    except duckdb.Error as e:
        raise ConfigError(
            f"rf.sinks.DuckDB cannot open {path} to read it: {e}. While a pipeline runs, its "
            "manager holds the file: read through it (run.query(sql), or rayflow sql --pipeline NAME)"
        ) from None
    try:
        return _run(con, sql)
    finally:
        con.close()


def query_files(store: Store, sql: str) -> pa.Table:
    """Read-only ``sql`` over the published Parquet files under ``store``'s root (a Parquet or
    Collect sink), in an in-memory DuckDB with two views:

    - ``output``: every published row (pending files, under ``_``-prefixed folders, excluded);
    - ``latest`` (upsert streams only): the latest row per key, ``_version`` kept:
      ``SELECT * FROM output QUALIFY row_number() OVER (PARTITION BY <key> ORDER BY _version
      DESC) = 1``.

    The files are scanned lazily (a ``pyarrow.dataset``), local or remote alike.
    """
    import duckdb
    import pyarrow.dataset as pads

    _check_read_only(sql)
    files = [
        f
        for f in store.list_files("")
        if f.endswith(".parquet") and not any(part[:1] in ("_", ".") for part in f.split("/"))
    ]
    if not files:
        raise ConfigError(f"no output is published under {store.root} yet")
    ds = pads.dataset([store.full(f) for f in files], filesystem=store.fs, format="parquet")
    con = duckdb.connect()
    try:
        con.register("_rayflow_output", ds)
        con.execute("CREATE VIEW output AS SELECT * FROM _rayflow_output")
        key = upsert_key(ds.schema)
        if key is not None:
            keys = ", ".join(_ident(k) for k in key)
            con.execute(
                f"CREATE VIEW latest AS SELECT * FROM output QUALIFY row_number() OVER "
                f"(PARTITION BY {keys} ORDER BY {_ident(VERSION_COLUMN)} DESC) = 1"
            )
        return _run(con, sql)
    finally:
        con.close()
