"""Every transition of the lease state machine, by name; fencing of stale epochs."""

from __future__ import annotations

import pytest

from rayflow._internal.group.leases import LeaseState, LeaseTable
from rayflow.errors import FencedError


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
