"""Throughput of the WORKLOAD keyed and window jobs, with the single-process pyarrow reference.

    python bench/throughput.py                      # keyed job, 10M events, 2 consumers, local Ray
    python bench/throughput.py --events 2000000 --consumers 1 2 4
    python bench/throughput.py --job window         # 1 s tumbling event-time windows per key
    python bench/throughput.py --job keyed window   # both, in the same run
    python bench/throughput.py --sources 1 2        # each consumer count with 1, then 2 source actors

Generates the WORKLOAD events once as a Parquet file (row groups of 1M rows,
under bench/data/), then for each job and consumer count runs the job from
that file with checkpointing on, checks the result against the reference, and
reports events/s (first read to final commit, WORKLOAD.md), the ratio to the
pyarrow reference (read + group_by over the same file, one thread and all
threads), start-up time, the source actors the run used (``--sources``, or the
engine's auto rule: ``EngineConfig.num_sources=None``), and the peak memory of
the Ray processes.

The keyed job is ``rf.ops.Aggregate`` per key over the whole input; its
reference is ``group_by("key")``. The window job is ``rf.ops.Window`` with
1-second tumbling windows of event time (``event_time="ts"`` on the Pipeline,
no out-of-orderness: the file's ``ts`` never goes back); its reference is
``group_by(["key", "window_start"])`` with ``window_start = ts - ts % 1000``.
Prints a table per job and writes JSON: bench/results/throughput.json (keyed)
and bench/results/throughput_window.json (window), one layout for both.
Never asserts timings.
"""

from __future__ import annotations

import argparse
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
import pyarrow.compute as pc
import pyarrow.parquet as pq

import rayflow as rf
from bench._common import write_json  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

JOBS = ("keyed", "window")
#: The window job's window length (WORKLOAD.md: 1-second tumbling windows over ``ts`` in ms).
WINDOW_MS = 1000
#: The columns a job's result is compared on, in sort order first.
RESULT_COLUMNS = {
    "keyed": ["key", "value_count", "value_sum"],
    "window": ["key", "window_start", "value_count", "value_sum"],
}


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


def reference(path: str, threads: bool, job: str = "keyed") -> tuple[float, pa.Table]:
    """Seconds to read ``path`` and compute ``job``'s result with pyarrow alone, and the result."""
    t0 = time.perf_counter()
    table = pq.read_table(path, use_threads=threads)
    by = ["key"]
    if job == "window":
        table = table.append_column("window_start", window_starts(table["ts"]))
        by = ["key", "window_start"]
    out = table.group_by(by, use_threads=threads).aggregate([("value", "count"), ("value", "sum")])
    return time.perf_counter() - t0, out


def window_starts(ts: pa.ChunkedArray | pa.Array, window_ms: int = WINDOW_MS) -> pa.ChunkedArray | pa.Array:
    """The tumbling window each event time (int64 ms) falls in: ``ts - ts % window_ms``.

    ``modulo`` takes the sign of the divisor, so a negative ``ts`` still maps
    to the window that starts at or before it (floor, not truncation).
    """
    return pc.subtract(ts, pc.modulo(ts, window_ms))


def make_operator(job: str) -> rf.ops.Operator:
    aggs = [("value", "count"), ("value", "sum")]
    if job == "window":
        return rf.ops.Window(by="key", aggs=aggs, tumbling_s=WINDOW_MS / 1000)
    return rf.ops.Aggregate(by="key", aggs=aggs)


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


def run_once(
    path,
    *,
    job="keyed",
    consumers,
    partitions,
    interval_s,
    address,
    sources=None,
    state_deltas_max=None,
    one_machine=False,
) -> tuple[dict, pa.Table]:
    """One run of ``job``; ``sources``: source actors (``None``: the engine's auto rule);
    ``state_deltas_max``: ``EngineConfig.state_deltas_max`` (``None``: its default);
    ``one_machine``: every node of the cluster is on this machine (``--nodes``), so its local
    paths are shared (``Pipeline(local_paths_shared=True)``)."""
    ck = tempfile.mkdtemp(prefix="rayflow-bench-")
    try:
        pipeline = rf.Pipeline(
            name=f"bench-{job}-{consumers}c",
            source=rf.sources.Parquet(path),
            key="key",
            partitions=partitions,
            operator=make_operator(job),
            sink=rf.sinks.Parquet(os.path.join(ck, "out")),
            consumers=consumers,
            checkpoint_dir=os.path.join(ck, "checkpoints"),
            checkpoint_interval_s=interval_s,
            config=rf.EngineConfig(
                num_sources=sources,
                **({} if state_deltas_max is None else {"state_deltas_max": state_deltas_max}),
            ),
            progress=False,
            local_paths_shared=one_machine,
            **({"event_time": "ts", "max_out_of_orderness_s": 0.0} if job == "window" else {}),
        )
        with PeakRSS() as mem:
            result = pipeline.run()
        out = pq.read_table(os.path.join(ck, "out"))
        stats = dict(result.stats)
        stats["peak_rss_bytes"] = mem.peak
        return stats, out
    finally:
        shutil.rmtree(ck, ignore_errors=True)


def same(a: pa.Table, b: pa.Table, job: str = "keyed") -> bool:
    """Whether the engine's result ``a`` has exactly the reference's groups, counts and sums
    (sums are exact: WORKLOAD values are dyadic). The window job's ``window_end`` must be
    ``window_start`` plus the window length."""
    cols = RESULT_COLUMNS[job]
    if job == "window":
        ends_ok = pc.all(pc.equal(a["window_end"], pc.add(a["window_start"], WINDOW_MS))).as_py()
        if ends_ok is False:
            return False
    order = [(c, "ascending") for c in cols[:-2]]
    a = a.select(cols).sort_by(order)
    b = b.select(cols).sort_by(order)
    return a.num_rows == b.num_rows and a.equals(b)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--job",
        nargs="+",
        choices=JOBS,
        default=["keyed"],
        help="WORKLOAD jobs to run (default: keyed); 'keyed window' runs both in the same run",
    )
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
    ap.add_argument(
        "--checkpoint-interval-s",
        type=float,
        default=None,
        help="commit interval, the same for every job of the run (default: 1 s when the window job "
        "runs, the window target's setting; 2 s for the keyed job alone)",
    )
    ap.add_argument(
        "--sources",
        type=int,
        nargs="+",
        default=None,
        help="source actor counts to run each consumer count with (default: the engine's auto rule)",
    )
    ap.add_argument("--repeat", type=int, default=2, help="runs per consumer count (best is reported)")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    ap.add_argument("--data-dir", default=os.path.join(HERE, "data"))
    ap.add_argument(
        "--json",
        default=os.path.join(HERE, "results", "throughput.json"),
        help="the keyed job's JSON; the window job's goes next to it, as <name>_window.json",
    )
    args = ap.parse_args(argv)
    jobs = list(dict.fromkeys(args.job))
    if args.checkpoint_interval_s is None:
        args.checkpoint_interval_s = 1.0 if "window" in jobs else 2.0

    import ray

    path = make_input(args.events, args.keys, args.seed, args.data_dir)
    refs = {}
    for job in jobs:
        ref1_s, ref = reference(path, threads=False, job=job)
        ref1_s = min(ref1_s, reference(path, threads=False, job=job)[0])
        refn_s = min(reference(path, threads=True, job=job)[0] for _ in range(2))
        refs[job] = (ref1_s, refn_s, ref)

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

    reports = {}
    for job in jobs:
        ref1_s, refn_s, ref = refs[job]
        rows = []
        for c in args.consumers:
            for n_src in args.sources or [None]:
                best = None
                for _ in range(args.repeat):
                    stats, out = run_once(
                        path,
                        job=job,
                        consumers=c,
                        partitions=args.partitions,
                        interval_s=args.checkpoint_interval_s,
                        address=args.address,
                        sources=n_src,
                        one_machine=bool(args.nodes) and args.address is None,
                    )
                    stats["correct"] = same(out, ref, job)
                    stats["output_rows"] = out.num_rows
                    stats["sources_requested"] = "auto" if n_src is None else n_src
                    if best is None or stats["events_per_s"] > best["events_per_s"]:
                        best = stats
                best["events_per_s_per_consumer"] = best["events_per_s"] / c
                best["ratio_to_pyarrow_1_thread"] = best["events_per_s"] / (args.events / ref1_s)
                best["ratio_to_pyarrow_all_threads"] = best["events_per_s"] / (args.events / refn_s)
                rows.append(best)
        reports[job] = {
            "workload": job,
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
                "output_rows": ref.num_rows,
            },
            "runs": rows,
        }
        if job == "window":
            reports[job]["window_s"] = WINDOW_MS / 1000
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()

    for job, report in reports.items():
        print_table(report, args)
        out_json = json_path(args.json, job)
        write_json(out_json, report, lead="\n")
    return 0 if all(r["correct"] for report in reports.values() for r in report["runs"]) else 1


def json_path(keyed_path: str, job: str) -> str:
    """Where ``job``'s JSON goes: ``keyed_path`` for the keyed job (the layout every earlier run
    wrote), ``<stem>_<job>.json`` next to it for another job."""
    if job == "keyed":
        return keyed_path
    stem, ext = os.path.splitext(keyed_path)
    return f"{stem}_{job}{ext or '.json'}"


def print_table(report: dict, args) -> None:
    events, refs = report["events"], report["pyarrow_reference"]
    ref1_s, refn_s = refs["one_thread_s"], refs["all_threads_s"]
    where = f"{report['cluster']['nodes']} nodes" if (args.nodes or args.address) else "local Ray"
    what = {"keyed": "keyed job", "window": f"window job ({report.get('window_s', 1.0):g} s tumbling)"}
    print(
        f"\n[{where}] {what[report['workload']]}, {events:,} events, {report['keys']:,} keys, "
        f"{report['partitions']} partitions, checkpoint every {report['checkpoint_interval_s']} s "
        f"(ray.init {report['ray_init_s']:.1f} s)"
    )
    blank = ""
    print(
        f"{'engine':<22}{'sources':>9}{'events/s':>14}{'per consumer':>14}{'seconds':>10}{'vs 1 thr':>10}{'vs all thr':>12}"
        f"{'peak RSS':>11}{'ok':>5}"
    )
    print(
        f"{'pyarrow, 1 thread':<22}{blank:>9}{events / ref1_s:>14,.0f}{blank:>14}{ref1_s:>10.2f}{1.0:>10.2f}"
        f"{refn_s / ref1_s:>12.2f}"
    )
    print(
        f"{'pyarrow, all threads':<22}{blank:>9}{events / refn_s:>14,.0f}{blank:>14}{refn_s:>10.2f}{ref1_s / refn_s:>10.2f}"
        f"{1.0:>12.2f}"
    )
    for r in report["runs"]:
        n_src = str(r.get("sources", "?")) + (" (auto)" if r.get("sources_requested") == "auto" else "")
        print(
            f"{'rayflow, ' + str(r['consumers']) + ' consumers':<22}{n_src:>9}{r['events_per_s']:>14,.0f}"
            f"{r['events_per_s_per_consumer']:>14,.0f}{r['seconds']:>10.2f}{r['ratio_to_pyarrow_1_thread']:>10.2f}"
            f"{r['ratio_to_pyarrow_all_threads']:>12.2f}{r['peak_rss_bytes'] / 2**30:>9.2f}Gi"
            f"{'yes' if r['correct'] else 'NO':>5}"
        )
    if args.nodes and os.cpu_count() and os.cpu_count() <= args.nodes:
        print(
            f"note: {args.nodes} simulated nodes share this machine's {os.cpu_count()} CPUs, so adding "
            "consumers cannot speed the job up here; the figures show whether anything collapses."
        )


if __name__ == "__main__":
    sys.exit(main())
