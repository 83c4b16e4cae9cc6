"""Spill at the source, without Ray: the placement and pause rules, the queue's bookkeeping of
entries in memory and on disk, and the spill store's files (write, read back, release)."""

from __future__ import annotations

import asyncio
import gc
import os
import threading

import pyarrow as pa
import pytest

from rayflow._internal.queues import (
    SPILL_ENTRY_OVERHEAD,
    Budget,
    Counts,
    Entry,
    PartitionQueue,
    blamed,
    must_pause,
    place,
)
from rayflow._internal.spill import (
    SEGMENT_MAX_BYTES,
    SEGMENT_MIN_BYTES,
    SpillHandle,
    SpillStore,
    _Segment,
    close_files,
    segment_bytes,
    spill_owner,
    spillable,
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
    assert c.spill_bytes == 100 + SPILL_ENTRY_OVERHEAD and c.rows == [100, 10]


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
    assert c.rows == [100, 100] and c.spill_bytes == 5199 + 2 * SPILL_ENTRY_OVERHEAD


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


# ----------------------------------------------------------------------------- review fixes


def test_entries_and_handles_have_no_dict_and_count_toward_the_disk_budget(store):
    h = store.write(0, batch(3))
    e = Entry("s", 0, 3, 3, 30, h, spilled=True)
    for obj in (e, h, h.segment):
        assert not hasattr(obj, "__dict__")
    assert e == Entry("s", 0, 3, 3, 30, h, spilled=True) and isinstance(h, SpillHandle)
    assert isinstance(h.segment, _Segment)
    q = PartitionQueue(0, max_rows=10, max_bytes=10**9)
    for i in range(4):
        q.append(Entry("s", i, i + 1, 1, 8, f"h{i}", spilled=True))
    assert q.spilled_entries == 4
    c = Counts.of([q], spill_bytes=100)
    assert c.spill_bytes == 100 + 4 * SPILL_ENTRY_OVERHEAD
    # Tiny entries fill the budget by their count: the heap they hold is bounded too.
    full = PartitionQueue(1, max_rows=1, max_bytes=10**9)
    full.append(Entry("s", 0, 1, 1, 8, "r"))
    assert must_pause(budget(rows=1, spill=4 * SPILL_ENTRY_OVERHEAD), Counts.of([q, full], spill_bytes=0))
    q.drop({"s": 4})
    assert q.spilled_entries == 0 and Counts.of([q], 0).spill_bytes == 0


class Money(pa.ExtensionType):
    def __init__(self):
        super().__init__(pa.int64(), "rayflow.test.money")

    def __arrow_ext_serialize__(self):
        return b""

    @classmethod
    def __arrow_ext_deserialize__(cls, storage_type, serialized):
        return cls()


def test_a_schema_with_an_extension_type_is_not_spillable():
    money = pa.ExtensionArray.from_storage(Money(), pa.array([1, 2]))
    assert spillable(batch(2).schema)
    assert not spillable(pa.schema([("m", Money())]))
    assert not spillable(pa.schema([("s", pa.struct([("m", Money())]))]))
    assert not spillable(pa.schema([("l", pa.list_(Money()))]))
    assert pa.record_batch({"m": money}).schema.field("m").type == Money()


def _bare_actor(tmp_path, **budget_kw):
    """A SourceActor's spill-related state, without Ray (``ray.put`` patched by the caller)."""
    from rayflow._internal import source_actor as sa

    a = object.__new__(sa.SourceActor.__ray_metadata__.modified_class)
    a.name = "source-0"
    a.queues = [PartitionQueue(0, max_rows=1, max_bytes=10**9)]
    a.budget = budget(**budget_kw)
    a.spill = SpillStore(
        str(tmp_path / "spill"), "t-source0", partitions=1, max_bytes=a.budget.spill_max_bytes
    )
    a.spill.open()
    a.spill_error = None
    a._changed = asyncio.Condition()
    return a


def test_a_source_never_spills_a_batch_of_an_extension_type(tmp_path, monkeypatch):
    """An unregistered extension type reads back from IPC as its storage type: the source turns
    spilling off (it then pauses at its memory bounds) instead of spilling such a batch."""
    from rayflow._internal import source_actor as sa

    monkeypatch.setattr(sa.ray, "put", lambda x: x)
    a = _bare_actor(tmp_path, rows=1, spill=10**6)
    a.queues[0].append(Entry("s", 0, 1, 1, 8, "r"))  # at its memory bound: would spill
    plain = a._store([(0, 1, batch(2))])
    assert plain[0][-1] is True  # spilled
    sub = pa.record_batch({"m": pa.ExtensionArray.from_storage(Money(), pa.array([1, 2]))})
    out = a._store([(0, 3, sub)])
    assert out[0][-1] is False and out[0][2] is sub  # in memory, as it was
    assert a.budget.spill_max_bytes == 0 and "extension type" in a.spill_error
    assert a._store([(0, 5, batch(2))])[0][-1] is False  # off for good: pauses at memory bounds


def test_schema_metadata_is_kept_in_the_handle_not_on_disk(store):
    meta = {b"pandas": b"x" * 5000}
    b = batch(1).replace_schema_metadata(meta)
    h = store.write(0, b)
    assert h.length < 2000 and h.metadata == meta
    back = store.read([h])[0]
    assert (
        back.schema.metadata == meta and back.equals(b) and back.schema.equals(b.schema, check_metadata=True)
    )
    assert store.write(0, batch(1)).metadata is None


def test_a_read_that_retires_a_segment_reports_it_and_wakes_paused_readers(tmp_path, monkeypatch):
    """A segment released while a fetch's read had it pinned retires as the read ends, in the
    fetch thread: the fetch then notifies ``_changed`` on the loop (a reader paused for disk
    room would otherwise wait for the next unrelated wake-up)."""
    from concurrent.futures import ThreadPoolExecutor

    from rayflow._internal import source_actor as sa
    from rayflow._internal import spill as spill_mod

    monkeypatch.setattr(sa.ray, "put", lambda x: x)
    a = _bare_actor(tmp_path, spill=10**6)
    a._spill_pool = ThreadPoolExecutor(max_workers=1)
    h = a.spill.write(0, batch(10))
    go = threading.Event()
    read_one = spill_mod._read_one
    monkeypatch.setattr(spill_mod, "_read_one", lambda hh: (go.wait(10), read_one(hh))[1])

    async def main():
        woke = asyncio.Event()

        async def waiter():
            async with a._changed:
                await a._changed.wait()
            woke.set()

        w = asyncio.create_task(waiter())
        res = {0: sa.FetchResult(entries=[sa.FetchedEntry("s", 0, 10, 10, h, spilled=True)])}
        f = asyncio.create_task(a._load_spilled(res))
        await asyncio.sleep(0.05)
        assert a.spill.release([h]) == []  # pinned by the read: not retired yet
        go.set()
        await f
        await asyncio.wait_for(woke.wait(), 2)
        w.cancel()
        return res

    res = asyncio.run(main())
    assert a.spill.disk_bytes == 0 and res[0].entries[0].ref.num_rows == 10
    a._spill_pool.shutdown()
    h2 = a.spill.write(0, batch(1))
    close_files(a.spill.release([h2]))
    assert a.spill.read_freeing([h2]) == ([None], 0)


def test_close_closes_sealed_segments_and_defers_pinned_ones(store, monkeypatch):
    from rayflow._internal import spill as spill_mod

    spill_dir = os.path.realpath(store.root)

    def fds() -> int:
        # Only this store's descriptors: other threads of the test process (a
        # leftover pool, the GC) open and close files of their own meanwhile.
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += os.readlink(f"/proc/self/fd/{fd}").startswith(spill_dir + os.sep)
            except OSError:
                pass  # closed between the listing and the readlink
        return n

    base = fds()
    store.segment_bytes = 1  # sealed after every write
    hs = [store.write(0, batch(100)) for _ in range(4)]
    assert fds() - base == 4
    started, go, out = threading.Event(), threading.Event(), []
    read_one = spill_mod._read_one

    def slow(h):
        started.set()
        go.wait(10)
        return read_one(h)

    monkeypatch.setattr(spill_mod, "_read_one", slow)
    t = threading.Thread(target=lambda: out.append(store.read([hs[0]])))
    t.start()
    assert started.wait(10)
    store.close()
    assert fds() - base == 1 and hs[0].segment.fd is not None  # the pinned one waits for its read
    go.set()
    t.join(10)
    assert out[0][0].num_rows == 100 and hs[0].segment.fd is None
    out.clear()  # the batch's memory map holds a descriptor of its own
    gc.collect()
    assert fds() == base and store.disk_bytes == 0
    monkeypatch.setattr(spill_mod, "_read_one", read_one)
    assert store.read(hs) == [None] * 4
    assert store.release(hs) == []  # released after close: nothing left to do
