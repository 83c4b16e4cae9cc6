"""The consumer-group coordinator: every decision of the GroupManager, as plain data (pure).

No Ray, no I/O, no clock of its own (``now`` is passed in), so the whole
protocol runs in unit tests and Hypothesis state machines. Each call returns
:class:`Effects`: what the actor shell must do (persist grants, wake members,
record events), never doing it itself.

Membership (KIP-848 style, server-side and incremental):

- ``join`` gives a member epoch; once the group is active, a join rebalances:
  the target comes from :func:`assignment.assign`, and only partitions whose
  owner changes are revoked (no global barrier).
- ``heartbeat`` answers the member's assignment: the partitions it owns with
  their lease epochs and last commits, and the ones to give up.
- ``release`` is the owner giving up a revoked partition after committing
  it; it is then granted to its target from that commit.
- ``member_gone`` (leave, crash seen by Ray, or an expired session) hands the
  member's partitions straight to new owners from their last commits.

Commits are validated here (fencing, positions never go back) and applied
after the catalog has recorded them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rayflow._internal.checkpoint.commit import CommitRecord
from rayflow._internal.group.assignment import assign
from rayflow._internal.group.leases import Grant, LeaseState, LeaseTable
from rayflow.errors import FencedError

#: Weight of the newest sample in the per-partition load average.
_LOAD_ALPHA = 0.3


@dataclass
class Effects:
    grants: list[Grant] = field(default_factory=list)
    pokes: set[str] = field(default_factory=set)  # members to wake for an early heartbeat
    events: list[tuple[str, dict]] = field(default_factory=list)
    moves: list[dict] = field(default_factory=list)  # completed moves, with their pause

    def add(self, other: Effects) -> Effects:
        self.grants += other.grants
        self.pokes |= other.pokes
        self.events += other.events
        self.moves += other.moves
        return self


@dataclass
class Member:
    id: str
    epoch: int
    last_seen: float
    capacity: float = 1.0
    ghost: bool = False  # restored from the catalog after a restart, not yet re-joined
    processed: dict[int, int] = field(default_factory=dict)


class Coordinator:
    def __init__(
        self,
        num_partitions: int,
        *,
        epochs: dict[int, int] | None = None,
        committed: dict[int, CommitRecord] | None = None,
    ):
        self.num_partitions = num_partitions
        self.leases = LeaseTable(num_partitions, epochs)
        self.committed: dict[int, CommitRecord] = dict(committed or {})
        self.members: dict[str, Member] = {}
        self.member_epoch = 0
        self.active = False
        self.rebalances = 0
        self.recoveries = 0
        self.load: dict[int, float] = {}  # partition -> rows/s, smoothed
        self._last_rows: dict[int, tuple[float, int]] = {}
        self._pause_since: dict[int, tuple[float, str, str | None]] = {}  # p -> (time, why, from)
        self._pending_moves: dict[int, dict] = {}

    # ------------------------------------------------------------------ queries
    def final(self, p: int) -> bool:
        c = self.committed.get(p)
        return c is not None and c.final

    def done(self) -> bool:
        return all(self.final(p) for p in range(self.num_partitions))

    def _target(self) -> dict[int, str]:
        live = [p for p in range(self.num_partitions) if not self.final(p)]
        # Unknown loads count as the mean, so a new partition is neither free nor heavy.
        known = [self.load[p] for p in live if self.load.get(p, 0) > 0]
        default = sum(known) / len(known) if known else 1.0
        loads = {p: self.load.get(p) or default for p in live}
        return assign(loads, {m.id: m.capacity for m in self.members.values()}, self.leases.owners())

    # ------------------------------------------------------------------ transitions
    def _grants(self, grants: list[Grant], fx: Effects) -> None:
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
            fx.pokes.add(g.owner)
        fx.grants += grants

    def rebalance(self, why: str, now: float) -> Effects:
        fx = Effects()
        if not self.active or not self.members:
            return fx
        before = self.leases.revoking()
        grants = self.leases.rebalance(self._target())
        for p in self.leases.revoking() - before:
            owner = self.leases.leases[p].owner
            self._pause_since.setdefault(p, (now, why, owner))
            fx.pokes.add(owner)
        self._grants(grants, fx)
        if grants or self.leases.any_revoking():
            self.rebalances += 1
            fx.events.append(
                (
                    "rebalance",
                    {
                        "why": why,
                        "grants": [(g.partition, g.previous_owner, g.owner, g.epoch) for g in grants],
                        "revoking": sorted(self.leases.revoking()),
                    },
                )
            )
        return fx

    def activate(self, now: float) -> Effects:
        """First assignment, once the expected members have joined (no start-up churn)."""
        self.active = True
        return self.rebalance("start", now)

    def is_duplicate(self, rec: CommitRecord) -> bool:
        """Is ``rec`` a repeat of the last recorded commit (a retry after a lost reply)?"""
        prev = self.committed.get(rec.partition)
        return (
            prev is not None
            and prev.lease_epoch == rec.lease_epoch
            and prev.positions == rec.positions
            and prev.final == rec.final
            and set(rec.output_files) <= set(prev.output_files)
        )

    def join(
        self, member_id: str, now: float, claims: dict[int, int] | None = None, capacity: float = 1.0
    ) -> tuple[int, set[int], Effects]:
        """Admit a member; returns its member epoch, the claimed partitions it keeps, and effects.

        ``claims`` (partition -> lease epoch) is what a member still holds when
        it re-joins. Only a member coming back to a *restarted* coordinator (a
        ghost restored from the catalog) keeps the claims that match the
        recorded lease exactly; a member whose session was expired keeps nothing
        (its partitions already moved on, under higher epochs).
        """
        fx = Effects()
        kept: set[int] = set()
        old = self.members.get(member_id)
        if old is not None and old.ghost:
            for p, epoch in (claims or {}).items():
                lease = self.leases.leases.get(p)
                if lease is not None and lease.owner == member_id and lease.epoch == epoch:
                    kept.add(p)
            del self.members[member_id]
            for p in set(self.leases.owned_by(member_id)) - kept:  # held but not claimed: free it
                self._pause_since.setdefault(p, (now, "rejoin", member_id))
                self.leases.leases[p].owner = None
                self.leases.leases[p].state = LeaseState.UNASSIGNED
        elif old is not None:  # a re-join: whatever it held is gone with its old session
            fx.add(self.member_gone(member_id, "rejoin", now))
        self.member_epoch += 1
        self.members[member_id] = Member(member_id, self.member_epoch, now, capacity)
        fx.events.append(("join", {"member": member_id, "epoch": self.member_epoch, "kept": sorted(kept)}))
        return self.member_epoch, kept, fx.add(self.rebalance("join", now))

    def restore(self, owners: dict[int, str], now: float) -> None:
        """After a coordinator restart: the recorded owners become ghost members.

        A ghost keeps its partitions until it re-joins (and claims them) or its
        session times out like any silent member; the group is active at once.
        """
        for p, owner in owners.items():
            if owner is None or p not in self.leases.leases or self.final(p):
                continue
            lease = self.leases.leases[p]
            lease.owner, lease.state = owner, LeaseState.OWNED
            if owner not in self.members:
                self.members[owner] = Member(owner, -1, now, ghost=True)
        self.active = True

    def drop_ghosts(self, now: float) -> Effects:
        """A new run starts: owners recorded by an earlier run will not come back."""
        fx = Effects()
        for m in [m for m in self.members.values() if m.ghost]:
            fx.add(self.member_gone(m.id, "expiry", now))
        return fx

    def member_gone(self, member_id: str, why: str, now: float) -> Effects:
        """``why``: leave (graceful, already committed), crash, expiry or rejoin."""
        fx = Effects()
        if self.members.pop(member_id, None) is None:
            return fx
        if why in ("crash", "expiry"):
            self.recoveries += 1
        for p in self.leases.owned_by(member_id):
            self._pause_since.setdefault(p, (now, why, member_id))
        target = self._target() if self.members else {}
        moved = self.leases.drop_member(member_id, target)
        self._grants(moved, fx)
        fx.events.append((why, {"member": member_id, "moved": [g.partition for g in moved]}))
        return fx.add(self.rebalance(why, now))

    def expire(self, now: float, session_timeout_s: float) -> Effects:
        fx = Effects()
        for m in list(self.members.values()):
            if now - m.last_seen > session_timeout_s:
                fx.add(self.member_gone(m.id, "expiry", now))
        return fx

    def heartbeat(
        self,
        member_id: str,
        member_epoch: int,
        now: float,
        processed: dict[int, int] | None = None,
        firsts: dict[int, tuple[int, float]] | None = None,
    ) -> tuple[dict, Effects]:
        """The member's assignment. ``firsts`` closes the pause of partitions moved to it."""
        fx = Effects()
        m = self.members.get(member_id)
        if m is None or m.epoch != member_epoch or m.ghost:
            return {"rejoin": True}, fx
        m.last_seen = now
        for p, rows in (processed or {}).items():
            prev = self._last_rows.get(p)
            if prev is not None and now > prev[0] and rows >= prev[1]:
                rate = (rows - prev[1]) / (now - prev[0])
                self.load[p] = _LOAD_ALPHA * rate + (1 - _LOAD_ALPHA) * self.load.get(p, rate)
            self._last_rows[p] = (now, rows)
        m.processed = dict(processed or {})
        for p, (epoch, ts) in (firsts or {}).items():
            move = self._pending_moves.get(p)
            if move is not None and move["epoch"] == epoch and move["to"] == member_id:
                del self._pending_moves[p]
                move["pause_s"] = max(0.0, ts - move.pop("since"))
                move["at"] = ts
                fx.moves.append(move)
                fx.events.append(("move", move))
        owned = self.leases.owned_by(member_id)
        reply = {
            "owned": owned,
            "revoke": self.leases.revoking_from(member_id),
            "commits": {p: self.committed.get(p) for p in owned},
        }
        return reply, fx

    def release(self, member_id: str, partitions: dict[int, int]) -> Effects:
        """The member gives up revoked partitions (it has committed them); stale ones are ignored."""
        fx = Effects()
        for p, epoch in partitions.items():
            try:
                g = self.leases.release(p, member_id, epoch)
            except FencedError:
                continue
            if g is not None:
                self._grants([g], fx)
        return fx

    # ------------------------------------------------------------------ commits
    def validate_commit(self, member_id: str, rec: CommitRecord) -> None:
        """Raise :class:`FencedError` for a stale lease, ``ValueError`` if positions would go back."""
        self.leases.check(rec.partition, member_id, rec.lease_epoch)
        prev = self.committed.get(rec.partition)
        if prev is not None:
            back = {s: v for s, v in prev.positions.items() if rec.positions.get(s, 0) < v}
            if back:
                raise ValueError(
                    f"partition {rec.partition}: a commit may not move positions back ({back} -> "
                    f"{ {s: rec.positions.get(s, 0) for s in back} }); this is a bug, please report it"
                )
            if prev.final:
                raise ValueError(f"partition {rec.partition} is final; nothing may be committed after it")

    def apply_commit(self, rec: CommitRecord) -> None:
        """Called once the catalog has recorded ``rec``."""
        self.committed[rec.partition] = rec
