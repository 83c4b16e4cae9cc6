"""The job file: what a restartable actor needs, written once per run under the checkpoint root.

Ray keeps a restartable actor's constructor arguments to replay them at each
restart; arguments that live in the object store are lost once the driver's
references to them go out of scope, and the restart then fails
(ray-project/ray#53727). So the GroupManager and the SourceActors take only
small plain values (where the job file is, and a source's index), and each
loads what it needs from the file at start *and* at every restart.

The file is a ``cloudpickle`` of :class:`JobFile`, written by the driver
before any actor starts, under ``<root>/_job/run-<id>.pkl`` through
:class:`Store` (a local path or a ``pyarrow.fs`` URI such as ``s3://``), so
every node that reaches the checkpoint directory reaches it. It is written
once (a temporary name, then a move) and never changed; each run writes its
own, and the driver deletes it, and any a crashed run left, when the run ends
or the next one starts.

Caveat: an in-memory source (``rf.sources.Table``) is written out whole.
A dynamic source is written too (``JobFile.source``): its source actors list
its splits again while the job runs.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from ray import cloudpickle

from rayflow._internal import naming
from rayflow._internal.checkpoint.store import Store
from rayflow._internal.compat import JobMeta
from rayflow._internal.watermarks import EventTime
from rayflow.config import EngineConfig
from rayflow.errors import CheckpointError
from rayflow.partitioning import PartitionMap
from rayflow.sinks import Sink
from rayflow.sources import Source, Split

logger = logging.getLogger(__name__)

#: Folder of job files under the pipeline's checkpoint root.
JOB_DIR = "_job"


@dataclass(frozen=True, kw_only=True)
class JobFile:
    """Everything the manager and the sources load at (re)start. Paths are resolved
    (absolute, or URIs) by the driver, so no actor depends on its working directory."""

    name: str
    #: ``<checkpoint_dir>/<name>``: state files, the catalog, the job files.
    root: str
    catalog_path: str
    sink_root: str
    sink: Sink
    meta: JobMeta
    partition_map: PartitionMap
    config: EngineConfig
    key: tuple[str, ...]
    #: The splits of each source actor at start, by its index (dealt round-robin). Splits a
    #: dynamic source gains later go by :func:`rayflow._internal.source_actor.owner_of`.
    splits: tuple[tuple[Split, ...], ...]
    #: The source, when it is dynamic (``Source.dynamic``): the source actors call its
    #: ``splits()`` every ``EngineConfig.discovery_interval_s``. None otherwise.
    source: Source | None = None
    #: The job never ends on its own (``Source.unbounded``): no source ever reports the end.
    unbounded: bool = False
    #: A ``rayflow.testing.FaultPlan`` (tests only) or ``None``.
    faults: object = None
    #: Side streams of the chain (``Chain.side_sinks``): stream -> (its sink, its resolved root).
    side_sinks: dict = field(default_factory=dict)
    #: The event-time column and watermark strategy (``watermarks.EventTime``), or ``None``.
    event_time: EventTime | None = None
    #: The sources' ``combine.Combiner`` (``Aggregate(combine_at_source=True)``), or ``None``.
    combine: object = None

    @property
    def source_names(self) -> list[str]:
        return [naming.source_name(self.name, i) for i in range(len(self.splits))]


def write_job_file(job: JobFile) -> str:
    """Write ``job`` under its root; returns its path relative to the root."""
    rel = f"{JOB_DIR}/run-{uuid.uuid4().hex}.pkl"
    Store(job.root).write_bytes(rel, cloudpickle.dumps(job))
    return rel


def read_job_file(root: str, rel: str) -> JobFile:
    job = cloudpickle.loads(Store(root).read_bytes(rel))
    if not isinstance(job, JobFile):
        raise CheckpointError(f"{rel} under {root} holds a {type(job).__name__}, not a rayflow job file")
    return job


def delete_job_files(root: str, *, keep: str | None = None) -> None:
    """Delete the job files under ``root`` except ``keep`` (best effort: a leftover is only a file)."""
    store = Store(root)
    try:
        for rel in store.list_files(JOB_DIR):
            if rel != keep:
                store.delete(rel)
    except OSError as e:
        logger.warning("rayflow: could not delete old job files under %s: %s", root, e)
