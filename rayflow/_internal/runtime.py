"""The driver: start a job, watch it, scale it, stop it (DESIGN §9).

:class:`Run` starts a job from a :class:`JobSpec` (the plain, validated spec
that the public ``Pipeline`` hands over; this module never imports
``Pipeline``) in named steps, each a method, in this order:

1. **resolve paths** (:func:`resolve_paths`): the checkpoint directory and
   the sink path become absolute in the driver's working directory (URIs are
   left as they are); every actor gets them resolved, so none depends on its
   own working directory.
2. **check input** (:func:`check_input`): the splits, the key columns, and
   every operator against the input's schema (types included), before
   anything starts.
3. **check storage** (:func:`check_storage`): on a multi-node cluster a
   node-local checkpoint directory or sink path is refused, unless the user
   says it is shared.
4. **write the job file** (``_internal/jobfile.py``): what the restartable
   actors load at start and at every restart.
5. **start the manager**: it checks the resume record (``compat.JobMeta``)
   against the catalog and repairs what a crash left.
6. **start the sources**, 7. **start the consumers** (they join the group),
8. **activate** (the first assignment, once the consumers are in),
9. **start reading**.

If a step fails, the actors started so far are stopped and the error is
raised as it is.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import ray

from rayflow._internal import naming
from rayflow._internal.autoscaler import Autoscaler
from rayflow._internal.chain import Chain, operator_error
from rayflow._internal.checkpoint.catalog import catalog_path
from rayflow._internal.checkpoint.commit import output_stream
from rayflow._internal.checkpoint.store import Store, is_remote, join
from rayflow._internal.combine import combiner_for
from rayflow._internal.compat import JobMeta
from rayflow._internal.consumer import ConsumerActor
from rayflow._internal.group.manager import GroupManager
from rayflow._internal.jobfile import JobFile, delete_job_files, write_job_file
from rayflow._internal.lag import add_lag
from rayflow._internal.source_actor import SourceActor
from rayflow._internal.splits import merge_map, split_map, split_point
from rayflow._internal.splitter import Splitter
from rayflow._internal.tiers import check_keys as check_tier_keys
from rayflow._internal.tiers import resolve as resolve_tiers
from rayflow._internal.watermarks import EventTime, check_event_time_column
from rayflow.config import Autoscale, EngineConfig, Splits, auto_num_sources
from rayflow.errors import (
    ConfigError,
    IncompatibleCheckpointError,
    MissingSplitsError,
    PipelineFailedError,
    RayflowError,
    RepartitionError,
)
from rayflow.ops import Operator
from rayflow.partitioning import PartitionMap, key_columns
from rayflow.sinks import Sink
from rayflow.sources import Parquet, Source, Split, Synthetic
from rayflow.sources.inputs import Inputs

logger = logging.getLogger(__name__)

_POLL_S = 0.05
_ACTOR_TIMEOUT_S = 120.0
#: How long a status poll waits for consumers; one that is slower is reported as missing.
_STATUS_WAIT_S = 1.0


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """A job as the public ``Pipeline`` validated it: plain values, nothing that runs."""

    name: str
    source: Source
    key: tuple[str, ...]
    partitions: int
    operators: tuple[Operator, ...]
    sink: Sink
    consumers: int
    #: As the user gave it (relative paths are resolved at start, in the driver).
    checkpoint_dir: str
    #: The user says local paths are on storage every node reaches (see :func:`check_storage`).
    local_paths_shared: bool = False
    config: EngineConfig = field(default_factory=EngineConfig)
    progress: bool | None = None
    #: A ``rayflow.testing.FaultPlan`` (tests and benchmarks only).
    faults: object = None
    #: The event-time column and watermark strategy (``watermarks.EventTime``), or ``None``.
    event_time: EventTime | None = None
    #: Priority tiers (``rf.Tier``, docs/tiers.md), resolved against the map at each start.
    tiers: tuple = ()
    #: Autoscaling of the consumer group (``rayflow.config.Autoscale``), or ``None``: fixed size.
    autoscale: Autoscale | None = None


@dataclass
class Result:
    """What a finished (or stopped) run hands back.

    ``output``: the output as one Arrow table for :class:`rf.sinks.Collect`
    (else ``None``). ``stats``: ``events`` (committed by this run),
    ``seconds`` (first read to last commit), ``events_per_s``, ``startup_s``,
    ``rebalances``, ``recoveries``, ``partitions``, ``consumers``, ``sources``, and
    ``stopped`` (True when ``stop()`` ended the run, False when the input
    ended). ``output_path``: where the output is (absolute, or a URI).
    """

    output: pa.Table | None
    stats: dict = field(default_factory=dict)
    output_path: str | None = None


# ----------------------------------------------------------------------------- start steps (pure)


@dataclass(frozen=True)
class Paths:
    """A job's locations, resolved: absolute local paths or URIs."""

    checkpoint_dir: str
    #: ``<checkpoint_dir>/<name>``: state files, catalog, job files, Collect's output.
    root: str
    catalog: str
    sink_root: str
    #: What ``Result.output_path`` reports.
    output_path: str
    #: Side streams of the chain (``Chain.side_sinks``) -> their sinks' resolved roots.
    side_roots: dict = field(default_factory=dict)


def absolute(path: str, cwd: str | None = None) -> str:
    """``path`` made absolute against ``cwd`` (default: this process's); a URI is left as it is."""
    if "://" in path:
        return path
    path = os.path.expanduser(path)
    return os.path.normpath(os.path.join(cwd or os.getcwd(), path))


def resolve_paths(spec: JobSpec, cwd: str | None = None) -> Paths:
    """Step 1: resolve the checkpoint directory and the sink's path against the driver's cwd."""
    ck = absolute(spec.checkpoint_dir, cwd)
    root = join(ck, spec.name)
    sink_root = absolute(spec.sink.root(pipeline_root=root), cwd)
    path = getattr(spec.sink, "path", None)
    sides = Chain(list(spec.operators)).side_sinks
    side_roots = {
        stream: absolute(sink.root(pipeline_root=join(root, "side", stream)), cwd)
        for stream, sink in sides.items()
    }
    _check_apart({"the sink": sink_root, **{f"the side stream {s}": r for s, r in side_roots.items()}})
    return Paths(
        checkpoint_dir=ck,
        root=root,
        catalog=catalog_path(root),
        sink_root=sink_root,
        output_path=absolute(path, cwd) if path else sink_root,
        side_roots=side_roots,
    )


def _check_apart(roots: dict[str, str]) -> None:
    """Refuse sinks whose directories are the same or nested: each publishes by moving files out
    of its own pending area, and a commit's outputs of two streams share a name."""
    items = sorted(roots.items(), key=lambda kv: kv[1])
    for i, (a, ra) in enumerate(items):
        for b, rb in items[i + 1 :]:
            if rb.rstrip("/") == ra.rstrip("/") or rb.startswith(ra.rstrip("/") + "/"):
                raise ConfigError(
                    f"{a} and {b} write to the same directory ({ra} and {rb}): their files would "
                    "overwrite each other. Give each its own directory (e.g. late_sink="
                    "rf.sinks.Parquet('out/late') beside rf.sinks.Parquet('out/windows'))"
                )


def check_input(spec: JobSpec) -> tuple[list[Split], pa.Schema]:
    """Step 2: the splits and schema of the input, checked against the key and every operator."""
    splits = spec.source.splits()
    schema = spec.source.schema
    inputs = spec.source.inputs if isinstance(spec.source, Inputs) else None
    if inputs is None:
        key_columns(schema, list(spec.key))  # (the union of inputs checked each input's key)
    if spec.event_time is not None:
        for what, s in [(f"the input {i.name!r}", i.schema) for i in inputs or []] or [("the input", schema)]:
            check_event_time_column(s, spec.event_time.column, what=f"the pipeline's event_time ({what})")
    # As it will run: an Aggregate over a live input emits changes (with ``_version``).
    Chain(list(spec.operators)).for_input(unbounded=spec.source.unbounded).check_input(schema)
    combiner_for(
        spec.operators,
        key=spec.key,
        event_time=spec.event_time,
        splits=splits,
        multi_input=inputs is not None,
    )
    return splits, schema


def projected_columns(spec: JobSpec, schema: pa.Schema) -> list[str] | None:
    """The input columns the job uses, in the schema's order, or ``None``: all of them, or not
    known (pure).

    The operators after the first see only its output, which depends only on the columns it
    uses (:meth:`Operator.columns_used`): so those, with the key and the pipeline's event-time
    column (the sources hash the one and read watermarks from the other), are all the job
    needs. ``None`` when the first operator does not say (a ``Map`` of any function, a
    ``Filter``, which passes every column on), when there is no operator (the output is the
    input), or when every column is used anyway.
    """
    if not spec.operators:
        return None
    used = spec.operators[0].columns_used(schema)
    if used is None:
        return None
    wanted = set(spec.key) | set(used)
    if spec.event_time is not None:
        wanted.add(spec.event_time.column)
    if wanted >= set(schema.names):
        return None
    return [c for c in schema.names if c in wanted]


def project_source(spec: JobSpec, splits: list[Split], schema: pa.Schema) -> list[Split]:
    """Step 2b: a Parquet source's splits reading only :func:`projected_columns` (the same names,
    so positions and a resume are unaffected); any other source's splits as they are.

    Only what is read is cut: the job's recorded input schema stays the source's whole one, so
    a later run whose operators use other columns resumes as before.
    """
    cols = projected_columns(spec, schema)
    if cols is None or not isinstance(spec.source, Parquet):
        return splits
    projected = spec.source.with_columns(cols).splits()
    assert [s.name for s in projected] == [s.name for s in splits], "projection renamed splits"
    return projected


def check_storage(paths: Paths, *, alive_nodes: int, shared: bool) -> None:
    """Step 3: refuse node-local paths on a multi-node cluster unless the user says they are shared.

    Every node must reach the checkpoint directory (a restarted actor, or a
    partition moved to another node, reads what another node wrote), and the
    sink's directory (consumers stage there, the manager publishes).
    """
    if alive_nodes <= 1 or shared:
        return
    under = paths.checkpoint_dir.rstrip("/") + "/"
    wanted = [paths.checkpoint_dir] + [
        r for r in [paths.sink_root, *paths.side_roots.values()] if not r.startswith(under)
    ]
    local = [p for p in wanted if not is_remote(p)]
    if local:
        raise ConfigError(
            f"this Ray cluster has {alive_nodes} nodes, and the path(s) {local} are on the local "
            "disk of each node: actors on other nodes would not see each other's checkpoints and "
            "files. Use storage every node reaches: an s3:// (or other pyarrow.fs) URI as "
            "checkpoint_dir, or a network filesystem mounted at the same path on every node, "
            "and then say so with Pipeline(local_paths_shared=True)"
        )


def _with_split_hint(e: IncompatibleCheckpointError, source: Source) -> IncompatibleCheckpointError:
    """``e``, with a way out when this run's source names its splits otherwise than the one a
    checkpoint of an earlier rayflow was written with (one split per Parquet file; one split of
    the synthetic stream): the checkpoint's split names are then missing from this run."""
    if not isinstance(e, MissingSplitsError):
        return e
    hint = ""
    if isinstance(source, Parquet) and source.splits_files:
        hint = (
            "rf.sources.Parquet now reads a file of several row groups as several splits "
            "(<file>#rg<first>-<last>); a checkpoint written with one split per file resumes with "
            "rf.sources.Parquet(path, split_rows=None)"
        )
    elif isinstance(source, Synthetic) and source.schedule is None and source.num_splits > 1:
        hint = (
            f"rf.sources.Synthetic now reads the stream as {source.num_splits} splits by default; "
            "a checkpoint written with one split resumes with rf.sources.Synthetic(..., splits=1)"
        )
    if not hint:
        return e
    return MissingSplitsError(f"{e} Note: {hint}.")


def _alive_nodes() -> int:
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def _unwrap(e: BaseException) -> BaseException:
    """What the user should see for an error that came back from an actor.

    A rayflow error, or an exception raised by one of the user's operators,
    comes back as it is (with its message first), not inside Ray's error.
    Anything else is an actor of the job failing: :class:`PipelineFailedError`
    with the cause attached.
    """
    cause = getattr(e, "cause", None)
    if isinstance(cause, RayflowError):
        return cause
    op_err = operator_error(e)
    if op_err is not None:
        return op_err
    if isinstance(e, ray.exceptions.RayTaskError):
        what = type(cause).__name__ if cause is not None else "an error"
        failed = PipelineFailedError(f"an actor of the job failed with {what}: {cause}")
        failed.__cause__ = cause if isinstance(cause, BaseException) else e
        return failed
    return e


class Run:
    """A running pipeline: ``status()``, ``scale(consumers=)``, ``wait()``, ``stop()``.

    A job over an unbounded source (``Source.unbounded``) never ends on its
    own: it runs until :meth:`stop`, which drains, commits and returns the
    run's :class:`Result`; the next start with the same name and checkpoint
    directory resumes from the committed positions. ``stop()`` may be called
    from another thread while one waits in :meth:`wait`.

    Attributes: ``manager`` (the GroupManager actor), ``sources`` (the source
    actors), ``consumers`` (member id -> consumer actor), ``paths``
    (:class:`Paths`), ``startup_s``, ``unbounded``.
    """

    def __init__(self, spec: JobSpec):
        t0 = time.monotonic()
        self.spec = spec
        self._actors: list = []
        self._result: Result | None = None
        self._job_file: str | None = None
        self._progress = spec.progress if spec.progress is not None else sys.stderr.isatty()
        self.consumers: dict[str, object] = {}
        self.desired_consumers = spec.consumers
        self._next_consumer = 0
        # stop() from any thread; wait() then hands back stop()'s result.
        self._stop_lock = threading.Lock()
        self._stop_requested = threading.Event()
        self._stopped = threading.Event()  # stop() has finished (its result or its error is set)
        self._stop_error: BaseException | None = None
        # The group's membership (``self.consumers``) changes from scale() and from the
        # replacement of dead consumers, and the autoscaler calls scale() from its own thread.
        self._group_lock = threading.RLock()
        self.autoscaler: Autoscaler | None = None
        self.unbounded = spec.source.unbounded
        self.paths = resolve_paths(spec)
        splits, schema = check_input(spec)
        if spec.tiers and not isinstance(spec.source, Inputs):  # (several inputs: several key types)
            check_tier_keys(spec.tiers, schema, spec.key)
        splits = project_source(spec, splits, schema)
        self._total_rows = (
            spec.source.events if isinstance(spec.source, Synthetic) and not self.unbounded else None
        )
        if not ray.is_initialized():
            ray.init(logging_level="WARNING", log_to_driver=True)
        check_storage(self.paths, alive_nodes=_alive_nodes(), shared=spec.local_paths_shared)
        self.map = PartitionMap.uniform(spec.partitions)
        # Resolved once, here: the checkpoint records the emit mode it ran with (compat refuses a
        # resume that would change it: the view would miss the keys the other mode never emitted).
        self.chain = Chain(list(spec.operators)).for_input(unbounded=spec.source.unbounded)
        self.sink_store = Store(self.paths.sink_root)
        # A split at runtime (split()) stops and starts the actors again under this lock.
        self._launch_lock = threading.RLock()
        self._input = (splits, schema)
        self.partition_splits: list[dict] = []
        #: (map version, partition -> rate_ratio) from the last full status: what a split records
        #: (``_last_status`` may be the manager's own since, from wait()'s poll: no skew figures).
        self._seen_rates: tuple[int | None, dict] = (None, {})
        self.splitter = None
        #: Why the actors could not start again after a split or merge (the job is down).
        self._remap_error: PipelineFailedError | None = None
        try:
            self._launch(splits, schema, spec.consumers, t0=t0)
            if spec.autoscale is not None:
                self.start_autoscaler(spec.autoscale)
        except BaseException:
            self._teardown()
            raise
        self._last_check = 0.0

    # ------------------------------------------------------------------ start steps
    def _launch(self, splits: list[Split], schema: pa.Schema, consumers: int, *, t0: float | None) -> None:
        """Steps 4 to 9 (again after a split at runtime, with ``t0`` None: ``startup_s`` stays)."""
        spec = self.spec
        self._write_job_file(splits, schema)
        # Every actor's process starts at once (an actor's start-up is mostly its process
        # importing Ray, pyarrow and rayflow: ~1 s each on a small machine); then the calls
        # run in the protocol's order: the manager ready, the sources made known, the
        # consumers joining.
        self._create_manager()
        self._start_sources()
        created = self._create_consumers(consumers)
        try:
            self._manager_ready()
        except IncompatibleCheckpointError as e:
            hinted = _with_split_hint(e, spec.source)
            if hinted is e:
                raise
            raise hinted from e
        if self.map.bounds != self.job.partition_map.bounds:
            created = self._remake_for_map(splits, schema, consumers)
        self._get(self.manager.set_sources.remote(self.sources))
        # Created before the manager had the checkpoint's map: they learn its version now.
        self._get([a.start.remote(map_version=self.map.version) for a in created])
        self._activate()
        if t0 is not None:
            self.startup_s = time.monotonic() - t0
        self._start_reading()

    def _write_job_file(self, splits: list[Split], schema: pa.Schema) -> None:
        """Step 4: what the manager and the sources load at start and at every restart."""
        spec = self.spec
        # A dynamic source may start with few splits (or none) and gain more: every source
        # actor is started, to share what comes. Otherwise no actor without a split.
        n_src = spec.config.num_sources
        if n_src is None:
            n_src = auto_num_sources(
                cpus=ray.cluster_resources().get("CPU", 1.0),
                consumers=spec.consumers,
                # A dynamic source: the splits it lists now (more may come; at least one reader).
                splits=len(splits),
            )
        n_src = max(1, n_src if spec.source.dynamic else min(n_src, len(splits)))
        self.job = JobFile(
            name=spec.name,
            root=self.paths.root,
            catalog_path=self.paths.catalog,
            sink_root=self.paths.sink_root,
            sink=spec.sink,
            meta=JobMeta.build(
                key=spec.key,
                partition_map_json=self.map.to_json(),
                operators=self.chain.spec(),
                splits=[s.name for s in splits],
                schema=schema,
                dynamic=spec.source.dynamic,
            ),
            partition_map=self.map,
            config=spec.config,
            key=spec.key,
            splits=tuple(tuple(splits[i::n_src]) for i in range(n_src)),
            source=spec.source if spec.source.dynamic else None,
            unbounded=spec.source.unbounded,
            faults=spec.faults,
            side_sinks={
                stream: (sink, self.paths.side_roots[stream])
                for stream, sink in self.chain.side_sinks.items()
            },
            event_time=spec.event_time,
            combine=combiner_for(spec.operators, key=spec.key),  # checked in validate (step 2)
            tiers=resolve_tiers(spec.tiers, self.map, consumers=spec.consumers) if spec.tiers else None,
        )
        self._job_file = write_job_file(self.job)

    def _create_manager(self) -> None:
        """Step 5: the GroupManager (restartable: reloads from the catalog; consumers keep leases)."""
        spec, name = self.spec, naming.manager_name(self.spec.name)
        _wait_name_free(name)
        try:
            self.manager = GroupManager.options(
                name=name,
                namespace=naming.NAMESPACE,
                num_cpus=0,
                resources=spec.config.manager_resources,
                max_concurrency=1000,
                max_restarts=-1,  # reloads from the catalog; consumers re-join and keep leases
                max_task_retries=-1,  # callers' in-flight calls go to the restarted actor
            ).remote(name=spec.name, job_root=self.paths.root, job_file=self._job_file)
        except ValueError as e:
            raise ConfigError(
                f"a pipeline named {spec.name!r} is already running on this Ray cluster; stop it "
                "first or choose another name"
            ) from e
        self._actors.append(self.manager)

    def _manager_ready(self) -> None:
        """Step 5, done: the manager loaded the catalog (and checked the job against it)."""
        ready = self._get(self.manager.ready.remote())
        # The map the manager goes on with: this run's ranges under the checkpoint's version, or a
        # new version when it re-split the checkpoint into another partition count.
        self.map = PartitionMap.from_json(ready["map"])
        # The name is ours now: job files of earlier runs (a crashed driver's) can go.
        delete_job_files(self.paths.root, keep=self._job_file)

    def _remake_for_map(self, splits: list[Split], schema: pa.Schema, consumers: int) -> list:
        """A resume that kept the checkpoint's map made by runtime splits (the manager's
        ``_kept_split_map``): the sources and consumers were made for the uniform map asked
        for, and have done nothing yet; they are made again for the checkpoint's map (a new
        job file; the manager's own stays, as its restarts read it)."""
        stale = [*self.sources, *self.consumers.values()]
        for a in stale:
            ray.kill(a)
        self._actors = [a for a in self._actors if all(a is not b for b in stale)]
        self.consumers = {}
        for i in range(len(self.sources)):
            _wait_name_free(naming.source_name(self.spec.name, i))
        self._write_job_file(splits, schema)
        self._start_sources()
        return self._create_consumers(consumers)

    def _start_sources(self) -> None:
        """Step 6: the source actors (restartable: replay from the lowest committed position)."""
        spec = self.spec
        self.sources = [
            SourceActor.options(
                name=naming.source_name(spec.name, i),
                namespace=naming.NAMESPACE,
                num_cpus=spec.config.source_num_cpus,
                resources=spec.config.source_resources,
                max_restarts=-1,
                max_task_retries=-1,
            ).remote(job_root=self.paths.root, job_file=self._job_file, index=i)
            for i in range(len(self.job.splits))
        ]
        self._actors.extend(self.sources)

    def _add_consumers(self, n: int) -> None:
        """Step 7 (and scaling up): consumers join the group; not restartable, a dead one is replaced."""
        self._get([a.start.remote() for a in self._create_consumers(n)])

    def _create_consumers(self, n: int) -> list:
        """The actors of ``n`` new consumers (they join the group on ``start``)."""
        spec, new = self.spec, []
        for _ in range(n):
            member = f"consumer-{self._next_consumer}"
            self._next_consumer += 1
            actor = ConsumerActor.options(
                name=naming.consumer_name(spec.name, member),
                namespace=naming.NAMESPACE,
                num_cpus=spec.config.consumer_num_cpus,
                resources=spec.config.consumer_resources,
                max_concurrency=1000,
                scheduling_strategy="SPREAD",
            ).remote(
                pipeline=spec.name,
                member_id=member,
                manager=self.manager,
                sources=self.sources,
                chain=self.chain,
                key=list(spec.key),
                state_root=self.paths.root,
                sink_root=self.paths.sink_root,
                map_version=self.map.version,
                config=spec.config,
                faults=spec.faults,
                unbounded=spec.source.unbounded,
                side_roots=self.paths.side_roots,
                num_sources=len(self.job.splits),
                event_time=spec.event_time,
                tier_ranks=self.job.tiers.ranks if self.job.tiers is not None else None,
            )
            self.consumers[member] = actor
            self._actors.append(actor)
            new.append(actor)
        return new

    def _activate(self) -> None:
        """Step 8: the first assignment, once the expected consumers have joined."""
        self._get(self.manager.activate.remote())
        status = self._last_status = self._get(self.manager.status.remote())
        self._rows_at_start = sum(x["committed_rows"] for x in status["partitions"])

    def _start_reading(self) -> None:
        """Step 9: the sources start reading, from the committed positions."""
        self._t_read = time.monotonic()
        self._get([s.run.remote() for s in self.sources])

    # ------------------------------------------------------------------ helpers
    def _get(self, refs, timeout: float = _ACTOR_TIMEOUT_S):
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.RayTaskError as e:
            raise _unwrap(e) from None

    # ------------------------------------------------------------------ public
    def status(self) -> dict:
        """The job now, as plain data.

        ``partitions``: per partition its owner, lease epoch, lease state, processed
        and committed rows, rows/s, and whether it is final; what the sources hold
        of it (docs/backpressure.md): ``queued_rows`` (read, not committed: in memory
        or spilled), ``queued_bytes`` (in the object store), ``spilled_rows`` and
        ``spilled_bytes`` (on local disk), ``blocked_s`` (the time reading was
        paused on its account); overall ``memory_bytes`` (the sources' queues in
        the object store) and ``spill_disk_bytes`` (their spill files);
        ``members``; ``consumers``: per live consumer its busy seconds, rows
        processed and failed commit attempts; ``rows_read``,
        ``processed_rows``, ``rebalances``, ``recoveries``, ``done``,
        ``unbounded``; lag in rows and seconds, rates and the last commit's time,
        per partition and overall (see :func:`add_lag`); ``splits``: per split its
        read position, ``available`` and idle times (see ``SourceActor.stats``).
        With event time (DESIGN §11), per partition ``watermark_ms`` (None before
        any) and ``event_time_lag_s`` (now minus the watermark), overall the
        slowest partition's; per partition ``operators``: its operators' metrics
        (``late_rows``, ``open_windows``, ``state_rows``, ...), summed overall.
        Priority tiers (docs/tiers.md): per partition its ``tier`` (``"default"`` unless an
        ``rf.Tier`` names it); ``dedicated``: each dedicated consumer -> its tier's name.
        With ``Pipeline(autoscale=...)``, ``autoscale``: its config, target, actions
        and recent decisions with the numbers that made them (``_internal/autoscaler.py``).
        Splits at runtime (docs/partitioning.md): ``map_version``, ``partitions_now`` (the
        count under the current map) and ``partition_splits`` (this run's ``split`` events).
        """
        with self._launch_lock:  # not while a split stops and starts the actors
            if self._remap_error is not None:
                raise self._remap_error
            return self._status_now()

    def _status_now(self) -> dict:
        st = self._last_status = self._get(self.manager.status.remote())
        src = self._get([s.stats.remote() for s in self.sources])
        for part in st["partitions"]:
            i = part["partition"]
            for key in ("queued_rows", "queued_bytes", "spilled_rows", "spilled_bytes", "blocked_s"):
                part[key] = sum(s[key][i] for s in src)
        st["memory_bytes"] = sum(s["memory_bytes"] for s in src)
        st["spill_disk_bytes"] = sum(s["spill_disk_bytes"] for s in src)
        add_lag(st, src, wall=time.time())
        st["unbounded"] = self.unbounded
        st["splits"] = {name: x for s in src for name, x in s["splits"].items()}
        st["rows_read"] = sum(s["rows_read"] for s in src)
        st["processed_rows"] = sum(x["processed_rows"] for x in st["partitions"])
        keys = (
            "busy_s",
            "steps",
            "rows_processed",
            "commit_failures",
            "last_commit_error",
            "commit_s",
            "state_bases",
            "state_deltas",
            "compactions",
            "state_bytes",
            "state_spilled_bytes",
        )
        st["consumers"] = {n: {k: c[k] for k in keys} for n, c in self._poll_consumers().items()}
        if self.autoscaler is not None:
            st["autoscale"] = self.autoscaler.status()
        st["map_version"] = self.map.version
        st["partitions_now"] = self.map.num_partitions
        self._seen_rates = (self.map.version, {p["partition"]: p.get("rate_ratio") for p in st["partitions"]})
        st["partition_splits"] = list(self.partition_splits)
        return st

    def start_autoscaler(self, config: Autoscale, *, decide=None) -> Autoscaler:
        """Start sizing the group with ``config`` (``Pipeline(autoscale=...)`` does this at
        start; ``decide`` swaps the policy, for benchmarks). Stopped by :meth:`stop` and at the
        end of the run."""
        if self.autoscaler is not None:
            raise ConfigError(f"pipeline {self.spec.name!r} is autoscaled already")
        self.autoscaler = Autoscaler(self, config, decide=decide)
        self.autoscaler.start()
        return self.autoscaler

    def _stop_autoscaler(self) -> None:
        if self.autoscaler is not None:
            self.autoscaler.stop()

    def scale(self, *, consumers: int) -> None:
        """Change the number of consumers while the job runs (graceful on the way down)."""
        if isinstance(consumers, bool) or not isinstance(consumers, int) or consumers < 1:
            raise ConfigError(f"consumers must be an integer >= 1, got {consumers!r}")
        with self._group_lock:
            self._scale(consumers)

    def _scale(self, consumers: int) -> None:
        self.desired_consumers = consumers
        self._poll_consumers()  # forget (and replace) consumers that died meanwhile
        cur = len(self.consumers)
        if consumers > cur:
            self._add_consumers(consumers - cur)
        dedicated: dict = {}
        if consumers < cur and self.job.tiers is not None and any(self.job.tiers.dedicated):
            dedicated = self._get(self.manager.status.remote()).get("dedicated") or {}
        leaving = leaving_members(self.consumers, consumers, dedicated=dedicated)
        actors = [self.consumers.pop(m) for m in leaving]
        try:
            for ref in [a.stop.remote() for a in actors]:  # graceful: each commits, then leaves
                try:
                    self._get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    pass  # died or stuck on its way out: killed below; its partitions recover
        finally:
            for a in actors:
                ray.kill(a)

    def split(
        self,
        partition: int,
        *,
        at: int | None = None,
        reason: str = "asked",
        expect_version: int | None = None,
    ) -> dict:
        """Split ``partition``'s hash range in two while the job runs (docs/partitioning.md,
        "Splits at runtime"); returns the ``split`` event recorded in the catalog.

        ``at``: the first hash of the upper child (default: the median hash of the
        partition's recent traffic, sampled by the sources). The job goes on under a
        new map (version + 1, one partition more; partitions above ``partition`` are
        numbered one higher), exactly once: every consumer commits and leaves, the
        committed state is re-split by hash range with each child inheriting its
        parent's positions (``_internal/repartition.py``: a split is always exact),
        the new map, the children's commits and their leases are recorded in one
        catalog transaction, and the actors start again from there. A crash before
        that transaction leaves the old map; after it, the new one.

        ``expect_version``: refuse (``ConfigError``) unless the map still has this
        version (a decision taken on one map must not cut a range of another). Refused
        too once the job has processed and committed all of its input (``merge`` alike).

        Caveat: the whole job pauses for the change (a stop and a start of its
        actors: seconds), not only the split partition.
        """
        with self._launch_lock, self._group_lock:
            self._check_remap(partition, self.map.num_partitions, expect_version)
            # The ratio last seen by run.status() (the splitter's, say), under this map.
            version, rates = self._seen_rates
            ratio = rates.get(partition) if version == self.map.version else None
            if at is None:
                lo, hi = self.map.range_of(partition)
                at = split_point(self._get([a.sample_hashes.remote(partition) for a in self.sources]), lo, hi)
            new = split_map(self.map, partition, at)
            detail = {"partition": partition, "at_hash": str(at), "rate_ratio": ratio, "reason": reason}
            return self._remap(new, "split", detail, drain=False)

    def merge(
        self,
        partition: int,
        *,
        reason: str = "asked",
        timeout_s: float = _ACTOR_TIMEOUT_S,
        expect_version: int | None = None,
    ) -> dict:
        """Merge ``partition`` with the next one (``partition + 1``) while the job runs; returns
        the ``merge`` event recorded in the catalog.

        A merged partition has one position per split, so its two parents must stand
        at the same positions: the sources stop reading and every partition processes
        and commits all that was read (a drain, as ``stop(drain=True)``: a consistent
        cut), then the state is merged by range as :meth:`split` re-splits it
        (partitions above are numbered one lower). When the cut is not reached within
        ``timeout_s`` nothing merges: the job starts again under the same map and
        :class:`~rayflow.errors.RepartitionError` says so.
        """
        with self._launch_lock, self._group_lock:
            self._check_remap(partition, self.map.num_partitions - 1, expect_version)
            new = merge_map(self.map, partition)
            return self._remap(
                new, "merge", {"partition": partition, "reason": reason}, drain=True, timeout_s=timeout_s
            )

    def _check_remap(self, partition: int, limit: int, expect_version: int | None = None) -> None:
        if self._result is not None or self._stop_requested.is_set() or not self._actors:
            raise ConfigError(f"pipeline {self.spec.name!r} is not running: its map cannot change")
        if expect_version is not None and expect_version != self.map.version:
            raise ConfigError(
                f"pipeline {self.spec.name!r}'s partition map is at version {self.map.version}, not "
                f"{expect_version}: partition numbers now name other ranges; decide again"
            )
        if isinstance(partition, bool) or not isinstance(partition, int) or not 0 <= partition < limit:
            raise ConfigError(f"partition must be an integer in [0, {limit}), got {partition!r}")
        if self.spec.tiers:
            raise ConfigError(
                "a split or merge at runtime would renumber the partitions that tiers= names: run a "
                "tiered job without them, or name the hot keys' partitions in a tier instead"
            )
        if isinstance(self.spec.source, Inputs):
            raise ConfigError(
                "a job over several inputs (rf.sources.Inputs) cannot split or merge partitions: its "
                "state carries no hash of one key to re-split by (docs/partitioning.md)"
            )
        # Asked under the launch lock, which wait() reads `done` under too: a job whose input is all
        # committed (wait() may be taking its result from that status) is not stopped and started
        # again under a new map (the splitter decides on a status read a moment before).
        if self._get(self.manager.status.remote())["done"]:
            raise ConfigError(
                f"pipeline {self.spec.name!r} has processed and committed all of its input: its map "
                "no longer changes (resume it with another partitions= to re-split its checkpoint)"
            )

    def _remap(
        self, new: PartitionMap, kind: str, detail: dict, *, drain: bool, timeout_s: float = _ACTOR_TIMEOUT_S
    ) -> dict:
        """Stop the actors (each consumer commits and leaves; with ``drain``, at a consistent
        cut first), then start them again under ``new`` (the manager re-splits the state and
        records the map in one transaction); record a ``kind`` event. Under both locks."""
        t0 = time.monotonic()
        halted, drained = self._halt(drain=drain, timeout_s=timeout_s)
        drained = drained is not False  # None: a split, which needs no cut
        committed = sum(x["committed_rows"] for x in halted["partitions"])
        t_read, rows_at_start = self._t_read, self._rows_at_start
        self._kill_actors()
        for i in range(len(self.sources)):
            _wait_name_free(naming.source_name(self.spec.name, i))
        old = self.map
        self.consumers = {}
        if drained:
            self.map = new
        try:
            self._launch(*self._input, self.desired_consumers, t0=None)
        except BaseException as e:
            # Nothing half-started stays (names held, wait() polling a manager that never ends):
            # the job is down, and wait() and status() say why. The catalog holds whichever map
            # was recorded last; a new start with the same partitions= resumes from it.
            self._kill_actors()
            self.map = old
            self._remap_error = PipelineFailedError(
                f"pipeline {self.spec.name!r} failed to start again after a {kind} of partition "
                f"{detail['partition']}: {e}. Start the pipeline again (same name and checkpoint "
                "directory) to resume from its last commits"
            )
            raise self._remap_error from e
        # A split's children inherit their parent's rows_total (the upsert versions): count
        # each event once in the run's figures.
        self._rows_at_start = self._rows_at_start - committed + rows_at_start
        self._t_read = t_read
        if not drained:
            raise RepartitionError(
                f"pipeline {self.spec.name!r} could not {kind} partition {detail['partition']}: the "
                f"partitions did not reach a consistent cut within {timeout_s} s (a merged partition "
                "has one position per split). It goes on under the same map; try again later."
            )
        event = {
            **detail,
            "old_version": old.version,
            "new_version": self.map.version,
            "partitions": self.map.num_partitions,
            "pause_s": round(time.monotonic() - t0, 3),
        }
        self._get(self.manager.record_event.remote(kind, event))
        self.partition_splits.append({"kind": kind, **event})
        logger.info("rayflow: %r %s partition %d: %s", self.spec.name, kind, detail["partition"], event)
        return event

    def _halt(self, *, drain: bool, timeout_s: float) -> tuple[dict, bool | None]:
        """Stop the job's work, for :meth:`stop` and for a split or merge: the sources stop
        reading; with ``drain``, wait for a consistent cut (:meth:`_drain`); each consumer
        commits and leaves. An actor dead or stuck past ``timeout_s`` is left behind (a new
        start resumes from its last commit). Returns the manager's status, and whether the cut
        was reached (``None`` without ``drain``): never when a source did not stop (it told
        no frontier for its splits); a consumer lost after the cut leaves the cut standing
        (the catalog recorded it)."""
        frontier: dict[str, int] = {}
        drained = None
        sources_stopped = True
        for what, refs in (
            ("sources", lambda: [s.stop_reading.remote() for s in self.sources]),
            ("consumers", lambda: [c.stop.remote() for c in self.consumers.values()]),
        ):
            if what == "consumers" and drain:
                drained = sources_stopped and self._drain(frontier, timeout_s)
            for ref in refs():
                try:
                    got = self._get(ref, timeout=timeout_s)
                    if what == "sources":
                        frontier.update(got.get("frontier") or {})
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                    logger.warning("rayflow: stopping the %s of %r: %s", what, self.spec.name, e)
                    if what == "sources":
                        sources_stopped = False
        return self._get(self.manager.status.remote()), drained

    def start_splitter(self, config: Splits) -> Splitter:
        """Split hot partitions by the policy ``config`` (``_internal/splits.py``) from now on, on
        a thread of this driver. Stopped by :meth:`stop` and at the end of the run."""
        if self.splitter is not None:
            raise ConfigError(f"pipeline {self.spec.name!r} has a splitter already")
        self.splitter = Splitter(self, config)
        self.splitter.start()
        return self.splitter

    def _stop_splitter(self) -> None:
        if getattr(self, "splitter", None) is not None:
            self.splitter.stop()

    def _poll_consumers(self) -> dict[str, dict]:
        """Status of every consumer that answers within a moment.

        A consumer that does not answer (frozen, overloaded) is skipped, not
        waited for: its liveness is the manager's business (session expiry).
        A dead one is replaced, so the group keeps its size; a consumer whose
        processing failed raises that failure here: a user operator's own
        exception as it is (with a note naming the consumer), anything else as
        a rayflow error.
        """
        with self._group_lock:
            return self._poll_consumers_locked()

    def _poll_consumers_locked(self) -> dict[str, dict]:
        refs = {c.status.remote(): name for name, c in self.consumers.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=_STATUS_WAIT_S)
        out, dead = {}, 0
        for ref in ready:
            name = refs[ref]
            try:
                out[name] = ray.get(ref, timeout=_ACTOR_TIMEOUT_S)
            except ray.exceptions.RayActorError:
                # Dead: the manager has already moved its partitions to the survivors;
                # a replacement joins and takes a fair share back.
                self.consumers.pop(name, None)
                dead += 1
            except ray.exceptions.RayTaskError as e:
                err = _unwrap(e)
                if operator_error(err) is not None:
                    err.add_note(f"in consumer {name!r} of pipeline {self.spec.name!r}")
                    raise err from None
                if isinstance(err, RayflowError):
                    raise err from None
                raise PipelineFailedError(f"consumer {name!r} failed: {err}") from err
        if dead:
            self._add_consumers(min(dead, self.desired_consumers - len(self.consumers)))
        return out

    def wait(self, *, timeout_s: float | None = None) -> Result:
        """Block until done, and return the run's :class:`Result`.

        Done: a bounded input is read and every partition's final commit is
        recorded. An unbounded job is never done: ``wait()`` returns when
        :meth:`stop` (called from another thread) has stopped it, with that
        result, and raises if the job fails. With ``timeout_s``, raises
        ``TimeoutError`` once it passes; the job keeps running.
        """
        if self._result is not None:
            return self._result
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                if self._stop_requested.is_set():
                    return self._result_of_stop()
                with self._launch_lock:  # not while a split stops and starts the actors
                    if self._remap_error is not None:
                        raise self._remap_error
                    st = self._last_status = self._get(self.manager.status.remote())
                if st["done"]:
                    break
                if st.get("failed"):  # publication of recorded outputs keeps failing
                    raise PipelineFailedError(st["failed"])
                now = time.monotonic()
                if now - self._last_check > 0.5:
                    self._last_check = now
                    st = self.status()  # also replaces dead consumers and raises their errors
                    if self._progress:
                        self._draw(st)
                if deadline is not None and now > deadline:
                    raise TimeoutError(f"pipeline {self.spec.name!r} not done after {timeout_s} s")
                time.sleep(_POLL_S)
        except TimeoutError:
            if self._stop_requested.is_set():
                return self._result_of_stop()
            raise
        except BaseException:
            if self._stop_requested.is_set():  # the actors went under our feet: stop() did it
                return self._result_of_stop()
            self._teardown()
            raise
        with self._stop_lock:  # a stop() racing the end of the input: one result
            if self._result is None:
                try:
                    # Before the result is read off the consumers (it iterates self.consumers,
                    # which a scale from the autoscaler's thread would change under it).
                    self._stop_autoscaler()
                    with self._launch_lock:  # not while a split stops and starts the actors
                        self._result = self._result_from(st, stopped=False)
                finally:
                    self._teardown()  # (it waits for the splitter: not under the launch lock)
        return self._result

    def _result_of_stop(self) -> Result:
        """For ``wait()`` when ``stop()`` ends the run from another thread: its result, or its error."""
        self._stopped.wait()
        if self._result is not None:
            return self._result
        raise PipelineFailedError(
            f"pipeline {self.spec.name!r} was stopped, and stopping failed: {self._stop_error}"
        ) from self._stop_error

    def _result_from(self, st: dict, *, stopped: bool, running: bool = True) -> Result:
        """The :class:`Result` of this run, from the manager's status after its last commit (or,
        ``running=False``, the last status seen before the run failed: no output then)."""
        seconds = time.monotonic() - self._t_read
        events = sum(x["committed_rows"] for x in st["partitions"]) - self._rows_at_start
        stats = {
            "events": events,
            "seconds": seconds,
            "events_per_s": events / seconds if seconds > 0 else 0.0,
            "startup_s": self.startup_s,
            "rebalances": st["rebalances"],
            "recoveries": st["recoveries"],
            "partitions": self.spec.partitions,
            "consumers": len(self.consumers),
            "sources": len(self.sources),
            "stopped": stopped,
        }
        if running:  # commit work of the consumers alive at the end (a killed one's is lost)
            alive = []
            for ref in [c.status.remote() for c in self.consumers.values()]:
                try:  # not _poll_consumers: a run that ends replaces no consumer
                    alive.append(self._get(ref, timeout=5.0))
                except (Exception, ray.exceptions.RayError):
                    pass
            for k in ("commit_s", "state_bases", "state_deltas", "compactions"):
                stats[k] = sum(c.get(k, 0) for c in alive)
        output = None
        if running:
            files = self._get(self.manager.output_files.remote())
            main = [f for f in files if output_stream(f)[0] is None]  # side streams have sinks of their own
            output = self.spec.sink.read_output(self.sink_store, main)
        if self._progress:
            print(
                f"\r[{self.spec.name}] {'stopped' if stopped else 'done'}: {events:,} events in "
                f"{seconds:.2f} s ({stats['events_per_s'] / 1e6:.2f}M events/s)" + " " * 40,
                file=sys.stderr,
            )
        return Result(output=output, stats=stats, output_path=self.paths.output_path)

    def _draw(self, st: dict) -> None:
        done = st["processed_rows"]
        head = f"\r[{self.spec.name}] {done:,}"
        if self.unbounded:  # no total to reach: how fast, how far behind, how fresh
            lag_s = st.get("lag_s")
            age = st.get("last_commit_age_s")
            line = (
                f"{head} events  {_per_s(st.get('rate_rows_per_s', 0.0))}  lag {st.get('lag_rows', 0):,} "
                f"({'?' if lag_s is None else f'{lag_s:.1f}'} s)  last commit "
                f"{'never' if age is None else f'{age:.1f} s ago'}  consumers {len(st['members'])}   "
            )
        else:
            el = max(time.monotonic() - self._t_read, 1e-9)
            total = f"/{self._total_rows:,}" if self._total_rows else ""
            lag = sum(x["queued_rows"] for x in st["partitions"])
            line = (
                f"{head}{total} events  {done / el / 1e6:.2f}M/s  "
                f"lag {lag:,}  consumers {len(st['members'])}   "
            )
        print(line, end="", file=sys.stderr, flush=True)

    def stop(self, *, timeout_s: float = _ACTOR_TIMEOUT_S, drain: bool = False) -> Result:
        """Stop gracefully, and return the run's :class:`Result` (``stats["stopped"]`` is True).

        ``drain``: after the sources stop reading, wait (at most ``timeout_s``)
        until every partition has processed and committed everything read, so
        that all partitions stand at the same positions per split: a
        *consistent cut*, which a later run needs in order to merge partitions
        (resume with fewer partitions, ``docs/partitioning.md``).
        ``stats["drained"]`` says whether the cut was reached (without
        ``drain``, stopped partitions usually stand at different positions).
        It is not reached, at once, when the sources stopped before they had
        replayed up to the partitions furthest ahead (a run stopped right after
        it resumed): stop again later.

        In order: the sources stop reading (their readers finish the batch in
        progress and close); each consumer finishes its step, commits what it
        has processed and leaves the group; then every actor goes. Nothing is
        lost: rows read but not processed are read again by the next run, which
        resumes from the committed positions. Each step waits at most
        ``timeout_s`` per actor; one that does not answer is left behind (the
        next run resumes from its last commit).

        Safe from another thread than one in :meth:`wait` (which then returns
        this result), and idempotent: a second call, or a call after the run
        ended, returns the same result. After the run failed (``wait()`` or
        ``status()`` raised why), it returns the figures last seen, with no
        output, rather than raise again (it is often called in a ``finally``).
        """
        with self._stop_lock:
            if self._result is not None:
                return self._result
            self._stop_requested.set()
            try:
                self._stop_autoscaler()  # before anything stops: no scaling while the group drains
                self._stop_splitter()
                with self._launch_lock:
                    self._result = self._stop(timeout_s, drain=drain)
                return self._result
            except BaseException as e:
                self._stop_error = e
                raise
            finally:
                self._teardown()
                self._stopped.set()

    def _stop(self, timeout_s: float, *, drain: bool = False) -> Result:
        if not self._actors:  # it failed (and wait() raised why): what was last seen, no output
            return self._result_from(self._last_status, stopped=True, running=False)
        # A bounded job that had ended (its result not yet asked for by wait()) was not stopped.
        ended = self._get(self.manager.status.remote())["done"]
        st, drained = self._halt(drain=drain, timeout_s=timeout_s)
        result = self._result_from(st, stopped=not ended)
        if drained is not None:
            result.stats["drained"] = drained
        return result

    def _drain(self, frontier: dict[str, int], timeout_s: float) -> bool:
        """Wait until every partition's committed positions reach ``frontier`` (where the
        sources stopped reading); False if they do not within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            ready = self._get(self.manager.ready.remote())
            positions = ready["positions"]
            # The splits this run reads (a split of an earlier run no source lists stays where it is).
            at = [
                {s: positions.get(p, {}).get(s, 0) for s in frontier} for p in range(self.map.num_partitions)
            ]
            # With event time, also one committed watermark (a merge needs it): a partition
            # commits its watermark's last move after its last rows.
            wms = {json.dumps(ready.get("watermarks", {}).get(p), sort_keys=True) for p in range(len(at))}
            if all(a == frontier for a in at) and len(wms) == 1:
                return True
            if any(a[s] > v for a in at for s, v in frontier.items()):
                # The sources were still replaying toward partitions that had committed further:
                # no cut at the frontier exists (a drained stop after more reading would reach one).
                logger.warning(
                    "rayflow: %r cannot drain: some partitions are past where reading stopped", self.spec.name
                )
                return False
            if time.monotonic() > deadline:
                logger.warning("rayflow: %r did not drain within %s s", self.spec.name, timeout_s)
                return False
            time.sleep(0.05)  # polling the manager: the commits land on the consumers' interval

    def _teardown(self) -> None:
        """Stop every actor of the run (best effort: each failure is logged), then its job file."""
        self._stop_autoscaler()
        self._stop_splitter()
        # Under the launch lock: a split still restarting the actors (its splitter's join above
        # gave up) must not add actors after these are killed, which nobody would kill then.
        with self._launch_lock:
            self._kill_actors()

    def _kill_actors(self) -> None:
        if not self._actors:
            return
        actors, self._actors = self._actors, []
        if actors[0] is getattr(self, "manager", None):
            try:
                ray.get(self.manager.close.remote(), timeout=10)
            except (ray.exceptions.RayError, RayflowError) as e:
                logger.warning("rayflow: closing the manager of %r failed: %s", self.spec.name, e)
        # Consumers first delete their runs on local disk (a kill runs no cleanup); one that does
        # not answer in time leaves them to the next consumer started on its node (runs.wipe_dead).
        # ray.wait, not ray.get: a dead consumer's error must not cut the others' wait short.
        wipes = [c.wipe_spill.remote() for c in self.consumers.values()]
        if wipes:
            try:
                _, late = ray.wait(wipes, num_returns=len(wipes), timeout=5)
                if late:
                    logger.warning(
                        "rayflow: %d consumers of %r did not delete their runs", len(late), self.spec.name
                    )
            except ray.exceptions.RayError as e:
                logger.warning("rayflow: consumers of %r did not delete their runs: %s", self.spec.name, e)
        for a in actors:
            try:
                ray.kill(a)
            except (ray.exceptions.RayError, ValueError) as e:
                logger.warning("rayflow: killing an actor of %r failed: %s", self.spec.name, e)
        if self._job_file is not None:  # only this run's: the name may be another run's now
            try:
                Store(self.paths.root).delete(self._job_file)
            except OSError as e:
                logger.warning("rayflow: could not delete the job file of %r: %s", self.spec.name, e)

    def query(self, sql: str) -> pa.Table:
        """Run the read-only ``sql`` over the sink's output and return the result.

        While the job runs it goes through the manager, which holds the sink
        (a DuckDB sink's database: the live materialized view of an upsert
        stream; a Parquet or Collect sink: the views ``output`` and ``latest``,
        see ``Sink.query``); it sees whole commits, each partition as of its
        last published commit, and delays publication while it runs (keep it
        small). After the run it reads the sink directly. Raises
        :class:`ConfigError` for a statement that is not read-only or fails.
        """
        if self._result is not None or not self._actors:
            return self.spec.sink.query(self.sink_store, sql)
        return self._get(self.manager.query.remote(sql))


def leaving_members(members: Iterable[str], keep: int, *, dedicated: Collection[str] = ()) -> list[str]:
    """The consumers a scale-down to ``keep`` removes (pure): the newest shared ones first,
    then the newest dedicated ones (priority tiers, ``dedicated``: the members holding a tier's
    role). Removing a dedicated consumer while a shared one could go would hand its role, and
    so its tier's partitions, to another consumer: a pause of the tier that the role exists to
    spare."""
    order = sorted(members, key=lambda m: (m not in dedicated, int(m.split("-")[1])))
    return order[keep:]


def _per_s(rate: float) -> str:
    """A rate for the progress line: ``850/s``, ``12.3k/s``, ``4.56M/s``."""
    if rate >= 1e6:
        return f"{rate / 1e6:.2f}M/s"
    if rate >= 1e3:
        return f"{rate / 1e3:.1f}k/s"
    return f"{rate:.0f}/s"


def _wait_name_free(name: str, timeout_s: float = 10.0) -> None:
    """A killed named actor frees its name a moment later; wait for that, briefly.

    A live actor of that name (another running pipeline) keeps it: then the
    creation fails with a clear error.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            handle = ray.get_actor(name, namespace=naming.NAMESPACE)
        except ValueError:
            return
        try:
            ray.get(handle.__ray_ready__.remote(), timeout=1.0)
            return  # alive: let the creation report the conflict
        except (ray.exceptions.RayError, TimeoutError):
            time.sleep(0.1)
