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
"""

from __future__ import annotations

import os

from rayflow._internal.checkpoint.store import join
from rayflow.errors import ConfigError

__all__ = ["Collect", "DuckDB", "Parquet", "Sink"]

PENDING_DIR = "_pending"


class Sink:
    """Base class: a sink names the root directory its files go to."""

    def root(self, *, pipeline_root: str) -> str:
        raise NotImplementedError


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

    def root(self, *, pipeline_root: str) -> str:
        return join(pipeline_root, "duckdb-sink")

    def __repr__(self) -> str:
        return f"rf.sinks.DuckDB({self.path!r}, {self.table!r})"


class Collect(Sink):
    """Collect the output into ``result.output`` (an Arrow table)."""

    def root(self, *, pipeline_root: str) -> str:
        return join(pipeline_root, "collect")

    def __repr__(self) -> str:
        return "rf.sinks.Collect()"
