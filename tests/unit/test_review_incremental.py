"""Review probes of incremental commits (issue 15 part 2), without Ray.

The consumer's compaction bookkeeping is driven here on a bare instance of the actor's class
(``ConsumerActor.__ray_metadata__.modified_class``), with a fake manager, so each scenario is
exact and deterministic.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from types import SimpleNamespace

import duckdb
import numpy as np
import pyarrow as pa

import rayflow as rf
from rayflow._internal import partition_task as pt
from rayflow._internal.checkpoint import commit as cm
from rayflow._internal.checkpoint.store import Store
from rayflow._internal.consumer import ConsumerActor, _Compaction
from rayflow.cli import _state_sql

Consumer = ConsumerActor.__ray_metadata__.modified_class
OP = rf.ops.Aggregate(by="key", aggs=[("value", "count"), ("value", "sum")])


def _remote(fn):
    """A fake actor method: ``.remote(...)`` returns an awaitable of ``fn(...)``."""

    async def call(*a, **kw):
        return fn(*a, **kw)

    return SimpleNamespace(remote=lambda *a, **kw: call(*a, **kw))


def _state(store: Store, name: str, keys: list[int]) -> str:
    t = pa.table({"key": keys, "value_count": [1] * len(keys), "value_sum": [1.0] * len(keys)})
    return cm.write_state(store, name, t, ["key"])[0]


def _consumer(tmp_path, manager=None):
    c = Consumer.__new__(Consumer)
    c.member_id = "consumer-0"
    c.state_store = Store(str(tmp_path))
    c.sink_store = Store(str(tmp_path / "out"))
    c.side_stores = {}
    c.manager = manager
    c.config = rf.EngineConfig(state_deltas_max=2)
    c.faults = None
    c.sources = []
    c.owned = {}
    c._unsettled = []
    c._fenced_upto = {}
    c._compactions = {}
    c.compactions = 0
    c.last_commit_error = None
    return c


def _chain_and_compaction(tmp_path, c):
    """Partition 0 at epoch 1: a recorded chain (base, d1, d2), its finished compaction ``cbase``,
    and the attempt that names ``(cbase, d3)``, as ``_states_to_write`` builds it."""
    store = c.state_store
    b = _state(store, "state/p00000/e000001-s000001-aaaa-op0.parquet", [1, 2])
    d1 = _state(store, "state/p00000/e000001-s000002-bbbb-op0-d.parquet", [1])
    d2 = _state(store, "state/p00000/e000001-s000003-cccc-op0-d.parquet", [2])
    chain = cm.StateChain((b, d1, d2), (2, 1, 1))
    cbase = _state(store, "state/p00000/e000001-s000004-dddd-op0-c.parquet", [1, 2])
    d3 = _state(store, "state/p00000/e000001-s000005-eeee-op0-d.parquet", [3])
    fut: Future = Future()
    fut.set_result((cbase, 2))
    c._compactions[(0, 0)] = _Compaction(future=fut, folded=chain.files)
    task = pt.PartitionTask.from_commit(0, 1, {0: OP.init_state()}, None)
    task.chains = {0: chain}
    c.owned[0] = task
    assert c._compacted(task, 0).files == (cbase,)  # the attempt's chain, as _states_to_write takes it
    attempt = cm.CommitRecord(
        partition=0,
        lease_epoch=1,
        positions={"s": 50},
        state_files=[cbase, d3],
        output_files=[],
        rows_in=10,
        rows_total=50,
        state_rows=3,
        final=False,
        map_version=1,
        inherited=(cbase,),
    )
    return chain, cbase, d3, attempt


def test_an_unknown_outcome_never_deletes_the_compacted_base_a_landed_attempt_names(tmp_path):
    """The attempt naming a compaction's base landed, but its reply was lost; the consumer's
    lease then expired and a new owner restored from that commit and committed on top of it
    (its chain starts with the same base). The consumer reconciles: "unknown". It must delete
    only the files no row names, yet ``_forget`` -> ``_drop_compactions`` deletes the base,
    because ``_reconcile`` cleared ``_unsettled`` before it (the attempt no longer protects it)."""
    c = _consumer(tmp_path)
    chain, cbase, d3, attempt = _chain_and_compaction(tmp_path, c)
    d4 = _state(c.state_store, "state/p00000/e000002-s000001-ffff-op0-d.parquet", [4])
    newer = cm.CommitRecord(
        partition=0,
        lease_epoch=2,
        positions={"s": 80},
        state_files=[cbase, d3, d4],
        output_files=[],
        rows_in=30,
        rows_total=80,
        state_rows=4,
        final=False,
        map_version=1,
    )
    rows_name = {cbase, d3, d4, *chain.files}  # the catalog: our landed row, then the new owner's
    c.manager = SimpleNamespace(
        reconcile=_remote(lambda member, asked: {0: (None, newer)}),
        named=_remote(lambda p, files: [f for f in files if f in rows_name]),
    )
    c._unsettled = [attempt]
    assert asyncio.run(c._reconcile())
    assert 0 not in c.owned
    missing = [f for f in newer.state_files if not c.state_store.exists(f)]
    assert not missing, f"the latest commit row names deleted state files {missing}"


def test_a_fenced_attempt_that_may_have_landed_keeps_the_compacted_base(tmp_path):
    """A fenced reply (Ray retried a recorded commit on a restarted manager) "may still have
    landed" (``_commit_steps``): its files go only once reconciled. ``_settle`` forgets the
    partition, and with it deletes the compacted base the attempt names, before the attempt is
    put in ``_unsettled`` to be reconciled."""
    c = _consumer(tmp_path)
    c._fault = lambda point: None
    _, cbase, _, attempt = _chain_and_compaction(tmp_path, c)
    c._settle([attempt], accepted=set(), fenced={0})
    assert c.state_store.exists(cbase), "deleted the base a possibly recorded attempt names"


def test_a_lost_attempt_keeps_the_compaction_for_the_next_attempt(tmp_path):
    """Guard: reconciled "lost" (still ours), the base stays and the next commit names it."""
    c = _consumer(tmp_path)
    chain, cbase, d3, attempt = _chain_and_compaction(tmp_path, c)
    c.manager = SimpleNamespace(reconcile=_remote(lambda member, asked: {0: (2, None)}))
    c._unsettled = [attempt]
    assert asyncio.run(c._reconcile())
    assert c.state_store.exists(cbase) and not c.state_store.exists(d3)
    assert all(c.state_store.exists(f) for f in chain.files)
    assert c._compacted(c.owned[0], 0).files == (cbase,)


def test_the_state_view_shows_an_aggregation_added_on_resume(tmp_path):
    """Schema evolution: a resumed job adds ``("value2", "sum")``; its chain is the old base and
    delta, then a delta with the new column. ``rayflow sql``'s ``state`` view takes the merge
    spec from the chain's *first* delta (the old one), so the new column is not in the view."""
    store = Store(str(tmp_path))
    old = rf.ops.Aggregate(by="key", aggs=[("value", "count")])
    new = rf.ops.Aggregate(by="key", aggs=[("value", "count"), ("value2", "sum")])
    s, _ = old.process(old.init_state(), pa.table({"key": [1, 2], "value": [1.0, 1.0]}))
    s, _ = old.state_delta(s)
    files = [
        cm.write_state(store, "state/p00000/e000001-s000001-a-op0.parquet", old.state_to_table(s), ["key"])[0]
    ]
    s, _ = old.process(s, pa.table({"key": [1], "value": [1.0]}))
    s, d = old.state_delta(s)
    files.append(cm.write_state(store, "state/p00000/e000001-s000002-b-op0-d.parquet", d, ["key"])[0])
    s2 = new.state_from_tables([store.read_parquet(f).drop_columns(["_hash"]) for f in files])
    s2, _ = new.process(s2, pa.table({"key": [2], "value": [1.0], "value2": [5.0]}))
    s2, d = new.state_delta(s2)
    files.append(cm.write_state(store, "state/p00000/e000002-s000001-c-op0-d.parquet", d, ["key"])[0])
    con = duckdb.connect()
    rel = con.sql(_state_sql([str(tmp_path / f) for f in files]))
    assert "value2_sum" in rel.columns, rel.columns
    got = con.sql(
        f"SELECT key, value_count, value2_sum FROM ({_state_sql([str(tmp_path / f) for f in files])})"
    )
    assert sorted(got.fetchall()) == sorted(
        con.sql("SELECT 1::BIGINT, 2::BIGINT, NULL::DOUBLE UNION ALL SELECT 2, 2, 5.0").fetchall()
    )


def test_an_untaken_delta_is_folded_once_it_outgrows_64k_rows():
    """The existing bound (``<= 100_000 + 100`` over 40 batches of 100 keys) holds even with no
    folding at all (40 x 100 partial rows): here the delta's partials really outgrow 64k rows."""
    op = rf.ops.Aggregate(by="key", aggs=[("value", "sum")])
    state = op.init_state()
    rng = np.random.default_rng(3)
    for _ in range(12):
        t = pa.table({"key": rng.integers(0, 10_000, 20_000), "value": rng.random(20_000)})
        state, _ = op.process(state, t)
    assert sum(t.num_rows for t in state[4]) < 65_536 + 10_000
    assert len(state[4]) < 12


def test_the_state_view_counts_zero_for_an_added_count_in_a_chain_without_new_deltas(tmp_path):
    """After a resume adding ``("extra", "count")``, a partition that got no new rows yet still
    has only old deltas: its groups' ``extra_count`` is 0 in the state (``Aggregate._filled``),
    so the view should say 0, not NULL."""
    store = Store(str(tmp_path))
    old = rf.ops.Aggregate(by="key", aggs=[("value", "count")])
    new = rf.ops.Aggregate(by="key", aggs=[("value", "count"), ("extra", "count")])
    files = []
    for p, key in ((0, 1), (1, 2)):
        s, _ = old.process(old.init_state(), pa.table({"key": [key], "value": [1.0]}))
        s, _ = old.state_delta(s)
        base = old.state_to_table(s)
        files.append(cm.write_state(store, f"state/p{p:05d}/e000001-s000001-a-op0.parquet", base, ["key"])[0])
        s, _ = old.process(s, pa.table({"key": [key], "value": [1.0]}))
        s, d = old.state_delta(s)
        files.append(cm.write_state(store, f"state/p{p:05d}/e000001-s000002-b-op0-d.parquet", d, ["key"])[0])
    # partition 1 resumes with the new aggregation and gets a row; partition 0 gets none
    s = new.state_from_tables([store.read_parquet(f).drop_columns(["_hash"]) for f in files[2:]])
    s, _ = new.process(s, pa.table({"key": [2], "value": [1.0], "extra": pa.array([None], pa.int64())}))
    s, d = new.state_delta(s)
    files.append(cm.write_state(store, "state/p00001/e000002-s000001-c-op0-d.parquet", d, ["key"])[0])
    con = duckdb.connect()
    sql = _state_sql([str(tmp_path / f) for f in files])
    got = sorted(con.sql(f"SELECT key, value_count, extra_count FROM ({sql})").fetchall())
    assert got == [(1, 2, 0), (2, 3, 0)], got
