"""Sinks: where a pipeline's output goes (DESIGN §2.5).

Built-in sinks are transactional: a consumer writes each partition's output
to a pending file, and the file is published under its final name only after
the catalog commit that covers it. A reader of the output directory never
sees rows that are not committed, and a replay after a crash never doubles
rows (pending files of a failed attempt are deleted, never published).

- :class:`Parquet` writes a dataset directory (``part-<partition>-...parquet``).
- :class:`Collect` keeps the output with the checkpoints and hands it back as
  ``result.output`` (an Arrow table): for tests, notebooks and small results.
- :class:`DuckDB` appends the output to a table of a DuckDB database file.
  Each committed output file is loaded in one DuckDB transaction together
  with its name in a ``_rayflow_applied`` table, so a load repeated after a
  crash is skipped: exactly-once, keyed by (partition, positions), which is
  what an output file's name encodes.

What differs between sinks is a method of :class:`Sink`, never a type test in
the engine: where the files go (:meth:`Sink.root`), how a committed file is
made visible (:meth:`Sink.publish`) and what a finished run hands back
(:meth:`Sink.read_output`).
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import pyarrow as pa

from rayflow.errors import ConfigError, ProtocolError

if TYPE_CHECKING:  # the store is handed in by the engine; only its type is named here
    from rayflow._internal.checkpoint.store import Store

__all__ = ["Collect", "DuckDB", "Parquet", "Sink"]

#: The pending area under a sink's root: outputs written but not yet covered by a recorded commit.
#: Its leading ``_`` hides it from ``pyarrow.dataset``, DuckDB's ``read_parquet('dir/*.parquet')``
#: and Spark (a reader that globs ``**/*.parquet`` still sees it: publication empties it).
PENDING_DIR = "_pending"


def _under(root: str, name: str) -> str:
    """``root/name`` for a local path or a URI, keeping a URI's query (``?endpoint_override=``)."""
    path, sep, query = root.partition("?")
    return f"{path.rstrip('/')}/{name}{sep}{query}"


class Sink:
    """Base class of sinks.

    A sink names the root directory its files go to, publishes committed
    output files, and reads a finished run's output back (if it keeps one).

    :meth:`publish` is called by the pipeline's manager only, after the
    catalog has recorded the commit that names the file, and possibly many
    times for the same file (a retry after an error, a repeated commit, a
    manager restart): it must be idempotent. The default moves the pending
    file to its final name (the Parquet and Collect sinks).
    """

    #: Whether the catalog must keep the list of published output files for good, because
    #: :meth:`read_output` reads them at the end of the run. Otherwise that list is trimmed with
    #: the commits it came from (the files stay where they were published).
    keeps_output_list: bool = False

    def root(self, *, pipeline_root: str) -> str:
        raise NotImplementedError

    def publish(self, store: Store, name: str) -> None:
        """Make the committed output ``name`` (now ``<root>/_pending/<name>``) visible; idempotent.

        Once the pending file is gone the output is published, and a repeated
        call does nothing. Raising leaves it pending: the manager retries. A
        file neither pending nor published is lost: :class:`ProtocolError`
        (loud, never a silent gap in the output).
        """
        pending = f"{PENDING_DIR}/{name}"
        if store.exists(pending):
            store.move(pending, name)  # replaces an earlier copy of the same rows, if any
        elif not store.exists(name):
            raise _lost(name)

    def read_output(self, store: Store, files: list[str]) -> pa.Table | None:
        """What a finished run hands back as ``result.output``; ``files`` are its published
        outputs in commit order (relative to :meth:`root`). ``None`` for sinks whose output
        lives elsewhere (a dataset directory, a database table)."""
        return None

    def close(self) -> None:
        """Release what :meth:`publish` opened (the manager calls this when the run ends)."""


class Parquet(Sink):
    """A Parquet dataset directory (local path or ``pyarrow.fs`` URI).

    Files starting with ``_`` (the pending area) are ignored by
    ``pyarrow.dataset``, DuckDB's ``read_parquet('dir/*.parquet')`` and Spark.
    """

    def __init__(self, path: str | os.PathLike):
        if not path:
            raise ConfigError("rf.sinks.Parquet needs a directory path")
        self.path = os.fspath(path)

    def root(self, *, pipeline_root: str) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"rf.sinks.Parquet({self.path!r})"


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


class Collect(Sink):
    """Collect the output into ``result.output`` (an Arrow table)."""

    # The list of files is the result: it grows with the output, which the driver holds in
    # memory at the end anyway, so keeping it costs a fraction of what the result does.
    keeps_output_list = True

    def root(self, *, pipeline_root: str) -> str:
        return _under(pipeline_root, "collect")

    def read_output(self, store: Store, files: list[str]) -> pa.Table:
        tables = [store.read_parquet(f) for f in files]
        return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})

    def __repr__(self) -> str:
        return "rf.sinks.Collect()"


def _lost(name: str) -> ProtocolError:
    return ProtocolError(
        f"the committed output {name} is neither pending nor published: it was deleted before it "
        "was published, and the sink misses its rows. This is a bug in rayflow, please report it."
    )


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
