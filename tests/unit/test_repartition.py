"""Re-splitting committed state into another partition count (``_internal/repartition.py``)."""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rayflow._internal import repartition as rp
from rayflow._internal.checkpoint.catalog import Catalog
from rayflow._internal.checkpoint.commit import CommitRecord, is_delta, state_chains, write_state
from rayflow._internal.checkpoint.store import Store
from rayflow.errors import IncompatibleCheckpointError, RepartitionError
from rayflow.partitioning import PartitionMap, hash_table

KEY = ["key"]


def _commit(p: int, files: list[str], rows: list[int], *, positions=None, final=False, total=10, wm=None):
    return CommitRecord(
        partition=p,
        lease_epoch=3,
        positions=dict(positions if positions is not None else {"s": 100}),
        state_files=files,
        output_files=[],
        rows_in=0,
        rows_total=total,
        state_rows=sum(rows),
        final=final,
        map_version=1,
        watermarks=wm,
    )


def _write_old(store: Store, old: PartitionMap, table: pa.Table, *, deltas: int = 1, meta=None):
    """Each old partition's chain for op 0: a base and ``deltas`` deltas of ``table``'s rows
    routed to it (rows cut into ``deltas + 1`` slices by position); returns the commits."""
    parts = old.route(hash_table(table, KEY))
    commits = {}
    for p in range(old.num_partitions):
        mine = table.filter(pa.array(parts == p))
        files, rows = [], []
        cuts = np.linspace(0, mine.num_rows, deltas + 2).astype(int)
        for n, (a, b) in enumerate(zip(cuts, cuts[1:])):
            piece = mine.slice(a, b - a)
            if meta is not None:
                piece = piece.replace_schema_metadata(meta)
            suffix = "-d" if n else ""
            f, r = write_state(store, f"state/p{p:05d}/e1-s{n}-x-op0{suffix}.parquet", piece, KEY)
            files.append(f)
            rows.append(r)
        commits[p] = _commit(p, files, rows)
    return commits


def test_parents_of_splits_and_merges():
    m16, m32, m8, m5 = (PartitionMap.uniform(n) for n in (16, 32, 8, 5))
    assert rp.parents_of(m16, m32) == [(i // 2,) for i in range(32)]
    assert rp.parents_of(m32, m8) == [tuple(range(4 * i, 4 * i + 4)) for i in range(8)]
    five = rp.parents_of(m16, m5)  # not a multiple: boundary partitions have two children
    assert sorted({p for ps in five for p in ps}) == list(range(16))
    assert all(ps == tuple(range(ps[0], ps[-1] + 1)) for ps in five)


def test_split_inherits_the_parents_commit():
    c = _commit(3, [], [], positions={"a": 7, "b": 0}, final=True, total=42, wm={"w": 1})
    got = rp.inherit(6, (3,), {3: c})
    assert (got.positions, got.rows_total, got.final, got.watermarks, got.parents) == (
        {"a": 7, "b": 0},
        42,
        True,
        {"w": 1},
        (3,),
    )
    assert rp.inherit(6, (4,), {3: c}) is None  # a parent without a commit: from scratch


def test_merge_needs_one_consistent_cut():
    a = _commit(0, [], [], positions={"s": 50, "t": 0}, total=5)
    b = _commit(1, [], [], positions={"s": 50}, total=7)
    got = rp.inherit(0, (0, 1), {0: a, 1: b})
    assert got.rows_total == 12 and got.parents == (0, 1)  # sum: upsert versions stay above both
    c = _commit(1, [], [], positions={"s": 40})
    with pytest.raises(RepartitionError, match="drain=True") as e:
        rp.inherit(0, (0, 1), {0: a, 1: c}, name="job")
    assert isinstance(e.value, IncompatibleCheckpointError)
    with pytest.raises(RepartitionError, match="no commit"):
        rp.inherit(0, (0, 1), {0: a})
    with pytest.raises(RepartitionError, match="finished"):
        rp.inherit(0, (0, 1), {0: a, 1: _commit(1, [], [], positions={"s": 50}, final=True)})


@settings(max_examples=15, deadline=None)
@given(
    keys=st.lists(st.integers(-(2**40), 2**40), min_size=0, max_size=300, unique=True),
    old_n=st.sampled_from([1, 3, 16]),
    new_n=st.sampled_from([1, 2, 5, 32]),
    deltas=st.integers(0, 2),
)
def test_every_state_row_lands_in_exactly_one_new_partition(keys, old_n, new_n, deltas):
    table = pa.table({"key": pa.array(keys, pa.int64()), "v": pa.array(range(len(keys)), pa.int64())})
    old, new = PartitionMap.uniform(old_n), PartitionMap.uniform(new_n, version=2)
    with tempfile.TemporaryDirectory() as d:
        store = Store(d)
        commits = _write_old(store, old, table, deltas=deltas)
        records, _ = rp.repartition(
            store, name="t", old=old, new=new, commits=commits, key=KEY, lease_epoch=9
        )
        assert [r.partition for r in records] == list(range(new_n))
        seen = []
        for r in records:
            assert r.positions == {"s": 100} and r.lease_epoch == 9 and r.map_version == 2
            chain = state_chains(r.state_files)[0]
            assert not is_delta(chain[0]) and all(is_delta(f) for f in chain[1:])
            lo, hi = new.range_of(r.partition)
            for f in chain:
                t = store.read_parquet(f)
                h = t.column("_hash").to_numpy()
                assert np.all(h[:-1] <= h[1:])  # still sorted by _hash
                assert np.all((h >= lo) & (h < hi) if hi < 1 << 64 else h >= lo)
                assert r.written_rows[f] == t.num_rows
                seen += t.column("key").to_pylist()
            assert r.state_rows == sum(r.written_rows.values())
        assert sorted(seen) == sorted(keys)  # each row once, none lost


def test_counters_go_to_one_child_and_add_up_in_a_merge():
    meta = {b"rayflow.dedup": json.dumps({"watermark": 5, "late_rows": 4, "within_ms": 1}).encode()}
    table = pa.table({"key": pa.array(range(200), pa.int64())})
    old = PartitionMap.uniform(4)
    with tempfile.TemporaryDirectory() as d:
        store = Store(d)
        commits = _write_old(store, old, table, deltas=0, meta=meta)
        split, _ = rp.repartition(
            store,
            name="t",
            old=old,
            new=PartitionMap.uniform(8, version=2),
            commits=commits,
            key=KEY,
            lease_epoch=1,
        )
        late = [
            json.loads(store.read_parquet(r.state_files[0]).schema.metadata[b"rayflow.dedup"])["late_rows"]
            for r in split
        ]
        assert late == [4, 0] * 4
        merged, _ = rp.repartition(
            store,
            name="t",
            old=old,
            new=PartitionMap.uniform(1, version=2),
            commits=commits,
            key=KEY,
            lease_epoch=1,
        )
        got = json.loads(store.read_parquet(merged[0].state_files[0]).schema.metadata[b"rayflow.dedup"])
        assert got == {"watermark": 5, "late_rows": 16, "within_ms": 1}
        assert merged[0].state_rows == 200


def test_merged_watermarks_must_agree():
    metas = [{b"rayflow.window.watermark": b"5"}, {b"rayflow.window.watermark": b"6"}]
    with pytest.raises(RepartitionError, match="watermarks differ"):
        rp.merged_metadata(metas, [True, True], where="new partition 0")
    assert rp.merged_metadata(
        [{b"rayflow.window.late_rows": b"2"}, {b"rayflow.window.late_rows": b"3"}], [True, False], where=""
    ) == {b"rayflow.window.late_rows": b"2"}


def test_state_without_the_key_columns_is_refused():
    with tempfile.TemporaryDirectory() as d:
        store = Store(d)
        f = store.write_parquet("state/p00000/x-op0.parquet", pa.table({"other": [1, 2]}))
        commits = {0: _commit(0, [f], [2])}
        with pytest.raises(RepartitionError, match="key column"):
            rp.repartition(
                store, name="t", old=PartitionMap.uniform(1), new=PartitionMap.uniform(2, version=2),
                commits=commits, key=KEY, lease_epoch=1,
            )  # fmt: skip


def test_a_state_file_without_hashes_is_hashed_while_moved():
    keys = list(range(100))
    with tempfile.TemporaryDirectory() as d:
        store = Store(d)
        f = store.write_parquet("state/p00000/x-op0.parquet", pa.table({"key": pa.array(keys, pa.int64())}))
        new = PartitionMap.uniform(2, version=2)
        records, _ = rp.repartition(
            store, name="t", old=PartitionMap.uniform(1), new=new, commits={0: _commit(0, [f], [100])},
            key=KEY, lease_epoch=1,
        )  # fmt: skip
        got = [store.read_parquet(r.state_files[0]).column("key").to_pylist() for r in records]
        routed = new.route(hash_table(pa.table({"key": pa.array(keys, pa.int64())}), KEY))
        assert got == [[k for k, p in zip(keys, routed) if p == c] for c in range(2)]


def test_catalog_records_a_repartition_in_one_transaction(tmp_path):
    cat = Catalog(str(tmp_path / "catalog.duckdb"))
    old = [_commit(p, [f"state/p{p:05d}/a-op0.parquet"], [1]) for p in range(4)]
    cat.record_commits("m", old)
    cat.record_leases([(p, "m", 3) for p in range(4)])
    new = [
        CommitRecord(**{**_commit(p, [f"state/p{p:05d}/r-op0.parquet"], [1]).__dict__, "map_version": 2})
        for p in range(2)
    ]
    m2 = PartitionMap.uniform(2, version=2)
    cat.record_repartition(
        new, partition_map=m2.to_json(), leases=[(0, None, 3), (1, None, 3)], event={"x": 1}
    )
    latest = cat.latest_commits()
    assert sorted(latest) == [0, 1] and all(c.map_version == 2 for c in latest.values())
    assert cat.all_state_files() == {"state/p00000/r-op0.parquet", "state/p00001/r-op0.parquet"}
    assert cat.lease_epochs() == {0: 3, 1: 3} and cat.lease_owners() == {0: None, 1: None}
    assert cat.get_meta()["partition_map"] == m2.to_json()
    assert cat.con.execute("SELECT kind FROM events").fetchall() == [("repartition",)]
    cat.close()


def test_a_repartition_that_fails_midway_leaves_the_catalog_as_it_was(tmp_path, monkeypatch):
    """All or nothing: the last statement of the transaction fails, after the commits, leases,
    map and event were written in it; none of them stays."""
    cat = Catalog(str(tmp_path / "catalog.duckdb"))
    m1 = PartitionMap.uniform(4)
    cat.set_meta({"partition_map": m1.to_json(), "key": '["key"]'})
    cat.record_commits("m", [_commit(p, [f"state/p{p:05d}/a-op0.parquet"], [1]) for p in range(4)])
    cat.record_leases([(p, "m", 3) for p in range(4)])
    snapshot = lambda: (  # noqa: E731
        cat.latest_commits(), cat.all_state_files(), cat.lease_epochs(), cat.lease_owners(), cat.get_meta()
    )  # fmt: skip
    before = snapshot()

    def fail(cur, n):
        raise OSError("disk full")

    monkeypatch.setattr(cat, "_set_applied", fail)
    new = [
        CommitRecord(**{**_commit(p, [f"state/p{p:05d}/r-op0.parquet"], [1]).__dict__, "map_version": 2})
        for p in range(2)
    ]
    m2 = PartitionMap.uniform(2, version=2)
    with pytest.raises(OSError, match="disk full"):
        cat.record_repartition(new, partition_map=m2.to_json(), leases=[(0, None, 4), (1, None, 4)], event={})
    after = snapshot()
    assert after == before and after[4]["partition_map"] == m1.to_json()
    assert cat.con.execute("SELECT count(*) FROM events").fetchone() == (0,)
    cat.close()


def test_the_remote_log_replays_a_repartition(tmp_path):
    """Under a remote checkpoint directory the map change is one log entry: a manager on another
    node (a fresh local index) rebuilds the new map's commits, leases and meta, also from a
    snapshot that folded the entry away."""
    log = str(tmp_path / "log-root")
    cat = Catalog(str(tmp_path / "a" / "catalog.duckdb"), log_root=log)
    cat.set_meta({"partition_map": PartitionMap.uniform(4).to_json(), "key": '["key"]'})
    cat.record_commits("m", [_commit(p, [f"state/p{p:05d}/a-op0.parquet"], [1]) for p in range(4)])
    cat.record_leases([(p, "m", 3) for p in range(4)])
    m2 = PartitionMap.uniform(2, version=2)
    new = [
        CommitRecord(**{**_commit(p, [f"state/p{p:05d}/r-op0.parquet"], [1]).__dict__, "map_version": 2})
        for p in range(2)
    ]
    cat.record_repartition(new, partition_map=m2.to_json(), leases=[(0, None, 3), (1, None, 3)], event={})
    cat.close()

    def check(cat):
        latest = cat.latest_commits()
        assert sorted(latest) == [0, 1] and all(c.map_version == 2 for c in latest.values())
        assert cat.all_state_files() == {"state/p00000/r-op0.parquet", "state/p00001/r-op0.parquet"}
        assert cat.lease_epochs() == {0: 3, 1: 3}
        assert cat.get_meta()["partition_map"] == m2.to_json() and cat.get_meta()["key"] == '["key"]'

    other = Catalog(str(tmp_path / "b" / "catalog.duckdb"), log_root=log)
    check(other)
    assert other.compact_log(force=True)
    other.close()
    third = Catalog(str(tmp_path / "c" / "catalog.duckdb"), log_root=log)
    check(third)
    third.close()


def _ops():
    import rayflow as rf

    return {
        "Window": rf.ops.Window(by="key", aggs=[("v", "sum")], event_time="ts", tumbling_s=1.0),
        "Top": rf.ops.Top("v", by="key", tumbling_s=1.0, event_time="ts"),
        "Dedup": rf.ops.Dedup(by="key", within_s=5.0, event_time="ts"),
    }


@pytest.mark.parametrize("kind", ["Window", "Top", "Dedup"])
@pytest.mark.parametrize("new_n", [1, 4])
def test_event_time_state_survives_a_resplit(kind, new_n):
    """Two partitions' states of an event-time operator (open windows, late rows counted), re-split
    into 4 (splits) or 1 (a merge at one watermark), restored: the same rows held, the same counts
    (late rows, duplicates dropped) in all, and the same output when every window closes."""
    from rayflow._internal.checkpoint.commit import read_state
    from rayflow.ops.base import WATERMARK_END

    op = _ops()[kind]
    rng = np.random.default_rng(3)
    n = 2_000
    table = pa.table(
        {
            "key": pa.array(rng.integers(0, 300, n), pa.int64()),
            "ts": pa.array(rng.integers(0, 10_000, n), pa.int64()),
            "v": pa.array(rng.random(n)),
        }
    )
    old = PartitionMap.uniform(2)
    route = old.route(hash_table(table, KEY))

    def run(state, t):
        state, out = op.process(state, t)
        return state, [out] if out is not None and out.num_rows else []

    states, outs = {}, []
    for p in range(2):
        mine = table.filter(pa.array(route == p))
        s, o = run(op.init_state(), mine.slice(0, 1_500 // 2))
        s, w = op.on_watermark(s, 5_000, version=1)
        outs += o + ([w] if w is not None and w.num_rows else [])
        s, o = run(s, mine.slice(1_500 // 2))  # some rows now late: counted in the state
        states[p] = s
    with tempfile.TemporaryDirectory() as d:
        store = Store(d)
        commits = {}
        for p, s in states.items():
            f, rows = write_state(store, f"state/p{p:05d}/e1-s1-x-op0.parquet", op.state_to_table(s), KEY)
            commits[p] = _commit(p, [f], [rows])
        records, _ = rp.repartition(
            store, name="t", old=old, new=PartitionMap.uniform(new_n, version=2), commits=commits, key=KEY,
            lease_epoch=1,
        )  # fmt: skip
        restored = [op.state_from_tables(read_state(store, r.state_files)[0]) for r in records]

    def held(ss):
        return _sorted_rows(
            pa.concat_tables([op.state_to_table(s).replace_schema_metadata(None) for s in ss])
        )

    def late(ss):
        return sum(op.metrics(s).get(c, 0) for s in ss for c in ("late_rows", "duplicates_dropped"))

    assert held(restored) == held(states.values()) != []
    assert late(restored) == late(states.values()) > 0

    def closed(ss):
        got = [op.on_watermark(s, WATERMARK_END, version=2)[1] for s in ss]
        got = [t.drop_columns([c for c in t.column_names if c == "_version"]) for t in got if t is not None]
        return _sorted_rows(pa.concat_tables(got)) if got else []

    assert closed(restored) == closed(states.values())
    assert closed(restored) or kind == "Dedup"  # a Dedup emits nothing when time ends


def _sorted_rows(t: pa.Table) -> list:
    return sorted(map(repr, t.to_pylist()))


def test_a_merge_takes_the_schema_of_a_parent_with_rows():
    """An old partition that never got a row checkpoints an empty state of another schema (an
    Aggregate's: the key columns alone, typed null). Merged with parents that hold rows, the new
    base takes their schema and metadata, whichever parent comes first in range order."""
    old, new = PartitionMap.uniform(2), PartitionMap.uniform(1, version=2)
    table = pa.table({"key": pa.array(range(50), pa.int64()), "v": pa.array(range(50), pa.float64())})
    routed = old.route(hash_table(table, KEY))
    with tempfile.TemporaryDirectory() as d:
        store = Store(d)
        empty = pa.table({"key": pa.array([], pa.null())}).replace_schema_metadata({b"x.late_rows": b"0"})
        f0, _ = write_state(store, "state/p00000/e1-s0-x-op0.parquet", empty, KEY)
        full = table.filter(pa.array(routed == 1)).replace_schema_metadata(
            {b"x.schema": b"s", b"x.late_rows": b"2"}
        )
        f1, n1 = write_state(store, "state/p00001/e1-s0-x-op0.parquet", full, KEY)
        commits = {0: _commit(0, [f0], [0]), 1: _commit(1, [f1], [n1])}
        records, _ = rp.repartition(
            store, name="t", old=old, new=new, commits=commits, key=KEY, lease_epoch=1
        )
        t = store.read_parquet(records[0].state_files[0])
        assert t.num_rows == n1 and t.schema.field("v").type == pa.float64()
        assert t.schema.metadata == {b"x.schema": b"s", b"x.late_rows": b"2"}


def test_a_drained_stop_is_not_claimed_when_a_source_did_not_stop():
    """``run.stop(drain=True)`` learns where reading stopped from the sources; one that did not
    stop (dead, or stuck past the timeout) says nothing of its splits, so the partitions may
    stand anywhere on them: ``drained`` is False, never a cut checked on the other splits only."""
    import types

    import ray

    from rayflow._internal.runtime import Result, Run

    class _Actor:
        def __init__(self, **replies):
            for name, reply in replies.items():
                setattr(self, name, types.SimpleNamespace(remote=lambda reply=reply: reply))

    dead = ray.exceptions.RayActorError()
    positions = {0: {"a": 10, "b": 3}, 1: {"a": 10, "b": 7}}  # split "b" (the dead source's): no cut
    run = object.__new__(Run)
    run._actors = [object()]
    run.map = PartitionMap.uniform(2)
    run.manager = _Actor(status={"done": False}, ready={"positions": positions})
    run.sources = [_Actor(stop_reading={"frontier": {"a": 10}}), _Actor(stop_reading=dead)]
    run.consumers = {"c": _Actor(stop=None)}
    run.spec = types.SimpleNamespace(name="t")

    def _get(ref, timeout=None):
        if isinstance(ref, BaseException):
            raise ref
        return ref

    run._get = _get
    run._result_from = lambda st, *, stopped, running=True: Result(output=None, stats={})
    assert run._stop(1.0, drain=True).stats["drained"] is False
    run.sources = run.sources[:1]  # both partitions at the one source's frontier: a cut
    run.map = PartitionMap.uniform(1)
    assert run._stop(1.0, drain=True).stats["drained"] is True
    # At one cut of the positions but not of event time (a partition's last watermark move not
    # committed): a merge would be refused, so the stop is not drained either.
    run.map = PartitionMap.uniform(2)
    run.manager = _Actor(
        status={"done": False},
        ready={
            "positions": {0: {"a": 10}, 1: {"a": 10}},
            "watermarks": {0: {"partition": 5, "splits": {"a": 5}}, 1: {"partition": 1, "splits": {"a": 5}}},
        },
    )
    assert run._stop(0.1, drain=True).stats["drained"] is False
    # A consumer lost after the cut (its stop fails) leaves the cut standing: the catalog holds it.
    run.manager = _Actor(status={"done": False}, ready={"positions": {0: {"a": 10}, 1: {"a": 10}}})
    run.consumers = {"c": _Actor(stop=dead)}
    assert run._stop(1.0, drain=True).stats["drained"] is True
    # Without drain, nothing is claimed either way.
    assert "drained" not in run._stop(1.0).stats
