"""Partition leases as a state machine with epochs (DESIGN §4). Pure: no Ray, no I/O.

Each partition's lease is in one of three states:

- ``UNASSIGNED``: no owner. The next :meth:`LeaseTable.rebalance` grants it.
- ``OWNED``: one owner holds it under ``epoch``; the owner may fetch, process
  and commit it.
- ``REVOKING``: the owner still holds it, but a rebalance wants it elsewhere
  (``target``). The owner is told to give it up: it commits, then releases;
  only then is the partition granted to the target, from that commit.

Transitions (each tested by name in ``tests/unit/test_leases.py``):

- UNASSIGNED -> OWNED: ``rebalance`` grants to the target (epoch + 1).
- OWNED -> REVOKING: ``rebalance`` picks another target.
- REVOKING -> OWNED (same owner): ``rebalance`` picks the owner again (the
  revocation is cancelled, the epoch unchanged).
- REVOKING -> OWNED (new owner): the owner ``release``-s it (epoch + 1).
- OWNED or REVOKING -> OWNED (new owner) or UNASSIGNED: the owner is gone
  (crash, expired lease, left) and ``drop_member`` reassigns it straight from
  the last commit (epoch + 1).

Invariants: a partition never has two owners; its epoch only increases, and
every change of owner increases it, so a call carrying an older epoch comes
from a stale owner and is fenced (:meth:`LeaseTable.check`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from rayflow.errors import FencedError


class LeaseState(enum.Enum):
    UNASSIGNED = "unassigned"
    OWNED = "owned"
    REVOKING = "revoking"


@dataclass
class Lease:
    partition: int
    epoch: int = 0
    owner: str | None = None
    state: LeaseState = LeaseState.UNASSIGNED
    target: str | None = None  # while REVOKING: who gets it on release


@dataclass(frozen=True)
class Grant:
    partition: int
    owner: str
    epoch: int
    previous_owner: str | None


class LeaseTable:
    def __init__(self, num_partitions: int, epochs: dict[int, int] | None = None):
        epochs = epochs or {}
        self.leases = {p: Lease(p, epoch=int(epochs.get(p, 0))) for p in range(num_partitions)}

    # ------------------------------------------------------------------ queries
    def owners(self) -> dict[int, str | None]:
        return {p: lease.owner for p, lease in self.leases.items()}

    def owned_by(self, member: str) -> dict[int, int]:
        """Partitions ``member`` holds (OWNED or REVOKING) -> epoch."""
        return {p: lease.epoch for p, lease in self.leases.items() if lease.owner == member}

    def revoking_from(self, member: str) -> list[int]:
        return sorted(
            p
            for p, lease in self.leases.items()
            if lease.owner == member and lease.state is LeaseState.REVOKING
        )

    def epochs(self) -> dict[int, int]:
        return {p: lease.epoch for p, lease in self.leases.items()}

    def any_revoking(self) -> bool:
        return any(lease.state is LeaseState.REVOKING for lease in self.leases.values())

    def revoking(self) -> set[int]:
        return {p for p, lease in self.leases.items() if lease.state is LeaseState.REVOKING}

    def check(self, partition: int, member: str, epoch: int) -> None:
        """Raise :class:`FencedError` unless ``member`` holds ``partition`` under ``epoch``."""
        lease = self.leases.get(partition)
        if lease is None or lease.owner != member or lease.epoch != epoch:
            cur = lease.epoch if lease else -1
            raise FencedError(
                f"partition {partition}: lease epoch {epoch} of {member!r} is stale (the current "
                f"epoch is {cur}, owner {lease.owner if lease else None!r}); abandon the partition, "
                "drop its uncommitted state and take the assignment of the next heartbeat",
                partition=partition,
                epoch=epoch,
                current_epoch=cur,
            )

    # ------------------------------------------------------------------ transitions
    def _grant(self, lease: Lease, owner: str) -> Grant:
        prev = lease.owner
        lease.epoch += 1
        lease.owner = owner
        lease.state = LeaseState.OWNED
        lease.target = None
        return Grant(lease.partition, owner, lease.epoch, prev)

    def rebalance(self, target: dict[int, str]) -> list[Grant]:
        """Move towards ``target``: grant free partitions, start revoking moved ones."""
        grants = []
        for p, lease in self.leases.items():
            want = target.get(p)
            if want is None:
                continue
            if lease.owner is None:
                grants.append(self._grant(lease, want))
            elif lease.owner == want:
                lease.state, lease.target = LeaseState.OWNED, None
            else:
                lease.state, lease.target = LeaseState.REVOKING, want
        return grants

    def release(self, partition: int, member: str, epoch: int) -> Grant | None:
        """The owner gives a revoked partition up (after committing it)."""
        self.check(partition, member, epoch)
        lease = self.leases[partition]
        if lease.state is not LeaseState.REVOKING or lease.target is None:
            lease.owner, lease.state = None, LeaseState.UNASSIGNED
            return None
        return self._grant(lease, lease.target)

    def drop_member(self, member: str, target: dict[int, str] | None = None) -> list[Grant]:
        """``member`` is gone: its partitions go straight to ``target`` (or become free)."""
        grants = []
        target = target or {}
        for p, lease in self.leases.items():
            if lease.target == member:
                lease.target = None
                lease.state = LeaseState.OWNED
            if lease.owner != member:
                continue
            want = target.get(p) if target.get(p) != member else None
            if want is None:
                lease.owner, lease.state, lease.target = None, LeaseState.UNASSIGNED, None
            else:
                grants.append(self._grant(lease, want))
        return grants
