"""Review probe: a pending output left behind after a slow manager restart (no Ray).

Seen once in ``test_a_commit_retried_by_ray_after_a_slow_manager_restart_counts_once``:
``out/_pending/part-00001-e000001-db392bf43af83941.parquet`` (partition 1, lease epoch 1,
positions 28000 -> 36000) was left at the end of the job, named by no catalog row.

The interleaving, driven here on a bare instance of the actor's class with a fake manager:

1. The consumer owns partition 1 under epoch 1, committed at 28000. A heartbeat reply listing
   ``{1: 1}`` and that commit arrives while the loop awaits the commit call of attempt A
   (28000 -> 36000): it waits in ``_assignment`` to be applied.
2. The manager dies in that call (``manager.before_record``) and restarts slowly: the call and
   the consumer's reconcile calls time out; Ray keeps them and retries them on the restarted
   manager. The loop spins in ``_settle_first``: the stale reply stays unapplied.
3. On the restarted manager Ray's retried commit records A (and publishes it: the pending file
   moves out of ``_pending``), then a retried, timed-out reconcile renews the lease to epoch 2.
4. The consumer's own reconcile (asked under epoch 1) gets ``(None, A)``: "landed", and the
   partition is forgotten (no longer held under epoch 1).
5. ``_apply_assignment`` applies the stale reply: partition 1 is not owned, so it is *granted
   again under epoch 1* from the commit at 28000 (the stale-epoch guard only covers partitions
   still owned). The restarted manager's ``set_epochs`` has not reached the source yet, so the
   zombie reads 28000 -> 36000 again and writes A's output name into ``_pending`` again.
6. Its commit is fenced (epoch 2); reconciled, it is "landed" (same epoch, positions and output
   name as the recorded A, no state files), so nothing deletes it and nothing publishes it.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pyarrow as pa

import rayflow as rf
from rayflow._internal import partition_task as pt
from rayflow._internal.chain import Chain
from rayflow._internal.checkpoint import commit as cm
from rayflow._internal.checkpoint.store import Store
from rayflow._internal.consumer import ConsumerActor
from rayflow._internal.queues import Entry
from rayflow.sinks import PENDING_DIR

Consumer = ConsumerActor.__ray_metadata__.modified_class


def _remote(fn):
    async def call(*a, **kw):
        return fn(*a, **kw)

    return SimpleNamespace(remote=lambda *a, **kw: call(*a, **kw))


def _consumer(tmp_path):
    c = Consumer.__new__(Consumer)
    c.member_id = "consumer-0"
    c.state_store = Store(str(tmp_path / "ck"))
    c.sink_store = Store(str(tmp_path / "out"))
    c.side_stores = {}
    c.config = rf.EngineConfig(heartbeat_interval_s=0.1, call_timeout_s=2.0)
    c.chain = Chain([rf.ops.Map(lambda t: t)])
    c.key = ["key"]
    c.map_version = 1
    c.faults = None
    c.sources = []
    c.owned = {}
    c.event_time = None
    c.num_sources = 1
    c._unsettled = []
    c._compactions = {}
    c._released = {}
    c._fenced_upto = {}
    c._kept = None
    c._firsts = {}
    c._rr = 0
    c._cost_per_byte_s = 0.0
    c.rows_processed = 0
    c.state_bases = c.state_deltas = c.compactions = 0
    c.commit_failures = 0
    c._failing_since = None
    c._retry_at = 0.0
    c._last_commit = 0.0
    c.last_commit_error = None
    return c


def _entries(start: int, end: int, step: int = 2_000):
    """The source's entries of partition 1 between two positions, with their batches."""
    out = []
    for s in range(start, end, step):
        ids = pa.array(range(s + 1, s + step, 2), pa.int64())  # this partition's rows of the batch
        batch = pa.record_batch({"id": ids, "key": ids, "value": pa.array([1.0] * len(ids))})
        out.append((Entry("table", s, s + step, len(ids), batch.nbytes, None, since=s), batch))
    return out


def _process(c, t, start, end):
    t.fetch_applied(pt.Fetched(source=0, entries=_entries(start, end), frontier=None))
    c._process([t])
    assert t.positions == {"table": end}


def _pending(c) -> list[str]:
    return c.sink_store.list_files(PENDING_DIR)


def test_a_stale_assignment_after_reconcile_resurrects_a_renewed_lease_and_leaks_a_pending_file(tmp_path):
    c = _consumer(tmp_path)
    X = cm.CommitRecord(
        partition=1, lease_epoch=1, positions={"table": 28_000}, state_files=[],
        output_files=["part-00001-e000001-earlier.parquet"], rows_in=1_000, rows_total=14_000,
        state_rows=0, final=False, map_version=1,
    )  # fmt: skip
    t = pt.PartitionTask.from_commit(1, 1, c.chain.init_states(), X)
    c.owned[1] = t
    # 1. A heartbeat reply (pre-crash manager) is waiting to be applied.
    c._assignment = {"owned": {1: 1}, "revoke": [], "commits": {1: X}, "seq": 7}

    # Attempt A, 28000 -> 36000 under epoch 1; its commit call times out (the manager died).
    _process(c, t, 28_000, 36_000)
    [A] = c._write([t])
    assert A.output_files == ["part-00001-e000001-db392bf43af83941.parquet"]  # the leaked name
    c._unsettled = [A]

    # 3. The restarted manager: Ray's retried commit records A and publishes it; a retried
    # reconcile (its reply long timed out) renews the lease to epoch 2.
    catalog = {1: A}
    lease = {1: ("consumer-0", 2)}
    c.sink_store.move(cm.pending_path(A.output_files[0]), A.output_files[0])

    def reconcile(member, asked):
        return {p: (lease[p][1] if lease[p] == (member, e) else None, catalog[p]) for p, e in asked.items()}

    def commit(member, records):
        fenced = [r.partition for r in records if lease[r.partition] != (member, r.lease_epoch)]
        assert len(fenced) == len(records), "only fenced attempts in this scenario"
        return {"accepted": [], "fenced": fenced}

    c.manager = SimpleNamespace(reconcile=_remote(reconcile), commit=_remote(commit))

    async def scenario():
        # 4. The consumer's own reconcile: landed, and no longer held under epoch 1.
        assert await c._settle_first()
        assert 1 not in c.owned and not _pending(c)
        # 5. The loop applies what the heartbeat left.
        new, commits, _ = c._apply_assignment()
        if new:  # the bug: partition 1 granted again under the epoch the consumer renewed away
            c.owned.update(c._load(new, commits))
            zombie = c.owned[1]
            assert zombie.epoch == 1 and zombie.committed_positions == {"table": 28_000}
            _process(c, zombie, 28_000, 36_000)  # the source has not heard of epoch 2 yet
            # 6. Its commit: fenced, then reconciled as "landed" (it matches the recorded A).
            await c._commit_steps([zombie], count_failure=True, compact=False)
        assert not c._unsettled
        return new

    new = asyncio.run(scenario())
    assert _pending(c) == [], (
        f"{_pending(c)} is left in the pending area, named by no unpublished catalog row "
        f"(the zombie of lease epoch 1 was granted again: {new})"
    )
    assert new == {}, f"a stale heartbeat reply granted a lease the consumer renewed away: {new}"
