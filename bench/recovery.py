"""Recovery from a consumer crash: SIGKILL one consumer during the keyed job.

    python bench/recovery.py                     # 16 partitions, 2 consumers, local Ray

Reports, for each of ``--repeat`` kills (one per run):

- detect: from the SIGKILL to the manager recording the crash (Ray's liveness
  watch on the consumer);
- resume: from the SIGKILL until every partition of the dead consumer has
  processed a batch under its new owner;
- lag back: from the SIGKILL until the consumer lag (rows read but not yet
  processed) is back at its level before the kill;
- replayed: rows the dead consumer had processed but not committed, which are
  processed again (exactly once in the result).

Checks each result against pyarrow. Prints a table, writes JSON
(bench/results/recovery.json). Never asserts timings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import duckdb
import ray

import rayflow as rf
from bench._common import write_json  # noqa: E402
from rayflow._internal.checkpoint.catalog import snapshot_copy

HERE = os.path.dirname(os.path.abspath(__file__))


def lag(st) -> int:
    return st["rows_read"] - st["processed_rows"]


def one_run(i, args, ref) -> dict:
    ck = tempfile.mkdtemp(prefix="rayflow-recovery-")
    name = f"recovery{i}"
    source = rf.sources.Synthetic(events=args.events, keys=args.keys, seed=42 + i)
    run = rf.Pipeline(
        name=name,
        source=source,
        key="key",
        partitions=args.partitions,
        operator=rf.ops.Aggregate(by="key", aggs=[("value", "count"), ("value", "sum")]),
        consumers=args.consumers,
        checkpoint_dir=ck,
        checkpoint_interval_s=args.checkpoint_interval_s,
        progress=False,
    ).start()
    # Let the job reach its steady state, sampling the lag (a bench paces itself; tests never sleep).
    lags = []
    t_end = time.time() + args.warmup_s
    while time.time() < t_end:
        lags.append(lag(run.status()))
        time.sleep(0.1)
    before = statistics.median(lags[len(lags) // 2 :])
    victim = run.consumers["consumer-0"]
    vst = ray.get(victim.status.remote(), timeout=30)
    st = run.status()
    owned = set(vst["partitions"])
    replayed = sum(
        p["processed_rows"] - p["committed_rows"] for p in st["partitions"] if p["partition"] in owned
    )
    t_kill = time.time()
    os.kill(vst["pid"], signal.SIGKILL)
    lag_back = None
    while lag_back is None and time.time() < t_kill + 60:
        s = run.status()
        if s["done"]:
            lag_back = time.time() - t_kill
        elif time.time() - t_kill > 0.2 and lag(s) <= before:
            lag_back = time.time() - t_kill
        time.sleep(0.05)
    result = run.wait()
    got = result.output.select(["key", "value_count", "value_sum"]).sort_by("key")
    ok = got.equals(ref(source).select(["key", "value_count", "value_sum"]).sort_by("key"))
    con = duckdb.connect(snapshot_copy(os.path.join(ck, name, "catalog.duckdb")), read_only=True)
    crash_ts = con.execute("SELECT epoch_ms(min(ts)) / 1000.0 FROM events WHERE kind = 'crash'").fetchone()[0]
    moves = [
        json.loads(d) for (d,) in con.execute("SELECT detail FROM events WHERE kind = 'move'").fetchall()
    ]
    con.close()
    shutil.rmtree(ck, ignore_errors=True)
    resumed = [m["at"] for m in moves if m["why"] == "crash" and m["partition"] in owned]
    return {
        "run": i,
        "partitions_of_victim": len(owned),
        "detect_s": (crash_ts - t_kill) if crash_ts else None,
        "resume_s": (max(resumed) - t_kill) if len(resumed) == len(owned) else None,
        "lag_back_s": lag_back,
        "lag_before_rows": before,
        "replayed_rows": replayed,
        "events_per_s": result.stats["events_per_s"],
        "correct": ok,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=30_000_000)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--consumers", type=int, default=2)
    ap.add_argument("--checkpoint-interval-s", type=float, default=2.0)
    ap.add_argument("--warmup-s", type=float, default=2.5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "recovery.json"))
    args = ap.parse_args(argv)

    ray.init(
        address="local",
        num_cpus=args.num_cpus,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
    )
    cache = {}

    def ref(source):
        key = (source.events, source.seed)
        if key not in cache:
            cache[key] = source.to_table().group_by("key").aggregate([("value", "count"), ("value", "sum")])
        return cache[key]

    rows = [one_run(i, args, ref) for i in range(args.repeat)]
    ray.shutdown()

    def ms(v):
        return f"{v * 1e3:,.0f}" if v is not None else "-"

    print(
        f"\nSIGKILL of one of {args.consumers} consumers, keyed job over {args.events:,} events, "
        f"{args.partitions} partitions, checkpoint every {args.checkpoint_interval_s} s"
    )
    print(
        f"{'run':>4}{'parts':>7}{'detect ms':>11}{'resume ms':>11}{'lag back ms':>13}{'replayed':>12}{'ok':>5}"
    )
    for r in rows:
        print(
            f"{r['run']:>4}{r['partitions_of_victim']:>7}{ms(r['detect_s']):>11}{ms(r['resume_s']):>11}"
            f"{ms(r['lag_back_s']):>13}{r['replayed_rows']:>12,}{'yes' if r['correct'] else 'NO':>5}"
        )
    write_json(args.json, {"args": vars(args), "cpus": os.cpu_count(), "runs": rows}, lead="\n")
    return 0 if all(r["correct"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
