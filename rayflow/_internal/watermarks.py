"""Event time and watermarks (DESIGN §11): the pure rules, no Ray.

- A **split's watermark** is the largest event time read from it, minus the
  allowed out-of-orderness (:class:`EventTime`). The source actor computes it
  per batch (:func:`batch_max_ms`) and tags every queued sub-batch with the
  split's watermark *after* that batch, so a consumer's view of a split moves
  only as it processes the split's rows, never ahead of them.
- A **partition's watermark** (:class:`PartitionClock`) is the minimum over
  the splits that feed it, skipping splits idle for longer than
  ``idle_timeout_s`` and splits that ended (their watermark is
  :data:`WATERMARK_END`). It never goes back: a source that restarts reads
  again from committed positions, and its first batches carry lower
  watermarks, which change nothing.
- Idleness is decided by the source (no rows from the split for
  ``idle_timeout_s``) but applied by a partition only once it has processed
  everything the source has read of that split: rows still queued are never
  made late by their own split's silence.
- What processed rows reached holds: a fetch reply may carry a split's last
  rows *and* the news that the split ended or went quiet (skipped), as it does
  whenever the consumer fetches after the source hit the end of the split.
  The news then applies as if it had come after the rows, in a reply of its
  own (:meth:`PartitionClock.told_with_rows`): the watermark does not depend
  on when the consumer fetched.
- Watermarks are committed with the positions (``CommitRecord.watermarks``)
  and restored with them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.compute as pc

from rayflow.errors import ConfigError, InputError
from rayflow.ops.base import WATERMARK_END, WATERMARK_NONE

__all__ = [
    "WATERMARK_END",
    "WATERMARK_NONE",
    "EventTime",
    "PartitionClock",
    "batch_max_ms",
    "check_event_time_column",
    "TO_MS",
    "lag_s",
]


@dataclass(frozen=True, kw_only=True)
class EventTime:
    """A job's event-time column and watermark strategy (``rf.Pipeline(event_time=...)``)."""

    column: str
    max_out_of_orderness_s: float = 0.0
    #: ``None``: a split is never skipped for being idle.
    idle_timeout_s: float | None = None

    def __post_init__(self):
        if not isinstance(self.column, str) or not self.column:
            raise ConfigError(f"event_time must name a column, got {self.column!r}")
        for name in ("max_out_of_orderness_s", "idle_timeout_s"):
            v = getattr(self, name)
            if v is None and name == "idle_timeout_s":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"{name} must be a number of seconds >= 0, got {v!r}")
        if self.idle_timeout_s is not None and self.idle_timeout_s == 0:
            raise ConfigError("idle_timeout_s must be > 0 seconds, or None to never skip idle splits")

    @property
    def out_of_orderness_ms(self) -> int:
        return int(round(self.max_out_of_orderness_s * 1000))

    def watermark(self, max_event_ms: int) -> int:
        """The watermark after reading events up to ``max_event_ms``."""
        if max_event_ms == WATERMARK_NONE:
            return WATERMARK_NONE
        return max_event_ms - self.out_of_orderness_ms


def check_event_time_column(schema: pa.Schema, column: str, *, what: str) -> None:
    """Refuse an event-time column that is missing or not int64 milliseconds / a timestamp."""
    if column not in schema.names:
        raise InputError(
            f"{what} names the event-time column {column!r}, but the input has no such column; its "
            f"columns are {schema.names}"
        )
    t = schema.field(column).type
    if not (pa.types.is_timestamp(t) or pa.types.is_int64(t)):
        raise InputError(
            f"{what}: the event-time column {column!r} has type {t}; it must be int64 milliseconds "
            "since the epoch or an Arrow timestamp: cast it in an rf.ops.Map before (with "
            "output_schema=), or read it with that type"
        )


#: Milliseconds per unit of an Arrow timestamp: (multiply, floor-divide).
TO_MS = {"s": (1000, 1), "ms": (1, 1), "us": (1, 1000), "ns": (1, 1_000_000)}


def batch_max_ms(batch: pa.RecordBatch | pa.Table, column: str) -> int:
    """The largest event time in ``batch`` in ms (floored, as windows see it), or
    :data:`WATERMARK_NONE` (no non-null value)."""
    if column not in batch.schema.names:
        raise InputError(
            f"the event-time column {column!r} is missing from a batch of the input (its columns "
            f"are {batch.schema.names})"
        )
    check_event_time_column(batch.schema, column, what="a batch of the input")
    col = batch.column(column)
    m = pc.max(col)
    if not m.is_valid:
        return WATERMARK_NONE
    if not pa.types.is_timestamp(col.type):
        return int(m.as_py())
    mul, div = TO_MS[col.type.unit]
    return int(m.cast(pa.int64()).as_py()) * mul // div


@dataclass
class PartitionClock:
    """One partition's watermark, from what it has processed of each split (pure bookkeeping).

    ``splits``: split -> its watermark as of the rows this partition has
    processed (or was told it has all of). ``idle``: splits the source
    reported idle after this partition had everything read of them.
    ``heard``: source actors that have listed all their splits to this
    partition at least once since it was loaded; until all have, a split the
    partition does not know yet might hold it back, so the watermark stays.
    """

    splits: dict[str, int] = field(default_factory=dict)
    idle: set[str] = field(default_factory=set)
    heard: set[int] = field(default_factory=set)
    #: The watermark the operators have been advanced to (committed with the positions).
    applied: int = WATERMARK_NONE
    #: A watermark processed rows reached before news skipped their splits
    #: (:meth:`told_with_rows`): the partition's watermark never stands below it.
    floor: int = WATERMARK_NONE

    @classmethod
    def restored(cls, committed: dict | None) -> PartitionClock:
        """From a commit's ``watermarks`` (``{"partition": int, "splits": {...}}``), or from scratch."""
        if not committed:
            return cls()
        return cls(splits=dict(committed.get("splits", {})), applied=int(committed["partition"]))

    def committed(self) -> dict:
        return {"partition": self.applied, "splits": dict(self.splits)}

    def saw(self, split: str, watermark: int | None) -> None:
        """A batch of ``split`` was processed (tagged with the split's watermark after it)."""
        self.idle.discard(split)
        if watermark is not None and watermark > self.splits.get(split, WATERMARK_NONE):
            self.splits[split] = watermark
        else:
            self.splits.setdefault(split, WATERMARK_NONE)

    def told(self, source: int, watermarks: dict[str, int | None], idle: set[str] | None) -> None:
        """A source listed every split it reads. With ``idle`` (not ``None``): this partition has
        processed all it has read, the values are the splits' watermarks as of that (``None``:
        nothing read yet), and ``idle`` the splits idle past the timeout. Without: the values are
        all ``None`` (there is more to process), only the split names count."""
        self.heard.add(source)
        for s, w in watermarks.items():
            cur = self.splits.get(s, WATERMARK_NONE)
            self.splits[s] = max(cur, w) if w is not None else cur
            if idle is not None:
                if s in idle:
                    self.idle.add(s)
                else:
                    self.idle.discard(s)

    def told_with_rows(
        self,
        news: Iterable[tuple[int, dict[str, int | None], set[str] | None]],
        *,
        fresh: set[str],
        num_sources: int,
    ) -> None:
        """:meth:`told` for each of ``news`` (``(source, watermarks, idle)``: the fetch replies whose
        entries were just processed), where ``fresh`` are the splits those entries were of.

        A reply says which splits are idle or ended as of everything read, so it may skip a fresh
        split in the very reply that carried its last rows (the consumer fetched after the
        source hit the end of a watched directory's file). Applied as it comes, the news would
        skip that split before the operators were advanced to the watermark its rows reached,
        and with every split skipped event time would stand below those rows for ever (their
        windows never close). So the watermark the partition would have with this news holding
        for every other split, the fresh ones still counted, holds (:attr:`floor`): what it gets
        when the news comes after the rows, in a reply of its own."""
        news = list(news)
        if any(idle and fresh & idle for _, _, idle in news):  # else the same as told() alone
            trial = replace(self, splits=dict(self.splits), idle=set(self.idle), heard=set(self.heard))
            for source, watermarks, idle in news:
                trial.told(source, watermarks, None if idle is None else idle - fresh)
            self.floor = max(self.floor, trial.target(num_sources))
        for source, watermarks, idle in news:
            self.told(source, watermarks, idle)

    def target(self, num_sources: int) -> int:
        """The watermark the partition may advance to now (never below :attr:`applied` nor
        :attr:`floor`)."""
        reached = max(self.applied, self.floor)
        if len(self.heard) < num_sources:
            return reached
        active = [w for s, w in self.splits.items() if s not in self.idle]
        if not active:  # every split idle (or none): event time stands still, as in Flink
            return reached
        return max(reached, min(active))


def lag_s(watermark_ms: int, now_s: float) -> float | None:
    """Event-time lag: now minus the watermark, in seconds (``None`` before any watermark or after
    the end)."""
    if watermark_ms in (WATERMARK_NONE, WATERMARK_END):
        return None
    return now_s - watermark_ms / 1000.0
