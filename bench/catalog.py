"""Catalog start-up time as a job ages: after N commits, with and without retention.

    python bench/catalog.py                      # 10,000 commits, local and (if moto is installed) S3
    python bench/catalog.py --commits 2000 --no-remote

A catalog is filled the way a running manager fills it: commit calls of
``--per-call`` partition records (one call per consumer and checkpoint), each
naming a state file and an output file; every ``--maintain-every`` commits
the manager's maintenance runs (outputs published, state files retired,
history trimmed, the remote log compacted). The "unbounded" variants skip
the trimming and the compaction (state files are retired in both), which is
what the catalog did before retention.

Start-up is what the GroupManager does against the catalog when it starts:
open it (for a remote checkpoint directory: list the log, read the snapshot
and the entries after it into a local index), then read the latest commits,
the lease epochs, the outputs still to publish and the live state files.
"fresh node" starts with no local index (a manager restarted on another node).

Prints a table and writes JSON (bench/results/catalog.json). Never asserts timings.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench._common import write_json  # noqa: E402
from rayflow._internal.checkpoint.catalog import Catalog
from rayflow._internal.checkpoint.commit import CommitRecord
from rayflow._internal.checkpoint.store import Store

HERE = os.path.dirname(os.path.abspath(__file__))
STATE_FILES_KEPT = 3  # as the manager keeps them


def fill(cat: Catalog, args, *, maintain: bool) -> None:
    """Record ``args.commits`` commits as consumers would, maintaining as the manager would."""
    done, rnd = 0, 0
    cat.record_leases([(p, f"consumer-{p % 2}", 1) for p in range(args.partitions)])
    while done < args.commits:
        rnd += 1
        records = []
        for p in range(args.partitions):
            if done + len(records) >= args.commits:
                break
            records.append(
                CommitRecord(
                    partition=p,
                    lease_epoch=1,
                    positions={f"split-{s}": rnd * 10_000 for s in range(4)},
                    state_files=[f"state/p{p:05d}/e000001-s{rnd:06d}-op1.parquet"],
                    output_files=[f"part-{p:05d}-{rnd:016x}.parquet"],
                    rows_in=10_000,
                    rows_total=rnd * 10_000,
                    state_rows=5_000,
                    final=False,
                    map_version=1,
                )
            )
        for i in range(0, len(records), args.per_call):
            batch = records[i : i + args.per_call]
            cat.record_commits(f"consumer-{i // args.per_call}", batch)
            cat.set_published([f for r in batch for f in r.output_files])
        cat.record_events([("rebalance", {"why": "bench", "round": rnd})])
        before = done
        done += len(records)
        if done // args.maintain_every > before // args.maintain_every:
            cat.retire_state_files(keep=STATE_FILES_KEPT)  # the manager did this before retention too
            if maintain:
                cat.trim(keep_published_outputs=False)
                cat.compact_log()


def start(path: str, log_root: str | None) -> tuple[float, int]:
    """One manager start against the catalog: seconds, and the commits it sees."""
    t0 = time.perf_counter()
    cat = Catalog(path, log_root=log_root)
    latest = cat.latest_commits()
    cat.lease_epochs()
    cat.unpublished_outputs()
    cat.all_state_files()
    took = time.perf_counter() - t0
    rows = cat.con.execute("SELECT count(*) FROM commits").fetchone()[0]
    cat.close()
    assert len(latest) > 0
    return took, rows


def measure(name: str, args, *, log_root: str | None, maintain: bool) -> dict:
    work = tempfile.mkdtemp(prefix="rayflow-bench-catalog-")
    path = os.path.join(work, "node-a", "catalog.duckdb")
    t0 = time.perf_counter()
    cat = Catalog(path, log_root=log_root)
    fill(cat, args, maintain=maintain)
    cat.close()
    fill_s = time.perf_counter() - t0
    warm = [start(path, log_root) for _ in range(args.repeat)]
    row = {
        "variant": name,
        "commits": args.commits,
        "fill_s": fill_s,
        "catalog_rows": warm[0][1],
        "start_s": statistics.median(t for t, _ in warm),
        "catalog_bytes": os.path.getsize(path) + (os.path.getsize(path + ".wal") if os.path.exists(path + ".wal") else 0),
    }  # fmt: skip
    if log_root is not None:
        row["log_objects"] = len(Store(log_root).list_files("log"))
        cold = []
        for i in range(args.repeat):  # a manager on another node: no local index at all
            cold.append(start(os.path.join(work, f"node-b{i}", "catalog.duckdb"), log_root)[0])
        row["fresh_node_start_s"] = statistics.median(cold)
    shutil.rmtree(work, ignore_errors=True)
    return row


def moto_s3():
    """A moto S3 server on loopback, as tests/integration/test_s3.py starts it; None without moto."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        return None, None
    import pyarrow.fs as pafs

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "rayflow-bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "rayflow-bench")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    query = f"?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    fs, _ = pafs.FileSystem.from_uri(f"s3://rayflow-bench{query}&allow_bucket_creation=true")
    fs.create_dir("rayflow-bench")
    return server, query


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commits", type=int, default=10_000)
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--per-call", type=int, default=8, help="records per commit call (one consumer's)")
    ap.add_argument("--maintain-every", type=int, default=240, help="commits between two maintenances")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-remote", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "catalog.json"))
    args = ap.parse_args()

    rows = []
    for maintain in (True, False):
        label = "retained" if maintain else "unbounded"
        rows.append(measure(f"local, {label}", args, log_root=None, maintain=maintain))
        print(f"  {rows[-1]['variant']}: start {rows[-1]['start_s'] * 1e3:.1f} ms", file=sys.stderr)
    server = None
    if not args.no_remote:
        server, query = moto_s3()
        if server is None:
            print("moto is not installed: skipping the S3 variants", file=sys.stderr)
        else:
            try:
                for maintain in (True, False):
                    label = "retained" if maintain else "unbounded"
                    log_root = f"s3://rayflow-bench/{label}-{os.getpid()}{query}"
                    rows.append(measure(f"s3 (moto), {label}", args, log_root=log_root, maintain=maintain))
                    print(
                        f"  {rows[-1]['variant']}: start {rows[-1]['start_s'] * 1e3:.1f} ms", file=sys.stderr
                    )
            finally:
                server.stop()

    print(
        f"\ncatalog start-up after {args.commits:,} commits ({args.partitions} partitions, median of {args.repeat})"
    )
    head = f"{'variant':<24}{'catalog rows':>14}{'log objects':>13}{'start ms':>10}{'fresh node ms':>15}{'fill s':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        cold = f"{r['fresh_node_start_s'] * 1e3:.1f}" if "fresh_node_start_s" in r else "-"
        print(
            f"{r['variant']:<24}{r['catalog_rows']:>14,}{r.get('log_objects', '-'):>13}"
            f"{r['start_s'] * 1e3:>10.1f}{cold:>15}{r['fill_s']:>8.1f}"
        )
    write_json(args.out, {"args": vars(args), "rows": rows}, lead="\n")


if __name__ == "__main__":
    main()
