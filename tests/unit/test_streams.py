"""Live streams without Ray: the paced Synthetic's schedule and grid, who reads a discovered split,
cutting a replayed batch at a committed position, lag figures, and the catalog's and the resume
check's part in dynamic sources (issue 9)."""

from __future__ import annotations

import math
import time

import numpy as np
import pyarrow as pa
import pytest

import rayflow as rf
from rayflow._internal.checkpoint.catalog import Catalog
from rayflow._internal.compat import JobMeta, check_resume
from rayflow._internal.lag import add_lag
from rayflow._internal.source_actor import owner_of, route_batch
from rayflow.errors import ConfigError, IncompatibleCheckpointError
from rayflow.sources.synthetic import SYNTHETIC_BLOCK_ROWS, Schedule

# ----------------------------------------------------------------------------- the schedule

PROFILES = [
    [(None, 1000)],
    [(None, 3)],
    [(100, 1000), (50, 0), (200, 333)],  # cycled, with a pause
    [(7, 1), (3, 100_000)],  # fewer rows than ms, then a burst
    [(250, 10), (None, 7_000)],  # a start, then steady for ever
]


@pytest.mark.parametrize("segments", PROFILES)
def test_due_counts_exactly_the_rows_scheduled_before(segments):
    s = Schedule(tuple((d, r) for d, r in segments))
    t = s.time_of(np.arange(20_000, dtype=np.int64))
    assert (np.diff(t) >= 0).all()
    for ms in list(range(0, 1200)) + [int(x) for x in t[::997]]:
        if ms <= t[-1]:  # rows past the sample would count too
            assert s.due(ms) == int((t < ms).sum()), ms
    assert s.time_of(5) == int(t[5])  # a scalar in, a scalar out


def test_a_constant_rate_is_workloads_formula():
    t = Schedule(((None, 1_000_000),)).time_of(np.arange(3_000_000, dtype=np.int64))
    assert (t == np.arange(3_000_000) * 1000 // 1_000_000).all()


def test_a_profile_cycles_and_an_endless_last_segment_holds():
    cyc = Schedule.from_rate([(0.1, 1000), (0.1, 0)])  # 100 rows, a 100 ms pause, again
    assert [cyc.time_of(i) for i in (0, 99, 100, 199, 200)] == [0, 99, 200, 299, 400]
    held = Schedule.from_rate([(0.1, 1000), (math.inf, 10)])
    assert [held.time_of(i) for i in (99, 100, 101)] == [99, 100, 200]
    assert held.endless and cyc.endless
    assert not Schedule.from_rate([(1, 0)]).endless


def test_shares_of_a_rate_sum_to_it():
    s = Schedule.from_rate([(1, 1003), (math.inf, 10)])
    shares = [s.share(j, 4) for j in range(4)]
    assert sum(x.due(1000) for x in shares) == s.due(1000) == 1003
    assert sum(x.due(60_000) for x in shares) == s.due(60_000)


@pytest.mark.parametrize(
    "rate",
    [0, -5, 1.5, "fast", [], [(1,)], [(0, 100)], [(math.inf, 10), (1, 10)], [(1, -1)], [(math.nan, 3)]],
)
def test_bad_rates_are_refused(rate):
    with pytest.raises(ConfigError):
        rf.sources.Synthetic(rate=rate)


def test_a_rate_too_low_for_the_splits_is_refused():
    with pytest.raises(ConfigError, match="without events"):
        rf.sources.Synthetic(rate=1, splits=2)


# ----------------------------------------------------------------------------- the paced Synthetic


def bound(split, *, ago_s: float):
    return split.bind(job_started_ms=int(time.time() * 1000 - ago_s * 1000))


def read_until(split, position: int, rows: int) -> list[tuple[pa.RecordBatch, int]]:
    out, got = [], 0
    for b, end in split.read(position):
        out.append((b, end))
        got += b.num_rows
        if got >= rows:
            break
    return out


def test_a_backlog_is_read_at_once_on_a_grid_and_resumes_on_it():
    """Rows due long ago come without waiting, in batches that end on one grid whatever the
    position read from; a resumed read yields the same rows with the same ts."""
    split = bound(rf.sources.Synthetic(rate=100_000, batch_ms=20).splits()[0], ago_s=60)
    t0 = time.monotonic()
    whole = read_until(split, 0, 50_000)
    assert time.monotonic() - t0 < 5
    ends = [e for _, e in whole]
    assert all(b.num_rows == 2_000 for b, _ in whole)  # 20 ms of 100k/s
    resumed = read_until(split, ends[3], 20_000)
    assert [e for _, e in resumed] == ends[4 : 4 + len(resumed)]
    a = pa.Table.from_batches([b for b, _ in whole[4 : 4 + len(resumed)]])
    assert pa.Table.from_batches([b for b, _ in resumed]).equals(a)
    # Reading from inside a batch starts exactly there and ends on the grid.
    first, end = next(iter(split.read(ends[3] + 7)))
    assert end == ends[4] and first.equals(whole[4][0].slice(7))


def test_ts_is_the_generation_time_and_rows_wait_for_it():
    src = rf.sources.Synthetic(rate=2_000, keys=100)
    split = bound(src.splits()[0], ago_s=0.2)
    t0 = time.time()
    batches = read_until(split, 0, 1_000)  # 0.5 s of rows, 0.2 s of them due at once
    took = time.time() - t0
    assert 0.2 < took < 2.0
    table = pa.Table.from_batches([b for b, _ in batches])
    ts = table["ts"].to_numpy()
    assert (np.diff(ts) >= 0).all()
    assert ts[0] == split.start_ms and ts[999] == split.start_ms + 999 * 1000 // 2_000
    assert abs(split.available() - (time.time() * 1000 - split.start_ms) * 2) < 200


def test_a_quiet_schedule_yields_idle_ticks():
    split = bound(rf.sources.Synthetic(rate=[(0.01, 1000), (5, 0)]).splits()[0], ago_s=0)
    it = iter(split.read(0))
    batch, end = next(it)
    assert (batch.num_rows, end) == (10, 10)  # 10 ms at 1000/s, then a pause of 5 s
    t0 = time.monotonic()
    ticks = []
    for batch, end in it:
        ticks.append((batch.num_rows, end))
        if len(ticks) == 2:
            break
    it.close()
    assert ticks == [(0, 10), (0, 10)]  # empty batches, position unchanged
    assert time.monotonic() - t0 < 3 * rf.sources.base.IDLE_TICK_S


def test_paced_rows_are_the_unpaced_stream():
    """The same key and value by position: a bounded paced stream is the bounded stream, and
    the splits of an unbounded one deal its blocks round-robin."""
    whole = rf.sources.Synthetic(events=2_500_000).to_table()
    kv = ["key", "value"]
    paced = rf.sources.Synthetic(events=2_500_000, rate=1000, splits=2).to_table()
    assert paced.select(kv).equals(whole.select(kv))
    live = rf.sources.Synthetic(rate=1000, splits=2)
    names = [s.name for s in live.splits()]
    assert names == ["synthetic[0::2]", "synthetic[1::2]"]
    got = live.to_table({names[0]: SYNTHETIC_BLOCK_ROWS + 5, names[1]: 10})
    one = SYNTHETIC_BLOCK_ROWS
    assert got.slice(0, one).select(kv).equals(whole.slice(0, one).select(kv))
    assert got.slice(one, 5).select(kv).equals(whole.slice(2 * one, 5).select(kv))
    assert got.slice(one + 5).select(kv).equals(whole.slice(one, 10).select(kv))


def test_unbounded_synthetic_is_unbounded_and_bounded_ones_are_not():
    assert rf.sources.Synthetic(rate=10).unbounded
    assert not rf.sources.Synthetic(rate=10, events=100).unbounded
    assert not rf.sources.Synthetic().unbounded and rf.sources.Synthetic().events == 10_000_000
    with pytest.raises(ConfigError, match="positions"):
        rf.sources.Synthetic(rate=10).to_table()


def test_run_refuses_an_unbounded_source():
    p = rf.Pipeline(name="live", source=rf.sources.Synthetic(rate=10), key="key", progress=False)
    with pytest.raises(ConfigError, match=r"start\(\).*stop\(\)"):
        p.run()


# ----------------------------------------------------------------------------- source actor parts


def test_discovered_splits_have_one_owner_stable_across_processes():
    dealt = {"a": 0, "b": 1, "c": 0}
    names = [f"topic/{i}" for i in range(200)]
    owners = [owner_of(n, dealt, 3) for n in names]
    assert owners == [owner_of(n, dict(dealt), 3) for n in names]
    assert set(owners) == {0, 1, 2}  # spread
    assert [owner_of(n, dealt, 3) for n in "abc"] == [0, 1, 0]  # the initial deal holds
    # A fixed value: the hash does not depend on the process (never Python's salted hash()).
    assert owner_of("topic/0", {}, 1000) == owner_of("topic/0", {}, 1000) == 903


def test_a_replayed_batch_is_cut_at_each_partitions_committed_position():
    batch = pa.record_batch({"i": pa.array(range(10), pa.int64())})
    routed = np.array([0, 1] * 5, dtype=np.int32)
    # Dense: the batch covers positions [100, 110); partition 1 committed 106, partition 0 110.
    parts = route_batch(batch, routed, 2, start=100, end=110, committed={0: 110, 1: 106})
    assert [(p, first, sub["i"].to_pylist()) for p, first, sub in parts] == [(1, 106, [7, 9])]
    # Gaps: row k sits at position 3k + 1; the batch covers [0, 30). Partition 0 committed 13
    # (rows at 13 and after: k >= 4), partition 1 nothing.
    parts = route_batch(
        batch,
        routed,
        2,
        start=0,
        end=30,
        committed={0: 13},
        row_positions=lambda b: 3 * b["i"].to_numpy() + 1,
    )
    got = {p: (first, sub["i"].to_pylist()) for p, first, sub in parts}
    assert got == {0: (13, [4, 6, 8]), 1: (0, [1, 3, 5, 7, 9])}


def test_lag_counts_uncommitted_and_unread_rows_in_rows_and_seconds():
    st = {
        "partitions": [
            {"partition": 0, "queued_rows": 100, "load_rows_per_s": 50.0, "last_commit_at": 1000.0},
            {"partition": 1, "queued_rows": 0, "load_rows_per_s": 150.0, "last_commit_at": None},
        ]
    }
    sources = [
        {"routed_rows": [250, 750], "unread_rows": 400, "arrival_rows_per_s": 200.0},
        {"routed_rows": [0, 0], "unread_rows": 0, "arrival_rows_per_s": None},
    ]
    add_lag(st, sources, wall=1002.5)
    p0, p1 = st["partitions"]
    assert (p0["lag_rows"], p1["lag_rows"]) == (200, 300)
    assert (p0["lag_s"], p1["lag_s"]) == (4.0, 2.0)  # over the shares of 200 rows/s arriving
    assert (p0["last_commit_age_s"], p1["last_commit_age_s"]) == (2.5, None)
    assert (st["lag_rows"], st["lag_s"], st["rate_rows_per_s"]) == (500, 4.0, 200.0)
    assert st["last_commit_at"] == 1000.0
    # Nothing reports available(): seconds over the processing rate; nothing known: None.
    sources[0]["arrival_rows_per_s"] = None
    add_lag(st, sources, wall=1002.5)
    assert st["partitions"][0]["lag_s"] == 4.0 and st["partitions"][1]["lag_s"] == 2.0
    st["partitions"][0]["load_rows_per_s"] = 0.0
    add_lag(st, sources, wall=1002.5)
    assert st["partitions"][0]["lag_s"] is None


# ----------------------------------------------------------------------------- resume records


def meta(splits, *, dynamic=False) -> JobMeta:
    return JobMeta.build(
        key=["key"],
        partition_map_json=rf.partitioning.PartitionMap.uniform(2).to_json(),
        operators=[],
        splits=list(splits),
        schema=pa.schema([("key", pa.int64())]),
        dynamic=dynamic,
    )


def test_a_dynamic_source_may_lose_splits_a_static_one_may_not():
    old = meta(["a", "b"], dynamic=True)
    check_resume("j", old, meta(["b", "c"], dynamic=True), known_splits=["a", "b", "x"])
    assert JobMeta.from_dict(old.to_dict()) == old
    # The same input as a static source must still list every split read, discovered ones too.
    with pytest.raises(IncompatibleCheckpointError, match=r"\['x'\]"):
        check_resume("j", old, meta(["a", "b"]), known_splits=["a", "b", "x"])
    check_resume("j", old, meta(["a", "b", "x"]), known_splits=["a", "b", "x"])


@pytest.mark.parametrize("remote", [False, True])
def test_known_splits_and_the_start_time_survive_a_restart(tmp_path, remote):
    log_root = str(tmp_path / "bucket") if remote else None
    cat = Catalog(str(tmp_path / "a" / "c.duckdb"), log_root=log_root)
    assert cat.add_splits({"s1": "f1", "s2": None}) == {"s1": "f1", "s2": None}
    assert cat.add_splits({"s2": "f2", "s3": "f3", "s1": "g1"}) == {"s2": "f2", "s3": "f3", "s1": "f1"}
    assert cat.started_ms() is None
    assert cat.ensure_started_ms(1234) == 1234 and cat.ensure_started_ms(9999) == 1234
    cat.set_meta({"key": '["key"]'})  # rewriting the job's meta keeps the start time
    if remote:
        assert cat.compact_log(force=True)
        cat.add_splits({"s4": "f4"})  # one entry after the snapshot
    cat.close()
    again = Catalog(str(tmp_path / ("b" if remote else "a") / "c.duckdb"), log_root=log_root)
    assert again.known_splits() == ["s1", "s2", "s3"] + (["s4"] if remote else [])
    # The first fingerprint recorded for each name, whatever is given now.
    assert again.add_splits(dict.fromkeys(["s1", "s2", "s3"], "other")) == {
        "s1": "f1",
        "s2": "f2",
        "s3": "f3",
    }
    assert again.started_ms() == 1234
    assert again.get_meta() == {"key": '["key"]'}
    again.close()


def test_the_last_commit_time_of_each_partition_is_read_back(tmp_path):
    from rayflow._internal.checkpoint.commit import CommitRecord

    cat = Catalog(str(tmp_path / "c.duckdb"))
    rec = CommitRecord(
        partition=3, lease_epoch=1, positions={"s": 1}, state_files=[], output_files=[],
        rows_in=1, rows_total=1, state_rows=0, final=False, map_version=1,
    )  # fmt: skip
    cat.record_commits("m", [rec])
    (at,) = cat.last_commit_times().values()
    assert list(cat.last_commit_times()) == [3] and abs(at - time.time()) < 60
    cat.close()


def test_a_watched_file_s_fingerprint_is_its_pin_and_changes_with_the_file(tmp_path):
    """What the catalog records per split of a dynamic source (``Split.fingerprint``): the same
    for the same file in any instance, another one for a file replaced under the same name."""
    import os

    import pyarrow.parquet as pq

    def fingerprint() -> str | None:
        (split,) = rf.sources.Files(str(tmp_path), watch=True, assume_renamed=True).splits()
        return split.fingerprint()

    pq.write_table(pa.table({"key": [1, 2, 3]}), tmp_path / "a.parquet")
    first = fingerprint()
    assert first is not None and first == fingerprint()
    pq.write_table(pa.table({"key": [4, 5, 6, 7]}), tmp_path / "a.tmp")
    os.replace(tmp_path / "a.tmp", tmp_path / "a.parquet")
    assert fingerprint() not in (None, first)
    # Splits that pin nothing have nothing to check.
    (plain,) = rf.sources.Parquet(str(tmp_path / "a.parquet")).splits()
    assert plain.fingerprint() is None
