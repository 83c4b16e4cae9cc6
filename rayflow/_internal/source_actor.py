"""The SourceActor: reads splits, hashes and routes rows, serves partition queues.

A thin async shell: reading, hashing and splitting a batch runs in a worker
thread (Arrow and numpy release the GIL), so ``fetch`` and ``trim`` calls are
answered while the next batch is being prepared. Appending a batch's
sub-batches to the queues happens on the event loop in one step, so a fetch
never sees half a batch.

Each sub-batch is put into Ray's object store once (``ray.put``) and its
reference queued; consumers ``ray.get`` it zero-copy. Between the read and the
consumer a row is copied twice: once by the split, straight into the compact
buffers of its sub-batch (none when a batch's rows all go to one partition),
and once by ``ray.put`` into shared memory (docs/performance.md). A fetch answers for
many partitions at once, so Ray's per-call cost is paid per batch.

**Bounds and spill** (DESIGN §6, docs/backpressure.md). A sub-batch whose
partition's queue, or this actor's memory, is at its bound is written to a local
Arrow IPC file instead (``_internal/spill.py``), within the disk budget; the
choice is made in the reading thread from a snapshot of the queues
(``queues.place``). Reading pauses only while a memory bound is hit and the
disk budget is used up (``queues.must_pause``), so a slow or frozen consumer's
partitions spill while the others keep flowing. A fetch reads spilled entries
back (in a thread, memory-mapped) and puts them in the object store for that
reply only; the queue keeps the disk copy until a commit trims it, so a new
owner after a hand-over reads it again. A restarted actor starts with no spill:
it replays from the committed positions, as for its memory.

**Readers.** Bounded splits are read round-robin, one batch of each in turn,
by one task on one worker thread (as many files as there are, one reader).
Each *unbounded* split (``Split.unbounded``: a Kafka partition, a paced
generator) is read by its own task on its own thread, because its ``read``
may block waiting for data: a quiet split must never hold back the others.
An unbounded read yields at least every ``IDLE_TICK_S`` (an idle tick: an
empty batch), so the reader notices a stop soon, and closes the generator.

**Discovery.** For a dynamic source (``Source.dynamic``) every source actor
calls ``splits()`` again every ``EngineConfig.discovery_interval_s`` and
starts reading the new splits it owns (:func:`owner_of`: deterministic and
disjoint across the actors, also after a restart), once the manager has
recorded them in the catalog.

**Fingerprints.** Every split of a dynamic source, the ones it starts with
too (at every start and restart), goes through the manager's ``add_splits``
with its ``Split.fingerprint`` before any of its rows is served, one call per
start and per discovery round. The catalog keeps the first fingerprint of a
name: another one is another input reusing the name (a file replaced after
the job read it), which would be read on from the old input's committed
positions, so the source fails with :class:`MalformedInputError` instead
(``self.error``, raised to the driver by ``fetch`` and ``stats``).

**The end** of the input is reported (``FetchResult.end``) only for a job
whose source is bounded, once every split is read; never for an unbounded
job, and never because reading was stopped (:meth:`SourceActor.stop_reading`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import logging
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray

from rayflow._internal import naming
from rayflow._internal.combine import check_new_splits, input_rows
from rayflow._internal.jobfile import read_job_file
from rayflow._internal.queues import Budget, Counts, Entry, PartitionQueue, blamed, must_pause, place
from rayflow._internal.skew import SkewTracker, key_values
from rayflow._internal.spill import SpillHandle, SpillStore, close_files, spill_owner, spillable
from rayflow._internal.splits import HashReservoir
from rayflow._internal.watermarks import WATERMARK_END, WATERMARK_NONE, batch_max_ms
from rayflow.errors import ConfigError, FencedError, MalformedInputError, PositionGapError, ProtocolError
from rayflow.partitioning import compact, hash_table, key_columns, split_by_partition
from rayflow.sources import Split

logger = logging.getLogger(__name__)

#: How often a source actor asks its unbounded splits how far their data goes (``available``,
#: for lag): often enough for a live progress line, rarely enough that a broker round trip per
#: split and second is nothing.
AVAILABLE_EVERY_S = 1.0
#: The arrival rate of a split is measured over about this window of ``available`` samples.
ARRIVAL_WINDOW_S = 10.0
#: How long :meth:`SourceActor.stop_reading` waits for the readers to return from the read in
#: progress (an unbounded read yields at least every ``IDLE_TICK_S``; a bounded batch is one
#: batch of work). Past it a stuck reader is abandoned: its thread ends with the actor.
STOP_WAIT_S = 10.0


def owner_of(name: str, dealt: Mapping[str, int], num_sources: int) -> int:
    """The index of the source actor that reads the split ``name`` (pure).

    The splits a job starts with are dealt round-robin (``dealt``: name ->
    index, written in the job file); a split discovered later goes to
    ``blake2b(name) mod num_sources``: a stable hash (never Python's salted
    ``hash()``), so every actor, restarted or not, agrees without talking to
    the others, and each split has exactly one reader.
    """
    i = dealt.get(name)
    if i is not None:
        return i
    h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return h % num_sources


@dataclass(frozen=True)
class FetchedEntry:
    split: str
    start: int
    end: int
    rows: int
    ref: ray.ObjectRef
    since: int | None = None  # see queues.Entry.since: lets the consumer prove contiguity
    watermark: int | None = None  # see queues.Entry.watermark
    #: Only inside the source, before ``_load_spilled``: ``ref`` is a ``spill.SpillHandle``.
    spilled: bool = False


@dataclass
class FetchResult:
    entries: list[FetchedEntry] = field(default_factory=list)
    #: Read position per split up to which this partition has now been served
    #: in full (set only when no entry remains past what is returned).
    frontier: dict[str, int] | None = None
    #: Input exhausted and nothing left to serve past the asked positions.
    end: bool = False
    #: The queue is at its memory bound (further sub-batches spill), or reading is paused (the
    #: disk budget is used up too) and the queue holds rows: commit soon so it can be trimmed.
    full: bool = False
    #: Set when the request's lease epoch is stale: the caller must drop the partition.
    fenced: FencedError | None = None
    #: A job with event time, set with ``frontier``: every split this actor reads -> its watermark
    #: as of everything read (``WATERMARK_END`` once it ended, ``None`` before its first row)...
    watermarks: dict[str, int | None] | None = None
    #: ... and the splits idle for longer than the idle timeout (``watermarks.PartitionClock``);
    #: with ``frontier`` unset (more to serve), the splits only: every watermark None, idle None.
    idle: set[str] | None = None


@dataclass(eq=False)
class _Reader:
    """One split being read: where it started, its iterator, and what it last said."""

    split: Split
    start: int
    #: An unbounded split's own thread (its read may block); None: the shared bounded reader.
    pool: ThreadPoolExecutor | None = None
    it: Iterator | None = None
    task: asyncio.Task | None = None
    done: bool = False
    since_data: float = field(default_factory=time.monotonic)  # last batch with rows
    since_tick: float = field(default_factory=time.monotonic)  # last batch or idle tick
    available: int | None = None
    #: The largest event time read (a job with event time; written by the reading thread only).
    max_event_ms: int = WATERMARK_NONE
    #: Since when an unbounded split has said it has nothing (idle ticks, or rows without event
    #: time), None while it delivers timed rows: its idleness (time blocked on full queues
    #: or waiting for its turn is never idleness: only the split itself can say it is quiet).
    quiet_since: float | None = None
    #: ``(monotonic time, available)`` samples for the arrival rate.
    samples: collections.deque = field(default_factory=lambda: collections.deque(maxlen=64))

    @property
    def name(self) -> str:
        return self.split.name

    def arrival_rate(self) -> float | None:
        """Rows/s by which ``available`` grew over the last ``ARRIVAL_WINDOW_S`` (None: unknown)."""
        if len(self.samples) < 2:
            return None
        t1, a1 = self.samples[-1]
        t0, a0 = next(((t, a) for t, a in self.samples if t1 - t <= ARRIVAL_WINDOW_S), self.samples[0])
        if t1 <= t0:
            return None
        return max(0.0, (a1 - a0) / (t1 - t0))


def listing_split(index: int) -> str:
    """The name under which source actor ``index`` of a staged job reports its listing to the
    watermark (see ``SourceActor._watermarks``): not a split a source could name."""
    return f"rayflow:listing-{index}"


def route_batch(
    batch: pa.RecordBatch,
    routed: np.ndarray,
    num_partitions: int,
    *,
    start: int,
    end: int,
    committed: Mapping[int, int],
    row_positions=None,
) -> list[tuple[int, int, pa.RecordBatch]]:
    """Cut a batch covering positions ``[start, end)`` into per-partition sub-batches (pure).

    ``routed``: each row's partition. ``committed``: partition -> the position of
    this split it has committed (replay: rows before it are not served again).
    Returns ``(partition, first position, sub-batch)``. A partition committed
    past ``end`` gets nothing; one committed inside the batch gets only its rows
    at or after that position, cut at ``committed - start`` for a dense split
    and, for positions with gaps, where ``row_positions(batch)`` reaches it.
    """
    out = []
    row_pos = None
    for p, sub in split_by_partition(batch, routed, num_partitions):
        first = start
        done = committed.get(p, 0)
        if end <= done:
            continue  # replay: this partition already committed these rows
        if start < done:  # replay across a commit boundary: keep only rows >= done
            if row_positions is None:
                cut = done - start
            else:
                if row_pos is None:
                    row_pos = np.asarray(row_positions(batch), dtype=np.int64)
                cut = int(np.searchsorted(row_pos, done, side="left"))
            sub = batch.slice(cut).filter(pa.array(routed[cut:] == p))
            first = done
            if sub.num_rows == 0:
                continue
        out.append((p, first, sub))
    return out


def _was_restarted() -> bool:
    with warnings.catch_warnings():  # Ray's own implementation trips its deprecation warning
        warnings.simplefilter("ignore")
        return ray.get_runtime_context().was_current_actor_reconstructed


def _poll_available(splits: list[Split]) -> list[int | None]:
    """Worker thread: ``available()`` of each split; a failing one reads as unknown."""
    out = []
    for s in splits:
        try:
            out.append(s.available())
        except Exception as e:  # only lag figures depend on it: never fail the job for it
            logger.debug("rayflow: available() of split %r failed: %r", s.name, e)
            out.append(None)
    return out


@ray.remote
class SourceActor:
    """Reads its share of the input's splits into per-partition queues.

    Restartable (``max_restarts=-1``): its constructor takes only the job
    file's location and its index (see ``_internal/jobfile.py``), and at start
    as at every restart it loads its splits from the job file and asks the
    manager for the committed positions and lease epochs before serving
    anything. After a restart it replays each split from the lowest committed
    position of its partitions, on its own, at the first call it gets (and
    finds the splits it had discovered by listing the source again).
    """

    def __init__(self, *, job_root: str, job_file: str, index: int):
        job = read_job_file(job_root, job_file)
        self.index = index
        self.name = f"source-{index}"
        self.pipeline = job.name
        self.faults = job.faults
        # Restarted by Ray after a crash: it starts reading again on its own, at the
        # first call, from the committed positions (a first start waits for run()).
        self._restarted = _was_restarted()
        self._synced = False
        self._sync_lock = asyncio.Lock()
        self.splits = list(job.splits[index])
        self.num_sources = len(job.splits)
        self.dealt = {s.name: i for i, ss in enumerate(job.splits) for s in ss}
        self.source = job.source  # a dynamic source (listed again while running), else None
        self.unbounded = job.unbounded
        self.key = list(job.key)
        self.event_time = job.event_time
        self.map = job.partition_map
        self.config = config = job.config
        n = self.map.num_partitions
        self.queues = [
            PartitionQueue(p, max_rows=config.queue_max_rows, max_bytes=config.queue_max_bytes)
            for p in range(n)
        ]
        self.budget = Budget.from_config(config, job.tiers.ranks if job.tiers is not None else None)
        self.spill = SpillStore(
            os.path.join(config.spill_dir or tempfile.gettempdir(), "rayflow-spill"),
            spill_owner(self.pipeline, job_root, index),
            partitions=n,
            max_bytes=config.spill_max_bytes,
        )
        self.spill_error: str | None = None
        if config.spill_max_bytes:
            try:
                self.spill.open()
            except OSError as e:
                self._spill_failed(e)
            else:
                self._check_free_disk()
        self._spill_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rayflow-source-spill")
        self._replay_from({})  # until _sync() has the committed positions
        # The newest lease epoch per partition, pushed by the manager at every grant:
        # a fetch or trim under an older epoch comes from a stale owner.
        self.epochs: dict[int, int] = {}
        self.rows_read = 0
        self.routed_rows = np.zeros(n, dtype=np.int64)  # rows queued per partition (lag shares)
        # Hot keys and rates per partition (docs/skew.md); unbounded splits read in threads of their own.
        self.skew = SkewTracker(n)
        # Aggregate(combine_at_source=True): sub-batches are combined into partials (docs/skew.md).
        self.combiner = getattr(job, "combine", None)
        self.combined_rows = 0  # rows queued after combining (what the input rows became)
        self._skew_lock = threading.Lock()
        # Recent hashes per partition: where a split at runtime cuts (_internal/splits.py).
        self.reservoir = HashReservoir()
        self.blocked_s = np.zeros(n)
        self._blocked_at: float | None = None  # since when reading is paused (None: it is not)
        self.pauses = 0  # times reading paused (stats: sticky, unlike ``paused``)
        self.paused_s = 0.0  # seconds reading was paused, in all
        self.exhausted = False
        self.error: BaseException | None = None
        self.discovery_error: str | None = None
        self.started_ms = 0
        self._changed = asyncio.Condition()
        self.readers: dict[str, _Reader] = {}
        self._round_robin: list[_Reader] = []  # bounded readers, read in turn by one task
        self._more_bounded = asyncio.Event()
        self._bounded_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayflow-source-read")
        self._meta_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayflow-source-meta")
        self._tasks: list[asyncio.Task] = []  # every reading, discovery and polling task
        self._bounded_done = False
        # A bounded dynamic source (``Source.complete``) has given its last listing.
        self._discovery_done = False
        self._started = False
        self._run_lock = asyncio.Lock()
        self._stopping = False
        self._stop = asyncio.Event()

    async def run(self) -> None:
        """Start reading, from the committed positions (returns at once)."""
        await self._sync()
        async with self._run_lock:
            if self._started or self._stopping:
                return
            self.started_ms = await self._manager().started_ms.remote()
            self._started = True
        self.splits = [s.bind(job_started_ms=self.started_ms) for s in self.splits]
        if self.source is not None and self.splits:
            # A resume or a restart may have been handed another file under a known name.
            refused = await self._record_splits(self.splits)
            if refused is not None:
                await self._fail(refused)
                return  # nothing read, nothing started
        loop = asyncio.get_running_loop()
        for s in self.splits:
            self._add_reader(s, self.start.get(s.name, 0))
        self._tasks.append(loop.create_task(self._read_bounded()))
        self._tasks.append(loop.create_task(self._poll_available_loop()))
        if self.source is not None:
            self._tasks.append(loop.create_task(self._discover_loop()))

    async def _sync(self) -> None:
        """Once per process: take the committed positions and lease epochs from the manager.

        Every call that reads or changes the queues awaits it first, so nothing
        is served before the positions are known. After a restart, reading
        starts here too.
        """
        if self._synced:
            return
        async with self._sync_lock:
            if self._synced:
                return
            info = await self._manager().ready.remote()
            self._replay_from(info["positions"])
            await self.set_epochs(info["epochs"])
            self._synced = True
        if self._restarted:
            await self.run()

    def _manager(self):
        return ray.get_actor(naming.manager_name(self.pipeline), namespace=naming.NAMESPACE)

    def _replay_from(self, committed: dict[int, dict[str, int]]) -> None:
        """Where to read from, given the committed positions (partition -> split -> position).

        Each split restarts from the lowest position any partition committed for it;
        partitions already past it skip, here at the source, what they have.
        """
        self.skip = dict(committed)  # partition -> split -> position: serve no rows before it
        self.start = {s.name: self._start_of(s.name) for s in self.splits}
        # (partition, split) -> end of the last entry queued (queues.Entry.since).
        self.since: dict[tuple[int, str], int] = {}
        self.frontier = dict(self.start)
        self.read_end = dict(self.start)  # split -> end of the last batch read (contiguity check)
        self.split_wm: dict[str, int] = {}  # split -> watermark after the last batch queued

    def _start_of(self, name: str) -> int:
        """The lowest position of split ``name`` any partition has committed (0: one has not)."""
        n = self.map.num_partitions
        return min((self.skip.get(p, {}).get(name, 0) for p in range(n)), default=0)

    # ------------------------------------------------------------------ readers
    def _add_reader(self, split: Split, start: int) -> None:
        name = split.name
        r = _Reader(split, start)
        self.readers[name] = r
        self.start[name] = start
        self.frontier.setdefault(name, start)
        self.read_end.setdefault(name, start)
        if split.unbounded:
            r.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayflow-source-split")
            r.task = asyncio.get_running_loop().create_task(self._read_unbounded(r))
            self._tasks.append(r.task)
        else:
            self._round_robin.append(r)
            self._more_bounded.set()

    async def _read_bounded(self) -> None:
        """The bounded splits, one batch of each in turn, on one worker thread. For a dynamic
        source it waits for discovered splits when it has none left; otherwise it ends."""
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping:
                if not self._round_robin:
                    if self.source is None or self._discovery_done:
                        break
                    self._more_bounded.clear()
                    await self._more_bounded.wait()
                    continue
                for r in list(self._round_robin):
                    await self._wait_for_room()
                    if self._stopping:
                        break
                    item = await loop.run_in_executor(self._bounded_pool, self._prepare_next, r)
                    if item is None:
                        self._round_robin.remove(r)
                        r.done = True
                        continue
                    await self._deliver(r, *item)
        except asyncio.CancelledError:  # a reader stuck past stop_reading's wait: not an error
            raise
        except BaseException as e:  # surfaced to the driver by fetch() and status()
            self.error = e
        finally:
            for r in self._round_robin:  # stopped mid-way: release what the readers hold
                await self._close(r, self._bounded_pool)
            self._bounded_done = True
            await self._maybe_end()

    async def _read_unbounded(self, r: _Reader) -> None:
        """One unbounded split on its own thread, until it ends (if ever) or reading stops."""
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping:
                await self._wait_for_room()
                if self._stopping:
                    break
                item = await loop.run_in_executor(r.pool, self._prepare_next, r)
                if item is None:
                    r.done = True
                    break
                await self._deliver(r, *item)
        except asyncio.CancelledError:  # a reader stuck past stop_reading's wait: not an error
            raise
        except BaseException as e:  # surfaced to the driver by fetch() and status()
            self.error = e
        finally:
            await self._close(r, r.pool)
            r.pool.shutdown(wait=False)
            await self._maybe_end()

    async def _close(self, r: _Reader, pool: ThreadPoolExecutor) -> None:
        """Close ``r``'s generator on the thread that ran it (its ``finally`` releases a file, a
        broker connection). Best effort: a failing close is logged, never raised."""
        it, r.it = r.it, None
        close = getattr(it, "close", None)
        if close is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(pool, close)
        except Exception as e:  # the reader is finished with anyway
            logger.warning("rayflow %s: closing the reader of split %r failed: %r", self.name, r.name, e)

    async def _maybe_end(self) -> None:
        """Report the end of the input once a bounded job's every split is read (never when
        stopped, and never for an unbounded job: its consumers would finish it)."""
        if self.error is None and not self.exhausted:
            if self.unbounded or self._stopping or not self._bounded_done:
                return
            if any(not r.done for r in self.readers.values()):
                return
            self.exhausted = True
            for q in self.queues:
                q.close_input()
        async with self._changed:
            self._changed.notify_all()  # long polls answer now (with the error, if one)

    async def _deliver(
        self, r: _Reader, end: int, parts: list, rows: int, watermark: int | None, timed: bool
    ) -> None:
        """On the loop, in one step: queue a prepared batch (or note an idle tick)."""
        now = time.monotonic()
        r.since_tick = now
        if rows:
            r.since_data = now
        if timed:
            r.quiet_since = None
        elif r.quiet_since is None:
            r.quiet_since = now
        self._append(r.name, end, parts, watermark)
        if rows and self.faults is not None:
            self.faults.hit("source.batch", self.name)
        async with self._changed:
            self._changed.notify_all()

    def _must_pause(self) -> bool:
        return not self._stopping and must_pause(self.budget, Counts.of(self.queues, self.spill.disk_bytes))

    async def _wait_for_room(self) -> None:
        """Before each batch: wait while no sub-batch could go anywhere (``queues.must_pause``:
        a memory bound is hit and the disk budget is used up); trims wake it."""
        if not self._must_pause():
            return
        # Several readers may wait at once: the first one in counts the blocked time.
        first = self._blocked_at is None
        if first:
            self._blocked_at = time.monotonic()
            self.pauses += 1
            held = blamed(self.queues)
        async with self._changed:
            await self._changed.wait_for(lambda: not self._must_pause())
        if first:
            waited = time.monotonic() - self._blocked_at
            self.blocked_s[held] += waited
            self.paused_s += waited
            self._blocked_at = None

    def _prepare_next(self, r: _Reader) -> tuple | None:
        """Worker thread: read one batch, route it, put each sub-batch in the object store.

        Returns ``(end, parts, rows, watermark, timed)``, or None at the end of
        the split. An idle tick (no rows) returns no parts. ``watermark``: the
        split's, after this batch (a job with event time; else None);
        ``timed``: the batch had rows with an event time (any rows, without
        event time in the job).
        """
        if r.it is None:
            r.it = iter(r.split.read(r.start))
        try:
            batch, end = next(r.it)
        except StopIteration:
            return None
        name = r.name
        if r.split.dense:
            start = end - batch.num_rows
            self._check_contiguous(name, start, end)
        else:
            # Positions with gaps: a batch covers [previous next_position, next_position).
            start = self.read_end.get(name, r.start)
            if end < start:
                raise ProtocolError(
                    f"split {name!r} yielded next_position {end} after {start}; a split's positions "
                    "must only grow"
                )
            self.read_end[name] = end
        wm, timed = None, batch.num_rows > 0
        if self.event_time is not None:
            if batch.num_rows:
                m = batch_max_ms(batch, self.event_time.column)
                timed = m != WATERMARK_NONE
                r.max_event_ms = max(r.max_event_ms, m)
            wm = self.event_time.watermark(r.max_event_ms)
            if self._staged:
                wm = WATERMARK_NONE  # a stage's upstream: see _watermarks
        if batch.num_rows == 0:
            return end, [], 0, wm, False  # an idle tick: nothing to queue (dense=False: positions may move)
        self.rows_read += batch.num_rows
        # A split of one of several inputs is hashed by that input's key (sources/inputs.py).
        key = getattr(r.split, "key", None) or self.key
        hashes = hash_table(batch, key)
        routed = self.map.route(hashes)
        self._observe_skew(batch, hashes, key)
        self.reservoir.observe(hashes, routed)
        # A copy first (one C call, atomic under the GIL): trim() adds partitions on the loop.
        committed = {p: pos[name] for p, pos in dict(self.skip).items() if name in pos}
        parts = route_batch(
            batch,
            routed,
            self.map.num_partitions,
            start=start,
            end=end,
            committed=committed,
            row_positions=None if r.split.dense else r.split.row_positions,
        )
        if self.combiner is not None:  # after routing: a replay's cut applies to the input rows
            parts = [(p, first, self.combiner.combine(sub)) for p, first, sub in parts]
            with self._skew_lock:  # reader threads of unbounded splits add at once
                self.combined_rows += sum(sub.num_rows for _, _, sub in parts)
        return end, self._store(parts), batch.num_rows, wm, timed

    def _observe_skew(self, batch: pa.RecordBatch, hashes: np.ndarray, key) -> None:
        """Worker thread: feed the batch's key hashes to the skew tracker (``_internal/skew.py``)."""
        cols = key_columns(batch.schema, key)
        with self._skew_lock:
            self.skew.observe(hashes, self.map.route, lambda rows: key_values(batch, cols, rows))

    def _store(self, parts: list) -> list:
        """Worker thread: put each sub-batch in the object store, or spill it (``queues.place``).

        Returns ``(partition, first, payload, rows, nbytes, spilled)`` per sub-batch.
        A spill write that fails (disk full) turns spilling off for this actor (with a
        warning, and ``spill_error`` in its stats): it then pauses at the memory bounds.
        """
        if parts and self.budget.spill_max_bytes and not spillable(parts[0][2].schema):
            self._spill_off(
                "the schema holds an extension type, which an Arrow IPC file may not give back "
                "as it was: this source does not spill"
            )
        counts = Counts.of(self.queues, self.spill.disk_bytes)
        where = place(self.budget, counts, [(p, input_rows(sub), sub.nbytes) for p, _, sub in parts])
        out = []
        for (p, first, sub), spill in zip(parts, where):
            if spill and self.budget.spill_max_bytes:
                try:
                    out.append((p, first, self.spill.write(p, sub), input_rows(sub), sub.nbytes, True))
                    continue
                except OSError as e:
                    self._spill_failed(e)
            out.append((p, first, ray.put(sub), input_rows(sub), sub.nbytes, False))
        return out

    def _check_free_disk(self) -> None:
        """Warn when the spill directory's file system has less free space than the disk budget
        (it is shared: with Ray's own object spilling too, when both are under /tmp)."""
        try:
            st = os.statvfs(self.spill.root)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        if free < self.config.spill_max_bytes:
            logger.warning(
                "rayflow %s: %s has %d MiB free, less than spill_max_bytes (%d MiB): spilling may "
                "fill the disk before its budget (a failed write turns spilling off). Set "
                "EngineConfig.spill_dir to a local directory with room, or lower spill_max_bytes",
                self.name,
                self.spill.root,
                free >> 20,
                self.config.spill_max_bytes >> 20,
            )

    def _spill_failed(self, e: OSError) -> None:
        """Spilling cannot work here (the directory cannot be made, the disk is full): go on
        without it, as with ``spill_max_bytes=0`` (what is spilled already stays readable)."""
        self._spill_off(f"{type(e).__name__}: {e}")

    def _spill_off(self, reason: str) -> None:
        """Turn spilling off for this actor (``spill_error`` says why)."""
        self.spill_error = reason
        self.budget = dataclasses.replace(self.budget, spill_max_bytes=0)
        logger.warning(
            "rayflow %s: spilling to %s is off (%s); the source now pauses at its memory bounds "
            "instead. Set EngineConfig.spill_dir to a writable local directory with free space",
            self.name,
            self.spill.root,
            self.spill_error,
        )

    def _check_contiguous(self, name: str, start: int, end: int) -> None:
        """A dense split's batches must cover its rows without a gap or an overlap (DESIGN §2.1).

        The first batch after a (re)start may begin before the asked position (a
        batch grid coarser than the position); the replay skip handles that.
        """
        last = self.read_end.get(name, 0)
        if start > last:
            raise PositionGapError(
                f"split {name!r} yielded a batch covering rows [{start}, {end}) right after "
                f"position {last}: rows [{last}, {start}) were never read. A split's read() must "
                "yield (batch, next_position) with next_position - len(batch) equal to the "
                "previous next_position (see rayflow.sources.Split)",
                split=name,
                partition=-1,
                position=last,
                start=start,
            )
        if start < last and last != self.start.get(name, 0):
            raise ProtocolError(
                f"split {name!r} yielded a batch covering rows [{start}, {end}) that overlaps rows "
                f"already read (up to {last}); a split's positions must only grow"
            )
        self.read_end[name] = end

    def _append(self, name: str, end: int, parts: list, watermark: int | None = None) -> None:
        for p, first, payload, rows, nbytes, spilled in parts:
            if end <= self.skip.get(p, {}).get(name, 0):
                if spilled:
                    self._release([payload])
                continue  # committed meanwhile (a trim after this batch was prepared)
            since = self.since.get((p, name), self.skip.get(p, {}).get(name, 0))
            self.queues[p].append(Entry(name, first, end, rows, nbytes, payload, since, watermark, spilled))
            self.since[(p, name)] = end
            self.routed_rows[p] += rows
        if end > self.frontier.get(name, 0):
            self.frontier[name] = end
        if watermark is not None:  # with the frontier, in one step: both cover the same rows
            self.split_wm[name] = watermark

    # ------------------------------------------------------------------ discovery, availability
    async def _discover_loop(self) -> None:
        """A dynamic source: list its splits every ``discovery_interval_s``; read the new ones this
        actor owns, once the manager has recorded them (a resume then knows them all)."""
        loop = asyncio.get_running_loop()
        while not self._stopping:
            try:
                # Asked before the listing: once complete, this listing has every split there is.
                last = not self.unbounded and await loop.run_in_executor(
                    self._meta_pool, self.source.complete
                )
                found = await loop.run_in_executor(self._meta_pool, self.source.splits)
                new = {
                    s.name: s
                    for s in found
                    if s.name not in self.readers
                    and owner_of(s.name, self.dealt, self.num_sources) == self.index
                }
                if new:
                    try:  # combine_at_source needs dense positions: checked at start, and here
                        check_new_splits(self.combiner, list(new.values()))
                    except ConfigError as e:
                        await self._fail(e)
                        return
                    refused = await self._record_splits(list(new.values()))
                    if refused is not None:  # for good: listing again would find the same file
                        await self._fail(refused)
                        return
                    for s in new.values():
                        if not self._stopping:
                            self._add_reader(s.bind(job_started_ms=self.started_ms), self._start_of(s.name))
                self.discovery_error = None
                if last:
                    self._discovery_done = True
                    self._more_bounded.set()  # the bounded reader ends once it has read them all
                    return
            except Exception as e:  # a broker or a listing that fails now may answer next time
                self.discovery_error = f"{type(e).__name__}: {e}"
                logger.warning("rayflow %s: listing the splits of the source failed: %s", self.name, e)
            await self._sleep(self.config.discovery_interval_s)

    async def _record_splits(self, splits: list[Split]) -> MalformedInputError | None:
        """Record ``splits`` as known in the catalog with their fingerprints, in one call, before
        any of their rows is served; the error to fail with if one's name was recorded with
        another fingerprint (its committed positions count rows of other data), else None.

        A failing call raises (the manager or catalog is unreachable): the caller
        retries (discovery) or fails its start.
        """
        mine = {s.name: s.fingerprint() for s in splits}
        recorded = await self._manager().add_splits.remote(mine)
        clashes = [
            (name, recorded.get(name), fp)
            for name, fp in mine.items()
            if fp is not None and recorded.get(name) is not None and recorded[name] != fp
        ]
        if not clashes:
            return None
        name, was, now = clashes[0]
        more = f" (and {len(clashes) - 1} more: {[c[0] for c in clashes[1:6]]})" if len(clashes) > 1 else ""
        return MalformedInputError(
            f"the split {name!r} (of rf.sources.Files: the file, relative to the directory) is not "
            f"what this job first read under that name: its recorded fingerprint is {was}, now it "
            f"is {now}{more}. Its committed positions count rows of the old data, so reading on "
            "would mix rows of two inputs under one name; none of its rows was read. A name must "
            "never be reused: move the file now under that name away, and write new data under a "
            "name this job has never seen (or start a new job: another name or checkpoint_dir)"
        )

    async def _fail(self, error: BaseException) -> None:
        """Fail the source with ``error``: ``fetch`` and ``stats`` raise it (long polls now)."""
        self.error = error
        async with self._changed:
            self._changed.notify_all()

    async def _poll_available_loop(self) -> None:
        """Every ``AVAILABLE_EVERY_S``: ``available()`` of the unbounded splits (lag, arrival rate)."""
        loop = asyncio.get_running_loop()
        while not self._stopping:
            readers = [r for r in self.readers.values() if r.split.unbounded and not r.done]
            if readers:
                values = await loop.run_in_executor(
                    self._meta_pool, _poll_available, [r.split for r in readers]
                )
                now = time.monotonic()
                for r, v in zip(readers, values):
                    r.available = v
                    if v is not None:
                        r.samples.append((now, v))
            await self._sleep(AVAILABLE_EVERY_S)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, or less if reading stops meanwhile."""
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    # ------------------------------------------------------------------ stop
    async def stop_reading(self) -> dict:
        """Stop reading: each reader finishes the read in progress and closes its generator.

        What is queued stays served (consumers drain and commit it), and no end
        of input is reported, so a next run resumes from the committed
        positions. Returns ``{"rows_read": ..., "frontier": ...}``, the
        frontier being where each split's reading stopped (what a drained
        partition's committed positions reach). Idempotent.
        """
        await self._sync()
        self._stopping = True
        self._stop.set()
        self._more_bounded.set()
        async with self._changed:
            self._changed.notify_all()  # readers waiting for room see the stop
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_WAIT_S)
            for t in pending:  # stuck in a read: abandoned (its thread goes with the actor)
                logger.warning("rayflow %s: a reader did not stop within %s s", self.name, STOP_WAIT_S)
                t.cancel()
        return {"rows_read": self.rows_read, "frontier": dict(self.frontier)}

    # ------------------------------------------------------------------ serving
    async def set_epochs(self, epochs: dict[int, int]) -> None:
        """The manager's word on the current lease epoch of partitions (only ever raised)."""
        for p, e in epochs.items():
            if e > self.epochs.get(p, 0):
                self.epochs[p] = e

    def _fenced(self, p: int, epoch: int) -> FencedError | None:
        cur = self.epochs.get(p, 0)
        if epoch >= cur:
            return None
        return FencedError.stale(partition=p, epoch=epoch, current_epoch=cur)

    async def fetch(
        self, requests: dict[int, tuple[int, dict[str, int]]], max_bytes: int | dict[int, int]
    ) -> dict[int, FetchResult]:
        """Entries past the given positions for each asked partition (``p -> (epoch, positions)``),
        at most ``max_bytes`` per partition (a dict: per partition, as priority tiers ask).

        A partition asked under a stale lease epoch gets no data, only ``fenced``.
        Waits up to ``fetch_wait_s`` for data when none is due (long poll).
        """
        await self._sync()
        if self.error is not None:
            raise self.error
        res = self._serve(requests, max_bytes)
        if not any(r.entries or r.end or r.fenced for r in res.values()) and not self.exhausted:
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait(), self.config.fetch_wait_s)
                except asyncio.TimeoutError:
                    pass
            res = self._serve(requests, max_bytes)
        await self._load_spilled(res)
        await self._cut_overlaps(requests, res)
        return res

    async def _load_spilled(self, res: dict[int, FetchResult]) -> None:
        """Read the spilled entries of a reply back from disk, in a thread, and put them in the
        object store for this reply only (the queue keeps the disk copy until it is trimmed).

        An entry whose file is gone meanwhile (a commit trimmed it: the asker is behind a
        newer commit) ends that partition's reply there, as one with more to come.
        """
        todo = [(r, i, fe) for r in res.values() for i, fe in enumerate(r.entries) if fe.spilled]
        if not todo:
            return
        loop = asyncio.get_running_loop()
        refs, freed = await loop.run_in_executor(
            self._spill_pool, self._read_spilled, [fe.ref for _, _, fe in todo]
        )
        if freed:  # a segment released while this read had it pinned retired as it ended
            async with self._changed:
                self._changed.notify_all()
        cut: dict[int, tuple[FetchResult, int]] = {}
        for (r, i, fe), ref in zip(todo, refs):
            if ref is None:
                if id(r) not in cut or i < cut[id(r)][1]:
                    cut[id(r)] = (r, i)
            else:
                r.entries[i] = dataclasses.replace(fe, ref=ref, spilled=False)
        for r, i in cut.values():
            r.entries = r.entries[:i]
            r.frontier, r.end = None, False
            if r.watermarks is not None:
                r.watermarks, r.idle = dict.fromkeys(r.watermarks), None

    def _read_spilled(self, handles: list[SpillHandle]) -> tuple[list[ray.ObjectRef | None], int]:
        """Worker thread: read spilled sub-batches and put each in the object store; and the
        disk bytes the read freed (``SpillStore.read_freeing``)."""
        batches, freed = self.spill.read_freeing(handles)
        return [None if b is None else ray.put(b) for b in batches], freed

    def _release(self, handles: list[SpillHandle]) -> None:
        """Free spilled entries (trimmed, or never queued); their files close in a thread."""
        retired = self.spill.release(handles)
        if retired:
            self._spill_pool.submit(close_files, retired)

    async def _cut_overlaps(self, requests: dict[int, tuple[int, dict[str, int]]], res: dict) -> None:
        """Serve a replayed batch that straddles the asker's processed position cut at it.

        After a restart, a split with gaps (``dense = False``: Kafka) is read
        again from the lowest committed position, and its batches need not end
        where the first read's did (a live read yields what has arrived). A
        consumer that processed up to a position inside such a batch would see
        an overlap. Dense splits cannot get here (their batches end on a fixed
        grid). The queue keeps the whole entry (a new owner starting from an
        earlier commit needs all of it); only this reply gets the cut copy,
        whose rows come from the split's ``row_positions``.
        """
        for p, r in res.items():
            if not r.entries:
                continue
            asked = requests[p][1]
            for i, fe in enumerate(r.entries):
                at = asked.get(fe.split, 0)
                reader = self.readers.get(fe.split)
                if not fe.start < at < fe.end or reader is None or reader.split.dense:
                    continue
                batch = await fe.ref
                pos = np.asarray(reader.split.row_positions(batch), dtype=np.int64)
                # Compacted: a slice would serialize (ray.put) the whole batch's buffers.
                cut = compact(batch.slice(int(np.searchsorted(pos, at, side="left"))))
                r.entries[i] = FetchedEntry(
                    fe.split, at, fe.end, cut.num_rows, ray.put(cut), since=at, watermark=fe.watermark
                )

    def _serve(
        self, requests: dict[int, tuple[int, dict[str, int]]], max_bytes: int | dict[int, int]
    ) -> dict[int, FetchResult]:
        out = {}
        for p, (epoch, positions) in requests.items():
            fenced = self._fenced(p, epoch)
            if fenced is not None:
                out[p] = FetchResult(fenced=fenced)
                continue
            q = self.queues[p]
            entries, rest = q.after(positions, max_bytes if isinstance(max_bytes, int) else max_bytes[p])
            r = FetchResult(
                entries=[
                    FetchedEntry(e.split, e.start, e.end, e.rows, e.payload, e.since, e.watermark, e.spilled)
                    for e in entries
                ],
                full=q.full or (self._blocked_at is not None and q.queued_rows > 0),
            )
            if not rest:
                r.frontier = dict(self.frontier)
                r.end = self.exhausted and not entries
                if self.event_time is not None:
                    r.watermarks, r.idle = self._watermarks()
            elif self.event_time is not None:
                # Not all served: the splits only (they hold the partition's watermark back until
                # their rows are processed), no watermark or idleness past what the entries carry.
                r.watermarks, r.idle = dict.fromkeys(self.frontier), None
            out[p] = r
        return out

    def _watermarks(self) -> tuple[dict[str, int | None], set[str]]:
        """Every split's watermark as of everything read, and the ones to skip (see FetchResult).

        A split that ended is at the end of time in a job that ends (a bounded
        one, once every split is known); in a job that goes on (a watched directory's files end one by
        one) it is skipped with its last watermark instead: the end of time
        would close every window before the next file. An unbounded split is
        skipped once it has been quiet (idle ticks, or rows without event time)
        for the idle timeout; a bounded one never is (it is only waiting for
        its turn, or for room in the queues).
        """
        now = time.monotonic()
        timeout = self.event_time.idle_timeout_s
        wms: dict[str, int | None] = {}
        skip = set()
        if self._staged:
            # A bounded dynamic source (a stage's upstream): its files come in no event-time order
            # (one per upstream commit and partition, each in no order inside), so neither a file
            # nor the files read so far bound the rest. Each file is at the end of time once read
            # whole, and this actor's listing holds event time back (a split of its own, never
            # idle: another actor's may be done first) until it has its last files.
            wms = {
                name: WATERMARK_END
                if (r := self.readers.get(name)) is not None and r.done
                else WATERMARK_NONE
                for name in self.frontier
            }
            wms[listing_split(self.index)] = WATERMARK_END if self._discovery_done else WATERMARK_NONE
            return wms, set()
        for name in self.frontier:
            r = self.readers.get(name)
            wms[name] = self.split_wm.get(name)
            if r is None:
                continue
            if r.done:
                if self.unbounded or (self.source is not None and not self._discovery_done):
                    skip.add(name)
                else:
                    wms[name] = WATERMARK_END
            elif (
                r.split.unbounded
                and timeout is not None
                and r.quiet_since is not None
                and now - r.quiet_since >= timeout
            ):
                skip.add(name)
        return wms, skip

    @property
    def _staged(self) -> bool:
        """The source gains splits while the job runs, and ends (``Source.complete``): a stage's
        upstream."""
        return not self.unbounded and self.source is not None

    async def trim(self, committed: dict[int, tuple[int, dict[str, int]]]) -> list[int]:
        """Drop queued entries covered by committed positions (``p -> (epoch, positions)``).

        Returns the partitions refused for a stale epoch (nothing trimmed there).
        """
        await self._sync()
        fenced = []
        for p, (epoch, positions) in committed.items():
            if self._fenced(p, epoch) is not None:
                fenced.append(p)
                continue
            spilled = [e.payload for e in self.queues[p].drop(positions) if e.spilled]
            if spilled:
                self._release(spilled)
            # What is committed need never be queued again: a replay that is still below these
            # positions (this actor restarted after its last look at the catalog) skips them,
            # instead of queueing rows no trim will come for.
            skip = dict(self.skip.get(p, {}))
            for split, pos in positions.items():
                skip[split] = max(skip.get(split, 0), pos)
            self.skip[p] = skip
        async with self._changed:
            self._changed.notify_all()
        return fenced

    async def sample_hashes(self, partition: int) -> np.ndarray:
        """The recent hashes routed to ``partition`` (a bounded sample): a split's cut point."""
        return self.reservoir.of(partition)

    async def stats(self) -> dict:
        """Reading figures as plain data.

        ``rows_read``, ``exhausted``, per partition ``queued_rows`` (read, not yet
        committed: in memory or spilled), ``queued_bytes`` (of those, the bytes in the
        object store), ``spilled_rows`` and ``spilled_bytes`` (of those, on local disk;
        bytes as in memory), ``blocked_s`` (seconds reading was paused, charged to the
        partitions at their memory bound, see ``queues.blamed``) and ``routed_rows``
        (rows queued since this actor started: the partitions' shares of the input);
        ``memory_bytes`` (all queues, in the object store), ``spill_disk_bytes`` (this
        actor's spill files, see ``spill.SpillStore.disk_bytes``), ``paused`` (reading
        waits for room now; ``pauses`` the times it paused and ``paused_s`` the seconds, in all),
        ``spill_error`` (None, or why spilling was turned off), ``pid``;
        ``frontier`` (read position per split);
        ``splits``: per split still read (a finished bounded one is left out: a watched
        directory gains a split per file) its read ``position``, ``available`` (None:
        unknown), ``unbounded``, ``done``, and the seconds since its last batch with rows
        (``since_data_s``) and since it last answered at all (``since_tick_s``: a
        quiet split ticks); ``unread_rows``: rows available but not read yet, over the
        splits that know; ``arrival_rows_per_s`` (None: no split knows);
        ``unbounded``, ``reading``, ``discovery_error``; ``skew``: the heavy-hitters
        summaries per partition over the recent window (``skew.SkewTracker.snapshot``);
        ``combined_rows``: rows queued after combining (None: the job does not combine).
        """
        await self._sync()
        if self.error is not None:
            raise self.error
        now = time.monotonic()
        splits, unread, rates = {}, 0, []
        for name, r in self.readers.items():
            if r.done and not r.split.unbounded:
                continue
            pos = self.read_end.get(name, r.start)
            splits[name] = {
                "position": pos,
                "available": r.available,
                "unbounded": r.split.unbounded,
                "done": r.done,
                "since_data_s": now - r.since_data,
                "since_tick_s": now - r.since_tick,
            }
            if r.available is not None and not r.done:
                unread += max(0, r.available - pos)
                rate = r.arrival_rate()
                if rate is not None:
                    rates.append(rate)
        return {
            "rows_read": self.rows_read,
            "exhausted": self.exhausted,
            "queued_rows": [q.queued_rows for q in self.queues],
            "queued_bytes": [q.nbytes for q in self.queues],
            "spilled_rows": [q.spilled_rows for q in self.queues],
            "spilled_bytes": [q.spilled_bytes for q in self.queues],
            "blocked_s": self.blocked_s.tolist(),
            "memory_bytes": sum(q.nbytes for q in self.queues),
            "spill_disk_bytes": self.spill.disk_bytes,
            "paused": self._blocked_at is not None,
            "pauses": self.pauses,
            "paused_s": self.paused_s + (0.0 if self._blocked_at is None else now - self._blocked_at),
            "spill_error": self.spill_error,
            "pid": os.getpid(),
            "routed_rows": self.routed_rows.tolist(),
            "frontier": dict(self.frontier),
            "splits": splits,
            "unread_rows": unread,
            "arrival_rows_per_s": sum(rates) if rates else None,
            "unbounded": self.unbounded,
            "reading": self._started and not self._stopping,
            "discovery_error": self.discovery_error,
            "skew": self._skew_snapshot(),
            "combined_rows": self.combined_rows if self.combiner is not None else None,
        }

    def _skew_snapshot(self) -> dict:
        with self._skew_lock:
            return self.skew.snapshot()
