"""Write ``dashboards/rayflow.json``: the Grafana dashboard of rayflow's Prometheus metrics.

    python dashboards/build.py          # rewrites dashboards/rayflow.json next to this file

The JSON is generated so that every panel follows one pattern (a Prometheus datasource chosen by
the ``datasource`` variable, series filtered by the ``pipeline`` and ``partition`` variables);
edit the panels here, run this, and commit both. ``tests/integration/test_observability.py``
checks that the committed JSON is this script's output and that every metric name it queries is
exported by a running job.

Names are as Prometheus scrapes them from a Ray node: Ray prefixes ``ray_``, a counter gains
``_total``, a histogram ``_bucket`` / ``_sum`` / ``_count`` (see ``rayflow/_internal/metrics.py``).
Gauges that only grow (``processed_rows``, ``blocked_s``, ``late_rows``) are read with ``rate()``,
which treats a drop (an actor restarted) as a reset, as it does for a counter.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).with_name("rayflow.json")

P = 'pipeline=~"$pipeline"'
PP = 'pipeline=~"$pipeline", partition=~"$partition"'
BY_PART = "{{pipeline}} p{{partition}}"
DS = {"type": "prometheus", "uid": "${datasource}"}
#: The busiest partition's rate over the mean rate, per pipeline.
SKEW = (
    f"max by (pipeline) (ray_rayflow_partition_rows_per_s{{{P}}}) / "
    f"avg by (pipeline) (max by (pipeline, partition) (ray_rayflow_partition_rows_per_s{{{P}}}))"
)
#: Query B of a panel on a right-hand axis, in seconds.
RIGHT_AXIS_B_S = {
    "matcher": {"id": "byFrameRefID", "options": "B"},
    "properties": [{"id": "custom.axisPlacement", "value": "right"}, {"id": "unit", "value": "s"}],
}


class Layout:
    """Places panels left to right, 24 columns wide, and rows of panels one under another."""

    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.x = self.y = 0
        self.row_h = 0

    def row(self, title: str) -> None:
        self.newline()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "id": len(self.panels) + 1,
                "panels": [],
            }
        )
        self.y += 1

    def newline(self) -> None:
        self.y += self.row_h
        self.x, self.row_h = 0, 0

    def add(self, panel: dict, w: int, h: int) -> None:
        if self.x + w > 24:
            self.newline()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        panel["id"] = len(self.panels) + 1
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def gauge(metric: str) -> str:
    """A per-partition gauge, one series per partition: the manager exports it, and Ray tags each
    series with the exporting worker (``WorkerId``), so a restarted manager's old series may
    linger a while next to the new one; ``max`` keeps one."""
    return f"max by (pipeline, partition) ({metric}{{{PP}}})"


def target(expr: str, legend: str, ref: str = "A") -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def series(
    title: str,
    description: str,
    targets: list[dict],
    unit: str = "short",
    overrides: list | None = None,
    **fields,
) -> dict:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": targets,
        "fieldConfig": {
            "defaults": {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 5}, **fields},
            "overrides": overrides or [],
        },
        "options": {
            "legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(
    title: str, description: str, expr: str, unit: str = "short", thresholds: list | None = None
) -> dict:
    steps = [{"color": "green", "value": None}] + [{"color": c, "value": v} for v, c in thresholds or []]
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [target(expr, "{{pipeline}}")],
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
            "overrides": [],
        },
        "options": {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value", "graphMode": "area"},
    }


def panels() -> list[dict]:
    g = Layout()
    g.row("Overview")
    g.add(stat("Consumers", "Live members of the consumer group.", f"max by (pipeline) (ray_rayflow_consumers{{{P}}})"), 4, 4)  # fmt: skip
    g.add(stat("Lag (rows)", "Rows of the input not yet committed, all partitions.", f"sum by (pipeline) (max by (pipeline, partition) (ray_rayflow_partition_lag_rows{{{P}}}))"), 4, 4)  # fmt: skip
    g.add(stat("Lag (s)", "The most lagging partition, in seconds behind the head of the input (an estimate).", f"max by (pipeline) (ray_rayflow_partition_lag_s{{{P}}})", "s", [(30, "orange"), (300, "red")]), 4, 4)  # fmt: skip
    g.add(stat("Rows/s", "Processing rate, all partitions.", f"sum by (pipeline) (max by (pipeline, partition) (ray_rayflow_partition_rows_per_s{{{P}}}))", "rowsps"), 4, 4)  # fmt: skip
    g.add(stat("Oldest last commit", "The partition whose last commit is oldest: seconds since it. Old with lag > 0: a stuck partition (docs/runbooks.md).", f"max by (pipeline) (ray_rayflow_partition_last_commit_age_s{{{P}}})", "s", [(10, "orange"), (60, "red")]), 4, 4)  # fmt: skip
    g.add(stat("Skew", "The busiest partition's rate over the mean rate: 1 is even; well above 1, a hot partition.", SKEW, "short", [(2, "orange"), (4, "red")]), 4, 4)  # fmt: skip

    g.row("Lag")
    g.add(series("Lag per partition (rows)", "Rows of the input not yet committed: queued at the sources, plus the partition's share of what a live source has not read yet (rayflow status: lag rows).", [target(gauge("ray_rayflow_partition_lag_rows"), BY_PART)]), 12, 8)  # fmt: skip
    g.add(series("Lag per partition (s)", "How far behind the head of the input, in seconds: lag rows over the arrival rate (rayflow status: lag s).", [target(gauge("ray_rayflow_partition_lag_s"), BY_PART)], "s"), 12, 8)  # fmt: skip
    g.add(series("Lag growth (rows/s)", "How fast the lag grows (> 0: the partition falls behind) or drains (< 0).", [target(f"max by (pipeline, partition) (deriv(ray_rayflow_partition_lag_rows{{{PP}}}[$__rate_interval]))", BY_PART)], "rowsps"), 12, 8)  # fmt: skip
    g.add(series("Event-time lag (s)", "Now minus the partition's watermark (jobs with event time only).", [target(gauge("ray_rayflow_partition_event_time_lag_s"), BY_PART)], "s"), 12, 8)  # fmt: skip
    g.add(series("Watermark", "The partition's event-time watermark: windows ending before it are closed and emitted.", [target(gauge("ray_rayflow_partition_watermark_ms"), BY_PART)], "dateTimeAsIso"), 24, 8)  # fmt: skip

    g.row("Throughput")
    g.add(series("Rows/s per partition", "Smoothed processing rate of each partition (rayflow status: rows/s).", [target(gauge("ray_rayflow_partition_rows_per_s"), BY_PART)], "rowsps"), 12, 8)  # fmt: skip
    g.add(series("Rows/s per consumer", "Rows processed by each consumer.", [target(f"sum by (pipeline, consumer) (rate(ray_rayflow_consumer_rows_total{{{P}}}[$__rate_interval]))", "{{pipeline}} {{consumer}}")], "rowsps"), 12, 8)  # fmt: skip
    g.add(series("Processed rows per partition", "Rows processed so far.", [target(gauge("ray_rayflow_partition_processed_rows"), BY_PART)]), 12, 8)  # fmt: skip
    g.add(series("Skew (max / mean rate)", "The busiest partition's rate over the mean rate; a hot partition keeps this well above 1.", [target(SKEW, "{{pipeline}}")]), 12, 8)  # fmt: skip

    g.row("Commits and backpressure")
    g.add(series("Seconds since the last commit", "Per partition. A healthy partition with lag commits every checkpoint interval; rayflow status marks it stalled past 5 intervals (at least 10 s).", [target(gauge("ray_rayflow_partition_last_commit_age_s"), BY_PART)], "s"), 12, 8)  # fmt: skip
    g.add(series("Time blocked by backpressure", "Share of time the sources waited on the partition's full queue (1 = always): its consumer cannot keep up.", [target(f"max by (pipeline, partition) (rate(ray_rayflow_partition_blocked_s{{{PP}}}[$__rate_interval]))", BY_PART)], "percentunit"), 12, 8)  # fmt: skip
    g.add(series("Queued bytes per partition", "Bytes read by the sources and held in the partition's queue (object store), not yet committed.", [target(gauge("ray_rayflow_partition_queued_bytes"), BY_PART)], "bytes"), 12, 8)  # fmt: skip
    g.add(series("Spilled bytes per partition", "Bytes of the partition's queue spilled to the source node's local disk.", [target(gauge("ray_rayflow_partition_spilled_bytes"), BY_PART)], "bytes"), 12, 8)  # fmt: skip

    g.row("State and windows")
    g.add(series("State rows", "Rows of operator state held per partition (operators that report it: windows, joins, top, dedup).", [target(gauge("ray_rayflow_partition_state_rows"), BY_PART)]), 8, 8)  # fmt: skip
    g.add(series("Open windows", "Windows held open in state per partition.", [target(gauge("ray_rayflow_partition_open_windows"), BY_PART)]), 8, 8)  # fmt: skip
    g.add(series("Late rows/s", "Rows that arrived after their window closed.", [target(f"max by (pipeline, partition) (rate(ray_rayflow_partition_late_rows{{{PP}}}[$__rate_interval]))", BY_PART)], "rowsps"), 8, 8)  # fmt: skip

    g.row("Consumer group")
    g.add(series("Consumers", "Live members of the consumer group.", [target(f"max by (pipeline) (ray_rayflow_consumers{{{P}}})", "{{pipeline}}")]), 8, 8)  # fmt: skip
    g.add(series("Rebalances and recoveries", "Per interval: rebalances of the group, and consumers lost and recovered (a steady rise: a crash loop).", [target(f"sum by (pipeline) (increase(ray_rayflow_rebalances_total{{{P}}}[$__rate_interval]))", "{{pipeline}} rebalances"), target(f"sum by (pipeline) (increase(ray_rayflow_recoveries_total{{{P}}}[$__rate_interval]))", "{{pipeline}} recoveries", "B")]), 8, 8)  # fmt: skip
    g.add(series("Lease epoch per partition", "Goes up each time the partition changes owner.", [target(gauge("ray_rayflow_partition_lease_epoch"), BY_PART)]), 8, 8)  # fmt: skip
    quantiles = [
        target(
            f"histogram_quantile({q}, sum by (pipeline, le) (rate(ray_rayflow_step_latency_s_bucket{{{P}}}[$__rate_interval])))",
            f"{{{{pipeline}}}} p{round(q * 100)}",
            ref,
        )
        for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))
    ]
    g.add(series("Step latency quantiles", "Seconds a consumer spends on one fetched step (p50, p95, p99 over all consumers).", quantiles, "s"), 12, 8)  # fmt: skip
    g.add(series("Steps/s and mean step per consumer", "Steps per second per consumer; the mean step time is on the right axis.", [target(f"sum by (pipeline, consumer) (rate(ray_rayflow_step_latency_s_count{{{P}}}[$__rate_interval]))", "{{pipeline}} {{consumer}} steps/s"), target(f"sum by (pipeline, consumer) (rate(ray_rayflow_step_latency_s_sum{{{P}}}[$__rate_interval])) / sum by (pipeline, consumer) (rate(ray_rayflow_step_latency_s_count{{{P}}}[$__rate_interval]))", "{{pipeline}} {{consumer}} mean s", "B")], overrides=[RIGHT_AXIS_B_S]), 12, 8)  # fmt: skip

    g.row("Skew and autoscaling")
    g.add(series("Input rate / mean, per partition", "Each partition's input rate over the mean partition's, from the sources' sketches over the skew window (1: a fair share; docs/skew.md). A partition well above the others is hot: split it (run.split, rf.Splits).", [target(gauge("ray_rayflow_partition_rate_ratio"), BY_PART)]), 12, 8)  # fmt: skip
    g.add(series("Hottest keys' share of the input", "The job's hottest keys, by rank, as a share of all input rows (a lower bound). One key with a large share cannot be split by range: pre-aggregate it (Aggregate(combine_at_source=True)).", [target(f"max by (pipeline, rank, key, partition) (ray_rayflow_hot_key_share{{{P}}}) > 0", "{{pipeline}} #{{rank}} {{key}} (p{{partition}})")], "percentunit"), 12, 8)  # fmt: skip
    g.add(series("Autoscaler: consumers", "Consumers running, the autoscaler's target, and the consumers needed at the target utilization (unrounded; docs/autoscaling.md).", [target(f"max by (pipeline) (ray_rayflow_autoscale_consumers{{{P}}})", "{{pipeline}} running"), target(f"max by (pipeline) (ray_rayflow_autoscale_target_consumers{{{P}}})", "{{pipeline}} target", "B"), target(f"max by (pipeline) (ray_rayflow_autoscale_needed_consumers{{{P}}})", "{{pipeline}} needed", "C")]), 12, 8)  # fmt: skip
    g.add(series("Autoscaler: actions", "Scaling actions per interval, by direction (the reasons are autoscale events in the catalog).", [target(f"sum by (pipeline, action) (increase(ray_rayflow_autoscale_actions_total{{{P}}}[$__rate_interval]))", "{{pipeline}} {{action}}")]), 12, 8)  # fmt: skip
    return g.panels


def variable(name: str, label: str, query: str, *, include_all: bool) -> dict:
    return {
        "type": "query",
        "name": name,
        "label": label,
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": f"rayflow-{name}"},
        "refresh": 2,  # on time range change: a new pipeline shows up
        "multi": True,
        "includeAll": include_all,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]} if include_all else {},
        "sort": 1,
        "hide": 0,
    }


def dashboard() -> dict:
    return {
        "title": "rayflow",
        "uid": "rayflow",
        "description": "rayflow pipelines: lag, throughput, commits, backpressure, state, consumer group "
        "(docs/runbooks.md says what to do about each).",
        "tags": ["rayflow", "ray"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-30m", "to": "now"},
        "annotations": {"list": []},
        "links": [],
        "panels": panels(),
        "templating": {
            "list": [
                {
                    "type": "datasource",
                    "name": "datasource",
                    "label": "Prometheus",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                },
                variable(
                    "pipeline", "Pipeline", "label_values(ray_rayflow_consumers, pipeline)", include_all=True
                ),
                variable(
                    "partition",
                    "Partition",
                    'label_values(ray_rayflow_partition_lag_rows{pipeline=~"$pipeline"}, partition)',
                    include_all=True,
                ),
            ]
        },
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
