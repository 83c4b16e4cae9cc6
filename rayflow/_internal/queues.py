"""Per-partition queues of the source actor (pure bookkeeping, no Ray calls).

A queue holds, in append order, the sub-batches of one partition that are not
yet committed. Each entry is tagged with its split and row range
``[start, end)`` in that split. A consumer fetches the entries after the
positions it has processed; after it commits, the source trims the entries up
to the committed positions. So what a queue retains is exactly what a
consumer crash would need again.

An entry lives in Ray's object store (``payload`` an ObjectRef) or, *spilled*,
in a local file (``payload`` a ``spill.SpillHandle``); the queue keeps both in
one order and serves them alike. ``rows`` / ``nbytes`` count what is in memory,
``spilled_rows`` / ``spilled_bytes`` what is on disk.

**Bounds** (DESIGN §6, :func:`place` and :func:`must_pause`, composed as
"a sub-batch goes to memory only if every memory bound says yes"):

1. a partition's queue: ``queue_max_rows`` / ``queue_max_bytes`` in memory
   (``PartitionQueue.full``);
2. the source actor: ``source_max_bytes`` in memory over all its queues;
3. the source actor's spill: ``spill_max_bytes`` on disk.

A sub-batch goes to memory while 1 and 2 have room, else to disk while 3 has
room; the source pauses reading only while a memory bound is hit *and* the disk
budget is used up (with ``spill_max_bytes=0``: while a memory bound is hit). So a
slow partition spills, and the others keep flowing until the disk budget is spent.

**Priority tiers** (docs/tiers.md) lower bound 2 for the less critical tiers
(``Budget.memory_ceilings``): a partition of rank ``r`` (``R`` the least
critical rank any partition has) goes to memory only while the actor's memory
is under ``source_max_bytes * (1 - TIER_MEMORY_RESERVE * r / R)``, so the
lowest tier spills first and the top :data:`TIER_MEMORY_RESERVE` of the
memory is kept for higher tiers. The
ceilings apply only while the disk has room: they decide memory or disk, and
never make the source pause sooner (:func:`must_pause` ignores them).
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


#: Bytes counted toward the disk budget (``spill_max_bytes``) per spilled entry, on top of its
#: sub-batch's: the Python objects the source actor keeps for it while it is on disk (its
#: ``Entry`` and ``SpillHandle``, about 300 B with slots, measured). So the budget also bounds
#: the actor's heap when sub-batches are tiny (at most ``spill_max_bytes / 512`` entries).
SPILL_ENTRY_OVERHEAD = 512


@dataclass(frozen=True, slots=True)
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
    #: On local disk (``payload`` a ``spill.SpillHandle``), not in the object store.
    #: ``nbytes`` is the sub-batch's size in memory either way (what a fetch will carry).
    spilled: bool = False


class PartitionQueue:
    def __init__(self, partition: int, *, max_rows: int, max_bytes: int):
        self.partition = partition
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.entries: deque[Entry] = deque()
        self.rows = 0  # in memory (the object store)
        self.nbytes = 0
        self.spilled_rows = 0  # on local disk
        self.spilled_bytes = 0
        self.spilled_entries = 0
        #: Entries held per split (so :meth:`drop` knows when every split's first uncovered
        #: entry has been seen, and stops scanning).
        self._per_split: dict[str, int] = {}
        self.state = QueueState.OPEN

    def append(self, entry: Entry) -> None:
        if self.state is not QueueState.OPEN:
            raise ProtocolError(f"partition {self.partition}: append to a {self.state.value} queue")
        self.entries.append(entry)
        self._count(entry, 1)
        self._per_split[entry.split] = self._per_split.get(entry.split, 0) + 1

    def _count(self, e: Entry, sign: int) -> None:
        if e.spilled:
            self.spilled_rows += sign * e.rows
            self.spilled_bytes += sign * e.nbytes
            self.spilled_entries += sign
        else:
            self.rows += sign * e.rows
            self.nbytes += sign * e.nbytes

    @property
    def queued_rows(self) -> int:
        """Rows held, in memory or on disk: read and not yet committed."""
        return self.rows + self.spilled_rows

    def close_input(self) -> None:
        if self.state is QueueState.OPEN:
            self.state = QueueState.DRAINING if self.entries else QueueState.CLOSED

    @property
    def full(self) -> bool:
        """At its memory bound (spilled entries do not count): further sub-batches spill."""
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
        return sum(e.rows for e in self.drop(positions))

    def drop(self, positions: dict[str, int]) -> list[Entry]:
        """Drop entries covered by committed ``positions``; returns them (the caller releases
        the spilled ones' files).

        A split's entries are in position order, so its covered ones come before its
        others. The scan goes from the left and stops once it has seen an uncovered entry
        of every split the queue holds: no entry behind that point can be covered. Covered
        entries behind an uncovered one of another split are dropped too (the uncovered
        ones seen are put back in order). So a trim costs the entries it drops plus those
        it steps over, not the whole queue (one split: the entries it drops, plus one).
        """
        dropped: list[Entry] = []
        kept: list[Entry] = []
        blocked: set[str] = set()  # splits whose first uncovered entry was seen
        n_splits = len(self._per_split)
        entries = self.entries
        while entries and len(blocked) < n_splits:
            e = entries.popleft()
            if e.split not in blocked and e.end <= positions.get(e.split, 0):
                dropped.append(e)
                self._count(e, -1)
                left = self._per_split[e.split] - 1
                if left:
                    self._per_split[e.split] = left
                else:
                    del self._per_split[e.split]
                    n_splits -= 1
            else:
                blocked.add(e.split)
                kept.append(e)
        entries.extendleft(reversed(kept))
        if self.state is QueueState.DRAINING and not self.entries:
            self.state = QueueState.CLOSED
        return dropped


# ----------------------------------------------------------------------------- bounds


#: Share of a source actor's memory (``source_max_bytes``) kept for higher tiers: the lowest
#: tier spills once the actor's queues hold ``1 - TIER_MEMORY_RESERVE`` of it, the tiers between
#: at levels spaced evenly up to the most critical (which may use all of it). A quarter: room for
#: a few fetches' worth of critical rows at the default bounds, at the cost of spilling the bulk
#: a quarter sooner.
TIER_MEMORY_RESERVE = 0.25


@dataclass(frozen=True)
class Budget:
    """The bounds of one source actor's queues (from ``EngineConfig``), in rows and bytes."""

    queue_max_rows: int
    queue_max_bytes: int
    source_max_bytes: int
    spill_max_bytes: int
    #: Per partition, the actor's memory in bytes past which its sub-batches spill (priority
    #: tiers, see :func:`tier_ceilings`); ``None``: ``source_max_bytes`` for every partition.
    memory_ceilings: tuple[int, ...] | None = None

    @classmethod
    def from_config(cls, config, ranks: tuple[int, ...] | None = None) -> Budget:
        """``ranks``: each partition's tier rank (0: most critical), or ``None`` without tiers."""
        return cls(
            queue_max_rows=config.queue_max_rows,
            queue_max_bytes=config.queue_max_bytes,
            source_max_bytes=config.source_max_bytes,
            spill_max_bytes=config.spill_max_bytes,
            memory_ceilings=tier_ceilings(config.source_max_bytes, ranks) if ranks else None,
        )


def tier_ceilings(source_max_bytes: int, ranks: tuple[int, ...]) -> tuple[int, ...] | None:
    """Each partition's memory ceiling under priority tiers (see the module doc); ``None`` when
    every partition is of one rank."""
    top = max(ranks)
    if top == min(ranks):
        return None
    return tuple(int(source_max_bytes * (1 - TIER_MEMORY_RESERVE * r / top)) for r in ranks)


@dataclass
class Counts:
    """A snapshot of what one source actor's queues hold: per partition rows and bytes in
    memory, and the bytes of its spill files on disk (taken by a reading thread while the
    event loop may change the queues: a moment old, see :func:`place`)."""

    rows: list[int]
    nbytes: list[int]
    spill_bytes: int
    memory_bytes: int = -1  # the sum of ``nbytes`` (computed when not given)

    def __post_init__(self) -> None:
        if self.memory_bytes < 0:
            self.memory_bytes = sum(self.nbytes)

    @classmethod
    def of(cls, queues: list[PartitionQueue], spill_bytes: int) -> Counts:
        """``spill_bytes``: the spill files' bytes on disk; each spilled entry adds
        :data:`SPILL_ENTRY_OVERHEAD` (the heap it holds) toward the disk budget."""
        entries = sum(q.spilled_entries for q in queues)
        return cls(
            [q.rows for q in queues], [q.nbytes for q in queues], spill_bytes + entries * SPILL_ENTRY_OVERHEAD
        )


def _memory_full(b: Budget, c: Counts, p: int) -> bool:
    return (
        c.rows[p] >= b.queue_max_rows
        or c.nbytes[p] >= b.queue_max_bytes
        or c.memory_bytes >= b.source_max_bytes
    )


def place(b: Budget, c: Counts, parts: list[tuple[int, int, int]]) -> list[bool]:
    """Where each sub-batch of one batch goes: ``True`` to disk (spill), ``False`` to memory.

    ``parts``: ``(partition, rows, nbytes)`` in the batch's order; ``c`` is updated
    as they are placed. A sub-batch goes to memory while its partition's queue is
    under ``queue_max_rows`` / ``queue_max_bytes`` and the actor's memory under
    ``source_max_bytes``; else to disk if the spill was under ``spill_max_bytes``
    when the batch began; else to memory after all.

    So a bound is passed by at most one batch (per reading thread, each asks
    :func:`must_pause` before it reads a batch): the disk only when it had room as
    the batch began, the memory only when the disk had none, and then (else the
    reader would have paused) no memory bound was hit as the batch began. Deciding
    per sub-batch against the disk's level instead would let each trim that frees
    a little disk push a batch's worth more into memory already past its bound.

    With priority tiers (``b.memory_ceilings``), a sub-batch also spills (disk
    room permitting) once the actor's memory is at its partition's ceiling: lower
    tiers spill first, and higher ones keep the memory above their ceilings.
    """
    disk_room = c.spill_bytes < b.spill_max_bytes
    ceilings = b.memory_ceilings
    out = []
    for p, rows, nbytes in parts:
        over = ceilings is not None and c.memory_bytes >= ceilings[p]
        spill = disk_room and (over or _memory_full(b, c, p))
        if spill:
            c.spill_bytes += nbytes + SPILL_ENTRY_OVERHEAD
        else:
            c.rows[p] += rows
            c.nbytes[p] += nbytes
            c.memory_bytes += nbytes
        out.append(spill)
    return out


def must_pause(b: Budget, c: Counts) -> bool:
    """Whether the source must stop reading until a trim frees room: some memory bound is hit
    (a partition's queue, or the actor's sum) and the disk budget is used up. With
    ``spill_max_bytes=0`` a memory bound alone pauses: the rule before spilling existed."""
    if c.spill_bytes < b.spill_max_bytes:
        return False
    return any(_memory_full(b, c, p) for p in range(len(c.rows)))


def blamed(queues: list[PartitionQueue]) -> list[int]:
    """The partitions a pause is charged to (``blocked_s``): those whose queue is at its memory
    bound, else (the actor's memory or disk bound) every partition holding rows."""
    full = [q.partition for q in queues if q.full]
    return full or [q.partition for q in queues if q.queued_rows]
