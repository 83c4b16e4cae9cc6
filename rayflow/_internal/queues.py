"""Per-partition queues of the source actor (pure bookkeeping, no Ray calls).

A queue holds, in append order, the sub-batches of one partition that are not
yet committed. Each entry is tagged with its split and row range
``[start, end)`` in that split. A consumer fetches the entries after the
positions it has processed; after it commits, the source trims the entries up
to the committed positions. So what a queue retains is exactly what a
consumer crash would need again, and it is bounded (``max_rows`` /
``max_bytes``): a full queue holds the source back (DESIGN §6).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Any

from rayflow.errors import ProtocolError


class QueueState(enum.Enum):
    OPEN = "open"  # the source may still append
    DRAINING = "draining"  # input exhausted: no more appends, entries remain
    CLOSED = "closed"  # input exhausted and everything trimmed


@dataclass(frozen=True)
class Entry:
    split: str
    start: int
    end: int
    rows: int
    nbytes: int
    payload: Any  # an ObjectRef to the sub-batch in the actor; anything in tests
    #: Where the previous entry of this partition and split ended (or the partition's
    #: committed position): the source read every row in ``[since, start)`` and none of
    #: them belongs to this partition. The consumer requires ``since <= processed``.
    since: int | None = None
    #: The split's watermark after the batch this entry was cut from (a job with event time).
    watermark: int | None = None


class PartitionQueue:
    def __init__(self, partition: int, *, max_rows: int, max_bytes: int):
        self.partition = partition
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.entries: deque[Entry] = deque()
        self.rows = 0
        self.nbytes = 0
        self.state = QueueState.OPEN

    def append(self, entry: Entry) -> None:
        if self.state is not QueueState.OPEN:
            raise ProtocolError(f"partition {self.partition}: append to a {self.state.value} queue")
        self.entries.append(entry)
        self.rows += entry.rows
        self.nbytes += entry.nbytes

    def close_input(self) -> None:
        if self.state is QueueState.OPEN:
            self.state = QueueState.DRAINING if self.entries else QueueState.CLOSED

    @property
    def full(self) -> bool:
        return self.rows >= self.max_rows or self.nbytes >= self.max_bytes

    def after(self, positions: dict[str, int], max_bytes: int) -> tuple[list[Entry], bool]:
        """Entries past ``positions`` (split -> processed position), up to ``max_bytes``.

        Returns ``(entries, rest)``: ``rest`` is True when more entries remain
        past what is returned. At least one entry is returned when any is due.
        """
        out: list[Entry] = []
        size = 0
        for e in self.entries:
            if e.end <= positions.get(e.split, 0):
                continue
            if out and size + e.nbytes > max_bytes:
                return out, True
            out.append(e)
            size += e.nbytes
        return out, False

    def trim(self, positions: dict[str, int]) -> int:
        """Drop entries covered by committed ``positions``; returns the rows freed."""
        freed = 0
        keep: deque[Entry] = deque()
        for e in self.entries:
            if e.end <= positions.get(e.split, 0):
                freed += e.rows
                self.nbytes -= e.nbytes
            else:
                keep.append(e)
        self.entries = keep
        self.rows -= freed
        if self.state is QueueState.DRAINING and not self.entries:
            self.state = QueueState.CLOSED
        return freed
