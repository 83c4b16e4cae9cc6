"""File sinks: :class:`Parquet` (a dataset directory) and :class:`Collect` (``result.output``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pyarrow as pa

from rayflow.errors import ConfigError
from rayflow.sinks.base import Sink, _under

if TYPE_CHECKING:
    from rayflow._internal.checkpoint.store import Store


#: Written in a Parquet sink's directory when the bounded job writing it has ended: every file
#: is published (``_`` keeps it out of datasets, DuckDB globs and ``rf.sources.Files``).
COMPLETE_MARKER = "_rayflow_complete.json"


class Parquet(Sink):
    """A Parquet dataset directory (local path or ``pyarrow.fs`` URI).

    Each commit of a partition publishes one file
    (``part-<partition>-e<lease epoch>-<positions digest>.parquet``), so the
    directory grows with every commit. For an upsert stream (an
    ``rf.ops.Aggregate`` over an unbounded input, or ``emit="changes"``) it
    holds every version of every key: the latest row per key is the one with
    the highest ``_version``. ``rayflow sql --output DIR "SELECT * FROM
    latest"`` (or ``run.query`` while the job runs) offers it as the view
    ``latest``; any reader can compute it with ``QUALIFY row_number() OVER
    (PARTITION BY <key> ORDER BY _version DESC) = 1``.

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

    def mark_complete(self, store: Store, info: bytes) -> None:
        # Written after the last file is published (the job is done only then): a reader that
        # sees the marker and then lists the directory sees every file (rf.sources.Stage).
        store.write_bytes(COMPLETE_MARKER, info)

    def clear_complete(self, store: Store) -> None:
        if store.exists(COMPLETE_MARKER):
            store.delete(COMPLETE_MARKER)


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
