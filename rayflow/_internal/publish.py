"""Publishing committed outputs: commit step 5, on the manager's side (see ``commit.py``).

Consumers write each partition's outputs as a pending Parquet file under the
sink's root (``_pending/<name>``). Once the catalog has recorded the commit
naming it, the manager publishes it through the sink (:meth:`Sink.publish`:
a Parquet or Collect sink moves it to its final name; a DuckDB sink loads it,
exactly once, and deletes it). What is still to publish is read from the
catalog (``outputs`` table), so publication is retried until it succeeds: by
the manager's background loop, on a repeated commit, and after a restart.

Readers of a live sink come here too (:meth:`Publisher.query`): the manager
holds the sink (a DuckDB database has one writer process), and a query run
between two publications sees whole commits only.

Side streams (late rows of a Window, ``Operator.side_sinks``) have sinks of
their own: an output named ``<stream>/<file>`` (``commit.side_output``) is
published through that stream's sink, exactly like the main one.

Every method blocks: the manager calls them on its one I/O thread.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pyarrow as pa

from rayflow._internal.checkpoint.commit import output_stream, pending_path, side_output
from rayflow._internal.checkpoint.store import Store
from rayflow.sinks import PENDING_DIR, Sink


class Publisher:
    def __init__(
        self,
        sink: Sink,
        root: str,
        *,
        fault: Callable[[str], None] | None = None,
        sides: Mapping[str, tuple[Sink, str]] | None = None,
    ):
        """``sides``: side stream -> (its sink, its resolved root)."""
        self.sink = sink
        self.store = Store(root)
        self._fault = fault
        self.sides = {stream: (s, Store(r)) for stream, (s, r) in (sides or {}).items()}

    def _where(self, output: str) -> tuple[Sink, Store, str]:
        stream, name = output_stream(output)
        if stream is None:
            return self.sink, self.store, name
        sink, store = self.sides[stream]
        return sink, store, name

    def pending_exists(self, output: str) -> bool:
        _, store, name = self._where(output)
        return store.exists(pending_path(name))

    def publish(self, output: str) -> None:
        """Make one committed output visible; idempotent (a published one is left as it is)."""
        if self._fault is not None:
            self._fault("manager.publish")
        sink, store, name = self._where(output)
        sink.publish(store, name)

    def query(self, sql: str) -> pa.Table:
        """Read-only ``sql`` over the published output (:meth:`Sink.query`): between two
        publications (the caller's I/O thread runs both), so it sees whole commits only."""
        return self.sink.query(self.store, sql)

    def delete_unrecorded(self, recorded: set[str]) -> list[str]:
        """Delete pending files no recorded commit names (attempts that never committed, and
        half-written temporaries); returns them. Only safe when no commit is in flight: at a
        fresh start, never after a restart mid-run (a consumer may be about to commit one)."""
        gone = []
        stores = [(None, self.store)] + [(stream, store) for stream, (_, store) in self.sides.items()]
        for stream, store in stores:
            for rel in store.list_files(PENDING_DIR):
                name = rel[len(PENDING_DIR) + 1 :]
                if (name if stream is None else side_output(stream, name)) not in recorded:
                    store.delete(rel)
                    gone.append(rel if stream is None else side_output(stream, rel))
        return gone

    def close(self) -> None:
        self.sink.close()
        for sink, _ in self.sides.values():
            sink.close()
