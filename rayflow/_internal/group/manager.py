"""The GroupManager actor: membership, leases, commits (DESIGN §2.3, §4, §5).

A thin async shell over the pure parts: :func:`assignment.assign` decides the
target owners, :class:`leases.LeaseTable` moves partitions between owners, and
:class:`Catalog` records what is committed (the manager is its only writer).

Death of a consumer is seen two ways: each member has one outstanding
``watch()`` call, which Ray fails within milliseconds of the actor's death;
and a member whose heartbeat is older than ``session_timeout_s`` is expired.

**The event loop never blocks.** It answers heartbeats, joins, releases and
commits. Every blocking operation (DuckDB transactions, remote log writes and
``exists`` checks, ``CHECKPOINT``, publication, retirement, trimming) runs on
*one* worker thread (``_io``): DuckDB keeps a single writer, and one thread
keeps the remote log in order. A slow catalog write or publication delays
commits; it never delays a heartbeat, so it never expires a session.

**Commits and lease changes are atomic with respect to each other.** A commit
awaits the I/O thread between its fencing check and its application. Had a
lease moved in between (a member gone, a release, a rebalance), the new owner
would restore from a commit older than the one being recorded, and count rows
twice. So one ``asyncio.Lock`` (``_lock``) is held by the commit path (check ->
record -> apply) and by every transition that changes leases (join, leave,
release, a member gone, expiry, activate). Heartbeats take no lock and wait
for no I/O: they refresh liveness and read the leases. (A second, weaker
guard: the I/O thread runs in order, so a grant made after a commit's record
was queued is recorded, and visible, only after that commit is applied.)

**A grant is recorded before it is visible.** A transition records its grants
in the catalog (under the lock) before the grantee is poked and the sources
get the new epoch, and until then heartbeat replies withhold the grant
(``_durable``). Otherwise a manager crash after handing out an unrecorded
epoch would restart from the older record and grant the same epoch again:
two incarnations of one lease that fencing (owner and epoch) cannot tell
apart when the grantee is the same member.

The commit protocol, seen from here (steps as numbered in ``checkpoint/commit.py``):

2. :meth:`Coordinator.check_commit` fences first, then recognizes a repeat of
   the recorded commit, then validates; every file a new record names must
   exist (else :class:`ProtocolError`, and nothing is recorded).
3-4. All new records of the call are logged (remote checkpoint directories)
   and recorded in one catalog transaction, with their outputs marked
   unpublished; then applied in memory.
5. Publication, driven by the catalog: tried at once, and retried with
   backoff by the maintenance loop until it succeeds, on every repeat of the
   commit, and after a restart (the catalog lists what is unpublished). Once
   step 4 is done, ``commit`` never raises because of publication: failures
   are counted in :meth:`status` (``publish_pending``, ``publish_failures``,
   ``last_publish_error``), and a job whose publication keeps failing is
   reported ``failed``.
7. Retirement of old state files, and trimming of the catalog's history, by
   the maintenance loop.

**History** (``_internal/history.py``, drawn by ``rayflow report``): every
``history_interval_s`` a loop of its own samples the partitions (from memory and
the sources' stats), the consumers (their ``status``, each awaited at most
``HISTORY_WAIT_S``: one that does not answer is skipped) and the commits recorded
since the last sample (tallied by ``commit`` in memory: no I/O on the commit
path), and queues one insert on the I/O thread. The last sample is taken at
``close``. Caveat: a crash of this actor loses the commits tallied since the
last sample.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import json
import logging
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone

import ray

from rayflow._internal import history, naming, repartition, skew
from rayflow._internal.checkpoint.catalog import Catalog, IndexBehindLog
from rayflow._internal.checkpoint.commit import CommitRecord
from rayflow._internal.checkpoint.store import Store, is_remote
from rayflow._internal.compat import JobMeta, check_resume
from rayflow._internal.group.coordinator import Coordinator, Effects
from rayflow._internal.jobfile import read_job_file
from rayflow._internal.lag import add_lag
from rayflow._internal.metrics import ManagerMetrics
from rayflow._internal.publish import Publisher
from rayflow._internal.watermarks import WATERMARK_NONE, lag_s
from rayflow.config import EngineConfig
from rayflow.errors import CheckpointError, FencedError, IncompatibleCheckpointError, ProtocolError
from rayflow.partitioning import PartitionMap

logger = logging.getLogger(__name__)

#: How often the manager refreshes its Prometheus gauges.
METRICS_EVERY_S = 1.0
#: State files kept per partition (the last commits'); older ones are deleted.
STATE_FILES_KEPT = 3
#: How often (at most) old state files are retired.
RETIRE_EVERY_S = 5.0
#: How often the catalog's history is trimmed and a remote log compacted: both are cheap, and
#: between two runs the catalog grows by at most this many seconds of commits.
TRIM_EVERY_S = 30.0
#: How often (at most) the source hears the committed positions (``Source.on_commit``: Kafka's
#: group offsets, for its lag tools; informational, so seconds old is fine).
SOURCE_COMMIT_EVERY_S = 5.0
#: Period of the maintenance loop (publication retries, retirement, trimming).
MAINTAIN_EVERY_S = 0.2
#: First wait before publication is retried after a failure; doubled after each further failure.
PUBLISH_RETRY_INITIAL_S = 0.2
#: Longest wait between two publication attempts.
PUBLISH_RETRY_MAX_S = 10.0
#: Outputs published per job of the I/O thread by the retry loop, so that commits interleave
#: with a long backlog instead of waiting for all of it.
PUBLISH_BATCH = 16
#: Longest a history sample waits for each consumer's and source's answer: one that has not
#: answered by then is left out of that sample (a consumer), or leaves its lag unknown (a source).
HISTORY_WAIT_S = 1.0
#: The same at ``close``, for the last sample of a run: short, as it delays the end of the run.
HISTORY_FINAL_WAIT_S = 0.3
#: Completed moves kept in memory for :meth:`GroupManager.moves_since` (the catalog's events keep
#: more): enough for the benchmarks and tests that read them, bounded for a long-running job.
MOVES_KEPT = 1_000


def _was_restarted() -> bool:
    with warnings.catch_warnings():  # Ray's own implementation trips its deprecation warning
        warnings.simplefilter("ignore")
        return ray.get_runtime_context().was_current_actor_reconstructed


@ray.remote
class GroupManager:
    def __init__(self, *, name: str, job_root: str, job_file: str):
        """``job_root``/``job_file``: where the driver wrote this run's job file. The manager
        is restartable, so it takes only these small values and loads the rest from the file
        at start and at every restart (``_internal/jobfile.py``, ray-project/ray#53727)."""
        self.name = name
        self.faults = None
        self.source_names: list[str] = []
        self.config = EngineConfig()
        self.handles: dict[str, object] = {}
        self.watches: dict[str, asyncio.Task] = {}
        self.sources: list = []
        self.metrics = ManagerMetrics(name)
        self._init_error: BaseException | None = None
        # Every blocking call runs here, one at a time (see the module doc).
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayflow-manager-io")
        self._lock = asyncio.Lock()  # commits and lease changes (see the module doc)
        self._closed = False
        self._index_behind = False  # a logged commit is missing from the local index (catch_up)
        self._durable: dict[int, int] = {}  # partition -> highest lease epoch the catalog holds
        self._grants_unrecorded: list[tuple[int, str, int]] = []  # a failed record_leases, retried
        self._unpublished: dict[str, None] = {}  # recorded outputs not yet published (ordered)
        self._publish_failures = 0
        self._publish_streak = 0  # consecutive failed attempts
        self._publish_failing_since: float | None = None
        self._publish_retry_at = 0.0
        self._last_publish_error: str | None = None
        self._maintenance_failures = 0
        self._last_maintenance_error: str | None = None
        self._moves: collections.deque[dict] = collections.deque(maxlen=MOVES_KEPT)
        self._moves_total = 0
        self._started_ms: int | None = None  # when the job first read (ms since the epoch)
        self._commit_at: dict[int, float] = {}  # partition -> wall time of its latest recorded commit
        self._loops: list[asyncio.Task] = []  # started by the first call, inside the event loop
        self._commit_tally = history.CommitTally()  # commits since the last history sample
        self._consumer_clocks: dict[str, history.ConsumerClock] = {}
        # Sampling cost, in all and for the last sample: seconds on the event loop (CPU), and the
        # insert on the I/O thread (wall, and that thread's CPU: the wall time includes waiting
        # for the GIL). Waiting for answers is not cost: the loop serves other calls meanwhile.
        self._history_cost = {
            "samples": 0,
            "loop_s": 0.0,
            "write_s": 0.0,
            "write_cpu_s": 0.0,
            "last_loop_s": 0.0,
            "last_write_s": 0.0,
        }
        try:
            self._io.submit(self._start, job_root, job_file, _was_restarted()).result()
        except BaseException as e:  # raised by ready(): an actor whose __init__ fails just dies
            self._init_error = e

    # ------------------------------------------------------------------ setup (I/O thread)
    def _start(self, job_root: str, job_file: str, restarted: bool) -> None:
        job = read_job_file(job_root, job_file)
        self.faults = job.faults
        if restarted:
            self._fault("manager.restart")
        self.source_names = job.source_names
        self.source = job.source  # for Source.on_commit (dynamic sources only travel this far)
        self._told_source: dict[str, int] = {}
        self._telling: asyncio.Task | None = None
        self._query_pool: ThreadPoolExecutor | None = None
        self.config = job.config
        self.sink = job.sink
        state_root = job.root
        # Under a remote checkpoint directory the durable catalog is a log there.
        self.catalog = Catalog(job.catalog_path, log_root=state_root if is_remote(state_root) else None)
        self.state_store = Store(state_root)
        #: partition -> (member, its last heartbeat's watermark and operator metrics)
        self._clocks: dict[int, tuple[str, dict]] = {}
        self.publisher = Publisher(job.sink, job.sink_root, fault=self._fault, sides=job.side_sinks)
        self.map = job.partition_map
        self.key = list(job.key)
        self.tiers = job.tiers
        self._check_meta(job.meta)  # may re-split the checkpoint into this run's partition count
        epochs = self.catalog.lease_epochs()
        self.group = Coordinator(
            self.map.num_partitions,
            epochs=epochs,
            committed=self.catalog.latest_commits(),
            tiers=job.tiers,
        )
        self._durable = dict(epochs)
        self._commit_at = self.catalog.last_commit_times()
        if restarted:
            # Restarted by Ray mid-run: the recorded owners come back as ghosts that
            # may re-join and keep their leases (Coordinator.restore).
            self.group.restore(self.catalog.lease_owners(), time.monotonic())
        self._repair_files(restarted)
        # The sink's "complete" marker (a later stage reads it, rf.sources.Upstream) is this run's
        # to write once everything is published; one from an earlier job in the same directory
        # must not end the new job's downstream before this job has committed anything.
        self._unbounded = job.unbounded
        self._marked = False
        if not self.catalog.latest_commits():
            self.sink.clear_complete(self.publisher.store)

    def _check_meta(self, meta: JobMeta) -> None:
        """May this run resume the checkpoint? (``compat.check_resume``, the one place it is decided.)

        For a dynamic source, also records this run's splits as known.
        """
        old = JobMeta.from_dict(self.catalog.get_meta())
        meta = self._resolve_map(old, meta)
        if old is not None and old.partition_map is not None:
            old = dataclasses.replace(old, partition_map=meta.partition_map)  # re-split, if it differed
        committed = self.catalog.latest_commits()
        finished = len(committed) == self.map.num_partitions and all(c.final for c in committed.values())
        check_resume(self.name, old, meta, finished=finished, known_splits=self.catalog.known_splits())
        self.catalog.set_meta(meta.to_dict())
        self._started_ms = self.catalog.started_ms()
        if meta.dynamic and meta.splits:
            # Names only: their fingerprints come from the source actors, which compare them
            # with the recorded ones before reading (a name known without one takes the first).
            self.catalog.add_splits(dict.fromkeys(meta.splits))

    def _resolve_map(self, old: JobMeta | None, meta: JobMeta) -> JobMeta:
        """The partition map this run goes on with, as ``self.map``; ``meta`` with it.

        The driver asks for a partition count (a uniform map, version 1). The
        same ranges as the checkpoint's map: the recorded map, with its
        version. Other ranges: the checkpoint is re-split into them (a new map,
        version + 1, :meth:`_repartition`), once everything else about the job
        is found compatible.
        """
        if old is None or old.partition_map is None:
            return meta
        recorded = PartitionMap.from_json(old.partition_map)
        if _kept_split_map(recorded, self.map):
            if self.tiers:
                raise IncompatibleCheckpointError(
                    f"cannot resume pipeline {self.name!r} with tiers=: splits at runtime cut its "
                    f"checkpoint's {recorded.requested} partitions into {recorded.num_partitions} "
                    "other ranges, and tiers name partitions of the uniform map. Resume without "
                    "tiers=, or with another partitions= (the state is then re-split into that "
                    "count's uniform map, which tiers can name)"
                )
            self.map = recorded
            return dataclasses.replace(meta, partition_map=recorded.to_json())
        if recorded.bounds != self.map.bounds:
            committed = self.catalog.latest_commits()
            finished = len(committed) == recorded.num_partitions and all(c.final for c in committed.values())
            same_map = dataclasses.replace(meta, partition_map=old.partition_map)
            check_resume(
                self.name, old, same_map, finished=finished, known_splits=self.catalog.known_splits()
            )
            new = PartitionMap(
                version=recorded.version + 1, bounds=self.map.bounds, requested=self.map.requested
            )
            self._repartition(recorded, new)
            recorded = new
        self.map = recorded
        return dataclasses.replace(meta, partition_map=recorded.to_json())

    def _repartition(self, old: PartitionMap, new: PartitionMap) -> None:
        """Re-split the committed state into ``new`` (``_internal/repartition.py``): the state files
        first, then one catalog transaction; the old map's files go with the fresh start's
        clean-up (``_repair_files``), as a crash before the transaction leaves the new ones."""
        t0 = time.perf_counter()
        commits = self.catalog.latest_commits()
        # Above every epoch the old map granted: its owners, zombies included, are fenced by the
        # new map's first grant, whatever partition number they held.
        epoch = max([0, *self.catalog.lease_epochs().values(), *(c.lease_epoch for c in commits.values())])
        records, nbytes = repartition.repartition(
            self.state_store,
            name=self.name,
            old=old,
            new=new,
            commits=commits,
            key=self.key,
            lease_epoch=epoch,
        )
        event = {
            "old_partitions": old.num_partitions,
            "new_partitions": new.num_partitions,
            "old_version": old.version,
            "new_version": new.version,
            "seconds": round(time.perf_counter() - t0, 6),
            "bytes_moved": nbytes,
            "state_rows": sum(r.state_rows for r in records),
        }
        self.catalog.record_repartition(
            records,
            partition_map=new.to_json(),
            # No owner: a restart of this actor before the first grant restores no ghost.
            leases=[(p, None, epoch) for p in range(new.num_partitions)],
            event=event,
        )
        logger.info("rayflow manager %s: repartitioned: %s", self.name, event)

    def _repair_files(self, restarted: bool) -> None:
        """What a crash left: recorded outputs still to publish (the maintenance loop publishes
        them), and, at a fresh start, files that no commit names (deleted).

        After a restart mid-run a consumer may be about to commit files the
        catalog does not name yet, so nothing is deleted then; the next fresh
        start collects what is left.
        """
        unpublished = self.catalog.unpublished_outputs()
        self._unpublished = dict.fromkeys(unpublished)
        if restarted:
            return
        self.publisher.delete_unrecorded(set(unpublished))
        live = self.catalog.all_state_files()
        for rel in self.state_store.list_files("state"):
            if rel not in live:
                self.state_store.delete(rel)

    async def _in_io(self, fn, *args):
        """Run the blocking ``fn(*args)`` on the I/O thread; the loop stays free meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._io, functools.partial(fn, *args))

    def _in_io_later(self, fn, *args) -> None:
        """Queue ``fn(*args)`` on the I/O thread without waiting (events: order kept, loss logged)."""
        if self._closed:
            return
        self._io.submit(fn, *args).add_done_callback(self._log_io_failure)

    def _log_io_failure(self, fut: Future) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            self._maintenance_failures += 1
            self._last_maintenance_error = f"{type(fut.exception()).__name__}: {fut.exception()}"
            logger.warning("rayflow manager %s: catalog write failed: %s", self.name, fut.exception())

    # ------------------------------------------------------------------ start
    async def ready(self) -> dict:
        """Committed positions and lease epochs per partition (for a (re)starting source)."""
        if self._init_error is not None:
            raise self._init_error
        self._ensure_loops()
        committed = self.group.committed
        return {
            "positions": {p: c.positions for p, c in committed.items()},
            "epochs": dict(self._durable),
            "map": self.map.to_json(),  # with its version (a re-split checkpoint's is above 1)
            "watermarks": {p: c.watermarks for p, c in committed.items()},  # for a drained stop
        }

    async def started_ms(self) -> int:
        """When the job first started reading (ms since the epoch), the same at every resume: a
        paced source schedules its rows from it (``Split.bind``). Recorded in the catalog the
        first time a source actor asks, i.e. as the first run starts reading (so its start-up
        is no backlog)."""
        if self._init_error is not None:
            raise self._init_error
        if self._started_ms is None:
            # Check-and-set on the one I/O thread: concurrent first calls agree.
            self._started_ms = await self._in_io(self.catalog.ensure_started_ms, int(time.time() * 1000))
        return self._started_ms

    async def add_splits(self, splits: dict[str, str | None]) -> dict[str, str | None]:
        """Record the splits a source actor is about to read (name -> ``Split.fingerprint``) as
        the catalog's known splits, before it serves any of their rows: a resume then knows every
        split the job has read. Idempotent.

        Returns the recorded fingerprint of each (the first one recorded for a name wins; None:
        none recorded). The caller compares: another fingerprint under a known name is another
        input reusing the name, whose rows must not be read on from the old one's positions.
        """
        if self._init_error is not None:
            raise self._init_error
        return await self._in_io(self.catalog.add_splits, dict(splits))

    def _ensure_loops(self) -> None:
        """Start the expiry and maintenance loops (inside the event loop; after a restart, on
        the first call, whichever it is)."""
        if not self._loops and self._init_error is None:
            loop = asyncio.get_running_loop()
            self._loops = [
                loop.create_task(self._expire_loop()),
                loop.create_task(self._maintain_loop()),
                loop.create_task(self._history_loop()),
            ]

    async def set_sources(self, sources: list) -> None:
        self.sources = sources
        for src in sources:
            src.set_epochs.remote(dict(self._durable))

    def _source_handles(self) -> list:
        """The source actors; after a restart of this actor, found again by name."""
        if not self.sources and self.source_names:
            try:
                self.sources = [ray.get_actor(n, namespace=naming.NAMESPACE) for n in self.source_names]
            except ValueError:
                return []
        return self.sources

    # ------------------------------------------------------------------ effects
    async def _apply(self, fx: Effects) -> None:
        """Carry out a lease decision (the caller holds ``_lock``): record its grants, then make
        them visible (sources' epochs, pokes); log its events and moves."""
        if fx.grants:
            self._grants_unrecorded += [(g.partition, g.owner, g.epoch) for g in fx.grants]
            await self._record_grants()
        self._note(fx)

    async def _record_grants(self) -> None:
        """Record the grants not yet in the catalog, then make them visible. If the write fails
        they stay withheld from heartbeats, and the maintenance loop retries."""
        grants, self._grants_unrecorded = self._grants_unrecorded, []
        if not grants:
            return
        try:
            await self._in_io(self.catalog.record_leases, grants)
        except Exception as e:  # retried by the maintenance loop; until then the grant is withheld
            self._grants_unrecorded = grants + self._grants_unrecorded
            self._maintenance_failed("recording lease grants", e)
            return
        for p, _, epoch in grants:
            self._durable[p] = max(self._durable.get(p, 0), epoch)
        for src in self._source_handles():
            src.set_epochs.remote({p: epoch for p, _, epoch in grants})
        for owner in {owner for _, owner, _ in grants}:
            h = self.handles.get(owner)
            if h is not None:
                h.poke.remote()

    def _note(self, fx: Effects) -> None:
        """The effects that need no waiting: wake members, keep moves, queue events."""
        granted = {g.owner for g in fx.grants}
        for member_id in fx.pokes - granted:  # grantees are poked once their grant is recorded
            h = self.handles.get(member_id)
            if h is not None:
                h.poke.remote()
        shift = time.time() - time.monotonic()  # the coordinator runs on monotonic time, the log on wall
        for move in fx.moves:
            move["at"] += shift
            self._moves.append(move)
            self._moves_total += 1
        if fx.events:
            self._in_io_later(self.catalog.record_events, list(fx.events))

    # ------------------------------------------------------------------ membership
    async def join(
        self, member_id: str, handle, claims: dict[int, int] | None = None
    ) -> tuple[int, set[int]]:
        """Admit a consumer; returns its member epoch and the claimed partitions it keeps."""
        self._ensure_loops()
        async with self._lock:
            epoch, kept, fx = self.group.join(member_id, time.monotonic(), claims)
            self.handles[member_id] = handle
            old = self.watches.pop(member_id, None)
            if old is not None:
                old.cancel()
            self.watches[member_id] = asyncio.get_running_loop().create_task(
                self._watch(member_id, epoch, handle)
            )
            await self._apply(fx)
        return epoch, kept

    async def activate(self) -> None:
        """First assignment, once the expected consumers have joined (no start-up churn)."""
        async with self._lock:
            await self._apply(self.group.drop_ghosts(time.monotonic()))
            await self._apply(self.group.activate(time.monotonic()))

    async def _watch(self, member_id: str, epoch: int, handle) -> None:
        """Ray fails this call within milliseconds of the member's death."""
        try:
            await handle.watch.remote()
            why = "leave"  # it returned: the member stopped (its leave() normally came first)
        except Exception as e:  # the call failed: the member is gone, which is handled below
            why = "crash"
            logger.debug("rayflow manager %s: watch of %s ended: %r", self.name, member_id, e)
        async with self._lock:
            m = self.group.members.get(member_id)
            if m is not None and m.epoch == epoch:
                await self._apply(self.group.member_gone(member_id, why, time.monotonic()))

    async def _expire_loop(self) -> None:
        next_metrics = 0.0
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            async with self._lock:
                await self._apply(self.group.expire(time.monotonic(), self.config.session_timeout_s))
            if not self._marked and not self._unbounded and self.group.done() and not self._unpublished:
                await self._mark_complete()
            if time.monotonic() >= next_metrics:
                next_metrics = time.monotonic() + METRICS_EVERY_S
                await self._publish_metrics()

    async def _mark_complete(self) -> None:
        """A bounded job is done and every output published: tell a next stage reading the sink
        (``Sink.mark_complete``) that no file will come any more. Retried by the loop on failure."""
        info = json.dumps({"pipeline": self.name, "marked_at": time.time()}).encode()
        try:
            await self._in_io(self.sink.mark_complete, self.publisher.store, info)
            self._marked = True
        except Exception as e:  # a sink that cannot be written now may be next time
            logger.warning("rayflow manager %s: marking the sink complete failed: %r", self.name, e)

    async def _publish_metrics(self) -> None:
        try:
            sources = await asyncio.wait_for(
                _gather(*(s.stats.remote() for s in self._source_handles())), METRICS_EVERY_S * 5
            )
            self.metrics.publish(await self.status(), list(sources))
        except Exception as e:  # metrics must never take the job down; a source may be restarting
            logger.debug("rayflow manager %s: metrics not published: %r", self.name, e)

    async def leave(self, member_id: str) -> None:
        watch = self.watches.pop(member_id, None)
        if watch is not None:
            watch.cancel()
        async with self._lock:
            await self._apply(self.group.member_gone(member_id, "leave", time.monotonic()))
        self.handles.pop(member_id, None)

    # ------------------------------------------------------------------ heartbeat
    async def heartbeat(
        self,
        member_id: str,
        member_epoch: int,
        processed: dict[int, int],
        firsts: dict[int, tuple[int, float]] | None = None,
        clocks: dict[int, dict] | None = None,
    ) -> dict:
        """The member's assignment (see :meth:`Coordinator.heartbeat`). Never waits for I/O or
        for the lock, and never hands out a grant the catalog does not hold yet. ``clocks``: per
        partition the member holds, its watermark and operator metrics (for :meth:`status`)."""
        self._ensure_loops()
        for p, info in (clocks or {}).items():
            self._clocks[p] = (member_id, info)
        reply, fx = self.group.heartbeat(
            member_id, member_epoch, time.monotonic(), processed, _to_mono(firsts)
        )
        if fx.grants:  # not made by heartbeats today; if ever, recorded before they show
            asyncio.get_running_loop().create_task(self._apply_locked(fx))
        else:
            self._note(fx)
        if "owned" in reply:
            hidden = {p for p, e in reply["owned"].items() if self._durable.get(p, 0) < e}
            if hidden:
                reply["owned"] = {p: e for p, e in reply["owned"].items() if p not in hidden}
                reply["commits"] = {p: c for p, c in reply["commits"].items() if p not in hidden}
                reply["revoke"] = [p for p in reply["revoke"] if p not in hidden]
        return reply

    async def _apply_locked(self, fx: Effects) -> None:
        async with self._lock:
            await self._apply(fx)

    async def release(self, member_id: str, partitions: dict[int, int]) -> None:
        """The member gives up revoked partitions (it has committed them)."""
        async with self._lock:
            await self._apply(self.group.release(member_id, partitions))

    # ------------------------------------------------------------------ commits
    async def commit(self, member_id: str, records: list[CommitRecord]) -> dict:
        """Validate, record and publish commits (see the module doc).

        Returns ``{"accepted": [partitions], "fenced": [partitions]}``; a repeat
        of the recorded commit is accepted (and its outputs published again,
        idempotently). Raises :class:`ProtocolError` (nothing recorded) for a
        record that breaks the protocol or names a missing file.
        """
        self._ensure_loops()
        t0 = time.perf_counter()
        fresh: list[CommitRecord] = []
        repeated: list[CommitRecord] = []
        fenced: list[int] = []
        async with self._lock:
            for rec in records:
                try:
                    repeat = self.group.check_commit(member_id, rec)  # fences first
                except FencedError:
                    # A stale owner (even one repeating a commit that did land): it reconciles, and
                    # deletes only files no commit row names (GroupManager.named).
                    fenced.append(rec.partition)
                    continue
                (repeated if repeat else fresh).append(rec)
            if fresh:
                try:
                    await self._in_io(self._record, member_id, fresh)
                except IndexBehindLog as e:
                    # In the durable log, so the commits happened: apply them and answer as
                    # recorded; the maintenance loop brings the local index up to the log.
                    self._index_behind = True
                    self._maintenance_failed("indexing logged commits", e)
                now = time.time()
                record_s = time.perf_counter() - t0  # steps 2-4, waiting for the lock included
                for rec in fresh:
                    self.group.apply_commit(rec)
                    self._unpublished.update(dict.fromkeys(rec.output_files))
                    self._commit_at[rec.partition] = now
                    self._commit_tally.add(
                        rec.partition,
                        rows=rec.rows_in,
                        nbytes=rec.nbytes,
                        write_s=rec.write_s,
                        record_s=record_s,
                    )
                self._fault("manager.after_record")
        # Step 5, outside the lock: publication changes no lease, and never fails a recorded commit.
        await self._publish([f for rec in fresh + repeated for f in rec.output_files])
        return {"accepted": [r.partition for r in fresh + repeated], "fenced": fenced}

    def _record(self, member_id: str, records: list[CommitRecord]) -> None:
        """Commit steps 2 (the files exist) to 4, on the I/O thread."""
        for rec in records:
            for f in rec.state_files:
                if not self.state_store.exists(f):
                    raise ProtocolError(
                        f"partition {rec.partition}: the commit of {member_id!r} names the state file "
                        f"{f}, which does not exist; nothing was recorded"
                    )
            for f in rec.output_files:
                if not self.publisher.pending_exists(f):
                    raise ProtocolError(
                        f"partition {rec.partition}: the commit of {member_id!r} names the output file "
                        f"{f}, which is not in the pending area; nothing was recorded"
                    )
        self._fault("manager.before_record")
        self.catalog.record_commits(member_id, records)

    async def recorded(self, partitions: list[int]) -> dict[int, CommitRecord | None]:
        """The latest recorded commit of each partition (None: none yet).

        A read for tools and tests; a consumer whose ``commit`` call failed uses
        :meth:`reconcile`, which also fences the attempt. It waits for a commit in
        flight (it takes the commit lock).
        """
        async with self._lock:
            return {p: self.group.committed.get(p) for p in partitions}

    async def reconcile(
        self, member_id: str, attempts: dict[int, int]
    ) -> dict[int, tuple[int | None, CommitRecord | None]]:
        """For a consumer whose commit call failed: fence the attempts, then say what landed.

        ``attempts``: partition -> the lease epoch the attempt was sent under.
        Each lease the member still holds under that epoch is renewed (epoch + 1,
        recorded before this answers), so the attempt, if it has not landed yet
        (a call Ray will retry after a restart of this actor), never will: the
        latest recorded commit returned is final. Returns, per partition, the
        member's new epoch (None: it no longer holds it) and that commit.
        """
        async with self._lock:
            epochs, fx = self.group.renew(member_id, attempts)
            await self._apply(fx)
            if any(e is not None and self._durable.get(p, 0) < e for p, e in epochs.items()):
                # Not durable: after a restart the old epoch would hold again. The caller retries.
                raise CheckpointError(
                    f"could not record the renewed leases of {member_id!r}: {self._last_maintenance_error}"
                )
            return {p: (epochs[p], self.group.committed.get(p)) for p in attempts}

    async def named(self, partition: int, files: list[str]) -> list[str]:
        """Which of ``files`` (state files, output names) a commit row of ``partition`` names.

        A consumer whose attempt's outcome is unknown (a newer owner has committed since)
        deletes only the files no row names. Under the commit lock, so no commit is in flight.
        """
        async with self._lock:
            named = await self._in_io(self.catalog.named_files, partition)
        return [f for f in files if f in named]

    def _fault(self, point: str) -> None:
        if self.faults is not None:
            self.faults.hit(point, "manager")

    # ------------------------------------------------------------------ publication
    async def _publish(self, files: list[str]) -> None:
        """Try to publish ``files`` once (on the I/O thread); failures are kept for a retry."""
        if not files:
            return
        try:
            done, failed, error = await self._in_io(self._publish_files, files)
        except Exception as e:  # the catalog update failed: all of them are tried again
            done, failed, error = [], files, e
        for f in done:
            self._unpublished.pop(f, None)
        self._unpublished.update(dict.fromkeys(failed))
        now = time.monotonic()
        if error is not None:
            self._publish_failures += 1
            self._publish_streak += 1
            self._last_publish_error = f"{type(error).__name__}: {error}"
            if self._publish_failing_since is None:
                self._publish_failing_since = now
            wait = min(PUBLISH_RETRY_MAX_S, PUBLISH_RETRY_INITIAL_S * 2 ** (self._publish_streak - 1))
            self._publish_retry_at = now + wait
            logger.warning(
                "rayflow manager %s: publishing failed (%d in a row, retry in %.1f s): %s",
                self.name, self._publish_streak, wait, self._last_publish_error,
            )  # fmt: skip
        elif not self._unpublished:
            self._publish_streak = 0
            self._publish_failing_since = None

    def _publish_files(self, files: list[str]) -> tuple[list[str], list[str], BaseException | None]:
        """On the I/O thread: publish each file, then record which are published."""
        done, failed, error = [], [], None
        for f in files:
            try:
                self.publisher.publish(f)
                done.append(f)
            except Exception as e:  # kept pending in the catalog; reported and retried by the manager
                failed.append(f)
                error = e
        self.catalog.set_published(done, failed)
        return done, failed, error

    def _publish_stuck(self) -> str | None:
        """Why the job must fail, if publication has kept failing past the commit limits."""
        since = self._publish_failing_since
        if since is None or self._publish_streak < self.config.commit_max_attempts:
            return None
        failing_s = time.monotonic() - since
        if failing_s < self.config.commit_max_failing_s:
            return None
        return (
            f"publishing committed outputs has failed {self._publish_streak} times in a row for "
            f"{failing_s:.0f} s ({len(self._unpublished)} outputs pending; the last error: "
            f"{self._last_publish_error}). The commits are recorded: fix the cause (the sink's "
            "storage or database) and run again to publish them."
        )

    # ------------------------------------------------------------------ maintenance
    async def _maintain_loop(self) -> None:
        """Retries publication (with backoff) and unrecorded grants; retires old state files;
        trims the catalog. Nothing here may stop the loop: failures are counted and logged."""
        next_retire = next_trim = next_tell = time.monotonic()
        while True:
            await asyncio.sleep(MAINTAIN_EVERY_S)
            now = time.monotonic()
            if self._grants_unrecorded:
                async with self._lock:
                    await self._record_grants()
            if self._index_behind:
                async with self._lock:
                    try:
                        await self._in_io(self.catalog.catch_up)
                        self._index_behind = False
                    except Exception as e:  # tried again at the next period
                        self._maintenance_failed("catching the index up with the log", e)
            if self._unpublished and now >= self._publish_retry_at:
                await self._publish(list(self._unpublished)[:PUBLISH_BATCH])
            if now >= next_retire:
                next_retire = now + RETIRE_EVERY_S
                await self._maintain("retiring state files", self._retire_old_state)
            if now >= next_trim:
                next_trim = now + TRIM_EVERY_S
                await self._maintain("trimming the catalog", self._trim)
            if (
                self.source is not None
                and now >= next_tell
                and (self._telling is None or self._telling.done())
            ):
                next_tell = now + SOURCE_COMMIT_EVERY_S
                low = self._committed_low()
                if low and low != self._told_source:
                    # On a thread of its own, never the I/O thread: a broker that is down can hold
                    # a Kafka offset commit for seconds, and commits must not wait behind it.
                    self._telling = asyncio.get_running_loop().create_task(self._tell_source(low))

    def _committed_low(self) -> dict[str, int]:
        """The lowest committed position of each split over all partitions (a partition without a
        commit of a split holds it at 0)."""
        committed = self.group.committed
        names = {s for c in committed.values() if c is not None for s in c.positions}
        if len(committed) < self.map.num_partitions:
            return {s: 0 for s in names}
        return {
            s: min((c.positions.get(s, 0) if c is not None else 0) for c in committed.values()) for s in names
        }

    async def _tell_source(self, low: dict[str, int]) -> None:
        """``Source.on_commit(low)``: informational (Kafka's group offsets); a failure is logged."""
        try:
            await asyncio.to_thread(self.source.on_commit, low)
            self._told_source = low
        except Exception as e:
            self._maintenance_failed("telling the source the committed positions", e)

    async def _maintain(self, what: str, fn) -> None:
        try:
            await self._in_io(fn)
        except Exception as e:  # retried at the next period
            if self._closed:  # the run is ending under a late tick: nothing failed
                return
            self._maintenance_failed(what, e)

    def _maintenance_failed(self, what: str, e: BaseException) -> None:
        self._maintenance_failures += 1
        self._last_maintenance_error = f"{what}: {type(e).__name__}: {e}"
        logger.warning("rayflow manager %s: %s", self.name, self._last_maintenance_error)

    def _retire_old_state(self) -> None:
        """Keep the state files of the last few commits per partition; delete older ones.

        The catalog rows are updated first (they stop naming the files), then the
        files go: a commit row never points at a missing file.
        """
        for f in self.catalog.retire_state_files(keep=STATE_FILES_KEPT):
            self.state_store.delete(f)

    def _trim(self) -> None:
        self.catalog.trim(keep_published_outputs=self.sink.keeps_output_list)
        self.catalog.trim_history(retention_s=self.config.history_retention_s)
        self.catalog.compact_log()

    # ------------------------------------------------------------------ history
    async def _history_loop(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:  # a sample at once: the history starts with the run (or this actor's restart)
            await self._sample_history(HISTORY_WAIT_S)
            # On a fixed cadence (due + k * interval), not an interval after each sample: no drift.
            due = history.next_tick(due, self.config.history_interval_s, loop.time())
            await asyncio.sleep(due - loop.time())

    async def _sample_history(self, wait_s: float) -> None:
        """Take one history sample and queue its insert (see the module doc). Never raises."""
        try:
            sources, consumers = await _gather(self._ask_sources(wait_s), self._ask_consumers(wait_s))
            t0 = time.thread_time()  # this thread's CPU: status() does not suspend (unless it marks the sink)
            st = await self.status()
            if sources is not None:
                for part in st["partitions"]:
                    part.setdefault("queued_rows", sum(s["queued_rows"][part["partition"]] for s in sources))
                add_lag(st, sources, wall=time.time())
            ts = datetime.now(timezone.utc).replace(tzinfo=None)  # naive UTC, as all catalog times
            parts = history.partition_rows(st, sources, self._commit_tally.take(), ts=ts)
            skew_rows, hot_rows = skew.history_rows(st, ts=ts) if sources is not None else ([], [])
            clocks = {m: c for m, c in self._consumer_clocks.items() if m in self.handles}
            rows, self._consumer_clocks = history.consumer_rows(
                consumers, clocks, ts=ts, now=time.monotonic()
            )
            loop_s = time.thread_time() - t0
            write_s, write_cpu_s = await self._in_io(
                self._record_history, parts, rows, {"history_skew": skew_rows, "history_hot_keys": hot_rows}
            )
        except Exception as e:  # history must never take the job down
            if not self._closed:
                self._maintenance_failed("sampling the history", e)
            return
        cost = self._history_cost
        cost["samples"] += 1
        cost["loop_s"] += loop_s
        cost["write_s"] += write_s
        cost["write_cpu_s"] += write_cpu_s
        cost["last_loop_s"], cost["last_write_s"] = loop_s, write_s

    def _record_history(
        self, parts: list[tuple], rows: list[tuple], others: dict[str, list[tuple]] | None = None
    ) -> tuple[float, float]:
        """On the I/O thread: the insert; returns the seconds it took (wall, this thread's CPU)."""
        t0, c0 = time.perf_counter(), time.thread_time()
        self.catalog.record_history(parts, rows, others=others)
        return time.perf_counter() - t0, time.thread_time() - c0

    async def _ask_sources(self, wait_s: float) -> list[dict] | None:
        """Every source actor's stats; None unless all answered within ``wait_s``."""
        handles = self._source_handles()
        answers = await _gather(
            *(asyncio.wait_for(s.stats.remote(), wait_s) for s in handles), return_exceptions=True
        )
        if not handles or any(not isinstance(a, dict) for a in answers):
            return None
        return list(answers)

    async def _ask_consumers(self, wait_s: float) -> dict[str, dict]:
        """The status of each member that answered within ``wait_s`` (others are skipped)."""
        members = list(self.handles.items())
        answers = await _gather(
            *(asyncio.wait_for(h.status.remote(), wait_s) for _, h in members), return_exceptions=True
        )
        return {m: a for (m, _), a in zip(members, answers) if isinstance(a, dict)}

    # ------------------------------------------------------------------ status
    async def status(self) -> dict:
        """The group as plain data, from memory (no I/O).

        ``done``: every partition's final commit is recorded *and* every
        recorded output is published (and, for a bounded job, the sink marked
        complete: the one write here). ``failed``: None, or why the job cannot
        finish (publication keeps failing), for the driver to raise.
        """
        g = self.group
        done = g.done() and not self._unpublished
        if done and not self._unbounded and not self._marked:
            await self._mark_complete()  # before the driver sees done and ends the run
            done = self._marked
        parts = []
        now = time.time()
        for p in range(self.map.num_partitions):
            lease = g.leases.leases[p]
            c = g.committed.get(p)
            live = 0
            if lease.owner in g.members:
                live = g.members[lease.owner].processed.get(p, 0)
            parts.append(
                {
                    **self._clock_of(p, lease.owner, c, now),
                    "partition": p,
                    "owner": lease.owner,
                    "lease_epoch": lease.epoch,
                    "state": lease.state.value,
                    "committed_rows": c.rows_total if c else 0,
                    "processed_rows": max(live, c.rows_total if c else 0),
                    "final": bool(c and c.final),
                    "load_rows_per_s": g.load.get(p, 0.0),
                    # Wall time (s since the epoch) of the latest recorded commit; None: never.
                    "last_commit_at": self._commit_at.get(p),
                    # Its priority tier (docs/tiers.md): "default" unless an rf.Tier names it.
                    "tier": self.tiers.name_of(p) if self.tiers is not None else "default",
                }
            )
        live = [x for x in parts if x["event_time_lag_s"] is not None]
        totals: dict[str, int] = {}
        for x in parts:
            for k, v in x["operators"].items():
                totals[k] = totals.get(k, 0) + v
        return {
            "partitions": parts,
            # The slowest partition's watermark and its event-time lag; None: no event time yet.
            "watermark_ms": min((x["watermark_ms"] for x in live), default=None),
            "event_time_lag_s": max((x["event_time_lag_s"] for x in live), default=None),
            "operators": totals,
            "members": sorted(g.members),
            # Restored from the catalog after a restart of this actor, not yet re-joined.
            "ghosts": sorted(m.id for m in g.members.values() if m.ghost),
            # Members dedicated to a tier (docs/tiers.md) -> its name; the others are shared.
            "dedicated": {m: self.tiers.names[r] for m, r in sorted(g.roles.items())} if self.tiers else {},
            "done": done,
            "failed": self._publish_stuck(),
            "rebalances": g.rebalances,
            "recoveries": g.recoveries,
            "publish_pending": len(self._unpublished),
            "publish_failures": self._publish_failures,
            "last_publish_error": self._last_publish_error,
            "maintenance_failures": self._maintenance_failures,
            # For readers in another process (rayflow status: when a partition counts as stalled).
            "checkpoint_interval_s": self.config.checkpoint_interval_s,
            "last_maintenance_error": self._last_maintenance_error,
            # History samples taken by this actor, and their cost (seconds, see _history_cost).
            "history": dict(self._history_cost),
        }

    def _clock_of(self, p: int, owner: str | None, c, now: float) -> dict:
        """A partition's watermark (``watermark_ms``: None before any), event-time lag
        (``event_time_lag_s``) and operator metrics (``operators``): from its owner's last
        heartbeat, else from its latest commit (watermark only)."""
        member, info = self._clocks.get(p, (None, {}))
        if member != owner:
            info = {}
        wm = info.get("watermark_ms")
        if wm is None and c is not None and c.watermarks:
            wm = c.watermarks.get("partition")
        if wm in (None, WATERMARK_NONE):
            return {"watermark_ms": None, "event_time_lag_s": None, "operators": info.get("operators", {})}
        return {
            "watermark_ms": wm,
            "event_time_lag_s": lag_s(wm, now),
            "operators": info.get("operators", {}),
        }

    async def record_event(self, kind: str, detail: dict) -> None:
        """Record an event of the driver's (an ``autoscale`` decision) in the catalog's events
        table; queued on the I/O thread behind the group's own events (order kept)."""
        self._in_io_later(self.catalog.record_events, [(kind, dict(detail))])

    async def moves_since(self, index: int = 0) -> list[dict]:
        """Completed partition moves (with their pause), from the ``index``-th on (counting
        from the start of this manager; only the last ``MOVES_KEPT`` are kept)."""
        first = self._moves_total - len(self._moves)
        return list(self._moves)[max(0, index - first) :]

    async def query(self, sql: str):
        """Read-only ``sql`` over the sink's published output, as an Arrow table (``Run.query``,
        ``rayflow sql --pipeline``). This actor holds the sink (DuckDB allows one writer process),
        so readers come here. On a query thread of its own, never the I/O thread, so a long query
        delays no commit: DuckDB gives it a snapshot of whole publications (each is one
        transaction). Queries run one at a time."""
        if self._init_error is not None:
            raise self._init_error
        if self._query_pool is None:
            self._query_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayflow-query")
        return await asyncio.get_running_loop().run_in_executor(self._query_pool, self.publisher.query, sql)

    async def output_files(self) -> list[str]:
        """The recorded output files, in commit order (all of them for a sink that keeps its
        list, such as Collect; recent and unpublished ones otherwise)."""
        return await self._in_io(self.catalog.output_files)

    async def close(self) -> None:
        telling = [self._telling] if getattr(self, "_telling", None) is not None else []
        ran = bool(self._loops)
        for task in self._loops + list(self.watches.values()) + telling:
            task.cancel()
        self._loops = []
        if self._closed:
            return
        if ran:  # the run's last sample: what happened since the previous one (its last commits)
            await self._sample_history(HISTORY_FINAL_WAIT_S)
        self._closed = True
        await self._in_io(self._close_io)  # after the queued event writes: the thread is FIFO
        self._io.shutdown(wait=False)
        if getattr(self, "_query_pool", None) is not None:
            self._query_pool.shutdown(wait=False)

    def _close_source(self) -> None:
        try:
            self.source.close()
        except Exception as e:  # only informational clients: never fail a close over them
            logger.warning("rayflow manager %s: closing the source failed: %s", self.name, e)

    def _close_io(self) -> None:
        if getattr(self, "source", None) is not None:
            # On a daemon thread, not waited for: closing a Kafka client waits for an offset
            # commit in flight, which a broker that is down holds for ~45 s, and stopping a job
            # must not (the offsets are informational; the catalog has the positions).
            threading.Thread(target=self._close_source, name="rayflow-source-close", daemon=True).start()
        for part in ("catalog", "publisher"):
            if hasattr(self, part):
                getattr(self, part).close()


def _kept_split_map(recorded: PartitionMap, asked: PartitionMap) -> bool:
    """Does a resume keep the checkpoint's map that runtime splits made (``_internal/splits.py``)?
    Yes when the run asks for the uniform map of the count the splits started from (the same
    ``partitions=`` as before): the splits stand. Another count re-splits the checkpoint into
    that count's uniform map, as any change of the partition count does."""
    return (
        recorded.requested is not None
        and asked.requested is None
        and asked.bounds == PartitionMap.uniform(recorded.requested).bounds
    )


def _gather(*aws, return_exceptions: bool = False) -> asyncio.Future:
    """``asyncio.gather``, whose outcome is always retrieved: when the task awaiting it is
    cancelled (``close`` cancelling the loops mid-sample), the gather ends with
    ``CancelledError`` that nobody reads (``asyncio.wait_for`` cancels it and does not read it),
    and asyncio would log "_GatheringFuture exception was never retrieved"."""
    fut = asyncio.gather(*aws, return_exceptions=return_exceptions)
    fut.add_done_callback(_retrieve)
    return fut


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()  # marks it retrieved; the awaiting task, if any, still gets it


def _to_mono(firsts: dict[int, tuple[int, float]] | None) -> dict[int, tuple[int, float]] | None:
    """Members report wall times (comparable across processes); the coordinator runs on monotonic."""
    if not firsts:
        return firsts
    shift = time.monotonic() - time.time()
    return {p: (e, ts + shift) for p, (e, ts) in firsts.items()}
