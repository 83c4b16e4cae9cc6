"""Every transition of the lease state machine, by name; fencing of stale epochs."""

from __future__ import annotations

import pytest

from rayflow._internal.group.leases import LeaseState, LeaseTable
from rayflow.errors import FencedError, ProtocolError


def test_unassigned_to_owned():
    t = LeaseTable(2)
    grants = t.rebalance({0: "a", 1: "b"})
    assert [(g.partition, g.owner, g.epoch) for g in grants] == [(0, "a", 1), (1, "b", 1)]
    assert t.leases[0].state is LeaseState.OWNED


def test_owned_to_revoking():
    t = LeaseTable(1)
    t.rebalance({0: "a"})
    assert t.rebalance({0: "b"}) == []
    lease = t.leases[0]
    assert (lease.state, lease.owner, lease.target, lease.epoch) == (LeaseState.REVOKING, "a", "b", 1)
    assert t.revoking_from("a") == [0]


def test_revoking_back_to_owned_when_the_owner_is_picked_again():
    t = LeaseTable(1)
    t.rebalance({0: "a"})
    t.rebalance({0: "b"})
    t.rebalance({0: "a"})
    assert (t.leases[0].state, t.leases[0].epoch) == (LeaseState.OWNED, 1)


def test_revoking_to_revoking_when_a_third_member_is_picked():
    t = LeaseTable(1)
    t.rebalance({0: "a"})
    t.rebalance({0: "b"})
    assert t.rebalance({0: "c"}) == []
    lease = t.leases[0]
    assert (lease.state, lease.owner, lease.target, lease.epoch) == (LeaseState.REVOKING, "a", "c", 1)


def test_revoking_to_owned_by_the_target_on_release():
    t = LeaseTable(1)
    t.rebalance({0: "a"})
    t.rebalance({0: "b"})
    g = t.release(0, "a", 1)
    assert (g.owner, g.epoch, g.previous_owner) == ("b", 2, "a")
    assert t.leases[0].state is LeaseState.OWNED


def test_owned_to_new_owner_when_the_owner_dies():
    t = LeaseTable(2)
    t.rebalance({0: "a", 1: "a"})
    grants = t.drop_member("a", {0: "b"})
    assert [(g.partition, g.owner, g.epoch) for g in grants] == [(0, "b", 2)]
    assert t.leases[1].state is LeaseState.UNASSIGNED and t.leases[1].owner is None


def test_revoking_to_new_owner_when_the_owner_dies():
    t = LeaseTable(1)
    t.rebalance({0: "a"})
    t.rebalance({0: "b"})
    (g,) = t.drop_member("a", {0: "b"})
    assert (g.owner, g.epoch) == ("b", 2)


def test_revoking_cancelled_when_the_target_dies():
    t = LeaseTable(1)
    t.rebalance({0: "a"})
    t.rebalance({0: "b"})
    assert t.drop_member("b") == []
    assert (t.leases[0].state, t.leases[0].owner) == (LeaseState.OWNED, "a")


def test_owned_stays_owned_on_a_release_after_a_cancelled_revocation():
    """Defect 2 of issue 8: a late release must not leave the partition without an owner."""
    t = LeaseTable(1)
    t.rebalance({0: "a"})
    t.rebalance({0: "b"})
    t.drop_member("b")  # the revocation is cancelled while "a" commits ...
    assert t.release(0, "a", 1) is None  # ... so its release changes nothing
    lease = t.leases[0]
    assert (lease.state, lease.owner, lease.target, lease.epoch) == (LeaseState.OWNED, "a", None, 1)
    assert t.unassigned() == set()


def test_owned_to_unassigned_on_free():
    t = LeaseTable(2)
    t.rebalance({0: "a", 1: "a"})
    t.free(0)
    assert (t.leases[0].state, t.leases[0].owner, t.leases[0].epoch) == (LeaseState.UNASSIGNED, None, 1)
    assert t.unassigned() == {0}
    with pytest.raises(FencedError):
        t.check(0, "a", 1)
    (g,) = t.rebalance({0: "b", 1: "a"})
    assert (g.partition, g.owner, g.epoch, g.previous_owner) == (0, "b", 2, None)


def test_revoking_to_unassigned_on_free():
    t = LeaseTable(1)
    t.rebalance({0: "a"})
    t.rebalance({0: "b"})
    t.free(0)
    lease = t.leases[0]
    assert (lease.state, lease.owner, lease.target) == (LeaseState.UNASSIGNED, None, None)


def test_unassigned_to_owned_on_restore_owner():
    t = LeaseTable(2, {0: 7})
    t.restore_owner(0, "a")
    lease = t.leases[0]
    assert (lease.state, lease.owner, lease.epoch) == (LeaseState.OWNED, "a", 7)  # the same grant
    t.check(0, "a", 7)
    assert t.holds(0, "a", 7) and not t.holds(0, "a", 6) and not t.holds(1, "a", 0)


def test_restore_owner_of_a_held_lease_is_a_protocol_error():
    t = LeaseTable(1)
    t.rebalance({0: "a"})
    with pytest.raises(ProtocolError, match="restore a fresh table only"):
        t.restore_owner(0, "b")


def test_stale_epoch_is_fenced_with_what_to_do():
    t = LeaseTable(1)
    t.rebalance({0: "a"})
    t.drop_member("a", {0: "b"})
    with pytest.raises(FencedError, match="stale.*abandon the partition") as e:
        t.check(0, "a", 1)
    assert (e.value.partition, e.value.epoch, e.value.current_epoch) == (0, 1, 2)
    t.check(0, "b", 2)
    with pytest.raises(FencedError):
        t.release(0, "a", 1)


def test_epochs_continue_from_the_catalog():
    t = LeaseTable(1, {0: 41})
    (g,) = t.rebalance({0: "a"})
    assert g.epoch == 42


def test_fenced_error_survives_pickling():
    import pickle

    e = pickle.loads(pickle.dumps(FencedError("x", partition=3, epoch=1, current_epoch=2)))
    assert (e.partition, e.epoch, e.current_epoch) == (3, 1, 2)


def test_owned_to_owned_under_a_new_epoch_on_renew():
    t = LeaseTable(2)
    t.rebalance({0: "a", 1: "a"})
    g = t.renew(0, "a", 1)
    assert (g.partition, g.owner, g.epoch) == (0, "a", 2)
    assert t.leases[0].owner == "a" and t.leases[0].state is LeaseState.OWNED
    with pytest.raises(FencedError):
        t.check(0, "a", 1)  # what was sent under the old epoch can no longer land


def test_revoking_stays_revoking_on_renew():
    t = LeaseTable(1)
    t.rebalance({0: "a"})
    t.rebalance({0: "b"})
    t.renew(0, "a", 1)
    assert t.leases[0].state is LeaseState.REVOKING and t.leases[0].target == "b"
    assert t.release(0, "a", 2).owner == "b"


def test_renew_by_a_stale_owner_is_fenced():
    t = LeaseTable(1)
    t.rebalance({0: "a"})
    t.renew(0, "a", 1)
    with pytest.raises(FencedError):
        t.renew(0, "a", 1)
