"""One owned partition inside a consumer: its phase and transitions (pure: no Ray, no I/O).

A :class:`PartitionTask` holds what a consumer keeps for one leased
partition: the operator states, the processed and committed positions per
split, the outputs staged since the last commit, and fetched batches not yet
processed. Its :class:`Phase` says what is due next:

- ``CLEAN``: everything processed is committed.
- ``DIRTY``: rows were processed or positions moved since the last commit.
- ``BACKLOGGED``: dirty, and a source's queue for it is at its bound: commit
  now, so the source can trim it and read on.
- ``ENDED``: the input ended and the final outputs are staged: the final
  commit is due.
- ``FINAL``: the final commit is recorded; nothing more happens here.
- ``FENCED``: a newer owner exists; the consumer drops the task with its
  uncommitted state.

Transitions, each a method named for its trigger (unit-tested by name in
``tests/unit/test_partition_task.py``): :meth:`fetch_applied`,
:meth:`batch_processed`, :meth:`changes_flushed`, :meth:`input_finished`,
:meth:`commit_recorded`, :meth:`revoked` (the consumer commits, then
releases) and :meth:`fenced`. When a commit is due is the pure policy
:func:`commit_due`.

**What stateful operators emit is staged, never recomputed.** Their output at
the end of input (:meth:`input_finished`) and at each commit of an operator
that emits changes (:meth:`changes_flushed`, the consumer flushes right
before it writes the commit) goes to ``outputs`` and stays there until a
commit that names it is recorded: a failed or unknown attempt keeps it for
the next one, which adds its own flush after it (with a newer version, see
:meth:`next_version`). The states have given those changes up, so the
snapshot of any attempt and its staged outputs cover the same history.

**Deltas are staged the same way.** An incremental operator gives up its
changes at each commit (``Operator.state_delta``); the delta stays in
``staged_deltas`` until a commit is recorded, so an attempt that fails is
followed by one whose delta covers it too (or by a whole snapshot, which
covers everything). ``chains`` are the state files of the last recorded
commit per operator (a base, then its deltas): what the next delta follows.

Positions are contiguous per split: an entry's ``since`` (where the source's
previous entry for this partition ended) must not be past the processed
position (else rows were lost: :class:`PositionGapError`), and its ``start``
must not be before it (else rows would count twice: :class:`ProtocolError`).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

import pyarrow as pa

from rayflow._internal.checkpoint.commit import CommitRecord, StateChain, state_chains
from rayflow._internal.watermarks import WATERMARK_END, PartitionClock
from rayflow.errors import PositionGapError, ProtocolError


class Phase(enum.Enum):
    CLEAN = "clean"
    DIRTY = "dirty"
    BACKLOGGED = "backlogged"
    ENDED = "ended"
    FINAL = "final"
    FENCED = "fenced"


#: Phases in which the task still fetches and processes input.
RUNNING = (Phase.CLEAN, Phase.DIRTY, Phase.BACKLOGGED)


def upsert_version(epoch: int, rows_total: int) -> int:
    """The ``_version`` of a flush after ``rows_total`` rows of the partition were processed (its
    whole history, restored with its state): the rows processed, whatever the lease ``epoch``.

    Strictly increasing over everything a partition ever publishes: only recorded
    commits publish, and they form one line per partition (each owner, and a task
    reloaded under the same epoch after a cancelled revocation, restarts from the
    latest recorded commit, whose ``rows_total`` no published version exceeds);
    a flush with changes follows new rows. A counter of flushes per task would
    restart at a reload and repeat published versions; the epoch is not needed
    for the order (and folding it in would cap the rows). Comparable only within
    a partition, while the partition map is unchanged.
    """
    return rows_total


@dataclass
class Fetched:
    """What one fetch reply says for this partition (a source's ``FetchResult``, unpacked)."""

    source: int
    entries: list  # (entry, batch) pairs; entry has split, start, end, rows, since
    frontier: dict[str, int] | None = None
    end: bool = False
    full: bool = False
    fenced: bool = False
    #: A job with event time: the source's splits' watermarks and idle ones (``FetchResult``).
    watermarks: dict | None = None
    idle: set | None = None


@dataclass
class PartitionTask:
    partition: int
    epoch: int
    states: list
    positions: dict[str, int]
    committed_positions: dict[str, int]
    rows_total: int = 0
    rows_committed: int = 0
    phase: Phase = Phase.CLEAN
    outputs: list[pa.Table] = field(default_factory=list)
    ended_sources: set[int] = field(default_factory=set)
    #: Fetched entries not yet processed, in order, with the frontier/end their fetch
    #: reported (applied only once they are processed).
    buffer: deque = field(default_factory=deque)
    pending: list[Fetched] = field(default_factory=list)
    seq: int = 0
    first_done: bool = False
    #: Entries handed out by :meth:`take` and not yet processed: what their fetch said about
    #: positions and watermarks holds only once they are (a step may process them in runs).
    in_hand: int = 0
    #: The partition's event-time clock (a job with event time), else ``None``.
    clock: PartitionClock | None = None
    num_sources: int = 1
    #: Per stateful operator index: the state files of the last recorded commit (a base, then
    #: the deltas after it), each with its rows.
    chains: dict[int, StateChain] = field(default_factory=dict)
    #: Per incremental operator index: deltas taken from its state and not yet in a recorded
    #: commit, in order.
    staged_deltas: dict[int, list[pa.Table]] = field(default_factory=dict)
    #: Rows of the state files this task wrote or read (what :attr:`chains` counts).
    file_rows: dict[str, int] = field(default_factory=dict)
    #: The memory share its stateful operators were last granted (``Operator.bound_state``),
    #: in bytes; 0: none yet.
    state_share: int = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_commit(
        cls,
        partition: int,
        epoch: int,
        states: list,
        commit: CommitRecord | None,
        *,
        event_time: bool = False,
        num_sources: int = 1,
        file_rows: dict[str, int] | None = None,
    ) -> PartitionTask:
        """A newly granted partition, restored from its last recorded commit (or from scratch);
        ``event_time``: the job has event time (its watermarks are restored too); ``file_rows``:
        the rows of the commit's state files, as read."""
        positions = dict(commit.positions) if commit else {}
        rows = commit.rows_total if commit else 0
        file_rows = dict(file_rows or {})
        clock = PartitionClock.restored(commit.watermarks if commit else None) if event_time else None
        return cls(
            clock=clock,
            num_sources=num_sources,
            partition=partition,
            epoch=epoch,
            states=states,
            positions=positions,
            committed_positions=dict(positions),
            rows_total=rows,
            rows_committed=rows,
            phase=Phase.FINAL if commit is not None and commit.final else Phase.CLEAN,
            file_rows=file_rows,
            chains=_chains(commit.state_files, file_rows) if commit else {},
        )

    # ------------------------------------------------------------------ queries
    @property
    def running(self) -> bool:
        return self.phase in RUNNING

    def wants_fetch(self, source: int) -> bool:
        """Fetch from ``source`` only when nothing fetched is waiting and its input goes on."""
        return self.running and not self.buffer and source not in self.ended_sources

    def input_ended(self, num_sources: int) -> bool:
        return len(self.ended_sources) == num_sources and not self.buffer

    # ------------------------------------------------------------------ transitions
    def fenced(self) -> None:
        """A source or the manager refused our lease epoch: a newer owner exists."""
        self.phase = Phase.FENCED
        self.buffer.clear()
        self.in_hand = 0
        self.pending.clear()
        self.outputs = []

    def fetch_applied(self, got: Fetched) -> None:
        """A fetch reply arrived: buffer its entries; positions move only as they are processed."""
        if self.phase is Phase.FENCED:
            return
        if got.fenced:
            self.fenced()
            return
        self.buffer.extend(got.entries)
        self.pending.append(got)
        if self.clock is not None and got.watermarks is not None:
            # The split names hold at once (they only hold the watermark back); what the reply
            # says of their watermarks and idleness waits until its entries are processed.
            self.clock.told(got.source, dict.fromkeys(got.watermarks), None)
        if not self.buffer and not self.in_hand:
            self._apply_pending()

    def _apply_pending(self) -> None:
        """The buffer is drained: what the fetches said about positions and ends now holds."""
        if self.clock is not None:
            # Their entries are processed: the news about their splits holds after them.
            self.clock.told_with_rows(
                [
                    (got.source, got.watermarks, got.idle)
                    for got in self.pending
                    if got.watermarks is not None
                ],
                fresh={e.split for got in self.pending for e, _ in got.entries},
                num_sources=self.num_sources,
            )
        for got in self.pending:
            if got.frontier:
                for s, v in got.frontier.items():
                    if v > self.positions.get(s, 0):
                        self.positions[s] = v
                        self._progress()
            if got.end:
                self.ended_sources.add(got.source)
            if got.full and self.phase is Phase.DIRTY:
                self.phase = Phase.BACKLOGGED
        self.pending = []

    def _progress(self) -> None:
        if self.phase is Phase.CLEAN:
            self.phase = Phase.DIRTY

    def take(self, max_cost_s: float, cost_per_byte_s: float) -> list:
        """Buffered (entry, batch) pairs to process next: at least one, within ``max_cost_s``."""
        out, cost = [], 0.0
        while self.buffer:
            nbytes = self.buffer[0][1].nbytes
            if out and cost + nbytes * cost_per_byte_s > max_cost_s:
                break
            out.append(self.buffer.popleft())
            cost += nbytes * cost_per_byte_s
        self.in_hand += len(out)
        return out

    def check_contiguous(self, entries: list) -> None:
        """Refuse a gap (rows lost) or an overlap (rows counted twice) before processing."""
        pos = dict(self.positions)
        for e in entries:
            at = pos.get(e.split, 0)
            since = e.since if e.since is not None else e.start
            if since > at:
                raise PositionGapError(
                    f"partition {self.partition}: split {e.split!r} jumps from processed position "
                    f"{at} to a batch whose coverage starts at {since} (rows [{at}, {since}) never "
                    f"arrived); nothing was committed past {at}. This is a bug in rayflow or in a "
                    "custom source's positions: please report it with this message",
                    split=e.split,
                    partition=self.partition,
                    position=at,
                    start=since,
                )
            if e.start < at:
                raise ProtocolError(
                    f"partition {self.partition}: batch [{e.start}, {e.end}) of split {e.split!r} "
                    f"overlaps the processed position {at}; processing it would count rows twice"
                )
            pos[e.split] = e.end

    def batch_processed(self, entries: list, outputs: list[pa.Table], rows: int) -> None:
        """The chain ran over ``entries`` (checked contiguous): stage outputs, move positions."""
        self.outputs.extend(outputs)
        self.rows_total += rows
        for e in entries:
            if e.end > self.positions.get(e.split, 0):
                self.positions[e.split] = e.end
            if self.clock is not None:
                self.clock.saw(e.split, e.watermark)
        self.in_hand = max(0, self.in_hand - len(entries))
        self._progress()
        if not self.buffer and not self.in_hand:
            self._apply_pending()

    @property
    def watermark_target(self) -> int | None:
        """Where the watermark may move now (``None``: no event time)."""
        return self.clock.target(self.num_sources) if self.clock is not None else None

    @property
    def watermark_due(self) -> bool:
        """The watermark can move past what the operators were advanced to."""
        return (
            self.clock is not None
            and self.running
            and self.clock.target(self.num_sources) > self.clock.applied
        )

    def watermark_advanced(self, watermark: int, outputs: list[pa.Table]) -> None:
        """The operators were advanced to ``watermark``: what they emitted is staged (committed
        with the watermark, so a restored state and its watermark agree)."""
        self.clock.applied = watermark
        if outputs:
            self.outputs.extend(outputs)
            self._progress()

    def input_finished(self, outputs: list[pa.Table]) -> None:
        """End of input: the stateful operators' final outputs are staged; the final commit is due."""
        self.outputs.extend(outputs)
        if self.clock is not None:
            self.clock.applied = WATERMARK_END  # the chain advanced every operator to the end
        self.phase = Phase.ENDED

    def changes_flushed(self, outputs: list[pa.Table]) -> None:
        """A commit is about to be written: what the operators' flush emitted is staged with it
        (after the outputs of earlier attempts still staged), whatever becomes of the attempt."""
        self.outputs.extend(outputs)

    @property
    def flushes_changes(self) -> bool:
        """Whether a commit of this task flushes the operators' changes first: while input runs
        (at the end of input :meth:`input_finished` flushed the last of them)."""
        return self.running

    def next_version(self) -> int:
        """The version of a flush now (:func:`upsert_version`)."""
        return upsert_version(self.epoch, self.rows_total)

    def commit_recorded(self, rec: CommitRecord) -> None:
        """The catalog recorded ``rec`` (or reconciliation found it there)."""
        self.committed_positions = dict(rec.positions)
        self.rows_committed = rec.rows_total
        self.outputs = []
        self.staged_deltas = {}
        self.chains = _chains(rec.state_files, self.file_rows)
        named = {f for c in self.chains.values() for f in c.files}
        self.file_rows = {f: r for f, r in self.file_rows.items() if f in named}
        if rec.final:
            self.phase = Phase.FINAL
        elif self.phase in (Phase.DIRTY, Phase.BACKLOGGED) and self.positions == rec.positions:
            self.phase = Phase.CLEAN

    def revoked(self) -> bool:
        """The manager wants this partition elsewhere: is there anything to commit first?"""
        return self.needs_commit

    @property
    def needs_commit(self) -> bool:
        return self.phase in (Phase.DIRTY, Phase.BACKLOGGED, Phase.ENDED) or bool(self.outputs)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


def _chains(state_files: list[str], file_rows: dict[str, int]) -> dict[int, StateChain]:
    return {
        i: StateChain(tuple(files), tuple(file_rows.get(f, 0) for f in files))
        for i, files in state_chains(state_files).items()
    }


def commit_due(
    task: PartitionTask, *, now: float, last_commit: float, interval_s: float, retry_at: float
) -> bool:
    """The commit policy: is a commit of ``task`` due now?

    Due at once when the input ended (the final commit) or a source queue is
    at its bound; otherwise when it has progress and the checkpoint interval
    has passed since the consumer's last commit. Never before ``retry_at``
    (the backoff after a failed commit), so a failing commit cannot spin.
    """
    if now < retry_at or not task.needs_commit:
        return False
    if task.phase in (Phase.ENDED, Phase.BACKLOGGED):
        return True
    return now - last_commit >= interval_s


def backoff_s(failures: int, *, initial_s: float, max_s: float) -> float:
    """Wait before the next attempt after ``failures`` consecutive failed commits (exponential, capped)."""
    return min(max_s, initial_s * (2 ** max(0, failures - 1)))
