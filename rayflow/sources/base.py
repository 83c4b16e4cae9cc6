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

"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import pyarrow as pa

from rayflow.errors import ConfigError

#: Rows per batch a split yields: large enough that Ray's per-call cost and
#: Arrow's per-kernel cost vanish per row, small enough to keep progress smooth.
DEFAULT_BATCH_ROWS = 1_000_000


class Split(ABC):
    """One independently readable, replayable part of a source. Picklable."""

    #: A stable name (file path, block range); recorded with committed positions.
    name: str

    @abstractmethod
    def read(self, position: int) -> Iterator[tuple[pa.RecordBatch, int]]:
        """Yield ``(batch, next_position)`` from row ``position`` on (see module doc)."""


class Source(ABC):
    """A set of splits sharing one schema."""

    @abstractmethod
    def splits(self) -> list[Split]:
        """Resolve the splits. Raises :class:`SourceNotFoundError` / :class:`EmptyInputError`."""

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
