"""Keys to hashes, hashes to partitions (DESIGN §3).

The hash of a key is ``xxh64(canonical_bytes(key), seed=0)`` as an unsigned
64-bit integer, where the canonical bytes are:

- an integer (any width, signed or unsigned, and bool, date, time, timestamp
  and duration through their integer storage): its value as 8 bytes,
  little-endian, two's complement. So ``5`` hashes the same as int8, int32 or
  uint64;
- a string: its UTF-8 bytes; a binary: its bytes as they are;
- a composite key (several columns): the concatenation of its parts, each
  prefixed by its byte length as 4 bytes little-endian.

Null keys are deterministic too. A null single-column key hashes to
:data:`NULL_HASH` (0), so every null key lands in partition 0 and nulls form one
group, as in SQL's GROUP BY. A null part of a composite key is written as the
length prefix ``0xFFFFFFFF`` with no bytes after it, which no real part can
produce, so ``(None, "a")`` and ``("", "a")`` stay distinct.

:func:`hash_key` (one key, pure Python over the ``xxhash`` package) *is* the
definition; :func:`hash_arrays` is the vectorized form used on the data path
and is tested bit-identical to it. Never Python's ``hash()``: it is salted per
process.

A partition is a range ``[lo, hi)`` of the 64-bit hash space;
:class:`PartitionMap` holds the boundaries with a version, and routes a whole
array of hashes with one ``searchsorted``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from rayflow._internal.xxh64 import hash_u64, hash_var
from rayflow.errors import ConfigError, MissingKeyColumnError, UnsupportedKeyTypeError

__all__ = [
    "NULL_HASH",
    "PartitionMap",
    "canonical_bytes",
    "compact",
    "owns_compactly",
    "hash_arrays",
    "hash_key",
    "hash_table",
    "split_by_partition",
]

NULL_HASH = 0
HASH_SPACE = 1 << 64
_NULL_PART_PREFIX = 0xFFFFFFFF

KeyScalar = int | str | bytes | None


# ----------------------------------------------------------------------------- reference


def _int_bytes(value: int) -> bytes:
    if value < 0:
        return value.to_bytes(8, "little", signed=True)
    return value.to_bytes(8, "little", signed=False)


def _part_bytes(value: KeyScalar) -> bytes:
    if isinstance(value, bool):
        return _int_bytes(int(value))
    if isinstance(value, int):
        return _int_bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise UnsupportedKeyTypeError(
        f"cannot hash a key part of Python type {type(value).__name__} ({value!r}); "
        "keys are integers, strings or bytes, or tuples of those"
    )


def canonical_bytes(key: KeyScalar | tuple[KeyScalar, ...]) -> bytes | None:
    """The canonical bytes of one key; ``None`` for a null single key (see module doc)."""
    if isinstance(key, tuple):
        out = bytearray()
        for part in key:
            if part is None:
                out += struct.pack("<I", _NULL_PART_PREFIX)
            else:
                raw = _part_bytes(part)
                out += struct.pack("<I", len(raw)) + raw
        return bytes(out)
    if key is None:
        return None
    return _part_bytes(key)


def hash_key(key: KeyScalar | tuple[KeyScalar, ...]) -> int:
    """The 64-bit hash of one key, by definition (pure Python, slow: for tests and tools)."""
    raw = canonical_bytes(key)
    return NULL_HASH if raw is None else xxhash.xxh64_intdigest(raw, seed=0)


# ----------------------------------------------------------------------------- vectorized


def _is_int_like(t: pa.DataType) -> bool:
    return (
        pa.types.is_integer(t)
        or pa.types.is_boolean(t)
        or pa.types.is_temporal(t)
        and not pa.types.is_interval(t)
    )


def _is_bytes_like(t: pa.DataType) -> bool:
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_string_view(t)
        or pa.types.is_binary_view(t)
        or pa.types.is_fixed_size_binary(t)
    )


def check_key_type(name: str, t: pa.DataType) -> None:
    """Raise :class:`UnsupportedKeyTypeError` unless column ``name`` of type ``t`` can be a key."""
    if pa.types.is_dictionary(t):
        check_key_type(name, t.value_type)
        return
    if _is_int_like(t) or _is_bytes_like(t):
        return
    hint = ""
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        hint = " Floating-point keys compare unreliably; cast the column to int64 or string first."
    raise UnsupportedKeyTypeError(
        f"key column {name!r} has type {t}, which cannot be a key: keys must be integers "
        f"(signed or unsigned, or dates/timestamps), strings or binaries.{hint}"
    )


def _to_array(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    return col


def _int_values(arr: pa.Array) -> np.ndarray:
    """The array as int64 (uint64 kept as its bit pattern), nulls as 0."""
    t = arr.type
    if pa.types.is_temporal(t):
        arr = arr.view(pa.int64()) if t.bit_width == 64 else arr.cast(pa.int32()).cast(pa.int64())
    elif pa.types.is_boolean(t):
        arr = arr.cast(pa.int64())
    elif pa.types.is_uint64(t):
        arr = arr.view(pa.int64())
    elif not pa.types.is_int64(t):
        arr = arr.cast(pa.int64())
    if arr.null_count:
        arr = pc.fill_null(arr, 0)
    return arr.to_numpy(zero_copy_only=False)


def _bytes_parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets starting at 0, data) of a string/binary array; nulls as empty."""
    t = arr.type
    if not (pa.types.is_large_string(t) or pa.types.is_large_binary(t)):
        target = pa.large_string() if "string" in str(t) or "utf8" in str(t) else pa.large_binary()
        if pa.types.is_fixed_size_binary(t):
            target = pa.large_binary()
        arr = arr.cast(target)
    _, obuf, dbuf = arr.buffers()
    offsets = np.frombuffer(obuf, dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    lo, hi = int(offsets[0]), int(offsets[-1])
    data = np.frombuffer(dbuf, dtype=np.uint8)[lo:hi] if dbuf is not None else np.empty(0, np.uint8)
    return offsets - lo, data


def _single_hash(arr: pa.Array) -> np.ndarray:
    if _is_int_like(arr.type):
        h = hash_u64(_int_values(arr))
    else:
        offsets, data = _bytes_parts(arr)
        h = hash_var(offsets, data)
    if arr.null_count:
        h[np.asarray(arr.is_null())] = NULL_HASH
    return h


def _composite_bytes(arrays: Sequence[pa.Array]) -> tuple[np.ndarray, np.ndarray]:
    """Canonical bytes of composite keys, as (offsets, data), built with whole-array scatters."""
    n = len(arrays[0])
    parts = []  # (lengths, payload, nulls, source offsets or None)
    row_len = np.zeros(n, dtype=np.int64)
    for arr in arrays:
        nulls = np.asarray(arr.is_null()) if arr.null_count else None
        src_offsets = None
        if _is_int_like(arr.type):
            lengths = np.full(n, 8, dtype=np.int64)
            payload = _int_values(arr)
        else:
            src_offsets, payload = _bytes_parts(arr)
            lengths = np.diff(src_offsets)
        if nulls is not None:
            lengths = np.where(nulls, 0, lengths)
        parts.append((lengths, payload, nulls, src_offsets))
        row_len += 4 + lengths
    out_offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(row_len, out=out_offsets[1:])
    buf = np.zeros(int(out_offsets[-1]) + 8, dtype=np.uint8)
    u32 = np.ndarray(shape=(buf.shape[0] - 3,), dtype="<u4", buffer=buf, strides=(1,))
    u64 = np.ndarray(shape=(buf.shape[0] - 7,), dtype="<u8", buffer=buf, strides=(1,))
    cursor = out_offsets[:-1].copy()
    for lengths, payload, nulls, src_offsets in parts:
        prefix = lengths.astype(np.uint32)
        if nulls is not None:
            prefix[nulls] = _NULL_PART_PREFIX
        u32[cursor] = prefix
        cursor += 4
        if src_offsets is None:  # integer part: 8 bytes each, none for a null
            rows = np.flatnonzero(~nulls) if nulls is not None else slice(None)
            u64[cursor[rows]] = payload.view(np.uint64)[rows]
        elif payload.size:
            buf[_ranges(cursor, lengths)] = payload[_ranges(src_offsets[:-1], lengths)]
        cursor += lengths
    return out_offsets, buf[:-8]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for each (s, l), vectorized."""
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    nz = lengths > 0
    s, ln = starts[nz], lengths[nz]
    step = np.ones(total, dtype=np.int64)
    ends = np.cumsum(ln)
    step[0] = s[0]
    step[ends[:-1]] = s[1:] - (s[:-1] + ln[:-1]) + 1
    return np.cumsum(step)


def hash_arrays(arrays: Sequence[pa.Array | pa.ChunkedArray]) -> np.ndarray:
    """Hash keys given as one array (single key) or several (composite key), vectorized.

    Returns a uint64 numpy array, bit-identical to :func:`hash_key` on each row.
    """
    arrs = [_to_array(a) for a in arrays]
    for i, a in enumerate(arrs):
        check_key_type(f"#{i}", a.type)
    if len(arrs) == 1:
        return _single_hash(arrs[0])
    offsets, data = _composite_bytes(arrs)
    return hash_var(offsets, data)


def key_columns(schema: pa.Schema, key: str | Sequence[str]) -> list[str]:
    """Validate ``key`` against ``schema``; return the key column names."""
    names = [key] if isinstance(key, str) else list(key)
    if not names:
        raise ConfigError("key must name at least one column, e.g. key='user_id'")
    for name in names:
        if name not in schema.names:
            raise MissingKeyColumnError(
                f"key column {name!r} is not in the input; its columns are {schema.names}. "
                "Pass key= one of those names (or a list of them for a composite key)."
            )
        check_key_type(name, schema.field(name).type)
    return names


def hash_table(table: pa.Table | pa.RecordBatch, key: str | Sequence[str]) -> np.ndarray:
    """Hash the key column(s) of a table or record batch (uint64 numpy array)."""
    names = key_columns(table.schema, key)
    return hash_arrays([table.column(n) for n in names])


# ----------------------------------------------------------------------------- partition map


@dataclass(frozen=True, kw_only=True)
class PartitionMap:
    """Partitions as contiguous ranges of the 64-bit hash space, with a version.

    ``bounds`` has ``P + 1`` strictly increasing values from 0 to 2**64;
    partition ``i`` is ``[bounds[i], bounds[i + 1])``. A changed map gets a
    higher ``version``; commits record the version they were made under.
    """

    version: int
    bounds: tuple[int, ...]
    #: The partition count the user asked for, when runtime splits made this map from that
    #: count's uniform map (None otherwise): a resume that asks for it again keeps this map.
    requested: int | None = None

    def __post_init__(self) -> None:
        b = self.bounds
        if len(b) < 2 or b[0] != 0 or b[-1] != HASH_SPACE:
            raise ConfigError(f"partition bounds must run from 0 to 2**64, got {b[:3]}...")
        if any(lo >= hi for lo, hi in zip(b, b[1:])):
            raise ConfigError("partition bounds must be strictly increasing")

    @classmethod
    def uniform(cls, partitions: int, *, version: int = 1) -> PartitionMap:
        """``partitions`` equal ranges (the initial map)."""
        if not isinstance(partitions, int) or partitions < 1:
            raise ConfigError(f"partitions must be an integer >= 1, got {partitions!r}")
        bounds = tuple(i * HASH_SPACE // partitions for i in range(partitions)) + (HASH_SPACE,)
        return cls(version=version, bounds=bounds)

    @property
    def num_partitions(self) -> int:
        return len(self.bounds) - 1

    def range_of(self, partition: int) -> tuple[int, int]:
        return self.bounds[partition], self.bounds[partition + 1]

    def route(self, hashes: np.ndarray) -> np.ndarray:
        """The partition of each hash (int32): the last range whose ``lo`` is <= the hash.

        A binary search (``searchsorted``) costs ~20 ns a row on random hashes, most
        of it branch misses. For the equal ranges of a uniform map the partition is
        ``floor(h * P / 2**64)``, computed from the top 32 bits of the hash and then
        corrected against the true bounds (at most two steps up): the same answer
        as the search, several times faster.
        """
        p_count = self.num_partitions
        hashes = np.asarray(hashes, dtype=np.uint64)
        if p_count == 1:
            return np.zeros(hashes.shape[0], dtype=np.int32)
        if self.bounds != PartitionMap.uniform(p_count).bounds or p_count >= 1 << 31:
            cuts = np.array(self.bounds[1:-1], dtype=np.uint64)
            return np.searchsorted(cuts, hashes, side="right").astype(np.int32, copy=False)
        if p_count & (p_count - 1) == 0:  # a power of two: the top bits are the partition
            return (hashes >> np.uint64(64 - p_count.bit_length() + 1)).astype(np.int32)
        p = ((hashes >> np.uint64(32)) * np.uint64(p_count)) >> np.uint64(32)
        # next_lo[i] = lo of partition i + 1; the last partition has no next one.
        next_lo = np.array(self.bounds[1:-1] + (HASH_SPACE - 1,), dtype=np.uint64)
        last = np.uint64(p_count - 1)
        for _ in range(2):
            p += (hashes >= next_lo[p]) & (p < last)
        return p.astype(np.int32)

    def to_json(self) -> str:
        d = {"version": self.version, "bounds": [str(b) for b in self.bounds]}
        if self.requested is not None:
            d["requested"] = self.requested
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> PartitionMap:
        d = json.loads(text)
        requested = d.get("requested")
        return cls(
            version=int(d["version"]),
            bounds=tuple(int(b) for b in d["bounds"]),
            requested=None if requested is None else int(requested),
        )


def split_by_partition(
    batch: pa.RecordBatch, partitions: np.ndarray, num_partitions: int
) -> list[tuple[int, pa.RecordBatch]]:
    """Cut ``batch`` into one compact sub-batch per non-empty partition, in one pass.

    Every row is copied once, straight into the buffers the sub-batches are
    made of (and that ``ray.put`` then copies into the object store), rows keep
    their input order within a partition, and no Python runs per row:

    - one stable radix argsort of the partition ids (one byte each for up to 256
      partitions), then, per column:
    - a fixed-width column without nulls (integers, floats, dates, times,
      timestamps, durations) is permuted once in numpy, and each partition's
      slice of the result is wrapped zero-copy with the column's own type;
    - any other column (strings, binaries, nulls, nested, dictionary) is taken
      once per partition over that partition's slice of the order (one copy).

    A batch whose rows all go to one partition is not copied at all when it
    owns its bytes compactly (every buffer just the size of its rows, as a
    freshly read batch does); a slice of a larger batch is compacted, as it
    would otherwise serialize (``ray.put``, pickle) its whole parent buffers.
    Every sub-batch returned owns exactly its rows' bytes.
    """
    n = batch.num_rows
    if n == 0:
        return []
    pid = np.asarray(partitions)
    if pid.dtype.itemsize > 1 and num_partitions <= 256:
        pid = pid.astype(np.uint8)  # a one-byte key: a single radix pass, a quarter the bytes
    elif pid.dtype.itemsize > 2 and num_partitions <= 65536:
        pid = pid.astype(np.uint16)
    counts = np.bincount(pid, minlength=num_partitions)
    present = np.flatnonzero(counts)
    if present.size == 1:
        return [(int(present[0]), compact(batch))]
    order = np.argsort(pid, kind="stable")
    ends = np.cumsum(counts)
    bounds = [(int(ends[p] - counts[p]), int(ends[p])) for p in present]
    indices = None
    columns: list[list[pa.Array]] = []  # per column, its sub-array for each present partition
    for col in batch.columns:
        values = _fixed_width_values(col)
        if values is not None:
            permuted = values[order]
            columns.append(
                [
                    pa.Array.from_buffers(col.type, hi - lo, [None, pa.py_buffer(permuted[lo:hi])])
                    for lo, hi in bounds
                ]
            )
        else:
            if indices is None:
                idx = pa.array(order.astype(np.int32 if n < 1 << 31 else np.int64, copy=False))
                indices = [idx.slice(lo, hi - lo) for lo, hi in bounds]
            columns.append([col.take(i) for i in indices])
    return [
        (int(p), pa.RecordBatch.from_arrays([c[k] for c in columns], schema=batch.schema))
        for k, p in enumerate(present)
    ]


def _fixed_width_values(arr: pa.Array) -> np.ndarray | None:
    """The values of a fixed-width column without nulls as unsigned integers of its width (a
    zero-copy view of its data buffer, its offset applied); None for any other column."""
    t = arr.type
    if arr.null_count or pa.types.is_boolean(t) or pa.types.is_dictionary(t) or pa.types.is_decimal(t):
        return None
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_temporal(t)):
        return None
    if pa.types.is_interval(t) or t.bit_width not in (8, 16, 32, 64):
        return None
    bufs = arr.buffers()
    if len(bufs) != 2 or bufs[1] is None:
        return None
    dtype = np.dtype(f"<u{t.bit_width // 8}")
    return np.frombuffer(bufs[1], dtype=dtype)[arr.offset : arr.offset + len(arr)]


def owns_compactly(batch: pa.RecordBatch) -> bool:
    """Whether the buffers of ``batch`` are about the size of its rows (so pickling it, as
    ``ray.put`` does, writes its own bytes, not those of a larger parent it is a slice of).

    Slack of a few bytes per column (a string column's last offset) or 1/64 of the
    batch is allowed: copying to save that much would cost more than it saves.
    """
    return batch.get_total_buffer_size() <= batch.nbytes + 64 * batch.num_columns + batch.nbytes // 64


def compact(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` itself if it owns its bytes compactly, else a compact copy (one copy)."""
    if owns_compactly(batch):
        return batch
    return pa.RecordBatch.from_arrays([pa.concat_arrays([c]) for c in batch.columns], schema=batch.schema)
