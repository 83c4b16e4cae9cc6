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

from rayflow import ops as _ops
from rayflow._internal.runtime import JobSpec, Result, Run
from rayflow._internal.watermarks import EventTime
from rayflow.config import EngineConfig
from rayflow.errors import ConfigError
from rayflow.sinks import Collect, Sink
from rayflow.sources import Source

__all__ = ["Pipeline", "Result", "Run"]

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
    """

    def __init__(
        self,
        *,
        name: str,
        source: Source,
        key: str | Sequence[str],
        partitions: int = 16,
        operator: _ops.Operator | Sequence[_ops.Operator] | None = None,
        sink: Sink | None = None,
        consumers: int = 2,
        checkpoint_dir: str | os.PathLike = "checkpoints",
        checkpoint_interval_s: float | None = None,
        local_paths_shared: bool = False,
        config: EngineConfig | None = None,
        progress: bool | None = None,
        faults=None,
        event_time: str | None = None,
        max_out_of_orderness_s: float = 0.0,
        idle_timeout_s: float | None = 30.0,
    ):
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConfigError(
                f"name must be 1-100 letters, digits, '_', '.' or '-' (it names actors and "
                f"checkpoint folders), got {name!r}"
            )
        if not isinstance(source, Source):
            raise ConfigError(f"source must be an rf.sources source, got {source!r}")
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise ConfigError(f"partitions must be an integer >= 1, got {partitions!r}")
        if isinstance(consumers, bool) or not isinstance(consumers, int) or consumers < 1:
            raise ConfigError(f"consumers must be an integer >= 1, got {consumers!r}")
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
        keys = [key] if isinstance(key, str) else list(key)
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ConfigError(f"key must name at least one column, got {key!r}")
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
        for op in ops:
            group = op.group_columns
            if group is not None and not set(keys) <= set(group):
                raise ConfigError(
                    f"{op!r} must group by the pipeline key {keys} (and may add columns): "
                    "otherwise one group would span partitions"
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
        )

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
    def checkpoint_dir(self) -> str:
        return self._spec.checkpoint_dir

    @property
    def checkpoint_interval_s(self) -> float:
        return self._spec.config.checkpoint_interval_s

    @property
    def config(self) -> EngineConfig:
        return self._spec.config

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
        if self._spec.source.unbounded:
            raise ConfigError(
                f"the source {self._spec.source!r} is unbounded: the job never ends on its own, so "
                "run() would never return. Start it with run = pipeline.start(), watch it with "
                "run.status(), and end it with result = run.stop() (it drains, commits and returns "
                "the run's result; the next start resumes)"
            )
        return self.start().wait(timeout_s=timeout_s)

    def start(self) -> Run:
        """Start the job and return at once with a :class:`Run` handle."""
        return Run(self._spec)
