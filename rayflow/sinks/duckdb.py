"""The DuckDB sink: committed outputs loaded into a table, each exactly once."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from rayflow.errors import ConfigError
from rayflow.sinks.base import PENDING_DIR, Sink, _lost, _under

if TYPE_CHECKING:
    from rayflow._internal.checkpoint.store import Store


class DuckDB(Sink):
    """Append the output to ``table`` in the DuckDB database file ``path`` (created if needed).

    Caveats: the database is held open for writing by the pipeline's manager
    while the job runs (DuckDB allows one writer process), so read it after
    the run. The file must be on a filesystem the manager's node can reach.
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
        self._writer.load(name, store.full(pending))
        store.delete(pending)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __getstate__(self) -> dict:  # an open connection never travels with the sink
        return {**self.__dict__, "_writer": None}

    def __repr__(self) -> str:
        return f"rf.sinks.DuckDB({self.path!r}, {self.table!r})"


class _DuckDBWriter:
    """Loads committed output files into a DuckDB table, each exactly once.

    The sink's database is opened once, by the manager, on its I/O thread. If
    another process holds it (DuckDB allows one writer), opening fails at once
    and the manager retries publication with backoff, rather than stalling
    its commits behind a lock wait.
    """

    def __init__(self, path: str, table: str):
        import duckdb  # imported by the catalog and this sink only (DESIGN §9)

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

    def load(self, name: str, parquet_path: str) -> bool:
        """Append the rows of ``parquet_path`` unless ``name`` was loaded before; one transaction."""
        cur = self.con.cursor()
        cur.execute("BEGIN TRANSACTION")
        try:
            if cur.execute("SELECT count(*) FROM _rayflow_applied WHERE file = ?", [name]).fetchone()[0]:
                cur.execute("ROLLBACK")
                return False
            src = f"read_parquet('{parquet_path.replace(chr(39), chr(39) * 2)}')"
            cur.execute(f'CREATE TABLE IF NOT EXISTS "{self.table}" AS SELECT * FROM {src} LIMIT 0')
            cur.execute(f'INSERT INTO "{self.table}" BY NAME SELECT * FROM {src}')
            now = datetime.now(timezone.utc).replace(tzinfo=None)
            cur.execute("INSERT INTO _rayflow_applied VALUES (?, ?)", [name, now])
            cur.execute("COMMIT")
            return True
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.con.close()
