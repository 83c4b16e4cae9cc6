"""Publishing committed outputs: the last step of the commit protocol (manager side).

Consumers write each partition's outputs as a pending Parquet file under the
sink's root (``_pending/<name>``). Once the catalog has recorded the commit
naming it, the manager publishes it: a Parquet (or Collect) sink moves it to
its final name; a DuckDB sink loads it (exactly once) and deletes it. At every
start the manager repairs what a crash left: committed pending files are
published, the others (from commits that never happened) deleted.
"""

from __future__ import annotations

from rayflow._internal.checkpoint.catalog import DuckDBSinkWriter
from rayflow._internal.checkpoint.store import Store
from rayflow.sinks import PENDING_DIR, DuckDB, Sink


class Publisher:
    def __init__(self, sink: Sink, root: str):
        self.store = Store(root)
        self.duckdb = DuckDBSinkWriter(sink.path, sink.table) if isinstance(sink, DuckDB) else None

    def pending_exists(self, name: str) -> bool:
        return self.store.exists(f"{PENDING_DIR}/{name}")

    def publish(self, name: str) -> None:
        """Make one committed output visible; idempotent."""
        rel = f"{PENDING_DIR}/{name}"
        if not self.store.exists(rel):
            return  # already published
        if self.duckdb is None:
            self.store.move(rel, name)
        else:
            self.duckdb.load(name, self.store.full(rel))
            self.store.delete(rel)

    def repair(self, committed: set[str]) -> None:
        for rel in self.store.list_files(PENDING_DIR):
            name = rel[len(PENDING_DIR) + 1 :]
            if name in committed:
                self.publish(name)
            else:
                self.store.delete(rel)

    def close(self) -> None:
        if self.duckdb is not None:
            self.duckdb.close()
