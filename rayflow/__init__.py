"""rayflow: a parallel stream engine on Ray.

Events arrive as Arrow record batches, are hashed by key into partitions, and
a consumer group of stateful Ray actors processes the partitions in parallel,
committing state and positions to Parquet and DuckDB so that any actor can
die and the job resumes with nothing lost and nothing counted twice::

    import rayflow as rf

    result = rf.Pipeline(
        name="clicks",
        source=rf.sources.Synthetic(events=1_000_000),
        key="key",
        operator=rf.ops.Aggregate(by="key", aggs=[("value", "count"), ("value", "sum")]),
        sink=rf.sinks.Collect(),
    ).run()
"""

from rayflow import errors, ops, partitioning, sinks, sources
from rayflow.config import Autoscale, EngineConfig, Splits
from rayflow.pipeline import Pipeline, Result, Run, Stage, StagedRun
from rayflow.tiers import Tier

__version__ = "0.1.0"

__all__ = [
    "Autoscale",
    "EngineConfig",
    "Pipeline",
    "Result",
    "Run",
    "Splits",
    "Stage",
    "StagedRun",
    "Tier",
    "__version__",
    "errors",
    "ops",
    "partitioning",
    "sinks",
    "sources",
]
