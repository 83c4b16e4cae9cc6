"""Metrics reach the node's Prometheus port; the CLI reads status and checkpoints."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import pytest
from ray._common.test_utils import wait_for_condition

import rayflow as rf
from rayflow.testing import throttle

pytestmark = pytest.mark.ray


def scrape(port: int) -> str:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return ""


def test_metrics_are_scraped_from_the_node(ray_session, metrics_port, tmp_path):
    run = rf.Pipeline(
        name="metrics",
        source=rf.sources.Synthetic(events=400_000, keys=1000),
        key="key",
        partitions=3,
        operator=[throttle(20_000), rf.ops.Aggregate(by="key", aggs=[("value", "sum")])],
        consumers=2,
        checkpoint_dir=str(tmp_path / "ck"),
        checkpoint_interval_s=0.2,
        config=rf.EngineConfig(fetch_max_bytes=50_000),
        progress=False,
    ).start()
    try:
        wanted = [
            "ray_rayflow_partition_lag_rows{",
            "ray_rayflow_partition_processed_rows{",
            "ray_rayflow_partition_rows_per_s{",
            "ray_rayflow_step_latency_s_bucket{",
            "ray_rayflow_consumers{",
        ]

        def all_there() -> bool:
            body = scrape(metrics_port)
            return all(
                any(w in line and 'pipeline="metrics"' in line for line in body.splitlines()) for w in wanted
            )

        wait_for_condition(all_there, timeout=60, retry_interval_ms=500)
        body = scrape(metrics_port)
        lines = [x for x in body.splitlines() if x.startswith("ray_rayflow_partition_lag_rows{")]
        assert {f'partition="{p}"' in " ".join(lines) for p in range(3)} == {True}
    finally:
        run.stop()


def test_cli_status_checkpoints_and_sql(ray_session, tmp_path):
    ck = tmp_path / "ck"
    rf.Pipeline(
        name="cli",
        source=rf.sources.Synthetic(events=50_000, keys=300),
        key="key",
        partitions=3,
        operator=rf.ops.Aggregate(by="key", aggs=[("value", "count")]),
        consumers=1,
        checkpoint_dir=str(ck),
        progress=False,
    ).run(timeout_s=120)

    def cli(*args) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "rayflow.cli", *args], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    listing = cli("checkpoints", str(ck))
    assert "== cli" in listing and listing.count("True") == 3
    total = cli("sql", str(ck), "SELECT sum(value_count) AS n FROM state")
    assert "50000" in total
    events = cli("sql", str(ck), "SELECT kind FROM events WHERE kind = 'rebalance' LIMIT 1")
    assert "rebalance" in events
    bad = subprocess.run(
        [sys.executable, "-m", "rayflow.cli", "checkpoints", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "no rayflow checkpoints under" in bad.stderr


def test_cli_status_reads_a_running_job_from_another_process(ray_session, tmp_path):
    import ray

    run = rf.Pipeline(
        name="live", source=rf.sources.Synthetic(events=300_000, keys=1000), key="key", partitions=3,
        operator=[throttle(20_000), rf.ops.Aggregate(by="key", aggs=[("value", "sum")])], consumers=2,
        checkpoint_dir=str(tmp_path / "ck"), config=rf.EngineConfig(fetch_max_bytes=50_000), progress=False,
    )  # fmt: skip
    live = run.start()
    try:
        wait_for_condition(lambda: live.status()["processed_rows"] > 0, timeout=60)
        address = ray.get_runtime_context().gcs_address
        out = subprocess.run(
            [sys.executable, "-m", "rayflow.cli", "status", "live", "--address", address],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        assert "pipeline live: members consumer-0, consumer-1" in out.stdout, out.stdout
        assert out.stdout.count("consumer-") >= 3 + 2  # an owner on each partition row
        missing = subprocess.run(
            [sys.executable, "-m", "rayflow.cli", "status", "nope", "--address", address],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert missing.returncode == 1 and "no running pipeline named 'nope'" in missing.stderr
    finally:
        live.stop()
