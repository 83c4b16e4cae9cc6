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
import pyarrow.parquet as pq
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


def test_dead_spill_dirs_are_this_nodes_dirs_of_gone_processes_of_any_job():
    names = [
        rn.spill_dir_name("job", "consumer-0", 11, node="n1"),
        rn.spill_dir_name("job", "consumer-1", 12, node="n1"),  # alive
        rn.spill_dir_name("job-b", "consumer-0", 13, node="n1"),  # another job's, dead: wiped too
        rn.spill_dir_name("job", "consumer-0", 14, node="n2"),  # another node's: its pids are not ours
        rn.spill_dir_name("job", "consumer-0", 15, node="xn1"),  # a node whose name ends like ours
        "rayflow-state-job-consumer-2-n1-notapid",
        "rayflow-state-job-consumer-2-17",  # no node: not a name this version writes
        "unrelated",
    ]
    assert rn.dead_spill_dirs(names, "n1", alive=lambda pid: pid == 12) == [names[0], names[2]]
    assert rn.node_name() and "-" not in rn.node_name()
    assert rn.spill_dir_name("j", "consumer-3", 7).endswith(f"-consumer-3-{rn.node_name()}-7")


def test_wipe_dead_removes_only_dead_processes_dirs(tmp_path):
    mine = tmp_path / rn.spill_dir_name("j", "consumer-0", os.getpid())
    dead = tmp_path / rn.spill_dir_name("j", "consumer-1", 2**30)
    other_job = tmp_path / rn.spill_dir_name("k", "consumer-0", 2**30 + 1)
    other_node = tmp_path / rn.spill_dir_name("j", "consumer-1", 2**30, node="elsewhere")
    for d in (mine, dead, other_job, other_node):
        d.mkdir()
        (d / "run-x.parquet").write_bytes(b"x")
    rn.wipe_dead(str(tmp_path), alive=lambda pid: pid == os.getpid())
    assert mine.exists() and other_node.exists() and not dead.exists() and not other_job.exists()
    rn.wipe_dead(str(tmp_path / "missing"), alive=lambda pid: False)  # no directory: nothing


def test_the_budget_is_shared_by_the_partitions_still_processing():
    from types import SimpleNamespace

    from rayflow._internal import partition_task as pt
    from rayflow._internal.consumer import ConsumerActor

    cls = ConsumerActor.__ray_metadata__.modified_class
    owned = {p: SimpleNamespace(running=ph in pt.RUNNING) for p, ph in enumerate(pt.Phase)}
    assert cls._processing(SimpleNamespace(owned=owned)) == len(pt.RUNNING) == 3


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
    assert runs.runs == [] and not (tmp_path / "runs").exists()  # its directory too, once empty


def test_lookup_reads_a_few_row_groups_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(rn, "RUN_ROW_GROUP_ROWS", 1_000)
    runs = rn.RunSet(str(tmp_path), ["k"])
    t = pa.table({"k": pa.array(np.arange(20_000)), "v": pa.array(np.arange(20_000) % 7)})
    runs.write(t)
    reads: list[int] = []
    orig = pq.ParquetFile.read_row_groups

    def counted(self, groups, *a, **k):
        reads.append(len(groups))
        return orig(self, groups, *a, **k)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", counted)
    asked = pa.table({"k": pa.array(np.arange(0, 20_000, 97))})  # scattered: every row group
    got = pa.concat_tables(runs.lookup(hash_table(asked, ["k"])))
    assert _sorted(got, ["k"]).equals(_sorted(t.filter(pc.is_in(t["k"], asked["k"])), ["k"]))
    assert sum(reads) == 20 and max(reads) <= rn.LOOKUP_GROUPS  # never the whole run at once


def test_a_merge_opens_each_run_once_and_ranges_span_a_row_group(tmp_path, monkeypatch):
    monkeypatch.setattr(rn, "RUN_ROW_GROUP_ROWS", 1_000)
    runs = rn.RunSet(str(tmp_path), ["k"])
    for i in range(4):
        runs.write(pa.table({"k": pa.array(np.arange(i, 40_000, 4))}))
    opened: list[str] = []
    orig = pq.ParquetFile.__init__

    def counted(self, path, *a, **k):
        opened.append(path)
        orig(self, path, *a, **k)

    monkeypatch.setattr(pq.ParquetFile, "__init__", counted)
    groups: list[int] = []
    orig_read = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(
        pq.ParquetFile,
        "read_row_groups",
        lambda self, g, *a, **k: groups.append(len(g)) or orig_read(self, g),
    )
    # a range of 1 byte would be 160k ranges: at least one row group (1000 rows) of a run each
    runs.merge([0, 1, 2, 3], lambda ts: pa.concat_tables(ts), range_bytes=1)
    assert len(opened) == 4  # once per run, not once per run and range
    assert sum(groups) <= 2 * 40  # 10 row groups per run, each read about once (twice at a seam)
    assert runs.num_rows == 40_000
    assert rn._range_target(1 << 20, 10_000, 1) == (1 << 20) * 1_000 // 10_000
    assert rn._range_target(1 << 20, 0, 5) == 5


def test_read_range_keeps_a_row_group_whose_hashes_are_all_the_last_hash(tmp_path):
    w = rn.RunWriter(str(tmp_path / "r.parquet"), pa.schema([("k", pa.int64())]))
    last = np.uint64(HASH_SPACE - 1)
    w.write(pa.table({"k": pa.array([1, 2, 3])}), np.array([5, last, last], np.uint64))
    runs = rn.RunSet(str(tmp_path), ["k"])
    runs.runs.append(w.close())
    assert runs.read_range(0, HASH_SPACE)[0]["k"].to_pylist() == [1, 2, 3]
    assert runs.read_range(int(last), HASH_SPACE)[0]["k"].to_pylist() == [2, 3]
    assert runs.read_range(0, int(last))[0]["k"].to_pylist() == [1]
    assert runs.lookup(np.array([last], np.uint64))[0]["k"].to_pylist() == [2, 3]
    # and a row group whose only hash is 2**64 - 1 (min == max == the last hash)
    w = rn.RunWriter(str(tmp_path / "s.parquet"), pa.schema([("k", pa.int64())]))
    w.write(pa.table({"k": pa.array([9])}), np.array([last], np.uint64))
    runs.runs[:] = [w.close()]
    assert runs.read_range(0, HASH_SPACE)[0]["k"].to_pylist() == [9]
    assert runs.read_range(0, int(last)) == []


def test_a_released_state_leaves_no_directory(tmp_path):
    op = rf.ops.Aggregate(by="k", aggs=[("v", "sum")])
    d = tmp_path / "p00000-e000001-op0"
    s = op.bound_state(op.init_state(), max_bytes=4096, spill_dir=str(d), key=["k"])
    s, _ = op.process(s, pa.table({"k": np.arange(5_000), "v": np.ones(5_000)}))
    assert op.state_nbytes(s)[1] > 0 and d.exists()
    op.release_state(s)
    assert not d.exists()


def test_a_multi_input_jobs_aggregate_spills_by_its_own_columns(tmp_path):
    """A multi-input job's key names no column (``("a:x", "b:x")``): runs hash by ``by``."""
    rng = np.random.default_rng(0)
    ops = [rf.ops.Aggregate(by="x", aggs=[("v", "sum")], emit=e) for e in ("final", "final", "changes")]
    plain = ops[0].init_state()
    spilled = [
        op.bound_state(
            op.init_state(),
            max_bytes=rn.MIN_SHARE_BYTES,
            spill_dir=str(tmp_path / str(i)),
            key=["a:x", "b:x"],
        )
        for i, op in enumerate(ops[1:])
    ]
    for _ in range(8):
        t = pa.table({"x": rng.integers(0, 10**9, 10_000), "v": rng.integers(0, 9, 10_000)})
        plain, _ = ops[0].process(plain, t)
        spilled = [op.process(s, t)[0] for op, s in zip(ops[1:], spilled)]
    spilled[1], out = ops[2].flush(spilled[1], version=1)  # looks the changed keys up in the runs
    assert all(op.state_nbytes(s)[1] > 0 for op, s in zip(ops[1:], spilled))
    want = _sorted(ops[0].finish(plain), ["x"])
    assert _sorted(ops[1].finish(spilled[0]), ["x"]).equals(want)
    assert _sorted(out.drop_columns(["_version"]), ["x"]).equals(want)


def test_runs_are_deleted_when_the_set_is_collected(tmp_path):
    runs = rn.RunSet(str(tmp_path / "runs"), ["k"])
    runs.write(pa.table({"k": [1, 2, 3]}))
    assert list((tmp_path / "runs").iterdir())
    del runs
    assert not (tmp_path / "runs").exists()


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


def _run_both(ops, steps, tmp_path, share, seen=None, streamed=False):
    """Drive a plain (in-memory) and a bound (spilled) copy of the same Aggregate through the
    same steps; check each step's outputs are equal; return both final states. A commit takes
    the spilled copy's delta (and, at a ``"snapshot"``, a base); a restore binds a new state
    from the last base and every delta since, as a new owner reads a checkpoint's chain.
    ``seen`` (a dict) gets the most runs and disk bytes the spilled copy held."""
    plain, spilled = ops
    a = plain.init_state()
    b = spilled.bound_state(spilled.init_state(), max_bytes=share, spill_dir=str(tmp_path), key=["k"])
    chain: list[pa.Table] = []  # the last base (if any) and the deltas since, as committed
    version = 0
    seen = seen if seen is not None else {}
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
        elif kind in ("commit", "snapshot"):
            a, da = plain.state_delta(a)
            b, db = spilled.state_delta(b)
            assert _sorted(da, ["k", "g"]).equals(_sorted(db, ["k", "g"]))
            sa, sb = plain.state_to_table(a), spilled.state_to_table(b)
            assert _sorted(sa, ["k", "g"]).equals(_sorted(sb, ["k", "g"]))
            chain = [sb] if kind == "snapshot" else chain + [db]
        elif kind == "restore":  # a new owner: from the base and deltas, bound again
            b, db = spilled.state_delta(b)
            chain.append(db)
            seen["restores"] = seen.get("restores", 0) + 1
            seen["chain"] = max(seen.get("chain", 0), len([t for t in chain if t.num_rows]))
            spilled.release_state(b)
            if streamed:  # as a consumer restores a running partition: 500 rows at a time
                pieces = [[t.slice(a, 500) for a in range(0, t.num_rows, 500)] for t in chain]
                b = spilled.restore_bound(pieces, max_bytes=share, spill_dir=str(tmp_path), key=["k"])
            else:
                b = spilled.bound_state(
                    spilled.state_from_tables(list(chain)),
                    max_bytes=share,
                    spill_dir=str(tmp_path),
                    key=["k"],
                )
            a, _ = plain.state_delta(plain.state_from_tables([plain.state_to_table(a)]))
        if b[5] is not None:
            seen["runs"] = max(seen.get("runs", 0), len(b[5].runs.runs))
            seen["disk"] = max(seen.get("disk", 0), spilled.state_nbytes(b)[1])
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
    assert files and not tmp_path.exists()  # the partition's directory goes with its runs


@seed(13)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    emit=st.sampled_from(["final", "changes"]),
    keys=st.integers(1, 5_000),
    share=st.sampled_from([2_048, 8_192, rn.MIN_SHARE_BYTES]),
)
def test_spilled_aggregate_property(tmp_path_factory, data, emit, keys, share):
    """Any interleaving of batches, flushes, commits (deltas, snapshots) and restores (from a
    base and its deltas): same outputs and states. The shares are tiny, so the state spills in
    every example past a few hundred groups (checked: else the example proves nothing)."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    kinds = data.draw(
        st.lists(
            st.sampled_from(["batch", "batch", "batch", "flush", "commit", "commit", "snapshot", "restore"]),
            min_size=6,
            max_size=25,
        )
    )
    steps = [
        (k, _batches(rng, 1, keys, int(rng.integers(1, 3_000)))[0] if k == "batch" else None) for k in kinds
    ]
    ops = [rf.ops.Aggregate(by=["k", "g"], aggs=AGGS, emit=emit) for _ in range(2)]
    tmp = tmp_path_factory.mktemp("spill")
    seen: dict = {}
    a, b = _run_both(ops, steps, tmp, share=share, seen=seen, streamed=data.draw(st.booleans()))
    groups = ops[0].state_to_table(a).num_rows
    if groups * 64 > share:  # the merged state outgrew half the share at some point
        assert seen.get("disk", 0) > 0 and seen.get("runs", 0) >= 1, (groups, share, seen)
    _PROPERTY_SEEN.append(seen)
    fa, fb = ops[0].finish(a), ops[1].finish(b)
    assert (fa is None) == (fb is None)
    if fa is not None:
        assert _sorted(fa, ["k", "g"]).equals(_sorted(fb, ["k", "g"]))
    ops[1].release_state(b)


_PROPERTY_SEEN: list[dict] = []


def test_the_property_examples_spilled_and_restored_from_chains():
    """Runs after the property test (file order): most examples wrote runs, and some restored
    from a base plus deltas after spilling (merges of runs are not counted here; the run-store
    tests cover them). Skips when run without the property test first."""
    if len(_PROPERTY_SEEN) < 10:
        pytest.skip("the property test did not run first")
    n = len(_PROPERTY_SEEN)
    assert sum(s.get("runs", 0) >= 1 for s in _PROPERTY_SEEN) >= n // 2
    assert sum(s.get("chain", 0) >= 2 for s in _PROPERTY_SEEN) >= 2
    assert sum(s.get("restores", 0) for s in _PROPERTY_SEEN if s.get("runs", 0)) >= 2


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


@pytest.mark.parametrize("emit", ["final", "changes"])
def test_a_restore_streams_the_base_and_deltas_through_the_bound_state(tmp_path, emit):
    """A running partition's restore (``Consumer._restore_bound``): the checkpoint's base and
    deltas read a batch at a time into a bound state equal the whole-table restore, and the
    state is never whole in memory (it spills while it restores)."""
    from rayflow._internal.checkpoint import commit as cm
    from rayflow._internal.checkpoint.store import Store

    rng = np.random.default_rng(5)
    op, ref = (rf.ops.Aggregate(by=["k", "g"], aggs=AGGS, emit=emit) for _ in range(2))
    s = ref.init_state()
    files = []
    store = Store(str(tmp_path / "ck"))
    for i, t in enumerate(_batches(rng, 6, 30_000, 8_000)):
        s, _ = ref.process(s, t)
        if i in (3, 4, 5):  # a base after 4 batches, then a delta per batch
            s, delta = ref.state_delta(s)
            table = ref.state_to_table(s) if i == 3 else delta
            files.append(store.write_parquet(f"state/{i}.parquet", cm.with_hash(table, ["k"]), fast=True))
    whole, rows = cm.read_state(store, files)
    want = ref.state_from_tables(whole)
    batches: list[int] = []

    def chain_of(f):
        for t in rn.iter_parquet(lambda: store.fs.open_input_file(store.full(f)), batch_rows=2_000):
            batches.append(t.num_rows)
            yield t

    share = rn.MIN_SHARE_BYTES
    got = op.restore_bound(
        [chain_of(f) for f in files], max_bytes=share, spill_dir=str(tmp_path / "spill"), key=["a:k"]
    )
    assert max(batches) <= 2_000 and sum(batches) == sum(rows.values())
    assert {f: rn.parquet_rows(lambda f=f: store.fs.open_input_file(store.full(f))) for f in files} == rows
    mem, disk = op.state_nbytes(got)
    assert disk > 0 and mem <= share, (mem, disk)  # spilled while restoring, never whole
    # the same state: the same snapshot, and the same outputs from here on
    assert _sorted(op.state_to_table(got), ["k", "g"]).equals(_sorted(ref.state_to_table(want), ["k", "g"]))
    for t in _batches(rng, 2, 30_000, 3_000):
        want, _ = ref.process(want, t)
        got, _ = op.process(got, t)
    if emit == "changes":
        want, out_a = ref.flush(want, version=9)
        got, out_b = op.flush(got, version=9)
        assert _sorted(out_a, ["k", "g"]).equals(_sorted(out_b, ["k", "g"]))
    else:
        assert _sorted(ref.finish(want), ["k", "g"]).equals(_sorted(op.finish(got), ["k", "g"]))
    op.release_state(got)
    # a share that holds it all: the base is the merged state, the deltas pending (no merge yet)
    big = op.restore_bound(
        [chain_of(f) for f in files], max_bytes=1 << 30, spill_dir=str(tmp_path / "big"), key=["k"]
    )
    assert big[0].num_rows == whole[0].num_rows
    assert sum(t.num_rows for t in big[1]) == sum(t.num_rows for t in whole[1:])
    assert op.state_nbytes(big)[1] == 0
