"""The ConsumerActor: a thin async shell over :mod:`partition_task` and :mod:`checkpoint.commit`.

Two tasks run on the actor's event loop:

- **Heartbeat** (:meth:`ConsumerActor._heartbeat_loop`): every
  ``heartbeat_interval_s`` (or at once when the manager pokes), it tells the
  manager it is alive and takes the answer: the partitions it owns, the ones
  to give up. It never waits for processing, so a slow operator can never get
  the consumer's session expired (Kafka's ``max.poll.interval.ms`` problem).
  It only *records* the answer; the processing loop applies it.
- **Processing** (:meth:`ConsumerActor._loop`), one step at a time: apply the
  latest assignment (load granted partitions, commit and release revoked
  ones, drop lost ones), fetch from every source (one call per source for all
  owned partitions), process buffered batches in a worker thread for at most
  ``step_max_s`` (the fetch size adapts to the measured cost per byte), then
  commit the partitions whose commit is due (:func:`partition_task.commit_due`).
  So a revocation, a commit or a stop is never more than a step away.

Commits follow the numbered protocol of :mod:`rayflow._internal.checkpoint.commit`.
Operators that emit changes (an ``Aggregate`` over an unbounded input) are
flushed right before a commit is written, on every path that writes one (a
due commit, a revocation, ``stop()``), and their output is staged with it
(:meth:`partition_task.PartitionTask.changes_flushed`): never recomputed when
the attempt fails and is retried, never lost when it is reconciled.
A failed commit call is reconciled with the catalog before anything is written
again, retried with capped exponential backoff, and fails the job
(:class:`PipelineFailedError`, naming the cause) once it has failed
``commit_max_attempts`` times in a row or for ``commit_max_failing_s``.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import psutil
import pyarrow as pa
import ray

from rayflow._internal import partition_task as pt
from rayflow._internal import runs as rn
from rayflow._internal import tiers
from rayflow._internal.chain import Chain
from rayflow._internal.checkpoint import commit as cm
from rayflow._internal.checkpoint.commit import CommitRecord
from rayflow._internal.checkpoint.store import Store
from rayflow._internal.combine import input_rows
from rayflow._internal.metrics import ConsumerMetrics
from rayflow._internal.watermarks import WATERMARK_NONE, EventTime
from rayflow.config import EngineConfig
from rayflow.errors import CheckpointError, PipelineFailedError, RayflowError

_GET_TIMEOUT_S = 120.0
#: Smallest fetch budget per step: below this Ray's per-call cost dominates.
_MIN_FETCH_BYTES = 256 * 1024
#: Fetch budget of the first step, before any cost is measured: small, so that even a very
#: slow operator's first step stays short; the budget adapts from the second step on.
_FIRST_STEP_BYTES = 1024 * 1024
#: Weight of the newest step in the cost-per-byte average.
_COST_ALPHA = 0.3


@ray.remote
class ConsumerActor:
    #: Each partition's tier rank (set by ``__init__``; a class default for shells built without it).
    tier_ranks: tuple[int, ...] | None = None

    def __init__(
        self,
        *,
        pipeline: str,
        member_id: str,
        manager,
        sources: list,
        chain: Chain,
        key: list[str],
        state_root: str,
        sink_root: str,
        map_version: int,
        config: EngineConfig,
        faults=None,
        unbounded: bool = False,
        side_roots: dict[str, str] | None = None,
        num_sources: int = 1,
        event_time: EventTime | None = None,
        tier_ranks: tuple[int, ...] | None = None,
    ):
        """``unbounded``: the source never ends (``Source.unbounded``): an ``Aggregate(emit=None)``
        then emits its changes at each commit (``Chain.for_input``). ``side_roots``: where the
        chain's side streams go (``Chain.side_sinks``). ``event_time``: the job's event-time
        column and watermark strategy (the partitions' watermarks are kept and committed).
        ``tier_ranks``: each partition's priority rank (0: most critical, docs/tiers.md): a step
        serves and fetches for the higher tiers first (``tiers.step_order``, ``tiers.fetch_shares``)."""
        self.member_id = member_id
        self.metrics = ConsumerMetrics(pipeline, member_id)
        self.faults = faults
        self.manager = manager
        self.sources = sources
        self.chain = chain.for_input(unbounded=unbounded)
        self.key = key
        self.state_store = Store(state_root)
        self.sink_store = Store(sink_root)
        self.side_stores = {stream: Store(root) for stream, root in (side_roots or {}).items()}
        self.num_sources = num_sources
        self.event_time = event_time
        self.tier_ranks = tier_ranks
        self.map_version = map_version
        self.config = config
        self.owned: dict[int, pt.PartitionTask] = {}
        self.member_epoch = 0
        self.busy_s = 0.0
        self.steps = 0  # processing steps run (each bounded by the step's time budget)
        self.rows_processed = 0
        # Commit work: seconds in commits (step 1 to 6, the processing loop waits meanwhile),
        # state files written whole (bases) and as deltas, compactions named by a commit.
        self.commit_s = 0.0
        self.state_bases = 0
        self.state_deltas = 0
        self.compactions = 0
        # Commit failures: consecutive count, since when, next attempt not before, last cause.
        self.commit_failures = 0
        self._failing_since: float | None = None
        self._retry_at = 0.0
        self.last_commit_error: str | None = None
        self._last_commit = time.monotonic()
        # Attempts whose commit call failed and that are not reconciled yet.
        self._unsettled: list[CommitRecord] = []
        self._cost_per_byte_s = 0.0  # measured processing cost, for the step's time bound
        self._rr = 0  # round-robin start of the next step, so every partition progresses
        # Heartbeat -> processing loop: the latest assignment and its sequence number.
        self._assignment: dict | None = None
        self._hb_seq = 0
        self._released: dict[int, tuple[int, int]] = {}  # partition -> (epoch, hb seq at release)
        # partition -> the highest lease epoch a reconciliation fenced (renewed or moved past): an
        # answer granting it again under that epoch or an older one predates the renewal, and
        # must not bring back a second owner of (partition, epoch), which output names and
        # discard rely on never existing.
        self._fenced_upto: dict[int, int] = {}
        self._kept: set[int] | None = None  # after a re-join: the claims the manager confirmed
        self._firsts: dict[int, tuple[int, float]] = {}
        self._stopping = False
        self._stopped = asyncio.Event()
        self._poke = asyncio.Event()  # heartbeat now (the manager calls poke on a grant or revoke)
        self._wake = asyncio.Event()  # the processing loop has news (an assignment, a stop)
        self._task: asyncio.Task | None = None
        self._hb_task: asyncio.Task | None = None
        self._error: BaseException | None = None
        # Background compactions of state chains, per (partition, operator index): one thread, so
        # a compaction never takes more than one core from processing.
        self._compactor = ThreadPoolExecutor(1, thread_name_prefix="rayflow-compact")
        self._compactions: dict[tuple[int, int], _Compaction] = {}
        # State past ``consumer_max_bytes`` goes to runs under this directory (``_bind_states``),
        # this process's own; what dead consumers (of any job) of this node left beside it is garbage.
        spill_base = config.spill_dir or tempfile.gettempdir()
        self._spill_root = os.path.join(spill_base, rn.spill_dir_name(pipeline, member_id, os.getpid()))
        rn.wipe_dead(spill_base, alive=psutil.pid_exists)

    # ------------------------------------------------------------------ control
    async def start(self, *, map_version: int | None = None) -> None:
        """Join the group and start processing. ``map_version``: the partition map's version as
        the manager found it in the checkpoint, when this actor was created before (its commits
        record it)."""
        if map_version is not None:
            self.map_version = map_version
        me = ray.get_runtime_context().current_actor
        self.member_epoch, _ = await _call(
            self.manager.join.remote(self.member_id, me, {}), self.config.call_timeout_s
        )
        loop = asyncio.get_running_loop()
        self._hb_task = loop.create_task(self._heartbeat_loop())
        self._task = loop.create_task(self._loop())

    async def poke(self) -> None:
        """Heartbeat now instead of waiting for the period (the manager calls this)."""
        self._poke.set()

    async def watch(self) -> None:
        """Never returns while the actor lives: the manager's liveness watch."""
        await self._stopped.wait()

    async def wipe_spill(self) -> None:
        """The run is torn down and this process is about to be killed: delete its runs on local
        disk now (a kill runs no cleanup). Nothing reads them again."""
        rn.wipe(self._spill_root)

    async def stop(self) -> None:
        """Graceful stop: finish the current step, commit everything, leave the group."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await self._task
            except BaseException:  # kept in self._error; status() reports it
                pass
        if self._error is None:
            self._retry_at = 0.0
            await self._commit([t for t in self.owned.values() if t.needs_commit])
        if self._hb_task is not None:
            self._hb_task.cancel()
        for p, t in list(self.owned.items()):
            self._drop_compactions(p)
            if t.state_share:
                self._release_states(t)
        rn.wipe(self._spill_root)
        self._compactor.shutdown(wait=False, cancel_futures=True)
        try:
            await _call(self.manager.leave.remote(self.member_id), self.config.call_timeout_s)
        except (Exception, ray.exceptions.RayError) as e:  # it sees us gone through its watch anyway
            self.last_commit_error = f"leave: {type(e).__name__}: {e}"
        self.owned.clear()
        self._stopped.set()

    async def status(self) -> dict:
        if self._error is not None:
            raise self._error
        owned = dict(self.owned)
        return {
            "member": self.member_id,
            "pid": os.getpid(),
            "rss_bytes": psutil.Process().memory_info().rss,
            "watermarks": {p: t.clock.applied for p, t in owned.items() if t.clock is not None},
            "partitions": {p: t.epoch for p, t in owned.items()},
            "phases": {p: t.phase.value for p, t in owned.items()},
            "rows_processed": self.rows_processed,
            "busy_s": self.busy_s,
            "steps": self.steps,
            "commit_failures": self.commit_failures,
            "last_commit_error": self.last_commit_error,
            "commit_s": self.commit_s,
            "state_bases": self.state_bases,
            "state_deltas": self.state_deltas,
            "compactions": self.compactions,
            **self._state_bytes(owned),
        }

    def _state_bytes(self, owned: dict[int, pt.PartitionTask]) -> dict[str, int]:
        """``state_bytes``: operator state in memory; ``state_spilled_bytes``: in runs on disk.
        Read while the worker thread may change a state: a state caught mid-change is skipped
        (a figure of the moment; status must never fail for it)."""
        mem = disk = 0
        for t in owned.values():
            for i in self.chain.stateful_indices:
                try:
                    m, d = self.chain.ops[i].state_nbytes(t.states[i])
                except RuntimeError:  # a dict or list of the state changed size meanwhile
                    continue
                mem, disk = mem + m, disk + d
        return {"state_bytes": mem, "state_spilled_bytes": disk}

    # ------------------------------------------------------------------ heartbeat task
    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._poke.wait(), self.config.heartbeat_interval_s)
            except asyncio.TimeoutError:
                pass
            self._poke.clear()
            try:
                await self._heartbeat()
            except (ray.exceptions.RayActorError, asyncio.TimeoutError):
                continue  # the manager is restarting or busy; the next beat reaches it
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # a bug: fail the consumer loudly rather than go silent
                self._error = e
                self._wake.set()
                raise

    async def _heartbeat(self) -> None:
        firsts, self._firsts = self._firsts, {}
        self._hb_seq += 1
        seq = self._hb_seq
        owned = list(self.owned.items())
        processed = {p: t.rows_total for p, t in owned}
        clocks = self._clocks(owned) if self.event_time is not None or self.chain.stateful_indices else None
        reply = await _call(
            self.manager.heartbeat.remote(self.member_id, self.member_epoch, processed, firsts, clocks),
            self.config.call_timeout_s,
        )
        if reply.get("rejoin"):
            # The manager no longer knows this session: it restarted (then it gives back the
            # leases it can confirm), or it expired us (then everything moved on).
            me = ray.get_runtime_context().current_actor
            claims = {p: t.epoch for p, t in list(self.owned.items())}
            self.member_epoch, kept = await _call(
                self.manager.join.remote(self.member_id, me, claims), self.config.call_timeout_s
            )
            # Answers from the old session are void: applying one after the re-join would grant
            # partitions that moved on, from commits whose state files may be retired since.
            self._assignment = None
            self._kept = set(kept)
        else:
            self._assignment = {**reply, "seq": seq}
        self._wake.set()

    def _clocks(self, owned: list[tuple[int, pt.PartitionTask]]) -> dict[int, dict]:
        """Per owned partition: its watermark (a job with event time) and its operators' metrics
        (``Operator.metrics``: late rows, open windows, state rows), for the manager's status."""
        out = {}
        for p, t in owned:
            info: dict = {"operators": self.chain.metrics(t.states)}
            if t.clock is not None:
                info["watermark_ms"] = t.clock.applied
            out[p] = info
        return out

    def _apply_assignment(self) -> tuple[dict[int, int], dict, list[int]]:
        """Apply the heartbeat's news: drop what we lost. Returns (new grants, their commits, revokes)."""
        if self._kept is not None:
            kept, self._kept = self._kept, None
            for p in [p for p in self.owned if p not in kept]:
                self._forget(p)  # moved on while we were away: its uncommitted state goes
        a, self._assignment = self._assignment, None
        if a is None:
            return {}, {}, []
        owned: dict[int, int] = a["owned"]
        # Lost (moved while we were presumed dead): uncommitted state goes. An answer listing an
        # older epoch than ours predates a renewal of ours (reconcile): stale, not a loss.
        for p in [p for p, t in self.owned.items() if p not in owned or owned[p] > t.epoch]:
            self._forget(p)
        new = {}
        for p, e in owned.items():
            if p in self.owned:
                continue
            rel = self._released.get(p)
            if rel is not None and rel[0] == e and a["seq"] <= rel[1]:
                continue  # an answer from before our release: not a grant
            if e <= self._fenced_upto.get(p, 0):
                continue  # an answer from before a renewal that fenced this epoch: not a grant
            new[p] = e
        return new, a["commits"], [p for p in a["revoke"] if p in self.owned]

    # ------------------------------------------------------------------ processing loop
    async def _loop(self) -> None:
        try:
            while not self._stopping:
                if self._unsettled and not await self._settle_first():
                    continue
                new, commits, revoke = self._apply_assignment()
                if new:
                    self.owned.update(await asyncio.to_thread(self._load, new, commits))
                if revoke:
                    await self._give_up(revoke)
                running = [t for t in self.owned.values() if t.running]
                self._release_final()
                if not running and not any(t.needs_commit for t in self.owned.values()):
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), self.config.heartbeat_interval_s)
                    except asyncio.TimeoutError:
                        pass
                    continue
                if running:
                    await self._fetch(running)
                    if any(t.buffer or t.watermark_due for t in running):
                        await self._process_step(running)
                    for t in running:
                        if t.running and t.input_ended(len(self.sources)):
                            # End of input: stateful operators emit now. Staged until committed,
                            # and never computed twice, even if the commit must be retried.
                            version = t.next_version()  # used by operators that emit changes
                            t.input_finished(
                                await asyncio.to_thread(
                                    self.chain.finish, t.states, version=version, partition=t.partition
                                )
                            )
                now = time.monotonic()
                due = [
                    t
                    for t in self.owned.values()
                    if pt.commit_due(
                        t,
                        now=now,
                        last_commit=self._last_commit,
                        interval_s=self.config.checkpoint_interval_s,
                        retry_at=self._retry_at,
                    )
                ]
                if due:
                    await self._commit(due)
                elif not running:
                    # Only failed commits wait (backoff): sleep until the retry, or news.
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), max(0.01, min(self._retry_at - now, 1.0)))
                    except asyncio.TimeoutError:
                        pass
        except BaseException as e:
            self._error = e
            raise

    async def _settle_first(self) -> bool:
        """An earlier commit's outcome is unknown: learn it before staging anything new.

        Processing on would stage outputs that a late-landing attempt does not
        cover, and that its reconciliation could then not tell apart (DESIGN §5).
        Retried with the commit backoff; counts as a failed commit attempt.
        """
        now = time.monotonic()
        if now < self._retry_at:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), min(self._retry_at - now, 1.0))
            except asyncio.TimeoutError:
                pass
            return False
        if await self._reconcile():
            return True
        self._failed(_outcome_unknown(), True)
        return False

    async def _fetch(self, running: list[pt.PartitionTask]) -> None:
        """One fetch call per source for the partitions with nothing buffered."""
        budget = self._step_bytes()
        calls = []
        for i, src in enumerate(self.sources):
            req = {t.partition: (t.epoch, dict(t.positions)) for t in running if t.wants_fetch(i)}
            if req:
                if self.tier_ranks is None:
                    share: int | dict[int, int] = max(1, budget // len(req))
                else:  # higher tiers take a larger share of the step's bytes
                    share = tiers.fetch_shares(budget, list(req), self.tier_ranks)
                calls.append((i, _call(src.fetch.remote(req, share), self.config.call_timeout_s)))
        if not calls:
            return
        replies = await asyncio.gather(*(c for _, c in calls), return_exceptions=True)
        got: list[tuple[int, int, object]] = []
        for (i, _), reply in zip(calls, replies):
            if isinstance(reply, (ray.exceptions.RayActorError, asyncio.TimeoutError)):
                continue  # that source is restarting (or stuck): ask again next step
            if isinstance(reply, BaseException):
                # A source failed (bad input, a broken split): its own error, not Ray's wrapper.
                cause = getattr(reply, "cause", None)
                raise cause if isinstance(cause, RayflowError) else reply
            got += [(i, p, res) for p, res in reply.items()]
        refs = [e.ref for _, _, res in got for e in res.entries]
        try:
            # Zero-copy reads from the object store, awaited on the loop (a blocking
            # ray.get in an async actor would stall the heartbeat and control calls).
            batches = iter(await asyncio.wait_for(asyncio.gather(*refs), _GET_TIMEOUT_S) if refs else [])
        except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError):
            # The source died with these batches; its restart serves them again.
            await asyncio.sleep(self.config.fetch_wait_s)
            return
        for i, p, res in got:
            entries = [(e, next(batches)) for e in res.entries]
            t = self.owned.get(p)
            if t is None:
                continue
            t.fetch_applied(
                pt.Fetched(
                    source=i,
                    entries=entries,
                    frontier=res.frontier,
                    end=res.end,
                    full=res.full,
                    fenced=res.fenced is not None,
                    watermarks=res.watermarks,
                    idle=res.idle,
                )
            )
            if t.phase is pt.Phase.FENCED:
                self._forget(p)
            elif res.full and not res.entries and t.phase is pt.Phase.CLEAN:
                # The source's queue is full of rows we have committed, yet no trim of ours
                # reached them (they were queued again after it): trim again, or it waits for ever.
                self.sources[i].trim.remote({p: (t.epoch, dict(t.committed_positions))})

    @property
    def _step_s(self) -> float:
        """A step's time budget: ``step_max_s``, and at most half the checkpoint interval."""
        return min(self.config.step_max_s, self.config.checkpoint_interval_s / 2)

    def _step_bytes(self) -> int:
        """Bytes to fetch for one step: what the measured cost processes in the step's budget."""
        if self._cost_per_byte_s <= 0:  # nothing measured yet: start small, then adapt
            return min(self.config.fetch_max_bytes, _FIRST_STEP_BYTES)
        fit = int(self._step_s / self._cost_per_byte_s)
        return max(_MIN_FETCH_BYTES, min(self.config.fetch_max_bytes, fit))

    async def _process_step(self, running: list[pt.PartitionTask]) -> None:
        t0 = time.monotonic()
        nbytes, rows = await asyncio.to_thread(self._process, running)
        took = time.monotonic() - t0
        self.busy_s += took
        self.steps += 1
        if nbytes:
            cost = took / nbytes
            prev = self._cost_per_byte_s
            # A cheaper step is believed at once (the first steps pay one-off warm-up costs that
            # would otherwise keep the budget small for many steps); a dearer one is smoothed.
            self._cost_per_byte_s = (
                cost if prev <= 0 or cost < prev else _COST_ALPHA * cost + (1 - _COST_ALPHA) * prev
            )
        self.metrics.observe(took, rows)

    def _process(self, running: list[pt.PartitionTask]) -> tuple[int, int]:
        """Worker thread: run the chain over buffered batches, round-robin, within the step's budget.

        Only mutates the tasks (never ``self.owned``): the event loop may apply
        an assignment meanwhile, and a task dropped there is simply not committed.
        """
        t0 = time.monotonic()
        budget = self._step_s
        nbytes = rows = 0
        owned = self._processing()  # once per step, not per partition
        for t in running:  # the partitions owned changed: a new share of the memory budget
            self._bind_states(t, owned=owned)
        n = len(running)
        self._rr = (self._rr + 1) % max(1, n)
        # Most critical tier first (round-robin within a tier): the step's budget runs out on the
        # lowest tier, which is how a busy consumer throttles it (docs/tiers.md).
        by_partition = {t.partition: t for t in running}
        for p in tiers.step_order(list(by_partition), self.tier_ranks, self._rr):
            t = by_partition[p]
            if not t.running:
                continue
            if not t.buffer:
                if t.watermark_due:  # no rows, yet event time moved (an idle split skipped)
                    self._advance(t)
                continue
            left = budget - (time.monotonic() - t0)
            if left <= 0 and nbytes:
                break
            taken = t.take(max(left, 0.0), self._cost_per_byte_s)
            t.check_contiguous([e for e, _ in taken])
            if not t.first_done:  # the end of this partition's pause, if it just moved here
                t.first_done = True
                self._firsts[t.partition] = (t.epoch, time.time())
            for group in _by_watermark(taken) if t.clock is not None else [taken]:
                entries = [e for e, _ in group]
                table = pa.Table.from_batches([b for _, b in group])
                outputs = self.chain.process(t.states, table, partition=t.partition)
                t.batch_processed(entries, outputs, input_rows(table))  # a combined row: its input rows
                if t.clock is not None:
                    self._advance(t)
                nbytes += table.nbytes
                rows += input_rows(table)
        self.rows_processed += rows
        self._fault("consumer.step")  # in this thread: a "pause" holds the work, not the heartbeat
        return nbytes, rows

    def _advance(self, t: pt.PartitionTask) -> None:
        """Worker thread: advance the operators to the partition's watermark (after every batch,
        so an operator may also emit what the batch changed) and stage what they emit."""
        target = t.watermark_target
        outputs = self.chain.advance(t.states, target, version=t.next_version(), partition=t.partition)
        t.watermark_advanced(target, outputs)

    def _load(
        self, new: dict[int, int], commits: dict[int, CommitRecord | None]
    ) -> dict[int, pt.PartitionTask]:
        """Worker thread: restore newly granted partitions from their last commits.

        With event time, the operators are advanced to the committed watermark
        at once: they emit nothing (the commit's outputs hold all they emitted
        up to it, ``Operator.on_watermark``) and learn where event time stands.
        """
        out = {}
        for p, epoch in new.items():
            c = commits.get(p)
            states = self.chain.init_states()
            file_rows: dict[str, int] = {}
            if c is not None:
                owned = self._processing() + len(new)  # at most: rebound next step
                for i, files in cm.state_chains(c.state_files).items():
                    if not c.final and self.chain.ops[i].restores_bound:  # never whole in memory
                        states[i], rows = self._restore_bound(p, epoch, i, files, owned)
                    else:
                        tables, rows = cm.read_state(self.state_store, files)
                        states[i] = self.chain.ops[i].state_from_tables(tables)
                    file_rows.update(rows)
            task = pt.PartitionTask.from_commit(
                p,
                epoch,
                states,
                c,
                event_time=self.event_time is not None,
                num_sources=self.num_sources,
                file_rows=file_rows,
            )
            if task.running:  # a finished partition's state is never read again
                self._bind_states(task, owned=self._processing() + len(new))  # at most: rebound next step
            if task.clock is not None and task.running and task.clock.applied != WATERMARK_NONE:
                task.watermark_advanced(
                    task.clock.applied,
                    self.chain.advance(states, task.clock.applied, version=task.next_version(), partition=p),
                )
            out[p] = task
        return out

    async def _give_up(self, revoke: list[int]) -> None:
        """Revoked: commit what is uncommitted, then release (DESIGN §4: revoke -> commit -> release).

        If the commit fails, the partitions are released all the same: the new
        owner starts from the last *recorded* commit, so nothing is lost or
        counted twice; only the work since then is redone.
        """
        tasks = [self.owned[p] for p in revoke if p in self.owned]
        self._retry_at = 0.0  # a revocation does not wait for a backoff
        await self._commit([t for t in tasks if t.revoked()], count_failure=False, compact=False)
        release = {t.partition: t.epoch for t in tasks if t.partition in self.owned}
        try:
            await _call(self.manager.release.remote(self.member_id, release), self.config.call_timeout_s)
        except (Exception, ray.exceptions.RayError) as e:
            # Kept for now: the next heartbeat revokes them again, and this runs again.
            self.last_commit_error = f"release: {type(e).__name__}: {e}"
            return
        for p, e in release.items():
            self._released[p] = (e, self._hb_seq)
            self._forget(p)

    # ------------------------------------------------------------------ commit
    async def _commit(
        self, tasks: list[pt.PartitionTask], *, count_failure: bool = True, compact: bool = True
    ) -> None:
        """Commit ``tasks`` (protocol steps 1, 2-5 at the manager, 6; see checkpoint/commit.py);
        ``compact``: start compactions of long chains after (not for partitions on their way out)."""
        t0 = time.perf_counter()
        try:
            await self._commit_steps(tasks, count_failure=count_failure, compact=compact)
        finally:
            self.commit_s += time.perf_counter() - t0

    async def _commit_steps(
        self, tasks: list[pt.PartitionTask], *, count_failure: bool, compact: bool
    ) -> None:
        if self._unsettled and not await self._reconcile():
            self._failed(_outcome_unknown(), count_failure)
            return
        tasks = [t for t in tasks if t.partition in self.owned and t.needs_commit]
        if not tasks:
            return
        if self.chain.changes_indices:
            # Once per attempt, before anything is written: staged, so a failed attempt's flush is
            # written again by the next one, never recomputed. Outside the try below: an error of
            # the operator fails the job as itself, it is not a commit failure to retry.
            await asyncio.to_thread(self._flush, tasks)
        records: list[CommitRecord] = []
        try:
            records = await asyncio.to_thread(self._write, tasks)
            self._fault("consumer.after_state_write")
            reply = await _call(
                self.manager.commit.remote(self.member_id, records), self.config.call_timeout_s
            )
        except (Exception, ray.exceptions.RayError) as e:
            # Unknown outcome: the manager may have recorded some of these (a lost reply).
            self._unsettled += records
            if records:
                await self._reconcile()
            self._failed(e, count_failure)
            return
        fenced = set(reply["fenced"])
        self._settle(records, accepted=set(reply["accepted"]), fenced=fenced)
        if compact:
            self._start_compactions([self.owned[r.partition] for r in records if r.partition in self.owned])
        if fenced:
            # A fenced attempt may still have landed: Ray retries a call whose manager died
            # after recording it, and the restarted manager fences the retry. Only the catalog
            # knows, so its files are deleted only once reconciled as not recorded.
            self._unsettled += [r for r in records if r.partition in fenced]
            await self._reconcile()
        self._succeeded()

    def _flush(self, tasks: list[pt.PartitionTask]) -> None:
        """Worker thread: the operators' changes since the last flush, staged with the commit."""
        for t in tasks:
            if t.flushes_changes:
                t.changes_flushed(self.chain.flush(t.states, version=t.next_version(), partition=t.partition))

    def _write(self, tasks: list[pt.PartitionTask]) -> list[CommitRecord]:
        """Worker thread: step 1 for every task; a failure deletes what this call wrote."""
        self._fault("consumer.before_state_write")
        records: list[CommitRecord] = []
        try:
            for t in tasks:
                states, deltas = self._states_to_write(t)
                records.append(
                    cm.write_commit(
                        partition=t.partition,
                        epoch=t.epoch,
                        seq=t.next_seq(),
                        state_tables=states,
                        state_deltas=deltas,
                        outputs=t.outputs,
                        committed_positions=t.committed_positions,
                        positions=t.positions,
                        rows_total=t.rows_total,
                        rows_committed=t.rows_committed,
                        final=t.phase is pt.Phase.ENDED,
                        map_version=self.map_version,
                        key=self.key,
                        state_store=self.state_store,
                        sink_store=self.sink_store,
                        side_stores=self.side_stores,
                        watermarks=t.clock.committed() if t.clock is not None else None,
                    )
                )
                t.file_rows.update(records[-1].written_rows)
                deltas = sum(map(cm.is_delta, records[-1].written_rows))
                self.state_deltas += deltas
                self.state_bases += len(records[-1].written_rows) - deltas
        except BaseException:
            for rec in records:  # never sent: nothing can name them
                cm.discard(
                    rec,
                    state_store=self.state_store,
                    sink_store=self.sink_store,
                    side_stores=self.side_stores,
                )
            raise
        return records

    def _states_to_write(self, t: pt.PartitionTask) -> tuple[dict[int, pa.Table], dict]:
        """Worker thread: what a commit of ``t`` writes per stateful operator: the whole state
        (a new base), or, for an incremental one with a recorded chain, the delta since it.

        An incremental operator gives up its delta at every commit, kept staged
        until one is recorded. A whole snapshot is written when there is no
        chain yet (the partition's first commit, or incremental commits off),
        and when the chain has grown past four times ``state_deltas_max``
        (compaction falls behind): a restore never reads an unbounded chain.
        A finished background compaction replaces the files it folded.
        """
        states: dict[int, pa.Table] = {}
        deltas: dict[int, tuple[cm.StateChain, pa.Table]] = {}
        limit = self.config.state_deltas_max
        for i in self.chain.stateful_indices:
            op = self.chain.ops[i]
            if op.incremental:
                t.states[i], delta = op.state_delta(t.states[i])
                if delta.num_rows:
                    t.staged_deltas.setdefault(i, []).append(delta)
                chain = self._compacted(t, i)
                if limit and chain.files and chain.deltas < 4 * limit:
                    staged = t.staged_deltas.get(i, [])
                    if len(staged) > 1:  # attempts that failed: fold them once, not at every retry
                        staged[:] = [op.merge_states(staged)]
                    deltas[i] = (chain, staged[0] if staged else delta)
                    continue
            states[i] = op.state_to_table(t.states[i])
        return states, deltas

    def _compacted(self, t: pt.PartitionTask, i: int) -> cm.StateChain:
        """Operator ``i``'s recorded chain, with a finished compaction's base in place of the
        files it folded; a compaction that failed or no longer applies is dropped (its file
        deleted: nothing names it)."""
        chain = t.chains.get(i, cm.StateChain())
        job = self._compactions.get((t.partition, i))
        if job is None or not job.future.done():
            return chain
        if job.future.exception() is not None:
            self._compactions.pop((t.partition, i))
            self.last_commit_error = f"compaction: {job.future.exception()!r}"
            return chain
        base, rows = job.future.result()
        rebased = chain.rebased(base, rows, job.folded)
        if rebased is None:
            return chain  # replaced meanwhile: _retire_compaction deletes the base
        t.file_rows[base] = rows
        job.offered = True  # an attempt names it from now on: only the catalog can tell its fate
        return rebased

    def _retire_compaction(self, key: tuple[int, int], chain: cm.StateChain) -> bool:
        """Forget a finished compaction once its base is in the recorded ``chain``, or can no
        longer be (the chain was replaced by a whole snapshot: the base is deleted, as nothing
        names it). True while one is running or waits to be named."""
        job = self._compactions.get(key)
        if job is None:
            return False
        if not job.future.done():
            return True
        if job.future.exception() is None:
            base = job.future.result()[0]
            if base not in chain.files and chain.files[: len(job.folded)] == job.folded:
                return True  # not named yet: the next commit will
            self.compactions += base in chain.files
            if base not in chain.files and base not in {f for r in self._unsettled for f in r.state_files}:
                self._delete_later(base)
        self._compactions.pop(key)
        return False

    def _start_compactions(self, tasks: list[pt.PartitionTask]) -> None:
        """Fold long chains into new bases, in the background (reads files only: the partitions
        go on meanwhile). One compaction per partition and operator at a time."""
        limit = self.config.state_deltas_max
        if self._stopping:
            return  # the last commit of a stopping consumer: the next owner compacts
        for t in tasks:
            for i, chain in t.chains.items():
                key = (t.partition, i)
                if self._retire_compaction(key, chain) or not limit or chain.deltas < limit:
                    continue
                if t.phase is pt.Phase.FINAL:
                    continue  # nothing will commit again: a restore reads the chain
                self._compactions[key] = _Compaction(
                    future=self._compactor.submit(
                        self._compact, t.partition, i, cm.state_tag(t.epoch, t.next_seq()), chain
                    ),
                    folded=chain.files,
                )

    def _delete_later(self, file: str) -> None:
        """Delete a state file nothing names, on the compaction thread: never on the event loop
        (a remote store's delete is a round trip), after the compactions queued before it."""
        try:
            self._compactor.submit(self.state_store.delete, file)
        except RuntimeError:  # shut down (a stopping consumer): the next fresh start deletes it
            pass

    def _compact(self, partition: int, i: int, tag: str, chain: cm.StateChain) -> tuple[str, int]:
        """Compaction thread: fold ``chain`` into a new base (``commit.compact``); a failure after
        the write deletes the base (nothing can name it yet)."""
        out = cm.compact(
            self.state_store,
            partition=partition,
            op_index=i,
            tag=tag,
            chain=chain,
            op=self.chain.ops[i],
            key=self.key,
        )
        try:
            self._fault("consumer.after_compaction")
        except BaseException:
            self.state_store.delete(out[0])
            raise
        return out

    def _forget(self, partition: int) -> None:
        """Drop an owned partition (released, moved on, fenced) with its compactions and the
        state it keeps on local disk."""
        self._drop_compactions(partition)
        t = self.owned.pop(partition, None)
        if t is not None and t.state_share:  # bound: it may have runs on disk
            self._release_states(t)

    def _bind_states(self, t: pt.PartitionTask, owned: int | None = None) -> None:
        """Worker thread: grant ``t``'s stateful operators their share of ``consumer_max_bytes``
        (``runs.state_share`` over the ``owned`` partitions still processing: an ended or final
        one's state takes no more), when it changed (``Operator.bound_state``: an operator may
        spill part of its state at once)."""
        ops = self.chain.stateful_indices
        share = rn.state_share(
            self.config.consumer_max_bytes,
            partitions=owned if owned is not None else self._processing(),
            operators=len(ops),
        )
        if not ops or t.state_share == share:
            return
        for i in ops:
            spill_dir = self._spill_dir(t.partition, t.epoch, i)
            t.states[i] = self.chain.ops[i].bound_state(
                t.states[i], max_bytes=share, spill_dir=spill_dir, key=self.key
            )
        t.state_share = share

    def _restore_bound(
        self, partition: int, epoch: int, i: int, files: list[str], owned: int
    ) -> tuple[object, dict[str, int]]:
        """Worker thread: operator ``i``'s state of a running ``partition``, streamed from its
        checkpoint ``files`` (a base, then deltas) through ``Operator.restore_bound`` under the
        share ``_bind_states`` will grant (so it does not bind it again); with each file's rows."""
        store = self.state_store
        share = rn.state_share(
            self.config.consumer_max_bytes, partitions=owned, operators=len(self.chain.stateful_indices)
        )

        def opener(f: str):
            return lambda: store.fs.open_input_file(store.full(f))

        # Batches of about a quarter of the share at ~32 bytes a row: one fills the pending part.
        batch_rows = max(1024, share // 4 // 32)
        chain = [rn.iter_parquet(opener(f), batch_rows=batch_rows) for f in files]
        state = self.chain.ops[i].restore_bound(
            chain, max_bytes=share, spill_dir=self._spill_dir(partition, epoch, i), key=self.key
        )
        return state, {f: rn.parquet_rows(opener(f)) for f in files}

    def _spill_dir(self, partition: int, epoch: int, i: int) -> str:
        """Where operator ``i`` of ``partition`` (under lease ``epoch``) keeps its runs."""
        return os.path.join(self._spill_root, f"p{partition:05d}-e{epoch:06d}-op{i}")

    def _processing(self) -> int:
        """How many owned partitions still process input (what the memory budget is shared by)."""
        return sum(1 for t in list(self.owned.values()) if t.running)

    def _release_final(self) -> None:
        """Delete the runs of partitions whose final commit is recorded: nothing reads them again."""
        for t in self.owned.values():
            if t.phase is pt.Phase.FINAL and t.state_share:
                self._release_states(t)
                t.state_share = 0

    def _release_states(self, t: pt.PartitionTask) -> None:
        """``t`` leaves: its operators delete what they keep on disk (``Operator.release_state``)."""
        for i in self.chain.stateful_indices:
            self.chain.ops[i].release_state(t.states[i])

    def _drop_compactions(self, partition: int) -> None:
        """``partition`` leaves this consumer: forget its compactions, deleting each base no
        attempt ever named (so no catalog row can), now or, for one still running, once it is
        written. A base an attempt named (it may have landed, its reply lost: the partition may
        leave before its reconciliation) is left: the next fresh start deletes it if no row names it."""
        for key in [k for k in self._compactions if k[0] == partition]:
            job = self._compactions.pop(key)
            if not job.offered:  # deleted once written (now, if it is), on the compaction thread
                job.future.add_done_callback(self._delete_written)

    def _delete_written(self, fut: Future) -> None:
        """Done-callback: delete the base a compaction wrote, if it wrote one (``_delete_later``)."""
        if not fut.cancelled() and fut.exception() is None:
            self._delete_later(fut.result()[0])

    def _settle(self, records: list[CommitRecord], *, accepted: set[int], fenced: set[int]) -> None:
        """Apply the manager's verdict, then trim the sources (step 6)."""
        trim = {}
        for rec in records:
            t = self.owned.get(rec.partition)
            if rec.partition in fenced:
                self._forget(rec.partition)  # a newer owner exists: our state goes
                continue
            if rec.partition not in accepted or t is None or t.epoch != rec.lease_epoch:
                continue
            t.commit_recorded(rec)
            trim[rec.partition] = (t.epoch, dict(rec.positions))
        self._fault("consumer.after_commit")
        if trim:
            for src in self.sources:
                src.trim.remote(trim)

    async def _reconcile(self) -> bool:
        """Learn from the catalog what became of unsettled attempts (DESIGN §5). False if unknown.

        The manager first renews each lease we still hold under an attempt's epoch
        (``GroupManager.reconcile``): an attempt that has not landed by then never
        will (a commit call Ray retries on a restarted manager is fenced), so the
        verdict of :func:`commit.outcome` is final, and the task goes on under the
        new epoch.
        """
        asked = {r.partition: r.lease_epoch for r in self._unsettled}
        try:
            answer = await _call(
                self.manager.reconcile.remote(self.member_id, asked), self.config.call_timeout_s
            )
        except (Exception, ray.exceptions.RayError) as e:
            self.last_commit_error = f"reconcile: {type(e).__name__}: {e}"
            return False
        attempts, self._unsettled = self._unsettled, []
        trim = {}
        for rec in attempts:
            new_epoch, latest = answer[rec.partition]
            how = cm.outcome(rec, latest)
            # Renewed (or moved on): the lease never holds rec.lease_epoch again.
            self._fenced_upto[rec.partition] = max(self._fenced_upto.get(rec.partition, 0), rec.lease_epoch)
            t = self.owned.get(rec.partition)
            if t is not None and t.epoch == rec.lease_epoch:
                if how == "landed":
                    t.commit_recorded(rec)
                if new_epoch is None or how == "unknown":
                    self._forget(rec.partition)  # no longer ours: a newer owner has it
                else:
                    t.epoch = new_epoch
                    if how == "landed":
                        trim[rec.partition] = (new_epoch, dict(rec.positions))
            if how == "lost":
                await asyncio.to_thread(
                    cm.discard,
                    rec,
                    state_store=self.state_store,
                    sink_store=self.sink_store,
                    side_stores=self.side_stores,
                )
            elif how == "unknown":
                files = rec.state_files + rec.output_files
                try:
                    named = await _call(
                        self.manager.named.remote(rec.partition, files), self.config.call_timeout_s
                    )
                except (Exception, ray.exceptions.RayError) as e:  # left for the next fresh start
                    self.last_commit_error = f"reconcile: {type(e).__name__}: {e}"
                    continue
                await asyncio.to_thread(
                    cm.discard,
                    rec,
                    state_store=self.state_store,
                    sink_store=self.sink_store,
                    side_stores=self.side_stores,
                    keep=frozenset(named),
                )
        if trim:
            self._fault("consumer.after_commit")
            for src in self.sources:
                src.trim.remote(trim)
        return True

    def _succeeded(self) -> None:
        self.commit_failures = 0
        self._failing_since = None
        self._retry_at = 0.0
        self._last_commit = time.monotonic()

    def _failed(self, e: BaseException, count: bool) -> None:
        """Back off; past the limits (attempts or seconds), fail the job naming the cause."""
        now = time.monotonic()
        self.last_commit_error = f"{type(e).__name__}: {e}"
        if not count:
            return
        self.commit_failures += 1
        if self._failing_since is None:
            self._failing_since = now
        failing_s = now - self._failing_since
        if (
            self.commit_failures >= self.config.commit_max_attempts
            or failing_s >= self.config.commit_max_failing_s
        ):
            raise PipelineFailedError(
                f"consumer {self.member_id!r}: commits failed {self.commit_failures} times in a row "
                f"over {failing_s:.1f} s (limits: EngineConfig.commit_max_attempts="
                f"{self.config.commit_max_attempts}, commit_max_failing_s="
                f"{self.config.commit_max_failing_s}); last cause: {type(e).__name__}: {e}. "
                "Everything committed before stays; fix the cause (storage, permissions, the "
                "catalog) and run the job again to resume"
            ) from e
        self._retry_at = now + pt.backoff_s(
            self.commit_failures,
            initial_s=self.config.commit_retry_initial_s,
            max_s=self.config.commit_retry_max_s,
        )

    def _fault(self, point: str) -> None:
        if self.faults is not None:
            self.faults.hit(point, self.member_id)


@dataclass
class _Compaction:
    """A background compaction: its future (``(base file, rows)``), the files it folds, and
    whether a commit attempt has named its base yet."""

    future: Future
    folded: tuple[str, ...]
    offered: bool = False


def _by_watermark(taken: list) -> list[list]:
    """Fetched (entry, batch) pairs cut where the split watermark they carry changes.

    With event time each group is processed, then the watermark advanced, in
    turn: whether a row is late never depends on how many batches one step
    happened to take (a backlog taken over by a new owner is judged batch by
    batch, as it was read, not all against the watermark from before it).
    """
    groups: list[list] = []
    last = object()
    for pair in taken:
        wm = (pair[0].split, pair[0].watermark)
        if not groups or wm != last:
            groups.append([])
        groups[-1].append(pair)
        last = wm
    return groups


def _outcome_unknown() -> CheckpointError:
    return CheckpointError("the outcome of an earlier commit is still unknown: the manager did not answer")


async def _call(ref, timeout_s: float):
    """Await an actor call, at most ``timeout_s`` (``asyncio.TimeoutError`` past it)."""
    return await asyncio.wait_for(ref, timeout_s)
