"""Rebalance pauses and throughput while the consumer group changes under load.

    python bench/rebalance.py                    # 16 partitions, 100k keys, local Ray

Runs the WORKLOAD keyed job from the synthetic source and, while it runs:
scales 2 -> 4 consumers, kills one (ray.kill, 4 -> 3), then scales 3 -> 1.
For each event it reports the partitions moved, the p50 / p99 / max pause per
moved partition (from the revocation, or the death, to the first batch the new
owner processed), the throughput before, during and after, and whether every
partition that did not move kept processing (no global barrier). Checks the
final result against pyarrow. Prints a table, writes JSON
(bench/results/rebalance.json). Never asserts timings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import numpy as np
import ray

import rayflow as rf
from bench import _common
from bench._common import write_json  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


class Sampler(_common.Sampler):
    """Samples per-partition processed rows of a run every ``interval_s``."""

    def __init__(self, run, interval_s=0.1):
        super().__init__(run, interval_s)
        self.samples: list[tuple[float, list[int], list[str | None]]] = []

    def sample(self) -> bool:
        try:
            st = ray.get(self.run.manager.status.remote(), timeout=10)
        except Exception:
            return False
        parts = st["partitions"]
        self.samples.append((time.time(), [p["processed_rows"] for p in parts], [p["owner"] for p in parts]))
        return not st["done"]

    def rate(self, t0, t1, partitions=None) -> float:
        """Rows/s processed between wall times t0 and t1 (over the given partitions)."""
        pts = [(t, rows) for t, rows, _ in self.samples if t0 <= t <= t1]
        if len(pts) < 2:
            return float("nan")
        (ta, ra), (tb, rb) = pts[0], pts[-1]
        idx = range(len(ra)) if partitions is None else partitions
        return sum(rb[i] - ra[i] for i in idx) / max(tb - ta, 1e-9)

    def min_partition_progress(self, t0, t1, partitions) -> int:
        """Smallest number of rows any of ``partitions`` processed between t0 and t1."""
        pts = [rows for t, rows, _ in self.samples if t0 <= t <= t1]
        if len(pts) < 2 or not partitions:
            return -1
        return min(pts[-1][i] - pts[0][i] for i in partitions)


def pct(xs, q):
    return float(np.percentile(xs, q)) if xs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=60_000_000)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--phase-s", type=float, default=3.0, help="seconds between events")
    ap.add_argument("--checkpoint-interval-s", type=float, default=2.0)
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "rebalance.json"))
    args = ap.parse_args(argv)

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING")
    ck = tempfile.mkdtemp(prefix="rayflow-rebalance-")
    source = rf.sources.Synthetic(events=args.events, keys=args.keys)
    pipeline = rf.Pipeline(
        name="rebalance",
        source=source,
        key="key",
        partitions=args.partitions,
        operator=rf.ops.Aggregate(by="key", aggs=[("value", "count"), ("value", "sum")]),
        sink=rf.sinks.Collect(),
        consumers=2,
        checkpoint_dir=ck,
        checkpoint_interval_s=args.checkpoint_interval_s,
        progress=False,
    )
    run = pipeline.start()
    sampler = Sampler(run).start()
    events = []

    def event(name, action):
        time.sleep(args.phase_s)  # a bench paces its phases; tests never sleep
        t = time.time()
        action()
        events.append({"event": name, "at": t, "acted_s": time.time() - t})

    def kill_one():
        member = sorted(run.consumers)[-1]
        ray.kill(run.consumers[member])

    event("scale 2->4", lambda: run.scale(consumers=4))
    event("kill 1 (4->3)", kill_one)
    event("scale 3->1", lambda: run.scale(consumers=1))
    result = run.wait()
    sampler.stop()
    moves = result_moves(ck)
    ray.shutdown()

    # correctness against the single-process reference
    ref = source.to_table().group_by("key").aggregate([("value", "count"), ("value", "sum")])
    ok = (
        result.output.select(["key", "value_count", "value_sum"])
        .sort_by("key")
        .equals(ref.select(["key", "value_count", "value_sum"]).sort_by("key"))
    )

    t_end = sampler.samples[-1][0]
    rows = []
    for i, ev in enumerate(events):
        nxt = events[i + 1]["at"] if i + 1 < len(events) else t_end
        mine = [m for m in moves if ev["at"] - 0.01 <= m["at"] - m["pause_s"] <= nxt and m["at"] <= nxt + 30]
        pauses = [m["pause_s"] for m in mine]
        moved = sorted({m["partition"] for m in mine})
        settle = max((m["at"] for m in mine), default=ev["at"])
        unmoved = [p for p in range(args.partitions) if p not in moved]
        rows.append(
            {
                **ev,
                "partitions_moved": len(moved),
                "pause_p50_s": pct(pauses, 50),
                "pause_p99_s": pct(pauses, 99),
                "pause_max_s": max(pauses, default=float("nan")),
                "events_per_s_before": sampler.rate(ev["at"] - 2.0, ev["at"]),
                "events_per_s_during": sampler.rate(ev["at"], max(settle, ev["at"] + 0.5)),
                "events_per_s_after": sampler.rate(
                    max(settle, ev["at"]), min(nxt, max(settle, ev["at"]) + 2.0)
                ),
                "unmoved_min_rows_during": sampler.min_partition_progress(
                    ev["at"], max(settle, ev["at"] + 0.5), unmoved
                ),
            }
        )
    report = {
        "events": args.events,
        "partitions": args.partitions,
        "keys": args.keys,
        "cpus": os.cpu_count(),
        "correct": ok,
        "stats": result.stats,
        "rebalance_events": rows,
        "moves": moves,
    }
    print(
        f"\nkeyed job, {args.events:,} events, {args.partitions} partitions; overall "
        f"{result.stats['events_per_s']:,.0f} events/s, result {'correct' if ok else 'WRONG'}"
    )
    print(
        f"{'event':<16}{'moved':>6}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'before/s':>12}{'during/s':>12}"
        f"{'after/s':>12}{'unmoved min rows':>18}"
    )
    for r in rows:
        print(
            f"{r['event']:<16}{r['partitions_moved']:>6}{r['pause_p50_s'] * 1e3:>8.0f}{r['pause_p99_s'] * 1e3:>8.0f}"
            f"{r['pause_max_s'] * 1e3:>8.0f}{r['events_per_s_before']:>12,.0f}{r['events_per_s_during']:>12,.0f}"
            f"{r['events_per_s_after']:>12,.0f}{r['unmoved_min_rows_during']:>18,}"
        )
    write_json(args.json, report, default=str, lead="\n")
    shutil.rmtree(ck, ignore_errors=True)
    return 0 if ok else 1


def result_moves(ck) -> list[dict]:
    """Moves recorded in the catalog's events (the manager is gone once the run ends)."""
    import duckdb

    from rayflow._internal.checkpoint.catalog import snapshot_copy

    path = snapshot_copy(os.path.join(ck, "rebalance", "catalog.duckdb"))
    con = duckdb.connect(path, read_only=True)
    rows = con.execute("SELECT detail FROM events WHERE kind = 'move'").fetchall()
    con.close()
    return [json.loads(r) for (r,) in rows]


if __name__ == "__main__":
    sys.exit(main())
