"""Priority tiers under overload (issue 12, part 5; docs/tiers.md).

    python bench/tiers.py                 # sized for a 2-core machine (about a minute)

A paced ``Synthetic`` stream (``--rate`` events/s for ``--seconds``, bounded so
the result is checked against DuckDB) over 4 partitions into 2 consumers that
each process ``--capacity`` rows/s (a ``Map`` that sleeps: a slow service), so
the job as a whole cannot keep up. Run three times on the same input:

- **no tiers**: every partition alike;
- **shared**: tiers ``critical`` (the partition of key 0) and ``standard``
  (partition 1) above the ``default`` rest, every consumer shared: the
  consumers serve and fetch for the higher tiers first;
- **dedicated**: the same with a consumer dedicated to ``critical``.

Sampled every 0.25 s from ``run.status()``: each tier's lag (rows read or
available and not committed), and the bytes each tier has spilled at the
source (``--source-max-kib`` small, so the backlog meets the memory bound).
Reported per tier: mean and peak lag while the input flows, peak spilled
bytes; and whether the result is exact. Writes bench/results/tiers.json.
Never asserts timings.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ray

import rayflow as rf
from bench._common import write_json  # noqa: E402
from rayflow.testing import KEYED_SQL, assert_same_rows, duckdb_reference, throttle

HERE = os.path.dirname(os.path.abspath(__file__))
TIERS = ("critical", "standard", "default")
PLAN = {0: "critical", 1: "standard", 2: "default", 3: "default"}


def scenario(args, *, mode: str, root: str) -> dict:
    src = rf.sources.Synthetic(events=args.rate * args.seconds, keys=10_000, seed=7, rate=args.rate)
    job = rf.Pipeline(
        name=mode.replace(" ", "-"),
        source=src,
        key="key",
        partitions=4,
        consumers=2,
        operator=[
            throttle(args.capacity),
            rf.ops.Aggregate(by="key", aggs=[("value", "count"), ("value", "sum")]),
        ],
        sink=rf.sinks.Collect(),
        checkpoint_dir=os.path.join(root, mode.replace(" ", "-")),
        checkpoint_interval_s=0.3,
        config=rf.EngineConfig(num_sources=1, source_max_bytes=args.source_max_kib * 1024),
        progress=False,
        tiers=[
            rf.Tier(name="critical", priority=10, keys=[0], dedicated_consumers=int(mode == "dedicated")),
            rf.Tier(name="standard", priority=5, partitions=[1]),
        ]
        if mode != "no tiers"
        else None,
    )
    run = job.start()
    t0 = time.monotonic()
    samples: list[dict] = []
    while True:
        st = run.status()
        lag = dict.fromkeys(TIERS, 0)
        spilled = dict.fromkeys(TIERS, 0)
        for p in st["partitions"]:
            tier = PLAN[p["partition"]]  # the same grouping with and without tiers
            lag[tier] += p["lag_rows"]
            spilled[tier] += p["spilled_bytes"]
        samples.append({"t": time.monotonic() - t0, "lag": lag, "spilled": spilled, "done": st["done"]})
        if st["done"]:
            break
        time.sleep(0.25)
    result = run.wait(timeout_s=args.timeout_s)
    try:
        assert_same_rows(result.output, duckdb_reference(KEYED_SQL, events=src.to_table()))
        exact = True
    except AssertionError:
        exact = False
    flowing = [s for s in samples if s["t"] >= 2.0 and s["t"] <= args.seconds + 2.0] or samples
    out = {"mode": mode, "exact": exact, "seconds": time.monotonic() - t0}
    for tier in TIERS:
        lags = [s["lag"][tier] for s in flowing]
        out[tier] = {
            "mean_lag_rows": sum(lags) / len(lags),
            "peak_lag_rows": max(lags),
            "peak_spilled_bytes": max(s["spilled"][tier] for s in samples),
        }
    out["samples"] = samples
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=int, default=40_000, help="events/s")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--capacity", type=int, default=15_000, help="rows/s each consumer processes")
    ap.add_argument("--source-max-kib", type=int, default=1024)
    ap.add_argument("--timeout-s", type=float, default=300.0)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "tiers.json"))
    args = ap.parse_args(argv)
    ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "args": vars(args)}
    try:
        with tempfile.TemporaryDirectory() as root:
            report["runs"] = [scenario(args, mode=m, root=root) for m in ("no tiers", "shared", "dedicated")]
    finally:
        ray.shutdown()
    print(f"{args.rate:,} events/s for {args.seconds} s into 2 consumers of {args.capacity:,} rows/s each")
    print(f"{'run':<11}{'tier':<10}{'mean lag':>10}{'peak lag':>10}{'spilled KiB':>13}  exact")
    for r in report["runs"]:
        for tier in TIERS:
            x = r[tier]
            print(
                f"{r['mode']:<11}{tier:<10}{x['mean_lag_rows']:>10,.0f}"
                f"{x['peak_lag_rows']:>10,}{x['peak_spilled_bytes'] / 1024:>13,.0f}  {r['exact']}"
            )
    write_json(args.json, report, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
