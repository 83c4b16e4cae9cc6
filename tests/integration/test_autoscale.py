"""Autoscaling end to end on real Ray: a rate step grows the group, the drop shrinks it, every
action is an ``autoscale`` event in the catalog, and the result is exact (docs/autoscaling.md).

No step of it depends on timing: the input is an endless paced stream (a step up, then a low rate
for ever), the test waits for the growth and then for the shrink however long they take on a
loaded machine, then stops with a drain (a consistent cut) and compares with DuckDB's GROUP BY
over exactly the rows the cut covers."""

from __future__ import annotations

import json
import math

import duckdb
import pytest
from ray._common.test_utils import wait_for_condition

import rayflow as rf
from rayflow.testing import assert_same_rows, duckdb_reference, keyed_reference, throttle
from tests.integration.test_observability import (
    AUTOSCALE_METRICS,
    base_name,
    dashboard_metrics,
    scrape,
    scraped_names,
)

pytestmark = pytest.mark.ray

AGGS = [("value", "count"), ("value", "sum")]
#: A consumer processes 50k rows/s (a sleep per batch: a call to a slow service, so that the
#: consumers' capacity adds up on a 2-core machine): 20k/s needs 1 consumer at 0.7 utilization,
#: 100k/s needs 3.
PER_CONSUMER = 50_000
#: The step up, then the low rate until the test stops the job (once it has seen the shrink).
PROFILE = [(1.5, 20_000), (2.5, 100_000), (math.inf, 20_000)]
KEYS, SEED = 2_000, 11
#: The latest change of each key: what the Aggregate's upsert stream says now.
LATEST = (
    "SELECT key, value_count, value_sum FROM x "
    "QUALIFY row_number() OVER (PARTITION BY key ORDER BY _version DESC) = 1"
)


def test_rate_step_grows_then_shrinks_the_group_exactly(ray_session, metrics_port, tmp_path):
    src = rf.sources.Synthetic(rate=PROFILE, keys=KEYS, seed=SEED)
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
        peak = [1]

        def target() -> int:
            t = run.status()["autoscale"]["target"]
            peak[0] = max(peak[0], t)
            return t

        # The step up: the group grows (status shows the decision and its numbers).
        wait_for_condition(lambda: target() >= 2, timeout=60, retry_interval_ms=200)
        up = next(d for d in run.status()["autoscale"]["decisions"] if d["action"] == "scale_up")
        assert up["rows_per_busy_s"] > 0 and up["needed"] > 1 and up["input_rows_per_s"] > 0
        # Back at the low rate for good: the group shrinks, whenever the guards let it.
        wait_for_condition(lambda: target() < peak[0], timeout=90, retry_interval_ms=200)
        wait_for_condition(lambda: len(run.consumers) < peak[0], timeout=60, retry_interval_ms=200)
        # The driver's autoscaler metrics reach the node's Prometheus port under the names the
        # Grafana dashboard queries (the scale actions included).
        wanted = {n for n in dashboard_metrics() if base_name(n) in AUTOSCALE_METRICS}
        assert len(wanted) == 4, wanted
        wait_for_condition(
            lambda: wanted <= scraped_names(scrape(metrics_port), pipeline="autoscale"),
            timeout=30, retry_interval_ms=500,
        )  # fmt: skip
        result = run.stop(drain=True)
    finally:
        run.stop()
    assert run.autoscaler is not None and not run.autoscaler._thread.is_alive()  # stopped with the run
    assert result.stats["drained"], "a drained stop: every partition at the same cut"
    events = result.stats["events"]
    assert events > 0
    # The cut covers the stream's first `events` rows: the paced stream's rows are the unpaced one's.
    read = rf.sources.Synthetic(events=events, keys=KEYS, seed=SEED, splits=1).to_table()
    assert_same_rows(duckdb_reference(LATEST, x=result.output), keyed_reference(read))

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
