"""The standard benchmark events of WORKLOAD.md: :class:`Synthetic`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from rayflow.errors import ConfigError
from rayflow.sources.base import Source, Split

#: WORKLOAD.md constants.
SYNTHETIC_BLOCK_ROWS = 1_000_000
SYNTHETIC_T0_MS = 1_700_000_000_000
SYNTHETIC_RATE = 1_000_000
SYNTHETIC_VALUE_RANGE = 1_024_000
SYNTHETIC_SCHEMA = pa.schema([("key", pa.int64()), ("value", pa.float64()), ("ts", pa.int64())])


@dataclass(frozen=True)
class _SyntheticSplit(Split):
    name: str
    events: int  # all events of the stream (for nothing but the total)
    first: int  # global index of this split's first event
    last: int  # one past its last event
    keys: int
    seed: int
    zipf_s: float

    def read(self, position: int) -> Iterator[tuple[pa.RecordBatch, int]]:
        gen = _SyntheticGenerator(self.keys, self.seed, self.zipf_s)
        i = self.first + position
        while i < self.last:
            block = i // SYNTHETIC_BLOCK_ROWS
            block_start = block * SYNTHETIC_BLOCK_ROWS
            stop = min(block_start + SYNTHETIC_BLOCK_ROWS, self.last)
            batch = gen.block(block, stop - block_start).slice(i - block_start)
            i = stop
            yield batch, i - self.first


_RANK_CELLS = 1 << 18


class _SyntheticGenerator:
    def __init__(self, keys: int, seed: int, zipf_s: float):
        w = 1.0 / np.power(np.arange(1, keys + 1, dtype=np.float64), zipf_s)
        cdf = np.cumsum(w)
        self.cdf = cdf / cdf[-1]
        self.perm = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 2**31]))).permutation(
            keys
        )
        self.keys = keys
        self.seed = seed
        # A lookup table over 2**18 equal cells of [0, 1): the rank range each cell can
        # give. Most draws land in a cell of one rank and skip the binary search.
        grid = np.arange(_RANK_CELLS + 1, dtype=np.float64) / _RANK_CELLS
        self.cell_rank = np.searchsorted(self.cdf, grid, side="right").astype(np.int32)

    def ranks(self, u: np.ndarray) -> np.ndarray:
        """``searchsorted(cdf, u, side="right")`` exactly (WORKLOAD.md), about twice as fast.

        For ``u`` in cell ``[g, g + 1) / C`` the answer lies between the counts of cdf
        values <= ``g / C`` and <= ``(g + 1) / C`` (exact in float64, C a power of two);
        where those agree it is known, elsewhere the search runs on those draws only.
        """
        g = (u * _RANK_CELLS).astype(np.int32)
        lo, hi = self.cell_rank[g], self.cell_rank[g + 1]
        r = lo.astype(np.int64)
        open_ = np.flatnonzero(lo != hi)
        r[open_] = np.searchsorted(self.cdf, u[open_], side="right")
        return r

    def block(self, b: int, rows: int) -> pa.RecordBatch:
        """The first ``rows`` rows of block ``b`` (a prefix of the full block)."""
        u = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, b, 0]))).random(rows)
        r = np.minimum(self.ranks(u), self.keys - 1)
        key = self.perm[r].astype(np.int64, copy=False)
        ints = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, b, 1]))).integers(
            0, SYNTHETIC_VALUE_RANGE, rows, dtype=np.int64
        )
        value = ints / 1024.0
        idx = np.arange(b * SYNTHETIC_BLOCK_ROWS, b * SYNTHETIC_BLOCK_ROWS + rows, dtype=np.int64)
        ts = SYNTHETIC_T0_MS + (idx * 1000) // SYNTHETIC_RATE
        return pa.RecordBatch.from_arrays(
            [pa.array(key), pa.array(value), pa.array(ts)], schema=SYNTHETIC_SCHEMA
        )


class Synthetic(Source):
    """The standard benchmark events of WORKLOAD.md: ``key int64, value float64, ts int64``.

    Deterministic and replayable from any position: a block of 1,000,000 events
    is regenerated from its index alone. ``splits`` cuts the stream into that
    many contiguous ranges of whole blocks, so several source actors can share it.
    """

    def __init__(
        self,
        *,
        events: int = 10_000_000,
        keys: int = 100_000,
        seed: int = 42,
        splits: int = 1,
        zipf_s: float = 1.0,
    ):
        for name, v, lo in (("events", events, 1), ("keys", keys, 1), ("splits", splits, 1)):
            if not isinstance(v, int) or v < lo:
                raise ConfigError(f"rf.sources.Synthetic: {name} must be an integer >= {lo}, got {v!r}")
        self.events, self.keys, self.seed, self.num_splits, self.zipf_s = events, keys, seed, splits, zipf_s

    @property
    def schema(self) -> pa.Schema:
        return SYNTHETIC_SCHEMA

    def splits(self) -> list[Split]:
        blocks = -(-self.events // SYNTHETIC_BLOCK_ROWS)
        n = min(self.num_splits, blocks)
        cuts = [min(self.events, (blocks * j // n) * SYNTHETIC_BLOCK_ROWS) for j in range(n + 1)]
        return [
            _SyntheticSplit(f"synthetic[{a}:{b}]", self.events, a, b, self.keys, self.seed, self.zipf_s)
            for a, b in zip(cuts, cuts[1:])
        ]

    def to_table(self) -> pa.Table:
        """All events as one table (for references and tests)."""
        return pa.Table.from_batches(
            [b for s in self.splits() for b, _ in s.read(0)], schema=SYNTHETIC_SCHEMA
        )

    def __repr__(self) -> str:
        return f"rf.sources.Synthetic(events={self.events}, keys={self.keys}, seed={self.seed})"
