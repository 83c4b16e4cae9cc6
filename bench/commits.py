"""Commit cost and restore time of keyed state (issue 15, DESIGN §5: commit cost follows change).

    python bench/commits.py                          # 10M events; 100k, 1M and 10M keys
    python bench/commits.py --keys 100000 --events 2000000

**Commit cost.** For each key count N, the WORKLOAD keyed job (``rf.ops.Aggregate``
count and sum per key, 16 partitions) reads a Parquet file of N events that
touch every key once (so the state holds all N keys from the start: the
state a long-running job has), then the 10M WORKLOAD events over those keys,
and runs two ways: with 1 s commits written incrementally (the default: a
delta of the keys changed since the last commit, compacted in the
background), and with 1 s commits that write the whole state each time
(``state_deltas_max=0``, the behaviour before incremental commits). The
commit cost is the consumers' share of their time spent committing
(``stats["commit_s"]`` over consumers x seconds: a consumer processes
nothing while it commits), from the same run as its events/s. (A run without
interim commits is no baseline: the sources trim their queues only on
commits, so such a run is bound by its queues instead.)
Every run's result is checked against pyarrow's ``group_by``.

**Restore.** One partition holding ``--restore-keys`` keys (10M by default) is
written as a base plus 8 deltas of 1M changed keys each (what a chain holds
before its compaction), then read back as a new owner does
(``commit.read_state`` and ``Aggregate.state_from_table``), in this process;
the whole-base restore is timed too.

Writes bench/results/commits.json. Never asserts timings.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import rayflow as rf
from bench._common import write_json  # noqa: E402
from bench.throughput import HERE, make_input, reference, run_once, same
from rayflow._internal.checkpoint import commit as cm
from rayflow._internal.checkpoint.store import Store

AGGS = [("value", "count"), ("value", "sum")]
#: How each key count's job commits: (label, checkpoint_interval_s, state_deltas_max).
MODES = (("1 s, incremental", 1.0, 8), ("1 s, whole state", 1.0, 0))


def make_state_input(events: int, keys: int, seed: int, data_dir: str) -> str:
    """The WORKLOAD events after ``keys`` events that touch every key once (value 1.0)."""
    path = os.path.join(data_dir, f"state-{events}-{keys}-{seed}.parquet")
    if os.path.exists(path):
        return path
    events_path = make_input(events, keys, seed, data_dir)
    schema = rf.sources.SYNTHETIC_SCHEMA
    tmp = path + ".tmp"
    with pq.ParquetWriter(tmp, schema) as w:
        for start in range(0, keys, 1_000_000):
            k = np.arange(start, min(keys, start + 1_000_000), dtype=np.int64)
            w.write_table(
                pa.table(
                    {"key": k, "value": np.ones(len(k)), "ts": np.zeros(len(k), np.int64)}, schema=schema
                )
            )
        f = pq.ParquetFile(events_path)
        for i in range(f.num_row_groups):
            w.write_table(f.read_row_group(i).cast(schema))
    os.replace(tmp, path)
    return path


def commit_cost(args) -> list[dict]:
    rows = []
    for keys in args.keys:
        path = make_state_input(args.events, keys, args.seed, args.data_dir)
        _, ref = reference(path, threads=True)
        by_mode = {}
        if keys == args.keys[0]:  # a warm-up run: the first one on a fresh Ray also starts its workers
            run_once(path, consumers=args.consumers, partitions=args.partitions, interval_s=1.0, address=None)
        for label, interval_s, deltas_max in MODES:
            best = None
            for _ in range(args.repeat):
                stats, out = run_once(
                    path,
                    consumers=args.consumers,
                    partitions=args.partitions,
                    interval_s=interval_s,
                    address=None,
                    state_deltas_max=deltas_max,
                )
                stats["correct"] = same(out, ref)
                if best is None or stats["events_per_s"] > best["events_per_s"]:
                    best = stats
            by_mode[label] = best
        for label, _, _ in MODES:
            s = by_mode[label]
            rows.append(
                {
                    "keys": keys,
                    "mode": label,
                    "events_per_s": s["events_per_s"],
                    # the consumers' time in commits, of their wall time (the same run's measure)
                    "commit_cost": (s.get("commit_s") or 0) / (args.consumers * s["seconds"]),
                    "commit_s": s.get("commit_s"),
                    "state_bases": s.get("state_bases"),
                    "state_deltas": s.get("state_deltas"),
                    "compactions": s.get("compactions"),
                    "seconds": s["seconds"],
                    "correct": s["correct"],
                }
            )
            r = rows[-1]
            print(
                f"{keys:>11,} keys  {label:<20} {r['events_per_s']:>12,.0f} ev/s  commit cost {r['commit_cost']:>6.1%} "
                f"({r['commit_s'] or 0:.2f} s in commits)  "
                f"bases {r['state_bases']}  deltas {r['state_deltas']}  "
                f"compactions {r['compactions']}  ok {r['correct']}",
                flush=True,
            )
    return rows


def restore(keys: int, deltas: int, delta_keys: int, seed: int) -> dict:
    """Seconds for a new owner to restore one partition of ``keys`` keys (base + ``deltas``)."""
    rng = np.random.default_rng(seed)
    op = rf.ops.Aggregate(by="key", aggs=AGGS)
    root = tempfile.mkdtemp(prefix="rayflow-bench-restore-")
    try:
        store = Store(root)
        base = pa.table(
            {
                "key": np.arange(keys, dtype=np.int64),
                "value_count": rng.integers(1, 100, keys),
                "value_sum": rng.random(keys) * 1000,
            }
        )
        t0 = time.perf_counter()
        files = [cm.write_state(store, "state/p00000/e000001-s000001-a-op0.parquet", base, ["key"])[0]]
        write_base_s = time.perf_counter() - t0
        write_delta_s = []
        for n in range(deltas):
            k = rng.choice(keys, delta_keys, replace=False).astype(np.int64)
            d = pa.table(
                {"key": k, "value_count": np.ones(delta_keys, np.int64), "value_sum": np.ones(delta_keys)}
            )
            t0 = time.perf_counter()
            files.append(
                cm.write_state(store, f"state/p00000/e000001-s{n + 2:06d}-a-op0-d.parquet", d, ["key"])[0]
            )
            write_delta_s.append(time.perf_counter() - t0)

        def timed(fs) -> float:
            t0 = time.perf_counter()
            tables, _ = cm.read_state(store, fs)
            state = op.state_from_tables(tables)
            assert state[0].num_rows == keys
            return time.perf_counter() - t0

        return {
            "keys": keys,
            "deltas": deltas,
            "delta_keys": delta_keys,
            "write_base_s": write_base_s,
            "write_delta_s": float(np.mean(write_delta_s)) if write_delta_s else None,
            "restore_base_s": timed(files[:1]),
            "restore_base_and_deltas_s": timed(files),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--keys", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--consumers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="runs per mode (best is reported)")
    ap.add_argument("--restore-keys", type=int, default=10_000_000)
    ap.add_argument("--restore-deltas", type=int, default=8)
    ap.add_argument("--restore-delta-keys", type=int, default=1_000_000)
    ap.add_argument("--skip-jobs", action="store_true", help="measure the restore only")
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--data-dir", default=os.path.join(HERE, "data"))
    ap.add_argument("--json", default=os.path.join(HERE, "results", "commits.json"))
    args = ap.parse_args(argv)

    out: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "events": args.events,
        "partitions": args.partitions,
        "consumers": args.consumers,
    }
    rest = restore(args.restore_keys, args.restore_deltas, args.restore_delta_keys, args.seed)
    print(
        f"restore of {rest['keys']:,} keys in one partition: base {rest['restore_base_s']:.2f} s, base + "
        f"{rest['deltas']} deltas of {rest['delta_keys']:,} keys {rest['restore_base_and_deltas_s']:.2f} s "
        f"(write: base {rest['write_base_s']:.2f} s, a delta {rest['write_delta_s'] or 0:.2f} s)",
        flush=True,
    )
    out["restore"] = rest
    if not args.skip_jobs:
        import ray

        ray.init(
            address="local",
            num_cpus=args.num_cpus,
            include_dashboard=False,
            object_store_memory=2 << 30,
            log_to_driver=False,
        )
        try:
            out["commit_cost"] = commit_cost(args)
        finally:
            ray.shutdown()
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
