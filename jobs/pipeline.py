"""The flagship job: the WORKLOAD keyed job (per key: count and sum of value), or with
``--window-s`` the window job (per key and tumbling window of event time: count and sum).

    python jobs/pipeline.py                         # 10M synthetic events on a local Ray
    python jobs/pipeline.py --window-s 1            # the same, per key and 1-second window of ts
    python jobs/pipeline.py --rate 200000           # a live stream until Ctrl-C (or SIGTERM)
    python jobs/pipeline.py --input kafka://localhost:9092/events   # a Kafka topic, until Ctrl-C
    python jobs/pipeline.py --input incoming/ --follow              # files as they arrive
    python jobs/pipeline.py --input data/ --key user_id --value amount
    python jobs/pipeline.py --input big.parquet --sources 4           # 4 readers share the file
    ray submit cluster.yaml jobs/pipeline.py        # on a running cluster
    ray job submit --working-dir . -- python jobs/pipeline.py

Connects to a running Ray cluster when one is reachable (``--address``,
``RAY_ADDRESS``, or a cluster started on this machine with ``ray start``),
otherwise starts a local Ray instance sized to this machine. Writes
``<key>, count, sum`` as a Parquet dataset to ``--output`` and prints a
summary.

With ``--window-s N`` the job counts and sums per key and N-second tumbling
window of the event-time column (``--event-time``, default ``ts``: int64 ms
or an Arrow timestamp; ``kafka_timestamp`` for a topic's message times) and
writes ``window_start, window_end, <key>, count, sum``, one row per key and
window, each written once, when the watermark (the largest event time read,
less ``--max-out-of-orderness-s``) passes the window's end; at the end of a
bounded input every window is written. Its defaults for ``--name`` and
``--output`` differ from the keyed job's, so the two never mix checkpoints or
output. Running it again with the same ``--checkpoint-dir`` resumes from the
last commit (a finished job returns at once).

With ``--rate`` the input is a live, paced stream (unbounded unless
``--events`` bounds it); so are a Kafka topic and a directory with
``--follow``. A live job runs until Ctrl-C or SIGTERM (``ray job
stop`` sends it to the driver; give it time with ``RAY_JOB_STOP_WAIT_TIME_S``),
then stops gracefully (the sources stop reading, every consumer commits what
it processed and leaves), prints its summary, and the next run resumes where
it stopped (a window still open at the stop is in the checkpoint: it is
written by the run that sees its end).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pyarrow as pa
import pyarrow.compute as pc

import rayflow as rf


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="rayflow flagship: per-key count and sum over a stream (with --window-s: per "
        "key and tumbling event-time window)"
    )
    ap.add_argument(
        "--events",
        type=int,
        default=None,
        help="synthetic events (default: 10M; with --rate: unbounded, until Ctrl-C or SIGTERM)",
    )
    ap.add_argument(
        "--rate",
        type=int,
        default=None,
        help="events/s: a live synthetic stream, each event released at its time (ts = generation time)",
    )
    ap.add_argument("--keys", type=int, default=100_000, help="distinct synthetic keys (default 100k)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument(
        "--input",
        help="instead of the generator: a Parquet/CSV/JSON file, directory or glob, or a Kafka topic "
        "as kafka://host:port/topic (JSON values with the --key and --value fields; runs until Ctrl-C)",
    )
    ap.add_argument(
        "--follow",
        action="store_true",
        help="with --input DIR: watch the directory and read files as they arrive, until Ctrl-C",
    )
    ap.add_argument(
        "--format", choices=["parquet", "csv", "json"], help="file format (default: by extension)"
    )
    ap.add_argument("--key", default="key", help="key column (default: key)")
    ap.add_argument("--value", default="value", help="value column to sum (default: value)")
    ap.add_argument(
        "--window-s",
        type=float,
        default=None,
        help="count and sum per key and N-second tumbling window of --event-time instead of over "
        "the whole stream; each window is written once, when the watermark passes its end",
    )
    ap.add_argument(
        "--event-time",
        default="ts",
        help="with --window-s: the event-time column, int64 ms or a timestamp (default: ts; for a "
        "Kafka topic, kafka_timestamp is the message time)",
    )
    ap.add_argument(
        "--max-out-of-orderness-s",
        type=float,
        default=0.0,
        help="with --window-s: how far event time may go back; the watermark trails the largest "
        "event time read by this much, and a row whose window it has already closed is dropped (default: 0)",
    )
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--consumers", type=int, default=2)
    ap.add_argument(
        "--sources",
        type=int,
        default=None,
        help="source actors reading the input in parallel (default: sized to the cluster's CPUs, "
        "one per consumer, at most one per CPU and no more than the input's splits)",
    )
    ap.add_argument(
        "--output",
        default=None,
        help="output Parquet directory (default: out/pipeline, with --window-s out/pipeline-window)",
    )
    ap.add_argument(
        "--checkpoint-dir",
        default="checkpoints",
        help="local path (relative: to this process's working directory) or s3:// URI",
    )
    ap.add_argument(
        "--local-paths-shared",
        action="store_true",
        help="on a multi-node cluster: the local --checkpoint-dir and --output are on storage every "
        "node reaches (a network filesystem, or nodes on one machine); without it they are refused",
    )
    ap.add_argument("--checkpoint-interval-s", type=float, default=2.0)
    ap.add_argument(
        "--name",
        default=None,
        help="pipeline name (names actors and checkpoints; default: pipeline, with --window-s "
        "pipeline-window)",
    )
    ap.add_argument(
        "--address", default=None, help="Ray address (default: RAY_ADDRESS, a running cluster, or local)"
    )
    ap.add_argument(
        "--placement",
        choices=["spread", "resources"],
        default="spread",
        help="spread: consumers spread over all nodes (default); resources: consumers and sources only "
        "on nodes offering the rayflow_consumer / rayflow_source resources, the manager on the node "
        "offering rayflow_manager (see cluster.yaml)",
    )
    args = ap.parse_args(argv)
    if args.window_s is not None and not args.window_s > 0:
        ap.error(f"--window-s must be > 0 seconds, got {args.window_s}")
    if args.sources is not None and args.sources < 1:
        ap.error(f"--sources must be >= 1, got {args.sources}")
    if args.max_out_of_orderness_s < 0:
        ap.error(f"--max-out-of-orderness-s must be >= 0 seconds, got {args.max_out_of_orderness_s}")
    windowed = args.window_s is not None
    args.name = args.name or ("pipeline-window" if windowed else "pipeline")
    args.output = args.output or ("out/pipeline-window" if windowed else "out/pipeline")
    return args


def make_source(args) -> rf.sources.Source:
    """The input: the generator (paced with --rate), a Kafka topic (``kafka://host:port/topic``),
    a watched directory (``--follow``), or a file, directory or glob (by extension or --format)."""
    if not args.input:
        return rf.sources.Synthetic(events=args.events, rate=args.rate, keys=args.keys, seed=args.seed)
    path = args.input
    if path.startswith("kafka://"):
        servers, _, topic = path[len("kafka://") :].partition("/")
        if not servers or not topic:
            raise SystemExit(f"--input {path!r}: expected kafka://host:port/topic")
        return rf.sources.Kafka(topic, bootstrap_servers=servers, group_id=args.name)
    probe = path.lower()
    fmt = args.format or ("csv" if ".csv" in probe else "json" if ".json" in probe else "parquet")
    if args.follow:
        return rf.sources.Files(path, format=fmt, watch=True)
    return {"csv": rf.sources.CSV, "json": rf.sources.JSON, "parquet": rf.sources.Parquet}[fmt](path)


def init_ray(address: str | None) -> str:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING")
        return f"cluster at {address}"
    try:  # a cluster started on this machine (ray start, ray up, ray submit)
        ray.init(address="auto", logging_level="WARNING")
        return "running cluster"
    except (ConnectionError, RuntimeError, ValueError):
        ray.init(address="local", include_dashboard=False, logging_level="WARNING")
        return f"local Ray ({os.cpu_count()} CPUs)"


def main(argv=None) -> int:
    args = parse_args(argv)
    source = make_source(args)
    value = args.value
    windowed = args.window_s is not None

    def rename(t: pa.Table) -> pa.Table:
        return t.rename_columns({f"{value}_count": "count", f"{value}_sum": "sum"})

    aggs = [(value, "count"), (value, "sum")]
    if windowed:
        operator = rf.ops.Window(by=args.key, aggs=aggs, tumbling_s=args.window_s)
        event_time = {"event_time": args.event_time, "max_out_of_orderness_s": args.max_out_of_orderness_s}
    else:
        operator = rf.ops.Aggregate(by=args.key, aggs=aggs)
        event_time = {}
    pipeline = rf.Pipeline(
        name=args.name,
        source=source,
        key=args.key,
        partitions=args.partitions,
        operator=[operator, rf.ops.Map(rename)],
        **event_time,
        sink=rf.sinks.Parquet(args.output),
        consumers=args.consumers,
        checkpoint_dir=args.checkpoint_dir,
        local_paths_shared=args.local_paths_shared,
        checkpoint_interval_s=args.checkpoint_interval_s,
        config=rf.EngineConfig(
            num_sources=args.sources,
            **(
                {
                    "consumer_resources": {"rayflow_consumer": 1},
                    "source_resources": {"rayflow_source": 1},
                    "manager_resources": {"rayflow_manager": 0.01},
                }
                if args.placement == "resources"
                else {}
            ),
        ),
    )
    t0 = time.perf_counter()
    where = init_ray(args.address)
    init_s = time.perf_counter() - t0
    try:
        result = run_until_stopped(pipeline) if source.unbounded else pipeline.run()
    except rf.errors.RayflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = result.stats
    import pyarrow.dataset as ds

    groups = [args.key, "window_start"] if windowed else [args.key]
    out = (
        latest_per_key(ds.dataset(args.output, format="parquet").to_table(), groups)
        if os.path.isdir(args.output)
        else pa.table({"count": pa.array([], pa.int64()), "sum": pa.array([], pa.float64())})
    )
    print(
        f"rayflow pipeline {args.name!r} on {where} (ray.init {init_s:.1f} s, start-up {s['startup_s']:.1f} s)"
    )
    print(f"  input       {source!r}")
    print(f"  processed   {s['events']:,} events in {s['seconds']:.2f} s = {s['events_per_s']:,.0f} events/s")
    if s.get("stopped"):
        print("  stopped     committed; run again with the same --checkpoint-dir to resume")
    print(
        f"  partitions  {s['partitions']}, consumers {s['consumers']}, rebalances {s['rebalances']}, "
        f"recoveries {s['recoveries']}"
    )
    if windowed:
        print(f"  windows     {args.window_s:g} s tumbling over {args.event_time!r}, per {args.key!r}")
        if s.get("stopped") or source.unbounded:
            print("              (windows still open when the job stopped are written by a later run)")
    if out.num_rows and windowed:
        print(
            f"  output      {out.num_rows:,} windows of {pc.count_distinct(out[args.key]).as_py():,} keys, "
            f"total count {pc.sum(out['count']).as_py():,}, total sum {pc.sum(out['sum']).as_py():,.4f} "
            f"-> {os.path.abspath(args.output)}"
        )
        print(
            f"  event time  {time_label(pc.min(out['window_start']))} to {time_label(pc.max(out['window_end']))}"
        )
        busiest = out.take(pc.sort_indices(out, [("count", "descending")])[:1]).to_pylist()[0]
        print(
            f"  busiest     {args.key} {busiest[args.key]!r} in the window from "
            f"{time_label(pa.scalar(busiest['window_start'], out.schema.field('window_start').type))}: "
            f"count {busiest['count']:,}, sum {busiest['sum']:,.4f}"
        )
    elif out.num_rows:
        print(
            f"  output      {out.num_rows:,} keys, total count {pc.sum(out['count']).as_py():,}, "
            f"total sum {pc.sum(out['sum']).as_py():,.4f} -> {os.path.abspath(args.output)}"
        )
    return 0


def time_label(value: pa.Scalar) -> str:
    """An event time as UTC, to the millisecond: int64 milliseconds or an Arrow timestamp."""
    if pa.types.is_integer(value.type):
        value = pa.scalar(value.as_py(), pa.timestamp("ms", tz="UTC"))
    elif pa.types.is_timestamp(value.type):  # naive: taken as UTC; zoned: shown in UTC
        value = value.cast(pa.timestamp(value.type.unit, tz="UTC"))
    return value.as_py().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def latest_per_key(table: pa.Table, key: str | list[str]) -> pa.Table:
    """The output as a table of one row per group (``key``: a column, or the columns of a group,
    e.g. the key and ``window_start``): a job over a live input writes, at each commit, the
    groups that changed (with their ``_version``); the latest version of each group counts."""
    if "_version" not in table.column_names or table.num_rows == 0:
        return table
    keys = [key] if isinstance(key, str) else list(key)
    order = pc.sort_indices(table, [(k, "ascending") for k in keys] + [("_version", "descending")])
    table = table.take(order)
    first = None  # a group's first (latest) row: any of its columns differs from the row before
    for k in keys:
        col = table[k].combine_chunks()
        now, before = col.slice(1), col.slice(0, len(col) - 1)
        both_null = pc.and_(pc.is_null(now), pc.is_null(before))  # nulls are one group
        differs = pc.and_not(pc.fill_null(pc.not_equal(now, before), True), both_null)
        first = differs if first is None else pc.or_(first, differs)
    return table.filter(pa.concat_arrays([pa.array([True]), first]))


def run_until_stopped(pipeline: rf.Pipeline) -> rf.Result:
    """Run an unbounded job until Ctrl-C or SIGTERM, then stop it gracefully; returns its result.

    The handlers only set a flag: the stop (Ray calls, commits) runs here, in the main
    thread, never inside a signal handler. A second signal during the stop is ignored.
    """
    stop = threading.Event()

    def request_stop(signum, frame):
        if not stop.is_set():
            print(f"\n{signal.Signals(signum).name}: stopping (draining and committing)...", file=sys.stderr)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        run = pipeline.start()
        while not stop.is_set():
            try:
                return run.wait(timeout_s=0.5)  # returns only if the job fails (raises) or ends
            except TimeoutError:
                continue
        return run.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
