"""State larger than memory (issue 13, part 3): the run store and a spilled Aggregate, without Ray.

The pure decisions (a consumer's budget split, which runs merge, hash ranges)
are tested by name; the run store against plain Arrow; a spilled Aggregate
against the same Aggregate held in memory, step by step, in every emit mode,
through deltas, snapshots and restores (Hypothesis, seeded).
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import rayflow as rf
from rayflow._internal import runs as rn
from rayflow.partitioning import HASH_SPACE, hash_table

AGGS = [("v", "count"), ("v", "sum"), ("v", "min"), ("v", "max"), ("v", "mean")]


def _sorted(t: pa.Table, by: list[str]) -> pa.Table:
    return t.sort_by([(c, "ascending") for c in by]).combine_chunks()


# ----------------------------------------------------------------------------- pure decisions
def test_state_share_divides_the_budget_among_partitions_and_operators():
    assert rn.state_share(8 << 20, partitions=4, operators=2) == 1 << 20
    assert rn.state_share(8 << 20, partitions=0, operators=1) == 8 << 20  # nothing owned yet
    assert rn.state_share(100, partitions=3, operators=1) == rn.MIN_SHARE_BYTES  # the floor


def test_runs_to_merge_takes_a_full_tier_smallest_first():
    assert rn.runs_to_merge([10, 10, 10]) == []
    assert rn.runs_to_merge([10, 11, 12, 13]) == [0, 1, 2, 3]
    # a big run and three small ones: the small tier is not full yet
    assert rn.runs_to_merge([1000, 10, 10, 10]) == []
    assert rn.runs_to_merge([1000, 10, 10, 10, 12]) == [1, 2, 3, 4]
    # two full tiers: the smaller goes first
    assert rn.runs_to_merge([100, 100, 100, 100, 1, 1, 1, 1]) == [4, 5, 6, 7]


@given(st.integers(0, 10**9), st.integers(10**6, 10**9))
def test_hash_ranges_cover_the_hash_space_once(total, target):
    ranges = rn.hash_ranges(total, target)
    assert ranges[0][0] == 0 and ranges[-1][1] == HASH_SPACE
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:]))
    assert len(ranges) == max(1, -(-total // target))


def test_dead_spill_dirs_are_the_jobs_dirs_of_gone_processes():
    names = [
        rn.spill_dir_name("job", "consumer-0", 11),
        rn.spill_dir_name("job", "consumer-1", 12),
        rn.spill_dir_name("job-b", "consumer-0", 13),  # another job's: never touched
        "rayflow-state-job-consumer-2-notapid",
        "unrelated",
    ]
    assert rn.dead_spill_dirs(names, "job", alive=lambda pid: pid == 12) == [names[0]]


def test_wipe_dead_removes_only_dead_processes_dirs(tmp_path):
    mine = tmp_path / rn.spill_dir_name("j", "consumer-0", os.getpid())
    dead = tmp_path / rn.spill_dir_name("j", "consumer-1", 2**30)
    for d in (mine, dead):
        d.mkdir()
        (d / "run-x.parquet").write_bytes(b"x")
    rn.wipe_dead(str(tmp_path), "j", alive=lambda pid: pid == os.getpid())
    assert mine.exists() and not dead.exists()
    rn.wipe_dead(str(tmp_path / "missing"), "j", alive=lambda pid: False)  # no directory: nothing


# ----------------------------------------------------------------------------- run store
def test_runs_look_up_read_ranges_and_merge_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(rn, "_SORT_SLICE_ROWS", 30_000)  # a run written a sorted slice at a time
    rng = np.random.default_rng(7)
    runs = rn.RunSet(str(tmp_path / "runs"), ["k"])
    tables = [
        pa.table(
            {"k": pa.array(rng.choice(300_000, 100_000, replace=False)), "v": rng.integers(0, 9, 100_000)}
        )
        for _ in range(3)
    ]
    for t in tables:
        runs.write(t)
    every = pa.concat_tables(tables)
    assert runs.num_rows == every.num_rows and runs.nbytes > 0
    # lookup: exactly the rows of the asked keys, from every run
    asked = pa.table({"k": pa.array([0, 5, 299_999, 123_456, 10**9])})
    got = pa.concat_tables(runs.lookup(hash_table(asked, ["k"])))
    want = every.filter(pc.is_in(every["k"], asked["k"]))
    assert _sorted(got, ["k", "v"]).equals(_sorted(want, ["k", "v"]))
    # ranges: every row once, in its range
    ranges = rn.hash_ranges(runs.table_bytes, runs.table_bytes // 5)
    seen = 0
    for lo, hi in ranges:
        for t in runs.read_range(lo, hi):
            h = hash_table(t, ["k"])
            assert (
                (h >= np.uint64(lo)) & ((hi >= HASH_SPACE) | (h < np.uint64(min(hi, HASH_SPACE - 1))))
            ).all()
            seen += t.num_rows
    assert seen == every.num_rows
    # merge: one run, one row per key, sums kept; the old files are gone
    old = [r.path for r in runs.runs]

    def fold(ts):
        return pa.concat_tables(ts).group_by("k").aggregate([("v", "sum")]).rename_columns(["k", "v"])

    runs.merge([0, 1, 2], fold, range_bytes=200_000)
    assert len(runs.runs) == 1 and not any(os.path.exists(p) for p in old)
    merged = pa.concat_tables(runs.read_range(0, HASH_SPACE))
    assert _sorted(merged, ["k"]).equals(_sorted(fold([every]), ["k"]))
    runs.delete()
    assert runs.runs == [] and not list((tmp_path / "runs").iterdir())


def test_runs_are_deleted_when_the_set_is_collected(tmp_path):
    runs = rn.RunSet(str(tmp_path), ["k"])
    runs.write(pa.table({"k": [1, 2, 3]}))
    assert list(tmp_path.iterdir())
    del runs
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- spilled Aggregate
def _batches(rng: np.random.Generator, n: int, keys: int, rows: int) -> list[pa.Table]:
    out = []
    for _ in range(n):
        k = rng.integers(0, keys, rows)
        g = rng.integers(0, 3, rows)
        v = rng.integers(-50, 50, rows).astype(float)
        v[rng.random(rows) < 0.1] = np.nan
        out.append(
            pa.table(
                {
                    "k": pa.array(k),
                    "g": pa.array([f"g{x}" for x in g]),
                    "v": pa.array(v, mask=np.isnan(v)),
                }
            )
        )
    return out


def _run_both(ops, steps, tmp_path, share):
    """Drive a plain (in-memory) and a bound (spilled) copy of the same Aggregate through the
    same steps; check each step's outputs are equal; return both final states."""
    plain, spilled = ops
    a = plain.init_state()
    b = spilled.bound_state(spilled.init_state(), max_bytes=share, spill_dir=str(tmp_path), key=["k"])
    version = 0
    for kind, arg in steps:
        if kind == "batch":
            a, _ = plain.process(a, arg)
            b, _ = spilled.process(b, arg)
        elif kind == "flush" and plain.emits_changes:
            version += 1
            a, out_a = plain.flush(a, version=version)
            b, out_b = spilled.flush(b, version=version)
            assert (out_a is None) == (out_b is None)
            if out_a is not None:
                assert _sorted(out_a, ["k", "g"]).equals(_sorted(out_b, ["k", "g"]))
        elif kind == "commit":
            a, da = plain.state_delta(a)
            b, db = spilled.state_delta(b)
            assert _sorted(da, ["k", "g"]).equals(_sorted(db, ["k", "g"]))
            sa, sb = plain.state_to_table(a), spilled.state_to_table(b)
            assert _sorted(sa, ["k", "g"]).equals(_sorted(sb, ["k", "g"]))
        elif kind == "restore":  # a new owner: from the snapshot, bound again
            snap = spilled.state_to_table(b)
            spilled.release_state(b)
            b = spilled.bound_state(
                spilled.state_from_tables([snap]), max_bytes=share, spill_dir=str(tmp_path), key=["k"]
            )
            a = plain.state_from_tables([plain.state_to_table(a)])
    return a, b


@pytest.mark.parametrize("emit", ["final", "changes"])
def test_a_spilled_aggregate_equals_the_in_memory_one(tmp_path, emit):
    rng = np.random.default_rng(11)
    ops = [rf.ops.Aggregate(by=["k", "g"], aggs=AGGS, emit=emit) for _ in range(2)]
    steps = []
    for i, t in enumerate(_batches(rng, 30, 20_000, 3_000)):
        steps.append(("batch", t))
        steps += [("flush", None), ("commit", None)] if i % 7 == 6 else []
        steps += [("restore", None)] if i == 18 else []
    a, b = _run_both(ops, steps, tmp_path, share=rn.MIN_SHARE_BYTES)
    assert ops[1].state_nbytes(b)[1] > 0, "the state never spilled: the test proves nothing"
    assert len(b[5].runs.runs) < 2 * rn.RUNS_FAN_IN  # merged by tier
    if emit == "final":
        assert _sorted(ops[0].finish(a), ["k", "g"]).equals(_sorted(ops[1].finish(b), ["k", "g"]))
    files = list(tmp_path.iterdir())
    ops[1].release_state(b)
    assert files and not list(tmp_path.iterdir())


@seed(13)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    emit=st.sampled_from(["final", "changes"]),
    keys=st.integers(1, 5_000),
)
def test_spilled_aggregate_property(tmp_path_factory, data, emit, keys):
    """Any interleaving of batches, flushes, commits and restores: same outputs and states."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    kinds = data.draw(
        st.lists(st.sampled_from(["batch", "batch", "batch", "flush", "commit", "restore"]), max_size=25)
    )
    steps = [
        (k, _batches(rng, 1, keys, int(rng.integers(1, 3_000)))[0] if k == "batch" else None) for k in kinds
    ]
    ops = [rf.ops.Aggregate(by=["k", "g"], aggs=AGGS, emit=emit) for _ in range(2)]
    tmp = tmp_path_factory.mktemp("spill")
    a, b = _run_both(ops, steps, tmp, share=rn.MIN_SHARE_BYTES)
    fa, fb = ops[0].finish(a), ops[1].finish(b)
    assert (fa is None) == (fb is None)
    if fa is not None:
        assert _sorted(fa, ["k", "g"]).equals(_sorted(fb, ["k", "g"]))
    ops[1].release_state(b)


def test_state_nbytes_reports_memory_and_disk(tmp_path):
    op = rf.ops.Aggregate(by="k", aggs=[("v", "sum")])
    s = op.bound_state(op.init_state(), max_bytes=rn.MIN_SHARE_BYTES, spill_dir=str(tmp_path), key=["k"])
    for t in _batches(np.random.default_rng(1), 10, 50_000, 5_000):
        s, _ = op.process(s, t.select(["k", "v"]))
    assert op.state_nbytes(s)[0] > 4 * rn.MIN_SHARE_BYTES  # the delta: what the next commit writes
    s, _ = op.state_delta(s)
    mem, disk = op.state_nbytes(s)
    assert mem <= rn.MIN_SHARE_BYTES and disk > 0
    # the base class counts a state's Arrow data
    assert rf.ops.Filter(pc.field("x") > 0).state_nbytes((pa.table({"x": [1, 2]}), [pa.array([1])])) == (
        24,
        0,
    )
