"""The vectorized hash is bit-identical to the definition; routing and splitting are exact."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from rayflow.errors import MissingKeyColumnError, UnsupportedKeyTypeError
from rayflow.partitioning import (
    NULL_HASH,
    PartitionMap,
    canonical_bytes,
    hash_arrays,
    hash_key,
    hash_table,
    split_by_partition,
)

SETTINGS = settings(max_examples=150, derandomize=True, deadline=None)
i64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
u64 = st.integers(min_value=0, max_value=2**64 - 1)
text = st.text(max_size=80)  # empty, non-ASCII, long enough for the 32-byte stripes
blob = st.binary(max_size=100)


def ref(values) -> list[int]:
    return [hash_key(v) for v in values]


def test_definition_matches_the_xxhash_package():
    assert hash_key(5) == xxhash.xxh64_intdigest((5).to_bytes(8, "little"))
    assert hash_key("héllo") == xxhash.xxh64_intdigest("héllo".encode())
    assert hash_key(b"") == xxhash.xxh64_intdigest(b"")
    assert canonical_bytes((1, "ab")) == b"\x08\0\0\0" + (1).to_bytes(8, "little") + b"\x02\0\0\0ab"
    assert hash_key(None) == NULL_HASH


@SETTINGS
@given(st.lists(st.one_of(i64, st.none()), max_size=300))
def test_int64_keys(values):
    assert list(hash_arrays([pa.array(values, pa.int64())])) == ref(values)


@SETTINGS
@given(st.lists(u64, max_size=200))
def test_uint64_keys(values):
    assert list(hash_arrays([pa.array(values, pa.uint64())])) == ref(values)


@pytest.mark.parametrize("t", [pa.int8(), pa.int16(), pa.int32(), pa.uint8(), pa.uint16(), pa.uint32()])
def test_narrow_integers_hash_as_their_value(t):
    info = np.iinfo(t.to_pandas_dtype())
    values = [int(info.min), 0, 1, int(info.max), None]
    assert list(hash_arrays([pa.array(values, t)])) == ref(values)


@SETTINGS
@given(
    st.lists(st.one_of(text, st.none()), max_size=200),
    st.sampled_from([pa.string(), pa.large_string(), pa.string_view()]),
)
def test_string_keys(values, t):
    assert list(hash_arrays([pa.array(values, t)])) == ref(values)


@SETTINGS
@given(st.lists(st.one_of(blob, st.none()), max_size=200), st.sampled_from([pa.binary(), pa.large_binary()]))
def test_binary_keys(values, t):
    assert list(hash_arrays([pa.array(values, t)])) == ref(values)


@SETTINGS
@given(
    st.lists(
        st.tuples(st.one_of(i64, st.none()), st.one_of(text, st.none()), st.one_of(blob, st.none())),
        max_size=150,
    )
)
def test_composite_keys(rows):
    cols = [pa.array([r[i] for r in rows], t) for i, t in enumerate([pa.int64(), pa.string(), pa.binary()])]
    assert list(hash_arrays(cols)) == ref(rows)


@SETTINGS
@given(st.lists(text, min_size=1, max_size=100), st.integers(0, 50), st.integers(0, 50))
def test_sliced_and_chunked_arrays(values, a, b):
    arr = pa.array(values)
    sliced = arr.slice(min(a, len(values)), b)
    assert list(hash_arrays([sliced])) == ref(sliced.to_pylist())
    chunked = pa.chunked_array([arr, arr.slice(1)])
    assert list(hash_arrays([chunked])) == ref(chunked.to_pylist())


def test_null_composite_part_differs_from_empty_string():
    assert hash_key((None, "a")) != hash_key(("", "a"))
    got = hash_arrays([pa.array([None, ""]), pa.array(["a", "a"])])
    assert list(got) == [hash_key((None, "a")), hash_key(("", "a"))]


def test_dictionary_and_timestamp_keys():
    d = pa.array(["x", "y", "x", None]).dictionary_encode()
    assert list(hash_arrays([d])) == ref(["x", "y", "x", None])
    ts = pa.array([0, 1_700_000_000_000, None], pa.timestamp("ms"))
    assert list(hash_arrays([ts])) == ref([0, 1_700_000_000_000, None])


@pytest.mark.parametrize(
    "t", [pa.float64(), pa.float32(), pa.list_(pa.int64()), pa.struct([("a", pa.int64())])]
)
def test_unsupported_key_types(t):
    tbl = pa.table({"k": pa.array([], t)})
    with pytest.raises(UnsupportedKeyTypeError, match="key column 'k' has type"):
        hash_table(tbl, "k")


def test_missing_key_column_names_the_columns():
    with pytest.raises(MissingKeyColumnError, match=r"'nope' is not in the input; its columns are \['a'\]"):
        hash_table(pa.table({"a": [1]}), "nope")


def test_uniform_map_and_route():
    m = PartitionMap.uniform(4)
    assert m.num_partitions == 4
    assert m.range_of(0) == (0, 2**62)
    h = np.array([0, 2**62 - 1, 2**62, 2**64 - 1], dtype=np.uint64)
    assert list(m.route(h)) == [0, 0, 1, 3]
    assert PartitionMap.from_json(m.to_json()) == m


def test_split_by_partition_is_one_exact_pass():
    rng = np.random.default_rng(7)
    keys = rng.integers(0, 1000, 50_000)
    batch = pa.record_batch({"key": keys, "i": np.arange(50_000)})
    m = PartitionMap.uniform(7)
    pid = m.route(hash_table(batch, "key"))
    parts = split_by_partition(batch, pid, 7)
    assert sum(b.num_rows for _, b in parts) == 50_000
    for p, b in parts:
        assert (m.route(hash_table(b, "key")) == p).all()
        idx = b["i"].to_numpy()
        assert (np.diff(idx) > 0).all()  # input order kept within a partition


@SETTINGS
@given(st.integers(1, 5000), st.lists(u64, min_size=1, max_size=300))
def test_uniform_route_equals_the_binary_search(partitions, hashes):
    m = PartitionMap.uniform(partitions)
    edges = [b for b in m.bounds[:-1]] + [b - 1 for b in m.bounds[1:]] + [2**64 - 1]
    h = np.array(hashes + edges, dtype=np.uint64)
    cuts = np.array(m.bounds[1:-1], dtype=np.uint64)
    assert (m.route(h) == np.searchsorted(cuts, h, side="right")).all()


def test_split_keeps_nulls_and_strings_on_the_take_path():
    batch = pa.record_batch(
        {"key": pa.array([1, 2, None, 4] * 50), "s": pa.array(["a", None, "c", "d"] * 50)}
    )
    m = PartitionMap.uniform(3)
    parts = split_by_partition(batch, m.route(hash_table(batch, "key")), 3)
    got = pa.Table.from_batches([b for _, b in parts])
    assert sorted(got.to_pylist(), key=str) == sorted(batch.to_pylist(), key=str)
