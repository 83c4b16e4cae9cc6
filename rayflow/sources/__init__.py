"""Sources: where events come from (DESIGN §2.1).

A source is a set of *splits*. A split reads Arrow record batches, and every
batch has a *position*: the row offset, within the split, of the next row to
read after it. The contract every split keeps, and that exact recovery rests
on:

- ``read(position)`` yields ``(batch, next_position)`` pairs starting at row
  ``position``; ``next_position`` of one pair is where the next one starts,
  and the first starts exactly at ``position`` (never earlier: be careful of
  off-by-one errors, a row before ``position`` must not come again).
- Reading from a position is deterministic: the same position yields the same
  rows, in the same order, in any process, on any machine.
- Batches end on a fixed grid of positions (multiples of ``batch_rows``, or
  the generator's blocks), whatever position reading starts from: so a
  position that ended one batch ends a batch in every later read, and a
  resumed read never cuts an already processed batch in two.
- A split holds no reading state of its own: everything comes from the
  position passed to ``read``, never from the constructor, so a restarted
  source actor can resume any split from a committed position.

Built in: :class:`Table` (in memory, ``table.py``), :class:`Parquet`, :class:`CSV` and
:class:`JSON` (a file, a directory or a glob, through ``pyarrow.dataset``),
:class:`Files` (a directory, local or a ``pyarrow.fs`` URI, watched for new files),
:class:`Kafka` (a topic, one split per partition; ``kafka.py``) and
:class:`Synthetic`, the standard event generator of WORKLOAD.md.
"""

from rayflow.sources.base import Source, Split
from rayflow.sources.files import CSV, JSON, Files, Parquet
from rayflow.sources.kafka import Kafka
from rayflow.sources.synthetic import SYNTHETIC_SCHEMA as SYNTHETIC_SCHEMA
from rayflow.sources.synthetic import Synthetic
from rayflow.sources.table import Table

__all__ = ["CSV", "Files", "JSON", "Kafka", "Parquet", "Source", "Split", "Synthetic", "Table"]
