"""The public surface is small and pinned (STYLE §7)."""

import rayflow as rf


def test_public_names_are_pinned():
    assert rf.__all__ == sorted(rf.__all__)
    assert rf.__all__ == [
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
    assert rf.sources.__all__ == [
        "CSV",
        "Files",
        "Input",
        "JSON",
        "Kafka",
        "Nexmark",
        "Parquet",
        "Source",
        "Split",
        "Synthetic",
        "Table",
        "Upstream",
    ]
    assert rf.ops.__all__ == [
        "Aggregate",
        "Dedup",
        "Filter",
        "Join",
        "Lookup",
        "Map",
        "Operator",
        "Top",
        "Window",
    ]
    assert rf.sinks.__all__ == ["Collect", "DuckDB", "Kafka", "Parquet", "Sink"]


def test_error_tree_mixes_in_builtins():
    e = rf.errors
    assert issubclass(e.ConfigError, ValueError) and issubclass(e.ConfigError, e.RayflowError)
    assert issubclass(e.MissingKeyColumnError, KeyError)
    assert issubclass(e.UnsupportedKeyTypeError, TypeError)
    assert issubclass(e.SourceNotFoundError, FileNotFoundError)
    assert issubclass(e.PipelineFailedError, RuntimeError)
