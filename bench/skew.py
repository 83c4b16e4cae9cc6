"""Skew: a Zipf s=1.5 stream, the hottest partition's rate and lag, with and without the remedy.

    python bench/skew.py                          # 4M events, 8 partitions, 2 consumers (~1 min here)
    python bench/skew.py --events 10000000 --partitions 16 --consumers 4
    python bench/skew.py --variants plain         # one variant only

A keyed job (``rf.ops.Aggregate`` count and sum per key) over the deterministic synthetic
stream with Zipf s=1.5 keys (``rf.sources.Synthetic(zipf_s=1.5)``: the hottest key carries
~38 % of the rows at 100k keys), run once per *variant*:

- ``plain``: the Aggregate as it is: every row of the hot key goes to one partition;
- ``combine``: ``rf.ops.Aggregate(..., combine_at_source=True)``: the sources combine each
  sub-batch into one row per key (docs/skew.md), the consumer merges partials.

- ``splits``: the plain Aggregate with runtime hot-range splits (``run.start_splitter``,
  ``rf.Splits(factor=2, window_s=1, cooldown_s=3)``, docs/partitioning.md): the hottest
  partition's lag before and after the first split. A range is cut between hashes, so one hot
  key stays whole in one child: on this Zipf stream (one key ~38 % of the rows) a split
  relieves the hot partition of its *other* keys only (the documented limit; ``combine`` is the
  remedy for one hot key).

Per variant: events/s (first read to final commit), whether the result equals the reference
(pyarrow ``group_by`` over the same rows), and from ``run.status()`` sampled every
``--sample-s`` while it runs: the hottest partition (``hot_partition``), its ``rate_ratio``,
its lag (rows and seconds: mean and max over the samples) against the other partitions'
mean lag, the hot key the sketch names with its estimated share against the true share, the
rows the sources queued (after combining), and the seconds the consumers spent processing (the
hot partition's owner, and all of them).

Also the hot-path cost of the sketch, measured in the same run: per batch, hashing + routing
+ splitting + ``ray.put`` of the sub-batches (what the source actor does with a batch) with and
without ``SkewTracker.observe``, on the Zipf keys and on uniform keys (many distinct keys:
the dearer case), in ns per row.

Prints a table and writes bench/results/skew.json. Never asserts timings.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import rayflow as rf
from bench import _common
from bench._common import write_json  # noqa: E402
from rayflow._internal.skew import SkewTracker, key_values
from rayflow.partitioning import PartitionMap, hash_table, split_by_partition

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("plain", "combine", "splits")


def reference(events: pa.Table) -> tuple[pa.Table, float]:
    """The keyed result by pyarrow, and the seconds it took (one thread)."""
    t0 = time.perf_counter()
    out = events.group_by("key", use_threads=False).aggregate([("value", "count"), ("value", "sum")])
    return out, time.perf_counter() - t0


def same(a: pa.Table, b: pa.Table) -> bool:
    cols = ["key", "value_count", "value_sum"]
    a = a.select(cols).sort_by("key")
    b = b.select(cols).sort_by("key")
    if a.num_rows != b.num_rows or a["key"] != b["key"] or a["value_count"] != b["value_count"]:
        return False
    return bool(pc.all(pc.less_equal(pc.abs(pc.subtract(a["value_sum"], b["value_sum"])), 1e-6)).as_py())


class Sampler(_common.Sampler):
    """Samples ``run.status()`` every ``interval_s`` in a thread (the hot partition's figures)."""

    def __init__(self, run, interval_s: float):
        super().__init__(run, interval_s)
        self.samples: list[dict] = []

    def sample(self) -> bool:
        try:
            st = self.run.status()
        except Exception:  # the run is ending: its actors go
            return False
        if st.get("hot_partition") is not None:
            self.samples.append(
                {
                    "t": time.monotonic(),
                    "hot_partition": st["hot_partition"],
                    "skew": st["skew"],
                    "lag_rows": [p["lag_rows"] for p in st["partitions"]],
                    "lag_s": [p["lag_s"] for p in st["partitions"]],
                    "hot_keys": st["hot_keys"][:3],
                    "combined_rows": st.get("combined_rows"),
                    "rows_read": st.get("rows_read"),
                    "owners": [p["owner"] for p in st["partitions"]],
                    "busy_s": {m: c["busy_s"] for m, c in st.get("consumers", {}).items()},
                }
            )
        return not st.get("done")


def run_variant(variant: str, events: pa.Table, args) -> tuple[dict, pa.Table]:
    ck = tempfile.mkdtemp(prefix="rayflow-bench-skew-")
    aggs = [("value", "count"), ("value", "sum")]
    pipeline = rf.Pipeline(
        name=f"bench-skew-{variant}",
        source=rf.sources.Table(events, batch_rows=args.batch_rows),
        key="key",
        partitions=args.partitions,
        operator=rf.ops.Aggregate(by="key", aggs=aggs, combine_at_source=variant == "combine"),
        sink=rf.sinks.Collect(),
        consumers=args.consumers,
        checkpoint_dir=os.path.join(ck, "checkpoints"),
        checkpoint_interval_s=args.checkpoint_interval_s,
        progress=False,
    )
    run = pipeline.start()
    if variant == "splits":
        run.start_splitter(
            rf.Splits(
                factor=2.0,
                window_s=args.split_window_s,
                cooldown_s=args.split_cooldown_s,
                max_partitions=args.partitions + 4,
                interval_s=0.25,
            )
        )
    with Sampler(run, args.sample_s) as sampler:
        result = run.wait(timeout_s=600)
    samples = sampler.samples
    stats = dict(result.stats)
    row = {"variant": variant, "events_per_s": stats["events_per_s"], "seconds": stats["seconds"]}
    row["status_samples"] = len(samples)
    if variant == "splits":
        row.update(split_figures(run, samples))
    if samples:
        last = samples[-1]
        hot = last["hot_partition"]
        lag_s = [s["lag_s"][hot] for s in samples if s["lag_s"][hot] is not None]
        lag_rows = [s["lag_rows"][hot] for s in samples]
        others = [
            np.mean([x for i, x in enumerate(s["lag_rows"]) if i != hot])
            for s in samples
            if len(s["lag_rows"]) > 1
        ]
        row.update(
            hot_partition=hot,
            hot_rate_ratio=last["skew"],
            hot_lag_rows_mean=float(np.mean(lag_rows)),
            hot_lag_rows_max=int(max(lag_rows)),
            hot_lag_s_mean=float(np.mean(lag_s)) if lag_s else None,
            hot_lag_s_max=float(max(lag_s)) if lag_s else None,
            other_lag_rows_mean=float(np.mean(others)) if others else None,
            sketch_top_key=last["hot_keys"][0]["key"] if last["hot_keys"] else None,
            sketch_top_share=last["hot_keys"][0]["share"] if last["hot_keys"] else None,
            combined_rows=last["combined_rows"],
            # Seconds the consumers spent processing: the hot partition's owner, and all of them.
            hot_owner_busy_s=last["busy_s"].get(last["owners"][hot]),
            busy_s_total=sum(last["busy_s"].values()),
        )
    return row, result.output


def split_figures(run, samples: list[dict]) -> dict:
    """The ``splits`` variant: the splits made, and the hottest partition's lag (rows, mean over
    the samples) and rate ratio under the first map and under the last one (samples are told
    apart by their partition count; none is taken during a split: status waits for it)."""
    events = list(run.partition_splits)
    out = {"splits": events, "split_pause_s": [e["pause_s"] for e in events]}
    if not events or not samples:
        return out

    def hot_lag(sel: list[dict]) -> float | None:
        lags = [s["lag_rows"][s["hot_partition"]] for s in sel]
        return float(np.mean(lags)) if lags else None

    before = [s for s in samples if len(s["lag_rows"]) == run.spec.partitions]
    after = [s for s in samples if len(s["lag_rows"]) == run.spec.partitions + len(events)]
    out.update(
        hot_lag_rows_before=hot_lag(before),
        hot_lag_rows_after=hot_lag(after),
        hot_rate_ratio_before=before[-1]["skew"] if before else None,
        hot_rate_ratio_after=after[-1]["skew"] if after else None,
    )
    return out


def sketch_cost(events: pa.Table, *, partitions: int, batch_rows: int, repeat: int = 3) -> dict:
    """ns per row of the source's per-batch work (hash, route, split, ``ray.put`` of each
    sub-batch), with and without the sketch; and of the sketch alone."""
    import ray

    pmap = PartitionMap.uniform(partitions)
    batches = events.slice(0, min(events.num_rows, 8 * batch_rows)).to_batches(max_chunksize=batch_rows)

    def route(b, sketch: SkewTracker | None) -> None:
        hashes = hash_table(b, "key")
        routed = pmap.route(hashes)
        if sketch is not None:
            sketch.observe(hashes, pmap.route, lambda rows: key_values(b, ["key"], rows))
        refs = [ray.put(sub) for _, sub in split_by_partition(b, routed, partitions)]
        del refs

    out = {}
    for name, sketch_of in (("without", lambda: None), ("with", lambda: SkewTracker(partitions))):
        best = None
        for _ in range(repeat):
            sk = sketch_of()
            t0 = time.perf_counter()
            for b in batches:
                route(b, sk)
            took = time.perf_counter() - t0
            best = took if best is None else min(best, took)
        out[f"{name}_ns_per_row"] = best / sum(b.num_rows for b in batches) * 1e9
    out["sketch_ns_per_row"] = out["with_ns_per_row"] - out["without_ns_per_row"]
    out["overhead"] = out["with_ns_per_row"] / out["without_ns_per_row"] - 1
    out["batch_rows"] = batch_rows
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=4_000_000)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--zipf-s", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--batch-rows", type=int, default=1 << 16, help="rows per input batch")
    ap.add_argument("--consumers", type=int, default=2)
    ap.add_argument("--checkpoint-interval-s", type=float, default=2.0)
    ap.add_argument("--sample-s", type=float, default=0.25, help="how often run.status() is sampled")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    ap.add_argument("--split-window-s", type=float, default=1.0, help="splits variant: Splits.window_s")
    ap.add_argument("--split-cooldown-s", type=float, default=3.0, help="splits variant: Splits.cooldown_s")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "skew.json"))
    args = ap.parse_args(argv)

    import ray

    events = rf.sources.Synthetic(
        events=args.events, keys=args.keys, seed=args.seed, zipf_s=args.zipf_s
    ).to_table()
    ref, ref_s = reference(events)
    top = ref.sort_by([("value_count", "descending")]).slice(0, 1)
    true_key, true_share = top["key"][0].as_py(), top["value_count"][0].as_py() / args.events
    true_partition = int(PartitionMap.uniform(args.partitions).route(hash_table(top, "key"))[0])
    counts = pc.value_counts(pa.array(PartitionMap.uniform(args.partitions).route(hash_table(events, "key"))))
    per_part = np.zeros(args.partitions)
    for x in counts.to_pylist():
        per_part[x["values"]] = x["counts"]
    true_ratio = float(per_part.max() / per_part.mean())

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING")
    uniform = pa.table(
        {"key": np.random.default_rng(args.seed).integers(0, 10_000_000, 1 << 20), "value": np.ones(1 << 20)}
    )
    costs = {
        "zipf_64k_batches": sketch_cost(events, partitions=args.partitions, batch_rows=1 << 16),
        "uniform_64k_batches": sketch_cost(uniform, partitions=args.partitions, batch_rows=1 << 16),
        "uniform_1m_batches": sketch_cost(uniform, partitions=args.partitions, batch_rows=1 << 20),
    }

    rows = []
    for v in args.variants:
        row, out = run_variant(v, events, args)
        row["correct"] = same(out, ref)
        rows.append(row)
    ray.shutdown()

    report = {
        "workload": "keyed Aggregate (count, sum) over Synthetic Zipf keys",
        "events": args.events,
        "keys": args.keys,
        "zipf_s": args.zipf_s,
        "partitions": args.partitions,
        "consumers": args.consumers,
        "checkpoint_interval_s": args.checkpoint_interval_s,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__},
        "truth": {
            "hot_key": true_key,
            "hot_key_share": true_share,
            "hot_partition": true_partition,
            "hot_rate_ratio": true_ratio,
        },
        "pyarrow_reference": {"one_thread_s": ref_s, "events_per_s": args.events / ref_s},
        "sketch_cost": costs,
        "runs": rows,
    }
    print_table(report)
    write_json(args.json, report, lead="\n")
    return 0 if all(r["correct"] for r in rows) else 1


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def print_table(report: dict) -> None:
    t = report["truth"]
    print(
        f"\n{report['events']:,} events, {report['keys']:,} keys, Zipf s={report['zipf_s']}, "
        f"{report['partitions']} partitions, {report['consumers']} consumers; truth: hot key {t['hot_key']} "
        f"({100 * t['hot_key_share']:.1f} % of rows) in partition {t['hot_partition']}, rate ratio "
        f"{t['hot_rate_ratio']:.2f}; pyarrow 1 thread {report['pyarrow_reference']['events_per_s'] / 1e6:.2f}M ev/s"
    )
    cols = ["variant", "ev/s", "correct", "hot p", "rate x", "hot lag rows mean/max", "hot lag s mean/max",
            "others lag rows", "sketch top key (share)", "rows queued", "busy s hot/all"]  # fmt: skip
    table = [cols]
    for r in report["runs"]:
        table.append(
            [
                r["variant"],
                f"{r['events_per_s'] / 1e6:.2f}M",
                str(r["correct"]),
                str(r.get("hot_partition", "-")),
                _f(r.get("hot_rate_ratio"), ".2f"),
                f"{_f(r.get('hot_lag_rows_mean'), ',.0f')} / {_f(r.get('hot_lag_rows_max'), ',')}",
                f"{_f(r.get('hot_lag_s_mean'), '.2f')} / {_f(r.get('hot_lag_s_max'), '.2f')}",
                _f(r.get("other_lag_rows_mean"), ",.0f"),
                f"{r.get('sketch_top_key')} ({_f(r.get('sketch_top_share'), '.3f')})",
                _f(r.get("combined_rows"), ",") if r.get("combined_rows") is not None else "(all)",
                f"{_f(r.get('hot_owner_busy_s'), '.2f')} / {_f(r.get('busy_s_total'), '.2f')}",
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    for r in report["runs"]:
        if r["variant"] == "splits":
            print(
                f"\nsplits: {len(r.get('splits', []))} (pauses {r.get('split_pause_s')} s); hottest "
                f"partition's lag rows mean before {_f(r.get('hot_lag_rows_before'), ',.0f')}, after "
                f"{_f(r.get('hot_lag_rows_after'), ',.0f')}; rate ratio before "
                f"{_f(r.get('hot_rate_ratio_before'), '.2f')}, after {_f(r.get('hot_rate_ratio_after'), '.2f')}"
            )
    print("\nsketch cost on the source's per-batch work (hash + route + split + ray.put), ns/row:")
    for name, c in report["sketch_cost"].items():
        print(
            f"  {name:22s} without {c['without_ns_per_row']:.1f}  with {c['with_ns_per_row']:.1f}  "
            f"overhead {100 * c['overhead']:+.1f} %"
        )


if __name__ == "__main__":
    sys.exit(main())
