"""A slow operator must not livelock the job (issue 8, defect 4: Kafka's max.poll.interval.ms).

    python bench/slow_operator.py                       # 10M events, 10 us per row, 1 consumer
    python bench/slow_operator.py --events 2000000 --cost-us 20

The WORKLOAD keyed job from Parquet with a ``Map`` in front that costs
``--cost-us`` microseconds per row (it sleeps, as a call to an external
service would), one consumer. Before the heartbeat got a task of its own, a
step over one fetch took longer than ``session_timeout_s``, the consumer was
expired every ~10 s, got its partitions back from their last commit, and was
expired again before it committed: after 10 minutes, 55 rebalances and ~1M of
10M events. Reports whether the job finished exactly, its duration, events/s
against the ideal (events x cost), rebalances, recoveries and commits; prints a
table and writes JSON (bench/results/slow_operator.json). Never asserts timings.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import duckdb
import ray
from throughput import HERE, make_input, reference, same

import rayflow as rf
from bench._common import write_json  # noqa: E402
from rayflow.testing import throttle


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--cost-us", type=float, default=10.0, help="cost of the Map per row, microseconds")
    ap.add_argument("--consumers", type=int, default=1)
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--session-timeout-s", type=float, default=10.0)
    ap.add_argument("--timeout-s", type=float, default=900.0, help="give up (and report) after this")
    ap.add_argument("--data-dir", default=os.path.join(HERE, "data"))
    ap.add_argument("--json", default=os.path.join(HERE, "results", "slow_operator.json"))
    args = ap.parse_args(argv)

    path = make_input(args.events, args.keys, args.seed, args.data_dir)
    _, expected = reference(path, threads=True)
    cost_s = args.cost_us * 1e-6
    slow = throttle(1.0 / cost_s)  # sleeps cost_s per row: a call to a slow service
    ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    ck = tempfile.mkdtemp(prefix="rayflow-slow-")
    job = rf.Pipeline(
        name="slow",
        source=rf.sources.Parquet(path),
        key="key",
        partitions=args.partitions,
        operator=[slow, rf.ops.Aggregate(by="key", aggs=[("value", "count"), ("value", "sum")])],
        consumers=args.consumers,
        checkpoint_dir=ck,
        checkpoint_interval_s=2.0,
        config=rf.EngineConfig(session_timeout_s=args.session_timeout_s),
        progress=False,
    )
    t0 = time.monotonic()
    run = job.start()
    finished, result = True, None
    try:
        result = run.wait(timeout_s=args.timeout_s)
    except TimeoutError:
        finished = False
        st = run.status()
        run.stop()
    seconds = time.monotonic() - t0
    con = duckdb.connect(os.path.join(ck, "slow", "catalog.duckdb"), read_only=True)
    commits = con.execute("SELECT count(*) FROM commits").fetchone()[0]
    con.close()
    if finished:
        stats = result.stats
        exact = same(result.output, expected)
        events, rebalances, recoveries = stats["events"], stats["rebalances"], stats["recoveries"]
    else:
        exact = False
        events = st["processed_rows"]
        rebalances, recoveries = st["rebalances"], st["recoveries"]
    ideal_s = args.events * cost_s / args.consumers
    row = {
        "events": args.events,
        "cost_us_per_row": args.cost_us,
        "consumers": args.consumers,
        "session_timeout_s": args.session_timeout_s,
        "finished": finished,
        "exact": exact,
        "seconds": seconds,
        "events_processed": events,
        "events_per_s": events / seconds,
        "ideal_seconds": ideal_s,
        "efficiency": ideal_s / seconds if finished else 0.0,
        "rebalances": rebalances,
        "recoveries": recoveries,
        "commit_rows": commits,
    }
    print(
        f"{'finished':>9} {'exact':>6} {'seconds':>8} {'ideal':>7} {'events/s':>11} {'rebal':>6} {'recov':>6}"
    )
    print(
        f"{finished!s:>9} {exact!s:>6} {seconds:8.1f} {ideal_s:7.1f} {row['events_per_s']:11,.0f} "
        f"{rebalances:6d} {recoveries:6d}"
    )
    write_json(args.json, row)
    ray.shutdown()
    return 0 if finished and exact else 1


if __name__ == "__main__":
    sys.exit(main())
