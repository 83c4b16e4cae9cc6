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

import ray

from rayflow._internal.checkpoint.catalog import Catalog, CommitRecord
from rayflow._internal.checkpoint.store import Store
from rayflow._internal.group.assignment import assign
from rayflow._internal.group.leases import LeaseTable
from rayflow.config import EngineConfig
from rayflow.errors import FencedError, IncompatibleCheckpointError
from rayflow.partitioning import PartitionMap
from rayflow.sinks import PENDING_DIR


class _Member:
    def __init__(self, member_id: str, handle, epoch: int):
        self.id = member_id
        self.handle = handle
        self.epoch = epoch
        self.last_seen = time.monotonic()
        self.processed: dict[int, int] = {}
        self.watch: asyncio.Task | None = None


@ray.remote
class GroupManager:
    def __init__(
        self,
        *,
        name: str,
        catalog_path: str,
        state_root: str,
        sink_root: str,
        meta: dict[str, str],
        partition_map: PartitionMap,
        config: EngineConfig,
    ):
        self.name = name
        self.config = config
        self.catalog = Catalog(catalog_path)
        self.state_store = Store(state_root)
        self.sink_store = Store(sink_root)
        self.map = partition_map
        self._init_error: BaseException | None = None
        try:
            self._check_meta(meta)
        except BaseException as e:  # raised by ready(): an actor whose __init__ fails just dies
            self._init_error = e
        self.committed: dict[int, CommitRecord] = self.catalog.latest_commits()
        self.leases = LeaseTable(partition_map.num_partitions, self.catalog.lease_epochs())
        self.members: dict[str, _Member] = {}
        self.sources: list = []
        # Pause bookkeeping (DESIGN §7): when each moving partition stopped being
        # processed, and the grant it is waiting to see processed.
        self._pause_since: dict[int, tuple[float, str, str]] = {}  # p -> (wall time, why, from)
        self._pending_moves: dict[int, dict] = {}  # partition -> move awaiting its first batch
        self.moves: list[dict] = []
        self.expected_members = 0
        self.active = False
        self.member_epoch = 0
        self.rebalances = 0
        self.recoveries = 0
        self._repair_files()
        self._expiry: asyncio.Task | None = None  # started by ready(), inside the event loop

    # ------------------------------------------------------------------ setup
    def _check_meta(self, meta: dict[str, str]) -> None:
        old = self.catalog.get_meta()
        if old:
            for k in ("key", "partition_map", "operators"):
                if k in old and old[k] != meta.get(k):
                    raise IncompatibleCheckpointError(
                        f"the checkpoint of pipeline {self.name!r} was written with {k} = {old[k]}, "
                        f"but this run has {k} = {meta.get(k)}. Run with the original {k}, or start "
                        "afresh with a new checkpoint_dir or name."
                    )
            old_splits = set(json.loads(old.get("splits", "[]")))
            gone = sorted(old_splits - set(json.loads(meta.get("splits", "[]"))))
            if gone:
                raise IncompatibleCheckpointError(
                    f"the checkpoint of pipeline {self.name!r} has committed positions in input "
                    f"split(s) {gone[:5]} that this run's source does not have; resuming would "
                    "count their rows again or lose them. Run with the original input, or start "
                    "afresh with a new checkpoint_dir or name."
                )
        self.catalog.set_meta(meta)

    def _repair_files(self) -> None:
        """Publish committed outputs left pending; delete files no commit names."""
        committed_outputs = set(self.catalog.all_output_files())
        for rel in self.sink_store.list_files(PENDING_DIR):
            name = rel[len(PENDING_DIR) + 1 :]
            if name in committed_outputs:
                self.sink_store.move(rel, name)
            else:
                self.sink_store.delete(rel)
        live = self._all_state_files()
        for rel in self.state_store.list_files("state"):
            if rel not in live:
                self.state_store.delete(rel)

    def _all_state_files(self) -> set[str]:
        return self.catalog.all_state_files()

    async def ready(self) -> dict:
        """Committed positions per partition (for the source's start), and which are final."""
        if self._init_error is not None:
            raise self._init_error
        if self._expiry is None:
            self._expiry = asyncio.get_running_loop().create_task(self._expire_loop())
        return {
            "positions": {p: c.positions for p, c in self.committed.items()},
            "final": sorted(p for p, c in self.committed.items() if c.final),
        }

    # ------------------------------------------------------------------ membership
    async def join(self, member_id: str, handle) -> int:
        self.member_epoch += 1
        m = _Member(member_id, handle, self.member_epoch)
        self.members[member_id] = m
        m.watch = asyncio.get_running_loop().create_task(self._watch(m))
        self.catalog.record_event("join", {"member": member_id, "epoch": m.epoch})
        if self.active:
            self._rebalance("join")
        return m.epoch

    async def activate(self, expected_members: int) -> None:
        """First assignment, once the expected consumers have joined (no start-up churn)."""
        self.expected_members = expected_members
        self.active = True
        self._rebalance("start")

    async def _watch(self, m: _Member) -> None:
        try:
            await m.handle.watch.remote()
        except Exception:
            pass
        if self.members.get(m.id) is m:
            self._member_gone(m.id, "crash")

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            now = time.monotonic()
            for m in list(self.members.values()):
                if now - m.last_seen > self.config.session_timeout_s:
                    self._member_gone(m.id, "expiry")

    def _member_gone(self, member_id: str, why: str) -> None:
        m = self.members.pop(member_id, None)
        if m is None:
            return
        if m.watch is not None and why != "crash":
            m.watch.cancel()
        if why in ("crash", "expiry"):
            self.recoveries += 1
        now = time.time()
        for p in self.leases.owned_by(member_id):
            self._pause_since.setdefault(p, (now, why, member_id))
        target = self._target()
        moved = self.leases.drop_member(member_id, target)
        self._record_grants(moved)
        self.catalog.record_event(why, {"member": member_id, "moved": [g.partition for g in moved]})
        self._rebalance(why)

    async def leave(self, member_id: str) -> None:
        self._member_gone(member_id, "leave")

    def _loads(self) -> dict[int, float]:
        return {p: 1.0 for p in range(self.map.num_partitions) if not self._final(p)}

    def _final(self, p: int) -> bool:
        c = self.committed.get(p)
        return c is not None and c.final

    def _target(self) -> dict[int, str]:
        return assign(self._loads(), {m: 1.0 for m in self.members}, self.leases.owners())

    def _rebalance(self, why: str) -> None:
        if not self.active or not self.members:
            return
        before = self.leases.revoking()
        grants = self.leases.rebalance(self._target())
        now = time.time()
        for p in self.leases.revoking() - before:
            owner = self.leases.leases[p].owner
            self._pause_since.setdefault(p, (now, why, owner))
            self._poke(owner)
        self._record_grants(grants)
        if grants or self.leases.any_revoking():
            self.rebalances += 1
            self.catalog.record_event(
                "rebalance",
                {"why": why, "grants": [(g.partition, g.previous_owner, g.owner, g.epoch) for g in grants]},
            )

    def _poke(self, member_id: str | None) -> None:
        m = self.members.get(member_id) if member_id else None
        if m is not None:
            m.handle.poke.remote()

    def _record_grants(self, grants) -> None:
        """Persist grants (epochs survive a restart), tell the sources (fencing), wake the owners."""
        if not grants:
            return
        for g in grants:
            since = self._pause_since.pop(g.partition, None)
            if since is not None:
                self._pending_moves[g.partition] = {
                    "partition": g.partition,
                    "from": since[2],
                    "to": g.owner,
                    "epoch": g.epoch,
                    "why": since[1],
                    "since": since[0],
                }
            self._poke(g.owner)
        self.catalog.record_leases([(g.partition, g.owner, g.epoch) for g in grants])
        for src in self.sources:
            src.set_epochs.remote({g.partition: g.epoch for g in grants})

    async def set_sources(self, sources: list) -> None:
        self.sources = sources
        for src in sources:
            src.set_epochs.remote(self.leases.epochs())

    # ------------------------------------------------------------------ heartbeat
    async def heartbeat(
        self,
        member_id: str,
        member_epoch: int,
        processed: dict[int, int],
        firsts: dict[int, tuple[int, float]] | None = None,
    ) -> dict:
        """The member's assignment: partitions it owns (with epochs and last commits), and revocations.

        ``firsts``: partition -> (epoch, wall time) of the first batch processed
        since the member got it; closes the pause of a moved partition.
        """
        m = self.members.get(member_id)
        if m is None or m.epoch != member_epoch:
            return {"rejoin": True}
        m.last_seen = time.monotonic()
        m.processed = processed
        for p, (epoch, ts) in (firsts or {}).items():
            move = self._pending_moves.get(p)
            if move is not None and move["epoch"] == epoch and move["to"] == member_id:
                del self._pending_moves[p]
                move["pause_s"] = max(0.0, ts - move.pop("since"))
                move["at"] = ts
                self.moves.append(move)
                self.catalog.record_event("move", move)
        owned = self.leases.owned_by(member_id)
        return {
            "owned": owned,
            "revoke": self.leases.revoking_from(member_id),
            "commits": {p: self.committed.get(p) for p in owned},
        }

    async def release(self, member_id: str, partitions: dict[int, int]) -> None:
        """The member gives up revoked partitions (it has committed them)."""
        grants = []
        for p, epoch in partitions.items():
            try:
                g = self.leases.release(p, member_id, epoch)
            except FencedError:
                continue
            if g is not None:
                grants.append(g)
        self._record_grants(grants)

    # ------------------------------------------------------------------ commits
    async def commit(self, member_id: str, records: list[CommitRecord]) -> dict:
        """Validate and record commits (see the module doc). Returns accepted and fenced partitions."""
        ok, fenced = [], []
        for rec in records:
            try:
                self.leases.check(rec.partition, member_id, rec.lease_epoch)
            except FencedError:
                fenced.append(rec.partition)
                continue
            prev = self.committed.get(rec.partition)
            if prev is not None:
                back = {s: v for s, v in prev.positions.items() if rec.positions.get(s, 0) < v}
                if back:
                    raise ValueError(f"partition {rec.partition}: committed positions would go back: {back}")
            for f in rec.state_files:
                if not self.state_store.exists(f):
                    raise FileNotFoundError(f"partition {rec.partition}: state file {f} is missing")
            for f in rec.output_files:
                if not self.sink_store.exists(f"{PENDING_DIR}/{f}"):
                    raise FileNotFoundError(f"partition {rec.partition}: output file {f} is missing")
            ok.append(rec)
        if ok:
            self.catalog.record_commits(member_id, ok)
            for rec in ok:
                self.committed[rec.partition] = rec
                for f in rec.output_files:
                    self.sink_store.move(f"{PENDING_DIR}/{f}", f)
        return {"accepted": [r.partition for r in ok], "fenced": fenced}

    # ------------------------------------------------------------------ status
    async def status(self) -> dict:
        parts = []
        for p in range(self.map.num_partitions):
            lease = self.leases.leases[p]
            c = self.committed.get(p)
            live = 0
            if lease.owner in self.members:
                live = self.members[lease.owner].processed.get(p, 0)
            parts.append(
                {
                    "partition": p,
                    "owner": lease.owner,
                    "lease_epoch": lease.epoch,
                    "state": lease.state.value,
                    "committed_rows": c.rows_total if c else 0,
                    "processed_rows": max(live, c.rows_total if c else 0),
                    "final": bool(c and c.final),
                }
            )
        return {
            "partitions": parts,
            "members": sorted(self.members),
            "done": all(x["final"] for x in parts),
            "rebalances": self.rebalances,
            "recoveries": self.recoveries,
        }

    async def moves_since(self, index: int = 0) -> list[dict]:
        """Completed partition moves (with their pause), from ``index`` on."""
        return self.moves[index:]

    async def output_files(self) -> list[str]:
        return self.catalog.all_output_files()

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        for m in self.members.values():
            if m.watch is not None:
                m.watch.cancel()
        self.catalog.close()
