"""The watermark rules (``rayflow/_internal/watermarks.py``) and a partition task's event-time
transitions (``partition_task``), pure: no Ray."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rayflow._internal import partition_task as pt
from rayflow._internal.checkpoint.commit import CommitRecord
from rayflow._internal.queues import Entry
from rayflow._internal.watermarks import (
    WATERMARK_END,
    WATERMARK_NONE,
    EventTime,
    PartitionClock,
    batch_max_ms,
    check_event_time_column,
)
from rayflow.errors import ConfigError, InputError


def test_event_time_spec_checks_its_numbers():
    assert EventTime(column="ts", max_out_of_orderness_s=1.5).watermark(10_000) == 8_500
    assert EventTime(column="ts").watermark(WATERMARK_NONE) == WATERMARK_NONE
    with pytest.raises(ConfigError, match="max_out_of_orderness_s"):
        EventTime(column="ts", max_out_of_orderness_s=-1)
    with pytest.raises(ConfigError, match="idle_timeout_s"):
        EventTime(column="ts", idle_timeout_s=0)
    with pytest.raises(ConfigError, match="event_time"):
        EventTime(column="")


def test_event_time_column_types():
    schema = pa.schema([("ts", pa.int64()), ("t2", pa.timestamp("us", "UTC")), ("s", pa.string())])
    check_event_time_column(schema, "ts", what="x")
    check_event_time_column(schema, "t2", what="x")
    with pytest.raises(InputError, match="type string"):
        check_event_time_column(schema, "s", what="x")
    with pytest.raises(InputError, match="no such column"):
        check_event_time_column(schema, "nope", what="x")
    t = pa.table({"t2": pa.array([1_500_999, None, -5], pa.timestamp("us", "UTC"))})
    assert batch_max_ms(t, "t2") == 1_500  # floored, as windows see it
    assert batch_max_ms(pa.table({"t2": pa.array([-1], pa.timestamp("us"))}), "t2") == -1
    assert batch_max_ms(pa.table({"t2": pa.array([None], pa.int64())}), "t2") == WATERMARK_NONE


def test_partition_watermark_is_the_minimum_over_splits_skipping_idle_and_ended():
    c = PartitionClock()
    c.told(0, {"a": None, "b": None}, None)  # splits known, nothing processed yet
    assert c.target(1) == WATERMARK_NONE
    c.saw("a", 100)
    assert c.target(1) == WATERMARK_NONE  # b holds it back
    c.told(0, {"a": 100, "b": 50}, set())
    assert c.target(1) == 50
    c.told(0, {"a": 100, "b": 50}, {"b"})  # b idle, and everything of it processed
    c.applied = c.target(1)
    assert c.applied == 100
    c.saw("b", 60)  # b speaks again: it counts again, but the watermark never goes back
    assert c.target(1) == 100
    c.saw("b", 150)
    assert c.target(1) == 100  # a (100) is the minimum again
    c.told(0, {"a": 300, "b": WATERMARK_END}, set())  # b ended
    assert c.target(1) == 300


def test_watermark_waits_for_every_source_and_stands_when_all_are_idle():
    c = PartitionClock()
    c.told(0, {"a": 100}, set())
    assert c.target(2) == WATERMARK_NONE  # source 1 has not listed its splits yet
    c.told(1, {"b": 200}, set())
    assert c.target(2) == 100
    c.applied = 100
    c.told(0, {"a": 100}, {"a"})
    c.told(1, {"b": 200}, {"b"})
    assert c.target(2) == 100  # every split idle: event time stands still


def test_a_partial_reply_names_splits_but_moves_nothing():
    c = PartitionClock()
    c.told(0, {"a": 100, "b": 90}, set())
    c.told(0, {"a": None, "b": None, "c": None}, None)  # more to serve: names only
    assert c.splits == {"a": 100, "b": 90, "c": WATERMARK_NONE}
    c.told(0, {"a": 100, "b": 90, "c": None}, {"c"})
    assert c.target(1) == 90


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.integers(-1_000, 10_000),
            st.booleans(),
            st.booleans(),
        ),
        min_size=1,
        max_size=60,
    )
)
def test_the_watermark_never_goes_back_and_never_passes_a_live_split(steps):
    """Whatever the order of batches and replies: the applied watermark never decreases, and it is
    never above a split that is neither idle nor ended (a row of it at its watermark is not late)."""
    c = PartitionClock()
    c.told(0, {"a": None, "b": None, "c": None}, set())
    for split, wm, reply, idle in steps:
        if reply:
            c.told(0, dict(c.splits), {split} if idle else set())
        else:
            c.saw(split, wm)
        before = c.applied
        c.applied = c.target(1)
        assert c.applied >= before
        live = [w for s, w in c.splits.items() if s not in c.idle]
        if live and c.applied > before:
            assert c.applied <= min(live)


def _task(commit=None) -> pt.PartitionTask:
    return pt.PartitionTask.from_commit(0, 1, [None], commit, event_time=True, num_sources=1)


def test_a_task_restores_its_watermarks_from_its_commit_and_commits_them():
    rec = CommitRecord(
        partition=0,
        lease_epoch=1,
        positions={"a": 10},
        state_files=[],
        output_files=[],
        rows_in=10,
        rows_total=10,
        state_rows=0,
        final=False,
        map_version=1,
        watermarks={"partition": 500, "splits": {"a": 500}},
    )
    t = _task(rec)
    assert t.clock.applied == 500 and t.clock.splits == {"a": 500}
    assert t.clock.committed() == {"partition": 500, "splits": {"a": 500}}
    assert _task().clock.applied == WATERMARK_NONE
    t_plain = pt.PartitionTask.from_commit(0, 1, [None], rec)
    assert t_plain.clock is None and not t_plain.watermark_due


def test_watermarks_move_as_entries_are_processed_not_as_they_are_fetched():
    t = _task()
    t.fetch_applied(pt.Fetched(source=0, entries=[], watermarks={"a": None}, idle=None))
    assert t.clock.heard == {0}
    batch = pa.table({"x": [1]})
    e1 = Entry("a", 0, 5, 1, 0, None, 0, watermark=100)
    e2 = Entry("a", 5, 9, 1, 0, None, 5, watermark=200)
    t.fetch_applied(
        pt.Fetched(source=0, entries=[(e1, batch), (e2, batch)], watermarks={"a": None}, idle=None)
    )
    assert not t.watermark_due  # nothing processed: the fetched watermarks do not count yet
    t.batch_processed([e1], [], 1)
    assert t.watermark_target == 100
    t.watermark_advanced(100, [pa.table({"w": [1]})])
    assert t.phase is pt.Phase.DIRTY and t.needs_commit
    t.batch_processed([e2], [], 1)
    assert t.watermark_due and t.watermark_target == 200
    t.input_finished([])
    assert t.clock.applied == WATERMARK_END


def test_news_in_the_reply_with_a_files_last_rows_keeps_the_watermark_they_reached():
    """Regression (the watched-directory stall of tests/integration/test_review_event_time.py):
    a fetch reply carries a file's last rows and the news that it ended (its split skipped), as
    it does whenever the consumer fetches after the reader hit the file's end (timing). Applied
    in ``batch_processed`` before the consumer advanced the operators, that news skipped every
    split, and event time stood below the file's rows for ever (its windows never closed). The
    news must apply as if it had come after the rows, in a reply of its own."""
    t = _task()
    batch = pa.table({"x": [1]})
    files = [
        # (split, its watermark, the splits the reply with its rows says are skipped)
        ("00", 9_495, {"00"}),  # its rows and its end in one reply
        ("01", 19_495, {"00"}),  # its rows before its end ...
        ("02", 29_495, {"00", "01", "02"}),  # ... which comes with the next file's rows and end
    ]
    for split, wm, skipped in files:
        e = Entry(split, 0, 1_000, 1, 0, None, 0, watermark=wm)
        wms = {**t.clock.splits, split: wm}
        t.fetch_applied(
            pt.Fetched(source=0, entries=[(e, batch)], frontier={split: 1_000}, watermarks=wms, idle=skipped)
        )
        t.take(1.0, 0.0)
        t.batch_processed([e], [], 1)
        assert t.clock.idle == skipped
        assert t.watermark_due and t.watermark_target == wm, (split, t.clock)
        t.watermark_advanced(t.watermark_target, [])
    assert not t.watermark_due  # every split skipped: event time stands at the last file's watermark
    # News without rows still skips as it comes: every split idle, event time stands still.
    c = PartitionClock()
    c.told_with_rows([(0, {"a": 100}, set()), (1, {"b": 200}, set())], fresh=set(), num_sources=2)
    c.applied = c.target(2)
    c.told_with_rows([(0, {"a": 100}, {"a"}), (1, {"b": 200}, {"b"})], fresh=set(), num_sources=2)
    assert c.target(2) == 100
