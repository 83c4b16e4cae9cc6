"""The public Pipeline: build a job, run it, resume it (DESIGN §10).

``Pipeline(...).run()`` blocks until a bounded source is exhausted and every
partition's final commit is recorded; ``start()`` returns a :class:`Run`
handle instead. Running again with the same ``name`` and ``checkpoint_dir``
resumes from the last commit: partitions already final are not touched,
the others restart from their committed state and positions.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import ray

from rayflow import ops as _ops
from rayflow._internal.chain import Chain
from rayflow._internal.checkpoint.catalog import catalog_path
from rayflow._internal.checkpoint.store import Store, join
from rayflow._internal.compat import schema_to_json
from rayflow._internal.consumer import ConsumerActor
from rayflow._internal.group.manager import GroupManager
from rayflow._internal.source_actor import SourceActor
from rayflow.config import EngineConfig
from rayflow.errors import ConfigError, PipelineFailedError, RayflowError
from rayflow.partitioning import PartitionMap, key_columns
from rayflow.sinks import Collect, Sink
from rayflow.sources import Source, Synthetic

__all__ = ["Pipeline", "Result", "Run"]

NAMESPACE = "rayflow"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_POLL_S = 0.05
_ACTOR_TIMEOUT_S = 120.0
#: How long a status poll waits for consumers; one that is slower is reported as missing.
_STATUS_WAIT_S = 1.0


@dataclass
class Result:
    """What a finished run hands back.

    ``output``: the output as one Arrow table for :class:`rf.sinks.Collect`
    (else ``None``). ``stats``: ``events`` (processed by this run),
    ``seconds`` (first read to last commit), ``events_per_s``, ``startup_s``,
    ``rebalances``, ``recoveries``, ``partitions``, ``consumers``.
    """

    output: pa.Table | None
    stats: dict = field(default_factory=dict)
    output_path: str | None = None


class Pipeline:
    """A keyed, partitioned, checkpointed stream job (see DESIGN §10 for an example)."""

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
        checkpoint_interval_s: float = 2.0,
        config: EngineConfig | None = None,
        progress: bool | None = None,
        faults=None,
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
        if not isinstance(checkpoint_interval_s, (int, float)) or checkpoint_interval_s <= 0:
            raise ConfigError(f"checkpoint_interval_s must be > 0 seconds, got {checkpoint_interval_s!r}")
        if sink is not None and not isinstance(sink, Sink):
            raise ConfigError(f"sink must be an rf.sinks sink, got {sink!r}")
        self.name = name
        self.source = source
        self.key = [key] if isinstance(key, str) else list(key)
        if not self.key:
            raise ConfigError("key must name at least one column")
        self.partitions = partitions
        self.ops = _ops.as_chain(operator)
        for op in self.ops:
            if isinstance(op, _ops.Aggregate) and not set(self.key) <= set(op.by):
                raise ConfigError(
                    f"rf.ops.Aggregate(by={op.by}) must group by the pipeline key {self.key} "
                    "(and may add columns): otherwise one group would span partitions"
                )
        self.sink = sink if sink is not None else Collect()
        self.consumers = consumers
        self.checkpoint_dir = os.fspath(checkpoint_dir)
        self.checkpoint_interval_s = float(checkpoint_interval_s)
        self.config = config or EngineConfig()
        self.progress = progress
        #: A ``rayflow.testing.FaultPlan`` (tests and benchmarks only).
        self.faults = faults

    @property
    def root(self) -> str:
        """This pipeline's folder under the checkpoint directory."""
        return join(self.checkpoint_dir, self.name)

    def run(self, *, timeout_s: float | None = None) -> Result:
        """Run to the end of a bounded source; blocks. Resumes from the last commit."""
        return self.start().wait(timeout_s=timeout_s)

    def start(self) -> Run:
        """Start the job and return at once with a :class:`Run` handle."""
        return Run(self)


def _unwrap(e: BaseException) -> BaseException:
    """The user-facing error inside a Ray task error, if it is one of ours."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, RayflowError):
        return cause
    return e


class Run:
    """A running pipeline: ``status()``, ``scale(consumers=)``, ``wait()``, ``stop()``."""

    def __init__(self, pipeline: Pipeline):
        self.p = p = pipeline
        t0 = time.monotonic()
        splits = p.source.splits()
        schema = p.source.schema
        key_columns(schema, p.key)
        if p.ops and isinstance(p.ops[0], _ops.Aggregate):
            p.ops[0].check_input(schema)
        self._total_rows = _total_rows(p.source)
        if not ray.is_initialized():
            ray.init(logging_level="WARNING", log_to_driver=True)
        self.map = PartitionMap.uniform(p.partitions)
        self.chain = Chain(p.ops)
        self._actors: list = []
        self._result: Result | None = None
        self._progress = p.progress if p.progress is not None else sys.stderr.isatty()
        meta = {
            "key": json.dumps(p.key),
            "partition_map": self.map.to_json(),
            "operators": json.dumps(self.chain.spec()),
            "splits": json.dumps([s.name for s in splits]),
            "input_schema": schema_to_json(schema),
        }
        sink_root = p.sink.root(pipeline_root=p.root)
        self.sink_store = Store(sink_root)
        _wait_name_free(f"{p.name}/manager")
        try:
            self.manager = GroupManager.options(
                name=f"{p.name}/manager",
                namespace=NAMESPACE,
                num_cpus=0,
                resources=p.config.manager_resources,
                max_concurrency=1000,
                max_restarts=-1,  # reloads from the catalog; consumers re-join and keep leases
                max_task_retries=-1,  # callers' in-flight calls go to the restarted actor
            ).remote(
                name=p.name,
                catalog_path=catalog_path(p.root),
                state_root=p.root,
                sink_root=sink_root,
                sink=p.sink,
                meta=meta,
                partition_map=self.map,
                config=p.config,
                source_names=[f"{p.name}/source-{i}" for i in range(self._num_sources(splits))],
                faults=p.faults,
            )
        except ValueError as e:
            raise ConfigError(
                f"a pipeline named {p.name!r} is already running on this Ray cluster; stop it "
                "first or choose another name"
            ) from e
        self._actors.append(self.manager)
        try:
            info = self._get(self.manager.ready.remote())
        except BaseException:
            self._teardown()
            raise
        n_src = self._num_sources(splits)
        # A restartable actor's constructor arguments must outlive its first start: put them
        # in the object store here and hold the references for the whole run.
        self._pinned = [ray.put(splits[i::n_src]) for i in range(n_src)]
        self.sources = [
            SourceActor.options(
                name=f"{p.name}/source-{i}",
                namespace=NAMESPACE,
                num_cpus=p.config.source_num_cpus,
                resources=p.config.source_resources,
                max_restarts=-1,  # replays from the lowest committed position of its partitions
                max_task_retries=-1,
            ).remote(
                index=i,
                splits=self._pinned[i],
                committed=info["positions"],
                key=p.key,
                partition_map=self.map,
                config=p.config,
                manager_name=f"{p.name}/manager",
                faults=p.faults,
            )
            for i in range(n_src)
        ]
        self._actors.extend(self.sources)
        self._get(self.manager.set_sources.remote(self.sources))
        self._sink_root = sink_root
        self.consumers: dict[str, object] = {}
        self.desired_consumers = p.consumers
        self._next_consumer = 0
        self._add_consumers(p.consumers)
        self._get(self.manager.activate.remote())
        status = self._get(self.manager.status.remote())
        self._rows_at_start = sum(x["committed_rows"] for x in status["partitions"])
        self.startup_s = time.monotonic() - t0
        self._t_read = time.monotonic()
        self._get([s.run.remote() for s in self.sources])
        self._last_check = 0.0

    # ------------------------------------------------------------------ helpers
    def _num_sources(self, splits) -> int:
        return max(1, min(self.p.config.num_sources, len(splits)))

    def _get(self, refs, timeout: float = _ACTOR_TIMEOUT_S):
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.RayTaskError as e:
            raise _unwrap(e) from None

    def _add_consumers(self, n: int) -> None:
        p = self.p
        new = []
        for _ in range(n):
            member = f"consumer-{self._next_consumer}"
            self._next_consumer += 1
            actor = ConsumerActor.options(
                name=f"{p.name}/{member}",
                namespace=NAMESPACE,
                num_cpus=p.config.consumer_num_cpus,
                resources=p.config.consumer_resources,
                max_concurrency=1000,
                scheduling_strategy="SPREAD",
            ).remote(
                pipeline=p.name,
                member_id=member,
                manager=self.manager,
                sources=self.sources,
                chain=self.chain,
                key=p.key,
                state_root=p.root,
                sink_root=self._sink_root,
                map_version=self.map.version,
                checkpoint_interval_s=p.checkpoint_interval_s,
                config=p.config,
                faults=p.faults,
            )
            self.consumers[member] = actor
            self._actors.append(actor)
            new.append(actor)
        self._get([a.start.remote() for a in new])

    # ------------------------------------------------------------------ public
    def status(self) -> dict:
        """The job now, as plain data.

        ``partitions``: per partition its owner, lease epoch, lease state, processed
        and committed rows, queued rows (lag), rows/s, and whether it is final;
        ``members``; ``consumers``: per live consumer its busy seconds, rows
        processed and failed commit attempts; ``blocked_s``: per partition, the
        time the source waited on its full queue; ``rows_read``,
        ``processed_rows``, ``rebalances``, ``recoveries``, ``done``.
        """
        st = self._get(self.manager.status.remote())
        src = self._get([s.stats.remote() for s in self.sources])
        for part in st["partitions"]:
            i = part["partition"]
            part["queued_rows"] = sum(s["queued_rows"][i] for s in src)
            part["blocked_s"] = sum(s["blocked_s"][i] for s in src)
        st["rows_read"] = sum(s["rows_read"] for s in src)
        st["processed_rows"] = sum(x["processed_rows"] for x in st["partitions"])
        keys = ("busy_s", "rows_processed", "commit_failures", "last_commit_error")
        st["consumers"] = {n: {k: c[k] for k in keys} for n, c in self._poll_consumers().items()}
        return st

    def scale(self, *, consumers: int) -> None:
        """Change the number of consumers while the job runs (graceful on the way down)."""
        if isinstance(consumers, bool) or not isinstance(consumers, int) or consumers < 1:
            raise ConfigError(f"consumers must be an integer >= 1, got {consumers!r}")
        self.desired_consumers = consumers
        self._poll_consumers()  # forget (and replace) consumers that died meanwhile
        cur = len(self.consumers)
        if consumers > cur:
            self._add_consumers(consumers - cur)
        leaving = sorted(self.consumers, key=lambda m: int(m.split("-")[1]))[consumers:]
        actors = [self.consumers.pop(m) for m in leaving]
        for ref in [a.stop.remote() for a in actors]:  # graceful: each commits, then leaves
            try:
                self._get(ref)
            except ray.exceptions.RayActorError:
                pass  # died on its way out: the manager recovers its partitions
        for a in actors:
            ray.kill(a)

    def _poll_consumers(self) -> dict[str, dict]:
        """Status of every consumer that answers within a moment.

        A consumer that does not answer (frozen, overloaded) is skipped, not
        waited for: its liveness is the manager's business (session expiry).
        A dead one is replaced, so the group keeps its size; a consumer whose
        processing failed raises that failure here.
        """
        refs = {c.status.remote(): name for name, c in self.consumers.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=_STATUS_WAIT_S)
        out, dead = {}, 0
        for ref in ready:
            name = refs[ref]
            try:
                out[name] = self._get(ref)
            except ray.exceptions.RayActorError:
                # Dead: the manager has already moved its partitions to the survivors;
                # a replacement joins and takes a fair share back.
                self.consumers.pop(name, None)
                dead += 1
            except RayflowError:
                raise
            except Exception as e:
                raise PipelineFailedError(f"consumer {name!r} failed: {e}") from e
        if dead:
            self._add_consumers(min(dead, self.desired_consumers - len(self.consumers)))
        return out

    def wait(self, *, timeout_s: float | None = None) -> Result:
        """Block until done (or ``timeout_s`` passes: then ``TimeoutError``, the job keeps running)."""
        if self._result is not None:
            return self._result
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                st = self._get(self.manager.status.remote())
                if st["done"]:
                    break
                now = time.monotonic()
                if now - self._last_check > 0.5:
                    self._last_check = now
                    st = self.status()  # also replaces dead consumers and raises their errors
                    if self._progress:
                        self._draw(st)
                if deadline is not None and now > deadline:
                    raise TimeoutError(f"pipeline {self.p.name!r} not done after {timeout_s} s")
                time.sleep(_POLL_S)
        except TimeoutError:
            raise
        except BaseException:
            self._teardown()
            raise
        seconds = time.monotonic() - self._t_read
        files = self._get(self.manager.output_files.remote())
        events = sum(x["committed_rows"] for x in st["partitions"]) - self._rows_at_start
        stats = {
            "events": events,
            "seconds": seconds,
            "events_per_s": events / seconds if seconds > 0 else 0.0,
            "startup_s": self.startup_s,
            "rebalances": st["rebalances"],
            "recoveries": st["recoveries"],
            "partitions": self.p.partitions,
            "consumers": len(self.consumers),
        }
        output = None
        if isinstance(self.p.sink, Collect):
            tables = [self.sink_store.read_parquet(f) for f in files]
            output = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
        self._teardown()
        if self._progress:
            print(
                f"\r[{self.p.name}] done: {events:,} events in {seconds:.2f} s "
                f"({stats['events_per_s'] / 1e6:.2f}M events/s)" + " " * 20,
                file=sys.stderr,
            )
        path = getattr(self.p.sink, "path", None) or self._sink_root
        self._result = Result(output=output, stats=stats, output_path=path)
        return self._result

    def _draw(self, st: dict) -> None:
        done = st["processed_rows"]
        el = max(time.monotonic() - self._t_read, 1e-9)
        total = f"/{self._total_rows:,}" if self._total_rows else ""
        lag = sum(x["queued_rows"] for x in st["partitions"])
        print(
            f"\r[{self.p.name}] {done:,}{total} events  {done / el / 1e6:.2f}M/s  "
            f"lag {lag:,}  consumers {len(st['members'])}   ",
            end="",
            file=sys.stderr,
            flush=True,
        )

    def stop(self) -> None:
        """Stop: consumers commit what they have, then every actor goes. A new run resumes."""
        try:
            for ref in [c.stop.remote() for c in self.consumers.values()]:
                try:
                    self._get(ref)
                except ray.exceptions.RayActorError:
                    pass  # already dead: nothing of its own to commit
        finally:
            self._teardown()

    def _teardown(self) -> None:
        if not self._actors:
            return
        try:
            ray.get(self.manager.close.remote(), timeout=10)
        except Exception:
            pass
        for a in self._actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        self._actors = []


def _wait_name_free(name: str, timeout_s: float = 10.0) -> None:
    """A killed named actor frees its name a moment later; wait for that, briefly.

    A live actor of that name (another running pipeline) keeps it: then the
    creation fails with a clear error.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            handle = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        try:
            ray.get(handle.__ray_ready__.remote(), timeout=1.0)
            return  # alive: let the creation report the conflict
        except Exception:
            time.sleep(0.1)


def _total_rows(source: Source) -> int | None:
    if isinstance(source, Synthetic):
        return source.events
    return None
