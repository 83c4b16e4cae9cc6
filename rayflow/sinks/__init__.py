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
- :class:`Kafka` produces each committed output file's rows to a Kafka topic
  (JSON values): at least once, every message with an idempotency key header
  (output file name and row), and a repeated publication skipped by a marker.

What differs between sinks is a method of :class:`Sink`, never a type test in
the engine: where the files go (:meth:`Sink.root`), how a committed file is
made visible (:meth:`Sink.publish`) and what a finished run hands back
(:meth:`Sink.read_output`). The contract is in ``base.py``; each sink has its module.
"""

from rayflow.sinks.base import PENDING_DIR as PENDING_DIR
from rayflow.sinks.base import Sink
from rayflow.sinks.duckdb import DuckDB
from rayflow.sinks.files import Collect, Parquet
from rayflow.sinks.kafka import Kafka

__all__ = ["Collect", "DuckDB", "Kafka", "Parquet", "Sink"]
