"""A different partition count on resume: the cost of re-splitting committed state.

    python bench/repartition.py                 # 1M keys, 16 -> 32 -> 8
    python bench/repartition.py --keys 4000000

The committed state of the keyed job's ``rf.ops.Aggregate`` (count and sum of ``value`` per
``key``) over ``--keys`` keys, as 16 partitions would commit it (per partition, a base sorted by
``_hash`` holding 3/4 of its keys and a delta holding the rest), is re-split the way the manager
does at start (``rayflow/_internal/repartition.py``, in this process, no Ray): 16 -> 32 (each
partition split in two) and then 32 -> 8 (four merged into one, at one consistent cut). Reported:
seconds, state rows and Arrow bytes moved, million rows/s. The reference, timed in the same run:
reading the same files whole and writing them again unchanged (``Store.write_parquet``), the
floor of any re-split that writes every row once; figures are ratios to it.

Writes bench/results/repartition.json. Never asserts timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import pyarrow as pa

from rayflow._internal import repartition as rp
from rayflow._internal.checkpoint.commit import CommitRecord, write_state
from rayflow._internal.checkpoint.store import Store
from rayflow.partitioning import PartitionMap, hash_table

KEY = ["key"]


def committed_state(store: Store, keys: int, partitions: int) -> dict[int, CommitRecord]:
    """16 partitions' commits of an Aggregate's state over ``keys`` keys: a base and a delta each."""
    rng = np.random.default_rng(42)
    t = pa.table(
        {
            "key": pa.array(np.arange(keys, dtype=np.int64)),
            "value_count": pa.array(rng.integers(1, 100, keys)),
            "value_sum": pa.array(rng.random(keys) * 1000),
        }
    )
    old = PartitionMap.uniform(partitions)
    route = old.route(hash_table(t, KEY))
    commits = {}
    for p in range(partitions):
        mine = t.filter(pa.array(route == p))
        cut = mine.num_rows * 3 // 4
        base, rb = write_state(store, f"state/p{p:05d}/e1-s1-b-op0.parquet", mine.slice(0, cut), KEY)
        delta, rd = write_state(store, f"state/p{p:05d}/e1-s2-d-op0-d.parquet", mine.slice(cut), KEY)
        commits[p] = CommitRecord(
            partition=p,
            lease_epoch=1,
            positions={"s": keys},
            state_files=[base, delta],
            output_files=[],
            rows_in=0,
            rows_total=mine.num_rows,
            state_rows=rb + rd,
            final=False,
            map_version=1,
        )
    return commits


def step(store: Store, old: PartitionMap, new: PartitionMap, commits) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    records, nbytes = rp.repartition(
        store, name="bench", old=old, new=new, commits=commits, key=KEY, lease_epoch=1
    )
    s = time.perf_counter() - t0
    rows = sum(r.state_rows for r in records)
    return {r.partition: r for r in records}, {
        "from": old.num_partitions,
        "to": new.num_partitions,
        "seconds": round(s, 3),
        "state_rows": rows,
        "bytes_moved": nbytes,
        "mrows_per_s": round(rows / s / 1e6, 2),
    }


def reference(store: Store, commits) -> float:
    """Read every state file whole and write it again unchanged: seconds."""
    t0 = time.perf_counter()
    for c in commits.values():
        for f in c.state_files:
            store.write_parquet(f + ".copy", store.read_parquet(f), fast=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rayflow-bench-repart-") as d:
        store = Store(d)
        m16, m32, m8 = (
            PartitionMap.uniform(16),
            PartitionMap.uniform(32, version=2),
            PartitionMap.uniform(8, version=3),
        )
        commits = committed_state(store, args.keys, 16)
        ref_s = reference(store, commits)
        c32, split = step(store, m16, m32, commits)
        _, merge = step(store, m32, m8, c32)
    for row in (split, merge):
        row["ratio_to_copy"] = round(row["seconds"] / ref_s, 2)
    print(f"{'step':>9} {'seconds':>8} {'rows':>10} {'MiB moved':>10} {'Mrows/s':>8} {'x copy':>7}")
    for r in (split, merge):
        print(
            f"{r['from']:>3} -> {r['to']:<3} {r['seconds']:>8.3f} {r['state_rows']:>10,} "
            f"{r['bytes_moved'] / 2**20:>10.1f} {r['mrows_per_s']:>8.2f} {r['ratio_to_copy']:>7.2f}"
        )
    print(f"reference (read and rewrite every file unchanged): {ref_s:.3f} s")
    os.makedirs("bench/results", exist_ok=True)
    out = {
        "keys": args.keys,
        "reference_copy_s": round(ref_s, 3),
        "steps": [split, merge],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    with open("bench/results/repartition.json", "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
