"""The Coordinator by transition, without Ray: releases, ghosts, claims, repeats, finals."""

from __future__ import annotations

import pytest

from rayflow._internal.checkpoint.commit import CommitRecord
from rayflow._internal.group.coordinator import Coordinator
from rayflow._internal.group.leases import LeaseState
from rayflow.errors import FencedError, ProtocolError


def rec(p: int, epoch: int, pos: int, *, final: bool = False, outputs=()) -> CommitRecord:
    return CommitRecord(
        partition=p,
        lease_epoch=epoch,
        positions={"s": pos},
        state_files=[],
        output_files=list(outputs),
        rows_in=0,
        rows_total=pos,
        state_rows=0,
        final=final,
        map_version=1,
    )


def started(members: list[str], num_partitions: int = 4) -> Coordinator:
    g = Coordinator(num_partitions)
    for m in members:
        g.join(m, 0.0)
    g.activate(0.0)
    return g


def test_release_after_a_cancelled_revocation_leaves_the_partition_with_its_owner():
    """Defect 2 of issue 8: the newcomer leaves while the owner commits; its late release must
    not leave the partition unowned for ever."""
    g = started(["a"])
    g.join("b", 0.0)
    moving = g.leases.revoking_from("a")
    assert moving
    epochs = {p: g.leases.leases[p].epoch for p in moving}
    g.member_gone("b", "leave", 0.0)  # the revocation is cancelled ...
    for p in moving:
        g.apply_commit(rec(p, epochs[p], 5))  # ... while the owner commits, then releases
    g.release("a", epochs)
    reply, _ = g.heartbeat("a", g.members["a"].epoch, 0.0)
    for p in moving:
        assert g.leases.leases[p].state is LeaseState.OWNED
        assert reply["owned"][p] == epochs[p]  # still its own, under the same epoch
        assert reply["commits"][p].positions == {"s": 5}  # the consumer reloads from its commit
    assert set(reply["owned"]) == set(range(4))


def test_release_after_the_newcomer_crashed_leaves_the_partition_with_its_owner():
    g = started(["a"])
    g.join("b", 0.0)
    epochs = {p: g.leases.leases[p].epoch for p in g.leases.revoking_from("a")}
    g.member_gone("b", "crash", 0.0)
    fx = g.release("a", epochs)
    assert fx.grants == [] and "a" in fx.pokes  # woken to reload what it dropped
    assert ("release", {"member": "a", "granted": [], "kept": sorted(epochs), "stale": []}) in fx.events
    assert g.leases.owned_by("a") == {p: 1 for p in range(4)}


def test_release_after_a_rebalance_picked_the_owner_again_is_a_no_op():
    g = started(["a", "b"], num_partitions=6)  # 3 each
    g.join("c", 0.0)  # a and b each give one up to c
    revoked = {m: g.leases.revoking_from(m) for m in ("a", "b")}
    assert revoked["a"] and revoked["b"]
    g.member_gone("b", "leave", 0.0)  # b's go straight on; c is now owed no share of a's
    (p,) = revoked["a"]
    assert g.leases.leases[p].state is LeaseState.OWNED and g.leases.leases[p].owner == "a"
    fx = g.release("a", {p: 1})
    assert fx.grants == [] and g.leases.holds(p, "a", 1)


def test_release_of_a_revoked_partition_grants_it_to_the_target_from_that_commit():
    g = started(["a"])
    g.join("b", 0.0)
    (p, *_) = g.leases.revoking_from("a")
    g.apply_commit(rec(p, 1, 9))
    fx = g.release("a", {p: 1})
    assert [(x.partition, x.owner, x.epoch) for x in fx.grants] == [(p, "b", 2)]
    reply, _ = g.heartbeat("b", g.members["b"].epoch, 0.0)
    assert reply["owned"][p] == 2 and reply["commits"][p].positions == {"s": 9}


def test_a_stale_release_is_ignored_and_reported():
    g = started(["a", "b"])
    p = next(iter(g.leases.owned_by("a")))
    g.member_gone("a", "expiry", 0.0)  # moved to b under epoch 2
    fx = g.release("a", {p: 1})
    assert fx.grants == [] and g.leases.holds(p, "b", 2)
    assert ("release", {"member": "a", "granted": [], "kept": [], "stale": [p]}) in fx.events


def test_a_member_gone_hands_its_partitions_to_the_others_at_once():
    g = started(["a", "b", "c"], num_partitions=6)
    g.member_gone("b", "crash", 0.0)
    assert g.leases.unassigned() == set() and not g.leases.any_revoking()
    assert set(g.leases.owners().values()) == {"a", "c"}


def test_the_last_member_gone_frees_its_partitions_and_the_next_join_takes_them():
    g = started(["a"])
    g.member_gone("a", "crash", 0.0)
    assert g.leases.unassigned() == set(range(4))
    g.join("b", 0.0)
    assert g.leases.owned_by("b") == {p: 2 for p in range(4)}


# ---------------------------------------------------------------------- restart: ghosts and claims
def restarted(before: Coordinator, now: float = 0.0) -> Coordinator:
    """What the GroupManager builds after a restart: epochs, commits and owners from the catalog."""
    g = Coordinator(before.num_partitions, epochs=before.leases.epochs(), committed=before.committed)
    g.restore({p: o for p, o in before.leases.owners().items() if o is not None}, now)
    return g


def test_restore_makes_the_recorded_owners_ghosts_holding_their_epochs():
    before = started(["a", "b"])
    g = restarted(before)
    assert g.active and all(m.ghost for m in g.members.values()) and set(g.members) == {"a", "b"}
    assert g.leases.epochs() == before.leases.epochs()
    assert g.leases.owners() == before.leases.owners()
    assert not g.leases.any_revoking()
    reply, _ = g.heartbeat("a", before.members["a"].epoch, 1.0)
    assert reply == {"rejoin": True}  # a ghost must re-join first


def test_a_ghost_rejoining_keeps_the_claims_that_match():
    before = started(["a", "b"])
    g = restarted(before)
    claims_a = before.leases.owned_by("a")
    _, kept, fx = g.join("a", 1.0, claims_a)
    assert kept == set(claims_a) and fx.grants == []
    assert {p: g.leases.leases[p].epoch for p in kept} == claims_a  # same epochs: nothing moved
    _, kept_b, _ = g.join("b", 1.0, before.leases.owned_by("b"))
    assert kept_b == set(before.leases.owned_by("b"))
    assert not g.leases.any_revoking() and g.leases.unassigned() == set()


def test_a_ghost_rejoining_is_refused_claims_that_do_not_match_and_they_move_at_once():
    before = started(["a", "b"])
    g = restarted(before)
    held = sorted(before.leases.owned_by("a"))
    dropped = held[0]
    claims = {p: 1 for p in held[1:]}
    claims[held[1]] = 7  # an epoch it never had
    _, kept, fx = g.join("a", 1.0, claims)
    assert kept == set(held[2:])
    assert dropped in {x.partition for x in fx.grants} and held[1] in {x.partition for x in fx.grants}
    for x in fx.grants:
        assert x.epoch == 2  # granted again from the last commit, under a new epoch
    assert g.leases.unassigned() == set()


def test_a_ghost_takes_no_new_partition_and_expires_like_any_silent_member():
    before = started(["a", "b"])
    g = restarted(before, now=0.0)
    g.join("a", 1.0, before.leases.owned_by("a"))
    b_held = before.leases.owned_by("b")
    assert set(g.leases.revoking_from("b")) == set(b_held)  # a live member is owed them
    g.heartbeat("a", g.members["a"].epoch, 20.0)
    g.expire(20.0, 10.0)
    assert "b" not in g.members and set(g.leases.owned_by("a")) == set(range(4))


def test_claims_after_an_expiry_are_refused():
    g = started(["a", "b"])
    held = g.leases.owned_by("a")
    g.heartbeat("b", g.members["b"].epoch, 20.0)
    g.expire(20.0, 10.0)
    _, kept, _ = g.join("a", 21.0, held)
    assert kept == set()
    for p in held:
        assert not g.leases.holds(p, "a", held[p])


def test_final_partitions_are_not_restored():
    before = started(["a"])
    before.apply_commit(rec(0, 1, 5, final=True))
    g = restarted(before)
    assert g.leases.owners()[0] is None and g.leases.owners()[1] == "a"


# ---------------------------------------------------------------------- commits
def test_a_new_commit_is_checked_and_not_a_repeat():
    g = started(["a"])
    assert g.check_commit("a", rec(0, 1, 5)) is False
    g.apply_commit(rec(0, 1, 5, outputs=["x"]))
    assert g.check_commit("a", rec(0, 1, 8, outputs=["y"])) is False


def test_a_repeat_of_the_last_commit_is_recognized():
    g = started(["a"])
    g.apply_commit(rec(0, 1, 5, outputs=["x", "y"]))
    assert g.check_commit("a", rec(0, 1, 5, outputs=["x", "y"])) is True
    assert g.check_commit("a", rec(0, 1, 5, outputs=["x"])) is True
    assert g.check_commit("a", rec(0, 1, 5, outputs=["z"])) is False  # new output: a new commit


def test_a_zombies_retried_commit_is_fenced_even_when_it_repeats_the_recorded_one():
    """Defect 5 of issue 8: fence first, then recognize repeats."""
    g = started(["a", "b"])
    p = next(iter(g.leases.owned_by("a")))
    last = rec(p, 1, 5, outputs=["x"])
    assert g.check_commit("a", last) is False
    g.apply_commit(last)  # recorded; the reply to "a" is lost
    g.heartbeat("b", g.members["b"].epoch, 20.0)
    g.expire(20.0, 10.0)  # "a" froze: its lease moved to "b"
    assert g.leases.holds(p, "b", 2)
    with pytest.raises(FencedError) as e:
        g.check_commit("a", last)  # the zombie retries the very same commit
    assert (e.value.partition, e.value.epoch, e.value.current_epoch) == (p, 1, 2)


def test_a_commit_that_moves_positions_back_is_a_protocol_error():
    g = started(["a"])
    g.apply_commit(rec(0, 1, 5))
    with pytest.raises(ProtocolError, match="positions back"):
        g.check_commit("a", rec(0, 1, 4))


def test_nothing_is_committed_after_a_final_commit_but_its_repeat_is_accepted():
    g = started(["a"])
    g.apply_commit(rec(0, 1, 5, final=True))
    assert g.check_commit("a", rec(0, 1, 5, final=True)) is True
    with pytest.raises(ProtocolError, match="final"):
        g.check_commit("a", rec(0, 1, 6))
    with pytest.raises(ProtocolError, match="final"):
        g.check_commit("a", rec(0, 1, 5))


def test_a_final_partition_is_not_assigned():
    g = Coordinator(3, epochs={1: 4}, committed={1: rec(1, 4, 5, final=True)})
    g.join("a", 0.0)
    g.activate(0.0)
    assert g.leases.owners() == {0: "a", 1: None, 2: "a"}
    g.join("b", 0.0)
    g.member_gone("a", "crash", 0.0)
    assert g.leases.owners()[1] is None and g.leases.epochs()[1] == 4
    assert not g.done()
    g.apply_commit(rec(0, 2, 1, final=True))
    g.apply_commit(rec(2, 2, 1, final=True))
    assert g.done()
