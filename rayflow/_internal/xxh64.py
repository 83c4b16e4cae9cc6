"""Vectorized XXH64 (seed 0) over numpy arrays.

This is a transcription of the reference algorithm (xxhash.h, ``XXH64``) into
whole-array numpy operations, so that hashing a column of N keys costs a few
dozen array passes instead of N Python calls. ``tests/unit/test_partitioning.py``
holds it bit-identical to ``xxhash.xxh64_intdigest`` with Hypothesis.

Two entry points:

- :func:`hash_u64` hashes fixed 8-byte inputs (the canonical bytes of an
  integer key), the hot path of the standard workload.
- :func:`hash_var` hashes variable-length byte strings given as an Arrow-style
  ``(offsets, data)`` pair: strings, binaries and composite keys.

numpy's uint64 array arithmetic wraps modulo 2**64, which is exactly what the
algorithm needs. Work is done in cache-sized chunks with in-place ops: on
arrays of millions of rows this is several times faster than whole-array
temporaries, because every pass then stays in L2.
"""

from __future__ import annotations

import numpy as np

_U = np.uint64
P1 = _U(0x9E3779B185EBCA87)
P2 = _U(0xC2B2AE3D27D4EB4F)
P3 = _U(0x165667B19E3779F9)
P4 = _U(0x85EBCA77C2B2AE63)
P5 = _U(0x27D4EB2F165667C5)
# Initial accumulators for seed 0, computed in Python ints to avoid overflow warnings.
_V1 = _U((int(P1) + int(P2)) % 2**64)
_V4 = _U((-int(P1)) % 2**64)
_CHUNK = 1 << 15  # rows per chunk: 8 temporaries x 256 KiB stays in L2


def _rotl(x: np.ndarray, r: int, tmp: np.ndarray) -> None:
    """x = rotl(x, r) in place, using tmp as scratch."""
    np.right_shift(x, _U(64 - r), out=tmp)
    np.left_shift(x, _U(r), out=x)
    np.bitwise_or(x, tmp, out=x)


def _avalanche(h: np.ndarray, tmp: np.ndarray) -> None:
    np.right_shift(h, _U(33), out=tmp)
    h ^= tmp
    h *= P2
    np.right_shift(h, _U(29), out=tmp)
    h ^= tmp
    h *= P3
    np.right_shift(h, _U(32), out=tmp)
    h ^= tmp


def _round(acc: np.ndarray, lane: np.ndarray, tmp: np.ndarray) -> None:
    """acc = rotl(acc + lane * P2, 31) * P1, in place."""
    np.multiply(lane, P2, out=tmp)
    acc += tmp
    _rotl(acc, 31, tmp)
    acc *= P1


def _mix_lane8(h: np.ndarray, lane: np.ndarray, tmp: np.ndarray, k: np.ndarray) -> None:
    """Fold one 8-byte lane into h (the ``len & 31`` tail step for 8 bytes)."""
    np.multiply(lane, P2, out=k)
    _rotl(k, 31, tmp)
    k *= P1
    h ^= k
    _rotl(h, 27, tmp)
    h *= P1
    h += P4


def hash_u64(values: np.ndarray) -> np.ndarray:
    """XXH64 of each value's 8 little-endian bytes; ``values`` is any 64-bit int array."""
    lanes = np.ascontiguousarray(values).view(np.uint64)
    n = lanes.shape[0]
    out = np.empty(n, dtype=np.uint64)
    cap = min(n, _CHUNK)
    tmp = np.empty(cap, dtype=np.uint64)
    k = np.empty(cap, dtype=np.uint64)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        m = stop - start
        h = out[start:stop]
        t, kk = tmp[:m], k[:m]
        h.fill(P5 + _U(8))
        _mix_lane8(h, lanes[start:stop], t, kk)
        _avalanche(h, t)
    return out


def _unaligned(buf: np.ndarray, dtype: str) -> np.ndarray:
    """A view of ``buf`` (uint8) where element i is the ``dtype`` read at byte i."""
    width = np.dtype(dtype).itemsize
    return np.ndarray(shape=(buf.shape[0] - width + 1,), dtype=dtype, buffer=buf, strides=(1,))


def hash_var(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    """XXH64 of each byte string ``data[offsets[i]:offsets[i+1]]``.

    ``data`` is a uint8 array; it is copied once with 8 bytes of zero padding so
    that unaligned 8-byte reads near its end stay in bounds.
    """
    offsets = offsets.astype(np.int64, copy=False)
    n = offsets.shape[0] - 1
    if n <= 0:
        return np.empty(0, dtype=np.uint64)
    buf = np.zeros(data.shape[0] + 8, dtype=np.uint8)
    buf[: data.shape[0]] = data
    u64 = _unaligned(buf, "<u8")
    u32 = _unaligned(buf, "<u4")
    starts = offsets[:-1]
    lengths = offsets[1:] - starts
    h = np.empty(n, dtype=np.uint64)

    long_rows = np.flatnonzero(lengths >= 32)
    short_rows = np.flatnonzero(lengths < 32)
    h[short_rows] = P5 + lengths[short_rows].astype(np.uint64)
    if long_rows.size:
        h[long_rows] = _hash_stripes(u64, starts[long_rows], lengths[long_rows])

    # Tail: what is left after the 32-byte stripes, consumed as 8-byte lanes,
    # then one 4-byte lane, then single bytes (XXH64_finalize).
    pos = starts + (lengths & ~np.int64(31))
    rem = lengths & np.int64(31)
    for _ in range(3):
        rows = np.flatnonzero(rem >= 8)
        if rows.size == 0:
            break
        hr = h[rows]
        tmp = np.empty_like(hr)
        k = np.empty_like(hr)
        _mix_lane8(hr, u64[pos[rows]], tmp, k)
        h[rows] = hr
        pos[rows] += 8
        rem[rows] -= 8
    rows = np.flatnonzero(rem >= 4)
    if rows.size:
        hr = h[rows]
        tmp = np.empty_like(hr)
        hr ^= u32[pos[rows]].astype(np.uint64) * P1
        _rotl(hr, 23, tmp)
        hr *= P2
        hr += P3
        h[rows] = hr
        pos[rows] += 4
        rem[rows] -= 4
    for _ in range(3):
        rows = np.flatnonzero(rem >= 1)
        if rows.size == 0:
            break
        hr = h[rows]
        tmp = np.empty_like(hr)
        hr ^= buf[pos[rows]].astype(np.uint64) * P5
        _rotl(hr, 11, tmp)
        hr *= P1
        h[rows] = hr
        pos[rows] += 1
        rem[rows] -= 1
    _avalanche(h, np.empty_like(h))
    return h


def _hash_stripes(u64: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The ``len >= 32`` branch of XXH64: four accumulators over 32-byte stripes, merged."""
    m = starts.shape[0]
    v = [
        np.full(m, _V1, dtype=np.uint64),
        np.full(m, P2, dtype=np.uint64),
        np.zeros(m, dtype=np.uint64),
        np.full(m, _V4, dtype=np.uint64),
    ]
    stripes = lengths // 32
    for s in range(int(stripes.max())):
        rows = np.flatnonzero(stripes > s)
        base = starts[rows] + 32 * s
        for i in range(4):
            acc = v[i][rows]
            tmp = np.empty_like(acc)
            _round(acc, u64[base + 8 * i], tmp)
            v[i][rows] = acc
    tmp = np.empty(m, dtype=np.uint64)
    h = np.zeros(m, dtype=np.uint64)
    for i, r in enumerate((1, 7, 12, 18)):
        x = v[i].copy()
        _rotl(x, r, tmp)
        h += x
    zero = np.zeros(m, dtype=np.uint64)
    for i in range(4):
        acc = zero.copy()
        _round(acc, v[i], tmp)
        h ^= acc
        h *= P1
        h += P4
    h += lengths.astype(np.uint64)
    return h
