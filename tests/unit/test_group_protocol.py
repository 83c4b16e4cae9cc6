"""The group protocol as a seeded Hypothesis state machine over the pure Coordinator.

Members join, leave gracefully, crash, freeze until their session expires
(and come back as zombies), heartbeat, commit and release. After every step:

- never two owners: at most one member, live or zombie, holds a partition under
  an epoch the coordinator would accept;
- lease epochs never go back, and rise at every change of owner;
- committed positions never go back;
and once the group settles: every partition owned, counts balanced within 1,
and a join into a settled group moves only about P / (N + 1) partitions, all to
the newcomer.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from rayflow._internal.checkpoint.commit import CommitRecord
from rayflow._internal.group.coordinator import Coordinator
from rayflow._internal.group.leases import LeaseState
from rayflow.errors import FencedError

P = 12
TIMEOUT_S = 10.0


def record(p, epoch, pos) -> CommitRecord:
    return CommitRecord(
        partition=p,
        lease_epoch=epoch,
        positions={"s": pos},
        state_files=[],
        output_files=[],
        rows_in=0,
        rows_total=pos,
        state_rows=0,
        final=False,
        map_version=1,
    )


class GroupMachine(RuleBasedStateMachine):
    @initialize(n=st.integers(1, 3))
    def start(self, n):
        self.now = 0.0
        self.g = Coordinator(P)
        self.beliefs: dict[str, dict[int, int]] = {}  # what each member (or zombie) thinks it owns
        self.epochs: dict[str, int] = {}
        self.positions: dict[int, int] = {}  # what a member has processed, per partition
        self.committed_seen: dict[int, int] = {}
        self.epoch_seen: dict[int, tuple[int, str | None]] = {p: (0, None) for p in range(P)}
        self.next_id = 0
        for _ in range(n):
            self._join()
        self.g.activate(self.now)
        self.settle()

    def _join(self) -> str:
        m = f"m{self.next_id}"
        self.next_id += 1
        self.epochs[m], _, _ = self.g.join(m, self.now)
        self.beliefs[m] = {}
        return m

    def live(self):
        return sorted(self.g.members)

    def _heartbeat(self, m):
        reply, _ = self.g.heartbeat(m, self.epochs[m], self.now)
        if reply.get("rejoin"):
            self.beliefs[m] = {}
            return
        self.beliefs[m] = dict(reply["owned"])
        if reply["revoke"]:
            for p in reply["revoke"]:
                self._commit(m, p)  # a revoked partition is committed first ...
            self.g.release(m, {p: self.beliefs[m][p] for p in reply["revoke"] if p in self.beliefs[m]})
            for p in reply["revoke"]:  # ... then given up
                self.beliefs[m].pop(p, None)

    def _commit(self, m, p):
        epoch = self.beliefs[m].get(p)
        if epoch is None:
            return
        pos = self.positions.get(p, 0) + 7
        rec = record(p, epoch, pos)
        try:
            self.g.validate_commit(m, rec)
        except FencedError:
            self.beliefs[m].pop(p, None)
            return
        self.g.apply_commit(rec)
        self.positions[p] = pos

    def settle(self):
        for _ in range(4):
            for m in self.live():
                self._heartbeat(m)

    @rule()
    def join(self):
        settled = self.is_settled()
        before = self.g.leases.owners()
        m = self._join()
        self.settle()
        if settled:
            after = self.g.leases.owners()
            moved = [p for p in range(P) if before[p] != after[p]]
            assert all(after[p] == m for p in moved)
            assert len(moved) <= -(-P // len(self.live()))

    @precondition(lambda self: len(self.g.members) > 1)
    @rule(data=st.data())
    def leave(self, data):
        m = data.draw(st.sampled_from(self.live()))
        for p in list(self.beliefs[m]):
            self._commit(m, p)
        self.g.member_gone(m, "leave", self.now)
        self.beliefs[m] = {}

    @precondition(lambda self: len(self.g.members) > 1)
    @rule(data=st.data())
    def crash(self, data):
        m = data.draw(st.sampled_from(self.live()))
        self.g.member_gone(m, "crash", self.now)  # beliefs stay: a zombie may still try

    @precondition(lambda self: len(self.g.members) > 1)
    @rule(data=st.data())
    def freeze_until_expired(self, data):
        m = data.draw(st.sampled_from(self.live()))
        self.now += TIMEOUT_S + 1
        for other in self.live():
            if other != m:
                self._heartbeat(other)
        self.g.expire(self.now, TIMEOUT_S)
        assert m not in self.g.members

    @rule(data=st.data())
    def heartbeat(self, data):
        self._heartbeat(data.draw(st.sampled_from(self.live())))

    @rule(data=st.data())
    def commit(self, data):
        m = data.draw(st.sampled_from(sorted(self.beliefs)))  # live members and zombies alike
        if self.beliefs[m]:
            self._commit(m, data.draw(st.sampled_from(sorted(self.beliefs[m]))))

    @rule(data=st.data())
    def zombie_comes_back(self, data):
        zombies = [m for m in self.beliefs if m not in self.g.members]
        if zombies:
            m = data.draw(st.sampled_from(sorted(zombies)))
            for p in list(self.beliefs[m]):
                self._commit(m, p)  # every one of these must be fenced
            assert not self.beliefs[m]
            self._heartbeat(m)  # answered with rejoin

    @rule()
    def settle_rule(self):
        self.settle()

    # ------------------------------------------------------------------ invariants
    @invariant()
    def never_two_owners(self):
        for p in range(P):
            holders = []
            for m, owned in self.beliefs.items():
                if p in owned:
                    try:
                        self.g.leases.check(p, m, owned[p])
                        holders.append(m)
                    except FencedError:
                        pass
            assert len(holders) <= 1, (p, holders)

    @invariant()
    def epochs_rise_with_every_owner_change(self):
        for p, lease in self.g.leases.leases.items():
            old_epoch, old_owner = self.epoch_seen[p]
            assert lease.epoch >= old_epoch
            if lease.owner is not None and lease.owner != old_owner and old_owner is not None:
                assert lease.epoch > old_epoch
            if lease.owner is not None:
                self.epoch_seen[p] = (lease.epoch, lease.owner)

    @invariant()
    def positions_never_go_back(self):
        for p, c in self.g.committed.items():
            assert c.positions["s"] >= self.committed_seen.get(p, 0)
            self.committed_seen[p] = c.positions["s"]

    def is_settled(self):
        leases = self.g.leases.leases.values()
        return all(lease.state is LeaseState.OWNED for lease in leases)

    @invariant()
    def settled_groups_are_complete_and_balanced(self):
        if not self.is_settled():
            return
        counts = {m: 0 for m in self.g.members}
        for lease in self.g.leases.leases.values():
            counts[lease.owner] += 1
        assert max(counts.values()) - min(counts.values()) <= 1


GroupMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, derandomize=True, deadline=None
)
test_group_protocol = GroupMachine.TestCase
