"""The heavy-hitters summary and the skew figures (no Ray): the Misra-Gries bound against exact
counts, under any batching and any merge tree."""

from __future__ import annotations

import collections

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rayflow._internal.sketch import HeavyHitters, merge_all, sample_stride
from rayflow._internal.skew import SkewTracker, add_skew, history_rows
from rayflow.partitioning import PartitionMap, hash_key

#: Keys drawn from a small alphabet so that some are heavy.
_batches = st.lists(st.lists(st.integers(0, 40), min_size=0, max_size=60), min_size=1, max_size=8)


def _summary(batches: list[list[int]], capacity: int) -> HeavyHitters:
    s = HeavyHitters(capacity=capacity)
    for b in batches:
        keys = np.asarray(b, dtype=np.int64)
        hashes = np.asarray([hash_key(int(k)) for k in keys], dtype=np.uint64)
        s.update(hashes, lambda rows, keys=keys: keys[rows].tolist())
    return s


def _check_bound(s: HeavyHitters, exact: collections.Counter) -> None:
    n = sum(exact.values())
    assert s.total == n
    assert len(s.hashes) <= s.capacity
    err = s.error_rows
    assert err <= n / (s.capacity + 1)
    for k, f in exact.items():
        est = s.estimate(hash_key(k))
        assert f - err <= est <= f, (k, f, est, err)
    for h, k in zip(s.hashes.tolist(), s.keys.tolist()):
        assert hash_key(k) == h  # the key shown is the key counted


@settings(max_examples=60, deadline=None)
@given(_batches, st.integers(1, 8))
def test_bound_holds_over_batches(batches, capacity):
    exact = collections.Counter(k for b in batches for k in b)
    _check_bound(_summary(batches, capacity), exact)


@settings(max_examples=60, deadline=None)
@given(st.lists(_batches, min_size=1, max_size=4), st.integers(1, 8), st.randoms(use_true_random=False))
def test_bound_holds_over_any_merge_tree(streams, capacity, rnd):
    """Summaries of disjoint streams (sources, generations) merged in any order and grouping."""
    exact = collections.Counter(k for batches in streams for b in batches for k in b)
    pool = [_summary(batches, capacity) for batches in streams]
    while len(pool) > 1:
        a = pool.pop(rnd.randrange(len(pool)))
        b = pool.pop(rnd.randrange(len(pool)))
        pool.append(a.merge(b))
    _check_bound(pool[0], exact)


@settings(max_examples=60, deadline=None)
@given(_batches, st.integers(1, 6), st.integers(1, 4))
def test_bound_holds_per_partition_in_the_tracker(batches, capacity, partitions):
    """The source's tracker (all partitions updated at once, then one summary each) keeps each
    partition's bound, against exact counts per partition."""
    pmap = PartitionMap.uniform(partitions)
    tracker = SkewTracker(partitions, capacity=capacity, max_rows=0, window_s=1e9)
    for b in batches:
        keys = np.asarray(b, dtype=np.int64)
        hashes = np.asarray([hash_key(int(k)) for k in keys], dtype=np.uint64)
        tracker.observe(hashes, pmap.route, lambda rows, keys=keys: keys[rows].tolist())
    snap = tracker.snapshot()["partitions"]
    for p in range(partitions):
        exact = collections.Counter(
            k for b in batches for k in b if pmap.route(np.asarray([hash_key(k)], dtype=np.uint64))[0] == p
        )
        _check_bound(HeavyHitters.from_dict(snap[p]), exact)


def test_heavy_keys_are_found_and_ranked():
    rng = np.random.default_rng(7)
    keys = rng.zipf(1.5, 200_000) % 10_000
    exact = collections.Counter(keys.tolist())
    distinct = np.unique(keys)
    hashes = np.asarray([hash_key(int(k)) for k in distinct], dtype=np.uint64)[
        np.searchsorted(distinct, keys)
    ]
    s = HeavyHitters(capacity=32)
    for rows in np.array_split(np.arange(keys.size), 20):
        s.update(hashes[rows], lambda r, rows=rows: keys[rows][r].tolist())
    truth = [k for k, _ in exact.most_common(3)]
    assert [x["key"] for x in s.top(3)] == truth
    x = s.top(1)[0]
    assert abs(x["share"] - exact[truth[0]] / len(keys)) <= 1 / 33


def test_round_trip_and_composite_keys():
    s = HeavyHitters(capacity=4)
    keys = [("a", 1), ("b", 2), ("a", 1)]
    s.update(np.asarray([hash_key(k) for k in keys], dtype=np.uint64), lambda rows: [keys[i] for i in rows])
    back = HeavyHitters.from_dict(s.to_dict())
    assert back.top(1)[0]["key"] == ("a", 1) and back.top(1)[0]["count"] == 2
    assert merge_all([s, back]).top(1)[0]["count"] == 4


def test_sample_stride():
    assert sample_stride(100, 100) == 1
    assert sample_stride(101, 100) == 2
    assert sample_stride(10**6, 1 << 16) == 16
    assert sample_stride(5, 0) == 1


def test_tracker_and_add_skew():
    """A tracker per source; add_skew merges them: the hot partition's ratio, the hot key on top,
    the window rotating, and the history rows."""
    now = [0.0]
    pmap = PartitionMap.uniform(4)
    trackers = [SkewTracker(4, capacity=8, window_s=10.0, clock=lambda: now[0]) for _ in range(2)]
    rng = np.random.default_rng(1)
    for t in trackers:
        keys = np.concatenate([np.full(3000, 7), rng.integers(100, 10_000, 3000)]).astype(np.int64)
        hashes = np.asarray([hash_key(int(k)) for k in keys], dtype=np.uint64)
        t.observe(hashes, pmap.route, lambda rows, keys=keys: keys[rows].tolist())
    st_ = {"partitions": [{"partition": p} for p in range(4)]}
    add_skew(st_, [{"skew": t.snapshot()} for t in trackers])
    hot = int(pmap.route(np.asarray([hash_key(7)], dtype=np.uint64))[0])
    assert st_["hot_partition"] == hot and st_["skew"] > 2.0
    top = st_["hot_keys"][0]
    assert top["key"] == 7 and 6000 - top["error_rows"] <= top["count"] <= 6000
    assert abs(sum(p["rate_ratio"] for p in st_["partitions"]) - 4) < 1e-9
    assert st_["partitions"][hot]["hot_keys"][0]["key"] == 7
    skew_rows, hot_rows = history_rows(st_, ts=None)
    assert len(skew_rows) == 4 and (None, hot, 1, "7") == hot_rows[[r[1] for r in hot_rows].index(hot)][:4]
    # Two windows later the old rows have left the figures.
    now[0] = 25.0
    trackers[0].snapshot()
    now[0] = 40.0
    assert all(p["total"] == 0 for p in trackers[0].snapshot()["partitions"])


def test_add_skew_without_figures():
    st_ = {"partitions": [{"partition": 0}]}
    add_skew(st_, [{}])
    assert st_["skew"] is None and st_["hot_keys"] == [] and st_["partitions"][0]["rate_ratio"] is None


def test_the_skew_gauges_take_the_figures_and_their_absence():
    """``ManagerMetrics`` publishes the skew gauges from add_skew's figures (a no-op without Ray),
    and a status without them (sources that report no summaries) publishes none."""
    from rayflow._internal.metrics import ManagerMetrics

    m = ManagerMetrics("job")
    st_ = {"partitions": [{"partition": 0}, {"partition": 1}]}
    add_skew(st_, [{}])
    m._publish_skew(st_)
    add_skew(st_, [{"skew": SkewTracker(2).snapshot()}])
    m._publish_skew(st_)
    m._publish_skew({"partitions": [{"partition": 0, "rate_ratio": 1.5}], "skew": 1.5,
                     "hot_keys": [{"key": ("a", 1), "share": 0.3, "partition": 0}]})  # fmt: skip


def test_a_hot_key_that_leaves_the_top_is_zeroed_in_the_gauge():
    """A gauge series keeps its last value: a key that moved rank or left the top must not go
    on showing its old share next to the keys now there."""
    from rayflow._internal.metrics import ManagerMetrics

    m = ManagerMetrics("job")
    sets: list[tuple[float, dict]] = []
    m.hot_key_share = type("G", (), {"set": lambda self, v, tags: sets.append((v, tags))})()
    part = [{"partition": 0, "rate_ratio": 1.0}]
    m._publish_skew({"partitions": part, "hot_keys": [{"key": "a", "share": 0.5, "partition": 0}]})
    sets.clear()
    m._publish_skew({"partitions": part, "hot_keys": [{"key": "b", "share": 0.4, "partition": 0},
                                                      {"key": "a", "share": 0.3, "partition": 0}]})  # fmt: skip
    now = {(t["rank"], t["key"]): v for v, t in sets}
    assert now == {("1", "b"): 0.4, ("2", "a"): 0.3, ("1", "a"): 0.0}
