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
- A name always means the same data: positions are recorded by name, so a
  split whose name comes back with other rows (a file replaced under the same
  name) would be read on from the old data's positions. A split that can tell
  which data it is gives a :meth:`Split.fingerprint`; for a dynamic source the
  job records it the first time it sees the name, and refuses the split when
  the same name later comes with another fingerprint.

"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from rayflow.errors import ConfigError

#: Rows per batch a split yields: large enough that Ray's per-call cost and
#: Arrow's per-kernel cost vanish per row, small enough to keep progress smooth.
DEFAULT_BATCH_ROWS = 1_000_000

#: An unbounded split with no data yields an empty batch at least this often (see Split).
IDLE_TICK_S = 0.5


class Split(ABC):
    """One independently readable, replayable part of a source. Picklable.

    **Unbounded splits** (``unbounded = True``: a Kafka topic partition, a paced
    generator) keep the contract above, and besides:

    - ``read`` may wait for data and never end. It waits without busy polling
      (a broker poll with a timeout, a sleep until the next row is due), and
      when no data comes it yields an *idle tick* at least every
      :data:`IDLE_TICK_S`: an empty batch (the source's schema) whose
      ``next_position`` is the current position (or, with ``dense = False``,
      past positions that hold no rows). Ticks let the source actor stop the
      read, and tell a quiet split from a stuck one.
    - The source actor closes the generator (``close()``) when it stops
      reading, so a ``try/finally`` in ``read`` releases what it holds.

    **Positions with gaps** (``dense = False``: Kafka offsets, where
    transaction markers and compaction leave holes): a batch covers the
    positions ``[previous next_position, next_position)``, not
    ``next_position - num_rows``, and :meth:`row_positions` gives each row's
    own position (the source actor needs it to cut a batch at a committed
    position on replay).
    """

    #: A stable name (file path, block range, ``topic/partition``); recorded with committed positions.
    name: str
    #: ``read`` may wait for data and never end (see the class doc).
    unbounded: bool = False
    #: Positions count rows: a batch covers ``[next_position - num_rows, next_position)``.
    dense: bool = True

    @abstractmethod
    def read(self, position: int) -> Iterator[tuple[pa.RecordBatch, int]]:
        """Yield ``(batch, next_position)`` from row ``position`` on (see module doc)."""

    def row_positions(self, batch: pa.RecordBatch) -> np.ndarray:
        """The position of each row of ``batch`` (int64, ascending). Only called when ``dense`` is
        False; a dense split's rows are at ``next_position - num_rows + arange(num_rows)``.

        It must hold for any subset of a batch's rows in their order (a partition's
        sub-batch): the positions come from the rows themselves (an offset column)."""
        raise NotImplementedError(f"{type(self).__name__} has dense=False but no row_positions()")

    def fingerprint(self) -> str | None:
        """What identifies the data behind this name (a file's size and mtime), or ``None``:
        nothing to check (the default).

        Only splits of a *dynamic* source are checked: the source actor records
        each split's fingerprint in the job's catalog before serving any of its
        rows (the first one recorded for a name stays), and a later run or a
        restarted source actor that gets another fingerprint for a recorded name
        fails with :class:`~rayflow.errors.MalformedInputError` rather than read
        the new data on from the old data's committed positions. It must be the
        same string in every process for the same data (no object ids, no local
        clocks), and cheap: it is called once per split and start, from what the
        split already holds (never by reading the data).
        """
        return None

    def bind(self, *, job_started_ms: int) -> Split:
        """This split as a job reads it: the source actor calls this before reading.

        ``job_started_ms``: the wall-clock time (ms since the epoch) at which
        the job first started reading, recorded in its catalog and the same at
        every resume, for a split whose rows depend on a start time (a paced
        generator's schedule) and must stay deterministic by position across
        resumes. Returns a split with the same name; the default is the split
        itself.
        """
        return self

    def available(self) -> int | None:
        """The position just past the newest row that could be read now (Kafka's high
        watermark; the rows due so far of a paced generator), for lag; ``None`` if unknown.

        Called by the source actor from a worker thread, at most about once a
        second; may block briefly (a broker round trip). Never treat it as the
        end of the data: a broker's watermark can trail what it holds.
        """
        return None


class Source(ABC):
    """A set of splits sharing one schema.

    A *dynamic* source (``dynamic = True``: a watched directory, a Kafka topic
    that may gain partitions) is asked for its splits again while the job
    runs, every ``EngineConfig.discovery_interval_s``, by the source actors:
    splits with new names are read from position 0 (or their committed
    position), splits already known keep going. A job whose source is
    :attr:`unbounded` never ends on its own: it runs until ``run.stop()``.
    """

    #: ``splits()`` may return new splits while the job runs (see the class doc).
    dynamic: bool = False

    @property
    def unbounded(self) -> bool:
        """The job never ends on its own: a split is unbounded, or splits may keep appearing."""
        return self.dynamic

    def complete(self) -> bool:
        """For a dynamic source that is *not* unbounded (its splits appear while the job runs,
        and then stop appearing: the output of an upstream stage that ends): True once the
        splits the next :meth:`splits` call returns are all it will ever have.

        The source actors ask it before each listing; once it says True, that listing is the
        last, and the job ends when those splits are read. The default (False) never ends a
        dynamic source: with ``unbounded`` False it would wait for splits for ever.
        """
        return False

    def on_commit(self, positions: dict[str, int]) -> None:
        """Told, now and then, the positions every partition has committed (split name -> the
        lowest committed position over the partitions): Kafka commits them under its group id,
        so Kafka's lag tools see the job. Informational and best effort: called by the
        pipeline's manager every few seconds when they moved (never per commit, never
        exactly-once: the catalog is the truth); must not raise. The default does nothing."""
        return None

    def close(self) -> None:
        """Release what :meth:`on_commit` opened (the manager calls it when the run ends)."""
        return None

    @abstractmethod
    def splits(self) -> list[Split]:
        """Resolve the splits. Raises :class:`SourceNotFoundError` / :class:`EmptyInputError`
        (a dynamic source returns what exists now, possibly nothing, rather than raise
        ``EmptyInputError``)."""

    @property
    @abstractmethod
    def schema(self) -> pa.Schema:
        """The schema of every batch."""


def _regrid(
    batches: Iterator[pa.RecordBatch], position: int, batch_rows: int
) -> Iterator[tuple[pa.RecordBatch, int]]:
    """Re-cut a stream that starts at row ``position`` into batches that end on multiples of
    ``batch_rows`` (the first one may be shorter).

    The grid is absolute, not relative to ``position``: reading from any batch
    boundary yields the same batches as reading from the top. A restarted
    source may resume from a different position than the one a consumer has
    processed up to, and positions on one grid never cut a batch in two.
    """
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    want = batch_rows - position % batch_rows
    for b in batches:
        while b.num_rows:
            take = min(want - pending_rows, b.num_rows)
            pending.append(b.slice(0, take))
            pending_rows += take
            b = b.slice(take)
            if pending_rows == want:
                position += pending_rows
                yield _concat(pending), position
                pending, pending_rows, want = [], 0, batch_rows
    if pending_rows:
        yield _concat(pending), position + pending_rows


def _concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]


def _check_batch_rows(batch_rows: int) -> None:
    if not isinstance(batch_rows, int) or batch_rows < 1:
        raise ConfigError(f"batch_rows must be an integer >= 1, got {batch_rows!r}")


def wait_until_due(
    release_ms: float, idle: pa.RecordBatch, position: int
) -> Iterator[tuple[pa.RecordBatch, int]]:
    """For a paced split: sleep until the wall clock reaches ``release_ms`` (ms since the epoch),
    yielding ``(idle, position)`` idle ticks at least every :data:`IDLE_TICK_S` meanwhile."""
    while True:
        left_s = (release_ms - time.time() * 1000) / 1000
        if left_s <= 0:
            return
        time.sleep(min(left_s, IDLE_TICK_S))
        if time.time() * 1000 < release_ms:
            yield idle, position  # an idle tick: alive, nothing due yet
