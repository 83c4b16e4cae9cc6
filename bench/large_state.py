"""State larger than memory (issue 13, part 3): runs on disk past the consumer's budget.

    python bench/large_state.py                       # store choice, then 10M and 50M keys
    python bench/large_state.py --keys 1000000 --budget-mib 64

**Store.** Why sorted Parquet runs and not DuckDB tables: the same state
(``--store-rows`` groups of count and sum) is spilled, then ``--lookup-keys``
random keys are looked up (what a flush of changes does), then a second
state of as many rows is folded in (what a run merge does), both ways:
``RunSet`` (``rayflow/_internal/runs.py``) and a DuckDB table keyed by the
group, upserted with ``INSERT ... ON CONFLICT``.

**Throughput at N keys.** One ``rf.ops.Aggregate`` (count and sum of
``value`` per ``key``, the keyed job's) in this process, as one consumer's
partition runs it (no Ray: the figure is the operator's, what bounds a
consumer), fed ``--events-per-key`` x N events in 1M-row batches over N
distinct keys, with a commit (``state_delta``, the incremental commit's
delta) every 8 batches, under a memory share of ``--budget-mib`` (2 GiB by
default, the ``consumer_max_bytes`` default, as one partition's share).
Reported: events/s, the peak RSS, the state's bytes in memory and on disk,
and ``finish`` (the final result, merged over hash ranges) checked exactly
against pyarrow's ``group_by`` over the same events (the reference, timed:
the figures are ratios to it).

**Restore.** ``--restore KEYS SHARE_MIB`` (alone): a checkpoint of KEYS groups (a base and
two deltas of 200k keys) restored under a share of SHARE_MIB, the whole-table way
(``read_state``, ``state_from_tables``, ``bound_state``) and streamed (``restore_bound``, what a
consumer does for a partition that still processes), each in a fresh process: seconds and the
Arrow pool's peak while restoring. Prints only.

Writes bench/results/large_state.json. Never asserts timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import duckdb
import numpy as np
import psutil
import pyarrow as pa

import rayflow as rf
from bench._common import write_json  # noqa: E402
from rayflow._internal.runs import RunSet
from rayflow.partitioning import hash_table

HERE = os.path.dirname(os.path.abspath(__file__))
AGGS = [("value", "count"), ("value", "sum")]
BATCH_ROWS = 1_000_000
COMMIT_EVERY = 8


def _state(rng: np.random.Generator, rows: int, keys: int) -> pa.Table:
    return pa.table(
        {
            "key": pa.array(rng.choice(keys, rows, replace=False)),
            "value_count": pa.array(rng.integers(1, 5, rows)),
            "value_sum": pa.array(rng.random(rows)),
        }
    )


def bench_store(rows: int, lookups: int, work: str) -> dict:
    """Spill, look up and fold ``rows`` groups: Parquet runs against a DuckDB table."""
    rng = np.random.default_rng(5)
    first, second = _state(rng, rows, rows * 2), _state(rng, rows, rows * 2)
    asked = pa.table({"key": pa.array(rng.choice(rows * 2, lookups, replace=False))})
    op = rf.ops.Aggregate(by="key", aggs=AGGS)
    out: dict = {"rows": rows, "lookup_keys": lookups}

    runs = RunSet(os.path.join(work, "runs"), ["key"])
    t0 = time.perf_counter()
    runs.write(first)
    t1 = time.perf_counter()
    got = runs.lookup(hash_table(asked, ["key"]))
    t2 = time.perf_counter()
    runs.write(second)
    runs.merge([0, 1], op._merge, range_bytes=64 << 20)
    t3 = time.perf_counter()
    out["parquet_runs"] = {
        "spill_s": t1 - t0,
        "lookup_s": t2 - t1,
        "fold_s": t3 - t2,
        "disk_bytes": runs.nbytes,
        "found": sum(t.num_rows for t in got),
    }
    runs.delete()

    path = os.path.join(work, "state.duckdb")
    con = duckdb.connect(path)
    t0 = time.perf_counter()
    con.execute("CREATE TABLE s (key BIGINT PRIMARY KEY, value_count BIGINT, value_sum DOUBLE)")
    con.register("first", first)
    con.execute("INSERT INTO s SELECT * FROM first")
    con.execute("CHECKPOINT")
    t1 = time.perf_counter()
    con.register("asked", asked)
    found = con.sql("SELECT s.* FROM s JOIN asked USING (key)").to_arrow_table()
    t2 = time.perf_counter()
    con.register("second", second)
    con.execute(
        "INSERT INTO s SELECT * FROM second ON CONFLICT (key) DO UPDATE SET "
        "value_count = value_count + excluded.value_count, value_sum = value_sum + excluded.value_sum"
    )
    con.execute("CHECKPOINT")
    t3 = time.perf_counter()
    con.close()
    out["duckdb_table"] = {
        "spill_s": t1 - t0,
        "lookup_s": t2 - t1,
        "fold_s": t3 - t2,
        "disk_bytes": os.path.getsize(path),
        "found": found.num_rows,
    }
    assert out["duckdb_table"]["found"] == out["parquet_runs"]["found"]
    return out


def bench_keys(keys: int, events_per_key: int, budget: int, work: str, seed: int) -> dict:
    """One Aggregate over ``events_per_key * keys`` events of ``keys`` keys, under ``budget``."""
    rng = np.random.default_rng(seed)
    events = keys * events_per_key
    op = rf.ops.Aggregate(by="key", aggs=AGGS)
    state = op.bound_state(
        op.init_state(), max_bytes=budget, spill_dir=os.path.join(work, "spill"), key=["key"]
    )
    proc = psutil.Process()
    peak_rss = proc.memory_info().rss
    peak_mem = peak_disk = 0
    batches = []  # kept for the reference only when it fits: see below
    keep = events <= 20_000_000
    t_gen = 0.0
    t0 = time.perf_counter()
    for i in range(0, events, BATCH_ROWS):
        g0 = time.perf_counter()
        n = min(BATCH_ROWS, events - i)
        # every key events_per_key times, in a shuffled order: keys = position mod N, permuted
        k = (np.arange(i, i + n, dtype=np.int64) * 2_654_435_761) % keys
        batch = pa.table({"key": pa.array(k), "value": pa.array(rng.random(n))})
        if keep:
            batches.append(batch)
        t_gen += time.perf_counter() - g0
        state, _ = op.process(state, batch)
        if (i // BATCH_ROWS) % COMMIT_EVERY == COMMIT_EVERY - 1:
            state, _ = op.state_delta(state)
            mem, disk = op.state_nbytes(state)
            peak_mem, peak_disk = max(peak_mem, mem), max(peak_disk, disk)
            peak_rss = max(peak_rss, proc.memory_info().rss)
    state, _ = op.state_delta(state)
    ingest_s = time.perf_counter() - t0 - t_gen
    mem, disk = op.state_nbytes(state)
    peak_rss = max(peak_rss, proc.memory_info().rss)
    t1 = time.perf_counter()
    final = op.finish(state)
    finish_s = time.perf_counter() - t1
    out = {
        "keys": keys,
        "events": events,
        "budget_bytes": budget,
        "ingest_s": ingest_s,
        "events_per_s": events / ingest_s,
        "finish_s": finish_s,
        "state_bytes": mem,
        "state_spilled_bytes": disk,
        "peak_state_bytes": peak_mem,
        "peak_spilled_bytes": max(peak_disk, disk),
        "runs": len(state[5].runs.runs),
        "peak_rss_bytes": max(peak_rss, proc.memory_info().rss),
        "result_rows": final.num_rows,
    }
    op.release_state(state)
    ok = final.num_rows == keys and int(np.asarray(final["value_count"]).sum()) == events
    if keep:
        t2 = time.perf_counter()
        ref = pa.concat_tables(batches).group_by("key").aggregate([("value", "count"), ("value", "sum")])
        out["reference_s"] = time.perf_counter() - t2
        out["reference_events_per_s"] = events / out["reference_s"]
        a = final.sort_by("key")
        b = ref.sort_by("key")
        ok = ok and a["value_count"].equals(b["value_count"])
        ok = ok and np.allclose(np.asarray(a["value_sum"]), np.asarray(b["value_sum"]))
    out["exact"] = bool(ok)
    return out


def bench_restore(mode: str, keys: int, share: int, work: str) -> dict:
    """Restore a checkpoint of ``keys`` groups (made in ``work`` by mode ``"make"``)."""
    from rayflow._internal import runs as rn
    from rayflow._internal.checkpoint import commit as cm
    from rayflow._internal.checkpoint.store import Store

    op = rf.ops.Aggregate(by="key", aggs=AGGS, emit="final")
    store = Store(os.path.join(work, "ck"))
    files = ["state/b.parquet", "state/d0.parquet", "state/d1.parquet"]
    if mode == "make":
        rng = np.random.default_rng(0)
        s = op.init_state()
        s, _ = op.process(s, pa.table({"key": np.arange(keys), "value": np.ones(keys, np.int64)}))
        s, _ = op.state_delta(s)
        store.write_parquet(files[0], cm.with_hash(op.state_to_table(s), ["key"]), fast=True)
        for f in files[1:]:
            s, _ = op.process(
                s, pa.table({"key": rng.integers(0, keys, 200_000), "value": np.ones(200_000, np.int64)})
            )
            s, d = op.state_delta(s)
            store.write_parquet(f, cm.with_hash(d, ["key"]), fast=True)
        return {"state_bytes": op.state_to_table(s).nbytes}
    spill = os.path.join(work, f"spill-{mode}")
    pool = pa.default_memory_pool()
    t0 = time.perf_counter()
    if mode == "whole":
        tables, _ = cm.read_state(store, files)
        st = op.bound_state(op.state_from_tables(tables), max_bytes=share, spill_dir=spill, key=["key"])
        del tables
    else:

        def opener(f):
            return lambda: store.fs.open_input_file(store.full(f))

        chain = [rn.iter_parquet(opener(f), batch_rows=max(1024, share // 4 // 32)) for f in files]
        st = op.restore_bound(chain, max_bytes=share, spill_dir=spill, key=["key"])
    out = {"mode": mode, "restore_s": time.perf_counter() - t0, "peak_arrow_bytes": pool.max_memory()}
    out["rows"] = op.finish(st).num_rows
    op.release_state(st)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, nargs="*", default=[10_000_000, 50_000_000])
    ap.add_argument("--events-per-key", type=int, default=2)
    ap.add_argument("--budget-mib", type=int, nargs="*", default=[2048])
    ap.add_argument("--store-rows", type=int, default=2_000_000)
    ap.add_argument("--lookup-keys", type=int, default=20_000)
    ap.add_argument("--no-store", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "large_state.json"))
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # keys budget_mib events_per_key out
    ap.add_argument("--restore", type=int, nargs=2, metavar=("KEYS", "SHARE_MIB"))
    ap.add_argument("--restore-one", nargs=4, help=argparse.SUPPRESS)  # mode keys share_mib work
    args = ap.parse_args()
    if args.restore_one:
        mode, keys, share_mib, work = args.restore_one
        print(json.dumps(bench_restore(mode, int(keys), int(share_mib) << 20, work)))
        return
    if args.restore:
        work = tempfile.mkdtemp(prefix="rayflow-large-state-")
        try:
            for mode in ("make", "whole", "streamed"):  # a fresh process each: its own pool peak
                cmd = [sys.executable, __file__, "--restore-one", mode, *map(str, args.restore), work]
                r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                if mode == "make":
                    print(f"{args.restore[0]:,} keys, {r['state_bytes'] / 2**20:.0f} MiB of state")
                else:
                    print(
                        f"  {mode:8s} restore {r['restore_s']:.2f} s, peak Arrow "
                        f"{r['peak_arrow_bytes'] / 2**20:.0f} MiB (share {args.restore[1]} MiB), rows {r['rows']:,}"
                    )
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    if args.one:
        keys, budget_mib, per_key, out = args.one
        work = tempfile.mkdtemp(prefix="rayflow-large-state-")
        try:
            r = bench_keys(int(keys), int(per_key), int(budget_mib) << 20, work, seed=int(keys) % 1000)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        with open(out, "w") as f:
            json.dump(r, f)
        return
    work = tempfile.mkdtemp(prefix="rayflow-large-state-")
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "ram_bytes": psutil.virtual_memory().total,
        },
        "runs": [],
    }
    try:
        if not args.no_store:
            results["store"] = s = bench_store(args.store_rows, args.lookup_keys, work)
            print(f"store, {s['rows']:,} rows, {s['lookup_keys']:,} lookups:")
            for name in ("parquet_runs", "duckdb_table"):
                x = s[name]
                print(
                    f"  {name:13s} spill {x['spill_s']:.2f} s  lookup {x['lookup_s']:.3f} s  "
                    f"fold {x['fold_s']:.2f} s  disk {x['disk_bytes'] / 2**20:.0f} MiB"
                )
        for budget_mib in args.budget_mib:
            for keys in args.keys:
                # A fresh process per figure: its peak RSS is its own (an allocator keeps pages).
                one = os.path.join(work, "one.json")
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--one",
                        str(keys),
                        str(budget_mib),
                        str(args.events_per_key),
                        one,
                    ],
                    check=True,
                )
                with open(one) as f:
                    r = json.load(f)
                results["runs"].append(r)
                ref = (
                    f"  (pyarrow group_by {r['reference_events_per_s'] / 1e6:.2f}M/s)"
                    if "reference_s" in r
                    else ""
                )
                print(
                    f"{keys:>11,} keys, budget {budget_mib} MiB: {r['events_per_s'] / 1e6:.2f}M events/s{ref}, "
                    f"finish {r['finish_s']:.1f} s, state {r['state_bytes'] / 2**20:.0f} MiB in memory "
                    f"+ {r['peak_spilled_bytes'] / 2**20:.0f} MiB on disk ({r['runs']} runs), "
                    f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB, exact={r['exact']}"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
