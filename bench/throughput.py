"""Throughput of the WORKLOAD keyed job, with the single-process pyarrow reference.

    python bench/throughput.py                      # 10M events, 2 consumers, local Ray
    python bench/throughput.py --events 2000000 --consumers 1 2 4

Generates the WORKLOAD events once as a Parquet file (row groups of 1M rows,
under bench/data/), then for each consumer count runs the keyed job from that
file with checkpointing on, checks the result against the reference, and
reports events/s (first read to final commit, WORKLOAD.md), the ratio to the
pyarrow reference (read + group_by over the same file, one thread and all
threads), start-up time, and the peak memory of the Ray processes. Prints a
table and writes JSON (bench/results/throughput.json). Never asserts timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

import rayflow as rf

HERE = os.path.dirname(os.path.abspath(__file__))


def make_input(events: int, keys: int, seed: int, data_dir: str) -> str:
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, f"events-{events}-{keys}-{seed}.parquet")
    if not os.path.exists(path):
        src = rf.sources.Synthetic(events=events, keys=keys, seed=seed)
        tmp = path + ".tmp"
        with pq.ParquetWriter(tmp, rf.sources.SYNTHETIC_SCHEMA) as w:
            for split in src.splits():
                for batch, _ in split.read(0):
                    w.write_batch(batch, row_group_size=1_000_000)
        os.replace(tmp, path)
    return path


def reference(path: str, threads: bool) -> tuple[float, pa.Table]:
    t0 = time.perf_counter()
    table = pq.read_table(path, use_threads=threads)
    out = table.group_by("key", use_threads=threads).aggregate([("value", "count"), ("value", "sum")])
    return time.perf_counter() - t0, out


class PeakRSS:
    """Samples the summed RSS of this process and all its descendants (the local Ray)."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def run_once(path, *, consumers, partitions, interval_s, address) -> tuple[dict, pa.Table]:
    ck = tempfile.mkdtemp(prefix="rayflow-bench-")
    try:
        pipeline = rf.Pipeline(
            name=f"bench-{consumers}c",
            source=rf.sources.Parquet(path),
            key="key",
            partitions=partitions,
            operator=rf.ops.Aggregate(by="key", aggs=[("value", "count"), ("value", "sum")]),
            sink=rf.sinks.Parquet(os.path.join(ck, "out")),
            consumers=consumers,
            checkpoint_dir=os.path.join(ck, "checkpoints"),
            checkpoint_interval_s=interval_s,
            progress=False,
        )
        with PeakRSS() as mem:
            result = pipeline.run()
        out = pq.read_table(os.path.join(ck, "out"))
        stats = dict(result.stats)
        stats["peak_rss_bytes"] = mem.peak
        return stats, out
    finally:
        shutil.rmtree(ck, ignore_errors=True)


def same(a: pa.Table, b: pa.Table) -> bool:
    a = a.select(["key", "value_count", "value_sum"]).sort_by("key")
    b = b.select(["key", "value_count", "value_sum"]).sort_by("key")
    return a.equals(b)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument(
        "--consumers",
        type=int,
        nargs="+",
        default=None,
        help="consumer counts (default: 2, or 1..N with --nodes)",
    )
    ap.add_argument(
        "--nodes",
        type=int,
        default=None,
        help="simulate an N-node cluster on this machine (ray.cluster_utils.Cluster); consumers spread over it",
    )
    ap.add_argument("--checkpoint-interval-s", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=2, help="runs per consumer count (best is reported)")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    ap.add_argument("--data-dir", default=os.path.join(HERE, "data"))
    ap.add_argument("--json", default=os.path.join(HERE, "results", "throughput.json"))
    args = ap.parse_args(argv)

    import ray

    path = make_input(args.events, args.keys, args.seed, args.data_dir)
    ref1_s, ref = reference(path, threads=False)
    ref1_s = min(ref1_s, reference(path, threads=False)[0])
    refn_s = min(reference(path, threads=True)[0] for _ in range(2))

    cluster = None
    t0 = time.perf_counter()
    if args.address:
        ray.init(address=args.address)
    elif args.nodes:
        from ray.cluster_utils import Cluster

        cpus = args.num_cpus or os.cpu_count() or 2
        per_node = max(1, cpus // args.nodes)
        cluster = Cluster(
            initialize_head=True, head_node_args={"num_cpus": per_node, "include_dashboard": False}
        )
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=per_node)
        ray.init(address=cluster.address, logging_level="WARNING")
    else:
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING")
    ray_init_s = time.perf_counter() - t0
    if args.consumers is None:
        args.consumers = list(range(1, args.nodes + 1)) if args.nodes else [2]

    rows = []
    for c in args.consumers:
        best = None
        for _ in range(args.repeat):
            stats, out = run_once(
                path,
                consumers=c,
                partitions=args.partitions,
                interval_s=args.checkpoint_interval_s,
                address=args.address,
            )
            stats["correct"] = same(out, ref)
            if best is None or stats["events_per_s"] > best["events_per_s"]:
                best = stats
        best["events_per_s_per_consumer"] = best["events_per_s"] / c
        best["ratio_to_pyarrow_1_thread"] = best["events_per_s"] / (args.events / ref1_s)
        best["ratio_to_pyarrow_all_threads"] = best["events_per_s"] / (args.events / refn_s)
        rows.append(best)

    report = {
        "workload": "keyed",
        "events": args.events,
        "keys": args.keys,
        "partitions": args.partitions,
        "checkpoint_interval_s": args.checkpoint_interval_s,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__},
        "cluster": {"address": args.address, "simulated_nodes": args.nodes, "nodes": len(ray.nodes())},
        "ray_init_s": ray_init_s,
        "pyarrow_reference": {
            "one_thread_s": ref1_s,
            "one_thread_events_per_s": args.events / ref1_s,
            "all_threads_s": refn_s,
            "all_threads_events_per_s": args.events / refn_s,
        },
        "runs": rows,
    }
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()

    where = f"{report['cluster']['nodes']} nodes" if (args.nodes or args.address) else "local Ray"
    print(
        f"\n[{where}] keyed job, {args.events:,} events, {args.keys:,} keys, {args.partitions} partitions, "
        f"checkpoint every {args.checkpoint_interval_s} s (ray.init {ray_init_s:.1f} s)"
    )
    blank = ""
    print(
        f"{'engine':<22}{'events/s':>14}{'per consumer':>14}{'seconds':>10}{'ratio':>8}{'peak RSS':>11}{'ok':>5}"
    )
    print(f"{'pyarrow, 1 thread':<22}{args.events / ref1_s:>14,.0f}{blank:>14}{ref1_s:>10.2f}{1.0:>8.2f}")
    print(
        f"{'pyarrow, all threads':<22}{args.events / refn_s:>14,.0f}{blank:>14}{refn_s:>10.2f}{ref1_s / refn_s:>8.2f}"
    )
    for r in rows:
        print(
            f"{'rayflow, ' + str(r['consumers']) + ' consumers':<22}{r['events_per_s']:>14,.0f}"
            f"{r['events_per_s_per_consumer']:>14,.0f}{r['seconds']:>10.2f}{r['ratio_to_pyarrow_1_thread']:>8.2f}"
            f"{r['peak_rss_bytes'] / 2**30:>9.2f}Gi{'yes' if r['correct'] else 'NO':>5}"
        )
    if args.nodes and os.cpu_count() and os.cpu_count() <= args.nodes:
        print(
            f"note: {args.nodes} simulated nodes share this machine's {os.cpu_count()} CPUs, so adding "
            "consumers cannot speed the job up here; the figures show whether anything collapses."
        )
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.json}")
    return 0 if all(r["correct"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
