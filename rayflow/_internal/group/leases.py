"""Partition leases as a state machine with epochs (DESIGN §4). Pure: no Ray, no I/O.

Each partition's lease is in one of three states:

- ``UNASSIGNED``: no owner. The next :meth:`LeaseTable.rebalance` grants it;
  the coordinator rebalances at once whenever it leaves a lease here while
  some member could take it.
- ``OWNED``: one owner holds it under ``epoch``; the owner may fetch, process
  and commit it.
- ``REVOKING``: the owner still holds it, but a rebalance wants it elsewhere
  (``target``). The owner is told to give it up: it commits, then releases;
  only then is the partition granted to the target, from that commit.

Transitions, one method each (each tested by name in ``tests/unit/test_leases.py``):

- UNASSIGNED -> OWNED: ``rebalance`` grants to the target (epoch + 1).
- OWNED -> REVOKING: ``rebalance`` picks another target.
- REVOKING -> REVOKING (new target): ``rebalance`` picks a third member.
- REVOKING -> OWNED (same owner): ``rebalance`` picks the owner again, or
  ``drop_member`` removes the target (the revocation is cancelled, the epoch
  unchanged).
- REVOKING -> OWNED (new owner): the owner ``release``-s it (epoch + 1).
  A ``release`` acts on nothing else: on a lease that is OWNED by the caller
  under that epoch (its revocation was cancelled while it committed) it is a
  no-op, reported as such, and the caller, which has dropped the partition,
  finds it in its next heartbeat's assignment and reloads it from its commit.
  A release under a stale epoch raises :class:`FencedError`.
- OWNED or REVOKING -> the same under epoch + 1: ``renew`` (the owner fences
  an attempt whose outcome it does not know).
- OWNED or REVOKING -> OWNED (new owner) or UNASSIGNED: the owner is gone
  (crash, expired lease, left) and ``drop_member`` reassigns it straight from
  the last commit (epoch + 1), or frees it where no target is given.
- OWNED or REVOKING -> UNASSIGNED: ``free``; the owner is no longer there
  and nobody is named to follow it (a ghost re-joined without claiming it).
- UNASSIGNED -> OWNED (same epoch): ``restore_owner``; after a coordinator
  restart, the owner recorded in the catalog holds the lease again under the
  recorded epoch (it held it before the restart; no change of owner).

Invariants: a partition never has two owners; its epoch only increases, and
every grant increases it, so a call carrying an older epoch comes from a
stale owner and is fenced (:meth:`LeaseTable.check`); an epoch names one owner
only (``restore_owner`` gives it back to the member that was granted it).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from rayflow.errors import FencedError, ProtocolError


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
    """Every partition's lease; the only code that changes a lease (see the module doc)."""

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

    def unassigned(self) -> set[int]:
        return {p for p, lease in self.leases.items() if lease.owner is None}

    def holds(self, partition: int, member: str, epoch: int) -> bool:
        """Does ``member`` hold ``partition`` (OWNED or REVOKING) under exactly ``epoch``?"""
        lease = self.leases.get(partition)
        return lease is not None and lease.owner == member and lease.epoch == epoch

    def check(self, partition: int, member: str, epoch: int) -> None:
        """Raise :class:`FencedError` unless ``member`` holds ``partition`` under ``epoch``."""
        if not self.holds(partition, member, epoch):
            lease = self.leases.get(partition)
            raise FencedError.stale(
                partition=partition,
                epoch=epoch,
                current_epoch=lease.epoch if lease else -1,
                member=member,
                owner=lease.owner if lease else None,
            )

    # ------------------------------------------------------------------ transitions
    def _grant(self, lease: Lease, owner: str) -> Grant:
        prev = lease.owner
        lease.epoch += 1
        lease.owner = owner
        lease.state = LeaseState.OWNED
        lease.target = None
        return Grant(lease.partition, owner, lease.epoch, prev)

    def _free(self, lease: Lease) -> None:
        lease.owner, lease.state, lease.target = None, LeaseState.UNASSIGNED, None

    def rebalance(self, target: dict[int, str]) -> list[Grant]:
        """Move towards ``target``: grant free partitions, start (or cancel) revocations.

        Partitions absent from ``target`` are left as they are.
        """
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
        """The owner gives a revoked partition up (after committing it).

        Returns the grant to the revocation's target, or ``None`` when the
        lease is not REVOKING (the revocation was cancelled since it was
        asked): then nothing changes and ``member`` still owns the partition.
        Raises :class:`FencedError` if ``member`` does not hold it under ``epoch``.
        """
        self.check(partition, member, epoch)
        lease = self.leases[partition]
        if lease.state is not LeaseState.REVOKING:
            return None
        if lease.target is None:  # rebalance and drop_member never leave one so
            raise ProtocolError(f"partition {partition}: revoking from {member!r} towards nobody")
        return self._grant(lease, lease.target)

    def drop_member(self, member: str, target: dict[int, str] | None = None) -> list[Grant]:
        """``member`` is gone: its partitions go straight to ``target`` (or become free).

        Revocations towards ``member`` are cancelled (their owners keep them).
        The caller must rebalance afterwards: a freed partition waits for it.
        """
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
                self._free(lease)
            else:
                grants.append(self._grant(lease, want))
        return grants

    def renew(self, partition: int, member: str, epoch: int) -> Grant:
        """OWNED or REVOKING -> the same, under ``epoch + 1``: the owner fences its own past.

        A consumer that does not know whether a commit it sent under ``epoch``
        landed asks for this before it decides: once the epoch has moved, that
        commit (say, retried by Ray after a manager restart) can no longer land,
        so what the catalog holds then is final. Raises :class:`FencedError`
        unless ``member`` holds the lease under ``epoch``.
        """
        self.check(partition, member, epoch)
        lease = self.leases[partition]
        lease.epoch += 1
        return Grant(partition, member, lease.epoch, member)

    def free(self, partition: int) -> None:
        """Its owner is no longer there and nobody is named to follow: OWNED or REVOKING ->
        UNASSIGNED, the epoch unchanged (the next grant raises it). The caller must rebalance."""
        self._free(self.leases[partition])

    def restore_owner(self, partition: int, owner: str) -> None:
        """After a coordinator restart: the owner the catalog recorded under the current epoch
        holds the lease again (UNASSIGNED -> OWNED, the epoch unchanged: the same grant)."""
        lease = self.leases[partition]
        if lease.owner is not None:
            raise ProtocolError(
                f"partition {partition}: cannot restore owner {owner!r}, the lease is held by "
                f"{lease.owner!r} under epoch {lease.epoch}; restore a fresh table only"
            )
        lease.owner, lease.state, lease.target = owner, LeaseState.OWNED, None
