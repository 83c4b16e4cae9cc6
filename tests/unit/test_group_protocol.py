"""The group protocol as a seeded Hypothesis state machine over the pure Coordinator.

Consumers join, leave gracefully, crash, freeze until their session expires
(and come back as zombies, then re-join), heartbeat, process, commit (final
commits too), retry a commit whose reply was lost, and release. A release is
*asynchronous*: the owner commits and drops a revoked partition when its
heartbeat says so, but the release reaches the coordinator at a later step,
with anything interleaved (joins, leaves, crashes, expiries, zombie commits,
rebalances, a manager restart). The manager restart builds a new Coordinator
from what the catalog holds: the lease epochs and owners of the recorded
grants (every grant an :class:`Effects` carried) and the latest commits; the
owners come back as ghosts, and live consumers re-join with their claims when
their next heartbeat says so. In-flight releases are either lost with the old
manager or delivered to the new one.

A well-behaved consumer here does what ``ConsumerActor._heartbeat`` does: on
``rejoin`` it re-joins with what it holds as claims and keeps what is kept; it
drops what it no longer owns under the same epoch, loads new partitions from
``commits``, commits revoked ones, then sends their release and forgets them.

After every step:

- never two owners: at most one process, live or zombie, holds a partition
  under an epoch the coordinator would accept;
- lease epochs never go back and rise at every change of owner; an epoch
  names one owner only, across restarts;
- every grant was carried by the effects (the catalog holds every epoch);
- recorded positions never go back;
- a stale owner's commit (an older epoch, or a member the coordinator dropped)
  is always fenced, also when it repeats the last recorded commit;
- liveness: from this state, once the interleaving stops, all in-flight
  releases are delivered and the live consumers keep heartbeating (and time
  passes), every non-final partition is OWNED by a live consumer that holds it
  in memory, within ``LIVENESS_ROUNDS`` heartbeat rounds, as long as one
  consumer lives;
- once the group settles (all OWNED, no ghosts): counts balanced within 1, and
  a join into a settled group moves only about P / (N + 1) partitions, all to
  the newcomer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from rayflow._internal.checkpoint.commit import CommitRecord
from rayflow._internal.group.coordinator import Coordinator, Effects
from rayflow._internal.group.leases import LeaseState
from rayflow.errors import FencedError

P = 8
TIMEOUT_S = 10.0
HEARTBEAT_S = 1.0
#: Ghosts expire after TIMEOUT_S of silence; a move then takes a revoke, a release, a grant.
LIVENESS_ROUNDS = int(TIMEOUT_S / HEARTBEAT_S) + 5


def record(p: int, epoch: int, pos: int, final: bool = False) -> CommitRecord:
    return CommitRecord(
        partition=p,
        lease_epoch=epoch,
        positions={"s": pos},
        state_files=[],
        output_files=[],
        rows_in=0,
        rows_total=pos,
        state_rows=0,
        final=final,
        map_version=1,
    )


@dataclass
class Held:
    """A partition as a consumer process holds it in memory."""

    epoch: int
    pos: int
    final: bool = False


@dataclass
class World:
    """The coordinator, the catalog's view of it, and every consumer process (plain data, copyable)."""

    g: Coordinator = field(default_factory=lambda: Coordinator(P))
    now: float = 0.0
    next_id: int = 0
    alive: set[str] = field(default_factory=set)  # running, well-behaved consumers
    frozen: set[str] = field(default_factory=set)  # expired while frozen; may come back
    held: dict[str, dict[int, Held]] = field(default_factory=dict)  # every process, zombies too
    member_epoch: dict[str, int] = field(default_factory=dict)
    in_flight: list[tuple[str, dict[int, int]]] = field(default_factory=list)  # releases sent
    last_sent: dict[str, dict[int, CommitRecord]] = field(default_factory=dict)  # accepted ones
    catalog_leases: dict[int, tuple[str, int]] = field(default_factory=dict)  # recorded grants
    grantee: dict[tuple[int, int], str] = field(default_factory=dict)  # (p, epoch) -> owner

    # ------------------------------------------------------------------ the manager's shell
    def apply(self, fx: Effects) -> Effects:
        """What GroupManager._apply persists: every grant, into the catalog."""
        for gr in fx.grants:
            assert gr.epoch > self.latest_epoch(gr.partition), gr
            assert self.grantee.setdefault((gr.partition, gr.epoch), gr.owner) == gr.owner
            self.catalog_leases[gr.partition] = (gr.owner, gr.epoch)
        return fx

    def latest_epoch(self, p: int) -> int:
        return self.catalog_leases.get(p, ("", 0))[1]

    def restart_manager(self, lose_in_flight: bool) -> None:
        assert {p: e for p, (_, e) in self.catalog_leases.items()} == {
            p: e for p, e in self.g.leases.epochs().items() if e > 0
        }
        epochs = {p: e for p, (_, e) in self.catalog_leases.items()}
        self.g = Coordinator(P, epochs=epochs, committed=dict(self.g.committed))
        self.g.restore({p: o for p, (o, _) in self.catalog_leases.items()}, self.now)
        if lose_in_flight:
            self.in_flight.clear()

    # ------------------------------------------------------------------ a consumer process
    def join_new(self) -> str:
        m = f"m{self.next_id}"
        self.next_id += 1
        self.alive.add(m)
        self.held[m], self.last_sent[m] = {}, {}
        self.member_epoch[m], _, fx = self.g.join(m, self.now)
        self.apply(fx)
        return m

    def heartbeat(self, m: str) -> None:
        """One heartbeat of a well-behaved consumer (as ``ConsumerActor._heartbeat``)."""
        reply, fx = self.g.heartbeat(m, self.member_epoch[m], self.now)
        self.apply(fx)
        held = self.held[m]
        if reply.get("rejoin"):
            claims = {p: h.epoch for p, h in held.items()}
            self.member_epoch[m], kept, fx = self.g.join(m, self.now, claims)
            self.apply(fx)
            self.held[m] = {p: h for p, h in held.items() if p in kept}
            return
        owned: dict[int, int] = reply["owned"]
        for p in list(held):
            if owned.get(p) != held[p].epoch:
                del held[p]  # moved on: uncommitted work goes
        for p, epoch in owned.items():
            if p not in held:  # new, or given back after a cancelled revocation: from its commit
                c = reply["commits"][p]
                held[p] = Held(epoch, c.positions["s"] if c else 0, bool(c and c.final))
        revoke = [p for p in reply["revoke"] if p in held]
        for p in revoke:
            if not held[p].final:
                self.commit(m, p)
        release = {p: held[p].epoch for p in revoke if p in held}
        for p in revoke:
            held.pop(p, None)
        if release:
            self.in_flight.append((m, release))  # delivered at a later step

    def must_fence(self, m: str, rec: CommitRecord) -> bool:
        """A stale owner: an older epoch than the latest grant, or a member the coordinator dropped."""
        return rec.lease_epoch < self.latest_epoch(rec.partition) or m not in self.g.members

    def commit(self, m: str, p: int, *, final: bool = False) -> None:
        h = self.held[m].get(p)
        if h is None:
            return
        rec = record(p, h.epoch, h.pos, final or h.final)
        stale = self.must_fence(m, rec)
        try:
            repeat = self.g.check_commit(m, rec)
        except FencedError:
            del self.held[m][p]  # the consumer abandons it
            return
        assert not stale, (m, rec)
        assert self.grantee[(p, rec.lease_epoch)] == m
        if not repeat:
            self.g.apply_commit(rec)  # the catalog recorded it
        self.last_sent[m][p] = rec
        h.final = rec.final

    def retry(self, m: str, p: int) -> None:
        """The reply to ``m``'s last accepted commit of ``p`` was lost: it sends it again."""
        rec = self.last_sent[m][p]
        try:
            repeat = self.g.check_commit(m, rec)
        except FencedError:
            self.held[m].pop(p, None)
            return
        assert not self.must_fence(m, rec), (m, rec)
        assert repeat, (m, rec, self.g.committed.get(p))  # only m can have committed since

    def deliver(self, i: int) -> None:
        m, release = self.in_flight.pop(i)
        self.apply(self.g.release(m, release))

    def tick(self) -> None:
        self.now += HEARTBEAT_S
        self.apply(self.g.expire(self.now, TIMEOUT_S))

    # ------------------------------------------------------------------ liveness
    def live_ok(self) -> bool:
        for p, lease in self.g.leases.leases.items():
            if self.g.final(p):
                continue
            o = lease.owner
            if lease.state is not LeaseState.OWNED or o not in self.alive:
                return False
            m = self.g.members.get(o)
            h = self.held[o].get(p)
            if m is None or m.ghost or h is None or h.epoch != lease.epoch:
                return False
        return True

    def drain(self) -> int | None:
        """Stop interleaving; deliver releases; heartbeat every live consumer each round.

        Returns the rounds it took until every non-final partition is owned and held.
        """
        for rounds in range(LIVENESS_ROUNDS):
            while self.in_flight:
                self.deliver(0)
            for m in sorted(self.alive):
                self.heartbeat(m)
            if self.live_ok():
                return rounds
            self.tick()
        return None


class GroupMachine(RuleBasedStateMachine):
    @initialize(n=st.integers(1, 3))
    def start(self, n):
        self.w = World()
        for _ in range(n):
            self.w.join_new()
        self.w.apply(self.w.g.activate(self.w.now))
        self.epoch_seen: dict[int, tuple[int, str | None]] = {p: (0, None) for p in range(P)}
        self.committed_seen: dict[int, int] = {}
        self.settle()

    def live(self) -> list[str]:
        return sorted(self.w.alive)

    def settle(self) -> None:
        for _ in range(4):
            while self.w.in_flight:
                self.w.deliver(0)
            for m in self.live():
                self.w.heartbeat(m)

    def is_settled(self) -> bool:
        g = self.w.g
        if set(g.members) != self.w.alive or any(m.ghost for m in g.members.values()):
            return False
        return all(
            lease.state is LeaseState.OWNED and lease.owner is not None
            for p, lease in g.leases.leases.items()
            if not g.final(p)
        )

    # ------------------------------------------------------------------ membership
    @rule()
    def join(self):
        self.w.join_new()

    @precondition(lambda self: self.is_settled())
    @rule()
    def join_into_settled_group(self):
        before = self.w.g.leases.owners()
        m = self.w.join_new()
        self.settle()
        if self.is_settled():
            after = self.w.g.leases.owners()
            moved = [p for p in range(P) if before[p] != after[p]]
            assert all(after[p] == m for p in moved), (before, after)
            assert len(moved) <= -(-P // len(self.w.g.members))

    @precondition(lambda self: len(self.w.alive) > 1)
    @rule(data=st.data())
    def leave(self, data):
        m = data.draw(st.sampled_from(self.live()))
        for p in sorted(self.w.held[m]):
            if not self.w.held[m][p].final:
                self.w.commit(m, p)
        self.w.apply(self.w.g.member_gone(m, "leave", self.w.now))
        self.w.alive.discard(m)
        self.w.held[m] = {}

    @precondition(lambda self: len(self.w.alive) > 1)
    @rule(data=st.data())
    def crash(self, data):
        m = data.draw(st.sampled_from(self.live()))
        self.w.apply(self.w.g.member_gone(m, "crash", self.w.now))  # Ray saw it die
        self.w.alive.discard(m)  # what it held stays: a late message may still arrive

    @precondition(lambda self: len(self.w.alive) > 1)
    @rule(data=st.data())
    def freeze_until_expired(self, data):
        m = data.draw(st.sampled_from(self.live()))
        self.w.now += TIMEOUT_S + 1
        for other in self.live():
            if other != m:
                self.w.heartbeat(other)
        self.w.apply(self.w.g.expire(self.w.now, TIMEOUT_S))
        assert m not in self.w.g.members
        self.w.alive.discard(m)
        self.w.frozen.add(m)

    @precondition(lambda self: self.w.frozen)
    @rule(data=st.data())
    def zombie_comes_back(self, data):
        m = data.draw(st.sampled_from(sorted(self.w.frozen)))
        for p in sorted(self.w.held[m]):
            self.w.commit(m, p)  # fenced unless a restart gave it back as a ghost
        self.w.frozen.discard(m)
        self.w.alive.add(m)
        self.w.heartbeat(m)  # answered with rejoin: it re-joins with what it still holds

    @precondition(lambda self: self.w.alive)
    @rule(data=st.data())
    def heartbeat(self, data):
        self.w.heartbeat(data.draw(st.sampled_from(self.live())))

    @rule()
    def tick(self):
        self.w.tick()

    @rule()
    def rebalance(self):
        self.w.apply(self.w.g.rebalance("test", self.w.now))

    @precondition(lambda self: self.w.in_flight)
    @rule(data=st.data())
    def deliver_release(self, data):
        self.w.deliver(data.draw(st.integers(0, len(self.w.in_flight) - 1)))

    @rule(lose_in_flight=st.booleans())
    def manager_restart(self, lose_in_flight):
        self.w.restart_manager(lose_in_flight)

    # ------------------------------------------------------------------ work and commits
    def _pick_held(self, data, processes) -> tuple[str, int] | None:
        choices = sorted((m, p) for m in processes for p in self.w.held[m])
        return data.draw(st.sampled_from(choices)) if choices else None

    @rule(data=st.data(), rows=st.integers(1, 5))
    def process(self, data, rows):
        pick = self._pick_held(data, self.live())
        if pick is not None and not self.w.held[pick[0]][pick[1]].final:
            self.w.held[pick[0]][pick[1]].pos += rows

    @rule(data=st.data())
    def commit(self, data):
        pick = self._pick_held(data, sorted(self.w.held))  # live consumers and zombies alike
        if pick is not None:
            self.w.commit(*pick)

    @rule(data=st.data())
    def finish(self, data):
        pick = self._pick_held(data, self.live())
        if pick is not None:
            self.w.commit(*pick, final=True)

    @rule(data=st.data())
    def retry_last_commit(self, data):
        choices = sorted((m, p) for m, sent in self.w.last_sent.items() for p in sent)
        if choices:
            self.w.retry(*data.draw(st.sampled_from(choices)))

    # ------------------------------------------------------------------ invariants
    @invariant()
    def never_two_owners(self):
        for p in range(P):
            holders = [
                m
                for m, held in self.w.held.items()
                if p in held and self.w.g.leases.holds(p, m, held[p].epoch)
            ]
            assert len(holders) <= 1, (p, holders)

    @invariant()
    def epochs_rise_with_every_owner_change_and_name_one_owner(self):
        for p, lease in self.w.g.leases.leases.items():
            old_epoch, old_owner = self.epoch_seen[p]
            assert lease.epoch >= old_epoch
            assert lease.epoch == self.w.latest_epoch(p)  # every grant reached the catalog
            if lease.owner is not None:
                if old_owner is not None and lease.owner != old_owner:
                    assert lease.epoch > old_epoch
                assert self.w.grantee[(p, lease.epoch)] == lease.owner
                self.epoch_seen[p] = (lease.epoch, lease.owner)

    @invariant()
    def positions_never_go_back(self):
        for p, c in self.w.g.committed.items():
            assert c.positions["s"] >= self.committed_seen.get(p, 0)
            self.committed_seen[p] = c.positions["s"]

    @invariant()
    def settled_groups_are_balanced(self):
        g = self.w.g
        if not self.is_settled() or any(g.final(p) for p in range(P)):
            return  # a partition that ends its input moves nowhere: no rebalance for it
        counts = {m: 0 for m in g.members}
        for lease in g.leases.leases.values():
            counts[lease.owner] += 1
        assert max(counts.values()) - min(counts.values()) <= 1, counts

    @invariant()
    def every_partition_is_owned_again_once_the_interleaving_stops(self):
        if not self.w.alive:
            return
        sim = copy.deepcopy(self.w)
        assert sim.drain() is not None, "a non-final partition stayed without a live owner"


GroupMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, derandomize=True, deadline=None
)
test_group_protocol = GroupMachine.TestCase
