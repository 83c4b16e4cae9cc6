"""Prometheus metrics through ``ray.util.metrics`` (DESIGN §7).

Ray's per-node metrics agent exports them (names get Ray's ``ray_`` prefix) on
the node's metrics port, where Prometheus or the Ray dashboard scrape them.
The manager publishes the per-partition figures, the consumers their step
latency. Every series is tagged with the pipeline's name.
"""

from __future__ import annotations

import time

from ray.util.metrics import Counter, Gauge, Histogram

from rayflow._internal.lag import add_lag

_P = ("pipeline", "partition")


class ManagerMetrics:
    def __init__(self, pipeline: str):
        self.pipeline = pipeline
        self.lag = Gauge(
            "rayflow_partition_lag_rows",
            "Rows of the input not yet committed: queued at the sources, or not yet read from a live source.",
            _P,
        )
        self.lag_s = Gauge(
            "rayflow_partition_lag_s", "How far behind the head of the input, in seconds (an estimate).", _P
        )
        self.commit_age = Gauge("rayflow_partition_last_commit_age_s", "Seconds since the last commit.", _P)
        self.processed = Gauge("rayflow_partition_processed_rows", "Rows processed so far.", _P)
        self.rate = Gauge("rayflow_partition_rows_per_s", "Smoothed processing rate.", _P)
        self.epoch = Gauge("rayflow_partition_lease_epoch", "Current lease epoch.", _P)
        self.blocked = Gauge(
            "rayflow_partition_blocked_s",
            "Seconds the sources paused reading on this partition's account.",
            _P,
        )
        self.queued_bytes = Gauge(
            "rayflow_partition_queued_bytes", "Bytes of read, uncommitted rows in the object store.", _P
        )
        self.spilled_bytes = Gauge(
            "rayflow_partition_spilled_bytes", "Bytes of read, uncommitted rows spilled to local disk.", _P
        )
        self.watermark = Gauge(
            "rayflow_partition_watermark_ms", "The partition's event-time watermark (ms since the epoch).", _P
        )
        self.event_lag = Gauge(
            "rayflow_partition_event_time_lag_s", "Event-time lag: now minus the watermark, in seconds.", _P
        )
        self.late_rows = Gauge(
            "rayflow_partition_late_rows", "Rows that arrived after their window closed (all policies).", _P
        )
        self.open_windows = Gauge("rayflow_partition_open_windows", "Windows held open in state.", _P)
        self.state_rows = Gauge("rayflow_partition_state_rows", "Rows of operator state held.", _P)
        self.rate_ratio = Gauge(
            "rayflow_partition_rate_ratio",
            "The partition's input rate over the mean partition's, over the skew window (1: a fair share).",
            _P,
        )
        self.skew = Gauge(
            "rayflow_skew", "The largest partition input rate over the mean (docs/skew.md).", ("pipeline",)
        )
        # Tagged by rank and key: a series per key that reaches the top (a few; they change rarely).
        self.hot_key_share = Gauge(
            "rayflow_hot_key_share",
            "Share of all input rows of the job's hottest keys (a lower bound), by rank.",
            ("pipeline", "rank", "key", "partition"),
        )
        self.consumers = Gauge("rayflow_consumers", "Live members of the consumer group.", ("pipeline",))
        self.rebalances = Counter("rayflow_rebalances", "Rebalances of the consumer group.", ("pipeline",))
        self.recoveries = Counter("rayflow_recoveries", "Consumers lost and recovered.", ("pipeline",))
        self._seen = {"rebalances": 0, "recoveries": 0}
        self._hot_shown: set[tuple] = set()  # the hot-key series set last (zeroed once they leave)

    def publish(self, status: dict, sources: list[dict]) -> None:
        tags = {"pipeline": self.pipeline}
        for part in status["partitions"]:
            part.setdefault("queued_rows", sum(s["queued_rows"][part["partition"]] for s in sources))
        add_lag(status, sources, wall=time.time())
        for part in status["partitions"]:
            p = part["partition"]
            t = {"pipeline": self.pipeline, "partition": str(p)}
            self.lag.set(part["lag_rows"], tags=t)
            if part["lag_s"] is not None:
                self.lag_s.set(part["lag_s"], tags=t)
            if part["last_commit_age_s"] is not None:
                self.commit_age.set(part["last_commit_age_s"], tags=t)
            self.processed.set(part["processed_rows"], tags=t)
            self.rate.set(part["load_rows_per_s"], tags=t)
            self.epoch.set(part["lease_epoch"], tags=t)
            self.blocked.set(sum(s["blocked_s"][p] for s in sources), tags=t)
            self.queued_bytes.set(sum(s["queued_bytes"][p] for s in sources), tags=t)
            self.spilled_bytes.set(sum(s["spilled_bytes"][p] for s in sources), tags=t)
            if part.get("watermark_ms") is not None and part.get("event_time_lag_s") is not None:
                self.watermark.set(part["watermark_ms"], tags=t)
                self.event_lag.set(part["event_time_lag_s"], tags=t)
            ops = part.get("operators") or {}
            for name, gauge in (
                ("late_rows", self.late_rows),
                ("open_windows", self.open_windows),
                ("state_rows", self.state_rows),
            ):
                if name in ops:
                    gauge.set(ops[name], tags=t)
        self._publish_skew(status)
        self.consumers.set(len(status["members"]), tags=tags)
        for name, counter in (("rebalances", self.rebalances), ("recoveries", self.recoveries)):
            delta = status[name] - self._seen[name]
            if delta > 0:
                counter.inc(delta, tags=tags)
                self._seen[name] = status[name]

    def _publish_skew(self, status: dict) -> None:
        """The skew gauges (``skew.add_skew`` figures, added by ``add_lag``)."""
        for part in status["partitions"]:
            if part.get("rate_ratio") is not None:
                t = {"pipeline": self.pipeline, "partition": str(part["partition"])}
                self.rate_ratio.set(part["rate_ratio"], tags=t)
        if status.get("skew") is not None:
            self.skew.set(status["skew"], tags={"pipeline": self.pipeline})
        shown = set()
        for rank, x in enumerate(status.get("hot_keys") or [], start=1):
            t = {
                "pipeline": self.pipeline,
                "rank": str(rank),
                "key": str(x["key"]),
                "partition": str(x["partition"]),
            }
            self.hot_key_share.set(x["share"], tags=t)
            shown.add(tuple(t.items()))
        # A gauge series keeps its last value until set again: a key that left the top (or moved
        # to another rank) would go on showing its old share next to the keys now there. Zeroed.
        for gone in self._hot_shown - shown:
            self.hot_key_share.set(0.0, tags=dict(gone))
        self._hot_shown = shown


class ConsumerMetrics:
    def __init__(self, pipeline: str, member: str):
        self.tags = {"pipeline": pipeline, "consumer": member}
        self.step = Histogram(
            "rayflow_step_latency_s",
            "Seconds a consumer spent processing one fetched step.",
            boundaries=[0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
            tag_keys=("pipeline", "consumer"),
        )
        self.rows = Counter(
            "rayflow_consumer_rows", "Rows processed by a consumer.", ("pipeline", "consumer")
        )

    def observe(self, seconds: float, rows: int) -> None:
        self.step.observe(seconds, tags=self.tags)
        if rows:
            self.rows.inc(rows, tags=self.tags)


class AutoscaleMetrics:
    """The autoscaler's figures (exported from the driver's process)."""

    def __init__(self, pipeline: str):
        self.tags = {"pipeline": pipeline}
        self.target = Gauge(
            "rayflow_autoscale_target_consumers", "Consumers the autoscaler wants.", ("pipeline",)
        )
        self.current = Gauge(
            "rayflow_autoscale_consumers", "Consumers running, as the autoscaler sees them.", ("pipeline",)
        )
        self.needed = Gauge(
            "rayflow_autoscale_needed_consumers",
            "Consumers needed at the target utilization, unrounded (DS2 estimate).",
            ("pipeline",),
        )
        self.actions = Counter(
            "rayflow_autoscale_actions", "Scaling actions, by direction.", ("pipeline", "action")
        )

    def publish(self, decision, *, consumers: int) -> None:
        self.target.set(decision.target, tags=self.tags)
        self.current.set(consumers, tags=self.tags)
        if decision.needed is not None:
            self.needed.set(decision.needed, tags=self.tags)
        if decision.action != "hold":
            self.actions.inc(1, tags={**self.tags, "action": decision.action})
