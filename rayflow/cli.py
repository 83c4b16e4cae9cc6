"""The ``rayflow`` command line.

    rayflow status NAME [--address ADDR]     live partitions, owners, epochs, lag of a running job
    rayflow checkpoints DIR                  committed epochs per partition, for each job under DIR
    rayflow sql DIR "SELECT ..."             DuckDB SQL over the catalog (tables commits, outputs,
                                             events, leases; views latest, state) of the job under
                                             DIR (--name to pick)

Commands that read checkpoints work on a copy of the catalog, so they are safe
while the job runs (DuckDB lets one process hold the live file). The catalog
keeps the latest commit of every partition for good, and recent history by
count (``commits``: the last 50 per partition; ``events``: the last 10,000).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from rayflow.errors import RayflowError


def _catalogs(root: str, name: str | None) -> list[tuple[str, str]]:
    out = []
    if os.path.exists(os.path.join(root, "catalog.duckdb")):
        out.append((os.path.basename(os.path.abspath(root)), root))
    elif os.path.isdir(root):
        for d in sorted(os.listdir(root)):
            if os.path.exists(os.path.join(root, d, "catalog.duckdb")):
                out.append((d, os.path.join(root, d)))
    if name:
        out = [x for x in out if x[0] == name]
    if not out:
        raise RayflowError(f"no rayflow checkpoints under {root!r}{' named ' + repr(name) if name else ''}")
    return out


def _open_copy(job_dir: str):
    import duckdb

    from rayflow._internal.checkpoint.catalog import snapshot_copy

    path = snapshot_copy(os.path.join(job_dir, "catalog.duckdb"))
    con = duckdb.connect(path)
    con.execute(
        "CREATE VIEW latest AS SELECT * FROM commits "
        "QUALIFY row_number() OVER (PARTITION BY partition ORDER BY commit_id DESC) = 1"
    )
    files = (
        [
            os.path.join(job_dir, f)
            for (f,) in con.execute("SELECT unnest(CAST(state_files AS VARCHAR[])) FROM latest").fetchall()
        ]
        if con.execute("SELECT count(*) FROM latest").fetchone()[0]
        else []
    )
    if files:
        listing = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
        con.execute(f"CREATE VIEW state AS SELECT * FROM read_parquet([{listing}], union_by_name=true)")
    return con, os.path.dirname(path)


def _print(rel) -> None:
    cols = rel.columns
    rows = rel.fetchall()
    widths = [
        max(len(str(c)), *(len(_fmt(r[i])) for r in rows)) if rows else len(str(c))
        for i, c in enumerate(cols)
    ]
    print("  ".join(str(c).ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(v).ljust(w) for v, w in zip(r, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def cmd_checkpoints(args) -> int:
    for name, job_dir in _catalogs(args.dir, args.name):
        con, tmp = _open_copy(job_dir)
        try:
            print(f"== {name}")
            _print(
                con.sql(
                    "SELECT partition, lease_epoch AS epoch, positions, rows_total AS rows, state_rows, "
                    "json_array_length(output_files) AS outputs, final, committed_at FROM latest ORDER BY partition"
                )
            )
        finally:
            con.close()
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def cmd_sql(args) -> int:
    ((_, job_dir),) = _catalogs(args.dir, args.name)[:1]
    con, tmp = _open_copy(job_dir)
    try:
        _print(con.sql(args.query))
    finally:
        con.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def cmd_status(args) -> int:
    import ray

    from rayflow._internal import naming

    ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "auto", logging_level="ERROR")
    try:
        mgr = ray.get_actor(naming.manager_name(args.name), namespace=naming.NAMESPACE)
    except ValueError:
        print(f"no running pipeline named {args.name!r} on this cluster", file=sys.stderr)
        return 1
    st = ray.get(mgr.status.remote(), timeout=30)
    print(
        f"pipeline {args.name}: members {', '.join(st['members']) or '-'}; rebalances {st['rebalances']}, "
        f"recoveries {st['recoveries']}; {'done' if st['done'] else 'running'}"
    )
    print(
        f"{'partition':>9}  {'owner':<14}{'epoch':>6}  {'state':<10}{'processed':>12}{'committed':>12}  final"
    )
    for p in st["partitions"]:
        print(
            f"{p['partition']:>9}  {str(p['owner']):<14}{p['lease_epoch']:>6}  {p['state']:<10}"
            f"{p['processed_rows']:>12,}{p['committed_rows']:>12,}  {p['final']}"
        )
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="rayflow", description="rayflow: inspect running jobs and checkpoints")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("status", help="live status of a running pipeline")
    p.add_argument("name")
    p.add_argument("--address", default=None)
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("checkpoints", help="committed epochs per partition")
    p.add_argument("dir")
    p.add_argument("--name", default=None)
    p.set_defaults(fn=cmd_checkpoints)
    p = sub.add_parser(
        "sql", help="DuckDB SQL over the catalog: commits, latest, outputs, events, leases, state"
    )
    p.add_argument("dir")
    p.add_argument("query")
    p.add_argument("--name", default=None)
    p.set_defaults(fn=cmd_sql)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except RayflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
