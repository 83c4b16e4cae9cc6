"""Autoscaling under a rate step, against a KEDA-style lag-threshold policy (issue 12).

    python bench/autoscale.py                  # scaled down for a 2-core machine (~3.5 min)
    python bench/autoscale.py --full           # 0.5M -> 2M -> 0.5M events/s (16 cores, ~6 min)

A paced ``Synthetic(rate=...)`` stream steps through ``--rates`` (events/s), each for
``--step-s`` seconds (bounded: the job ends with the input, so the result is checked against
DuckDB unless ``--no-check``; ``--full`` skips it: 150M events). The keyed job (count and sum per key) runs behind a ``Map``
that costs ``--cost-us`` per row (a sleep: a call to a slow service), so a consumer's capacity
is known (1e6 / cost rows/s) and adds up across consumers whatever the machine's cores.

It runs twice on the same input and the same guards (``--interval-s``, ``--cooldown-s``,
``--stabilization-s``, ``--scale-down-delay-s``): once with rayflow's policy (DS2 true rates,
``rf.Autoscale``), once with KEDA's Kafka scaler formula ``ceil(uncommitted lag /
--keda-lag-threshold)``. Reported per step and policy: the scaling actions, the time to
converge (the last action of the step, or the time the backlog settled under one second of
input if later), the peak lag (rows not processed yet) and uncommitted lag (Kafka's), the consumers'
utilization (busy fraction) over the last third of the step, and the consumer-seconds; over
the run, the oscillations (an action reversing the previous one's direction within a step).

Writes bench/results/autoscale.json. Never asserts timings.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ray

import rayflow as rf
from bench._common import write_json  # noqa: E402
from rayflow._internal.group.autoscale import decide_keda
from rayflow.testing import KEYED_SQL, assert_same_rows, duckdb_reference, throttle

HERE = os.path.dirname(os.path.abspath(__file__))
AGGS = [("value", "count"), ("value", "sum")]

#: Sized for a 2-core machine: a consumer does 5k rows/s (200 us a row), so 5k/s needs 2
#: consumers at 0.7 utilization and 20k/s needs 6. Low rates and 1,000 keys: with eight
#: consumers on two cores, CPU contention stretches each step's own cost (Arrow, the merge into
#: the state), which busy time counts and the modelled cost does not; kept small, a consumer's
#: rate stays near what it would be on a core of its own (see docs/autoscaling.md, Caveats);
#: batches of 250 ms of the stream, for fewer steps (each pays that cost once). 12 partitions:
#: dealt whole, 12 make 2 and 6 consumers even (with 8, 6 consumers would leave two with 2).
SCALED = dict(
    rates=[5_000, 20_000, 5_000],
    step_s=30.0,
    cost_us=200.0,
    partitions=12,
    sources=1,
    splits=1,
    keys=1_000,
    batch_ms=250,
)
#: The issue's figures for a 16-core machine: a consumer does 500k rows/s (2 us a row), so
#: 0.5M/s needs 2 consumers and 2M/s needs 6 (24 partitions deal evenly to both); 3 x 50 s
#: per policy, ~6 min for both.
FULL = dict(
    rates=[500_000, 2_000_000, 500_000],
    step_s=50.0,
    cost_us=2.0,
    partitions=24,
    sources=4,
    splits=4,
    keys=100_000,
    batch_ms=50,
)


def run_policy(args, policy: str) -> dict:
    """One run of the step profile under ``policy`` ("rayflow" or "keda"); its samples and result."""
    profile = [(args.step_s, r) for r in args.rates]
    events = sum(int(s * r) for s, r in profile)
    src = rf.sources.Synthetic(
        rate=profile,
        events=events,
        keys=args.keys,
        seed=42,
        splits=args.splits,
        batch_ms=args.batch_ms,
        zipf_s=args.zipf_s,
    )
    cfg = rf.Autoscale(
        min_consumers=args.min_consumers,
        max_consumers=args.max_consumers,
        target_utilization=args.target_utilization,
        interval_s=args.interval_s,
        catch_up_s=args.catch_up_s,
        stabilization_s=args.stabilization_s,
        cooldown_s=args.cooldown_s,
        scale_down_delay_s=args.scale_down_delay_s,
    )
    ck = tempfile.mkdtemp(prefix="rayflow-autoscale-")
    try:
        job = rf.Pipeline(
            name=f"autoscale-{policy}",
            source=src,
            key="key",
            partitions=args.partitions,
            operator=[throttle(1e6 / args.cost_us), rf.ops.Aggregate(by="key", aggs=AGGS)],
            sink=rf.sinks.Collect(),
            checkpoint_dir=ck,
            checkpoint_interval_s=args.checkpoint_interval_s,
            config=rf.EngineConfig(num_sources=args.sources),
            progress=False,
            autoscale=cfg if policy == "rayflow" else None,
            consumers=args.min_consumers,
        )
        run = job.start()
        try:
            if policy == "keda":
                run.start_autoscaler(
                    cfg, decide=functools.partial(decide_keda, lag_threshold_rows=args.keda_lag_threshold)
                )
            result = run.wait(timeout_s=args.timeout_s)
        finally:
            run.stop()
        samples = list(run.autoscaler.samples)
        exact = None
        if args.check:
            try:
                assert_same_rows(result.output, duckdb_reference(KEYED_SQL, events=src.to_table()))
                exact = True
            except AssertionError:
                exact = False
        return {"policy": policy, "events": events, "seconds": result.stats["seconds"], "exact": exact,
                "samples": samples, **summarize(samples, args)}  # fmt: skip
    finally:
        shutil.rmtree(ck, ignore_errors=True)


def summarize(samples: list[dict], args) -> dict:
    """Per step: actions, convergence, peak lag, utilization, consumer-seconds (pure)."""
    steps = []
    total_cs = 0.0
    oscillations = 0
    prev_n = args.min_consumers
    for k, rate in enumerate(args.rates):
        t0, t1 = k * args.step_s, (k + 1) * args.step_s
        if k == len(args.rates) - 1:  # the last step lasts until the backlog is drained
            t1 = max([t1, *[s["t_s"] for s in samples]])
        within = [s for s in samples if t0 <= s["t_s"] < t1]
        actions = [s for s in within if s["action"] != "hold"]
        dirs = [1 if a["action"] == "scale_up" else -1 for a in actions]
        reversals = sum(1 for a, b in zip(dirs, dirs[1:]) if a != b)
        oscillations += reversals
        # Consumer-seconds: each sample's count held until the next sample.
        cs, last_t = 0.0, t0
        n = prev_n
        for s in within:
            cs += n * (s["t_s"] - last_t)
            n, last_t = (s["target"] if s["action"] != "hold" else s["consumers"]), s["t_s"]
        cs += n * (t1 - last_t)
        prev_n = n
        total_cs += cs
        # Converged: the last action of the step, or once the backlog stays under one second of
        # input, whichever is later; never, if the backlog is still over it at the step's end.
        unsettled = [s["t_s"] for s in within if s["lag_rows"] > rate]
        never = bool(within) and bool(unsettled) and unsettled[-1] == within[-1]["t_s"]
        converged = max([t0, *(a["t_s"] for a in actions), *unsettled[-1:]])
        tail = [s for s in within if s["t_s"] >= t0 + (t1 - t0) * 2 / 3]
        steps.append(
            {
                "rate": rate,
                "start_s": t0,
                "actions": [
                    {
                        "t_s": round(a["t_s"] - t0, 1),
                        "from": a["current"],
                        "to": a["target"],
                        "reason": a["reason"],
                    }
                    for a in actions
                ],  # fmt: skip
                "converge_s": None if never else round(converged - t0, 1),
                "consumers_at_end": n,
                "peak_lag_rows": max((s["lag_rows"] for s in within), default=0),
                "peak_uncommitted_rows": max((s["uncommitted_rows"] or 0 for s in within), default=0),
                "utilization_after": round(sum(s["busy_fraction"] for s in tail) / len(tail), 3)
                if tail
                else None,
                "consumer_s": round(cs, 1),
                "reversals": reversals,
            }
        )
    return {"steps": steps, "consumer_s": round(total_cs, 1), "oscillations": oscillations,
            "actions": sum(len(s["actions"]) for s in steps)}  # fmt: skip


def print_report(report: dict) -> None:
    print(f"rates {report['args']['rates']} events/s, {report['args']['step_s']:g} s each, "
          f"{1e6 / report['args']['cost_us']:,.0f} rows/s per consumer")  # fmt: skip
    head = f"{'policy':8} {'step':>10} {'actions':>8} {'->':>4} {'converge':>9} {'peak lag':>13} {'util':>5} {'cons-s':>7}"
    print(head)
    for run in report["runs"]:
        for s in run["steps"]:
            conv = "never" if s["converge_s"] is None else f"{s['converge_s']:.1f} s"
            util = "-" if s["utilization_after"] is None else f"{s['utilization_after']:.2f}"
            print(
                f"{run['policy']:8} {s['rate']:>10,} {len(s['actions']):>8} {s['consumers_at_end']:>4} {conv:>9} "
                f"{s['peak_lag_rows']:>13,} {util:>5} {s['consumer_s']:>7.0f}"
            )
        print(
            f"{run['policy']:8} total: {run['actions']} actions, {run['oscillations']} oscillations, "
            f"{run['consumer_s']:.0f} consumer-s, exact={run['exact']}"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--full", action="store_true", help="the issue's sizes (0.5M -> 2M -> 0.5M/s), for 16 cores"
    )
    ap.add_argument(
        "--rates", type=lambda s: [int(float(x)) for x in s.split(",")], help="events/s of each step"
    )
    ap.add_argument("--step-s", type=float, help="seconds of each step")
    ap.add_argument("--cost-us", type=float, help="the Map's cost per row (a consumer does 1e6/cost rows/s)")
    ap.add_argument("--partitions", type=int)
    ap.add_argument("--sources", type=int, help="source actors")
    ap.add_argument("--splits", type=int, help="splits of the stream (each paces a share of the rate)")
    ap.add_argument("--keys", type=int, help="distinct keys (default: 1,000 scaled down, 100,000 --full)")
    ap.add_argument(
        "--batch-ms", type=int, help="ms of the stream per source batch (default 250 / 50 --full)"
    )
    ap.add_argument(
        "--zipf-s", type=float, default=0.0,
        help="key skew (0: uniform, so partitions carry equal load; 1: WORKLOAD.md's, whose hottest "
        "partition bounds the group whatever its size)",
    )  # fmt: skip
    ap.add_argument("--policies", default="rayflow,keda")
    ap.add_argument("--min-consumers", type=int, default=1)
    ap.add_argument("--max-consumers", type=int, default=8)
    ap.add_argument("--target-utilization", type=float, default=0.7)
    ap.add_argument("--interval-s", type=float, default=2.0)
    ap.add_argument("--catch-up-s", type=float, default=20.0)
    ap.add_argument("--stabilization-s", type=float, default=10.0)
    ap.add_argument("--cooldown-s", type=float, default=4.0)
    ap.add_argument("--scale-down-delay-s", type=float, default=12.0)
    ap.add_argument("--checkpoint-interval-s", type=float, default=1.0)
    ap.add_argument(
        "--keda-lag-threshold", type=float,
        help="KEDA's lagThreshold, rows (default: one second of one consumer's capacity)",
    )  # fmt: skip
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the DuckDB check")
    ap.add_argument("--timeout-s", type=float, default=900.0)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "autoscale.json"))
    args = ap.parse_args(argv)
    for k, v in (FULL if args.full else SCALED).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.keda_lag_threshold is None:
        args.keda_lag_threshold = 1e6 / args.cost_us
    if args.full:
        args.check = False  # 150M events: a DuckDB reference over them would not fit in memory

    ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "args": vars(args),
        "runs": [],
    }
    try:
        for policy in args.policies.split(","):
            t = time.monotonic()
            report["runs"].append(run_policy(args, policy))
            print(f"{policy}: {time.monotonic() - t:.0f} s", file=sys.stderr)
    finally:
        ray.shutdown()
    print_report(report)
    write_json(args.json, report, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
