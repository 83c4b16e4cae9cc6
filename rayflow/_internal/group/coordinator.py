"""The consumer-group coordinator: every decision of the GroupManager, as plain data (pure).

No Ray, no I/O, no clock of its own (``now`` is passed in), so the whole
protocol runs in unit tests and Hypothesis state machines. Each call returns
:class:`Effects`: what the actor shell must do (persist grants, wake members,
record events), never doing it itself. Leases change only through
:class:`~rayflow._internal.group.leases.LeaseTable` methods.

Membership (KIP-848 style, server-side and incremental):

- ``join`` gives a member epoch; once the group is active, a join rebalances:
  the target comes from :func:`assignment.assign`, and only partitions whose
  owner changes are revoked (no global barrier).
- ``heartbeat`` answers the member's assignment: the partitions it owns with
  their lease epochs and last commits (``commits``: a partition it does not
  hold in memory is loaded from there), and the ones to give up.
- ``release`` is the owner giving up a revoked partition after committing
  it; it is then granted to its target from that commit. A release acts only
  on a lease REVOKING from that owner under that epoch: if the revocation was
  cancelled meanwhile (the target left, died, or a rebalance picked the owner
  again), the release is a no-op reported in an event, the owner keeps the
  lease, and its next heartbeat lists the partition again, with its last
  commit, for it to reload. A stale release is ignored (and reported).
- ``member_gone`` (leave, crash seen by Ray, or an expired session) hands the
  member's partitions straight to new owners from their last commits.

Liveness: every call that can leave a non-final lease without an owner
(``member_gone``, a ghost's ``join`` that does not claim everything it held)
rebalances before it returns, so such a lease is granted at once whenever a
member can take it. Final partitions are never granted.

Restart: a new coordinator is built from the catalog (lease epochs, latest
commits), and :meth:`Coordinator.restore` makes the recorded owners *ghosts*
that hold their leases under the recorded epochs. A ghost that re-joins keeps
the partitions it claims with matching epochs; the rest are freed and
reassigned. A ghost that never re-joins is expired like any silent member.

Commits: :meth:`Coordinator.check_commit` fences first (a stale epoch is
refused even when the record repeats the last recorded one), then recognizes
an exact repeat, then validates (positions never go back, nothing after a
final commit). :meth:`Coordinator.apply_commit` is called once the catalog
has recorded the commit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rayflow._internal.checkpoint.commit import CommitRecord
from rayflow._internal.group.assignment import assign, assign_tiered, tier_roles
from rayflow._internal.group.leases import Grant, LeaseTable
from rayflow._internal.tiers import TierTable
from rayflow.errors import FencedError, ProtocolError

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
    ghost: bool = False  # restored from the catalog after a restart, not yet re-joined
    processed: dict[int, int] = field(default_factory=dict)


class Coordinator:
    def __init__(
        self,
        num_partitions: int,
        *,
        epochs: dict[int, int] | None = None,
        committed: dict[int, CommitRecord] | None = None,
        tiers: TierTable | None = None,
    ):
        """``tiers``: priority tiers (docs/tiers.md); ``None``: every partition alike."""
        self.num_partitions = num_partitions
        self.tiers = tiers if tiers is not None and not tiers.trivial else None
        #: member -> the rank it is dedicated to, as of the last target (for status).
        self.roles: dict[str, int] = {}
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
        # A ghost takes no new partition (it may never come back); what it holds moves to
        # live members unless it re-joins first, when the next rebalance gives it back.
        # Every member weighs the same today; assign() takes capacities for tiers to come.
        takers = {m.id: 1.0 for m in self.members.values() if not m.ghost}
        if self.tiers is None:
            return assign(loads, takers, self.leases.owners())
        owners = self.leases.owners()
        t = self.tiers
        self.roles = tier_roles(t.ranks, t.dedicated, takers, owners, live=live)
        return assign_tiered(loads, takers, owners, ranks=t.ranks, roles=self.roles)

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

    def join(
        self, member_id: str, now: float, claims: dict[int, int] | None = None
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
            kept = {p for p, epoch in (claims or {}).items() if self.leases.holds(p, member_id, epoch)}
            del self.members[member_id]
            for p in sorted(set(self.leases.owned_by(member_id)) - kept):
                # Held but not claimed: the member dropped it (or never got its grant). It is
                # granted again by the rebalance below.
                self._pause_since.setdefault(p, (now, "rejoin", member_id))
                self.leases.free(p)
        elif old is not None:  # a re-join: whatever it held is gone with its old session
            fx.add(self.member_gone(member_id, "rejoin", now))
        self.member_epoch += 1
        self.members[member_id] = Member(member_id, self.member_epoch, now)
        fx.events.append(("join", {"member": member_id, "epoch": self.member_epoch, "kept": sorted(kept)}))
        return self.member_epoch, kept, fx.add(self.rebalance("join", now))

    def restore(self, owners: dict[int, str], now: float) -> None:
        """After a coordinator restart: the recorded owners become ghost members.

        ``owners`` must be the owners the catalog recorded with the lease epochs
        this coordinator was built from (each the grantee of that epoch): a
        restored lease keeps its epoch. A ghost keeps its partitions until it
        re-joins (and claims them) or its session times out like any silent
        member; the group is active at once. Final partitions are not restored.
        """
        for p, owner in sorted(owners.items()):
            if owner is None or p not in self.leases.leases or self.final(p):
                continue
            self.leases.restore_owner(p, owner)
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

    def renew(self, member_id: str, partitions: dict[int, int]) -> tuple[dict[int, int | None], Effects]:
        """The member fences its own unknown-outcome commits: each partition it holds under
        the given epoch gets epoch + 1 (``LeaseTable.renew``); returns the new epoch per
        partition, None where it no longer holds it. The grants must be recorded (effects)."""
        fx = Effects()
        epochs: dict[int, int | None] = {}
        for p, epoch in sorted(partitions.items()):
            try:
                g = self.leases.renew(p, member_id, epoch)
            except FencedError:
                epochs[p] = None
                continue
            epochs[p] = g.epoch
            fx.grants.append(g)
        return epochs, fx

    def release(self, member_id: str, partitions: dict[int, int]) -> Effects:
        """The member gives up revoked partitions (it has committed them and dropped them).

        Each release acts only on a lease REVOKING from ``member_id`` under the
        given epoch, and grants it to the revocation's target. Anything else
        changes nothing and is reported in a ``release`` event: a lease the
        member still owns because its revocation was cancelled (``kept``; the
        member is woken so that its next heartbeat, which lists the partition
        with its last commit, comes soon) or a stale epoch (``stale``).
        """
        fx = Effects()
        granted, kept, stale = [], [], []
        for p, epoch in sorted(partitions.items()):
            try:
                g = self.leases.release(p, member_id, epoch)
            except FencedError:
                stale.append(p)
                continue
            if g is None:
                kept.append(p)
            else:
                granted.append(p)
                self._grants([g], fx)
        if kept:
            fx.pokes.add(member_id)
        if kept or stale:  # a plain release shows as the move it completes
            detail = {"member": member_id, "granted": granted, "kept": kept, "stale": stale}
            fx.events.append(("release", detail))
        return fx

    # ------------------------------------------------------------------ commits
    def check_commit(self, member_id: str, rec: CommitRecord) -> bool:
        """Check ``rec`` before the catalog records it; True if it repeats the last recorded one.

        In this order:

        1. Fence: raise :class:`FencedError` unless ``member_id`` holds the
           partition under ``rec.lease_epoch``. First, so a zombie's retry of a
           commit that did land is refused once its lease has moved on.
        2. Repeat: return True if ``rec`` repeats the last recorded commit of
           its partition (same lease epoch, positions and finality, no output
           file that commit does not name): a retry after a lost reply, to be
           answered accepted and not recorded again.
        3. Validate: raise :class:`ProtocolError` if the partition's last
           commit was final, or if ``rec`` moves a split's position back.
           Return False: ``rec`` is new and may be recorded.
        """
        self.leases.check(rec.partition, member_id, rec.lease_epoch)
        prev = self.committed.get(rec.partition)
        if prev is None:
            return False
        if (
            prev.lease_epoch == rec.lease_epoch
            and prev.positions == rec.positions
            and prev.final == rec.final
            and set(rec.output_files) <= set(prev.output_files)
        ):
            return True
        if prev.final:
            raise ProtocolError(
                f"partition {rec.partition} is final (its last commit, lease epoch "
                f"{prev.lease_epoch}, ended its input); nothing may be committed after it, "
                f"yet {member_id!r} sent a commit under epoch {rec.lease_epoch}; this is a bug, "
                "please report it"
            )
        back = {s: v for s, v in prev.positions.items() if rec.positions.get(s, 0) < v}
        if back:
            raise ProtocolError(
                f"partition {rec.partition}: a commit may not move positions back ({back} -> "
                f"{ {s: rec.positions.get(s, 0) for s in back} }); this is a bug, please report it"
            )
        return False

    def apply_commit(self, rec: CommitRecord) -> None:
        """Called once the catalog has recorded ``rec``."""
        self.committed[rec.partition] = rec
