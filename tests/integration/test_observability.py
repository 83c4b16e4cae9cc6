"""Metrics reach the node's Prometheus port under the Grafana dashboard's names; the CLI reads
status (once and ``--watch``) and checkpoints."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import select
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from ray._common.test_utils import wait_for_condition

import rayflow as rf
from rayflow.testing import kill_actor

pytestmark = pytest.mark.ray


def scrape(port: int) -> str:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return ""


def test_metrics_dashboard_and_live_status_of_a_running_job(ray_session, metrics_port, tmp_path):
    """One running job (a live stream, event time, windows, 2 consumers) serves every live view,
    to pay for one job start: ``rayflow status`` reads it from another process, once and with
    ``--watch`` in a pseudo-terminal, whose figures refresh in place until Ctrl-C ends it with
    exit 0; its metrics reach the node's Prometheus port under every name the Grafana dashboard
    queries (a consumer is killed so that recoveries are counted too)."""
    import ray

    run = rf.Pipeline(
        name="live", source=rf.sources.Synthetic(rate=20_000, keys=1000, splits=2), key="key", partitions=3,
        operator=rf.ops.Window("key", [("value", "sum")], tumbling_s=1.0), event_time="ts",
        max_out_of_orderness_s=0.5, consumers=2, checkpoint_dir=str(tmp_path / "ck"), checkpoint_interval_s=0.2,
        progress=False,
    )  # fmt: skip
    live = run.start()
    try:
        wait_for_condition(lambda: live.status()["processed_rows"] > 0, timeout=60)
        address = ray.get_runtime_context().gcs_address
        out = cli_status("live", "--address", address)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "pipeline live: members consumer-0, consumer-1" in out.stdout, out.stdout
        assert out.stdout.count("consumer-") >= 3 + 2  # an owner on each partition row
        assert re.search(r"^lag [\d,]+ rows", out.stdout, re.M), out.stdout
        missing = cli_status("nope", "--address", address)
        assert missing.returncode == 1 and "no running pipeline named 'nope'" in missing.stderr

        rc, screen = watch_in_a_pty(["status", "live", "--address", address, "--watch", "--interval", "0.3"])
        assert rc == 0 and "Traceback" not in screen, screen[-3000:]
        frames = [f for f in screen.split(CLEAR) if "pipeline live:" in f]
        totals = [re.search(r"^lag [\d,]+ rows \(.*$", f, re.M).group(0) for f in frames]
        assert len(frames) >= 3 and len(set(totals)) >= 2, totals  # redrawn in place, with fresh figures
        assert all("STALLED" not in f for f in frames), frames[-1]

        kill_actor("live", "consumer-1", how="ray.kill")  # counts a recovery
        # The autoscaler's metrics come from the driver of a job with autoscale= (test_autoscale
        # scrapes them); every other name the dashboard queries comes from this job.
        wanted = {n for n in dashboard_metrics() if base_name(n) in defined_metrics() - AUTOSCALE_METRICS}

        def all_there() -> bool:
            scraped = scraped_names(scrape(metrics_port), pipeline="live")
            return not (wanted - scraped)

        wait_for_condition(all_there, timeout=60, retry_interval_ms=500)
        body = scrape(metrics_port)
        lines = [x for x in body.splitlines() if x.startswith("ray_rayflow_partition_lag_rows{")]
        assert {f'partition="{p}"' in " ".join(lines) for p in range(3)} == {True}
    finally:
        live.stop()


def test_the_dashboard_is_built_from_rayflow_metrics():
    """``dashboards/rayflow.json`` is what ``dashboards/build.py`` writes, and no panel queries a
    metric that ``rayflow/_internal/metrics.py`` does not define (Ray adds ``ray_``; Prometheus
    adds ``_total`` to counters and ``_bucket``/``_sum``/``_count`` to histograms). No Ray: the
    test above checks the exported names themselves."""
    spec = importlib.util.spec_from_file_location("rayflow_dashboard_build", DASHBOARD.with_name("build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert DASHBOARD.read_text() == build.render(), "run: python dashboards/build.py"
    defined = defined_metrics()
    unknown = {n for n in dashboard_metrics() if base_name(n) not in defined}
    assert not unknown, unknown


# ------------------------------------------------------------------------------------ helpers
CLEAR = "\x1b[H\x1b[2J"
DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "rayflow.json"
#: The child makes the pseudo-terminal its controlling terminal (it is a session leader:
#: start_new_session), so a Ctrl-C typed on it reaches the child as SIGINT, as in a shell.
_IN_A_TTY = (
    "import fcntl, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "from rayflow.cli import main; sys.exit(main(sys.argv[1:]))"
)


def cli_status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rayflow.cli", "status", *args], capture_output=True, text=True, timeout=120
    )


def watch_in_a_pty(args: list[str], *, frames: int = 3, timeout_s: float = 60) -> tuple[int, str]:
    """Run ``rayflow *args`` on a pseudo-terminal until it has drawn ``frames`` screens with
    lag figures, then type Ctrl-C; its exit status and everything it drew."""
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", _IN_A_TTY, *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    out = b""

    def read(wait_s: float) -> bool:
        nonlocal out
        if select.select([master], [], [], wait_s)[0]:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: the child closed the terminal
                return False
            out += chunk
            return bool(chunk)
        return proc.poll() is None

    try:
        deadline = time.monotonic() + timeout_s
        while len(re.findall(rb"lag [\d,]+ rows", out)) < frames:
            assert read(0.5), out.decode(errors="replace")[-3000:]
            assert time.monotonic() < deadline, out.decode(errors="replace")[-3000:]
        os.write(master, b"\x03")
        rc = proc.wait(timeout=30)
        while read(0.1):
            pass
        return rc, out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        os.close(master)


#: The driver-side autoscaler's metrics (``metrics.AutoscaleMetrics``).
AUTOSCALE_METRICS = {
    "rayflow_autoscale_target_consumers", "rayflow_autoscale_consumers", "rayflow_autoscale_needed_consumers",
    "rayflow_autoscale_actions",
}  # fmt: skip


def dashboard_metrics() -> set[str]:
    """Every metric name the Grafana dashboard's queries use."""
    model = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in model["panels"] for t in p.get("targets", [])]
    exprs += [v.get("query", "") if isinstance(v.get("query"), str) else v["query"].get("query", "")
              for v in model["templating"]["list"] if v["type"] == "query"]  # fmt: skip
    return {n for e in exprs for n in re.findall(r"\bray_rayflow_[a-z_]+", e)}


def defined_metrics() -> set[str]:
    """The metric names rayflow/_internal/metrics.py defines (without Ray's prefix)."""
    from rayflow._internal import metrics

    return set(re.findall(r'\(\s*"(rayflow_[a-z_]+)"', inspect.getsource(metrics)))


def base_name(scraped: str) -> str:
    """A scraped name as metrics.py defines it: no ``ray_`` prefix, no Prometheus suffix."""
    return re.sub(r"_(total|bucket|sum|count)$", "", scraped.removeprefix("ray_"))


def scraped_names(body: str, *, pipeline: str) -> set[str]:
    """The metric names in a Prometheus scrape with a series of ``pipeline``."""
    return {line.split("{", 1)[0] for line in body.splitlines() if f'pipeline="{pipeline}"' in line}


def test_cli_status_checkpoints_and_sql(ray_session, tmp_path, capsys):
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

    def cli(*args) -> tuple[int, str, str]:
        # In this process (``python -m rayflow.cli`` itself is run by the status tests): each
        # subprocess paid ~2 s of imports for what reads a catalog copy in milliseconds.
        from rayflow.cli import main

        capsys.readouterr()
        rc = main(list(args))
        out = capsys.readouterr()
        return rc, out.out, out.err

    rc, listing, err = cli("checkpoints", str(ck))
    assert rc == 0, err
    assert "== cli" in listing and listing.count("True") == 3
    rc, total, err = cli("sql", str(ck), "SELECT sum(value_count) AS n FROM state")
    assert rc == 0, err
    assert "50000" in total
    rc, events, err = cli("sql", str(ck), "SELECT kind FROM events WHERE kind = 'rebalance' LIMIT 1")
    assert rc == 0, err
    assert "rebalance" in events
    rc, _, err = cli("checkpoints", str(tmp_path / "nope"))
    assert rc == 2 and "no rayflow checkpoints under" in err
