"""Incremental commits (DESIGN §5), without Ray: deltas fold back into the state exactly, a
commit names a base and its deltas, a lost attempt never deletes what the chain inherited,
compaction folds a chain into an equal base, and retirement keeps files still named."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from hypothesis import given, settings
from hypothesis import strategies as st

import rayflow as rf
from rayflow._internal.checkpoint import commit as cm
from rayflow._internal.checkpoint.catalog import Catalog
from rayflow._internal.checkpoint.store import Store
from rayflow.cli import _state_sql

AGGS = [("value", "count"), ("value", "sum"), ("value", "min"), ("value", "max"), ("value", "mean")]


def batch(rng: np.random.Generator, rows: int, keys: int) -> pa.Table:
    return pa.table({"key": rng.integers(0, keys, rows), "value": rng.integers(-50, 50, rows).astype(float)})


def canon(t: pa.Table) -> list[dict]:
    return t.sort_by("key").to_pylist()


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    batches=st.integers(1, 12),
    cuts=st.lists(st.integers(0, 12), max_size=6),
    keys=st.sampled_from([3, 50, 2000]),
)
def test_base_plus_deltas_is_the_state(seed, batches, cuts, keys):
    """Whatever batches fall between two commits, the snapshot at the first commit folded with
    every delta after it equals the state now (and a state restored from it goes on equally)."""
    rng = np.random.default_rng(seed)
    op = rf.ops.Aggregate(by="key", aggs=AGGS)
    state, base, deltas = op.init_state(), None, []
    for i in range(batches):
        state, _ = op.process(state, batch(rng, int(rng.integers(1, 300)), keys))
        if i in cuts:  # a commit: the first writes a base, later ones a delta
            state, delta = op.state_delta(state)
            if base is None:
                base = op.state_to_table(state)
            elif delta.num_rows:
                deltas.append(delta)
    whole = op.state_to_table(state)
    if base is None:
        return
    state, delta = op.state_delta(state)
    folded = op.merge_states([base, *deltas, delta])
    assert canon(op.finish(op.state_from_table(folded))) == canon(op.finish(op.state_from_table(whole)))
    # restored lazily (the deltas kept as pending partials), it goes on as the folded state does
    more = batch(rng, 200, keys)
    lazy, _ = op.process(op.state_from_tables([base, *deltas, delta]), more)
    eager, _ = op.process(op.state_from_table(whole), more)
    assert canon(op.finish(lazy)) == canon(op.finish(eager))


def test_a_delta_holds_only_the_groups_touched_since_the_last_commit():
    op = rf.ops.Aggregate(by="key", aggs=[("value", "count")])
    state, _ = op.process(op.init_state(), pa.table({"key": [1, 2, 3], "value": [1.0, 1.0, 1.0]}))
    state, first = op.state_delta(state)
    assert sorted(first["key"].to_pylist()) == [1, 2, 3]
    state, _ = op.process(state, pa.table({"key": [2, 2], "value": [5.0, 6.0]}))
    state, second = op.state_delta(state)
    assert second.to_pylist() == [{"key": 2, "value_count": 2}]
    state, third = op.state_delta(state)
    assert third.num_rows == 0


def write_chain(store: Store, op, tables: list[pa.Table]) -> cm.StateChain:
    chain = cm.StateChain()
    for n, t in enumerate(tables):
        suffix = "" if n == 0 else "-d"
        f, rows = cm.write_state(store, f"state/p00000/e000001-s{n:06d}-x-op0{suffix}.parquet", t, ["key"])
        chain = chain.then(f, rows)
    return chain


def test_commit_names_chain_and_delta_and_a_lost_attempt_keeps_the_chain(tmp_path):
    store = Store(str(tmp_path))
    op = rf.ops.Aggregate(by="key", aggs=[("value", "count")])
    state, _ = op.process(op.init_state(), pa.table({"key": [1, 2], "value": [1.0, 1.0]}))
    state, _ = op.state_delta(state)
    chain = write_chain(store, op, [op.state_to_table(state)])
    state, _ = op.process(state, pa.table({"key": [2, 9], "value": [1.0, 1.0]}))
    state, delta = op.state_delta(state)
    rec = cm.write_commit(
        partition=0,
        epoch=1,
        seq=2,
        state_tables={},
        state_deltas={0: (chain, delta)},
        outputs=[],
        committed_positions={},
        positions={"s": 4},
        rows_total=4,
        rows_committed=2,
        final=False,
        map_version=1,
        key=["key"],
        state_store=store,
        sink_store=Store(str(tmp_path / "out")),
    )
    assert rec.state_files[0] == chain.files[0] and cm.is_delta(rec.state_files[1])
    assert rec.inherited == chain.files and rec.state_rows == 2 + 2
    assert cm.state_chains(rec.state_files) == {0: list(rec.state_files)}
    tables, rows = cm.read_state(store, rec.state_files)
    table = op.state_to_table(op.state_from_tables(tables))  # restored lazily, then folded
    assert sorted(table.to_pylist(), key=lambda r: r["key"]) == [
        {"key": 1, "value_count": 1},
        {"key": 2, "value_count": 2},
        {"key": 9, "value_count": 1},
    ]
    assert list(rows.values()) == [2, 2]
    cm.discard(rec, state_store=store, sink_store=Store(str(tmp_path / "out")))  # reconciled as lost
    assert store.exists(chain.files[0]) and not store.exists(rec.state_files[1])


def test_compaction_folds_a_chain_into_an_equal_sorted_base(tmp_path):
    store = Store(str(tmp_path))
    op = rf.ops.Aggregate(by="key", aggs=AGGS)
    rng = np.random.default_rng(5)
    state = op.init_state()
    tables = []
    for _ in range(4):
        state, _ = op.process(state, batch(rng, 500, 300))
        state, delta = op.state_delta(state)
        tables.append(delta)
    chain = write_chain(store, op, tables)
    assert chain.deltas == 3
    base, rows = cm.compact(
        store, partition=0, op_index=0, tag="e000001-s000009-y", chain=chain, op=op, key=["key"]
    )
    assert base.endswith("-op0-c.parquet") and not cm.is_delta(base) and cm.state_file_op(base) == 0
    t = store.read_parquet(base)
    assert rows == t.num_rows == len(set(pc.unique(t["key"]).to_pylist()))
    h = t["_hash"].to_numpy()
    assert (np.diff(h.astype(np.float64)) >= 0).all()  # sorted by _hash
    assert canon(op.finish(op.state_from_table(t.drop_columns(["_hash"])))) == canon(op.finish(state))
    # a later commit names the base in place of what it folded, keeping the deltas after them
    longer = chain.then("state/p00000/e000001-s000010-z-op0-d.parquet", 7)
    assert longer.rebased(base, rows, chain.files).files == (base, longer.files[-1])
    assert cm.StateChain(chain.files[1:], chain.rows[1:]).rebased(base, rows, chain.files) is None


def test_the_state_view_folds_deltas(tmp_path):
    """``rayflow sql``'s ``state`` view shows one row per group over a base and its deltas."""
    import duckdb

    store = Store(str(tmp_path))
    op = rf.ops.Aggregate(by="key", aggs=[("value", "count"), ("value", "max")])
    state = op.init_state()
    tables = []
    for vals in ([1.0, 2.0, 3.0], [7.0, 1.0, 0.0]):
        state, _ = op.process(state, pa.table({"key": [1, 2, 2], "value": vals}))
        state, delta = op.state_delta(state)
        tables.append(delta)
    chain = write_chain(store, op, tables)
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT key, value_count, value_max FROM ({_state_sql([str(tmp_path / f) for f in chain.files])}) ORDER BY key"
    ).fetchall()
    assert rows == [(1, 2, 7.0), (2, 4, 3.0)]


def test_retirement_keeps_files_a_kept_commit_still_names(tmp_path):
    cat = Catalog(str(tmp_path / "catalog.duckdb"))
    base = "state/p00000/e000001-s000001-a-op0.parquet"
    files = [base]
    for n in range(2, 7):
        files = files + [f"state/p00000/e000001-s{n:06d}-a-op0-d.parquet"]
        cat.record_commits(
            "m",
            [
                cm.CommitRecord(
                    partition=0,
                    lease_epoch=1,
                    positions={"s": n},
                    state_files=list(files),
                    output_files=[],
                    rows_in=1,
                    rows_total=n,
                    state_rows=n,
                    final=False,
                    map_version=1,
                )
            ],
        )
    gone = cat.retire_state_files(keep=2)
    assert gone == []  # every file of the retired rows is in the kept chains
    cat.record_commits(
        "m",
        [
            cm.CommitRecord(
                partition=0,
                lease_epoch=1,
                positions={"s": 9},
                state_files=["state/p00000/e000001-s000009-b-op0-c.parquet"],
                output_files=[],
                rows_in=1,
                rows_total=9,
                state_rows=9,
                final=False,
                map_version=1,
            )
        ],
    )
    gone = cat.retire_state_files(keep=1)
    assert sorted(gone) == sorted(files) and base in gone
    cat.close()
