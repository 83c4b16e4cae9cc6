"""Autoscaling end to end on real Ray: a rate step grows the group, the drop shrinks it, every
action is an ``autoscale`` event in the catalog, and the result is exact (docs/autoscaling.md)."""

from __future__ import annotations

import json

import duckdb
import pytest
from ray._common.test_utils import wait_for_condition

import rayflow as rf
from rayflow.testing import assert_same_rows, keyed_reference, throttle

pytestmark = pytest.mark.ray

AGGS = [("value", "count"), ("value", "sum")]
#: A consumer processes 50k rows/s (a sleep per batch: a call to a slow service, so that the
#: consumers' capacity adds up on a 2-core machine): 20k/s needs 1 consumer at 0.7 utilization,
#: 100k/s needs 3.
PER_CONSUMER = 50_000
PROFILE = [(1.5, 20_000), (2.5, 100_000), (5.0, 20_000)]
EVENTS = sum(int(s * r) for s, r in PROFILE)


def test_rate_step_grows_then_shrinks_the_group_exactly(ray_session, tmp_path):
    src = rf.sources.Synthetic(rate=PROFILE, events=EVENTS, keys=2_000, seed=11)
    run = rf.Pipeline(
        name="autoscale",
        source=src,
        key="key",
        partitions=4,
        operator=[throttle(PER_CONSUMER), rf.ops.Aggregate(by="key", aggs=AGGS)],
        sink=rf.sinks.Collect(),
        checkpoint_dir=str(tmp_path / "ck"),
        checkpoint_interval_s=0.5,
        progress=False,
        autoscale=rf.Autoscale(
            min_consumers=1,
            max_consumers=4,
            target_utilization=0.7,
            interval_s=0.5,
            catch_up_s=5.0,
            stabilization_s=1.0,
            cooldown_s=1.0,
            scale_down_delay_s=1.5,
        ),
    ).start()
    try:
        assert len(run.consumers) == 1  # starts with min_consumers
        # The step up: the group grows (status shows the decision and its numbers).
        wait_for_condition(
            lambda: run.status()["autoscale"]["target"] >= 2, timeout=30, retry_interval_ms=200
        )
        up = next(d for d in run.status()["autoscale"]["decisions"] if d["action"] == "scale_up")
        assert up["rows_per_busy_s"] > 0 and up["needed"] > 1 and up["input_rows_per_s"] > 0
        result = run.wait(timeout_s=60)
    finally:
        run.stop()
    assert_same_rows(result.output, keyed_reference(src.to_table()))

    con = duckdb.connect(run.paths.catalog, read_only=True)
    try:
        rows = con.sql("SELECT detail FROM events WHERE kind = 'autoscale' ORDER BY ts").fetchall()
    finally:
        con.close()
    actions = [json.loads(r[0]) for r in rows]
    kinds = [a["action"] for a in actions]
    assert "scale_up" in kinds and "scale_down" in kinds, actions
    assert kinds.index("scale_up") < len(kinds) - 1 - kinds[::-1].index("scale_down")  # grew, then shrank
    assert max(a["target"] for a in actions) >= 2
    down = actions[len(kinds) - 1 - kinds[::-1].index("scale_down")]
    assert down["target"] < max(a["target"] for a in actions)
    assert {"reason", "current", "needed", "lag_rows", "busy_fraction", "demand_rows_per_s"} <= set(down)
