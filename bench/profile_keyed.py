"""Per-event cost of each step of the keyed job, each measured in isolation (docs/performance.md).

    python bench/profile_keyed.py                   # 10M events (bench/data/), 16 partitions
    python bench/profile_keyed.py --events 2000000  # quicker

Runs the steps the keyed job runs, in one process (plus one small actor that
fetches, as a consumer does), over the same Parquet file as
``bench/throughput.py`` (made if missing), and reports microseconds per event
for each:

- ``read``: ``ParquetFile.read_row_group`` of each row group (1M rows), one thread,
  and ``combine_chunks``/``to_batches`` after it, as ``rf.sources.Parquet`` does;
- ``hash`` (``hash_table`` of the key) and ``route`` (``PartitionMap.route``);
- ``split``: ``split_by_partition`` into one sub-batch per partition;
- ``put``: ``ray.put`` of each sub-batch (the copy into the object store);
- ``fetch``: ``ray.get`` of those references in another process (an actor, as a
  consumer gets them), timed inside it, plus the round trip of one call;
- ``group_by`` and ``merge``: ``rf.ops.Aggregate`` over each partition's
  sub-batches in arrival order, timing its partial ``group_by`` and its lazy merges;
- ``commit``: ``state_to_table`` + ``with_hash`` + ``write_parquet`` of every
  partition's state at the end (one commit round of all partitions); per event,
  amortized over ``--commit-rounds`` rounds (a 2 s run with 1 s commits makes ~2).

Also the pyarrow reference (``read_table`` + ``group_by``, one thread and all
threads), and copy evidence: whether ``combine_chunks`` moved any buffer, the
bytes ``ray.put`` serializes out of band against the sub-batch's bytes (one
``memcpy`` into shared memory), and whether a fetched sub-batch's buffers lie in
the object store (zero-copy) rather than in private memory. Writes
``bench/results/profile_keyed.json``. Never asserts timings. A local Ray with 2 CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import pyarrow as pa
import pyarrow.parquet as pq
import ray

import rayflow as rf
from rayflow._internal.checkpoint.commit import with_hash
from rayflow._internal.checkpoint.store import Store
from rayflow.partitioning import PartitionMap, hash_table, split_by_partition

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from throughput import make_input  # noqa: E402

from bench._common import write_json  # noqa: E402


class Timer:
    def __init__(self):
        self.s: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.s[name] = self.s.get(name, 0.0) + seconds

    def time(self, name, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.add(name, time.perf_counter() - t0)
        return out


@ray.remote(num_cpus=0)
class Getter:
    """Gets references as a consumer does (another process; zero-copy from shared memory)."""

    def get(self, wrapped: list) -> tuple[float, int, list[bool]]:
        t0 = time.perf_counter()
        batches = ray.get(wrapped)
        took = time.perf_counter() - t0
        rows = sum(b.num_rows for b in batches)
        return took, rows, [_in_shared_memory(b) for b in batches[:4]]


def _in_shared_memory(batch: pa.RecordBatch) -> bool:
    """Whether the batch's data buffers live in a file mapping (the object store's shared memory)."""
    addr = batch.column(0).buffers()[1].address
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= addr < hi:
                path = parts[5] if len(parts) > 5 else ""  # the store's memory-mapped file
                return path.startswith("/dev/shm") or "plasma" in path
    return False


def reference(path: str, threads: bool) -> float:
    t0 = time.perf_counter()
    table = pq.read_table(path, use_threads=threads)
    table.group_by("key", use_threads=threads).aggregate([("value", "count"), ("value", "sum")])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--commit-rounds", type=float, default=2.0, help="commit rounds to amortize per event")
    ap.add_argument("--data-dir", default=os.path.join(HERE, "data"))
    ap.add_argument("--json", default=os.path.join(HERE, "results", "profile_keyed.json"))
    args = ap.parse_args()

    path = make_input(args.events, args.keys, args.seed, args.data_dir)
    n = args.events
    ref1 = min(reference(path, False) for _ in range(2))
    ref_all = min(reference(path, True) for _ in range(2))

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    getter = Getter.remote()
    ray.get(getter.get.remote([ray.put(pa.record_batch({"a": [1]}))]))  # warm

    pmap = PartitionMap.uniform(args.partitions)
    op = rf.ops.Aggregate(by="key", aggs=[("value", "count"), ("value", "sum")]).for_input(unbounded=False)
    tm = Timer()
    orig_partial, orig_merge = op._partial, op._merge
    op._partial = lambda t: tm.time("group_by", orig_partial, t)
    op._merge = lambda ts, extra=(): tm.time("merge", orig_merge, ts, extra)
    states = {p: op.init_state() for p in range(args.partitions)}
    combine_copied = False
    put_payload = sub_bytes = batch_bytes = 0
    calls = 0
    shared = []
    pf = pq.ParquetFile(path)
    for i in range(pf.metadata.num_row_groups):
        table = tm.time("read", pf.read_row_group, i, use_threads=False)
        combined = tm.time("read.combine_chunks", table.combine_chunks)
        combine_copied |= any(
            a.chunk(0).buffers()[1].address != b.chunk(0).buffers()[1].address
            for a, b in zip(table.columns, combined.columns)
            if a.num_chunks == 1
        )
        for batch in tm.time("read.combine_chunks", combined.to_batches):
            batch_bytes += batch.nbytes
            h = tm.time("hash", hash_table, batch, "key")
            routed = tm.time("route", pmap.route, h)
            parts = tm.time("split", split_by_partition, batch, routed, args.partitions)
            sub_bytes += sum(sub.nbytes for _, sub in parts)
            ctx = ray._private.worker.global_worker.get_serialization_context()
            put_payload += sum(ctx.serialize(sub).total_bytes for _, sub in parts)  # zero-copy
            refs = [tm.time("put", ray.put, sub) for _, sub in parts]
            t0 = time.perf_counter()
            took, rows, in_shm = ray.get(getter.get.remote(refs))
            tm.add("fetch.round_trip", time.perf_counter() - t0 - took)
            tm.add("fetch", took)
            shared += in_shm
            calls += 1
            assert rows == batch.num_rows
            # The consumer's side: its own copy of the sub-batches (zero-copy gets in this process).
            for (p, _), sub in zip(parts, ray.get(refs)):
                states[p], _ = op.process(states[p], pa.Table.from_batches([sub]))
            del refs
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        state_rows = 0
        for p, st in states.items():
            t = tm.time("commit.state_to_table", op.state_to_table, st)
            states[p] = op.state_from_table(t)
            t = tm.time("commit.with_hash", with_hash, t, ["key"])
            state_rows += t.num_rows
            tm.time("commit.write_parquet", store.write_parquet, f"state/p{p:05d}/x.parquet", t)
    ray.shutdown()

    us = {k: v / n * 1e6 for k, v in tm.s.items()}
    commit_round_s = sum(v for k, v in tm.s.items() if k.startswith("commit."))
    for k in [k for k in us if k.startswith("commit.")]:
        us[k] *= args.commit_rounds
    steps = {
        "read": us["read"] + us["read.combine_chunks"],
        "hash": us["hash"] + us["route"],
        "split": us["split"],
        "put": us["put"],
        "fetch": us["fetch"] + us["fetch.round_trip"],
        "group_by": us["group_by"],
        "merge": us["merge"],
        "commit": sum(v for k, v in us.items() if k.startswith("commit.")),
    }
    result = {
        "events": n,
        "partitions": args.partitions,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__},
        "us_per_event": {k: round(v, 4) for k, v in steps.items()},
        "total_us_per_event": round(sum(steps.values()), 4),
        "detail_us_per_event": {k: round(v, 4) for k, v in sorted(us.items())},
        "commit_round_s": round(commit_round_s, 4),
        "commit_rounds_amortized": args.commit_rounds,
        "state_rows": state_rows,
        "pyarrow_reference_us_per_event": {
            "one_thread": round(ref1 / n * 1e6, 4),
            "all_threads": round(ref_all / n * 1e6, 4),
        },
        "copies": {
            "combine_chunks_copied": combine_copied,
            "split_bytes_over_batch_bytes": round(sub_bytes / batch_bytes, 4),
            "put_serialized_bytes_over_sub_batch_bytes": round(put_payload / sub_bytes, 4),
            "fetched_in_shared_memory": all(shared),
            "fetch_calls": calls,
        },
    }
    print(f"{'step':<12}{'us/event':>10}")
    for k, v in steps.items():
        print(f"{k:<12}{v:>10.4f}")
    print(f"{'total':<12}{result['total_us_per_event']:>10.4f}")
    ref = result["pyarrow_reference_us_per_event"]
    print(
        f"pyarrow read+group_by: {ref['one_thread']:.4f} (1 thread), {ref['all_threads']:.4f} (all threads)"
    )
    print("copies:", json.dumps(result["copies"]))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
