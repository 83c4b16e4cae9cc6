"""The public Pipeline: a job spec, validated; nothing that runs (DESIGN §9, §10).

``Pipeline(...).run()`` blocks until a bounded source is exhausted and every
partition's final commit is recorded; ``start()`` returns a :class:`Run`
handle instead. Running again with the same ``name`` and ``checkpoint_dir``
resumes from the last commit: partitions already final are not touched,
the others restart from their committed state and positions.

The driver that runs a job lives in ``rayflow._internal.runtime``; a
Pipeline hands it a plain, frozen spec.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from rayflow import ops as _ops
from rayflow._internal.chain import Chain
from rayflow._internal.checkpoint.store import join
from rayflow._internal.runtime import JobSpec, Result, Run
from rayflow._internal.stages import StagedRun
from rayflow._internal.tiers import resolve as resolve_tiers
from rayflow._internal.watermarks import EventTime
from rayflow.config import Autoscale, EngineConfig
from rayflow.errors import ConfigError, TierError
from rayflow.partitioning import PartitionMap, key_columns
from rayflow.sinks import Collect, Sink
from rayflow.sinks import Parquet as ParquetSink
from rayflow.sources import Source
from rayflow.sources.inputs import Input, Inputs
from rayflow.sources.upstream import Upstream
from rayflow.tiers import Tier

__all__ = ["Pipeline", "Result", "Run", "Stage", "StagedRun"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class Pipeline:
    """A keyed, partitioned, checkpointed stream job (see DESIGN §10 for an example).

    Every argument is checked here; the input (its columns and their types,
    against the key and every operator) is checked when the job starts, before
    any actor does.

    ``checkpoint_dir`` (and a sink's path) may be relative: it is resolved
    against the working directory of the process that starts the job. On a
    Ray cluster of more than one node it must be storage every node reaches:
    an ``s3://`` (or other ``pyarrow.fs``) URI, or a network filesystem
    mounted at the same path on every node. A local path there is refused
    with a :class:`ConfigError` unless ``local_paths_shared=True`` says it is
    such a filesystem. ``checkpoint_interval_s`` sets
    ``EngineConfig.checkpoint_interval_s``.

    **Event time** (DESIGN §11). ``event_time`` names the column (int64
    milliseconds since the epoch, or an Arrow timestamp) that windows
    (``rf.ops.Window``) and dedup (``rf.ops.Dedup``) use unless they name
    their own. Each split's watermark is the largest event time read from it
    minus ``max_out_of_orderness_s``; a partition's watermark is the minimum
    over its splits, skipping a split that has had no rows for
    ``idle_timeout_s`` (``None``: never skip; then one quiet Kafka partition
    holds every window open) once the partition has processed all of it, and
    splits that ended. Watermarks move with the rows processed (never ahead of
    them), never go back, are committed with the positions and restored, and
    ``run.status()`` shows each partition's ``watermark_ms`` and
    ``event_time_lag_s`` (now minus the watermark). Caveat: a split that
    comes back after being skipped as idle may bring rows that are late by
    then (the window's ``late=`` policy decides what happens to them).

    **Priority tiers** (docs/tiers.md). ``tiers``: a list of :class:`rf.Tier`
    ranking some partitions (by number or by the keys they hold) above the
    rest, optionally with dedicated consumers; partitions no tier names are in
    the lowest tier, ``"default"``. Checked here (:class:`TierError`). A tier
    is scheduling only (assignment, the consumers' order, the sources' memory):
    results are the same with or without, and a resume may change them.
    **Autoscaling** (docs/autoscaling.md). ``autoscale=rf.Autoscale(min_consumers=1,
    max_consumers=8, ...)`` sizes the consumer group while the job runs, from the input rate,
    the consumers' true processing rate (rows per busy second) and the lag. The job starts with
    ``consumers`` if given (it must lie within the bounds), else with ``min_consumers``.
    Every scaling action is an ``autoscale`` event in the catalog, ``run.status()["autoscale"]``
    shows the recent decisions. Not for a pipeline of several ``stages`` (yet).
    """

    def __init__(
        self,
        *,
        name: str,
        source: Source | Sequence[Input],
        key: str | Sequence[str] | None = None,
        partitions: int = 16,
        operator: _ops.Operator | Sequence[_ops.Operator] | None = None,
        sink: Sink | None = None,
        consumers: int | None = None,
        checkpoint_dir: str | os.PathLike = "checkpoints",
        checkpoint_interval_s: float | None = None,
        local_paths_shared: bool = False,
        config: EngineConfig | None = None,
        progress: bool | None = None,
        faults=None,
        event_time: str | None = None,
        max_out_of_orderness_s: float = 0.0,
        idle_timeout_s: float | None = 30.0,
        stages: Sequence[Stage] | None = None,
        tiers: Sequence[Tier] | None = None,
        autoscale: Autoscale | None = None,
    ):
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConfigError(
                f"name must be 1-100 letters, digits, '_', '.' or '-' (it names actors and "
                f"checkpoint folders), got {name!r}"
            )
        if isinstance(source, (list, tuple)):
            source = Inputs(source, key=None if key is None else ([key] if isinstance(key, str) else key))
        if not isinstance(source, Source):
            raise ConfigError(
                f"source must be an rf.sources source (or a list of rf.sources.Input), got {source!r}"
            )
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise ConfigError(f"partitions must be an integer >= 1, got {partitions!r}")
        consumers = _initial_consumers(consumers, autoscale, staged=bool(stages))
        if autoscale is not None and autoscale.min_consumers > partitions:
            # A consumer owns whole partitions: past their count the rest would sit idle.
            raise ConfigError(
                f"Autoscale(min_consumers={autoscale.min_consumers}) is more than the job's "
                f"{partitions} partitions: the extra consumers would have nothing to own; lower "
                "min_consumers or raise partitions"
            )
        if sink is not None and not isinstance(sink, Sink):
            raise ConfigError(f"sink must be an rf.sinks sink, got {sink!r}")
        if not isinstance(local_paths_shared, bool):
            raise ConfigError(f"local_paths_shared must be True or False, got {local_paths_shared!r}")
        if config is not None and not isinstance(config, EngineConfig):
            raise ConfigError(f"config must be an rf.EngineConfig, got {config!r}")
        config = config or EngineConfig()
        if checkpoint_interval_s is not None:
            if (
                isinstance(checkpoint_interval_s, bool)
                or not isinstance(checkpoint_interval_s, (int, float))
                or checkpoint_interval_s <= 0
            ):
                raise ConfigError(f"checkpoint_interval_s must be > 0 seconds, got {checkpoint_interval_s!r}")
            config = dataclasses.replace(config, checkpoint_interval_s=float(checkpoint_interval_s))
        if isinstance(source, Inputs):
            # Each input hashes by its own key (the source actor reads it from the split); the
            # job's key records them all, so a resume with another key of any input is refused.
            keys = [f"{name}:{','.join(k)}" for name, k in source.keys.items()]
            groupable = [set(k) for k in source.keys.values()]
        else:
            keys = [key] if isinstance(key, str) else list(key or [])
            if not keys or not all(isinstance(k, str) and k for k in keys):
                raise ConfigError(f"key must name at least one column, got {key!r}")
            groupable = [set(keys)]
        ops = _ops.as_chain(operator)
        clock = None
        if event_time is not None:
            clock = EventTime(
                column=event_time,
                max_out_of_orderness_s=max_out_of_orderness_s,
                idle_timeout_s=idle_timeout_s,
            )
        elif any(op.uses_event_time for op in ops):
            named = next(op for op in ops if op.uses_event_time)
            raise ConfigError(
                f"{named!r} works on event time, but the pipeline names no event_time column: give "
                "rf.Pipeline(event_time='<column>', max_out_of_orderness_s=...) (its watermark "
                "decides when windows close)"
            )
        ops = [op.with_event_time(event_time) for op in ops]
        if tiers is not None and (isinstance(tiers, (str, bytes, Tier)) or not isinstance(tiers, Sequence)):
            raise ConfigError(f"tiers= takes a list of rf.Tier, got {tiers!r}")
        tiers = tuple(tiers or ())
        if tiers:
            if stages:
                raise ConfigError(
                    "tiers= applies to a job of one stage: each stage partitions by its own key, so a "
                    "tier's partitions would mean different rows in each; run the stage that needs "
                    "them as its own pipeline"
                )
            # Checked against the map a job starts with; each start resolves them again (Run).
            if autoscale is not None:
                _check_tiers_fit(tiers, partitions, autoscale)
            resolve_tiers(tiers, PartitionMap.uniform(partitions), consumers=consumers)
        joined = False
        for op in ops:
            if isinstance(source, Inputs) and hasattr(op, "check_partitioning"):
                op.check_partitioning(source.keys)  # a join's sides must meet in one partition
                joined = True
            group = op.group_columns
            # Before a join, every input's rows must meet their group in one partition (each
            # input is partitioned by its own key); after it, a joined row's sides share a key.
            meets = any if joined else all
            if group is not None and not meets(k <= set(group) for k in groupable):
                raise ConfigError(
                    f"{op!r} must group by the pipeline key {keys} (every input's key, before a "
                    "join; and may add columns): otherwise one group would span partitions"
                )
        self._spec = JobSpec(
            name=name,
            source=source,
            key=tuple(keys),
            partitions=partitions,
            operators=tuple(ops),
            sink=sink if sink is not None else Collect(),
            consumers=consumers,
            checkpoint_dir=os.fspath(checkpoint_dir),
            local_paths_shared=local_paths_shared,
            config=config,
            progress=progress,
            faults=faults,
            event_time=clock,
            tiers=tiers,
            autoscale=autoscale,
        )
        self._stages: list[Pipeline] = []
        if stages:
            common = dict(
                checkpoint_dir=checkpoint_dir,
                checkpoint_interval_s=checkpoint_interval_s,
                local_paths_shared=local_paths_shared,
                config=config,
                progress=progress,
                faults=faults,
                max_out_of_orderness_s=max_out_of_orderness_s,
                idle_timeout_s=idle_timeout_s,
            )
            self._stages = _stage_pipelines(
                name, list(stages), source=source, key=key, partitions=partitions, operator=operator,
                sink=sink, consumers=consumers, event_time=event_time, common=common,
            )  # fmt: skip
            self._spec = self._stages[0]._spec

    # Read-only views of the spec (the job cannot change once built).
    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def source(self) -> Source:
        return self._spec.source

    @property
    def key(self) -> list[str]:
        return list(self._spec.key)

    @property
    def partitions(self) -> int:
        return self._spec.partitions

    @property
    def ops(self) -> list[_ops.Operator]:
        return list(self._spec.operators)

    @property
    def sink(self) -> Sink:
        return self._spec.sink

    @property
    def consumers(self) -> int:
        return self._spec.consumers

    @property
    def tiers(self) -> list[Tier]:
        """The priority tiers (docs/tiers.md); empty: every partition in ``"default"``."""
        return list(self._spec.tiers)

    @property
    def checkpoint_dir(self) -> str:
        return self._spec.checkpoint_dir

    @property
    def checkpoint_interval_s(self) -> float:
        return self._spec.config.checkpoint_interval_s

    @property
    def config(self) -> EngineConfig:
        return self._spec.config

    @property
    def output_schema(self) -> pa.Schema | None:
        """The schema of what the job emits (of its last stage), or ``None`` when an operator
        hides it (a ``Map`` without ``output_schema=``). Checks the input on the way."""
        if self._stages:
            return self._stages[-1].output_schema
        s = self._spec
        return Chain(list(s.operators)).for_input(unbounded=s.source.unbounded).check_input(s.source.schema)

    @property
    def emits_upserts(self) -> bool:
        """Whether the output is an upsert stream (new values of keys, each commit): an
        ``Aggregate`` over an unbounded input."""
        if self._stages:
            return self._stages[-1].emits_upserts
        s = self._spec
        ops = Chain(list(s.operators)).for_input(unbounded=s.source.unbounded).ops
        return any(op.emits_upserts for op in ops)

    @property
    def stages(self) -> list[Pipeline]:
        """The stages, as pipelines of their own (``[self]`` for a job of one stage)."""
        return list(self._stages) or [self]

    def __repr__(self) -> str:
        s = self._spec
        return (
            f"rf.Pipeline(name={s.name!r}, key={list(s.key)}, partitions={s.partitions}, "
            f"operators={list(s.operators)}, sink={s.sink!r}, checkpoint_dir={s.checkpoint_dir!r})"
        )

    def run(self, *, timeout_s: float | None = None) -> Result:
        """Run to the end of a bounded source; blocks. Resumes from the last commit.

        An unbounded source (``Source.unbounded``: a Kafka topic, a watched
        directory, a paced ``Synthetic``) has no end to run to: this raises
        :class:`ConfigError`; use ``run = pipeline.start()``, then ``run.stop()``.
        """
        if self.stages[0]._spec.source.unbounded:
            raise ConfigError(
                f"the source {self._spec.source!r} is unbounded: the job never ends on its own, so "
                "run() would never return. Start it with run = pipeline.start(), watch it with "
                "run.status(), and end it with result = run.stop() (it drains, commits and returns "
                "the run's result; the next start resumes)"
            )
        return self.start().wait(timeout_s=timeout_s)

    def start(self) -> Run | StagedRun:
        """Start the job and return at once with a :class:`Run` handle (a :class:`StagedRun`
        for a job of several stages)."""
        if self._stages:
            return StagedRun([p._spec for p in self._stages])
        return Run(self._spec)


#: Consumers of a job that names none and is not autoscaled.
DEFAULT_CONSUMERS = 2


def _initial_consumers(consumers: int | None, autoscale: Autoscale | None, *, staged: bool) -> int:
    """The consumers a job starts with: ``consumers`` (default :data:`DEFAULT_CONSUMERS`); an
    autoscaled job starts with ``consumers`` when given (within the autoscaler's bounds), else
    with ``min_consumers``, and the autoscaler takes it from there."""
    if consumers is not None and (
        isinstance(consumers, bool) or not isinstance(consumers, int) or consumers < 1
    ):
        raise ConfigError(f"consumers must be an integer >= 1, got {consumers!r}")
    if autoscale is None:
        return DEFAULT_CONSUMERS if consumers is None else consumers
    if not isinstance(autoscale, Autoscale):
        raise ConfigError(
            f"autoscale must be an rf.Autoscale(min_consumers=..., max_consumers=...), got {autoscale!r}"
        )
    if staged:
        raise ConfigError(
            "autoscale= does not apply to a pipeline of several stages yet: size each stage with "
            "rf.Stage(consumers=...), or run the stages as pipelines of their own"
        )
    if consumers is None:
        return autoscale.min_consumers
    if not autoscale.min_consumers <= consumers <= autoscale.max_consumers:
        raise ConfigError(
            f"consumers={consumers} is outside the autoscaler's bounds [{autoscale.min_consumers}, "
            f"{autoscale.max_consumers}]: start within them, or leave consumers out to start with "
            "min_consumers"
        )
    return consumers


def _check_tiers_fit(tiers: tuple, partitions: int, autoscale: Autoscale) -> None:
    """The autoscaler may shrink the group to ``min_consumers``: the tiers' dedicated consumers
    (and a shared one for the other partitions) must fit in that, else a scale-down would take
    a tier's dedicated consumers away (the tier would fall back to the shared ones)."""
    # Checked here against min_consumers, not against a count resolve() would blame on consumers=.
    table = resolve_tiers(tiers, PartitionMap.uniform(partitions), consumers=2**31)
    dedicated = sum(table.dedicated)
    need = dedicated + (1 if table.needs_shared else 0)
    if autoscale.min_consumers < need:
        shared = " and one for the partitions no dedicated consumer serves" if table.needs_shared else ""
        raise TierError(
            f"the tiers ask for {dedicated} dedicated consumers{shared}, but the autoscaler may shrink "
            f"the group to min_consumers={autoscale.min_consumers}: raise Autoscale.min_consumers to at "
            f"least {need}, or lower dedicated_consumers"
        )


@dataclass(frozen=True, kw_only=True)
class Stage:
    """A further stage of a pipeline: ``rf.Pipeline(..., stages=[rf.Stage(key="category", ...)])``.

    The pipeline's own ``source``, ``key`` and ``operator`` are its first
    stage; each :class:`Stage` reads what the stage before it publishes
    (``rf.sources.Upstream``), repartitioned by its own ``key``, and runs its
    ``operator`` (a list runs as a chain); the last one writes to the
    pipeline's ``sink``. ``partitions`` and ``consumers`` default to the
    pipeline's; ``event_time`` names this stage's event-time column (the
    watermark settings are the pipeline's).
    """

    key: str | Sequence[str]
    operator: _ops.Operator | Sequence[_ops.Operator] | None = None
    partitions: int | None = None
    consumers: int | None = None
    event_time: str | None = None


def exchange_path(checkpoint_dir: str | os.PathLike, stage_name: str) -> str:
    """Where a stage publishes for the next one: its Parquet sink, under its checkpoint folder."""
    return join(os.fspath(checkpoint_dir), stage_name, "exchange")


def _stage_pipelines(
    name: str, stages: list, *, source, key, partitions, operator, sink, consumers, event_time, common: dict
) -> list[Pipeline]:
    """The pipelines of a staged job: ``name`` first, then ``name.1``, ``name.2``, ...; each
    publishes to its exchange directory, the last one to ``sink``."""
    if not all(isinstance(st, Stage) for st in stages):
        raise ConfigError(f"stages= takes a list of rf.Stage(key=..., operator=...), got {stages!r}")
    ck = common["checkpoint_dir"]
    # Tests give each stage its own fault plan: faults=[plan of stage 0, plan of stage 1, ...].
    faults = common.pop("faults")
    plans = list(faults) if isinstance(faults, (list, tuple)) else [faults] * (len(stages) + 1)
    out = [
        Pipeline(
            name=name, source=source, key=key, partitions=partitions, operator=operator,
            sink=ParquetSink(exchange_path(ck, name)), consumers=consumers, event_time=event_time,
            faults=plans[0], **common,
        )
    ]  # fmt: skip
    for i, st in enumerate(stages, 1):
        stage_name = f"{name}.{i}"
        last = i == len(stages)
        out.append(
            Pipeline(
                name=stage_name, source=Upstream(out[-1]), key=st.key,
                partitions=st.partitions or partitions, operator=st.operator,
                sink=sink if last else ParquetSink(exchange_path(ck, stage_name)),
                consumers=st.consumers or consumers, event_time=st.event_time, faults=plans[i], **common,
            )
        )  # fmt: skip
        # Checked now, not once the upstream's actors run: the stage's key and operators against
        # what the stage before it emits.
        key_columns(out[-1].source.schema, [st.key] if isinstance(st.key, str) else list(st.key))
        _ = out[-1].output_schema  # runs check_input of each operator
    return out
