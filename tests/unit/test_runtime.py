"""The driver's pure start steps: paths resolved once, node-local storage refused on a cluster."""

from __future__ import annotations

import pytest

import rayflow as rf
from rayflow._internal.runtime import JobSpec, check_storage, resolve_paths


def spec(checkpoint_dir="ck", sink=None) -> JobSpec:
    return JobSpec(
        name="job",
        source=rf.sources.Synthetic(events=10),
        key=("key",),
        partitions=2,
        operators=(),
        sink=sink or rf.sinks.Collect(),
        consumers=1,
        checkpoint_dir=checkpoint_dir,
    )


def test_relative_paths_resolve_against_the_driver_cwd():
    p = resolve_paths(spec("ck", rf.sinks.Parquet("out/x")), cwd="/data/run")
    assert p.root == "/data/run/ck/job"
    assert p.catalog.startswith("/data/run/ck/job/")
    assert p.sink_root == p.output_path == "/data/run/out/x"
    p = resolve_paths(spec("../ck"), cwd="/data/run")
    assert p.root == "/data/ck/job" and p.sink_root == "/data/ck/job/collect"


def test_uris_are_left_as_they_are():
    uri = "s3://bucket/ck?endpoint_override=127.0.0.1:9000"
    p = resolve_paths(spec(uri), cwd="/data/run")
    assert p.root == "s3://bucket/ck/job?endpoint_override=127.0.0.1:9000"
    assert p.sink_root.startswith("s3://bucket/ck/job/collect")


def test_a_pipeline_keeps_the_checkpoint_interval_in_the_config():
    p = rf.Pipeline(name="j", source=rf.sources.Synthetic(events=10), key="key", checkpoint_interval_s=0.3)
    assert p.config.checkpoint_interval_s == 0.3 == p.checkpoint_interval_s
    cfg = rf.EngineConfig(checkpoint_interval_s=0.7)
    assert rf.Pipeline(name="j", source=rf.sources.Synthetic(events=10), key="key", config=cfg).config is cfg


def test_node_local_storage_is_refused_on_a_multi_node_cluster():
    local = resolve_paths(spec("/ck"), cwd="/")
    check_storage(local, alive_nodes=1, shared=False)
    check_storage(local, alive_nodes=3, shared=True)
    with pytest.raises(rf.errors.ConfigError, match=r"3 nodes.*\['/ck'\].*s3://.*local_paths_shared=True"):
        check_storage(local, alive_nodes=3, shared=False)
    remote = resolve_paths(spec("s3://b/ck"), cwd="/")
    check_storage(remote, alive_nodes=3, shared=False)
    # A local Parquet sink is refused too (consumers stage there, the manager publishes).
    mixed = resolve_paths(spec("s3://b/ck", rf.sinks.Parquet("/out")), cwd="/")
    with pytest.raises(rf.errors.ConfigError, match=r"\['/out'\]"):
        check_storage(mixed, alive_nodes=2, shared=False)
