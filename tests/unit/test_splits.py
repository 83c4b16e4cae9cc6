"""Hot-range splits at runtime: the policy, the split point, the new map (pure, no Ray)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rayflow as rf
from rayflow._internal.group.manager import _kept_split_map
from rayflow._internal.splits import (
    HashReservoir,
    PolicyConfig,
    PolicyState,
    decide,
    merge_map,
    split_map,
    split_point,
)
from rayflow._internal.splitter import Splitter
from rayflow.errors import ConfigError
from rayflow.partitioning import HASH_SPACE, PartitionMap

CFG = PolicyConfig(factor=3.0, window_s=10.0, cooldown_s=30.0, max_partitions=8, smoothing=1.0)


def _run(steps, config=CFG, state=None):
    """Feed ``(now, rates)`` steps to the policy; the decisions' partitions, in order."""
    state = state or PolicyState()
    out = []
    for now, rates in steps:
        state, d = decide(state, rates, now, config)
        out.append(d.partition)
    return out, state


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # Never above the factor: nothing.
        ([(0, {0: 1.0, 1: 1.0}), (20, {0: 2.9, 1: 0.1})], [None, None]),
        # Hot, but not for the window yet; then held for it: split.
        ([(0, {0: 3.5, 1: 0.5}), (5, {0: 3.5, 1: 0.5}), (10, {0: 3.5, 1: 0.5})], [None, None, 0]),
        # A dip below the factor restarts the window.
        ([(0, {0: 4.0}), (5, {0: 1.0}), (12, {0: 4.0}), (21, {0: 4.0}), (22, {0: 4.0})], [None] * 4 + [0]),
        # No figure yet (None) is not hot.
        ([(0, {0: None, 1: 1.0}), (20, {0: None, 1: 1.0})], [None, None]),
        # Two hot ones: the hotter first.
        ([(0, {0: 3.5, 1: 5.0, 2: 0.1}), (10, {0: 3.5, 1: 5.0, 2: 0.1})], [None, 1]),
    ],
)
def test_policy_table(steps, expected):
    assert _run(steps)[0] == expected


def test_policy_cooldown_and_max_partitions():
    hot = {0: 5.0, 1: 0.5}
    out, state = _run([(0, hot), (10, hot), (20, hot), (30, hot), (40, hot)])
    # split at 10; hot again from 20 (the window restarts), ripe at 30 but cooling until 40.
    assert out == [None, 0, None, None, 0]
    full = {p: (9.0 if p == 0 else 0.1) for p in range(8)}
    out, _ = _run([(0, full), (100, full)])
    assert out == [None, None]


def replace_merge_off(cfg):
    return dataclasses.replace(cfg, merge_below=None)


def test_policy_merges_cold_neighbours_when_nothing_is_hot():
    cfg = PolicyConfig(
        factor=3.0,
        window_s=10.0,
        cooldown_s=0.0,
        max_partitions=8,
        merge_below=0.5,
        min_partitions=3,
        smoothing=1.0,
    )
    cold = {0: 1.8, 1: 0.2, 2: 0.2, 3: 1.6}
    state, d = decide(PolicyState(), cold, 0.0, cfg)
    assert d.partition is None
    state, d = decide(state, cold, 10.0, cfg)
    assert (d.kind, d.partition, d.ratio) == ("merge", 1, pytest.approx(0.4))
    # A hot partition wins over a cold pair; at min_partitions nothing merges.
    hot = {0: 3.2, 1: 0.1, 2: 0.1, 3: 0.6}
    _, d = decide(PolicyState(hot_since={0: 0.0}, cold_since={1: 0.0}), hot, 10.0, cfg)
    assert (d.kind, d.partition) == ("split", 0)
    _, d = decide(PolicyState(cold_since={0: 0.0}), {0: 0.1, 1: 0.1, 2: 2.8}, 10.0, cfg)
    assert d.partition is None
    # Without merge_below: never.
    _, d = decide(PolicyState(), cold, 100.0, CFG)
    assert d.partition is None
    # A hot partition that cannot split (one key is most of it; no room left) does not block a
    # merge of cold neighbours.
    one_key = {0: 4.0, 1: 0.1, 2: 0.1, 3: 0.1}
    both = PolicyState(hot_since={0: 0.0}, cold_since={1: 0.0, 2: 0.0})
    _, d = decide(both, one_key, 10.0, cfg, {0: 0.9})
    assert (d.kind, d.partition) == ("merge", 1)
    full = dataclasses.replace(cfg, max_partitions=4)
    _, d = decide(both, one_key, 10.0, full)
    assert (d.kind, d.partition) == ("merge", 1)
    _, d = decide(PolicyState(hot_since={0: 0.0}), one_key, 10.0, replace_merge_off(full))
    assert d.partition is None and "max_partitions" in d.reason


def test_splitter_carries_out_the_policy():
    class FakeRun:
        def __init__(self):
            self.spec = type("Spec", (), {"name": "fake"})()
            self.calls = []
            self.ratios = [4.0, 0.5, 0.5, 0.5]
            self.version = 1

        def status(self):
            return {
                "done": False,
                "map_version": self.version,
                "partitions": [{"partition": p, "rate_ratio": r} for p, r in enumerate(self.ratios)],
            }

        def split(self, p, *, reason, expect_version):
            assert expect_version == self.version  # decided on the map it acts on
            self.calls.append(("split", p))
            self.ratios = [1.0] * 5
            self.version += 1

        def merge(self, p, *, reason, expect_version):
            self.calls.append(("merge", p))

    run = FakeRun()
    sp = Splitter(run, rf.Splits(factor=3.0, window_s=0.0, cooldown_s=3600.0, interval_s=0.01))
    assert sp.step().partition == 0
    assert sp.step().partition is None  # cooling down, the rates started afresh
    assert run.calls == [("split", 0)] and len(sp.decisions) == 1
    # A map changed by someone else (run.split by hand) starts the policy afresh, cooling down:
    # the figures it kept were for partitions that now name other ranges.
    sp2 = Splitter(run, rf.Splits(factor=3.0, window_s=0.0, cooldown_s=3600.0, interval_s=0.01))
    run.ratios = [1.0] * 5
    assert sp2.step().partition is None  # nothing hot: it only learns the map's version
    run.version += 1
    run.ratios = [4.0] + [0.5] * 5
    d = sp2.step()
    assert d.partition is None and "cooling down" in d.reason
    assert run.calls == [("split", 0)]


def test_policy_does_not_split_one_hot_key():
    hot = {0: 5.0, 1: 0.5, 2: 0.5}
    _, d = decide(PolicyState(hot_since={0: 0.0}), hot, 10.0, CFG, {0: 0.8})
    assert d.partition is None and "cannot halve one key" in d.reason
    _, d = decide(PolicyState(hot_since={0: 0.0}), hot, 10.0, CFG, {0: 0.3})
    assert d.partition == 0


def test_policy_smooths():
    cfg = PolicyConfig(factor=3.0, window_s=0.0, cooldown_s=0.0, max_partitions=8, smoothing=0.5)
    # One spike of 10 after 1.0: smoothed 5.5 (hot); a spike after a long calm at 0.2: 5.1.
    state, d = decide(PolicyState(smoothed={0: 1.0}), {0: 10.0}, 0.0, cfg)
    assert d.partition == 0 and d.ratio == pytest.approx(5.5)
    state, d = decide(PolicyState(smoothed={0: 0.2}), {0: 5.0}, 0.0, cfg)
    assert d.partition is None and state.smoothed[0] == pytest.approx(2.6)


def test_split_point_is_the_median_of_the_range():
    lo, hi = PartitionMap.uniform(4).range_of(1)
    rng = np.random.default_rng(1)
    inside = rng.integers(lo, hi, 1001, dtype=np.uint64)
    outside = rng.integers(0, lo, 500, dtype=np.uint64)
    at = split_point([inside[:500], np.concatenate([inside[500:], outside])], lo, hi)
    assert at == int(np.sort(inside)[500])
    # No sample in the range: its middle. One hash only: still strictly inside.
    assert split_point([], lo, hi) == lo + (hi - lo) // 2
    assert lo < split_point([np.array([lo], np.uint64)], lo, hi) < hi
    last_lo, last_hi = PartitionMap.uniform(4).range_of(3)
    assert split_point([np.array([HASH_SPACE - 1], np.uint64)], last_lo, last_hi) == HASH_SPACE - 1


@settings(max_examples=60, deadline=None)
@given(
    p_count=st.integers(1, 9),
    which=st.integers(0, 8),
    frac=st.floats(0.001, 0.999),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_map_routes_every_hash_to_one_child(p_count, which, frac, seed):
    old = PartitionMap.uniform(p_count)
    p = which % p_count
    lo, hi = old.range_of(p)
    at = min(max(lo + int((hi - lo) * frac), lo + 1), hi - 1)
    new = split_map(old, p, at)
    assert new.num_partitions == p_count + 1 and new.version == old.version + 1
    assert new.requested == p_count
    h = np.random.default_rng(seed).integers(0, HASH_SPACE, 2_000, dtype=np.uint64, endpoint=False)
    h = np.concatenate([h, np.array([lo, at - 1, at, hi - 1], np.uint64)])
    before, after = old.route(h), new.route(h)
    # Outside the split range: the same range, numbered one higher above it.
    assert np.array_equal(after[before < p], before[before < p])
    assert np.array_equal(after[before > p], before[before > p] + 1)
    # Inside: exactly one child, by the cut.
    mine = before == p
    assert np.array_equal(after[mine], np.where(h[mine] < np.uint64(at), p, p + 1))
    with pytest.raises(ValueError, match="not inside"):
        split_map(old, p, lo)
    # Merging the children back: the old ranges, version + 2.
    back = merge_map(new, p)
    assert back.bounds == old.bounds and back.version == old.version + 2
    assert np.array_equal(back.route(h), before)
    with pytest.raises(ValueError, match="no next partition"):
        merge_map(new, new.num_partitions - 1)


def test_map_json_keeps_requested_and_resume_keeps_the_split_map():
    m = split_map(PartitionMap.uniform(4), 2, PartitionMap.uniform(4).bounds[2] + 12345)
    assert PartitionMap.from_json(m.to_json()) == m
    assert PartitionMap.from_json(PartitionMap.uniform(4).to_json()).requested is None
    assert _kept_split_map(m, PartitionMap.uniform(4))  # the same partitions=: splits stand
    assert not _kept_split_map(m, PartitionMap.uniform(8))  # another count: re-split to it
    assert not _kept_split_map(PartitionMap.uniform(4), PartitionMap.uniform(8))
    assert not _kept_split_map(m, split_map(m, 0, 5))  # the driver's own next split


def test_reservoir_keeps_recent_hashes_per_partition():
    r = HashReservoir(capacity=100, per_batch=64)
    pmap = PartitionMap.uniform(4)
    rng = np.random.default_rng(3)
    for _ in range(20):
        h = rng.integers(0, HASH_SPACE, 6_400, dtype=np.uint64)
        r.observe(h, pmap.route(h))
    for p in range(4):
        got = r.of(p)
        lo, hi = pmap.range_of(p)
        assert 0 < got.size <= 100
        assert np.all(got >= np.uint64(lo)) and (hi == HASH_SPACE or np.all(got < np.uint64(hi)))
    r.observe(np.zeros(0, np.uint64), np.zeros(0, np.int32))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"factor": 1.0}, "factor must be > 1"),
        ({"window_s": -1}, "window_s must be a number >= 0"),
        ({"max_partitions": 1}, "max_partitions must be an integer >= 2"),
        ({"interval_s": 0}, "interval_s must be > 0"),
        ({"merge_below": 3.0}, "merge_below must be None or a number in"),
        ({"min_partitions": 0}, "min_partitions must be an integer >= 1"),
    ],
)
def test_splits_config_refuses(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        rf.Splits(**kwargs)


def test_a_split_whose_restart_fails_leaves_nothing_running_and_says_why():
    """A split stops the actors and starts them again; when the start fails, what was half
    started is killed, the run keeps its old map, and ``status()``/``wait()`` raise why
    (rather than poll a manager that never ends)."""
    import threading
    import types

    from rayflow._internal.runtime import Run
    from rayflow.errors import PipelineFailedError

    run = object.__new__(Run)
    run.spec = types.SimpleNamespace(name="t")
    run.map = PartitionMap.uniform(2)
    run._actors, run.sources, run.consumers = [], [], {}
    run._t_read, run._rows_at_start, run._input, run.desired_consumers = 0.0, 0, ((), None), 1
    run._launch_lock = threading.RLock()
    run._remap_error = None
    run._stop_requested = threading.Event()
    run._result = None
    run._halt = lambda *, drain, timeout_s: ({"partitions": []}, None)
    killed = []
    run._kill_actors = lambda: killed.append(True)
    run.autoscaler = run.splitter = None

    def launch(*args, **kw):
        raise TimeoutError("the manager did not answer")

    run._launch = launch
    new = PartitionMap.uniform(3)
    with pytest.raises(PipelineFailedError, match="failed to start again after a split"):
        run._remap(new, "split", {"partition": 0}, drain=False)
    assert run.map == PartitionMap.uniform(2) and len(killed) == 2
    with pytest.raises(PipelineFailedError, match="failed to start again"):
        run.status()
    with pytest.raises(PipelineFailedError, match="failed to start again"):
        run.wait(timeout_s=1)


def test_a_split_records_the_ratio_status_saw_even_after_waits_poll_and_not_once_done():
    """``run.split`` records the ``rate_ratio`` that ``run.status()`` last computed under the
    current map, even when ``wait()``'s poll has since replaced ``_last_status`` with the
    manager's own status (no skew figures): the splitter splits while a user waits on the run.
    And no split or merge once the job is done (the splitter decided on an older status)."""
    import threading
    import types

    from rayflow._internal.runtime import Run

    run = object.__new__(Run)
    run.spec = types.SimpleNamespace(name="t", tiers=None, source=None)
    run.map = PartitionMap.uniform(4)
    run._actors, run._result, run._stop_requested = [object()], None, threading.Event()
    run._launch_lock, run._group_lock = threading.RLock(), threading.RLock()
    run._seen_rates = (1, {0: 2.8, 1: 0.4})  # run.status() under version 1 (the splitter's)
    run._last_status = {"partitions": [{"partition": 0, "committed_rows": 10}]}  # wait()'s poll since
    run._remap = lambda new, kind, detail, *, drain: detail
    done = {"done": False}
    run.manager = types.SimpleNamespace(status=types.SimpleNamespace(remote=lambda: done))
    run._get = lambda ref, timeout=None: ref
    lo, hi = run.map.range_of(0)
    assert run.split(0, at=(lo + hi) // 2, reason="policy")["rate_ratio"] == 2.8
    # Figures seen under another map name other ranges: none is recorded.
    run._seen_rates = (0, {0: 2.8})
    assert run.split(0, at=(lo + hi) // 2)["rate_ratio"] is None
    # A job whose input is all committed (wait() may be taking its result) keeps its map.
    done["done"] = True
    with pytest.raises(ConfigError, match="committed all of its input"):
        run.split(0, at=(lo + hi) // 2)
    with pytest.raises(ConfigError, match="committed all of its input"):
        run.merge(0)
