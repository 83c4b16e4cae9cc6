"""Review of issue 11 (joins, inputs, stages): regressions without Ray (see also
tests/integration/test_review_joins.py)."""

from __future__ import annotations

import types

import pyarrow as pa
import pyarrow.compute as pc
import pytest

import rayflow as rf
from rayflow._internal.source_actor import SourceActor, _Reader
from rayflow._internal.watermarks import WATERMARK_END, WATERMARK_NONE, EventTime, PartitionClock
from rayflow.errors import ConfigError, InputError
from rayflow.sources.base import Split

_watermarks = SourceActor.__ray_metadata__.modified_class._watermarks


class _S(Split):
    def __init__(self, name):
        self.name = name
        self.unbounded = False
        self.dense = True

    def read(self, position):  # pragma: no cover - never read here
        return iter(())


def _actor(*, splits: dict[str, bool], discovery_done: bool, index: int = 0):
    """The state ``SourceActor._watermarks`` reads, of an actor of a stage's upstream (a bounded
    dynamic source): ``splits`` name -> done."""
    readers = {n: _Reader(_S(n), 0, done=d) for n, d in splits.items()}
    return types.SimpleNamespace(
        event_time=EventTime(column="ts"),
        unbounded=False,
        source=object(),
        _staged=True,
        index=index,
        _discovery_done=discovery_done,
        frontier={n: 1 for n in splits},
        split_wm={n: WATERMARK_NONE for n in splits},
        readers=readers,
    )


def test_a_source_actor_still_listing_an_upstream_holds_the_partition_watermark():
    """Regression (review of issue 11: the q5/q7 flake; integration reproduction:
    test_stage2_watermark_ends_while_another_source_actor_has_not_listed_the_last_files).
    Stage 2 with two source actors: source 0 has seen the upstream's marker and read its files
    (its splits are at WATERMARK_END); source 1 has not listed since the marker, so files the
    upstream published last are not even known to it. source_actor._watermarks (the
    ``not self._discovery_done`` branch) reports source 1's splits as *idle*, and
    PartitionClock.target skips idle splits: the partition's watermark goes to the end of
    time, every window closes, and source 1's last files arrive late (dropped). The same
    happens right after a stage-2 source actor restarts (``_discovery_done`` is False again)
    while the other one has finished.

    Fix (source_actor): before its last listing, a bounded dynamic source must hold the
    watermark back, not skip its splits: report them with no new watermark (None) and none
    idle, plus one pseudo split per actor (e.g. ``"<discovery:source-i>"``) at WATERMARK_NONE
    until its discovery is done (then WATERMARK_END), so an actor with no split yet holds it
    too."""
    clock = PartitionClock()
    done0 = _actor(splits={"a-0.parquet": True}, discovery_done=True)
    listing1 = _actor(splits={"b-0.parquet": True}, discovery_done=False, index=1)
    for source, actor in ((0, done0), (1, listing1)):
        wms, idle = _watermarks(actor)
        clock.told(source, wms, idle)
    assert clock.target(2) == WATERMARK_NONE, (
        "the watermark moved to the end of time while source 1 has not listed the upstream's last "
        f"files (target {clock.target(2)}, END is {WATERMARK_END})"
    )


def test_a_source_actor_with_no_split_yet_holds_the_partition_watermark():
    """As above, with source 1 holding no split at all yet (every file the upstream published
    so far hashed to source 0: ``owner_of``): it reports nothing, so nothing holds the
    partition back once source 0 is done."""
    clock = PartitionClock()
    clock.told(0, *_watermarks(_actor(splits={"a-0.parquet": True}, discovery_done=True)))
    clock.told(1, *_watermarks(_actor(splits={}, discovery_done=False, index=1)))
    assert clock.target(2) == WATERMARK_NONE, clock


def test_a_stage_key_the_upstream_does_not_emit_is_refused_when_the_pipeline_is_built():
    """WEAK CHECK: ``rf.Stage(key=...)`` naming a column the upstream stage does not emit is
    accepted by ``rf.Pipeline(...)``; it fails only at ``start()``, after stage 1's actors have
    been started (StagedRun starts the stages in order, then stops them). The upstream's output
    schema is known here (``Pipeline.output_schema``, which Upstream already computes): check
    the stage's key (and its operators) against it in ``_stage_pipelines``."""
    t = pa.table({"k": [1, 2], "v": [1, 2]})
    with pytest.raises((ConfigError, InputError), match="nope"):
        rf.Pipeline(
            name="rv-stagekey",
            source=rf.sources.Table(t),
            key="k",
            operator=rf.ops.Filter(pc.field("v") > 0),
            stages=[rf.Stage(key="nope", operator=rf.ops.Aggregate(by="nope", aggs=[("v", "count")]))],
            sink=rf.sinks.Parquet("/tmp/rv-never-written"),
            checkpoint_dir="/tmp/rv-never-written-ck",
        )
