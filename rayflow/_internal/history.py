"""The job's history, sampled into the catalog for ``rayflow report`` (DESIGN §7): pure.

The manager samples every ``EngineConfig.history_interval_s`` (``GroupManager._sample_history``,
the thin shell) and the catalog stores the rows these functions build
(``Catalog.record_history``):

- ``history_partitions``: one row per partition and sample: rows processed and
  committed, the smoothed rate, lag in rows and seconds (``lag.add_lag``, the
  figures ``rayflow status`` and the Prometheus gauges show), watermark and
  event-time lag, owner and lease epoch, queued and spilled bytes at the
  sources (NULL where the sources do not report them), and the partition's
  commits since the previous sample (:class:`CommitTally`);
- ``history_consumers``: one row per consumer that answered: its busy and
  commit fractions over the interval since its previous answer (NULL on its
  first), rows processed, resident memory;
- ``history_skew`` and ``history_hot_keys``: per partition its input rate against the
  mean, and its hottest keys (``skew.history_rows``; docs/skew.md), when the sources
  all answered.

Commits are kept per sample and partition (count, rows, bytes, total and
longest duration), not one row each: at 16 partitions committing every 2 s a
row per commit would be ~5M rows (~90 MB) a week against ~2M for the samples.
The longest duration of each interval is kept, so outliers show.
"""

from __future__ import annotations

from dataclasses import dataclass

from rayflow._internal.skew import HOT_KEY_COLUMNS, SKEW_COLUMNS

#: Columns of ``history_partitions`` and their SQL types, in order (the catalog's DDL).
PARTITION_COLUMNS = (
    ("ts", "TIMESTAMP"), ("partition", "INTEGER"), ("owner", "VARCHAR"), ("lease_epoch", "BIGINT"),
    ("processed_rows", "BIGINT"), ("committed_rows", "BIGINT"), ("rate_rows_per_s", "DOUBLE"),
    ("lag_rows", "BIGINT"), ("lag_s", "DOUBLE"), ("watermark_ms", "BIGINT"), ("event_time_lag_s", "DOUBLE"),
    ("queued_bytes", "BIGINT"), ("spilled_bytes", "BIGINT"), ("commits", "INTEGER"),
    ("commit_rows", "BIGINT"), ("commit_bytes", "BIGINT"), ("commit_s_sum", "DOUBLE"),
    ("commit_s_max", "DOUBLE"),
)  # fmt: skip
#: Columns of ``history_consumers`` and their SQL types, in order.
CONSUMER_COLUMNS = (
    ("ts", "TIMESTAMP"), ("member", "VARCHAR"), ("busy_fraction", "DOUBLE"), ("commit_fraction", "DOUBLE"),
    ("rows_processed", "BIGINT"), ("rss_bytes", "BIGINT"),
)  # fmt: skip
#: The history tables: name -> columns (``history_skew`` and ``history_hot_keys``: ``skew.py``).
TABLES = {
    "history_partitions": PARTITION_COLUMNS,
    "history_consumers": CONSUMER_COLUMNS,
    "history_skew": SKEW_COLUMNS,
    "history_hot_keys": HOT_KEY_COLUMNS,
}


@dataclass
class _Commits:
    commits: int = 0
    rows: int = 0
    nbytes: int = 0
    seconds: float = 0.0
    longest_s: float = 0.0


class CommitTally:
    """Commits recorded since the last sample, per partition (the manager adds, a sample takes).

    A commit's duration is step 1 at the consumer (``CommitRecord.write_s``: writing its
    state and output files) plus steps 2-4 at the manager (``record_s``: waiting for the
    commit lock, the checks, the catalog transaction). Caveat: the call between the two,
    and step 6 (trimming the sources), are not in it.
    """

    def __init__(self) -> None:
        self._by_partition: dict[int, _Commits] = {}

    def add(self, partition: int, *, rows: int, nbytes: int, write_s: float, record_s: float) -> None:
        c = self._by_partition.setdefault(partition, _Commits())
        took = max(0.0, write_s) + max(0.0, record_s)
        c.commits += 1
        c.rows += rows
        c.nbytes += nbytes
        c.seconds += took
        c.longest_s = max(c.longest_s, took)

    def take(self) -> dict[int, _Commits]:
        """The tallies since the last take, and start afresh."""
        out, self._by_partition = self._by_partition, {}
        return out


def _source_sum(sources: list[dict], key: str, p: int) -> int | None:
    """A per-partition figure summed over the source actors; None if none reports it."""
    values = [s[key][p] for s in sources if s.get(key) is not None and p < len(s[key])]
    return sum(values) if values else None


def partition_rows(
    status: dict, sources: list[dict] | None, commits: dict[int, _Commits], *, ts
) -> list[tuple]:
    """The ``history_partitions`` rows of one sample (:data:`PARTITION_COLUMNS`).

    ``status``: the manager's status with lag figures added (``lag.add_lag``) when
    ``sources`` answered; ``sources`` None: they did not all answer, so lag and bytes
    are NULL (a partial sum would understate them). ``commits``: :meth:`CommitTally.take`.
    """
    rows = []
    for part in status["partitions"]:
        p = part["partition"]
        c = commits.get(p, _Commits())
        known = sources is not None
        queued = part.get("queued_bytes", _source_sum(sources, "queued_bytes", p) if known else None)
        spilled = part.get("spilled_bytes", _source_sum(sources, "spilled_bytes", p) if known else None)
        rows.append(
            (
                ts, p, part.get("owner"), part.get("lease_epoch"), part.get("processed_rows"),
                part.get("committed_rows"), part.get("load_rows_per_s"),
                part.get("lag_rows") if known else None, part.get("lag_s") if known else None,
                part.get("watermark_ms"), part.get("event_time_lag_s"), queued, spilled,
                c.commits, c.rows, c.nbytes, c.seconds, c.longest_s,
            )
        )  # fmt: skip
    return rows


@dataclass(frozen=True)
class ConsumerClock:
    """What a consumer said at its previous sample: for the fractions over the interval."""

    at: float  # monotonic time of the answer
    busy_s: float
    commit_s: float


def consumer_rows(
    statuses: dict[str, dict], previous: dict[str, ConsumerClock], *, ts, now: float
) -> tuple[list[tuple], dict[str, ConsumerClock]]:
    """The ``history_consumers`` rows of one sample, and the clocks for the next.

    ``statuses``: member -> its ``status()``, only for those that answered (a missing
    answer is skipped, not waited for). Fractions are over the time since the
    member's previous answer, clipped to [0, 1]; NULL on its first answer, or after
    a restart of the member (its counters went back).
    """
    rows, clocks = [], dict(previous)  # a member that did not answer keeps its previous clock
    for member, st in sorted(statuses.items()):
        busy, commit = float(st.get("busy_s", 0.0)), float(st.get("commit_s", 0.0))
        prev = previous.get(member)
        busy_f = commit_f = None
        if prev is not None and now > prev.at and busy >= prev.busy_s and commit >= prev.commit_s:
            busy_f = min(1.0, (busy - prev.busy_s) / (now - prev.at))
            commit_f = min(1.0, (commit - prev.commit_s) / (now - prev.at))
        rows.append((ts, member, busy_f, commit_f, st.get("rows_processed"), st.get("rss_bytes")))
        clocks[member] = ConsumerClock(at=now, busy_s=busy, commit_s=commit)
    return rows, clocks


def next_tick(previous: float, interval: float, now: float) -> float:
    """When the next sample is due (any clock), on the fixed cadence ``previous + k *
    interval`` (``previous``: when the last one was due): the first such time after ``now``, so
    a sample that took long skips the ticks it missed rather than drifting or bunching up."""
    due = previous + interval
    if due <= now:
        due += (int((now - due) // interval) + 1) * interval
    return due
