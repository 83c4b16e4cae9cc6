"""The SourceActor: reads splits, hashes and routes rows, serves partition queues.

A thin async shell: reading, hashing and splitting a batch runs in a worker
thread (Arrow and numpy release the GIL), so ``fetch`` and ``trim`` calls are
answered while the next batch is being prepared. Appending a batch's
sub-batches to the queues happens on the event loop in one step, so a fetch
never sees half a batch.

Each sub-batch is put into Ray's object store once (``ray.put``) and its
reference queued; consumers ``ray.get`` it zero-copy. A fetch answers for
many partitions at once, so Ray's per-call cost is paid per batch.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray

from rayflow._internal import naming
from rayflow._internal.jobfile import read_job_file
from rayflow._internal.queues import Entry, PartitionQueue
from rayflow.errors import FencedError, PositionGapError, ProtocolError
from rayflow.partitioning import hash_table, split_by_partition


@dataclass(frozen=True)
class FetchedEntry:
    split: str
    start: int
    end: int
    rows: int
    ref: ray.ObjectRef
    since: int | None = None  # see queues.Entry.since: lets the consumer prove contiguity


@dataclass
class FetchResult:
    entries: list[FetchedEntry] = field(default_factory=list)
    #: Read position per split up to which this partition has now been served
    #: in full (set only when no entry remains past what is returned).
    frontier: dict[str, int] | None = None
    #: Input exhausted and nothing left to serve past the asked positions.
    end: bool = False
    #: The queue is at its bound: commit soon so it can be trimmed.
    full: bool = False
    #: Set when the request's lease epoch is stale: the caller must drop the partition.
    fenced: FencedError | None = None


def _was_restarted() -> bool:
    with warnings.catch_warnings():  # Ray's own implementation trips its deprecation warning
        warnings.simplefilter("ignore")
        return ray.get_runtime_context().was_current_actor_reconstructed


@ray.remote
class SourceActor:
    """Reads its share of the input's splits into per-partition queues.

    Restartable (``max_restarts=-1``): its constructor takes only the job
    file's location and its index (see ``_internal/jobfile.py``), and at start
    as at every restart it loads its splits from the job file and asks the
    manager for the committed positions and lease epochs before serving
    anything. After a restart it replays each split from the lowest committed
    position of its partitions, on its own, at the first call it gets.
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
        self.key = list(job.key)
        self.map = job.partition_map
        self.config = config = job.config
        n = self.map.num_partitions
        self.queues = [
            PartitionQueue(p, max_rows=config.queue_max_rows, max_bytes=config.queue_max_bytes)
            for p in range(n)
        ]
        self._replay_from({})  # until _sync() has the committed positions
        # The newest lease epoch per partition, pushed by the manager at every grant:
        # a fetch or trim under an older epoch comes from a stale owner.
        self.epochs: dict[int, int] = {}
        self.rows_read = 0
        self.blocked_s = np.zeros(n)
        self.exhausted = False
        self.error: BaseException | None = None
        self._changed = asyncio.Condition()
        self._task: asyncio.Task | None = None

    async def run(self) -> None:
        """Start reading, from the committed positions (returns at once)."""
        await self._sync()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._read_loop())

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
            manager = ray.get_actor(naming.manager_name(self.pipeline), namespace=naming.NAMESPACE)
            info = await manager.ready.remote()
            self._replay_from(info["positions"])
            await self.set_epochs(info["epochs"])
            self._synced = True
        if self._restarted:
            await self.run()

    def _replay_from(self, committed: dict[int, dict[str, int]]) -> None:
        """Where to read from, given the committed positions (partition -> split -> position).

        Each split restarts from the lowest position any partition committed for it;
        partitions already past it skip, here at the source, what they have.
        """
        n = self.map.num_partitions
        self.start = {
            s.name: min((committed.get(p, {}).get(s.name, 0) for p in range(n)), default=0)
            for s in self.splits
        }
        self.skip = dict(committed)  # partition -> split -> position: serve no rows before it
        # (partition, split) -> end of the last entry queued (queues.Entry.since).
        self.since: dict[tuple[int, str], int] = {}
        self.frontier = dict(self.start)
        self.read_end = dict(self.start)  # split -> end of the last batch read (contiguity check)

    async def _read_loop(self) -> None:
        try:
            iters = [(s.name, iter(s.read(self.start.get(s.name, 0)))) for s in self.splits]
            while iters:
                for name, it in list(iters):
                    await self._wait_for_room()
                    item = await asyncio.to_thread(self._prepare_next, name, it)
                    if item is None:
                        iters.remove((name, it))
                        continue
                    self._append(name, *item)
                    if self.faults is not None:
                        self.faults.hit("source.batch", self.name)
                    async with self._changed:
                        self._changed.notify_all()
        except BaseException as e:  # surfaced to the driver by status()
            self.error = e
        finally:
            self.exhausted = True
            for q in self.queues:
                q.close_input()
            async with self._changed:
                self._changed.notify_all()

    async def _wait_for_room(self) -> None:
        full = [q.partition for q in self.queues if q.full]
        if not full:
            return
        t0 = time.monotonic()
        async with self._changed:
            await self._changed.wait_for(lambda: not any(q.full for q in self.queues))
        self.blocked_s[full] += time.monotonic() - t0

    def _prepare_next(self, name: str, it) -> tuple | None:
        """Worker thread: read one batch, route it, put each sub-batch in the object store."""
        try:
            batch, end = next(it)
        except StopIteration:
            return None
        start = end - batch.num_rows
        self._check_contiguous(name, start, end)
        self.rows_read += batch.num_rows
        parts = split_by_partition(
            batch, self.map.route(hash_table(batch, self.key)), self.map.num_partitions
        )
        out = []
        for p, sub in parts:
            first = start
            committed = self.skip.get(p, {}).get(name, 0)
            if end <= committed:
                continue  # replay: this partition already committed these rows
            if start < committed:  # replay across a commit boundary: keep only rows >= committed
                tail = batch.slice(committed - start)
                routed = self.map.route(hash_table(tail, self.key))
                sub = tail.filter(pa.array(routed == p))
                first = committed
                if sub.num_rows == 0:
                    continue
            out.append((p, first, ray.put(sub), sub.num_rows, sub.nbytes))
        return end, out

    def _check_contiguous(self, name: str, start: int, end: int) -> None:
        """A split's batches must cover its rows without a gap or an overlap (DESIGN §2.1).

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

    def _append(self, name: str, end: int, parts: list) -> None:
        for p, first, ref, rows, nbytes in parts:
            if end <= self.skip.get(p, {}).get(name, 0):
                continue  # committed meanwhile (a trim after this batch was prepared)
            since = self.since.get((p, name), self.skip.get(p, {}).get(name, 0))
            self.queues[p].append(Entry(name, first, end, rows, nbytes, ref, since))
            self.since[(p, name)] = end
        self.frontier[name] = end

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
        self, requests: dict[int, tuple[int, dict[str, int]]], max_bytes: int
    ) -> dict[int, FetchResult]:
        """Entries past the given positions for each asked partition (``p -> (epoch, positions)``).

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
        return res

    def _serve(
        self, requests: dict[int, tuple[int, dict[str, int]]], max_bytes: int
    ) -> dict[int, FetchResult]:
        out = {}
        for p, (epoch, positions) in requests.items():
            fenced = self._fenced(p, epoch)
            if fenced is not None:
                out[p] = FetchResult(fenced=fenced)
                continue
            q = self.queues[p]
            entries, rest = q.after(positions, max_bytes)
            r = FetchResult(
                entries=[FetchedEntry(e.split, e.start, e.end, e.rows, e.payload, e.since) for e in entries],
                full=q.full,
            )
            if not rest:
                r.frontier = dict(self.frontier)
                r.end = self.exhausted and not entries
            out[p] = r
        return out

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
            self.queues[p].trim(positions)
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

    async def stats(self) -> dict:
        await self._sync()
        if self.error is not None:
            raise self.error
        return {
            "rows_read": self.rows_read,
            "exhausted": self.exhausted,
            "queued_rows": [q.rows for q in self.queues],
            "queued_bytes": [q.nbytes for q in self.queues],
            "blocked_s": self.blocked_s.tolist(),
            "frontier": dict(self.frontier),
        }
