"""The GroupManager actor: membership, leases, commits (DESIGN §2.3, §4).

A thin async shell over the pure parts: :func:`assignment.assign` decides the
target owners, :class:`leases.LeaseTable` moves partitions between owners, and
:class:`Catalog` records what is committed (the manager is its only writer).

Death of a consumer is seen two ways: each member has one outstanding
``watch()`` call, which Ray fails within milliseconds of the actor's death;
and a member whose heartbeat is older than ``session_timeout_s`` is expired.

The commit protocol, seen from here (``commit``):

1. The consumer has already written its state and output files under unique
   names (never overwritten).
2. Every record is checked: the caller must hold the partition under the
   record's lease epoch (else :class:`FencedError`), positions never go back,
   and every file it names exists.
3. All records of the call go into the catalog in one DuckDB transaction.
4. Only then are the output files published (moved out of the pending area).
   A crash between 3 and 4 is repaired on the next start, which publishes
   what committed rows name and deletes what no row names.
"""

from __future__ import annotations

import asyncio
import json
import time
import warnings

import ray

from rayflow._internal.checkpoint.catalog import Catalog
from rayflow._internal.checkpoint.commit import CommitRecord
from rayflow._internal.checkpoint.store import Store, is_remote
from rayflow._internal.compat import check_resume
from rayflow._internal.group.coordinator import Coordinator, Effects
from rayflow._internal.metrics import ManagerMetrics
from rayflow._internal.publish import Publisher
from rayflow.config import EngineConfig
from rayflow.errors import FencedError, IncompatibleCheckpointError
from rayflow.partitioning import PartitionMap
from rayflow.sinks import Sink

#: How often the manager refreshes its Prometheus gauges.
METRICS_EVERY_S = 1.0
#: State files kept per partition (the last commits'); older ones are deleted.
STATE_FILES_KEPT = 3
#: How often (at most) old state files are retired.
RETIRE_EVERY_S = 5.0


def _was_restarted() -> bool:
    with warnings.catch_warnings():  # Ray's own implementation trips its deprecation warning
        warnings.simplefilter("ignore")
        return ray.get_runtime_context().was_current_actor_reconstructed


@ray.remote
class GroupManager:
    def __init__(
        self,
        *,
        name: str,
        catalog_path: str,
        state_root: str,
        sink_root: str,
        sink: Sink,
        meta: dict[str, str],
        partition_map: PartitionMap,
        config: EngineConfig,
        source_names: list[str] | None = None,
        faults=None,
    ):
        self.name = name
        self.faults = faults
        self.source_names = source_names or []
        self.config = config
        self.handles: dict[str, object] = {}
        self.watches: dict[str, asyncio.Task] = {}
        self.sources: list = []
        self.moves: list[dict] = []
        self.metrics = ManagerMetrics(name)
        self._init_error: BaseException | None = None
        try:
            # Under a remote checkpoint directory the durable catalog is a log there.
            self.catalog = Catalog(catalog_path, log_root=state_root if is_remote(state_root) else None)
            self.state_store = Store(state_root)
            self.publisher = Publisher(sink, sink_root)
            self.map = partition_map
            self._check_meta(meta)
            self.group = Coordinator(
                partition_map.num_partitions,
                epochs=self.catalog.lease_epochs(),
                committed=self.catalog.latest_commits(),
            )
            if _was_restarted():
                # Restarted by Ray mid-run: the recorded owners come back as ghosts that
                # may re-join and keep their leases (Coordinator.restore).
                self.group.restore(self.catalog.lease_owners(), time.monotonic())
            self._repair_files()
        except BaseException as e:  # raised by ready(): an actor whose __init__ fails just dies
            self._init_error = e
        self._expiry: asyncio.Task | None = None  # started by ready(), inside the event loop
        self._last_retire = 0.0

    # ------------------------------------------------------------------ setup
    def _check_meta(self, meta: dict[str, str]) -> None:
        old = self.catalog.get_meta()
        check_resume(self.name, old, meta)
        committed = self.catalog.latest_commits()
        new_splits = sorted(set(json.loads(meta["splits"])) - set(json.loads(old.get("splits", "[]"))))
        if (
            old
            and new_splits
            and len(committed) == self.map.num_partitions
            and all(c.final for c in committed.values())
        ):
            raise IncompatibleCheckpointError(
                f"pipeline {self.name!r} has finished, and its input now has new split(s) "
                f"{new_splits[:5]}: a finished job's final output cannot be amended. Run the new "
                "input under a new name or checkpoint_dir."
            )
        self.catalog.set_meta(meta)

    def _repair_files(self) -> None:
        """Publish committed outputs left pending; delete files no commit names."""
        self.publisher.repair(set(self.catalog.all_output_files()))
        live = self.catalog.all_state_files()
        for rel in self.state_store.list_files("state"):
            if rel not in live:
                self.state_store.delete(rel)

    async def ready(self) -> dict:
        """Committed positions and lease epochs per partition (for a (re)starting source)."""
        if self._init_error is not None:
            raise self._init_error
        self._ensure_loops()
        committed = self.group.committed
        return {
            "positions": {p: c.positions for p, c in committed.items()},
            "epochs": self.group.leases.epochs(),
        }

    def _ensure_loops(self) -> None:
        """Start the expiry loop (inside the event loop; after a restart, on the first call)."""
        if self._expiry is None:
            self._expiry = asyncio.get_running_loop().create_task(self._expire_loop())

    def _apply(self, fx: Effects) -> None:
        """Carry out a decision: persist grants, tell the sources, wake members, log events."""
        if fx.grants:
            self.catalog.record_leases([(g.partition, g.owner, g.epoch) for g in fx.grants])
            for src in self._source_handles():
                src.set_epochs.remote({g.partition: g.epoch for g in fx.grants})
        for move in fx.moves:  # the coordinator runs on monotonic time; the log on wall time
            move["at"] += time.time() - time.monotonic()
        for member_id in fx.pokes:
            h = self.handles.get(member_id)
            if h is not None:
                h.poke.remote()
        for kind, detail in fx.events:
            self.catalog.record_event(kind, detail)
        self.moves += fx.moves

    async def set_sources(self, sources: list) -> None:
        self.sources = sources
        for src in sources:
            src.set_epochs.remote(self.group.leases.epochs())

    def _source_handles(self) -> list:
        """The source actors; after a restart of this actor, found again by name."""
        if not self.sources and self.source_names:
            try:
                self.sources = [ray.get_actor(n, namespace="rayflow") for n in self.source_names]
            except ValueError:
                return []
        return self.sources

    # ------------------------------------------------------------------ membership
    async def join(
        self, member_id: str, handle, claims: dict[int, int] | None = None
    ) -> tuple[int, set[int]]:
        """Admit a consumer; returns its member epoch and the claimed partitions it keeps."""
        self._ensure_loops()
        epoch, kept, fx = self.group.join(member_id, time.monotonic(), claims)
        self.handles[member_id] = handle
        old = self.watches.pop(member_id, None)
        if old is not None:
            old.cancel()
        self.watches[member_id] = asyncio.get_running_loop().create_task(
            self._watch(member_id, epoch, handle)
        )
        self._apply(fx)
        return epoch, kept

    async def activate(self) -> None:
        """First assignment, once the expected consumers have joined (no start-up churn)."""
        self._apply(self.group.drop_ghosts(time.monotonic()))
        self._apply(self.group.activate(time.monotonic()))

    async def _watch(self, member_id: str, epoch: int, handle) -> None:
        """Ray fails this call within milliseconds of the member's death."""
        try:
            await handle.watch.remote()
        except Exception:
            pass
        m = self.group.members.get(member_id)
        if m is not None and m.epoch == epoch:
            self._gone(member_id, "crash")

    async def _expire_loop(self) -> None:
        next_metrics = 0.0
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            self._apply(self.group.expire(time.monotonic(), self.config.session_timeout_s))
            if time.monotonic() >= next_metrics:
                next_metrics = time.monotonic() + METRICS_EVERY_S
                await self._publish_metrics()

    async def _publish_metrics(self) -> None:
        try:
            sources = await asyncio.gather(*(s.stats.remote() for s in self._source_handles()))
            self.metrics.publish(await self.status(), list(sources))
        except Exception:  # metrics must never take the job down
            pass

    def _gone(self, member_id: str, why: str) -> None:
        self._apply(self.group.member_gone(member_id, why, time.monotonic()))

    async def leave(self, member_id: str) -> None:
        watch = self.watches.pop(member_id, None)
        if watch is not None:
            watch.cancel()
        self._gone(member_id, "leave")
        self.handles.pop(member_id, None)

    # ------------------------------------------------------------------ heartbeat
    async def heartbeat(
        self,
        member_id: str,
        member_epoch: int,
        processed: dict[int, int],
        firsts: dict[int, tuple[int, float]] | None = None,
    ) -> dict:
        """The member's assignment (see :meth:`Coordinator.heartbeat`)."""
        self._ensure_loops()
        reply, fx = self.group.heartbeat(
            member_id, member_epoch, time.monotonic(), processed, _to_mono(firsts)
        )
        self._apply(fx)
        return reply

    async def release(self, member_id: str, partitions: dict[int, int]) -> None:
        """The member gives up revoked partitions (it has committed them)."""
        self._apply(self.group.release(member_id, partitions))

    # ------------------------------------------------------------------ commits
    async def commit(self, member_id: str, records: list[CommitRecord]) -> dict:
        """Validate and record commits (see the module doc). Returns accepted and fenced partitions."""
        ok, fenced, repeated = [], [], []
        for rec in records:
            if self.group.is_duplicate(rec):
                repeated.append(rec.partition)  # a retry of a commit that landed: a no-op
                continue
            try:
                self.group.validate_commit(member_id, rec)
            except FencedError:
                fenced.append(rec.partition)
                continue
            for f in rec.state_files:
                if not self.state_store.exists(f):
                    raise FileNotFoundError(f"partition {rec.partition}: state file {f} is missing")
            for f in rec.output_files:
                if not self.publisher.pending_exists(f):
                    raise FileNotFoundError(f"partition {rec.partition}: output file {f} is missing")
            ok.append(rec)
        if ok:
            self._fault("manager.before_record")
            self.catalog.record_commits(member_id, ok)
            for rec in ok:
                self.group.apply_commit(rec)
            self._fault("manager.after_record")
            for rec in ok:
                for f in rec.output_files:
                    self.publisher.publish(f)
            self._retire_old_state()
        return {"accepted": [r.partition for r in ok] + repeated, "fenced": fenced}

    def _retire_old_state(self) -> None:
        """Keep the state files of the last few commits per partition; delete older ones.

        The catalog rows are updated first (they stop naming the files), then the
        files go: a commit row never points at a missing file.
        """
        now = time.monotonic()
        if now - self._last_retire < RETIRE_EVERY_S:
            return
        self._last_retire = now
        for f in self.catalog.retire_state_files(keep=STATE_FILES_KEPT):
            self.state_store.delete(f)

    def _fault(self, point: str) -> None:
        if self.faults is not None:
            self.faults.hit(point, "manager")

    # ------------------------------------------------------------------ status
    async def status(self) -> dict:
        parts = []
        g = self.group
        for p in range(self.map.num_partitions):
            lease = g.leases.leases[p]
            c = g.committed.get(p)
            live = 0
            if lease.owner in g.members:
                live = g.members[lease.owner].processed.get(p, 0)
            parts.append(
                {
                    "partition": p,
                    "owner": lease.owner,
                    "lease_epoch": lease.epoch,
                    "state": lease.state.value,
                    "committed_rows": c.rows_total if c else 0,
                    "processed_rows": max(live, c.rows_total if c else 0),
                    "final": bool(c and c.final),
                    "load_rows_per_s": g.load.get(p, 0.0),
                }
            )
        return {
            "partitions": parts,
            "members": sorted(g.members),
            "done": g.done(),
            "rebalances": g.rebalances,
            "recoveries": g.recoveries,
        }

    async def moves_since(self, index: int = 0) -> list[dict]:
        """Completed partition moves (with their pause), from ``index`` on."""
        return self.moves[index:]

    async def output_files(self) -> list[str]:
        return self.catalog.all_output_files()

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        for w in self.watches.values():
            w.cancel()
        for part in ("catalog", "publisher"):
            if hasattr(self, part):
                getattr(self, part).close()


def _to_mono(firsts: dict[int, tuple[int, float]] | None) -> dict[int, tuple[int, float]] | None:
    """Members report wall times (comparable across processes); the coordinator runs on monotonic."""
    if not firsts:
        return firsts
    shift = time.monotonic() - time.time()
    return {p: (e, ts + shift) for p, (e, ts) in firsts.items()}
