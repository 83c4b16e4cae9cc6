"""Continuous results without Ray (DESIGN §11): Aggregate's change tracking and flush, the chain's
flush step, and how a partition task stages flushed changes and versions them."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import rayflow as rf
from rayflow._internal.chain import Chain
from rayflow._internal.checkpoint.commit import CommitRecord
from rayflow._internal.partition_task import PartitionTask, Phase, upsert_version
from rayflow.sinks.base import UPSERT_KEY_METADATA, VERSION_COLUMN, upsert_key
from rayflow.testing import assert_same_rows, duckdb_reference

AGGS = [("v", "count"), ("v", "sum"), ("v", "mean"), ("v", "min"), ("v", "max")]
GROUP_BY = (
    "SELECT k, count(v) AS v_count, sum(v) AS v_sum, avg(v) AS v_mean, min(v) AS v_min, "
    "max(v) AS v_max FROM d GROUP BY k"
)


def data(n: int = 6_000, keys: int = 300, seed: int = 1) -> pa.Table:
    rng = np.random.default_rng(seed)
    k = pa.array(rng.integers(0, keys, n), pa.int64())
    k = pc.if_else(pa.array(rng.random(n) < 0.02), pa.nulls(n, pa.int64()), k)  # a null group too
    return pa.table({"k": k, "v": rng.integers(0, 100, n).astype(np.float64)})  # exact sums


def latest(stream: list[pa.Table]) -> pa.Table:
    return duckdb_reference(
        f"SELECT * EXCLUDE ({VERSION_COLUMN}) FROM s "
        f"QUALIFY row_number() OVER (PARTITION BY k ORDER BY {VERSION_COLUMN} DESC) = 1",
        s=pa.concat_tables(stream),
    )


def test_flush_emits_the_groups_changed_since_the_last_flush_with_cumulative_values():
    agg = rf.ops.Aggregate(by="k", aggs=AGGS, emit="changes")
    d = data()
    state, stream, version = agg.init_state(), [], 0
    for i, start in enumerate(range(0, d.num_rows, 500)):
        chunk = d.slice(start, 500)
        state, out = agg.process(state, chunk)
        assert out is None
        if i % 3 == 2:  # a commit every third batch
            version += 1
            since = d.slice(start - 1000, 1500)
            state, out = agg.flush(state, version=version)
            assert out is not None
            assert set(out.column("k").to_pylist()) == set(since.column("k").to_pylist())
            assert pc.all(pc.equal(out.column(VERSION_COLUMN), version)).as_py()
            # cumulative values: the aggregate over everything up to here, for those groups
            upto = duckdb_reference(GROUP_BY, d=d.slice(0, start + 500))
            want = duckdb_reference(
                "SELECT u.* FROM u SEMI JOIN o ON u.k IS NOT DISTINCT FROM o.k", u=upto, o=out
            )
            assert_same_rows(out.drop_columns([VERSION_COLUMN]), want)
            stream.append(out)
    state, _ = agg.process(state, d.slice(0, 10))  # a last change: k of the first rows again
    state, out = agg.flush(state, version=version + 1)
    assert set(out.column("k").to_pylist()) == set(d.slice(0, 10).column("k").to_pylist())
    stream.append(out)
    assert_same_rows(latest(stream), duckdb_reference(GROUP_BY, d=pa.concat_tables([d, d.slice(0, 10)])))
    assert agg.flush(state, version=version + 2) == (state, None)  # nothing changed since


def test_the_emitted_stream_names_its_key_and_version():
    agg = rf.ops.Aggregate(by=["k", "g"], aggs=[("v", "sum")], emit="changes")
    state, _ = agg.process(agg.init_state(), pa.table({"k": [1, 1], "g": ["a", "b"], "v": [1.0, 2.0]}))
    _, out = agg.flush(state, version=upsert_version(3, 1))
    assert out.column_names == ["k", "g", "v_sum", VERSION_COLUMN]
    assert out.schema.field(VERSION_COLUMN).type == pa.int64()
    assert json.loads(out.schema.metadata[UPSERT_KEY_METADATA]) == ["k", "g"]
    assert upsert_key(out.schema) == ["k", "g"]
    assert upsert_key(pa.schema([("k", pa.int64())])) is None  # an append stream


def test_a_snapshot_after_a_flush_carries_no_unflushed_change():
    """What a new owner restores emits exactly the groups changed after the snapshot."""
    agg = rf.ops.Aggregate(by="k", aggs=AGGS, emit="changes")
    d = data()
    state, _ = agg.process(agg.init_state(), d.slice(0, 3000))
    state, first = agg.flush(state, version=upsert_version(1, 3000))
    restored = agg.state_from_table(agg.state_to_table(state))
    assert agg.flush(restored, version=upsert_version(2, 3000)) == (restored, None)
    restored, _ = agg.process(restored, d.slice(3000, 50))  # a new owner, 50 rows on
    restored, second = agg.flush(restored, version=upsert_version(2, 3050))
    assert set(second.column("k").to_pylist()) == set(d.slice(3000, 50).column("k").to_pylist())
    assert_same_rows(latest([first, second]), duckdb_reference(GROUP_BY, d=d.slice(0, 3050)))


def test_changes_survive_the_lazy_merge_between_flushes():
    """Partials merged into the state before a flush (they outgrew it) are still reported changed."""
    agg = rf.ops.Aggregate(by="k", aggs=[("v", "count")], emit="changes")
    many = pa.table({"k": pa.array(np.arange(70_000), pa.int64()), "v": np.ones(70_000)})
    state, _ = agg.process(agg.init_state(), many)
    assert state[1] == []  # merged already (70k partial rows > the merge threshold)
    state, out = agg.flush(state, version=1)
    assert out.num_rows == 70_000


def test_final_mode_and_emit_resolution():
    agg = rf.ops.Aggregate(by="k", aggs=[("v", "sum")])
    assert not agg.emits_changes and agg.emit is None
    assert agg.for_input(unbounded=True).emits_changes
    assert not agg.for_input(unbounded=False).emits_changes
    assert agg.for_input(unbounded=True) is not agg and agg.emit is None  # resolved on a copy
    forced = rf.ops.Aggregate(by="k", aggs=[("v", "sum")], emit="changes")
    assert forced.for_input(unbounded=False).emits_changes
    final = rf.ops.Aggregate(by="k", aggs=[("v", "sum")], emit="final")
    assert not final.for_input(unbounded=False).emits_changes
    with pytest.raises(rf.errors.ConfigError, match="never emit"):
        final.for_input(unbounded=True)  # a live source never ends: final would never come
    # final mode tracks no changes (its memory would grow with the input)
    state, _ = final.process(final.init_state(), pa.table({"k": [1], "v": [1.0]}))
    assert state[3] == []
    assert "emit" not in agg.spec() and forced.spec()["emit"] == "changes"
    assert "emit" not in final.spec()  # as in checkpoints written before emit= existed
    with pytest.raises(rf.errors.ConfigError, match="emit must be one of"):
        rf.ops.Aggregate(by="k", aggs=[("v", "sum")], emit="always")
    with pytest.raises(rf.errors.ConfigError, match="version column"):
        rf.ops.Aggregate(by=["k", "_version"], aggs=[("v", "sum")])


def test_chain_flush_runs_the_changes_through_later_operators():
    def doubled(t: pa.Table) -> pa.Table:  # a Map that keeps one row per key (and its metadata)
        return t.append_column("twice", pc.multiply(t["v_sum"], 2.0))

    chain = Chain([rf.ops.Aggregate(by="k", aggs=[("v", "sum")], emit="changes"), rf.ops.Map(doubled)])
    states = chain.init_states()
    assert chain.process(states, pa.table({"k": [1, 1, 2], "v": [1.0, 2.0, 1.0]})) == []
    (out,) = chain.flush(states, version=5)
    assert sorted(out.to_pylist(), key=lambda r: r["k"]) == [
        {"k": 1, "v_sum": 3.0, VERSION_COLUMN: 5, "twice": 6.0},
        {"k": 2, "v_sum": 1.0, VERSION_COLUMN: 5, "twice": 2.0},
    ]
    assert upsert_key(out.schema) == ["k"]  # a Map that keeps the columns keeps the stream keyed
    assert chain.flush(states, version=6) == []
    chain.process(states, pa.table({"k": [2], "v": [5.0]}))
    (last,) = chain.finish(states, version=7)  # in changes mode, the end of input is a flush
    assert last.to_pylist() == [{"k": 2, "v_sum": 6.0, VERSION_COLUMN: 7, "twice": 12.0}]
    assert Chain([rf.ops.Aggregate(by="k", aggs=[("v", "sum")])]).changes_indices == []
    assert Chain([rf.ops.Aggregate(by="k", aggs=[("v", "sum")])]).for_input(
        unbounded=True
    ).changes_indices == [0]


def test_an_error_in_a_flush_names_the_operator():
    class Broken(rf.ops.Aggregate):
        def flush(self, state, *, version):
            raise ZeroDivisionError("boom")

    chain = Chain([Broken(by="k", aggs=[("v", "sum")], emit="changes")])
    with pytest.raises(ZeroDivisionError) as e:
        chain.flush(chain.init_states(), version=1, partition=4)
    assert "of partition 4" in "".join(e.value.__notes__)


# ----------------------------------------------------------------------------- partition task


def record(positions=(), *, epoch=1, rows_total=0) -> CommitRecord:
    return CommitRecord(
        partition=3,
        lease_epoch=epoch,
        positions=dict(positions),
        state_files=["state/p00003/e000001-s000001-x-op0.parquet"],
        output_files=["o"],
        rows_in=0,
        rows_total=rows_total,
        state_rows=0,
        final=False,
        map_version=1,
    )


def test_versions_increase_across_flushes_renewals_and_owners():
    t = PartitionTask.from_commit(3, 4, [None], None)
    t.rows_total = 10
    a = t.next_version()
    t.rows_total = 25  # a flush with changes follows new rows
    b = t.next_version()
    t.epoch = 5  # renewed after a commit whose outcome was unknown
    t.rows_total = 30
    c = t.next_version()
    new_owner = PartitionTask.from_commit(3, 6, [None], record({}, rows_total=30))  # a later grant
    new_owner.rows_total += 1
    d = new_owner.next_version()
    assert a < b < c < d
    assert upsert_version(4, 2**40 + 5) > upsert_version(4, 2**40 - 1)  # no cap on the rows


def test_flushed_changes_stay_staged_until_a_commit_naming_them_is_recorded():
    t = PartitionTask.from_commit(3, 1, [None], None)
    t.positions = {"s": 10}
    t.phase = Phase.DIRTY
    first, second = pa.table({"x": [1]}), pa.table({"x": [2]})
    assert t.flushes_changes
    t.changes_flushed([first])
    # the attempt failed (reconciled: not recorded): staged still; the next attempt adds its flush
    t.changes_flushed([second])
    assert t.outputs == [first, second] and t.needs_commit
    t.commit_recorded(record({"s": 10}))
    assert t.outputs == [] and t.phase is Phase.CLEAN
    t.input_finished([])
    assert not t.flushes_changes  # the end of input flushed the last changes
