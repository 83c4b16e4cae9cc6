"""Spill at the source, without Ray: the placement and pause rules, the queue's bookkeeping of
entries in memory and on disk, and the spill store's files (write, read back, release)."""

from __future__ import annotations

import os
import threading

import pyarrow as pa
import pytest

from rayflow._internal.queues import Budget, Counts, Entry, PartitionQueue, blamed, must_pause, place
from rayflow._internal.spill import (
    SEGMENT_MAX_BYTES,
    SEGMENT_MIN_BYTES,
    SpillStore,
    close_files,
    segment_bytes,
    spill_owner,
)


def budget(*, rows=100, nbytes=1000, source=3000, spill=5000) -> Budget:
    return Budget(queue_max_rows=rows, queue_max_bytes=nbytes, source_max_bytes=source, spill_max_bytes=spill)


# ----------------------------------------------------------------------------- placement


def test_place_memory_while_every_bound_has_room():
    c = Counts([0, 0], [0, 0], 0)
    assert place(budget(), c, [(0, 10, 100), (1, 10, 100)]) == [False, False]
    assert c.rows == [10, 10] and c.nbytes == [100, 100] and c.memory_bytes == 200 and c.spill_bytes == 0


def test_place_spills_a_partition_at_its_bound_only():
    c = Counts([100, 0], [0, 0], 0)  # partition 0 at queue_max_rows
    assert place(budget(), c, [(0, 10, 100), (1, 10, 100)]) == [True, False]
    assert c.spill_bytes == 100 and c.rows == [100, 10]


def test_place_counts_the_batch_itself():
    c = Counts([0], [900], 0)
    # 900 + 200 crosses queue_max_bytes=1000 after the first: the second spills.
    assert place(budget(), c, [(0, 1, 200), (0, 1, 200)]) == [False, True]


def test_place_spills_every_partition_at_the_actor_memory_bound():
    c = Counts([0, 0], [500, 500], 0)
    assert place(budget(source=1000), c, [(0, 1, 10), (1, 1, 10)]) == [True, True]


def test_place_spills_a_whole_batch_once_the_disk_had_room():
    # Disk just under its budget as the batch begins: every memory-full sub-batch spills (the
    # disk may pass its budget by this batch), none lands in memory already past its bound.
    c = Counts([100, 100], [0, 0], 4999)
    assert place(budget(), c, [(0, 10, 100), (1, 10, 100)]) == [True, True]
    assert c.rows == [100, 100] and c.spill_bytes == 5199


def test_place_overshoots_memory_past_the_disk_budget():
    c = Counts([100], [0], 5000)  # partition full, disk budget used up
    assert place(budget(), c, [(0, 10, 100)]) == [False]
    assert c.rows == [110]


def test_place_never_spills_with_a_zero_disk_budget():
    c = Counts([100, 100], [0, 0], 0)
    assert place(budget(spill=0), c, [(0, 1, 1), (1, 1, 1)]) == [False, False]


# ----------------------------------------------------------------------------- pausing


def test_no_pause_while_the_disk_budget_has_room():
    assert not must_pause(budget(), Counts([100, 100], [1000, 1000], 4999))


def test_pause_at_a_full_queue_once_the_disk_budget_is_used():
    assert must_pause(budget(), Counts([100, 0], [0, 0], 5000))
    assert must_pause(budget(), Counts([0, 0], [1000, 0], 5000))


def test_pause_at_the_actor_memory_bound_once_the_disk_budget_is_used():
    assert must_pause(budget(source=1000), Counts([1, 1], [500, 500], 5000))
    assert not must_pause(budget(source=1001), Counts([1, 1], [500, 500], 5000))


def test_zero_disk_budget_is_the_rule_before_spill():
    b = budget(spill=0)
    assert not must_pause(b, Counts([99, 0], [999, 0], 0))
    assert must_pause(b, Counts([100, 0], [0, 0], 0))


def test_blamed_partitions():
    qs = [PartitionQueue(p, max_rows=10, max_bytes=10**9) for p in range(3)]
    qs[0].append(Entry("s", 0, 10, 10, 80, "ref"))
    qs[1].append(Entry("s", 0, 5, 5, 40, "h", spilled=True))
    assert blamed(qs) == [0]  # the full queue
    qs[0].drop({"s": 10})
    assert blamed(qs) == [1]  # none full: whoever holds rows (the actor's or the disk bound)


# ----------------------------------------------------------------------------- the queue


def test_queue_counts_memory_and_disk_apart_and_keeps_order():
    q = PartitionQueue(0, max_rows=20, max_bytes=10**9)
    q.append(Entry("s", 0, 10, 10, 100, "r0"))
    q.append(Entry("s", 10, 20, 10, 100, "h1", spilled=True))
    q.append(Entry("s", 20, 30, 10, 100, "r2"))
    assert (q.rows, q.nbytes, q.spilled_rows, q.spilled_bytes, q.queued_rows) == (20, 200, 10, 100, 30)
    assert q.full  # the memory bound: spilled rows do not count
    got, rest = q.after({"s": 0}, max_bytes=10**9)
    assert [e.payload for e in got] == ["r0", "h1", "r2"] and not rest
    got, rest = q.after({"s": 0}, max_bytes=150)  # fetch bytes count spilled entries alike
    assert [e.payload for e in got] == ["r0"] and rest
    dropped = q.drop({"s": 20})
    assert [e.payload for e in dropped] == ["r0", "h1"]
    assert (q.rows, q.spilled_rows, q.spilled_bytes) == (10, 0, 0) and not q.full
    assert q.trim({"s": 30}) == 10 and q.queued_rows == 0


# ----------------------------------------------------------------------------- the store


def batch(n: int, offset: int = 0) -> pa.RecordBatch:
    return pa.record_batch(
        {
            "key": pa.array(range(offset, offset + n), pa.int64()),
            "name": pa.array([f"k{i}" for i in range(offset, offset + n)]).dictionary_encode(),
        }
    )


@pytest.fixture
def store(tmp_path):
    s = SpillStore(str(tmp_path / "spill"), "job-abc-source0", partitions=2, max_bytes=10**6)
    s.open()
    yield s
    s.close()


def test_segment_bytes_and_owner():
    assert segment_bytes(10**12, 1) == SEGMENT_MAX_BYTES
    assert segment_bytes(1000, 16) == SEGMENT_MIN_BYTES
    assert segment_bytes(8 * 16 * 1_000_000, 16) == 1_000_000
    a, b = spill_owner("my job/1", "/ck/a", 3), spill_owner("my job/1", "/ck/b", 3)
    assert a != b and a.endswith("-source3") and "/" not in a and " " not in a


def test_store_round_trip_in_order_with_dictionaries(store):
    handles = [store.write(i % 2, batch(100, 100 * i)) for i in range(20)]
    got = store.read(handles)
    assert [b.column("key")[0].as_py() for b in got] == [100 * i for i in range(20)]
    assert got[3].equals(batch(100, 300))
    assert store.disk_bytes == sum(h.length for h in handles)


def test_store_files_are_unlinked_and_owned_by_descriptors(store, tmp_path):
    store.write(0, batch(10))
    assert os.listdir(tmp_path / "spill") == []  # the data lives on through the descriptor


def test_open_deletes_leftovers_of_its_owner_only(tmp_path):
    d = tmp_path / "spill"
    d.mkdir()
    (d / "job-abc-source0-p0-1-0.arrows").write_bytes(b"x")
    (d / "job-abc-source1-p0-1-0.arrows").write_bytes(b"x")
    SpillStore(str(d), "job-abc-source0", partitions=1, max_bytes=10**6).open()
    assert os.listdir(d) == ["job-abc-source1-p0-1-0.arrows"]


def test_release_frees_a_segment_once_all_its_entries_go(store):
    store.segment_bytes = 1  # a new segment for every write
    a, b = store.write(0, batch(10)), store.write(0, batch(10))
    assert a.segment is not b.segment
    c = store.write(1, batch(10))
    close_files(store.release([a]))
    assert store.disk_bytes == b.length + c.length
    assert store.read([a, b])[0] is None  # retired: gone
    close_files(store.release([b, c]))
    assert store.disk_bytes == 0


def test_a_segment_lives_until_its_last_entry_goes(store):
    a, b = store.write(0, batch(10)), store.write(0, batch(10, 10))
    assert a.segment is b.segment
    assert store.release([a]) == [] and store.disk_bytes == a.length + b.length
    assert store.read([b])[0].equals(batch(10, 10))
    close_files(store.release([b]))
    assert store.disk_bytes == 0
    d = store.write(0, batch(5))  # a fresh segment for the partition
    assert d.segment is not a.segment and store.read([d])[0].num_rows == 5


def test_a_read_in_progress_keeps_its_segment(store, monkeypatch):
    """A release while a read is in flight must not close the descriptor under it (its number
    could be reused by another file): the read's unpin retires the segment instead."""
    import rayflow._internal.spill as spill_mod

    h = store.write(0, batch(1000))
    started, go, out = threading.Event(), threading.Event(), []
    read_one = spill_mod._read_one

    def slow_read(handle):
        started.set()
        go.wait(10)
        return read_one(handle)

    monkeypatch.setattr(spill_mod, "_read_one", slow_read)
    t = threading.Thread(target=lambda: out.append(store.read([h])))
    t.start()
    assert started.wait(10)
    assert store.release([h]) == []  # pinned: not retired now
    assert h.segment.fd is not None
    go.set()
    t.join(10)
    assert out[0][0].equals(batch(1000)) and h.segment.fd is None and store.disk_bytes == 0


def test_write_failure_reserves_nothing(store, monkeypatch):
    import rayflow._internal.spill as spill_mod

    def full(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spill_mod.os, "pwrite", full)
    with pytest.raises(OSError, match="No space"):
        store.write(0, batch(10))
    assert store.disk_bytes == 0
