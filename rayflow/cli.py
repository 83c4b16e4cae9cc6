"""The ``rayflow`` command line.

    rayflow status NAME [--watch [--interval S]]
                                             live partitions of a running job: lag (rows, s), event-time
                                             lag, owners, epochs, rates, last commits, stalled ones
                                             (--watch: redrawn every S seconds, default 2, until
                                             Ctrl-C) [--address ADDR]
    rayflow checkpoints DIR                  committed epochs per partition, for each job under DIR
    rayflow sql DIR "SELECT ..."             DuckDB SQL over the catalog (tables commits, outputs,
                                             events, leases; views latest, state) of the job under
                                             DIR (--name to pick)
    rayflow sql --pipeline NAME "SELECT ..." the output of a running job, live, through its manager
                                             (a DuckDB sink's database; a Parquet sink's views
                                             output and latest) [--address ADDR]
    rayflow sql --output PATH "SELECT ..."   a sink's output on disk: a Parquet directory (views
                                             output: every row; latest: the latest row per key of
                                             an upsert stream) or a DuckDB database file
    (any sql: --to FILE.parquet writes the result there instead of printing it)
    rayflow report DIR -o FILE.html          one self-contained HTML file with plots of the job's
                                             history (throughput, lag, event-time lag, commits,
                                             events, skew), readable offline (--name to pick)

Commands that read checkpoints work on a copy of the catalog, so they are safe
while the job runs (DuckDB lets one process hold the live file). The catalog
keeps the latest commit of every partition for good, and recent history by
count (``commits``: the last 50 per partition; ``events``: the last 10,000).

A DuckDB sink's database is held by the running job's manager (one writer
process), so it is read live with ``--pipeline`` (read-only statements; each
partition as of its last published commit), and with ``--output`` only once
the job has ended. An upsert stream (``rf.ops.Aggregate`` over an unbounded
input, or ``emit="changes"``) written to Parquet holds every version of a
key, one file per commit and partition; ``latest`` keeps the row with the
highest ``_version`` of each key: ``SELECT * FROM output QUALIFY row_number()
OVER (PARTITION BY <key> ORDER BY _version DESC) = 1``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from rayflow.errors import ConfigError, RayflowError


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
        "CREATE VIEW latest AS SELECT * FROM commits WHERE map_version = (SELECT max(map_version) FROM commits) "
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
        con.execute(f"CREATE VIEW state AS {_state_sql(files)}")
    return con, os.path.dirname(path)


def _sql_list(files: list[str]) -> str:
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


def _state_sql(files: list[str]) -> str:
    """The ``state`` view: the latest commits' state files; where a commit names a base and its
    deltas (incremental commits), folded as their files' ``rayflow.state_merge`` metadata says."""
    import json

    import pyarrow.parquet as pq

    from rayflow._internal.checkpoint.commit import is_delta, state_file_op
    from rayflow.ops.aggregate import STATE_MERGE_KEY

    chains: dict[tuple[str, int], list[str]] = {}
    for f in files:  # a partition's files, per operator, in order: base first
        chains.setdefault((os.path.dirname(f), state_file_op(f)), []).append(f)
    plain = [f for c in chains.values() if not any(map(is_delta, c)) for f in c]
    parts = [f"SELECT * FROM read_parquet({_sql_list(plain)}, union_by_name=true)"] if plain else []
    folded: dict[bytes, list[str]] = {}
    for c in chains.values():
        if any(map(is_delta, c)):
            # The chain's newest delta says how it folds (an aggregation added on resume is in it).
            newest = next(filter(is_delta, reversed(c)))
            folded.setdefault(pq.read_schema(newest).metadata[STATE_MERGE_KEY], []).extend(c)
    for spec, fs in folded.items():
        s = json.loads(spec)
        by = ", ".join(map(_quote, s["by"]))
        aggs = ", ".join(f"{fn}({_quote(c)}) AS {_quote(c)}" for c, fn in s["merge"].items())
        parts.append(
            f"SELECT {by}, {aggs}, min(_hash) AS _hash FROM read_parquet({_sql_list(fs)}, union_by_name=true) "
            f"GROUP BY {by}"
        )
    union = " UNION ALL BY NAME ".join(parts)
    # A count added on resume is 0, not NULL, where no file has it yet (as a restore fills it).
    zero = sorted({c for spec in folded for c in json.loads(spec).get("zero", [])})
    if not zero:
        return union
    return f"SELECT * REPLACE ({', '.join(f'coalesce({q}, 0) AS {q}' for q in map(_quote, zero))}) FROM ({union})"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _print(rel) -> None:
    _print_rows(rel.columns, rel.fetchall())


def _print_rows(cols: list[str], rows: list[tuple]) -> None:
    widths = [
        max(len(str(c)), *(len(_fmt(r[i])) for r in rows)) if rows else len(str(c))
        for i, c in enumerate(cols)
    ]
    print("  ".join(str(c).ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(v).ljust(w) for v, w in zip(r, widths)))


def _print_table(t) -> None:
    cols = t.column_names
    _print_rows(cols, [tuple(r[c] for c in cols) for r in t.to_pylist()])


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


def cmd_report(args) -> int:
    """``rayflow report DIR [--name NAME] -o FILE``: :mod:`rayflow._internal.report`."""
    from rayflow._internal.report import write_report

    jobs = _catalogs(args.dir, args.name)
    if len(jobs) > 1:
        names = ", ".join(n for n, _ in jobs)
        raise RayflowError(f"{args.dir!r} holds several jobs ({names}): pick one with --name")
    ((name, job_dir),) = jobs
    out = write_report(job_dir, args.output, name=name)
    print(f"wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB): open it in a browser (works offline)")
    return 0


def cmd_sql(args) -> int:
    if (args.pipeline or args.output) and len(args.args) != 1:
        raise RayflowError("with --pipeline or --output, give only the query")
    if args.pipeline and args.output:
        raise RayflowError("give --pipeline NAME (a running job) or --output PATH (on disk), not both")
    if args.pipeline or args.output:
        result = _query_pipeline(args) if args.pipeline else _query_output(args.output, args.args[0])
        if args.to:
            import pyarrow.parquet as pq

            pq.write_table(result, args.to)
        else:
            _print_table(result)
        return 0
    if len(args.args) != 2:
        raise RayflowError(
            'usage: rayflow sql DIR "SELECT ..." (or --pipeline NAME / --output PATH "SELECT ...")'
        )
    dir_, query = args.args
    ((_, job_dir),) = _catalogs(dir_, args.name)[:1]
    con, tmp = _open_copy(job_dir)
    try:
        if args.to:
            import pyarrow.parquet as pq

            pq.write_table(con.sql(query).to_arrow_table(), args.to)
        else:
            _print(con.sql(query))
    finally:
        con.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _query_pipeline(args):
    """The query, run by the manager of the running pipeline ``args.pipeline`` (it holds the sink)."""
    import ray

    from rayflow._internal import naming

    ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "auto", logging_level="ERROR")
    try:
        mgr = ray.get_actor(naming.manager_name(args.pipeline), namespace=naming.NAMESPACE)
    except ValueError:
        raise RayflowError(f"no running pipeline named {args.pipeline!r} on this cluster") from None
    try:
        return ray.get(mgr.query.remote(args.args[0]), timeout=120)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        raise (cause if isinstance(cause, RayflowError) else e) from None


def _query_output(path: str, query: str):
    """The query over a sink's output on disk: a Parquet directory or a DuckDB database file."""
    if os.path.isdir(path) or "://" in path:
        from rayflow._internal.checkpoint.store import Store
        from rayflow.sinks.duckdb import query_files

        return query_files(Store(path), query)
    if not os.path.exists(path):
        raise RayflowError(f"no sink output at {path!r} (a Parquet directory or a DuckDB file)")
    from rayflow.sinks.duckdb import query_database

    return query_database(os.path.abspath(path), query)


def cmd_status(args) -> int:
    """``rayflow status NAME [--watch [--interval SECONDS]]``: the table of
    :mod:`rayflow._internal.status_view` (lag in rows and seconds, event-time lag, owner and epoch,
    rate, last commit, queued and spilled bytes, stalled partitions), once, or with ``--watch``
    refreshed every SECONDS (default 2) until Ctrl-C (exit 0). Exit 1: no such pipeline, or it
    went away during a watch before it was done."""
    import ray

    from rayflow._internal import naming

    if not args.interval > 0:
        raise ConfigError(f"--interval takes a refresh period in seconds > 0, got {args.interval!r}")
    ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "auto", logging_level="ERROR")
    try:
        mgr = ray.get_actor(naming.manager_name(args.name), namespace=naming.NAMESPACE)
    except ValueError:
        print(f"no running pipeline named {args.name!r} on this cluster", file=sys.stderr)
        return 1
    if not args.watch:
        st = _live_status(mgr, args.name)
        if st is None:
            print(f"pipeline {args.name!r} is no longer running", file=sys.stderr)
            return 1
        print(_status_table(args.name, st, None, None, color=sys.stdout.isatty()), end="")
        return 0
    return _watch_status(mgr, args.name, args.interval)


def _status_table(name: str, st: dict, progress, now, *, color: bool) -> str:
    from rayflow._internal import status_view

    return status_view.render(
        name,
        st,
        stall_after_s=status_view.stall_after_s(st.get("checkpoint_interval_s")),
        progress=progress,
        now=now,
        color=color,
    )


def _watch_status(mgr, name: str, period_s: float) -> int:
    """Redraw the status table every ``period_s`` until Ctrl-C (exit 0) or the pipeline goes
    away (exit 0 once it was seen done, else 1); a manager restarting, or too slow to answer, is
    said on screen and asked again. In place on a terminal; appended otherwise."""
    import time

    from rayflow._internal import status_view

    tty = sys.stdout.isatty()
    progress: dict = {}
    done = False
    try:
        while True:
            try:
                st = _live_status(mgr, name)
            except RayflowError as e:  # a manager restarting or slow: say so, and look again
                sys.stdout.write(status_view.frame(f"{e}\n", tty=tty, stamp=time.strftime("%H:%M:%S")))
                sys.stdout.flush()
                time.sleep(period_s)
                continue
            if st is None:
                print(f"pipeline {name!r} is no longer running", file=sys.stderr)
                return 0 if done else 1
            done = st["done"]
            now = time.monotonic()
            progress = status_view.track_progress(progress, st, now=now)
            text = _status_table(name, st, progress, now, color=tty)
            sys.stdout.write(status_view.frame(text, tty=tty, stamp=time.strftime("%H:%M:%S")))
            sys.stdout.flush()
            time.sleep(period_s)  # a refresh period, not a wait for a condition
    except KeyboardInterrupt:
        return 0


def _live_status(mgr, name: str) -> dict | None:
    """The manager's status with the source actors' figures folded in and the lag added (as
    ``Run.status()`` does); None once the manager is gone. The source actors are found by name
    (``<name>/source-<i>``); when they cannot be asked (restarting, gone at the end of a bounded
    job), the lag is shown as unknown."""
    import time

    import ray

    from rayflow._internal import naming, status_view

    try:
        st = ray.get(mgr.status.remote(), timeout=30)
    except ray.exceptions.ActorUnavailableError:  # before RayActorError: a subclass, not the end
        raise RayflowError(f"the manager of pipeline {name!r} is restarting; try again in a moment") from None
    except ray.exceptions.RayActorError:
        return None
    except ray.exceptions.GetTimeoutError:
        raise RayflowError(f"the manager of pipeline {name!r} did not answer within 30 s") from None
    prefix = naming.actor_name(name, "source-")  # <name>/source-<i>
    sources = None
    try:
        handles = [
            ray.get_actor(a["name"], namespace=naming.NAMESPACE)
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == naming.NAMESPACE and a["name"].startswith(prefix)
        ]
        if handles:
            sources = ray.get([h.stats.remote() for h in handles], timeout=10)
    except (ValueError, ray.exceptions.RayError):
        sources = None  # a source restarting or gone: lag unknown this time
    return status_view.combine(st, sources, wall=time.time())


def parse_args(ap: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """``ap.parse_args``, letting the query of ``rayflow sql`` follow an option as well as
    precede it (``rayflow sql DIR --name NAME "SELECT ..."``): argparse binds the ``nargs="+"``
    positional to the words before the first option, and would reject the rest.
    (``parse_intermixed_args`` would do this, but it does not support subcommands.)"""
    args, extra = ap.parse_known_args(argv)
    if args.cmd == "sql":
        args.args += [x for x in extra if not x.startswith("-")]
        extra = [x for x in extra if x.startswith("-")]
    if extra:
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="rayflow", description="rayflow: inspect running jobs and checkpoints")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser(
        "status",
        help="live status of a running pipeline: lag, event-time lag, owners and epochs, rates, last commits",
        description="rayflow status NAME: per partition its lag (rows and seconds), event-time lag, "
        "owner and lease epoch, rows/s, last commit, queued and spilled bytes; stalled partitions "
        "(rows waiting, no commit or no progress for several checkpoint intervals) are marked. "
        "--watch redraws it every --interval SECONDS (default 2) until Ctrl-C.",
    )
    p.add_argument("name")
    p.add_argument("--address", default=None)
    p.add_argument("--watch", action="store_true", help="redraw the table every --interval until Ctrl-C")
    p.add_argument(
        "--interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="the refresh period of --watch, in seconds (default 2)",
    )
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("checkpoints", help="committed epochs per partition")
    p.add_argument("dir")
    p.add_argument("--name", default=None)
    p.set_defaults(fn=cmd_checkpoints)
    p = sub.add_parser(
        "report",
        help="an HTML file with plots of a job's history (safe while it runs)",
        description="rayflow report DIR -o FILE.html: one self-contained HTML file (plotly.js inlined: "
        "it opens offline) with plots of the history the job's manager samples into its catalog "
        "every EngineConfig.history_interval_s: throughput (whole and per partition), lag per "
        "partition, event-time lag, commit duration, consumers' busy time and memory, events "
        "(rebalances, failures, recoveries) on the same time axis, and skew. Reads a copy of the "
        "catalog, so it works on a running job too.",
    )
    p.add_argument("dir", help="the checkpoint directory (of one job, or holding several)")
    p.add_argument("--name", default=None, help="the job under DIR (when DIR holds several)")
    p.add_argument("-o", "--output", required=True, help="the HTML file to write")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser(
        "sql",
        help="DuckDB SQL over the catalog (commits, latest, outputs, events, leases, state), or over "
        "a sink's output: live through a running pipeline (--pipeline) or on disk (--output)",
        description="rayflow sql DIR QUERY: the catalog of the job under DIR (a copy: safe while it "
        "runs). rayflow sql --pipeline NAME QUERY: the output of a running pipeline, through its "
        "manager (a DuckDB sink's table, live; a Parquet sink's views). rayflow sql --output PATH "
        "QUERY: a Parquet sink directory or a DuckDB sink file. Over Parquet output the views are "
        "output (every row) and latest (the latest row per key of an upsert stream, by _version: "
        "what rf.ops.Aggregate emits over an unbounded input). Queries are read-only.",
    )
    p.add_argument("args", nargs="+", metavar="[DIR] QUERY")
    p.add_argument("--name", default=None, help="the job under DIR (when DIR holds several)")
    p.add_argument("--pipeline", default=None, help="query the output of this running pipeline")
    p.add_argument("--output", default=None, help="query this sink output (Parquet dir or DuckDB file)")
    p.add_argument("--address", default=None, help="the Ray cluster of --pipeline")
    p.add_argument("--to", default=None, help="write the result to this Parquet file instead of printing")
    p.set_defaults(fn=cmd_sql)
    args = parse_args(ap, argv)
    try:
        return args.fn(args)
    except RayflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
