"""The per-partition phases and the commit policy, transition by transition (no Ray)."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pytest

from rayflow._internal.checkpoint.commit import CommitRecord, landed, outcome
from rayflow._internal.partition_task import (
    Fetched,
    PartitionTask,
    Phase,
    backoff_s,
    commit_due,
)
from rayflow.errors import PositionGapError, ProtocolError


@dataclass(frozen=True)
class E:
    split: str
    start: int
    end: int
    since: int | None = None
    rows: int = 1


def batch(n: int = 2) -> pa.RecordBatch:
    return pa.record_batch({"x": pa.array(range(n), pa.int64())})


def task(**kw) -> PartitionTask:
    return PartitionTask.from_commit(3, 1, [None], None) if not kw else PartitionTask(**kw)


def record(
    positions,
    *,
    final=False,
    epoch=1,
    state_files=("state/p00000/e000001-s000001-x-op0.parquet",),
    outputs=(),
) -> CommitRecord:
    return CommitRecord(
        partition=3,
        lease_epoch=epoch,
        positions=dict(positions),
        state_files=list(state_files),
        output_files=list(outputs),
        rows_in=0,
        rows_total=0,
        state_rows=0,
        final=final,
        map_version=1,
    )


def process_all(t: PartitionTask) -> None:
    taken = t.take(1.0, 0.0)
    entries = [e for e, _ in taken]
    t.check_contiguous(entries)
    t.batch_processed(entries, [], sum(b.num_rows for _, b in taken))


def test_new_task_from_nothing_is_clean():
    t = task()
    assert t.phase is Phase.CLEAN and t.positions == {} and not t.needs_commit


def test_new_task_from_a_final_commit_is_final():
    t = PartitionTask.from_commit(3, 2, [None], record({"a": 10}, final=True))
    assert t.phase is Phase.FINAL and not t.running and t.positions == {"a": 10}


def test_fetch_applied_buffers_and_positions_wait_for_processing():
    t = task()
    t.fetch_applied(Fetched(source=0, entries=[(E("a", 0, 5, 0), batch())], frontier={"a": 9}))
    assert t.positions == {} and t.phase is Phase.CLEAN and len(t.buffer) == 1
    assert not t.wants_fetch(0)  # something buffered: no new fetch for it


def test_batch_processed_moves_positions_then_frontier_clean_to_dirty():
    t = task()
    t.fetch_applied(Fetched(source=0, entries=[(E("a", 0, 5, 0), batch())], frontier={"a": 9}))
    process_all(t)
    assert t.positions == {"a": 9}  # the entry, then the frontier its fetch reported
    assert t.phase is Phase.DIRTY and t.rows_total == 2


def test_fetch_applied_with_only_a_frontier_is_progress():
    t = task()
    t.fetch_applied(Fetched(source=0, entries=[], frontier={"a": 7}))
    assert t.positions == {"a": 7} and t.phase is Phase.DIRTY


def test_full_queue_makes_dirty_backlogged():
    t = task()
    t.fetch_applied(Fetched(source=0, entries=[(E("a", 0, 5, 0), batch())], full=True))
    process_all(t)
    assert t.phase is Phase.BACKLOGGED
    assert commit_due(t, now=0.0, last_commit=0.0, interval_s=100.0, retry_at=0.0)


def test_end_of_every_source_then_input_finished_is_ended():
    t = task()
    t.fetch_applied(Fetched(source=0, entries=[], end=True))
    assert not t.input_ended(2)
    t.fetch_applied(Fetched(source=1, entries=[], end=True))
    assert t.input_ended(2)
    t.input_finished([pa.table({"x": [1]})])
    assert t.phase is Phase.ENDED and t.needs_commit
    assert commit_due(t, now=0.0, last_commit=0.0, interval_s=100.0, retry_at=0.0)


def test_fenced_drops_everything():
    t = task()
    t.fetch_applied(Fetched(source=0, entries=[(E("a", 0, 5, 0), batch())]))
    t.fetch_applied(Fetched(source=0, entries=[], fenced=True))
    assert t.phase is Phase.FENCED and not t.buffer and not t.running


def test_commit_recorded_dirty_to_clean_and_outputs_dropped():
    t = task()
    t.fetch_applied(Fetched(source=0, entries=[(E("a", 0, 5, 0), batch())]))
    process_all(t)
    t.outputs.append(pa.table({"x": [1]}))
    t.commit_recorded(record({"a": 5}))
    assert t.phase is Phase.CLEAN and t.outputs == [] and t.committed_positions == {"a": 5}


def test_commit_recorded_final_is_final():
    t = task()
    t.input_finished([])
    t.commit_recorded(record({}, final=True))
    assert t.phase is Phase.FINAL and not t.needs_commit


def test_revoked_needs_a_commit_only_with_progress():
    t = task()
    assert not t.revoked()
    t.fetch_applied(Fetched(source=0, entries=[], frontier={"a": 3}))
    assert t.revoked()


def test_gap_is_refused_with_the_split_and_positions():
    t = task()
    t.fetch_applied(Fetched(source=0, entries=[(E("a", 0, 5, 0), batch()), (E("a", 8, 9, 7), batch())]))
    entries = [e for e, _ in t.take(1.0, 0.0)]
    with pytest.raises(PositionGapError) as err:
        t.check_contiguous(entries)
    assert (err.value.split, err.value.position, err.value.start) == ("a", 5, 7)
    assert "'a'" in str(err.value) and "[5, 7)" in str(err.value)


def test_overlap_is_refused():
    t = task()
    t.positions = {"a": 5}
    with pytest.raises(ProtocolError, match="overlaps"):
        t.check_contiguous([E("a", 3, 8, 3)])


def test_batches_without_rows_for_the_partition_are_no_gap():
    t = task()  # entry [20, 30) says the source read [5, 20) and none of it was ours
    t.check_contiguous([E("a", 0, 5, 0), E("a", 20, 30, 5)])


def test_take_respects_the_time_budget_but_takes_at_least_one():
    t = task()
    t.fetch_applied(Fetched(source=0, entries=[(E("a", i, i + 1, i), batch(100)) for i in range(5)]))
    per = 1.0 / batch(100).nbytes  # one second per batch
    assert len(t.take(2.5, per)) == 2
    assert len(t.take(0.0, per)) == 1


def test_commit_due_policy():
    t = task()
    assert not commit_due(t, now=10.0, last_commit=0.0, interval_s=1.0, retry_at=0.0)  # clean
    t.fetch_applied(Fetched(source=0, entries=[], frontier={"a": 3}))
    assert not commit_due(t, now=0.5, last_commit=0.0, interval_s=1.0, retry_at=0.0)
    assert commit_due(t, now=1.0, last_commit=0.0, interval_s=1.0, retry_at=0.0)
    assert not commit_due(t, now=1.0, last_commit=0.0, interval_s=1.0, retry_at=2.0)  # backing off


def test_backoff_doubles_up_to_the_cap():
    waits = [backoff_s(n, initial_s=0.1, max_s=1.0) for n in range(1, 7)]
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_landed_identifies_the_attempt_exactly():
    a = record({"a": 5}, state_files=("state/x",), outputs=("part-1",))
    assert landed(a, a)
    assert not landed(a, None)
    assert not landed(a, record({"a": 5}, state_files=("state/y",), outputs=("part-1",)))
    assert not landed(a, record({"a": 4}, state_files=("state/x",), outputs=("part-1",)))
    assert not landed(a, record({"a": 5}, epoch=2, state_files=("state/x",), outputs=("part-1",)))


def test_outcome_deletes_only_what_no_row_can_name():
    a = record({"a": 5}, epoch=2, state_files=("state/x",), outputs=("part-1",))
    assert outcome(a, a) == "landed"
    assert outcome(a, None) == "lost"  # nothing recorded at all
    assert outcome(a, record({"a": 3}, epoch=2, state_files=("state/w",))) == "lost"  # our older one
    assert outcome(a, record({"a": 3}, epoch=1, state_files=("state/v",))) == "lost"  # before our lease
    # A newer owner committed since: ours may have landed first, and history may name its files.
    assert outcome(a, record({"a": 9}, epoch=3, state_files=("state/z",))) == "unknown"
