"""Backpressure under a burst and a stalled partition (issue 13, DESIGN §6).

    python bench/backpressure.py                    # both scenarios, sized for a 2-core machine
    python bench/backpressure.py --only burst       # or: --only stall

**Burst.** A paced ``Synthetic(rate=...)`` stream: ``--base-rate`` events/s for
``--before-s``, ten times that for ``--burst-s`` (10 s), then the base rate for
``--after-s``; bounded (it ends), so the result is checked against DuckDB. The
keyed job (count and sum per key, 4 partitions, 2 consumers) runs behind a
``Map`` that costs ``--cost-us`` per row (a sleep: a call to a slow service),
so the consumers keep up with the base rate and not with the burst: the backlog
queues at the source, in memory up to ``source_max_bytes``, then on disk.
Reported: the peak memory of all Ray processes (the sum of their proportional
set sizes: shared object-store pages counted once) against that before the
burst and against the budget (``source_max_bytes`` per source actor plus
``fetch_max_bytes`` per consumer), the peak bytes queued in the object store and
spilled to disk, and the time for the lag to drain after the burst (back under
twice its level before it).

**Stall.** The same job on a steady stream with one consumer per partition; a
``Map`` sleeps, for the keys of partition 0 only, from ``--stall-at-s`` for
``--stall-s`` seconds (a stuck call). Run twice: with spill (the default
budgets, small queues) and with ``spill_max_bytes=0`` (the behaviour before
spill: a full queue pauses the whole source). Reported: the lag of the other
partitions before and during the stall, and partition 0's.

Writes bench/results/backpressure.json. Never asserts timings.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import numpy as np
import psutil
import pyarrow as pa
import ray
from ray._private.internal_api import memory_summary

import rayflow as rf
from bench import _common
from bench._common import write_json  # noqa: E402
from rayflow._internal.lag import add_lag
from rayflow.partitioning import PartitionMap, hash_table
from rayflow.testing import KEYED_SQL, assert_same_rows, duckdb_reference, throttle

HERE = os.path.dirname(os.path.abspath(__file__))
ADDRESS = [""]  # the local Ray's address (main sets it)
AGGS = [("value", "count"), ("value", "sum")]
MiB = 1024 * 1024


def _kind(p: psutil.Process) -> str:
    """What a Ray process is, from its title (``ray::SourceActor.fetch``, ``.../raylet ...``)."""
    cmd = " ".join(p.cmdline()[:1])
    for kind in ("SourceActor", "ConsumerActor", "GroupManager", "raylet", "gcs_server"):
        if kind in cmd:
            return kind
    return "other"


def ray_memory() -> tuple[int, int, dict[str, int]]:
    """Sum of PSS and sum of USS of the Ray processes this driver started (raylet, GCS,
    workers), and USS per kind of process. PSS counts a shared page (the object store's) once
    in all; USS is what each process holds alone (its heap)."""
    pss = uss = 0
    kinds: dict[str, int] = {}
    for p in psutil.Process().children(recursive=True):
        try:
            m = p.memory_full_info()
            kind = _kind(p)
        except psutil.Error:
            continue
        pss += m.pss
        uss += m.uss
        kinds[kind] = kinds.get(kind, 0) + m.uss
    return pss, uss, kinds


_PLASMA = re.compile(r"Plasma memory usage (\d+) MiB")


def plasma_bytes(address: str) -> int | None:
    """Bytes used in the object store (Ray's memory summary: MiB resolution)."""
    m = _PLASMA.search(memory_summary(address=address, stats_only=True))
    return int(m.group(1)) * MiB if m else None


class Sampler(_common.Sampler):
    """Samples the run's status, the sources' stats and the Ray processes' memory in a thread."""

    def __init__(self, run, interval_s: float = 0.5):
        super().__init__(run, interval_s)
        self.rows = []
        self._t0 = time.monotonic()

    def sample(self) -> bool:
        try:
            st = ray.get(self.run.manager.status.remote(), timeout=30)
            src = ray.get([s.stats.remote() for s in self.run.sources], timeout=30)
        except Exception:  # the run ended under us
            return False
        for part in st["partitions"]:
            i = part["partition"]
            part["queued_rows"] = sum(s["queued_rows"][i] for s in src)
        add_lag(st, src, wall=time.time())
        pss, uss, kinds = ray_memory()
        self.rows.append(
            {
                "t": time.monotonic() - self._t0,
                "lag_rows": [p["lag_rows"] for p in st["partitions"]],
                "processed_rows": sum(p["processed_rows"] for p in st["partitions"]),
                "memory_bytes": sum(s["memory_bytes"] for s in src),
                "spill_disk_bytes": sum(s["spill_disk_bytes"] for s in src),
                "spilled_bytes": sum(sum(s["spilled_bytes"]) for s in src),
                "blocked_s": sum(sum(s["blocked_s"]) for s in src),
                "pss": pss,
                "uss": uss,
                "uss_by_kind": kinds,
                "plasma": plasma_bytes(ADDRESS[0]),
            }
        )
        return True


def pipeline(name, source, ck, *, partitions, consumers, operator, config) -> rf.Pipeline:
    return rf.Pipeline(
        name=name,
        source=source,
        key="key",
        partitions=partitions,
        operator=[*operator, rf.ops.Aggregate(by="key", aggs=AGGS)],
        consumers=consumers,
        checkpoint_dir=ck,
        checkpoint_interval_s=1.0,
        config=config,
        progress=False,
    )


def run_sampled(job: rf.Pipeline, src, *, timeout_s: float) -> tuple[Sampler, float, bool]:
    """Run ``job`` to its end while a :class:`Sampler` records it; returns the sampler, the
    job's seconds and whether its output equals the DuckDB reference over ``src``'s events."""
    run = job.start()
    with Sampler(run) as s:
        result = run.wait(timeout_s=timeout_s)
    expected = duckdb_reference(KEYED_SQL, events=src.to_table())
    try:
        assert_same_rows(result.output, expected)
        return s, result.stats["seconds"], True
    except AssertionError:
        return s, result.stats["seconds"], False


def burst(args) -> dict:
    rate = [
        (args.before_s, args.base_rate),
        (args.burst_s, 10 * args.base_rate),
        (args.after_s, args.base_rate),
    ]
    events = sum(int(s * r) for s, r in rate)
    src = rf.sources.Synthetic(events=events, keys=args.keys, seed=42, rate=rate)
    config = rf.EngineConfig(
        num_sources=1,
        queue_max_bytes=args.queue_max_mib * MiB,
        source_max_bytes=args.source_max_mib * MiB,
        spill_max_bytes=args.spill_max_mib * MiB,
    )
    ck = tempfile.mkdtemp(prefix="rayflow-bp-")
    try:
        job = pipeline(
            "bp-burst",
            src,
            ck,
            partitions=4,
            consumers=2,
            operator=[throttle(1e6 / args.cost_us)],
            config=config,
        )
        s, seconds, exact = run_sampled(job, src, timeout_s=args.timeout_s)
        rows = s.rows
    finally:
        shutil.rmtree(ck, ignore_errors=True)
    # The schedule counts from the job's first read: t of the samples is from the start call,
    # close enough (the start takes a few seconds: the phases are found from the lag itself).
    lag = [sum(r["lag_rows"]) for r in rows]
    t = [r["t"] for r in rows]
    peak_i = int(np.argmax(lag)) if lag else 0
    before = [x for x, tt in zip(lag, t) if tt < t[peak_i] - args.burst_s - 1] or lag[:1]
    normal = max(1.0, float(np.median(before)))
    drained = next((tt for x, tt in zip(lag[peak_i:], t[peak_i:]) if x <= 2 * normal), None)
    pre = [r for r, tt in zip(rows, t) if tt < t[peak_i] - args.burst_s - 1] or rows[:1]

    def base(f):
        return float(np.median([f(r) for r in pre]))

    def peak(f):
        return max(f(r) for r in rows)

    def grow(kind):
        return peak(lambda r: r["uss_by_kind"].get(kind, 0)) - base(lambda r: r["uss_by_kind"].get(kind, 0))

    kinds = sorted({k for r in rows for k in r["uss_by_kind"]})
    plasma = [r for r in rows if r["plasma"] is not None]
    budget = config.source_max_bytes + 2 * config.fetch_max_bytes
    return {
        "events": events,
        "rate_profile": rate,
        "cost_us_per_row": args.cost_us,
        "exact": exact,
        "seconds": seconds,
        "peak_lag_rows": max(lag) if lag else 0,
        "normal_lag_rows": normal,
        "drain_s_after_peak": None if drained is None else drained - t[peak_i],
        "ray_pss_before_burst_bytes": base(lambda r: r["pss"]),
        "ray_pss_peak_bytes": peak(lambda r: r["pss"]),
        "ray_uss_before_burst_bytes": base(lambda r: r["uss"]),
        "ray_uss_peak_bytes": peak(lambda r: r["uss"]),
        "uss_growth_by_kind_bytes": {k: grow(k) for k in kinds},
        "plasma_before_burst_bytes": float(
            np.median([r["plasma"] for r in pre if r["plasma"] is not None] or [0])
        ),
        "plasma_peak_bytes": max((r["plasma"] for r in plasma), default=None),
        "memory_budget_bytes": budget,
        "source_max_bytes": config.source_max_bytes,
        "spill_max_bytes": config.spill_max_bytes,
        "peak_queued_memory_bytes": max(r["memory_bytes"] for r in rows),
        "peak_spill_disk_bytes": max(r["spill_disk_bytes"] for r in rows),
        "peak_spilled_bytes": max(r["spilled_bytes"] for r in rows),
        "blocked_s": max(r["blocked_s"] for r in rows),
        "samples": rows,
    }


def slow_keys_map(partitions: int, slow: int, stall_from: float, stall_to: float) -> rf.ops.Map:
    """A Map that, between the wall times ``stall_from`` and ``stall_to``, sleeps until
    ``stall_to`` for a batch holding keys of partition ``slow`` (the stuck partition)."""
    pmap = PartitionMap.uniform(partitions)

    def stall(table: pa.Table) -> pa.Table:
        now = time.time()
        if stall_from <= now < stall_to and table.num_rows:
            if (pmap.route(hash_table(table, "key")) == slow).any():
                time.sleep(stall_to - now)
        return table

    return rf.ops.Map(stall)


def stall(args, *, spill: bool) -> dict:
    events = int(args.stall_rate * args.stall_run_s)
    src = rf.sources.Synthetic(events=events, keys=args.keys, seed=42, rate=args.stall_rate)
    config = rf.EngineConfig(
        num_sources=1,
        queue_max_bytes=args.queue_max_mib * MiB,
        spill_max_bytes=rf.EngineConfig().spill_max_bytes if spill else 0,
    )
    ck = tempfile.mkdtemp(prefix="rayflow-bp-")
    start = time.time() + args.startup_s  # the job reads a few seconds after start()
    frm, to = start + args.stall_at_s, start + args.stall_at_s + args.stall_s
    try:
        job = pipeline(
            f"bp-stall-{'spill' if spill else 'nospill'}",
            src,
            ck,
            partitions=4,
            consumers=4,
            operator=[slow_keys_map(4, 0, frm, to)],
            config=config,
        )
        t_start = time.monotonic() - time.time()  # monotonic = wall + this
        s, seconds, exact = run_sampled(job, src, timeout_s=args.timeout_s)
        rows = s.rows
    finally:
        shutil.rmtree(ck, ignore_errors=True)
    # Sample times are from the Sampler's start (just after start()); map the stall's wall times.
    sampler_t0 = s._t0
    f_s = frm + t_start - sampler_t0
    to_s = to + t_start - sampler_t0
    normal = [r for r in rows if f_s - 10 <= r["t"] < f_s]
    during = [r for r in rows if f_s + 2 <= r["t"] < to_s]

    def mean(xs):
        return float(np.mean(xs)) if xs else None

    return {
        "spill": spill,
        "events": events,
        "rate": args.stall_rate,
        "stall_s": args.stall_s,
        "exact": exact,
        "seconds": seconds,
        "others_lag_rows_normal": mean([np.mean(r["lag_rows"][1:]) for r in normal]),
        "others_lag_rows_during_stall": mean([np.mean(r["lag_rows"][1:]) for r in during]),
        "others_lag_rows_max_during_stall": max((max(r["lag_rows"][1:]) for r in during), default=None),
        "slow_lag_rows_max": max((r["lag_rows"][0] for r in rows), default=None),
        "peak_spilled_bytes": max((r["spilled_bytes"] for r in rows), default=0),
        "blocked_s": max((r["blocked_s"] for r in rows), default=0.0),
        "samples": rows,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("burst", "stall"))
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--base-rate", type=int, default=50_000, help="events/s before and after the burst")
    ap.add_argument("--before-s", type=float, default=10.0)
    ap.add_argument("--burst-s", type=float, default=10.0)
    ap.add_argument("--after-s", type=float, default=40.0)
    ap.add_argument("--cost-us", type=float, default=8.0, help="the Map's cost per row and consumer")
    ap.add_argument("--queue-max-mib", type=int, default=2)
    ap.add_argument("--source-max-mib", type=int, default=16)
    ap.add_argument("--spill-max-mib", type=int, default=1024)
    ap.add_argument("--stall-rate", type=int, default=100_000)
    ap.add_argument("--stall-run-s", type=float, default=40.0)
    ap.add_argument("--stall-at-s", type=float, default=12.0)
    ap.add_argument("--stall-s", type=float, default=15.0)
    ap.add_argument("--startup-s", type=float, default=3.0, help="assumed delay from start() to reading")
    ap.add_argument("--timeout-s", type=float, default=600.0)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "backpressure.json"))
    args = ap.parse_args(argv)

    ctx = ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    ADDRESS[0] = ctx.address_info["address"]
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    try:
        if args.only in (None, "burst"):
            report["burst"] = burst(args)
        if args.only in (None, "stall"):
            report["stall"] = [stall(args, spill=True), stall(args, spill=False)]
    finally:
        ray.shutdown()
    print_report(report)
    write_json(args.json, report, indent=1, default=float)
    return 0


def print_report(report: dict) -> None:
    b = report.get("burst")
    if b:
        print(f"burst: {b['events']:,} events, profile {b['rate_profile']}, exact={b['exact']}")
        print(
            f"  Ray processes: PSS {b['ray_pss_before_burst_bytes'] / MiB:.0f} MiB before the burst, peak "
            f"{b['ray_pss_peak_bytes'] / MiB:.0f} MiB; USS (private) {b['ray_uss_before_burst_bytes'] / MiB:.0f} "
            f"-> {b['ray_uss_peak_bytes'] / MiB:.0f} MiB; object store used "
            f"{b['plasma_before_burst_bytes'] / MiB:.0f} -> {(b['plasma_peak_bytes'] or 0) / MiB:.0f} MiB "
            f"(budget: source_max_bytes + 2 x fetch_max_bytes = {b['memory_budget_bytes'] / MiB:.0f} MiB)"
        )
        print(
            f"  queued in the object store: peak {b['peak_queued_memory_bytes'] / MiB:.1f} MiB "
            f"(source_max_bytes {b['source_max_bytes'] / MiB:.0f} MiB); spilled: peak "
            f"{b['peak_spilled_bytes'] / MiB:.1f} MiB, disk {b['peak_spill_disk_bytes'] / MiB:.1f} MiB; "
            f"blocked {b['blocked_s']:.1f} s"
        )
        print(
            "  USS growth by process kind (MiB): "
            + ", ".join(f"{k} {v / MiB:+.0f}" for k, v in b["uss_growth_by_kind_bytes"].items())
        )
        drain = b["drain_s_after_peak"]
        print(
            f"  lag: normal {b['normal_lag_rows']:,.0f} rows, peak {b['peak_lag_rows']:,} rows, "
            f"drained {'never' if drain is None else f'{drain:.1f} s'} after the peak"
        )
    for s in report.get("stall", []):
        print(
            f"stall ({'spill' if s['spill'] else 'no spill'}): exact={s['exact']}; others' lag "
            f"normal {s['others_lag_rows_normal'] or 0:,.0f} rows, during the stall "
            f"{s['others_lag_rows_during_stall'] or 0:,.0f} (max {s['others_lag_rows_max_during_stall'] or 0:,}); "
            f"slow partition's lag max {s['slow_lag_rows_max'] or 0:,}; spilled "
            f"{s['peak_spilled_bytes'] / MiB:.1f} MiB; blocked {s['blocked_s']:.1f} s"
        )


if __name__ == "__main__":
    sys.exit(main())
