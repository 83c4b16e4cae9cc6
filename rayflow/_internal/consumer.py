"""The ConsumerActor: owns leased partitions, runs the operator chain, commits.

An async actor whose processing loop runs one step at a time: heartbeat (take
and give up partitions), fetch from every source (one call per source for all
owned partitions), process (in a worker thread, so control calls such as
``status``, ``watch`` and ``stop`` are answered at once), and commit when the
checkpoint interval has passed, a queue is at its bound, a partition is
revoked, or a partition's input has ended.

The commit protocol, seen from here (:meth:`ConsumerActor._commit`):

1. For each partition to commit: write each stateful operator's state as a
   Parquet file sorted by ``_hash``, and the staged outputs as a pending sink
   file, all under unique names.
2. Ask the manager to record the commits under their lease epochs (one
   catalog transaction). A fenced partition is dropped at once, with its
   uncommitted state.
3. Tell the sources to trim what is now committed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray

from rayflow._internal.chain import Chain
from rayflow._internal.checkpoint.commit import CommitRecord
from rayflow._internal.checkpoint.store import Store
from rayflow._internal.metrics import ConsumerMetrics
from rayflow._internal.source_actor import FetchResult
from rayflow.config import EngineConfig
from rayflow.partitioning import hash_table
from rayflow.sinks import PENDING_DIR

_GET_TIMEOUT_S = 120.0


@dataclass
class _Owned:
    partition: int
    epoch: int
    states: list
    positions: dict[str, int]
    rows_total: int
    rows_committed: int
    outputs: list[pa.Table] = field(default_factory=list)
    ended_sources: set[int] = field(default_factory=set)
    final: bool = False
    dirty: bool = False
    full: bool = False
    seq: int = 0
    first_done: bool = False
    finished: bool = False  # end of input seen and the final outputs staged
    committed_positions: dict[str, int] = field(default_factory=dict)


@ray.remote
class ConsumerActor:
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
        checkpoint_interval_s: float,
        config: EngineConfig,
        faults=None,
    ):
        self.member_id = member_id
        self.metrics = ConsumerMetrics(pipeline, member_id)
        self.faults = faults
        self.commit_failures = 0
        self.last_commit_error: str | None = None
        self.manager = manager
        self.sources = sources
        self.chain = chain
        self.key = key
        self.state_store = Store(state_root)
        self.sink_store = Store(sink_root)
        self.map_version = map_version
        self.interval_s = checkpoint_interval_s
        self.config = config
        self.owned: dict[int, _Owned] = {}
        self.member_epoch = 0
        self.busy_s = 0.0
        self.rows_processed = 0
        self._stopping = False
        self._stopped = asyncio.Event()
        self._poke = asyncio.Event()  # set by the manager: heartbeat now (revocation or grant)
        self._firsts: dict[int, tuple[int, float]] = {}  # partition -> (epoch, wall time of first batch)
        self._task: asyncio.Task | None = None
        self._error: BaseException | None = None

    # ------------------------------------------------------------------ control
    async def start(self) -> None:
        me = ray.get_runtime_context().current_actor
        self.member_epoch, _ = await self.manager.join.remote(self.member_id, me, {})
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def poke(self) -> None:
        """Heartbeat at the next step instead of waiting for the period (the manager calls this)."""
        self._poke.set()

    async def watch(self) -> None:
        """Never returns while the actor lives: the manager's liveness watch."""
        await self._stopped.wait()

    async def stop(self) -> None:
        """Graceful stop: finish the current step, commit everything, leave the group."""
        self._stopping = True
        self._poke.set()
        if self._task is not None:
            try:
                await self._task
            except Exception:
                pass  # kept in self._error and reported by status()
        if self._error is None:
            await self._commit([o for o in self.owned.values() if not o.final])
        await self.manager.leave.remote(self.member_id)
        self.owned.clear()
        self._stopped.set()

    async def status(self) -> dict:
        if self._error is not None:
            raise self._error
        owned = dict(self.owned)  # the worker thread may change it
        return {
            "member": self.member_id,
            "pid": os.getpid(),
            "partitions": {p: o.epoch for p, o in owned.items()},
            "rows_processed": self.rows_processed,
            "busy_s": self.busy_s,
            "commit_failures": self.commit_failures,
            "last_commit_error": self.last_commit_error,
        }

    # ------------------------------------------------------------------ loop
    async def _loop(self) -> None:
        next_hb = 0.0
        last_commit = time.monotonic()
        try:
            while not self._stopping:
                if self._poke.is_set() or time.monotonic() >= next_hb:
                    self._poke.clear()
                    await self._heartbeat()
                    next_hb = time.monotonic() + self.config.heartbeat_interval_s
                active = [o for o in self.owned.values() if not o.final]
                if not active:
                    try:
                        await asyncio.wait_for(self._poke.wait(), self.config.heartbeat_interval_s)
                    except asyncio.TimeoutError:
                        pass
                    continue
                work = await self._fetch(active)
                refs = [e.ref for entries, _ in work.values() for e in entries]
                if refs:
                    # Zero-copy reads from the object store, awaited on the loop (a
                    # blocking ray.get in an async actor would stall control calls).
                    try:
                        batches = await asyncio.wait_for(asyncio.gather(*refs), _GET_TIMEOUT_S)
                    except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError):
                        # The source died with these batches; its restart serves them again.
                        await asyncio.sleep(self.config.fetch_wait_s)
                        continue
                    t0 = time.monotonic()
                    await asyncio.to_thread(self._process, work, batches)
                    took = time.monotonic() - t0
                    self.busy_s += took
                    self.metrics.observe(took, sum(b.num_rows for b in batches))
                    self._fault("consumer.step")
                else:
                    self._advance(work)
                active = [o for o in active if o.partition in self.owned]
                for o in active:
                    if len(o.ended_sources) == len(self.sources) and not o.finished:
                        # End of input: stateful operators emit now. Staged until committed,
                        # and never computed twice, even if the commit must be retried.
                        o.outputs.extend(await asyncio.to_thread(self.chain.finish, o.states))
                        o.finished = True
                ended = [o for o in active if o.finished]
                due = time.monotonic() - last_commit >= self.interval_s
                if ended or due or any(o.full for o in active):
                    todo = active if due else [o for o in active if o.full or o.finished]
                    await self._commit(todo)
                    if due:
                        last_commit = time.monotonic()
        except BaseException as e:
            self._error = e
            raise

    async def _fetch(self, active: list[_Owned]) -> dict[int, tuple[list, list]]:
        calls = []
        # fetch_max_bytes bounds one step of this consumer (so a heartbeat, a revocation or
        # a stop is never more than one step away), shared by its partitions and sources.
        share = max(1, self.config.fetch_max_bytes // max(1, len(active) * len(self.sources)))
        for i, src in enumerate(self.sources):
            req = {o.partition: (o.epoch, o.positions) for o in active if i not in o.ended_sources}
            if req:
                calls.append((i, src.fetch.remote(req, share)))
        replies = await asyncio.gather(*(c for _, c in calls), return_exceptions=True)
        work: dict[int, tuple[list, list]] = {o.partition: ([], []) for o in active}
        for (i, _), reply in zip(calls, replies):
            if isinstance(reply, ray.exceptions.RayActorError):
                continue  # that source is restarting: ask again next step
            if isinstance(reply, BaseException):
                raise reply
            for p, res in reply.items():
                res: FetchResult
                work[p][0].extend(res.entries)
                work[p][1].append((i, res))
        return work

    def _advance(self, work) -> None:
        """Apply what fetch replies say about positions and ends (no data)."""
        for p, (_, results) in work.items():
            o = self.owned.get(p)
            if o is None:
                continue
            if any(res.fenced for _, res in results):
                # A newer owner exists: drop the partition and its uncommitted state.
                del self.owned[p]
                continue
            for i, res in results:
                if res.frontier:
                    for s, v in res.frontier.items():
                        if v > o.positions.get(s, 0):
                            o.positions[s] = v
                            o.dirty = True
                if res.end:
                    o.ended_sources.add(i)
                o.full = o.full or res.full

    def _process(self, work, fetched: list[pa.RecordBatch]) -> None:
        """Worker thread: run the chain over the fetched sub-batches, per partition."""
        batches = iter(fetched)
        for p, (entries, _) in work.items():
            got = [next(batches) for _ in entries]
            o = self.owned.get(p)
            if o is None or not entries:
                continue
            for e in entries:
                if e.start < o.positions.get(e.split, 0):
                    # Batches end on a fixed grid (sources.py), so this cannot happen;
                    # processing it would count rows twice, so refuse loudly.
                    raise RuntimeError(
                        f"partition {p}: batch [{e.start}, {e.end}) of split {e.split!r} overlaps "
                        f"the processed position {o.positions[e.split]}"
                    )
            table = pa.Table.from_batches(got)
            if not o.first_done:  # the end of this partition's pause, if it just moved here
                o.first_done = True
                self._firsts[p] = (o.epoch, time.time())
            o.outputs.extend(self.chain.process(o.states, table))
            o.rows_total += table.num_rows
            self.rows_processed += table.num_rows
            for e in entries:
                if e.end > o.positions.get(e.split, 0):
                    o.positions[e.split] = e.end
            o.dirty = True
        self._advance(work)

    # ------------------------------------------------------------------ membership
    async def _heartbeat(self) -> None:
        firsts, self._firsts = self._firsts, {}
        reply = await self.manager.heartbeat.remote(
            self.member_id,
            self.member_epoch,
            {p: o.rows_total for p, o in self.owned.items()},
            firsts,
        )
        if reply.get("rejoin"):
            # The manager no longer knows this session: it restarted (then it gives back
            # the leases it can confirm), or it expired us (then everything moved on).
            me = ray.get_runtime_context().current_actor
            claims = {p: o.epoch for p, o in self.owned.items()}
            self.member_epoch, kept = await self.manager.join.remote(self.member_id, me, claims)
            for p in list(self.owned):
                if p not in kept:
                    del self.owned[p]  # moved on: its uncommitted state goes
            return
        owned: dict[int, int] = reply["owned"]
        for p in list(self.owned):
            if owned.get(p) != self.owned[p].epoch:
                del self.owned[p]  # lost (moved while we were presumed dead): uncommitted state goes
        new = {p: e for p, e in owned.items() if p not in self.owned}
        if new:
            loaded = await asyncio.to_thread(self._load, new, reply["commits"])
            self.owned.update(loaded)
        revoke = [self.owned[p] for p in reply["revoke"] if p in self.owned]
        if revoke:
            await self._commit([o for o in revoke if not o.final])
            await self.manager.release.remote(
                self.member_id, {o.partition: o.epoch for o in revoke if o.partition in self.owned}
            )
            for o in revoke:
                self.owned.pop(o.partition, None)

    def _load(self, new: dict[int, int], commits: dict[int, CommitRecord | None]) -> dict[int, _Owned]:
        out = {}
        for p, epoch in new.items():
            c = commits.get(p)
            states = self.chain.init_states()
            if c is not None:
                for i, f in zip(self.chain.stateful_indices, c.state_files):
                    t = self.state_store.read_parquet(f)
                    states[i] = self.chain.ops[i].state_from_table(t.drop_columns(["_hash"]))
            out[p] = _Owned(
                partition=p,
                epoch=epoch,
                states=states,
                positions=dict(c.positions) if c else {},
                rows_total=c.rows_total if c else 0,
                rows_committed=c.rows_total if c else 0,
                final=bool(c and c.final),
                committed_positions=dict(c.positions) if c else {},
            )
        return out

    # ------------------------------------------------------------------ commit
    async def _commit(self, owned: list[_Owned]) -> None:
        """Commit ``owned`` partitions that have anything new (see the module doc).

        A failed write or a failed catalog transaction loses nothing: state,
        positions and staged outputs stay in memory and the next commit
        retries them. Output files are named by the positions they cover, so
        a retry of a commit that did land rewrites the same file, never a
        second copy, and the manager treats the repeated record as a no-op.
        """
        todo = [o for o in owned if o.dirty or o.finished or o.outputs]
        if not todo:
            return
        try:
            records = await asyncio.to_thread(self._write, todo)
            self._fault("consumer.after_state_write")
            reply = await self.manager.commit.remote(self.member_id, records)
        except (Exception, ray.exceptions.RayError) as e:
            self.commit_failures += 1
            self.last_commit_error = f"{type(e).__name__}: {e}"
            return
        for p in reply["fenced"]:
            self.owned.pop(p, None)
        trim = {}
        for rec in records:
            o = self.owned.get(rec.partition)
            if o is None or rec.partition not in reply["accepted"]:
                continue
            o.rows_committed = rec.rows_total
            o.committed_positions = dict(rec.positions)
            o.dirty = o.full = False
            o.outputs = []
            o.final = rec.final
            trim[rec.partition] = (o.epoch, dict(rec.positions))
        self._fault("consumer.after_commit")
        for src in self.sources:
            src.trim.remote(trim)

    def _write(self, todo: list[_Owned]) -> list[CommitRecord]:
        """Worker thread: step 1 of the commit protocol."""
        self._fault("consumer.before_state_write")
        records = []
        for o in todo:
            o.seq += 1
            tag = f"e{o.epoch:06d}-s{o.seq:06d}-{uuid.uuid4().hex[:8]}"
            state_files = []
            state_rows = 0
            for i in self.chain.stateful_indices:
                t = self.chain.ops[i].state_to_table(o.states[i])
                t = _with_hash(t, self.key)
                state_rows += t.num_rows
                rel = f"state/p{o.partition:05d}/{tag}-op{i}.parquet"
                state_files.append(self.state_store.write_parquet(rel, t))
            output_files = []
            outs = [t for t in o.outputs if t.num_rows]
            if outs:
                name = _output_name(o.partition, o.committed_positions, o.positions)
                table = pa.concat_tables(outs, promote_options="permissive")
                self.sink_store.write_parquet(f"{PENDING_DIR}/{name}", table)
                output_files.append(name)
            records.append(
                CommitRecord(
                    partition=o.partition,
                    lease_epoch=o.epoch,
                    positions=dict(o.positions),
                    state_files=state_files,
                    output_files=output_files,
                    rows_in=o.rows_total - o.rows_committed,
                    rows_total=o.rows_total,
                    state_rows=state_rows,
                    final=o.finished,
                    map_version=self.map_version,
                )
            )
        return records

    def _fault(self, point: str) -> None:
        if self.faults is not None:
            self.faults.hit(point, self.member_id)


def _output_name(partition: int, start: dict[str, int], end: dict[str, int]) -> str:
    """A deterministic name for the outputs of ``partition`` between two position vectors."""
    digest = hashlib.sha256(json.dumps([start, end], sort_keys=True).encode()).hexdigest()[:16]
    return f"part-{partition:05d}-{digest}.parquet"


def _with_hash(t: pa.Table, key: list[str]) -> pa.Table:
    """The state table with its rows' key hash as ``_hash``, sorted by it (DESIGN §3)."""
    if t.num_rows == 0 or not all(k in t.column_names for k in key):
        return t.append_column("_hash", pa.array(np.zeros(t.num_rows, np.uint64)))
    h = hash_table(t, key)
    order = np.argsort(h, kind="stable")
    return t.take(pa.array(order)).append_column("_hash", pa.array(h[order]))
