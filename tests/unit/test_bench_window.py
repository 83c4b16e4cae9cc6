"""The window job's helpers in bench/throughput.py and jobs/pipeline.py: the pyarrow reference,
the result check, and the latest row per (key, window) of an upsert output. No Ray."""

from __future__ import annotations

import collections
import importlib.util
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

ROOT = pathlib.Path(__file__).parents[2]


def _load(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


throughput = _load("bench_throughput", ROOT / "bench" / "throughput.py")
pipeline_job = _load("jobs_pipeline", ROOT / "jobs" / "pipeline.py")


def test_window_starts_floor_event_time_to_the_window_also_before_the_epoch():
    ts = pa.array([0, 999, 1000, 1_700_000_000_999, -1, -1000, -1001], pa.int64())
    assert throughput.window_starts(ts).to_pylist() == [t - t % 1000 for t in ts.to_pylist()]
    assert throughput.window_starts(ts).to_pylist()[-3:] == [-1000, -1000, -2000]


@pytest.fixture
def events(tmp_path) -> str:
    rng = np.random.default_rng(3)
    n = 5000
    table = pa.table(
        {
            "key": rng.integers(0, 40, n),
            "value": rng.integers(0, 1_024_000, n) / 1024,
            "ts": 1_700_000_000_000 + np.sort(rng.integers(0, 7_500, n)),
        }
    )
    path = str(tmp_path / "events.parquet")
    pq.write_table(table, path, row_group_size=1000)
    return path


def _brute_force(path: str) -> dict[tuple[int, int], tuple[int, float]]:
    groups = collections.defaultdict(lambda: [0, 0.0])
    for row in pq.read_table(path).to_pylist():
        g = groups[(row["key"], row["ts"] - row["ts"] % 1000)]
        g[0] += 1
        g[1] += row["value"]
    return {k: tuple(v) for k, v in groups.items()}


@pytest.mark.parametrize("threads", [False, True])
def test_window_reference_is_count_and_sum_per_key_and_second(events, threads):
    seconds, ref = throughput.reference(events, threads=threads, job="window")
    assert seconds > 0
    got = {(r["key"], r["window_start"]): (r["value_count"], r["value_sum"]) for r in ref.to_pylist()}
    assert got == _brute_force(events)  # dyadic values: sums are exact in any order


def _engine_output(ref: pa.Table) -> pa.Table:
    """The reference as the engine writes it: window_end added, columns and rows reordered."""
    out = ref.append_column("window_end", pc.add(ref["window_start"], 1000))
    out = out.select(["window_start", "window_end", "key", "value_count", "value_sum"])
    return out.take(np.random.default_rng(0).permutation(out.num_rows))


def test_same_accepts_the_windows_in_any_order_and_refuses_any_difference(events):
    ref = throughput.reference(events, threads=False, job="window")[1]
    out = _engine_output(ref)
    assert throughput.same(out, ref, "window")

    counts = out["value_count"].to_numpy().copy()
    counts[0] += 1
    assert not throughput.same(out.set_column(3, "value_count", pa.array(counts)), ref, "window")
    assert not throughput.same(out.slice(1), ref, "window")  # a window missing
    assert not throughput.same(pa.concat_tables([out, out.slice(0, 1)]), ref, "window")  # twice
    ends = pc.add(out["window_start"], 2000)
    assert not throughput.same(out.set_column(1, "window_end", ends), ref, "window")


def test_same_still_checks_the_keyed_job(events):
    ref = throughput.reference(events, threads=True, job="keyed")[1]
    assert throughput.same(ref.take(pc.sort_indices(ref["value_sum"])), ref)
    assert not throughput.same(ref.slice(1), ref)


def test_each_job_writes_its_own_json_the_keyed_one_where_it_always_did():
    assert throughput.json_path("bench/results/throughput.json", "keyed") == "bench/results/throughput.json"
    assert throughput.json_path("bench/results/throughput.json", "window") == (
        "bench/results/throughput_window.json"
    )
    assert throughput.json_path("out/x", "window") == "out/x_window.json"


def test_latest_per_key_keeps_the_latest_version_of_each_key_and_window():
    out = pa.table(
        {
            "key": [1, 1, 1, None, None, 2],
            "window_start": [0, 0, 1000, 0, 0, 0],
            "count": [1, 2, 5, 3, 4, 6],
            "_version": [10, 11, 10, 10, 12, 10],
        }
    )
    latest = pipeline_job.latest_per_key(out, ["key", "window_start"])
    assert sorted(latest["count"].to_pylist()) == [2, 4, 5, 6]
    assert sorted(pipeline_job.latest_per_key(out, "key")["count"].to_pylist()) == [2, 4, 6]
    assert pipeline_job.latest_per_key(out.drop_columns(["_version"]), "key").num_rows == 6


def test_the_window_job_has_its_own_name_and_output_by_default():
    keyed = pipeline_job.parse_args([])
    windowed = pipeline_job.parse_args(["--window-s", "1"])
    assert (keyed.name, keyed.output, keyed.window_s) == ("pipeline", "out/pipeline", None)
    assert (windowed.name, windowed.output, windowed.window_s) == (
        "pipeline-window",
        "out/pipeline-window",
        1.0,
    )
    assert windowed.event_time == "ts" and windowed.max_out_of_orderness_s == 0.0
    with pytest.raises(SystemExit):
        pipeline_job.parse_args(["--window-s", "0"])


def test_event_times_print_as_utc_milliseconds():
    assert pipeline_job.time_label(pa.scalar(1_700_000_000_123)) == "2023-11-14 22:13:20.123 UTC"
    stamp = pa.scalar(1_700_000_000_123, pa.timestamp("ms", tz="UTC"))
    assert pipeline_job.time_label(stamp) == "2023-11-14 22:13:20.123 UTC"
