"""The standard benchmark events of WORKLOAD.md: :class:`Synthetic`, bounded or live.

Two modes share one event stream (the same ``key`` and ``value`` at the same
global index, from the 1,000,000-row blocks of WORKLOAD.md):

- **Bounded, unpaced** (``events=N``, no ``rate``): the N events as fast as
  they can be read, ``ts`` on WORKLOAD.md's simulated clock. Exactly the rows
  WORKLOAD.md pins.
- **Paced** (``rate=...``): each row is released when the wall clock reaches
  its scheduled time, and its ``ts`` *is* that time: ``start_ms +
  schedule(position)``. Unbounded when ``events`` is not given (a live
  stream), else it ends after N events.

The schedule (:class:`Schedule`) is integer arithmetic over the position, so
it is deterministic by position, like the data: a resumed read yields the
same rows with the same ``ts``. ``start_ms`` must therefore be the same at
every resume: by default it is the time the job first started reading, which
the engine records in the job's catalog (``Split.bind``); a job that was
down resumes with a backlog and catches up at full speed, as a consumer of a
Kafka topic does.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from rayflow.errors import ConfigError
from rayflow.sources.base import Source, Split, wait_until_due

#: WORKLOAD.md constants.
SYNTHETIC_BLOCK_ROWS = 1_000_000
SYNTHETIC_T0_MS = 1_700_000_000_000
SYNTHETIC_RATE = 1_000_000
SYNTHETIC_VALUE_RANGE = 1_024_000
SYNTHETIC_SCHEMA = pa.schema([("key", pa.int64()), ("value", pa.float64()), ("ts", pa.int64())])

#: A paced split cuts its batches at every multiple of this many milliseconds of its schedule
#: (and at block ends), by default: a row waits at most this long for its batch, and the grid of
#: batch ends is a function of the schedule alone (see the grid rule in ``sources/base.py``).
#: 50 ms adds little to the latency a commit interval (seconds) sets, while each batch costs the
#: source actor one object store put per partition (about a millisecond each on a small
#: machine): 20 batches a second stay cheap, and a backlog is caught up in batches of 50 ms of
#: rows, as fast as those puts allow.
PACED_BATCH_MS = 50

#: ``events`` not given: 10M events unpaced (WORKLOAD.md), unbounded when paced.
_DEFAULT_EVENTS = 10_000_000
#: Splits of an unpaced stream when ``splits`` is not given (at most one per block): enough for
#: the source actors of a 16-CPU machine to share the stream (``EngineConfig.num_sources``), and
#: the rows do not depend on it (every row is a function of its global index).
DEFAULT_UNPACED_SPLITS = 16


# ----------------------------------------------------------------------------- the schedule


@dataclass(frozen=True)
class Schedule:
    """When each row of a paced stream is due, from a rate profile (pure integer maths).

    ``segments``: ``(duration_ms, rate)`` pairs, rates in events/s (integers
    >= 0; 0 is a pause). The profile is *cycled*: after the last segment it
    starts again with the first. A last segment of ``duration_ms=None`` lasts
    for ever instead (so ``[(None, r)]`` is a constant rate ``r``).

    In a segment starting at ``T`` ms after row ``E``, row ``E + j`` is due at
    ``T + j * 1000 // rate`` ms (WORKLOAD.md's formula), and the segment holds
    the rows due before its end, ``ceil(duration_ms * rate / 1000)`` of them.
    :meth:`time_of` and :meth:`due` are exact inverses on that grid:
    ``due(t)`` counts the rows with ``time_of(i) < t``.
    """

    segments: tuple[tuple[int | None, int], ...]

    def __post_init__(self) -> None:
        segs = self.segments
        if not segs:
            raise ConfigError("a rate profile needs at least one (seconds, rate) segment")
        for i, (d, r) in enumerate(segs):
            last = i == len(segs) - 1
            if d is None and not last:
                raise ConfigError("only the last segment of a rate profile may last for ever")
            if d is not None and (not isinstance(d, int) or d < 1):
                raise ConfigError(f"segment {i} of the rate profile must last >= 1 ms, got {d!r} ms")
            if not isinstance(r, int) or r < 0:
                raise ConfigError(f"segment {i} of the rate profile needs a rate >= 0 events/s, got {r!r}")
        starts_ms, starts_ev, t, e = [], [], 0, 0
        for d, r in segs:
            starts_ms.append(t)
            starts_ev.append(e)
            if d is not None:
                t += d
                e += -(-d * r // 1000)
        object.__setattr__(self, "_starts_ms", np.array(starts_ms, dtype=np.int64))
        object.__setattr__(self, "_starts_ev", np.array(starts_ev, dtype=np.int64))
        object.__setattr__(self, "_rates", np.array([r for _, r in segs], dtype=np.int64))
        cyclic = segs[-1][0] is not None
        object.__setattr__(self, "_period_ms", t if cyclic else 0)
        object.__setattr__(self, "_period_ev", e if cyclic else 0)

    @property
    def endless(self) -> bool:
        """Rows keep coming for ever (a cycle with rows in it, or a last rate > 0)."""
        return self._period_ev > 0 if self._period_ms else int(self._rates[-1]) > 0

    def time_of(self, i):
        """Milliseconds after the stream's start at which row ``i`` (int or int64 array) is due."""
        i = np.asarray(i, dtype=np.int64)
        cycles = np.zeros_like(i)
        if self._period_ms:
            cycles, i = np.divmod(i, self._period_ev)
        # 'right': a segment that holds no rows (a pause) starts where the next one does.
        k = np.searchsorted(self._starts_ev, i, side="right") - 1
        rate = np.maximum(self._rates[k], 1)  # rows never land in a pause; avoids 0-division
        t = cycles * self._period_ms + self._starts_ms[k] + (i - self._starts_ev[k]) * 1000 // rate
        return t if t.ndim else int(t)

    def due(self, t_ms: int) -> int:
        """How many rows are due strictly before ``t_ms`` ms after the stream's start."""
        if t_ms <= 0:
            return 0
        cycles = 0
        if self._period_ms:
            cycles, t_ms = divmod(t_ms, self._period_ms)
        k = int(np.searchsorted(self._starts_ms, t_ms, side="right")) - 1
        within = -(-(t_ms - int(self._starts_ms[k])) * int(self._rates[k]) // 1000)
        return cycles * self._period_ev + int(self._starts_ev[k]) + within

    def share(self, j: int, n: int) -> Schedule:
        """Split ``j`` of ``n``'s part: each rate divided into ``n`` integer shares summing to it."""
        return Schedule(tuple((d, r // n + (1 if j < r % n else 0)) for d, r in self.segments))

    @classmethod
    def from_rate(cls, rate) -> Schedule:
        """Events/s, or a profile ``[(seconds, rate), ...]`` (cycled; ``math.inf`` seconds: for ever)."""
        if _is_number(rate):
            return cls(((None, _rate_int(rate, "rate")),))
        if not isinstance(rate, Sequence) or isinstance(rate, str) or not rate:
            raise ConfigError(
                f"rf.sources.Synthetic: rate must be events/s or a list of (seconds, rate) segments, "
                f"got {rate!r}"
            )
        segs = []
        for i, seg in enumerate(rate):
            if not isinstance(seg, (tuple, list)) or len(seg) != 2 or not all(map(_is_number, seg)):
                raise ConfigError(
                    f"rf.sources.Synthetic: rate segment {i} must be (seconds, rate), got {seg!r}"
                )
            seconds, r = seg
            if seconds == math.inf:
                segs.append((None, _rate_int(r, f"rate of segment {i}")))
                continue
            ms = round(seconds * 1000) if math.isfinite(seconds) else 0
            if ms < 1:
                raise ConfigError(
                    f"rf.sources.Synthetic: segment {i} must last >= 0.001 s (or math.inf), got {seconds!r}"
                )
            segs.append((ms, _rate_int(r, f"rate of segment {i}")))
        return cls(tuple(segs))


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _rate_int(r, what: str) -> int:
    if not _is_number(r) or r < 0 or not math.isfinite(r) or r != int(r):
        raise ConfigError(f"rf.sources.Synthetic: {what} must be a whole number of events/s >= 0, got {r!r}")
    return int(r)


# ----------------------------------------------------------------------------- splits


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

    def rows(self, start: int, stop: int) -> pa.Table:
        """Rows ``[start, stop)`` at once (references and tests)."""
        out = []
        for b, end in self.read(start):
            out.append(b)
            if end >= stop:
                break
        return pa.Table.from_batches(out, schema=SYNTHETIC_SCHEMA).slice(0, max(0, stop - start))

    @property
    def size(self) -> int:
        return self.last - self.first


@dataclass(frozen=True)
class _PacedSplit(Split):
    """A paced part of the stream: positions ``p`` map to whole blocks ``first_block + k * stride``
    (``k = p // block``), so the splits of an unbounded stream interleave its blocks; a bounded
    one (``stride=1``) is a contiguous range, the same rows as the unpaced split of that range.

    ``unbounded`` (``read`` waits for rows to be due) even when ``last`` bounds it.
    """

    name: str
    first_block: int
    stride: int
    last: int | None  # one past the last position (None: never ends)
    keys: int
    seed: int
    zipf_s: float
    schedule: Schedule
    start_ms: int | None  # wall-clock ms of position 0's schedule; None until bound to a job
    batch_ms: int = PACED_BATCH_MS
    unbounded = True

    def bind(self, *, job_started_ms: int) -> Split:
        if self.start_ms is not None:
            return self
        return dataclasses.replace(self, start_ms=int(job_started_ms))

    def _global_block(self, p: int) -> int:
        return self.first_block + (p // SYNTHETIC_BLOCK_ROWS) * self.stride

    def batch_end(self, p: int) -> int:
        """Where the batch holding position ``p`` ends: the next slot end of the schedule, the
        block end, or the split's end, whichever is first. A function of ``p`` alone (the grid)."""
        slot_end = (self.schedule.time_of(p) // self.batch_ms + 1) * self.batch_ms
        end = min(self.schedule.due(slot_end), (p // SYNTHETIC_BLOCK_ROWS + 1) * SYNTHETIC_BLOCK_ROWS)
        return end if self.last is None else min(end, self.last)

    def read(self, position: int) -> Iterator[tuple[pa.RecordBatch, int]]:
        if self.start_ms is None:
            raise ConfigError(f"{self.name}: a paced split must be bound to a start time (Split.bind)")
        gen = _SyntheticGenerator(self.keys, self.seed, self.zipf_s)
        cache: tuple[int, pa.RecordBatch] | None = None  # (global block, its key and value columns)
        idle = pa.RecordBatch.from_pylist([], schema=SYNTHETIC_SCHEMA)
        p = position
        while self.last is None or p < self.last:
            end = self.batch_end(p)
            release_ms = self.start_ms + self.schedule.time_of(end - 1)  # its last row is due
            yield from wait_until_due(release_ms, idle, p)
            b = self._global_block(p)
            if cache is None or cache[0] != b:
                cache = (b, gen.columns(b, self._block_rows(p)))
            off = p % SYNTHETIC_BLOCK_ROWS
            cols = cache[1].slice(off, end - p)
            ts = self.start_ms + self.schedule.time_of(np.arange(p, end, dtype=np.int64))
            yield (
                pa.RecordBatch.from_arrays(
                    [cols.column(0), cols.column(1), pa.array(ts)], schema=SYNTHETIC_SCHEMA
                ),
                end,
            )
            p = end

    def _block_rows(self, p: int) -> int:
        """Rows of the block holding ``p`` that this split reads (its prefix, for a bounded end)."""
        block_first = (p // SYNTHETIC_BLOCK_ROWS) * SYNTHETIC_BLOCK_ROWS
        if self.last is None:
            return SYNTHETIC_BLOCK_ROWS
        return min(SYNTHETIC_BLOCK_ROWS, self.last - block_first)

    def available(self) -> int | None:
        """The rows due so far (``None`` until bound to a start time)."""
        if self.start_ms is None:
            return None
        due = self.schedule.due(int(time.time() * 1000) - self.start_ms + 1)
        return due if self.last is None else min(due, self.last)

    @property
    def size(self) -> int | None:
        return self.last

    def rows(self, start: int, stop: int) -> pa.Table:
        """Rows ``[start, stop)`` at once, without waiting (references and tests); ``ts`` counts
        from 0 when the split is not bound to a start time."""
        gen = _SyntheticGenerator(self.keys, self.seed, self.zipf_s)
        out, p = [], start
        while p < stop:
            end = min(stop, (p // SYNTHETIC_BLOCK_ROWS + 1) * SYNTHETIC_BLOCK_ROWS)
            cols = gen.columns(self._global_block(p), self._block_rows(p)).slice(
                p % SYNTHETIC_BLOCK_ROWS, end - p
            )
            ts = (self.start_ms or 0) + self.schedule.time_of(np.arange(p, end, dtype=np.int64))
            out.append(
                pa.RecordBatch.from_arrays(
                    [cols.column(0), cols.column(1), pa.array(ts)], schema=SYNTHETIC_SCHEMA
                )
            )
            p = end
        return pa.Table.from_batches(out, schema=SYNTHETIC_SCHEMA)


_RANK_CELLS = 1 << 18
_KV_SCHEMA = pa.schema([("key", pa.int64()), ("value", pa.float64())])


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

    def columns(self, b: int, rows: int) -> pa.RecordBatch:
        """``key`` and ``value`` of the first ``rows`` rows of block ``b`` (a prefix of the block:
        the random streams are drawn in order, so a prefix is the same for any larger ``rows``)."""
        u = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, b, 0]))).random(rows)
        r = np.minimum(self.ranks(u), self.keys - 1)
        key = self.perm[r].astype(np.int64, copy=False)
        ints = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, b, 1]))).integers(
            0, SYNTHETIC_VALUE_RANGE, rows, dtype=np.int64
        )
        return pa.RecordBatch.from_arrays([pa.array(key), pa.array(ints / 1024.0)], schema=_KV_SCHEMA)

    def block(self, b: int, rows: int) -> pa.RecordBatch:
        """The first ``rows`` rows of block ``b``, with WORKLOAD.md's simulated ``ts``."""
        kv = self.columns(b, rows)
        idx = np.arange(b * SYNTHETIC_BLOCK_ROWS, b * SYNTHETIC_BLOCK_ROWS + rows, dtype=np.int64)
        ts = SYNTHETIC_T0_MS + (idx * 1000) // SYNTHETIC_RATE
        return pa.RecordBatch.from_arrays([kv.column(0), kv.column(1), pa.array(ts)], schema=SYNTHETIC_SCHEMA)


class Synthetic(Source):
    """The standard benchmark events of WORKLOAD.md: ``key int64, value float64, ts int64``.

    Deterministic and replayable from any position: a block of 1,000,000 events
    is regenerated from its index alone.

    - ``Synthetic(events=N)`` (default 10M): the N events unpaced, exactly as
      WORKLOAD.md pins them. ``splits`` cuts the stream into that many
      contiguous ranges of whole blocks (at most one per block), so several
      source actors can share it; by default :data:`DEFAULT_UNPACED_SPLITS`.
      The rows are the same for any split count (a row is a function of its
      global index), but split names are ``synthetic[<first>:<stop>]``: a
      checkpoint resumes only with the split count it was written with
      (``splits=1`` for one written before the default was several).
    - ``Synthetic(rate=R)``: a live stream, unbounded (the job runs until
      ``run.stop()``), paced at ``R`` events/s: each row is released when the
      wall clock reaches its scheduled time, and ``ts`` is that time
      (generation time, ms since the epoch). ``rate`` may also be a profile of
      ``(seconds, rate)`` segments, for bursts: the profile is cycled, and a
      last segment of ``math.inf`` seconds holds its rate for ever instead
      (``[(5, 10_000), (math.inf, 100_000)]``: a slow start, then steady).
      The rows are the same ``key`` and ``value`` as the unpaced stream's; with
      ``splits=n`` each split takes every n-th block and an n-th of the rate.
      Paced, ``splits`` is 1 by default: the rate, not reading, bounds a paced
      stream, and each split must keep a whole number of events/s.
    - ``Synthetic(rate=R, events=N)``: paced, ending after N events (the same
      rows as ``Synthetic(events=N)``, with generation-time ``ts``).

    ``batch_ms``: a paced split releases its rows in batches of this many ms
    of its schedule (a row waits at most that long; each batch costs the source
    a put per partition). ``start_ms``: the wall-clock time (ms since the
    epoch) the schedule counts from. By default, the time the job first
    started reading, recorded in its catalog: the same at every resume, so a resumed job reads the same rows with the same
    ``ts``, and one that was down meets a backlog of the rows due meanwhile
    and catches up at full speed. Caveat: a resume with another ``rate``
    re-times the whole stream from ``start_ms`` (the backlog changes with it).
    """

    def __init__(
        self,
        *,
        events: int | None = None,
        rate: int | float | Sequence[tuple[float, float]] | None = None,
        keys: int = 100_000,
        seed: int = 42,
        splits: int | None = None,
        zipf_s: float = 1.0,
        start_ms: int | None = None,
        batch_ms: int = PACED_BATCH_MS,
    ):
        if events is None and rate is None:
            events = _DEFAULT_EVENTS
        if splits is None:
            splits = 1 if rate is not None else DEFAULT_UNPACED_SPLITS
        for name, v, lo in (("keys", keys, 1), ("splits", splits, 1)) + (
            (("events", events, 1),) if events is not None else ()
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"rf.sources.Synthetic: {name} must be an integer >= {lo}, got {v!r}")
        if start_ms is not None and (isinstance(start_ms, bool) or not isinstance(start_ms, int)):
            raise ConfigError(
                f"rf.sources.Synthetic: start_ms must be ms since the epoch (int), got {start_ms!r}"
            )
        if isinstance(batch_ms, bool) or not isinstance(batch_ms, int) or batch_ms < 1:
            raise ConfigError(f"rf.sources.Synthetic: batch_ms must be an integer >= 1, got {batch_ms!r}")
        self.events, self.keys, self.seed, self.num_splits, self.zipf_s = events, keys, seed, splits, zipf_s
        self.batch_ms = batch_ms
        self.rate = rate
        self.start_ms = start_ms
        self.schedule = Schedule.from_rate(rate) if rate is not None else None
        if self.schedule is not None:
            for s in self.splits():
                if not s.schedule.endless:
                    raise ConfigError(
                        f"rf.sources.Synthetic: rate={rate!r} leaves split {s.name} without events for "
                        "ever (each split paces an n-th of the rate, in whole events/s); raise the rate, "
                        "give the last segment a rate, or use fewer splits"
                    )

    @property
    def unbounded(self) -> bool:
        return self.events is None

    @property
    def schema(self) -> pa.Schema:
        return SYNTHETIC_SCHEMA

    def splits(self) -> list[Split]:
        if self.events is None:  # live: split j takes blocks j, j + n, j + 2n, ...
            n = self.num_splits
            return [
                _PacedSplit(
                    f"synthetic[{j}::{n}]", j, n, None, self.keys, self.seed, self.zipf_s,
                    self.schedule.share(j, n), self.start_ms, self.batch_ms,
                )
                for j in range(n)
            ]  # fmt: skip
        blocks = -(-self.events // SYNTHETIC_BLOCK_ROWS)
        n = min(self.num_splits, blocks)
        cuts = [min(self.events, (blocks * j // n) * SYNTHETIC_BLOCK_ROWS) for j in range(n + 1)]
        if self.schedule is None:
            return [
                _SyntheticSplit(f"synthetic[{a}:{b}]", self.events, a, b, self.keys, self.seed, self.zipf_s)
                for a, b in zip(cuts, cuts[1:])
            ]
        return [
            _PacedSplit(
                f"synthetic[{a}:{b}]", a // SYNTHETIC_BLOCK_ROWS, 1, b - a, self.keys, self.seed,
                self.zipf_s, self.schedule.share(j, n), self.start_ms, self.batch_ms,
            )
            for j, (a, b) in enumerate(zip(cuts, cuts[1:]))
        ]  # fmt: skip

    def to_table(self, positions: dict[str, int] | None = None) -> pa.Table:
        """Events as one table, at once (references and tests): all of them, or each split's rows
        up to ``positions[split name]`` (e.g. a job's committed positions; required when
        unbounded). Paced ``ts`` count from ``start_ms`` (from 0 when it is not set)."""
        if positions is None and self.events is None:
            raise ConfigError("an unbounded Synthetic has no end: pass positions={split name: rows}")
        if positions is None and self.schedule is None:
            return pa.Table.from_batches(
                [b for s in self.splits() for b, _ in s.read(0)], schema=SYNTHETIC_SCHEMA
            )
        parts = [s.rows(0, s.size if positions is None else positions.get(s.name, 0)) for s in self.splits()]
        return pa.concat_tables(parts)

    def __repr__(self) -> str:
        pace = f", rate={self.rate!r}" if self.rate is not None else ""
        return f"rf.sources.Synthetic(events={self.events}, keys={self.keys}, seed={self.seed}{pace})"
