"""The README's report screenshot, and the cost of history sampling at 16 partitions.

    python bench/report_screenshot.py                 # docs/report.png (and bench/results/report.html)
    python bench/report_screenshot.py -o /tmp/r.png --seconds 40

Runs a paced job on a local Ray (16 partitions, so per-partition plots are heat maps; event time
on; bursts of 4x the base rate every 12 s; a consumer killed a third of the way in, one added at
two thirds), samples its history every
``--interval`` seconds, writes ``rayflow report`` of it, and takes a screenshot of the report with
headless Chromium (Debian's ``chromium``). Prints the manager's sampling cost per sample (on its
event loop, and the catalog insert on its I/O thread) and writes JSON
(bench/results/report_screenshot.json). Never asserts timings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_job(args, ck: str) -> dict:
    """The job; returns the manager's history sampling figures at its end."""
    import ray

    import rayflow as rf
    from rayflow.testing import kill_actor

    profile = [(8, args.rate), (4, 4 * args.rate)]  # 8 s steady, then a 4 s burst, cycled
    events = int(args.rate * 2 * args.seconds)  # the profile's mean rate is twice the base
    run = rf.Pipeline(
        name="report-demo",
        source=rf.sources.Synthetic(events=events, rate=profile, keys=50_000, zipf_s=1.1),
        key="key",
        partitions=16,
        operator=rf.ops.Aggregate(by="key", aggs=[("value", "count"), ("value", "sum")]),
        consumers=2,
        checkpoint_dir=ck,
        event_time="ts",
        config=rf.EngineConfig(history_interval_s=args.interval),
        progress=False,
    ).start()
    try:
        time.sleep(args.seconds / 3)
        kill_actor("report-demo", "consumer-1", how="ray.kill")
        time.sleep(args.seconds / 3)
        run.scale(consumers=3)
        cost = {}
        while not run.status()["done"]:
            cost = ray.get(run.manager.status.remote(), timeout=30)["history"]
            time.sleep(0.5)
        run.wait(timeout_s=120)
    finally:
        run.stop()
    return cost


def screenshot(html: str, png: str, *, width: int, height: int) -> None:
    profile = tempfile.mkdtemp(prefix="rayflow-chromium-")
    try:
        subprocess.run(
            [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "--virtual-time-budget=10000", f"--screenshot={png}",
             "file://" + os.path.abspath(html)],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default=os.path.join(ROOT, "docs", "report.png"))
    ap.add_argument("--seconds", type=float, default=30.0, help="how long the paced job runs")
    ap.add_argument("--rate", type=int, default=20_000, help="base events per second (bursts: 4x)")
    ap.add_argument("--interval", type=float, default=0.5, help="history_interval_s")
    ap.add_argument("--width", type=int, default=1300)
    ap.add_argument("--height", type=int, default=2330, help="pixels of the page shot (from its top)")
    args = ap.parse_args()
    if shutil.which("chromium") is None:
        sys.exit("needs Debian's chromium: apt-get install -y --no-install-recommends chromium")
    import ray

    from rayflow._internal.report import write_report

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    work = tempfile.mkdtemp(prefix="rayflow-report-demo-")
    try:
        ck = os.path.join(work, "ck")
        cost = run_job(args, ck)
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        html = write_report(os.path.join(ck, "report-demo"), os.path.join(HERE, "results", "report.html"))
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)  # the job's checkpoints: on failure too
    screenshot(html, args.output, width=args.width, height=args.height)
    n = max(1, cost.get("samples", 0))
    figures = {
        "partitions": 16,
        "samples": cost.get("samples", 0),
        "loop_ms_per_sample": 1000 * cost.get("loop_s", 0.0) / n,
        "insert_ms_per_sample": 1000 * cost.get("write_s", 0.0) / n,
        "insert_cpu_ms_per_sample": 1000 * cost.get("write_cpu_s", 0.0) / n,
        "report_html_bytes": os.path.getsize(html),
        "screenshot": args.output,
        "screenshot_bytes": os.path.getsize(args.output),
    }
    print(f"{'history samples':<28}{figures['samples']:>12,}")
    print(f"{'event loop, ms per sample':<28}{figures['loop_ms_per_sample']:>12.2f}")
    print(f"{'catalog insert, ms/sample':<28}{figures['insert_ms_per_sample']:>12.2f}  wall")
    print(f"{'':<28}{figures['insert_cpu_ms_per_sample']:>12.2f}  CPU of the I/O thread")
    print(f"{'report.html, bytes':<28}{figures['report_html_bytes']:>12,}")
    print(f"{'screenshot, bytes':<28}{figures['screenshot_bytes']:>12,}  {args.output}")
    with open(os.path.join(HERE, "results", "report_screenshot.json"), "w") as f:
        json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
