"""split_by_partition: exact sub-batches, each owning its rows' bytes compactly, copied once."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pytest

from rayflow.partitioning import compact, owns_compactly, split_by_partition


def reference(batch: pa.RecordBatch, pids: np.ndarray) -> list[tuple[int, pa.RecordBatch]]:
    """The obvious split: a boolean filter per partition, in partition order."""
    return [(int(p), batch.filter(pa.array(pids == p))) for p in sorted(set(pids.tolist()))]


def pickled_oob_bytes(obj) -> int:
    """Bytes pickle protocol 5 writes out of band (what ray.put copies into the object store)."""
    bufs: list = []
    pickle.dumps(obj, protocol=5, buffer_callback=bufs.append)
    return sum(memoryview(b).nbytes for b in bufs)


def mixed_batch(n: int, seed: int = 0) -> pa.RecordBatch:
    rng = np.random.default_rng(seed)
    nulls = rng.random(n) < 0.2
    return pa.record_batch(
        {
            "i64": pa.array(rng.integers(-(1 << 62), 1 << 62, n)),
            "f64": pa.array(rng.random(n)),
            "i8": pa.array(rng.integers(-100, 100, n).astype(np.int8)),
            "u32": pa.array(rng.integers(0, 1 << 31, n).astype(np.uint32)),
            "ts": pa.array(rng.integers(0, 1 << 40, n), pa.timestamp("ms", tz="UTC")),
            "d32": pa.array(rng.integers(0, 20000, n).astype(np.int32), pa.date32()),
            "nullable_i64": pa.array(rng.integers(0, 100, n), mask=nulls),
            "s": pa.array([f"k{x}" * int(x % 4) for x in rng.integers(0, 1000, n)]),
            "nullable_s": pa.array([None if m else f"v{i}" for i, m in enumerate(nulls)]),
            "large_s": pa.array([f"x{i}" for i in range(n)], pa.large_string()),
            "b": pa.array(rng.random(n) < 0.5),
            "bin": pa.array([bytes([i % 256]) * (i % 3) for i in range(n)], pa.binary()),
            "dict": pa.array([f"d{i % 5}" for i in range(n)]).dictionary_encode(),
            "lst": pa.array([[i, i + 1] if i % 7 else None for i in range(n)]),
        }
    )


@pytest.mark.parametrize("num_partitions", [1, 3, 16, 300, 70_000])
def test_split_equals_the_reference(num_partitions):
    batch = mixed_batch(5_000)
    pids = np.random.default_rng(1).integers(0, num_partitions, batch.num_rows).astype(np.int32)
    got = split_by_partition(batch, pids, num_partitions)
    want = reference(batch, pids)
    assert [p for p, _ in got] == [p for p, _ in want]
    for (_, g), (_, w) in zip(got, want):
        assert g.schema == batch.schema
        assert g.equals(w)


@pytest.mark.parametrize(
    "column",
    [
        pa.array(np.arange(1000, dtype=np.int64)),
        pa.array(np.arange(1000, dtype=np.float32)),
        pa.array(np.arange(1000) % 7, pa.int16()),
        pa.array(np.arange(1000), pa.timestamp("us", tz="Europe/Paris")),
        pa.array(np.arange(1000), pa.duration("ns")),
        pa.array([None if i % 3 == 0 else i for i in range(1000)], pa.int64()),
        pa.array([None if i % 3 == 0 else str(i) for i in range(1000)]),
        pa.array([str(i) * (i % 5) for i in range(1000)], pa.large_binary()),
    ],
    ids=[
        "int64",
        "float32",
        "int16",
        "timestamp_tz",
        "duration",
        "nullable_int",
        "nullable_str",
        "large_bin",
    ],
)
def test_each_column_kind(column):
    batch = pa.record_batch({"c": column})
    pids = (np.arange(1000) * 7919 % 5).astype(np.int32)
    got = split_by_partition(batch, pids, 5)
    want = reference(batch, pids)
    assert [p for p, _ in got] == [p for p, _ in want]
    for (_, g), (_, w) in zip(got, want):
        assert g.column(0).type == column.type
        assert g.equals(w)


def test_sub_batches_own_their_bytes_compactly():
    batch = mixed_batch(20_000)
    pids = np.random.default_rng(2).integers(0, 16, batch.num_rows).astype(np.int32)
    parts = split_by_partition(batch, pids, 16)
    for _, sub in parts:
        assert owns_compactly(sub)
        # What a put serializes is about the sub-batch's own size, not its parent's.
        assert pickled_oob_bytes(sub) <= sub.nbytes + 64 * sub.num_columns + sub.nbytes // 32
    total = sum(pickled_oob_bytes(sub) for _, sub in parts)
    assert total <= 1.1 * pickled_oob_bytes(batch)


def test_rows_are_copied_once_into_buffers_the_sub_batches_own():
    """Numeric columns: the sub-batches of one split are views of one permuted buffer per
    column (one copy), none of them of the input's memory."""
    n = 100_000
    batch = pa.record_batch({"k": pa.array(np.arange(n)), "v": pa.array(np.random.default_rng(3).random(n))})
    pids = (np.arange(n) % 4).astype(np.int32)
    parts = split_by_partition(batch, pids, 4)
    src = [(c.buffers()[1].address, c.buffers()[1].address + c.buffers()[1].size) for c in batch.columns]
    for _, sub in parts:
        for j, col in enumerate(sub.columns):
            buf = col.buffers()[1]
            assert buf.size == col.type.bit_width // 8 * sub.num_rows  # exactly its rows
            assert not (src[j][0] <= buf.address < src[j][1])  # not the input's memory


def test_a_single_partition_batch_is_not_copied():
    batch = mixed_batch(1_000)
    parts = split_by_partition(batch, np.full(batch.num_rows, 7, np.int32), 16)
    assert len(parts) == 1 and parts[0][0] == 7
    assert parts[0][1] is batch  # the batch itself: ray.put makes the one copy


def test_a_single_partition_slice_is_compacted():
    big = mixed_batch(10_000)
    batch = big.slice(100, 50)
    assert not owns_compactly(batch)
    assert pickled_oob_bytes(batch) > 20 * batch.nbytes  # why: a slice pickles its parent's buffers
    [(p, sub)] = split_by_partition(batch, np.zeros(50, np.int32), 1)
    assert p == 0 and sub.equals(batch)
    assert owns_compactly(sub)
    assert pickled_oob_bytes(sub) <= 2 * batch.nbytes


def test_sliced_input_splits_exactly():
    big = mixed_batch(3_000)
    batch = big.slice(1234, 1000)
    pids = np.random.default_rng(4).integers(0, 8, batch.num_rows).astype(np.int32)
    got = split_by_partition(batch, pids, 8)
    want = reference(batch, pids)
    assert [p for p, _ in got] == [p for p, _ in want]
    assert all(g.equals(w) and owns_compactly(g) for (_, g), (_, w) in zip(got, want))


def test_empty_batch_and_compact_passthrough():
    batch = mixed_batch(10)
    assert split_by_partition(batch.slice(0, 0), np.zeros(0, np.int32), 4) == []
    assert compact(batch) is batch
