"""The sink contract: :class:`Sink`, the pending area, publication (see the package doc).

**Upsert streams.** An output table may be an *upsert stream* (what
``rf.ops.Aggregate`` emits at each commit over an unbounded input, or with
``emit="changes"``): each row is the newest value of its key, and a later row
of the same key replaces it. Such a table says so itself, so that sinks need
no knowledge of the operators:

- its schema metadata :data:`UPSERT_KEY_METADATA` names the key columns (a
  JSON list; :func:`upsert_key` reads it, and it survives Parquet);
- its :data:`VERSION_COLUMN` (``_version``, int64) orders the rows of a key:
  the row with the highest version is the latest. Versions increase per
  partition across commits, retries and owners (see ``rf.ops.Aggregate``), and
  a key stays in one partition while the partition map is unchanged, so the
  order is total for every key. One output file may hold several rows of a
  key (flushes of a commit attempt retried after a failure): the highest wins.

A table without that metadata is an append stream (every row counts once).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pyarrow as pa

from rayflow.errors import ConfigError, ProtocolError

if TYPE_CHECKING:  # the store is handed in by the engine; only its type is named here
    from rayflow._internal.checkpoint.store import Store


#: The pending area under a sink's root: outputs written but not yet covered by a recorded commit.
#: Its leading ``_`` hides it from ``pyarrow.dataset``, DuckDB's ``read_parquet('dir/*.parquet')``
#: and Spark (a reader that globs ``**/*.parquet`` still sees it: publication empties it).
PENDING_DIR = "_pending"


#: Schema metadata of an upsert stream naming its key columns (a JSON list of names).
UPSERT_KEY_METADATA = b"rayflow.upsert_key"
#: The int64 column of an upsert stream that orders the rows of one key (highest = latest).
VERSION_COLUMN = "_version"


def upsert_key(schema: pa.Schema) -> list[str] | None:
    """The key columns of an upsert stream (see the module doc); ``None`` for an append stream."""
    raw = (schema.metadata or {}).get(UPSERT_KEY_METADATA)
    if raw is None or VERSION_COLUMN not in schema.names:
        return None
    key = json.loads(raw)
    missing = [k for k in key if k not in schema.names]
    if missing:
        raise ConfigError(
            f"an upsert stream names key column(s) {missing} that it does not have (its columns are "
            f"{schema.names}): an operator after the Aggregate dropped them; keep the key columns "
            f"and {VERSION_COLUMN!r}, or drop the schema metadata to make it an append stream"
        )
    return key


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

    def query(self, store: Store, sql: str) -> pa.Table:
        """Run the read-only ``sql`` over the published output; the default reads the files under
        :meth:`root` (views ``output`` and, for an upsert stream, ``latest``: the latest row per
        key; see ``sinks/duckdb.py``). ``store`` is the sink's root. Raises
        :class:`~rayflow.errors.ConfigError` for a statement that is not read-only, an SQL error,
        or when nothing is published yet.

        Called by the pipeline's manager while the job runs (``Run.query``, ``rayflow sql
        --pipeline``), on its I/O thread between publications, so it sees whole commits only; a
        long query delays publication meanwhile. After the run, any process may call it.
        """
        from rayflow.sinks.duckdb import query_files  # the sinks' DuckDB use lives in one module

        return query_files(store, sql)

    def mark_complete(self, store: Store, info: bytes) -> None:
        """Called by the driver once a bounded job has ended with every output published: a
        sink whose directory a later stage reads (``rf.sources.Stage``) says that no file will
        come any more. The default does nothing."""

    def clear_complete(self, store: Store) -> None:
        """Called by a job's manager when it starts with nothing committed: a marker of
        :meth:`mark_complete` left by an earlier job in the same place is not this job's."""

    def close(self) -> None:
        """Release what :meth:`publish` opened (the manager calls this when the run ends)."""


def _lost(name: str) -> ProtocolError:
    return ProtocolError(
        f"the committed output {name} is neither pending nor published: it was deleted before it "
        "was published, and the sink misses its rows. This is a bug in rayflow, please report it."
    )
