"""rf.ops.Window without Ray (DESIGN §11): the operator driven batch by batch, watermark by
watermark, snapshotted and restored mid-stream, and compared with DuckDB SQL over the same rows."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rayflow.ops.window as window_module
from rayflow._internal.windowing import fixed_windows, floor_div, merge_intervals, window_rows
from rayflow.errors import ConfigError, InputError
from rayflow.ops.base import WATERMARK_END, side_stream_of
from rayflow.ops.window import Window
from rayflow.sinks import Collect, Parquet
from rayflow.sinks.base import UPSERT_KEY_METADATA, VERSION_COLUMN, upsert_key
from rayflow.testing import assert_same_rows, duckdb_reference

AGGS = [("v", "count"), ("v", "sum"), ("v", "mean"), ("v", "min"), ("v", "max")]
SELECT_AGGS = "count(v) AS v_count, sum(v) AS v_sum, avg(v) AS v_mean, min(v) AS v_min, max(v) AS v_max"
OUT = ["window_start", "window_end", "k", "v_count", "v_sum", "v_mean", "v_min", "v_max"]


# ---------------------------------------------------------------------------------- references
def tumbling_sql(size: int) -> str:
    return (
        f"SELECT floor(ts / {size})::BIGINT * {size} AS window_start, "
        f"floor(ts / {size})::BIGINT * {size} + {size} AS window_end, k, {SELECT_AGGS} "
        "FROM d GROUP BY ALL"
    )


def hopping_sql(size: int, slide: int) -> str:
    pairs = (
        f"SELECT k, v, unnest(range(floor((ts - {size}) / {slide})::BIGINT + 1, "
        f"floor(ts / {slide})::BIGINT + 1)) * {slide} AS window_start FROM d"
    )
    return (
        f"SELECT window_start, window_start + {size} AS window_end, k, {SELECT_AGGS} "
        f"FROM ({pairs}) GROUP BY ALL"
    )


def session_sql(gap: int) -> str:
    """Gaps and islands: a row at least ``gap`` after the key's previous one starts a session
    (the default RANGE frame counts tied rows together, whichever of them lag() flags)."""
    flagged = (
        f"SELECT *, CASE WHEN ts - lag(ts) OVER (PARTITION BY k ORDER BY ts) < {gap} THEN 0 ELSE 1 END "
        "AS new FROM d"
    )
    numbered = f"SELECT *, sum(new) OVER (PARTITION BY k ORDER BY ts) AS sid FROM ({flagged})"
    return (
        f"SELECT min(ts) AS window_start, max(ts) + {gap} AS window_end, k, {SELECT_AGGS} "
        f"FROM ({numbered}) GROUP BY k, sid"
    )


def reference(op: Window, rows: pa.Table) -> pa.Table:
    spec = op.spec()["window"]
    sql = {
        "tumbling": lambda: tumbling_sql(spec["size_ms"]),
        "hopping": lambda: hopping_sql(spec["size_ms"], spec["slide_ms"]),
        "session": lambda: session_sql(spec["gap_ms"]),
    }[spec["kind"]]()
    return duckdb_reference(sql, d=rows)


# ---------------------------------------------------------------------------------- inputs
def stream(
    seed: int, n: int = 3_000, keys: int = 20, rate_ms: float = 7.0, bound_ms: int = 2_000
) -> pa.Table:
    """Rows in arrival order whose event times lag the arrival clock by at most ``bound_ms``:
    each is at least the largest event time before it minus the bound (never late)."""
    rng = np.random.default_rng(seed)
    clock = np.cumsum(rng.exponential(rate_ms, n)).astype(np.int64) + 1_000_000
    ts = clock - rng.integers(0, bound_ms + 1, n)
    return pa.table(
        {
            "k": pa.array(rng.integers(0, keys, n)).cast(pa.string()),
            "ts": pa.array(ts, pa.int64()),
            "v": pa.array(rng.integers(-50, 100, n).astype(np.float64)),  # integral: exact sums
        }
    )


def batches(rows: pa.Table, sizes: list[int]) -> list[pa.Table]:
    out, at, i = [], 0, 0
    while at < rows.num_rows:
        size = sizes[i % len(sizes)]
        out.append(rows.slice(at, size))
        at, i = at + size, i + 1
    return out


def snapshot_round_trip(op: Window, state):
    """What the engine does at a commit and a restore: the state as a table with the key's hash
    column, sorted by it, through Parquet (which keeps the schema metadata), hash dropped."""
    table = op.state_to_table(state)
    hashed = table.append_column("_hash", _fake_hash(table))
    hashed = hashed.sort_by("_hash")
    buf = io.BytesIO()
    pq.write_table(hashed, buf)
    restored = pq.read_table(io.BytesIO(buf.getvalue())).drop_columns(["_hash"])
    return op.state_from_table(restored)


def _fake_hash(table: pa.Table) -> pa.Array:
    rng = np.random.default_rng(table.num_rows)
    return pa.array(rng.integers(0, 2**62, table.num_rows), pa.int64())


class Driver:
    """Drives one operator the way the chain does: process each batch, then advance to the
    partition's watermark (the largest event time so far minus ``bound_ms``)."""

    def __init__(self, op: Window, *, bound_ms: int):
        self.op, self.bound_ms = op, bound_ms
        self.state = op.init_state()
        self.outputs: list[pa.Table] = []
        self.late: list[pa.Table] = []
        self.max_ts: int | None = None
        self.version = 0
        self.watermarks: list[int] = []

    def watermark(self) -> int:
        return self.max_ts - self.bound_ms

    def feed(self, batch: pa.Table) -> None:
        self.state, side = self.op.process(self.state, batch)
        if side is not None:
            assert side_stream_of(side) == "late"
            self.late.append(side)
        self.version += batch.num_rows
        ts = batch.column("ts")
        if pa.types.is_timestamp(ts.type):  # floored to ms, as the engine's watermark is
            per_ms = {"s": 1, "ms": 1, "us": 1_000, "ns": 1_000_000}[ts.type.unit]
            ts = pc.cast(ts, pa.int64()).to_numpy() // per_ms * (1_000 if ts.type.unit == "s" else 1)
        self.max_ts = max(self.max_ts or -(2**62), int(np.max(ts)))
        self.advance(self.watermark())

    def advance(self, watermark: int) -> None:
        self.state, out = self.op.on_watermark(self.state, watermark, version=self.version)
        self.watermarks.append(watermark)
        if out is not None:
            self.outputs.append(out)

    def restore(self) -> None:
        """Snapshot and restore; advancing the restored state to the same watermark emits nothing."""
        self.state = snapshot_round_trip(self.op, self.state)
        state, out = self.op.on_watermark(self.state, self.watermarks[-1], version=self.version)
        assert out is None, f"a restored state emitted {out.num_rows} row(s) again"
        self.state = state

    def end(self) -> pa.Table:
        self.advance(WATERMARK_END)
        assert self.op.metrics(self.state)["state_rows"] == 0
        return pa.concat_tables(self.outputs) if self.outputs else None


def run(op: Window, rows: pa.Table, sizes: list[int], *, bound_ms: int, restore_every: int = 0) -> Driver:
    d = Driver(op, bound_ms=bound_ms)
    for i, b in enumerate(batches(rows, sizes)):
        d.feed(b)
        if restore_every and i % restore_every == restore_every - 1:
            d.restore()
    d.end()
    return d


def assert_once(out: pa.Table) -> None:
    keys = out.select(["window_start", "window_end", "k"]).group_by(["window_start", "window_end", "k"])
    counts = keys.aggregate([([], "count_all")]).column("count_all")
    assert pc.max(counts).as_py() == 1, "a window was emitted twice"


def window(kind: str, **kw) -> Window:
    return Window("k", AGGS, event_time="ts", **{kind: _KINDS[kind]}, **kw)


_KINDS = {"tumbling_s": 1.0, "hopping_s": (3.0, 0.5), "session_gap_s": 0.15}


# ---------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", list(_KINDS))
@pytest.mark.parametrize("sizes", [[1], [37, 5, 400], [10_000]])
def test_output_equals_sql_over_shuffled_rows_with_restores(kind, sizes):
    rows = stream(seed=len(sizes) * 7 + len(kind), n=500 if sizes == [1] else 3_000)
    op = window(kind)
    d = run(op, rows, sizes, bound_ms=2_000, restore_every=3 if sizes != [1] else 97)
    out = pa.concat_tables(d.outputs)
    assert out.column_names == OUT
    assert_once(out)
    assert_same_rows(out, reference(op, rows))
    assert d.op.metrics(d.state)["late_rows"] == 0  # within the bound nothing is late


def test_sessions_merge_a_bridging_row_with_open_sessions():
    op = Window("k", [("v", "sum")], event_time="ts", session_gap_s=1)
    d = Driver(op, bound_ms=10_000)
    d.feed(pa.table({"k": ["a", "a", "b"], "ts": [0, 1_500, 0], "v": [1.0, 2.0, 3.0]}))
    assert d.op.metrics(d.state)["open_windows"] == 3  # two sessions of a, one of b
    d.feed(pa.table({"k": ["a"], "ts": [800], "v": [4.0]}))  # within 1 s of both: one session
    d.restore()
    out = d.end()
    assert sorted(out.to_pylist(), key=lambda r: r["k"]) == [
        {"window_start": 0, "window_end": 2_500, "k": "a", "v_sum": 7.0},
        {"window_start": 0, "window_end": 1_000, "k": "b", "v_sum": 3.0},
    ]


def test_a_row_exactly_a_gap_apart_starts_a_new_session():
    op = Window("k", [("v", "count")], event_time="ts", session_gap_s=1)
    d = Driver(op, bound_ms=0)
    d.feed(pa.table({"k": ["a", "a"], "ts": [0, 1_000], "v": [1, 1]}))
    assert [(r["window_start"], r["window_end"]) for r in d.end().to_pylist()] == [(0, 1_000), (1_000, 2_000)]


def test_windows_before_1970_align_to_epoch_zero():
    rows = pa.table({"k": ["a"] * 4, "ts": [-1, -1_000, -1_001, 5], "v": [1.0, 2.0, 3.0, 4.0]})
    for kind in ("tumbling_s", "hopping_s"):
        op = window(kind)
        d = run(op, rows, [4], bound_ms=0)
        assert_same_rows(pa.concat_tables(d.outputs), reference(op, rows))


def test_multi_column_by_with_nulls():
    rng = np.random.default_rng(3)
    n = 2_000
    k = pa.array(rng.integers(0, 5, n)).cast(pa.string())
    k = pc.if_else(pa.array(rng.random(n) < 0.1), pa.nulls(n, pa.string()), k)
    rows = pa.table(
        {"k": k, "g": pa.array(rng.integers(0, 3, n)), "ts": pa.array(np.sort(rng.integers(0, 60_000, n)))}
    ).append_column("v", pa.array(rng.integers(0, 10, n).astype(np.float64)))
    for kind, sql in [
        ("tumbling_s", "floor(ts / 1000)::BIGINT * 1000"),
        ("session_gap_s", None),
    ]:
        op = Window(["k", "g"], [("v", "sum")], event_time="ts", **{kind: 1})
        d = run(op, rows, [333], bound_ms=0)
        out = pa.concat_tables(d.outputs)
        if sql:
            ref = duckdb_reference(
                f"SELECT {sql} AS window_start, k, g, sum(v) AS v_sum FROM d GROUP BY ALL", d=rows
            )
        else:
            ref = duckdb_reference(
                "SELECT min(ts) AS window_start, k, g, sum(v) AS v_sum FROM (SELECT *, sum(new) OVER "
                "(PARTITION BY k, g ORDER BY ts) AS sid FROM (SELECT *, CASE WHEN ts - lag(ts) OVER "
                "(PARTITION BY k, g ORDER BY ts) < 1000 THEN 0 ELSE 1 END AS new FROM d)) GROUP BY k, g, sid",
                d=rows,
            )
        assert_same_rows(out, ref, columns=["window_start", "k", "g", "v_sum"])


# ---------------------------------------------------------------------------------- state
@pytest.mark.parametrize("kind", list(_KINDS))
def test_state_holds_only_open_windows(kind):
    rows = stream(seed=11, n=20_000, keys=50, rate_ms=5.0, bound_ms=500)  # 100 s of event time
    op = window(kind)
    d = Driver(op, bound_ms=500)
    peak = 0
    for b in batches(rows, [500]):
        d.feed(b)
        state = op.state_to_table(d.state)
        if state.num_rows:
            # every window held is open: it ends after the watermark (lateness 0)
            assert pc.min(state.column("window_end")).as_py() > d.watermark()
        peak = max(peak, op.metrics(d.state)["state_rows"])
    # bounded by the keys times the windows open at once, far below the 20k rows or all windows
    assert peak <= 50 * {"tumbling_s": 4, "hopping_s": 12, "session_gap_s": 12}[kind]
    d.end()
    assert op.metrics(d.state) == {"late_rows": 0, "open_windows": 0, "state_rows": 0}


def test_advance_with_nothing_due_is_o1_and_keeps_the_state():
    op = window("tumbling_s")
    s, _ = op.process(op.init_state(), pa.table({"k": ["a"], "ts": [1_500], "v": [1.0]}))
    s1, out = op.on_watermark(s, 1_000, version=1)
    assert out is None and s1.due == 2_000
    s2, out = op.on_watermark(s1, 1_000, version=2)
    assert out is None and s2 is s1  # same watermark, nothing due: the very same state


def test_empty_state_round_trips_with_its_watermark_and_counter():
    op = window("tumbling_s")
    s, _ = op.process(op.init_state(), pa.table({"k": ["a"], "ts": [500], "v": [1.0]}))
    s, out = op.on_watermark(s, 5_000, version=1)
    assert out.num_rows == 1
    s, _ = op.process(s, pa.table({"k": ["a"], "ts": [600], "v": [1.0]}))  # late
    restored = snapshot_round_trip(op, s)
    assert restored.watermark == 5_000
    assert op.metrics(restored) == {"late_rows": 1, "open_windows": 0, "state_rows": 0}
    assert op.on_watermark(restored, 5_000, version=2)[1] is None


# ---------------------------------------------------------------------------------- raw rows
# Fixed windows buffer their input rows and aggregate them once, when the window closes; past
# window_module._MAX_RAW_BYTES a partition's buffered rows are folded into partials.
_LONG = {"tumbling_s": 10.0, "hopping_s": (10.0, 2.5)}


@pytest.mark.parametrize("kind", list(_LONG))
@pytest.mark.parametrize("snapshots", ["none", "kept", "restored"])
@pytest.mark.parametrize("bound, tables", [(6_000, 256), (2**40, 3)], ids=["bytes", "tables"])
def test_windows_past_the_raw_bound_equal_sql(kind, snapshots, bound, tables, monkeypatch):
    """Long windows and a tiny bound (bytes a partition buffers, or batches a window does):
    windows hold partials and raw rows at once, through snapshots whose compaction the state
    keeps (``kept``) or restores from (``restored``)."""
    monkeypatch.setattr(window_module, "_MAX_RAW_BYTES", bound)
    monkeypatch.setattr(window_module, "_MAX_RAW_TABLES", tables)
    rows = stream(seed=21, n=3_000, rate_ms=7.0, bound_ms=2_000)  # 21 s of event time
    op = Window("k", AGGS, event_time="ts", **{kind: _LONG[kind]})
    d = Driver(op, bound_ms=2_000)
    mixed = 0
    for i, b in enumerate(batches(rows, [37, 5, 400])):
        d.feed(b)
        stores = d.state.stores.values()
        assert sum(s.raw_bytes for s in stores) <= bound  # past it, every raw row is folded
        assert all(len(s.raw) < tables for s in stores)
        mixed += any(s.raw and s.tables for s in stores)
        if snapshots == "kept" and i % 4 == 3:
            first = op.state_to_table(d.state)
            rows_held = op.metrics(d.state)["state_rows"]
            assert rows_held == first.num_rows  # the compaction is what the state holds now
            assert_same_rows(op.state_to_table(d.state), first)  # remembered: no work again
        elif snapshots == "restored" and i % 4 == 3:
            d.restore()
    assert mixed  # the bound was crossed inside open windows
    out = d.end()
    assert_once(out)
    assert_same_rows(out, reference(op, rows))


def test_a_restore_in_the_middle_of_a_window_equals_sql():
    """Every row of a window buffered raw, snapshotted, restored as partials, then more raw rows
    for the same window: one emission, equal to SQL."""
    rows = stream(seed=8, n=600, rate_ms=5.0, bound_ms=0)  # 3 s of event time, ordered
    op = Window("k", AGGS, event_time="ts", tumbling_s=60)
    d = Driver(op, bound_ms=0)
    for b in batches(rows, [250]):
        d.feed(b)
        assert d.op.metrics(d.state)["state_rows"] >= b.num_rows  # raw rows are held
        d.restore()
        assert all(not s.raw for s in d.state.stores.values())  # restored as partials
    assert d.outputs == []
    out = d.end()
    assert_same_rows(out, reference(op, rows))


@pytest.mark.parametrize("kind", list(_LONG))
def test_update_mode_with_raw_rows_snapshots_and_the_bound(kind, monkeypatch):
    monkeypatch.setattr(window_module, "_MAX_RAW_BYTES", 5_000)
    rng = np.random.default_rng(6)
    rows = stream(seed=6, n=3_000, bound_ms=1_000)
    late_idx = rng.choice(rows.num_rows - 200, 300, replace=False) + 200
    ts = rows.column("ts").to_numpy().copy()
    ts[late_idx] -= rng.integers(1_000, 9_000, len(late_idx))
    rows = rows.set_column(1, "ts", pa.array(ts))
    op = Window("k", AGGS, event_time="ts", late="update", allowed_lateness_s=12, **{kind: _LONG[kind]})
    d = Driver(op, bound_ms=1_000)
    for i, b in enumerate(batches(rows, [50, 7, 300])):
        d.feed(b)
        if i % 3 == 1:
            op.state_to_table(d.state)  # kept: the state goes on from its compaction
        if i % 7 == 6:
            d.restore()
    d.end()
    assert op.metrics(d.state)["late_rows"] == 0
    assert_same_rows(latest(d.outputs, ["k", "window_start", "window_end"]), reference(op, rows), columns=OUT)


def test_raw_rows_are_copied_out_of_their_batch():
    """A window keeps only its columns, in buffers of its own: not the batch it came in."""
    op = window("tumbling_s")
    batch = pa.table({"k": ["a", "b"], "ts": [100, 200], "v": [1.0, 2.0], "wide": ["x" * 1_000] * 2})
    state, _ = op.process(op.init_state(), batch)
    (store,) = state.stores.values()
    (raw,) = store.raw
    assert raw.column_names == ["k", "v"] and store.raw_bytes == raw.nbytes
    v_in, v_raw = batch.column("v").chunk(0), raw.column("v").chunk(0)
    assert v_raw.buffers()[1].address != v_in.buffers()[1].address


@pytest.mark.parametrize("size, slide", [(1_000, 1_000), (3_000, 500), (50, 50), (1_000, 10), (7, 3)])
def test_window_rows_are_the_pairs_of_fixed_windows(size, slide):
    rng = np.random.default_rng(size + slide)
    for lo, span in [(0, 900), (-5_000, 10_000), (1_700_000_000_000, 999), (12_345, 0)]:
        ts = rng.integers(lo, lo + span + 1, 500)
        rows, starts = fixed_windows(ts, size, slide)
        rows = np.arange(len(ts)) if rows is None else rows
        expected = sorted(zip(starts.tolist(), rows.tolist()))
        got = []
        for start, found in window_rows(ts, size, slide):
            if found is None:
                found = np.arange(len(ts))
            else:
                assert len(found) < len(ts) and (np.diff(found) > 0).all()
            got += [(start, r) for r in found.tolist()]
        assert got == expected
    assert window_rows(np.zeros(0, dtype=np.int64), size, slide) == []


# ---------------------------------------------------------------------------------- late rows
def late_stream() -> tuple[pa.Table, list[pa.Table]]:
    """Batches where some rows come after the watermark passed their window (bound 0)."""
    b1 = pa.table({"k": ["a", "b", "a"], "ts": [100, 900, 2_100], "v": [1.0, 2.0, 3.0]})
    b2 = pa.table({"k": ["a", "b", "a"], "ts": [500, 2_200, 2_050], "v": [10.0, 20.0, 30.0]})  # 500 late
    b3 = pa.table({"k": ["b", "a"], "ts": [5_000, 1_200], "v": [5.0, 7.0]})  # 1_200 late
    return pa.concat_tables([b1, b2, b3]), [b1, b2, b3]


def test_late_rows_dropped_and_counted_across_a_restore():
    op = Window("k", [("v", "sum")], event_time="ts", tumbling_s=1)
    _, bs = late_stream()
    d = Driver(op, bound_ms=0)
    d.feed(bs[0])
    d.feed(bs[1])
    d.restore()
    d.feed(bs[2])
    out = d.end()
    assert op.metrics(d.state)["late_rows"] == 2
    got = sorted((r["k"], r["window_start"], r["v_sum"]) for r in out.to_pylist())
    assert got == [
        ("a", 0, 1.0),
        ("a", 2_000, 33.0),
        ("b", 0, 2.0),
        ("b", 2_000, 20.0),
        ("b", 5_000, 5.0),
    ]


def test_late_rows_go_to_the_side_stream_exactly():
    sink = Parquet("late")
    op = Window("k", [("v", "sum")], event_time="ts", hopping_s=(2, 1), late="side", late_sink=sink)
    assert op.side_sinks() == {"late": sink}
    _, bs = late_stream()
    d = Driver(op, bound_ms=0)
    for b in bs:
        d.feed(b)
    d.end()
    late = pa.concat_tables(d.late)
    assert late.column_names == ["k", "ts", "v", "window_start", "window_end"]
    # 500 missed [-1000, 1000) and [0, 2000) (watermark 2100 closed both);
    # 1200 missed [0, 2000) only: [1000, 3000) is still open (watermark 2200)
    assert sorted(tuple(r.values()) for r in late.to_pylist()) == [
        ("a", 500, 10.0, -1_000, 1_000),
        ("a", 500, 10.0, 0, 2_000),
        ("a", 1_200, 7.0, 0, 2_000),
    ]
    assert op.metrics(d.state)["late_rows"] == 3


def test_session_late_rows_decided_after_merging():
    sink = Parquet("late")
    op = Window("k", [("v", "sum")], event_time="ts", session_gap_s=1, late="side", late_sink=sink)
    d = Driver(op, bound_ms=0)
    d.feed(pa.table({"k": ["a", "a"], "ts": [0, 5_000], "v": [1.0, 2.0]}))  # wm 5000: [0, 1000) closed
    # 4_500 joins the open session [5000, 6000): not late; 2_000 and 2_500 form a closed one: late
    d.feed(pa.table({"k": ["a", "a", "a"], "ts": [4_500, 2_000, 2_500], "v": [4.0, 8.0, 16.0]}))
    out = d.end()
    assert sorted((r["window_start"], r["window_end"], r["v_sum"]) for r in out.to_pylist()) == [
        (0, 1_000, 1.0),
        (4_500, 6_000, 6.0),
    ]
    late = pa.concat_tables(d.late)
    assert sorted((r["ts"], r["window_start"], r["window_end"]) for r in late.to_pylist()) == [
        (2_000, 2_000, 3_500),
        (2_500, 2_000, 3_500),
    ]
    assert op.metrics(d.state)["late_rows"] == 2


def test_allowed_lateness_keeps_windows_open_for_late_rows():
    op = Window("k", [("v", "sum")], event_time="ts", tumbling_s=1, allowed_lateness_s=2)
    rows, bs = late_stream()
    d = Driver(op, bound_ms=0)
    for b in bs:
        d.feed(b)
    out = d.end()
    assert op.metrics(d.state)["late_rows"] == 0
    assert_same_rows(
        out,
        duckdb_reference(
            "SELECT floor(ts / 1000)::BIGINT * 1000 AS window_start, k, sum(v) AS v_sum FROM d GROUP BY ALL",
            d=rows,
        ),
        columns=["window_start", "k", "v_sum"],
    )


def latest(stream: list[pa.Table], keys: list[str]) -> pa.Table:
    return duckdb_reference(
        f"SELECT * EXCLUDE ({VERSION_COLUMN}) FROM s QUALIFY row_number() OVER "
        f"(PARTITION BY {', '.join(keys)} ORDER BY {VERSION_COLUMN} DESC) = 1",
        s=pa.concat_tables(stream),
    )


@pytest.mark.parametrize("kind", ["tumbling_s", "hopping_s"])
def test_update_mode_latest_rows_equal_sql_over_all_rows(kind):
    """Rows up to 5 s behind the watermark (bound 1 s), lateness 6 s: nothing is dropped, windows
    fire when the watermark passes them and fire again when late rows reach them."""
    rng = np.random.default_rng(5)
    rows = stream(seed=5, n=4_000, bound_ms=1_000)
    late_idx = rng.choice(rows.num_rows - 200, 300, replace=False) + 200
    ts = rows.column("ts").to_numpy().copy()
    ts[late_idx] -= rng.integers(1_000, 5_000, len(late_idx))
    rows = rows.set_column(1, "ts", pa.array(ts))
    op = window(kind, late="update", allowed_lateness_s=6)
    assert op.emits_upserts
    d = run(op, rows, [50, 7, 300], bound_ms=1_000, restore_every=4)
    assert op.metrics(d.state)["late_rows"] == 0
    for out in d.outputs:
        assert upsert_key(out.schema) == ["k", "window_start", "window_end"]
        assert json.loads(out.schema.metadata[UPSERT_KEY_METADATA]) == ["k", "window_start", "window_end"]
    versions = [out.column(VERSION_COLUMN)[0].as_py() for out in d.outputs]
    assert versions == sorted(versions)
    fired_twice = (
        pa.concat_tables(d.outputs).num_rows - latest(d.outputs, ["k", "window_start", "window_end"]).num_rows
    )
    assert fired_twice > 0  # late rows did update fired windows
    assert_same_rows(latest(d.outputs, ["k", "window_start", "window_end"]), reference(op, rows), columns=OUT)


def test_update_mode_drops_rows_past_the_lateness():
    op = Window("k", [("v", "sum")], event_time="ts", tumbling_s=1, late="update", allowed_lateness_s=1)
    d = Driver(op, bound_ms=0)
    d.feed(pa.table({"k": ["a"], "ts": [100], "v": [1.0]}))
    d.feed(pa.table({"k": ["a"], "ts": [1_500], "v": [2.0]}))  # wm 1500: [0,1000) fires
    assert [r["v_sum"] for r in d.outputs[-1].to_pylist()] == [1.0]
    d.feed(pa.table({"k": ["a"], "ts": [200], "v": [4.0]}))  # within lateness: fires again
    assert [(r["v_sum"], r[VERSION_COLUMN]) for r in d.outputs[-1].to_pylist()] == [(5.0, 3)]
    d.feed(pa.table({"k": ["a"], "ts": [2_100], "v": [8.0]}))  # wm 2100: [0,1000) dropped
    d.feed(pa.table({"k": ["a"], "ts": [300], "v": [16.0]}))  # past the lateness: dropped
    d.end()
    assert op.metrics(d.state)["late_rows"] == 1
    final = latest(d.outputs, ["k", "window_start", "window_end"]).sort_by("window_start").to_pylist()
    assert [(r["window_start"], r["v_sum"]) for r in final] == [(0, 5.0), (1_000, 2.0), (2_000, 8.0)]


# ---------------------------------------------------------------------------------- timestamps
@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_timestamps_in_and_out(unit):
    rows = stream(seed=9, n=1_000)
    ms = rows.column("ts").to_numpy()
    to_unit, to_ms = {
        "s": (lambda x: x // 1_000, lambda x: x * 1_000),
        "ms": (lambda x: x, lambda x: x),
        "us": (lambda x: x * 1_000 + 999, lambda x: x // 1_000),  # sub-millisecond parts are floored
        "ns": (lambda x: x * 1_000_000 - 1, lambda x: x // 1_000_000),  # (also towards the past)
    }[unit]
    raw = to_unit(ms)
    stamped = rows.set_column(1, "ts", pa.array(raw).cast(pa.timestamp(unit, "Europe/Paris")))
    op = window("tumbling_s")
    out_type = pa.timestamp("ms", "Europe/Paris")
    assert op.check_input(stamped.schema).field("window_start").type == out_type
    d = run(op, stamped, [100], bound_ms=2_000)
    out = pa.concat_tables(d.outputs)
    assert out.schema.field("window_end").type == out_type
    as_ms = rows.set_column(1, "ts", pa.array(to_ms(raw)))
    expected = reference(op, as_ms)
    expected = expected.set_column(0, "window_start", expected.column(0).cast(pa.int64()).cast(out_type))
    expected = expected.set_column(1, "window_end", expected.column(1).cast(pa.int64()).cast(out_type))
    assert_same_rows(out, expected)


# ---------------------------------------------------------------------------------- contract
def test_check_input_and_output_schema():
    schema = pa.schema([("k", pa.string()), ("ts", pa.int64()), ("v", pa.float64())])
    out = window("tumbling_s").check_input(schema)
    assert out.names == OUT and out.field("window_start").type == pa.int64()
    up = window("tumbling_s", late="update", allowed_lateness_s=1).check_input(schema)
    assert up.names == OUT + [VERSION_COLUMN]
    assert json.loads(up.metadata[UPSERT_KEY_METADATA]) == ["k", "window_start", "window_end"]
    with pytest.raises(InputError, match=r"\['missing'\]"):
        Window("missing", [("v", "sum")], event_time="ts", tumbling_s=1).check_input(schema)
    with pytest.raises(InputError, match=r"'ts' has type string"):
        window("tumbling_s").check_input(schema.set(1, pa.field("ts", pa.string())))
    with pytest.raises(InputError, match=r"\('k', 'sum'\) cannot aggregate column 'k'"):
        Window("v", [("k", "sum")], event_time="ts", tumbling_s=1).check_input(schema)


def test_null_event_times_are_refused_with_their_count():
    op = window("tumbling_s")
    with pytest.raises(InputError, match=r"'ts' has 2 null value\(s\)"):
        op.process(op.init_state(), pa.table({"k": ["a"] * 3, "ts": [1, None, None], "v": [1.0] * 3}))


def test_event_time_from_the_pipeline_and_the_contract_hooks():
    op = Window("k", [("v", "sum")], tumbling_s=1)
    assert op.uses_event_time and op.group_columns == ["k"] and not op.emits_upserts
    assert op.side_sinks() == {}
    with pytest.raises(ConfigError, match="event-time column"):
        op.with_event_time(None)
    filled = op.with_event_time("ts")
    assert filled.event_time == "ts" and op.event_time is None
    assert filled.with_event_time("other").event_time == "ts"  # its own column wins
    assert filled.spec() == {
        "type": "Window",
        "by": ["k"],
        "aggs": [["v", "sum"]],
        "window": {"kind": "tumbling", "size_ms": 1_000},
        "allowed_lateness_ms": 0,
        "late": "drop",
        "event_time": "ts",
    }
    hop = Window("k", [("v", "sum")], event_time="ts", hopping_s=(10, 2.5), allowed_lateness_s=0.5)
    assert hop.spec()["window"] == {"kind": "hopping", "size_ms": 10_000, "slide_ms": 2_500}
    assert hop.spec()["allowed_lateness_ms"] == 500
    assert Window("k", [("v", "sum")], session_gap_s=30).spec()["window"] == {
        "kind": "session",
        "gap_ms": 30_000,
    }


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one window kind"),
        ({"tumbling_s": 1, "session_gap_s": 1}, "exactly one window kind"),
        ({"tumbling_s": 0}, "tumbling_s must be a positive number"),
        ({"tumbling_s": -1}, "tumbling_s must be a positive number"),
        ({"tumbling_s": 0.0005}, "whole number of milliseconds"),
        ({"tumbling_s": "1"}, "tumbling_s must be"),
        ({"tumbling_s": True}, "tumbling_s must be"),
        ({"tumbling_s": float("inf")}, "tumbling_s must be"),
        ({"hopping_s": 5}, r"hopping_s is \(size_s, slide_s\)"),
        ({"hopping_s": (1, 2)}, "slide <= size"),
        ({"hopping_s": (1, 0)}, "the slide of hopping_s"),
        ({"session_gap_s": 0}, "session_gap_s must be"),
        ({"tumbling_s": 1, "allowed_lateness_s": -1}, "allowed_lateness_s"),
        ({"tumbling_s": 1, "late": "keep"}, "late must be one of"),
        ({"tumbling_s": 1, "late": "side"}, "late_sink=, which is missing"),
        ({"tumbling_s": 1, "late_sink": Parquet("late")}, "only late='side'"),
        ({"tumbling_s": 1, "late": "side", "late_sink": Collect()}, "a sink of their own"),
        ({"tumbling_s": 1, "late": "side", "late_sink": "late/"}, "must be an rf.sinks sink"),
        ({"session_gap_s": 1, "late": "update"}, "not offered for session windows"),
        ({"tumbling_s": 1, "event_time": 3}, "event_time must be a column name"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Window("k", [("v", "sum")], **kwargs)


@pytest.mark.parametrize(
    "by, aggs, match",
    [
        ([], [("v", "sum")], "group column"),
        ("k", [], "at least one"),
        ("k", [("v", "median")], "'median' on column 'v' is not supported"),
        ("k", [("v",)], r"each agg is \(column, function\)"),
        ("window_start", [("v", "sum")], "output columns of the window"),
    ],
)
def test_bad_by_and_aggs_are_config_errors(by, aggs, match):
    with pytest.raises(ConfigError, match=match):
        Window(by, aggs, tumbling_s=1)


# ---------------------------------------------------------------------------------- property
@st.composite
def scenarios(draw):
    n = draw(st.integers(1, 120))
    bound = draw(st.integers(0, 3_000))
    steps = draw(st.lists(st.integers(0, 400), min_size=n, max_size=n))
    lags = draw(st.lists(st.integers(0, bound), min_size=n, max_size=n))
    keys = draw(st.lists(st.sampled_from("abc"), min_size=n, max_size=n))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=8))))
    kind = draw(st.sampled_from(["tumbling", "hopping", "session"]))
    size = draw(st.integers(1, 40)) * 50
    slide = draw(st.integers(1, size // 50)) * 50
    restore_at = draw(st.sets(st.integers(0, len(cuts))))
    return n, bound, steps, lags, keys, cuts, kind, size, slide, restore_at


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_any_shuffle_within_the_bound_and_any_split_equals_sql(scenario):
    n, bound, steps, lags, keys, cuts, kind, size, slide, restore_at = scenario
    clock = np.cumsum(steps) - 5_000  # before and after 1970
    rows = pa.table(
        {"k": keys, "ts": pa.array(clock - np.array(lags), pa.int64()), "v": np.arange(n, dtype=np.float64)}
    )
    arg = {"tumbling": {"tumbling_s": size / 1000}, "hopping": {"hopping_s": (size / 1000, slide / 1000)}}
    op = Window("k", AGGS, event_time="ts", **arg.get(kind, {"session_gap_s": size / 1000}))
    d = Driver(op, bound_ms=bound)
    for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, n])):
        d.feed(rows.slice(a, b - a))
        if i in restore_at:
            d.restore()
    out = d.end()
    assert op.metrics(d.state)["late_rows"] == 0
    assert_once(out)
    assert_same_rows(out, reference(op, rows))


# ---------------------------------------------------------------------------------- helpers
def _naive_sessions(codes, start, end) -> set[tuple[int, int, int]]:
    out = set()
    for c in set(codes.tolist()):
        spans = sorted((s, e) for k, s, e in zip(codes, start, end) if k == c)
        cur_s, cur_e = spans[0]
        for s, e in spans[1:]:
            if s < cur_e:
                cur_e = max(cur_e, e)
            else:
                out.add((c, cur_s, cur_e))
                cur_s, cur_e = s, e
        out.add((c, cur_s, cur_e))
    return out


@pytest.mark.parametrize("far", [False, True])  # far: starts too spread for one int64 sort key
def test_merge_intervals_matches_a_naive_merge(far):
    rng = np.random.default_rng(int(far))
    n = 3_000
    codes = rng.integers(0, 30, n)
    start = rng.integers(0, 50_000, n) + (rng.integers(0, 2, n) * 2**61 if far else 0)
    end = start + rng.integers(1, 400, n)
    found = merge_intervals(codes, start, end)
    got = {(int(codes[f]), int(s), int(e)) for f, s, e in zip(found.first_row, found.start, found.end)}
    assert got == _naive_sessions(codes, start, end)
    # every interval lies in its component, which starts with its first interval
    assert (start >= found.start[found.of_row]).all() and (end <= found.end[found.of_row]).all()
    assert (found.of_row[found.first_row] == np.arange(len(found.start))).all()


def test_floor_div_is_exact_where_it_divides_in_floats():
    rng = np.random.default_rng(2)
    for d in (1, 7, 1_000, 999_983, 3_600_000):
        x = rng.integers(-(2**52) + 1, 2**52 - 1, 100_000) // d * d + rng.integers(-1, 2, 100_000)
        assert (floor_div(x, d) == x // d).all()
        big = np.array([2**60, -(2**60) - 1, 5])  # past float exactness: integer division
        assert (floor_div(big, d) == big // d).all()
