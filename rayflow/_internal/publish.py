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

Every method blocks: the manager calls them on its one I/O thread.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from rayflow._internal.checkpoint.store import Store
from rayflow.sinks import PENDING_DIR, Sink


class Publisher:
    def __init__(self, sink: Sink, root: str, *, fault: Callable[[str], None] | None = None):
        self.sink = sink
        self.store = Store(root)
        self._fault = fault

    def pending_exists(self, name: str) -> bool:
        return self.store.exists(f"{PENDING_DIR}/{name}")

    def publish(self, name: str) -> None:
        """Make one committed output visible; idempotent (a published one is left as it is)."""
        if self._fault is not None:
            self._fault("manager.publish")
        self.sink.publish(self.store, name)

    def query(self, sql: str) -> pa.Table:
        """Read-only ``sql`` over the published output (:meth:`Sink.query`): between two
        publications (the caller's I/O thread runs both), so it sees whole commits only."""
        return self.sink.query(self.store, sql)

    def delete_unrecorded(self, recorded: set[str]) -> list[str]:
        """Delete pending files no recorded commit names (attempts that never committed, and
        half-written temporaries); returns them. Only safe when no commit is in flight: at a
        fresh start, never after a restart mid-run (a consumer may be about to commit one)."""
        gone = []
        for rel in self.store.list_files(PENDING_DIR):
            if rel[len(PENDING_DIR) + 1 :] not in recorded:
                self.store.delete(rel)
                gone.append(rel)
        return gone

    def close(self) -> None:
        self.sink.close()
