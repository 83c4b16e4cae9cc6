"""Engine tunables: a frozen, keyword-only dataclass, validated on construction.

Every default is a module constant with the reason for its value. Units are in
the names (``_s`` seconds, ``_bytes``, ``_rows``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from rayflow.errors import ConfigError

#: Rows a partition queue may hold in memory (uncommitted); past it, further sub-batches of the
#: partition spill to local disk (the source pauses only once ``SPILL_MAX_BYTES`` is used up too):
#: about two checkpoint intervals of one partition at 16 partitions and 5M events/s.
QUEUE_MAX_ROWS = 2_000_000
#: Bytes a partition queue may hold in the object store; past it, further sub-batches spill (as
#: for ``QUEUE_MAX_ROWS``). The source actor's object store use over all its queues is bounded
#: by ``SOURCE_MAX_BYTES``.
QUEUE_MAX_BYTES = 64 * 1024 * 1024
#: Bytes one fetch returns per partition at most: large enough to amortize a
#: Ray call over many rows, small enough that a commit is never far away.
FETCH_MAX_BYTES = 32 * 1024 * 1024
#: How long a fetch waits for data before answering empty (long poll).
FETCH_WAIT_S = 0.05
#: Heartbeat period of a consumer; assignment changes reach it this fast.
HEARTBEAT_INTERVAL_S = 0.25
#: A consumer silent for this long is presumed dead (the Ray liveness watch
#: usually sees a crash within milliseconds; this is the backstop).
SESSION_TIMEOUT_S = 10.0
#: How often each partition commits (state, positions, outputs): the floor of end-to-end latency.
CHECKPOINT_INTERVAL_S = 2.0
#: A processing step of a consumer aims to take at most this long (the fetch size adapts to the
#: measured cost per row), so a revocation, a commit or a stop is never far away.
STEP_MAX_S = 0.5
#: First wait after a failed commit; doubled after each further failure, up to the cap.
COMMIT_RETRY_INITIAL_S = 0.1
#: Longest wait between two commit attempts.
COMMIT_RETRY_MAX_S = 5.0
#: Consecutive failed commit attempts after which the job fails (``PipelineFailedError``).
COMMIT_MAX_ATTEMPTS = 10
#: Seconds a commit may keep failing before the job fails, whatever the attempt count.
COMMIT_MAX_FAILING_S = 120.0
#: Longest a consumer waits for one call to the manager or a source; past it the outcome is
#: unknown (a commit is then reconciled with the catalog before anything new is staged).
CALL_TIMEOUT_S = 120.0
#: How often the source actors ask a *dynamic* source (a watched directory, a Kafka topic) for
#: its splits again: the delay before a new file or topic partition is read. A listing per
#: second is cheap for a directory or a broker, and short next to a checkpoint interval.
DISCOVERY_INTERVAL_S = 1.0
#: Deltas a partition's state may pile up after its base before a background compaction folds
#: them into a new base (DESIGN §5). A restore reads the base and every delta: 8 keep a restore
#: within a few group-bys, while a commit writes only what changed since the last one.
STATE_DELTAS_MAX = 8
#: Bytes all partition queues of one source actor may hold in the object store together: past
#: it, further sub-batches spill to local disk. 512 MiB keeps a laptop's default object store
#: (30% of RAM) from filling with two readers, and is 8 full queues at the default bound.
SOURCE_MAX_BYTES = 512 * 1024 * 1024
#: Bytes of local disk one source actor may spill sub-batches to (Arrow IPC files) once a
#: partition's queue or the actor's memory is at its bound; only past this does the source
#: pause. 4 GiB absorbs a 10x burst of several minutes at laptop rates.
SPILL_MAX_BYTES = 4 * 1024 * 1024 * 1024
#: Bytes of operator state a consumer keeps in memory; past it, a stateful operator that
#: supports it (``rf.ops.Aggregate``) keeps the cold part of its state on local disk.
CONSUMER_MAX_BYTES = 2 * 1024 * 1024 * 1024
#: Seconds between two samples of the job's history in the catalog (partition rates and lag,
#: consumers' busy time and memory): the resolution of ``rayflow report``. One sample of 16
#: partitions is one small insert; every 5 s costs well under 1% of the manager's time.
HISTORY_INTERVAL_S = 5.0
#: Seconds of history kept in the catalog (older samples are deleted): one week.
HISTORY_RETENTION_S = 7 * 24 * 3600.0


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Tunables of the engine; the defaults suit a laptop and a small cluster."""

    queue_max_rows: int = QUEUE_MAX_ROWS
    queue_max_bytes: int = QUEUE_MAX_BYTES
    fetch_max_bytes: int = FETCH_MAX_BYTES
    fetch_wait_s: float = FETCH_WAIT_S
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    session_timeout_s: float = SESSION_TIMEOUT_S
    checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S
    step_max_s: float = STEP_MAX_S
    commit_retry_initial_s: float = COMMIT_RETRY_INITIAL_S
    commit_retry_max_s: float = COMMIT_RETRY_MAX_S
    commit_max_attempts: int = COMMIT_MAX_ATTEMPTS
    commit_max_failing_s: float = COMMIT_MAX_FAILING_S
    call_timeout_s: float = CALL_TIMEOUT_S
    #: Seconds between two listings of a dynamic source's splits (``Source.dynamic``).
    discovery_interval_s: float = DISCOVERY_INTERVAL_S
    #: Source actors; a source's splits are dealt to them round-robin (the splits a dynamic
    #: source gains while the job runs: by a stable hash of their names). A bounded source
    #: starts no more actors than it has splits; a dynamic one starts all of them.
    #: ``None`` (the default): sized to the cluster's CPUs by :func:`auto_num_sources`.
    num_sources: int | None = None
    #: CPUs each consumer reserves from Ray's scheduler (0: place anywhere).
    consumer_num_cpus: float = 0.0
    #: CPUs each source actor reserves.
    source_num_cpus: float = 0.0
    #: Custom Ray resources each consumer needs, e.g. ``{"rayflow_consumer": 1}`` to place
    #: consumers only on nodes started with that resource (see cluster.yaml).
    consumer_resources: dict[str, float] = field(default_factory=dict)
    #: Custom Ray resources each source actor needs.
    source_resources: dict[str, float] = field(default_factory=dict)
    #: Custom Ray resources the manager needs (it holds the catalog: keep it where that lives).
    manager_resources: dict[str, float] = field(default_factory=dict)
    #: Incremental commits: a commit of an operator that supports it (``rf.ops.Aggregate``)
    #: writes only the groups changed since the last commit, as a delta; past this many deltas a
    #: background compaction folds them into a new base. 0: every commit writes the whole state.
    state_deltas_max: int = STATE_DELTAS_MAX
    #: Object-store bytes one source actor's queues may hold in all (``queue_max_bytes`` bounds
    #: each partition); past either bound a sub-batch spills to local disk (``spill_max_bytes``).
    source_max_bytes: int = SOURCE_MAX_BYTES
    #: Local disk bytes one source actor may spill to; past it the source pauses. 0: never
    #: spill (a full queue pauses the source at once).
    spill_max_bytes: int = SPILL_MAX_BYTES
    #: Directory for spilled queue data and state on each node; ``None``: the system's
    #: temporary directory. Spilled files are the process's own and deleted when it ends.
    spill_dir: str | None = None
    #: Bytes of operator state one consumer keeps in memory before it moves the cold part to
    #: local disk (``rf.ops.Aggregate``; other operators keep their state in memory).
    consumer_max_bytes: int = CONSUMER_MAX_BYTES
    #: Seconds between two samples of the job's history in the catalog (``rayflow report``).
    history_interval_s: float = HISTORY_INTERVAL_S
    #: Seconds of history kept in the catalog.
    history_retention_s: float = HISTORY_RETENTION_S

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "num_sources" and v is None:
                continue  # auto: auto_num_sources() when the job starts
            if f.name == "spill_dir":
                if v is not None and (not isinstance(v, str) or not v):
                    raise ConfigError(f"EngineConfig.spill_dir must be a directory path or None, got {v!r}")
                continue
            if f.name.endswith("_resources"):
                if not isinstance(v, dict) or not all(
                    isinstance(k, str) and isinstance(x, (int, float)) and x >= 0 for k, x in v.items()
                ):
                    raise ConfigError(
                        f"EngineConfig.{f.name} must map resource names to amounts >= 0, got {v!r}"
                    )
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"EngineConfig.{f.name} must be a number, got {v!r}")
            positive = f.name not in (
                "consumer_num_cpus",
                "source_num_cpus",
                "state_deltas_max",
                "spill_max_bytes",
            )
            if v < 0 or (positive and v == 0):
                raise ConfigError(f"EngineConfig.{f.name} must be {'> 0' if positive else '>= 0'}, got {v!r}")
        for name in (
            "num_sources",
            "commit_max_attempts",
            "state_deltas_max",
            "source_max_bytes",
            "spill_max_bytes",
            "consumer_max_bytes",
        ):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), int):
                raise ConfigError(f"EngineConfig.{name} must be an integer, got {getattr(self, name)!r}")


#: Source actors per CPU at most when ``num_sources`` is auto. Measured on a 2-core machine
#: (keyed job, 2 consumers, 10M events from Parquet): 2 source actors beat 1 by about 15%, as a
#: reader blocks on backpressure and on the object store as much as it computes, so readers and
#: consumers may share the cores; more than one reader per CPU only adds processes.
AUTO_SOURCES_PER_CPU = 1.0


def auto_num_sources(*, cpus: float, consumers: int, splits: int | None) -> int:
    """The source actors a job starts when ``EngineConfig.num_sources`` is ``None`` (pure).

    ``cpus``: the cluster's CPUs (``ray.cluster_resources()["CPU"]``); ``consumers``: the
    consumers the job starts with; ``splits``: the input's splits (for a dynamic source, those
    it lists at start), or ``None`` when not known.

    One reader per consumer (a reader feeds about one consumer's worth of events), at most
    :data:`AUTO_SOURCES_PER_CPU` per CPU, never more than the splits, and at least one: 2 CPUs
    and 2 consumers read with 2 actors, 16 CPUs and 8 consumers with 8, a 1-CPU machine with 1.
    """
    n = min(max(1, consumers), max(1, int(cpus * AUTO_SOURCES_PER_CPU)))
    if splits is not None:
        n = min(n, max(1, splits))
    return n


# ----------------------------------------------------------------------------- autoscaling

#: Fewest consumers an autoscaled job runs with: one keeps a quiet job cheap.
AUTOSCALE_MIN_CONSUMERS = 1
#: Most consumers an autoscaled job runs with: a small cluster's worth; raise it for more.
AUTOSCALE_MAX_CONSUMERS = 8
#: Busy fraction each consumer is sized for: 30% headroom absorbs a burst and works off a backlog
#: while the next decision is being made (Flink's autoscaler and Ray Serve aim at 0.6-0.8 too).
AUTOSCALE_TARGET_UTILIZATION = 0.7
#: Seconds between two decisions: long enough that busy time and rates average over many
#: processing steps (``step_max_s``) and heartbeats, short enough to react within seconds.
AUTOSCALE_INTERVAL_S = 5.0
#: A backlog is sized to be worked off within this many seconds, on top of the input rate.
AUTOSCALE_CATCH_UP_S = 30.0
#: Scale down only to the largest recommendation of this many seconds: a dip must last this
#: long to count (Kubernetes' HPA uses 300 s for pods that start in minutes; consumers start
#: in about a second and a rebalance pauses only the partitions that move).
AUTOSCALE_STABILIZATION_S = 30.0
#: Seconds after a scaling action during which observations are ignored and nothing is scaled:
#: the partitions that moved pause and restore, so lag and busy time say nothing yet.
AUTOSCALE_COOLDOWN_S = 10.0
#: Seconds after any scaling action before a scale-down: scaling down too early costs a second
#: rebalance and, if the load comes back, a third.
AUTOSCALE_SCALE_DOWN_DELAY_S = 60.0
#: The longest decision interval accepted (a day): an autoscaler that decides less often is none.
AUTOSCALE_MAX_INTERVAL_S = 86_400.0


@dataclass(frozen=True, kw_only=True)
class Autoscale:
    """Autoscaling of the consumer group: ``rf.Pipeline(..., autoscale=rf.Autoscale(...))``.

    Every ``interval_s`` the driver measures the input rate, each consumer's rows processed
    and busy time, and the lag per partition, and sizes the group (docs/autoscaling.md)::

        true rate per consumer = rows processed / busy seconds
        target = ceil((input rate + backlog / catch_up_s) / (true rate * target_utilization))

    clamped to ``[min_consumers, max_consumers]``, to the partitions (a consumer without a
    partition does nothing) and to what the cluster can schedule (``consumer_num_cpus``).
    Guards: up at once to the needed count, after a ``cooldown_s`` since the last action; down
    only to the largest recommendation over ``stabilization_s``, and not before
    ``scale_down_delay_s`` since the last action. Units: seconds; ``target_utilization`` is a
    fraction in (0, 1].
    """

    min_consumers: int = AUTOSCALE_MIN_CONSUMERS
    max_consumers: int = AUTOSCALE_MAX_CONSUMERS
    target_utilization: float = AUTOSCALE_TARGET_UTILIZATION
    interval_s: float = AUTOSCALE_INTERVAL_S
    catch_up_s: float = AUTOSCALE_CATCH_UP_S
    stabilization_s: float = AUTOSCALE_STABILIZATION_S
    cooldown_s: float = AUTOSCALE_COOLDOWN_S
    scale_down_delay_s: float = AUTOSCALE_SCALE_DOWN_DELAY_S

    def __post_init__(self) -> None:
        for name in ("min_consumers", "max_consumers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"Autoscale.{name} must be an integer >= 1, got {v!r}")
        if self.max_consumers < self.min_consumers:
            raise ConfigError(
                f"Autoscale.max_consumers ({self.max_consumers}) must be >= min_consumers "
                f"({self.min_consumers})"
            )
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.endswith("_consumers"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise ConfigError(f"Autoscale.{f.name} must be a number, got {v!r}")
            # Zero waits are allowed (no guard); a decision interval and a catch-up time are not.
            positive = f.name in ("interval_s", "catch_up_s", "target_utilization")
            if v < 0 or (positive and v == 0):
                raise ConfigError(f"Autoscale.{f.name} must be {'> 0' if positive else '>= 0'}, got {v!r}")
        if self.target_utilization > 1:
            raise ConfigError(
                f"Autoscale.target_utilization is a busy fraction in (0, 1], got {self.target_utilization!r}"
            )
        # The loop waits interval_s between decisions: a wait past the platform's time_t raises
        # (OverflowError) in the autoscaler's thread, which would then never decide.
        if self.interval_s > AUTOSCALE_MAX_INTERVAL_S:
            raise ConfigError(
                f"Autoscale.interval_s must be at most {AUTOSCALE_MAX_INTERVAL_S:g} s, got {self.interval_s!r}: "
                "to keep a fixed size, leave autoscale= out"
            )
        if self.scale_down_delay_s < self.cooldown_s:
            raise ConfigError(
                f"Autoscale.scale_down_delay_s ({self.scale_down_delay_s}) must be >= cooldown_s "
                f"({self.cooldown_s}): scaling down is meant to wait longer than scaling up"
            )


#: Split a partition whose input rate stays above this many times the mean partition's.
SPLITS_FACTOR = 3.0
#: ... for this long (seconds): a burst shorter than that is not worth a pause of the job.
SPLITS_WINDOW_S = 10.0
#: No split within this long of the last one (seconds): the rates right after a split still
#: mix the old map's, and each split pauses the job.
SPLITS_COOLDOWN_S = 60.0
#: Never more partitions than this (each one a lease, a queue per source and a state chain).
SPLITS_MAX_PARTITIONS = 64
#: How often the policy looks at the rates (seconds).
SPLITS_INTERVAL_S = 1.0
#: Never merge below this many partitions.
SPLITS_MIN_PARTITIONS = 1


@dataclass(frozen=True, kw_only=True)
class Splits:
    """Hot-range splits at runtime: ``run.start_splitter(rf.Splits(...))`` (off unless started).

    Every ``interval_s`` the driver reads each partition's ``rate_ratio`` (its input rate over
    the mean partition's, ``run.status()``), smooths it, and splits a partition whose ratio has
    stayed above ``factor`` for ``window_s``, at the median hash of its traffic, unless the map
    has ``max_partitions`` already or the last split was less than ``cooldown_s`` ago
    (docs/partitioning.md, "Splits at runtime"). With ``merge_below`` (off by default), two
    adjacent partitions whose ratios add up to less than it for ``window_s`` are merged (the
    job drains to a consistent cut first), down to ``min_partitions``. Units: seconds;
    ``factor`` > 1; ``merge_below`` < ``factor``.
    """

    factor: float = SPLITS_FACTOR
    window_s: float = SPLITS_WINDOW_S
    cooldown_s: float = SPLITS_COOLDOWN_S
    max_partitions: int = SPLITS_MAX_PARTITIONS
    interval_s: float = SPLITS_INTERVAL_S
    merge_below: float | None = None
    min_partitions: int = SPLITS_MIN_PARTITIONS

    def __post_init__(self) -> None:
        v = self.min_partitions
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"Splits.min_partitions must be an integer >= 1, got {v!r}")
        v = self.merge_below
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < self.factor
        ):
            raise ConfigError(
                f"Splits.merge_below must be None or a number in (0, factor={self.factor}), got {v!r}: "
                "a merged pair must stay below the ratio that would split it again"
            )
        v = self.max_partitions
        if isinstance(v, bool) or not isinstance(v, int) or v < 2:
            raise ConfigError(f"Splits.max_partitions must be an integer >= 2, got {v!r}")
        for name in ("factor", "window_s", "cooldown_s", "interval_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v < 0:
                raise ConfigError(f"Splits.{name} must be a number >= 0, got {v!r}")
        if self.factor <= 1:
            raise ConfigError(f"Splits.factor must be > 1 (a multiple of the mean rate), got {self.factor!r}")
        if self.interval_s == 0:
            raise ConfigError("Splits.interval_s must be > 0")
