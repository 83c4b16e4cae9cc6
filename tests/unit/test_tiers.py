"""Priority tiers: the public rf.Tier, its resolution, and the pure rules of sources and
consumers (no Ray)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rayflow as rf
from rayflow._internal.queues import SPILL_ENTRY_OVERHEAD, Budget, Counts, must_pause, place, tier_ceilings
from rayflow._internal.tiers import FETCH_SHARE_STEP, fetch_shares, resolve, step_order
from rayflow.errors import ConfigError, TierError
from rayflow.partitioning import PartitionMap, hash_key

MAP = PartitionMap.uniform(8)


def partition_of(key) -> int:
    import numpy as np

    return int(MAP.route(np.array([hash_key(key)], dtype=np.uint64))[0])


# ----------------------------------------------------------------------------- rf.Tier, resolve


def test_tiers_rank_by_priority_and_the_rest_is_default():
    t = resolve(
        [
            rf.Tier(name="bulk-ish", priority=1, partitions=[5]),
            rf.Tier(name="critical", priority=9, partitions=[0, 1], dedicated_consumers=1),
        ],
        MAP,
        consumers=2,
    )
    assert t.names == ("critical", "bulk-ish", "default")
    assert t.ranks == (0, 0, 2, 2, 2, 1, 2, 2)
    assert t.dedicated == (1, 0, 0)
    assert t.name_of(5) == "bulk-ish" and t.needs_shared


def test_keys_name_the_partitions_that_hold_them():
    t = resolve([rf.Tier(name="vip", priority=1, keys=[42, "acme"])], MAP, consumers=1)
    assert {p for p, r in enumerate(t.ranks) if r == 0} == {partition_of(42), partition_of("acme")}
    # A composite key is a tuple in the key's column order; a 1-tuple is the value itself.
    t = resolve([rf.Tier(name="vip", priority=1, keys=[("a", 1), (7,)])], MAP, consumers=1)
    assert {p for p, r in enumerate(t.ranks) if r == 0} == {partition_of(("a", 1)), partition_of(7)}


@pytest.mark.parametrize(
    ("tiers", "consumers", "match"),
    [
        ([rf.Tier(name="a", priority=1, partitions=[8])], 2, "has 8 partitions"),
        (
            [rf.Tier(name="a", priority=1, partitions=[3]), rf.Tier(name="b", priority=2, partitions=[3])],
            2,
            "partition 3 is named by two tiers",
        ),
        (
            [rf.Tier(name="a", priority=1, partitions=[0]), rf.Tier(name="a", priority=2, partitions=[1])],
            2,
            "distinct",
        ),
        (
            [rf.Tier(name="a", priority=1, partitions=[0]), rf.Tier(name="b", priority=1, partitions=[1])],
            2,
            "distinct priorities",
        ),
        ([rf.Tier(name="a", priority=1, partitions=[0], dedicated_consumers=2)], 2, "at least 3"),
        ([rf.Tier(name="a", priority=1, keys=[1.5])], 2, "not a key value"),
    ],
)
def test_resolve_refuses(tiers, consumers, match):
    with pytest.raises(TierError, match=match):
        resolve(tiers, MAP, consumers=consumers)


def test_two_tiers_whose_keys_share_a_partition_are_refused():
    a = 0
    b = next(k for k in range(1, 1000) if partition_of(k) == partition_of(a))
    with pytest.raises(TierError, match=f"key {b!r}"):
        resolve(
            [rf.Tier(name="x", priority=2, keys=[a]), rf.Tier(name="y", priority=1, keys=[b])],
            MAP,
            consumers=1,
        )


def test_every_partition_dedicated_needs_no_shared_consumer():
    t = resolve(
        [rf.Tier(name="all", priority=1, partitions=range(8), dedicated_consumers=2)], MAP, consumers=2
    )
    assert not t.needs_shared


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(name="default", priority=1, partitions=[0]),
        dict(name="a b", priority=1, partitions=[0]),
        dict(name="a", priority=1.5, partitions=[0]),
        dict(name="a", priority=1),
        dict(name="a", priority=1, partitions=[-1]),
        dict(name="a", priority=1, keys="abc"),
        dict(name="a", priority=1, partitions=[0], dedicated_consumers=-1),
    ],
)
def test_tier_checks_its_arguments(kwargs):
    with pytest.raises(TierError) as e:
        rf.Tier(**kwargs)
    assert isinstance(e.value, ConfigError) and isinstance(e.value, ValueError)


def test_tier_is_frozen_and_keyword_only():
    t = rf.Tier(name="a", priority=1, partitions=[0, 1])
    assert t.partitions == (0, 1)
    with pytest.raises(AttributeError):
        t.priority = 2
    with pytest.raises(TypeError):
        rf.Tier("a", 1)


def test_pipeline_checks_tiers():
    src = rf.sources.Synthetic(events=10, keys=5, seed=1)
    with pytest.raises(TierError, match="at least 3"):
        rf.Pipeline(
            name="t", source=src, key="key", partitions=4, consumers=2,
            tiers=[rf.Tier(name="a", priority=1, partitions=[0], dedicated_consumers=2)],
        )  # fmt: skip
    with pytest.raises(ConfigError, match="list of rf.Tier"):
        rf.Pipeline(name="t", source=src, key="key", tiers=rf.Tier(name="a", priority=1, partitions=[0]))
    with pytest.raises(ConfigError, match="one stage"):
        rf.Pipeline(
            name="t", source=src, key="key", stages=[rf.Stage(key="value")],
            tiers=[rf.Tier(name="a", priority=1, partitions=[0])],
        )  # fmt: skip
    tiers = [rf.Tier(name="a", priority=1, partitions=[0])]
    assert rf.Pipeline(name="t", source=src, key="key", tiers=tiers).tiers == tiers
    assert rf.Pipeline(name="t", source=src, key="key").tiers == []


# ----------------------------------------------------------------------------- consumer order


def test_step_order_serves_the_critical_tier_first_round_robin_within():
    ranks = [1, 0, 1, 0, 2]
    assert step_order([0, 1, 2, 3, 4], ranks, 0) == [1, 3, 0, 2, 4]
    assert step_order([0, 1, 2, 3, 4], ranks, 1) == [3, 1, 2, 0, 4]
    assert step_order([0, 1, 2, 3], None, 1) == [1, 2, 3, 0]  # no tiers: plain round-robin


@settings(max_examples=100, derandomize=True, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=20), st.integers(0, 50))
def test_step_order_is_a_permutation_sorted_by_rank(ranks, rr):
    parts = list(range(len(ranks)))
    order = step_order(parts, ranks, rr)
    assert sorted(order) == parts
    assert [ranks[p] for p in order] == sorted(ranks)


def test_fetch_shares_give_higher_tiers_more():
    ranks = [0, 0, 1, 1, 1, 1, 5]
    s = fetch_shares(1_000_000, list(range(7)), ranks)
    assert s[0] == s[1] and abs(s[0] - FETCH_SHARE_STEP * s[2]) <= FETCH_SHARE_STEP
    # Levels among the tiers asked for, not raw ranks: rank 5 is one level below rank 1.
    assert abs(s[2] - FETCH_SHARE_STEP * s[6]) <= FETCH_SHARE_STEP
    assert sum(s.values()) <= 1_000_000
    assert fetch_shares(900, [3, 4, 5], None) == {3: 300, 4: 300, 5: 300}
    assert fetch_shares(1, [0, 6], ranks) == {0: 1, 6: 1}  # at least a byte: one entry each


# ----------------------------------------------------------------------------- source memory


def budget(*, ranks=None, source=4000, spill=100_000) -> Budget:
    b = Budget(queue_max_rows=10_000, queue_max_bytes=10_000, source_max_bytes=source, spill_max_bytes=spill)
    if ranks is None:
        return b
    return Budget(**{**b.__dict__, "memory_ceilings": tier_ceilings(source, tuple(ranks))})


def test_ceilings_keep_the_top_of_memory_for_higher_tiers():
    assert tier_ceilings(4000, (0, 1, 2, 2)) == (4000, 3500, 3000, 3000)
    assert tier_ceilings(4000, (1, 1)) is None


def test_the_lowest_tier_spills_first_and_the_critical_one_keeps_memory():
    b = budget(ranks=[0, 1])
    c = Counts(rows=[0, 0], nbytes=[0, 3000], spill_bytes=0)  # bulk holds the memory up to its ceiling
    assert place(b, c, [(1, 10, 100), (0, 10, 100), (1, 10, 100)]) == [True, False, True]
    assert c.nbytes == [100, 3000]
    # Without tiers both go to memory.
    c = Counts(rows=[0, 0], nbytes=[0, 3000], spill_bytes=0)
    assert place(budget(), c, [(1, 10, 100), (0, 10, 100)]) == [False, False]


def test_ceilings_never_pause_the_source_sooner():
    b = budget(ranks=[0, 1], spill=1000)
    c = Counts(rows=[0, 0], nbytes=[0, 3500], spill_bytes=1000)  # disk full, bulk over its ceiling
    assert not must_pause(b, c)  # the actor's memory bound (4000) is not hit: keep reading
    assert place(b, c, [(1, 10, 100)]) == [False]  # and without disk the bulk goes to memory


@settings(max_examples=100, derandomize=True, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(1, 500)), min_size=1, max_size=40),
    st.lists(st.integers(0, 2), min_size=4, max_size=4),
)
def test_a_critical_sub_batch_spills_only_where_a_lower_one_would(parts, ranks):
    """Monotone in rank: whenever a partition's sub-batch goes to memory, a more critical one
    placed at the same moment would too (same queue counts)."""
    b = budget(ranks=ranks, source=3000)
    c = Counts(rows=[0] * 4, nbytes=[0] * 4, spill_bytes=0)
    spills = 0
    for p, nbytes in parts:
        snapshot = Counts(list(c.rows), list(c.nbytes), c.spill_bytes, c.memory_bytes)
        spilled = place(b, c, [(p, 1, nbytes)])[0]
        for q in range(4):
            if ranks[q] < ranks[p] and not spilled:  # (the queues' own bounds are far off here)
                probe = Counts(
                    list(snapshot.rows), list(snapshot.nbytes), snapshot.spill_bytes, snapshot.memory_bytes
                )
                assert place(b, probe, [(q, 1, nbytes)]) == [False]
        spills += spilled
    # Every byte is placed once: in memory, or on disk with its entry's overhead.
    assert c.memory_bytes + c.spill_bytes == sum(n for _, n in parts) + spills * SPILL_ENTRY_OVERHEAD


# ----------------------------------------------------------------------------- rayflow status


def test_status_table_has_a_tier_column_only_for_a_job_with_tiers():
    from rayflow._internal import status_view as sv

    def st(tier):
        p = {"partition": 0, "owner": "consumer-0", "lease_epoch": 1, "state": "stable", "final": False}
        if tier is not None:
            p["tier"] = tier
        return {"partitions": [p], "members": ["consumer-0"], "rebalances": 0, "recoveries": 0, "done": False}

    text = sv.render("job", st("critical"), stall_after_s=10.0)
    cols, row = text.splitlines()[-2:]
    assert cols.split()[:3] == ["partition", "tier", "owner"] and row.split()[:3] == [
        "0",
        "critical",
        "consumer-0",
    ]
    for plain in (st(None), st("default")):
        assert "tier" not in sv.render("job", plain, stall_after_s=10.0).splitlines()[-2]


def test_tier_keys_must_match_the_key_columns():
    import pyarrow as pa

    from rayflow._internal.tiers import check_keys

    schema = pa.schema([("id", pa.int64()), ("name", pa.dictionary(pa.int32(), pa.string()))])
    check_keys([rf.Tier(name="a", priority=1, keys=[(1, "x"), (2, None)])], schema, ["id", "name"])
    with pytest.raises(TierError, match="has 1 part"):
        check_keys([rf.Tier(name="a", priority=1, keys=[1])], schema, ["id", "name"])
    with pytest.raises(TierError, match="'1' does not match the key column 'id'"):
        check_keys([rf.Tier(name="a", priority=1, keys=[("1", "x")])], schema, ["id", "name"])
    with pytest.raises(TierError, match="column 'name'"):
        check_keys([rf.Tier(name="a", priority=1, keys=[(1, 2)])], schema, ["id", "name"])
