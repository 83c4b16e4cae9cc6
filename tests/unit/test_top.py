"""rf.ops.Top without Ray (DESIGN §11, §12): the operator driven batch by batch, watermark by
watermark, snapshotted and restored mid-stream, and compared with DuckDB SQL over the same rows;
the two-stage form (per partition, then over the partitions' candidates) equals the one-stage."""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import rayflow as rf
from rayflow._internal.chain import Chain
from rayflow._internal.checkpoint.commit import with_hash
from rayflow._internal.watermarks import batch_max_ms
from rayflow.errors import ConfigError, InputError
from rayflow.ops.base import WATERMARK_END, WATERMARK_NONE
from rayflow.ops.top import Top
from rayflow.sinks import Collect
from rayflow.testing import assert_same_rows, duckdb_reference

COLS = ["window_start", "window_end", "id", "k", "ts", "v"]
GIVEN = ("window_start", "window_end")


# ---------------------------------------------------------------------------------- references
def pairs_sql(kind: str, size: int, slide: int) -> str:
    """Every (row, window) pair of ``d`` with ``window_start`` and ``window_end``."""
    if kind == "tumbling":
        return (
            f"SELECT floor(ts / {size})::BIGINT * {size} AS window_start, "
            f"floor(ts / {size})::BIGINT * {size} + {size} AS window_end, * FROM d"
        )
    starts = (
        f"SELECT unnest(range(floor((ts - {size}) / {slide})::BIGINT + 1, "
        f"floor(ts / {slide})::BIGINT + 1)) * {slide} AS window_start, * FROM d"
    )
    return (
        f"SELECT window_start, window_start + {size} AS window_end, * EXCLUDE (window_start) FROM ({starts})"
    )


def top_sql(pairs: str, by: list[str]) -> str:
    """The top rows (ties kept, nulls never) of each window and ``by`` group of ``pairs``."""
    part = ", ".join(["window_start", "window_end", *by])
    return f"SELECT * FROM ({pairs}) QUALIFY v = max(v) OVER (PARTITION BY {part})"


def reference(op: Top, rows: pa.Table) -> pa.Table:
    spec = op.spec()["window"]
    if spec["kind"] == "given":
        pairs = "SELECT * FROM d"
    else:
        pairs = pairs_sql(spec["kind"], spec["size_ms"], spec.get("slide_ms", spec["size_ms"]))
    return duckdb_reference(top_sql(pairs, op.by), d=rows)


# ---------------------------------------------------------------------------------- inputs
def stream(
    seed: int, n: int = 3_000, *, keys: int = 8, rate_ms: float = 7.0, bound_ms: int = 2_000
) -> pa.Table:
    """Rows in arrival order whose event times lag the arrival clock by at most ``bound_ms`` (never
    late), with values from a small range (many ties), some null values and null keys."""
    rng = np.random.default_rng(seed)
    clock = np.cumsum(rng.exponential(rate_ms, n)).astype(np.int64) + 1_000_000
    ts = clock - rng.integers(0, bound_ms + 1, n)
    k = rng.integers(0, keys, n).astype(str).astype(object)
    k[rng.random(n) < 0.05] = None
    v = rng.integers(0, 12, n)
    return pa.table(
        {
            "id": pa.array(np.arange(n), pa.int64()),
            "k": pa.array(k, pa.string()),
            "ts": pa.array(ts, pa.int64()),
            "v": pa.array(v, pa.int64(), mask=rng.random(n) < 0.1),
        }
    )


def random_cuts(rows: pa.Table, seed: int, mean: int) -> list[pa.Table]:
    """``rows`` cut at random points into batches of about ``mean`` rows (some of one row)."""
    rng = np.random.default_rng(seed)
    out, at = [], 0
    while at < rows.num_rows:
        size = 1 if rng.random() < 0.1 else int(rng.integers(1, 2 * mean))
        out.append(rows.slice(at, size))
        at += size
    return out


def snapshot_round_trip(op: Top, state, key: list[str]):
    """What the engine does at a commit and a restore: the state with its key hash, sorted by it,
    through Parquet (which keeps the schema metadata), the hash dropped."""
    buf = io.BytesIO()
    pq.write_table(with_hash(op.state_to_table(state), key), buf)
    return op.state_from_table(pq.read_table(io.BytesIO(buf.getvalue())).drop_columns(["_hash"]))


class Driver:
    """Drives one operator the way the chain does: process a batch, then advance to the
    partition's watermark (given, or the largest ``ts`` so far minus ``bound_ms``)."""

    def __init__(self, op: Top, *, bound_ms: int = 0, key: list[str] | None = None):
        self.op, self.bound_ms, self.key = op, bound_ms, key or ["k"]
        self.state = op.init_state()
        self.outputs: list[pa.Table] = []
        self.max_ts = WATERMARK_NONE
        self.watermark = WATERMARK_NONE

    def feed(self, batch: pa.Table, watermark: int | None = None) -> list[pa.Table]:
        self.state, out = self.op.process(self.state, batch)
        assert out is None, "Top emits only when a window closes"
        if watermark is None and batch.num_rows:
            self.max_ts = max(self.max_ts, batch_max_ms(batch, "ts"))  # as the engine sees it
            watermark = self.max_ts - self.bound_ms
        return self.advance(self.watermark if watermark is None else watermark)

    def advance(self, watermark: int) -> list[pa.Table]:
        self.watermark = max(self.watermark, watermark)
        self.state, out = self.op.on_watermark(self.state, watermark, version=0)
        if out is None:
            return []
        assert out.num_rows
        self.outputs.append(out)
        return [out]

    def restore(self) -> None:
        """Snapshot and restore; advancing the restored state to the same watermark emits nothing."""
        before = self.op.metrics(self.state)
        self.state = snapshot_round_trip(self.op, self.state, self.key)
        assert self.op.metrics(self.state) == before
        self.state, out = self.op.on_watermark(self.state, self.watermark, version=0)
        assert out is None, f"a restored state emitted {out.num_rows} row(s) again"

    def end(self) -> pa.Table:
        self.advance(WATERMARK_END)
        assert self.op.metrics(self.state)["state_rows"] == 0
        assert self.op.metrics(self.state)["open_windows"] == 0
        return self.output()

    def output(self) -> pa.Table:
        return pa.concat_tables(self.outputs) if self.outputs else None


def run(op: Top, batches: list[pa.Table], *, bound_ms: int = 2_000, restore_every: int = 0) -> pa.Table:
    d = Driver(op, bound_ms=bound_ms)
    for i, b in enumerate(batches):
        d.feed(b)
        if restore_every and i % restore_every == restore_every - 1:
            d.restore()
    out = d.end()
    assert op.metrics(d.state)["late_rows"] == 0
    return out


def assert_once(out: pa.Table, window: tuple[str, str] = GIVEN) -> None:
    """No (window, row) emitted twice."""
    keys = [*window, "id"]
    counts = out.select(keys).group_by(keys).aggregate([([], "count_all")]).column("count_all")
    assert pc.max(counts).as_py() == 1, "a row was emitted twice for one window"


KINDS = {
    "tumbling": {"tumbling_s": 1.0},
    "hopping": {"hopping_s": (3.0, 0.75)},
    "hopping_odd": {"hopping_s": (1.0, 0.4)},
}


def top(kind: str, by=(), **kw) -> Top:
    return Top("v", by=by, event_time="ts", **KINDS[kind], **kw)


# ---------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("by", [(), ("k",)])
@pytest.mark.parametrize("seed", [1, 2])
def test_output_equals_sql_with_random_cuts_and_restores(kind, by, seed):
    rows = stream(seed)
    op = top(kind, by)
    out = run(op, random_cuts(rows, seed, mean=40 * seed), restore_every=5 + seed)
    assert out.column_names == COLS
    assert_once(out)
    expected = reference(op, rows)
    assert expected.num_rows > 0
    assert_same_rows(out, expected, columns=COLS)


def test_one_big_batch_and_one_row_batches_give_the_same_rows():
    rows = stream(3, n=400)
    op = top("hopping", ("k",))
    expected = reference(op, rows)
    assert_same_rows(run(op, [rows]), expected, columns=COLS)
    assert_same_rows(run(op, random_cuts(rows, 3, mean=1)), expected, columns=COLS)


@pytest.mark.parametrize("by", [(), ("k",)])
def test_window_mode_equals_sql_over_rows_that_carry_their_window(by):
    rows = stream(4, n=1_500)
    carried = duckdb_reference(pairs_sql("hopping", 2_000, 500), d=rows)
    # back in arrival order (within the bound), a row's windows together
    carried = carried.sort_by([("id", "ascending"), ("window_start", "ascending")])
    op = Top("v", by=by, window=GIVEN)
    out = run(op, random_cuts(carried, 4, mean=50), restore_every=4)
    assert out.column_names == carried.column_names
    assert_once(out)
    assert_same_rows(out, reference(op, carried), columns=COLS)


def test_window_mode_with_timestamp_bounds_and_windows_sharing_an_end():
    t = pa.timestamp("ms", "UTC")
    rows = pa.table(
        {
            "window_start": pa.array([0, 0, 500, 500, 0], pa.int64()).cast(t),
            "window_end": pa.array([1_000, 1_000, 1_000, 1_000, 1_000], pa.int64()).cast(t),
            "id": [1, 2, 3, 4, 5],
            "ts": [10, 20, 600, 700, 30],
            "v": [4.0, 7.0, 1.0, 1.0, 7.0],
        }
    )
    op = Top("v", window=GIVEN)
    assert op.check_input(rows.schema) == rows.schema
    d = Driver(op)
    d.feed(rows.slice(0, 3), watermark=999)
    d.feed(rows.slice(3), watermark=999)
    assert op.metrics(d.state)["open_windows"] == 1  # two windows, one end
    out = d.end()
    assert out.schema == rows.schema
    assert sorted(out.column("id").to_pylist()) == [2, 3, 4, 5]  # per (start, end): ties kept


@pytest.mark.parametrize("kind", ["tumbling", "hopping"])
def test_two_stages_equal_one_stage(kind):
    """Stage 1 (keyed by k: each partition its own Top) emits per partition candidates; stage 2
    (keyed by the window) reduces their union with Top(window=...): the max of maxima."""
    rows = stream(5, n=2_500, keys=30)
    parts = 4
    one = top(kind)
    expected = reference(one, rows)
    codes = pc.fill_null(rows.column("k"), "-").combine_chunks().dictionary_encode().indices.to_numpy()
    part_of = codes % parts
    stage1 = [Driver(top(kind)) for _ in range(parts)]
    stage2 = Driver(Top("v", window=GIVEN), key=list(GIVEN))
    max_ts = WATERMARK_NONE
    for i, b in enumerate(random_cuts(rows, 5, mean=60)):
        max_ts = max(max_ts, int(pc.max(b.column("ts")).as_py()))
        watermark = max_ts - 2_000  # one split feeds every partition: one watermark
        b_parts = part_of[b.column("id").to_numpy()]
        candidates = []
        for p, d in enumerate(stage1):
            candidates += d.feed(b.filter(pa.array(b_parts == p)), watermark=watermark)
        for c in candidates:  # published, then read by stage 2, whose watermark then moves
            stage2.feed(c, watermark=stage2.watermark)
        stage2.advance(watermark)
        if i % 7 == 6:
            stage2.restore()
    for d in stage1:
        for c in d.advance(WATERMARK_END):
            stage2.feed(c, watermark=stage2.watermark)
    out2 = stage2.end()
    assert stage2.op.metrics(stage2.state)["late_rows"] == 0
    union = pa.concat_tables([o for d in stage1 for o in d.outputs])
    assert union.num_rows > expected.num_rows  # partitions' candidates that are not the top
    assert_once(out2)
    assert_same_rows(out2, expected, columns=COLS)
    assert_same_rows(run(Top("v", window=GIVEN), [union]), expected, columns=COLS)


# ---------------------------------------------------------------------------------- semantics
def test_ties_are_kept_and_nulls_never_win():
    op = Top("v", by="g", tumbling_s=1, event_time="ts")
    rows = pa.table(
        {
            "g": ["a", "a", "a", "b", "b", None, None, "a"],
            "ts": [0, 100, 200, 300, 400, 500, 600, 1_500],
            "v": [5, 5, 3, None, None, 1, 1, None],
            "_source": ["bids"] * 8,
        }
    )
    d = Driver(op)
    d.feed(rows.slice(0, 2))
    d.feed(rows.slice(2))
    out = d.end()
    got = sorted((r["g"] or "", r["ts"], r["v"]) for r in out.to_pylist())
    # a: both 5s; b: all null, nothing; null group: both 1s; a's second window: all null, nothing
    assert got == [("", 500, 1), ("", 600, 1), ("a", 0, 5), ("a", 100, 5)]
    assert out.column_names == ["window_start", "window_end", "g", "ts", "v", "_source"]


def test_late_rows_are_dropped_and_counted_across_a_restore():
    op = Top("v", tumbling_s=1, event_time="ts")
    d = Driver(op, bound_ms=0)
    d.feed(pa.table({"k": ["a", "b"], "ts": [100, 2_100], "v": [1, 2]}))  # watermark 2100: [0, 1000) closed
    d.feed(pa.table({"k": ["c", "d"], "ts": [500, 2_200], "v": [9, 3]}))  # 500 is late
    d.restore()
    d.feed(pa.table({"k": ["e"], "ts": [1_999], "v": [9]}))  # late ([1000, 2000) closed at 2200)
    assert op.metrics(d.state)["late_rows"] == 2
    out = d.end()
    assert sorted((r["window_start"], r["k"]) for r in out.to_pylist()) == [(0, "a"), (2_000, "d")]


def test_hopping_late_rows_count_once_per_window_missed():
    op = Top("v", hopping_s=(2, 0.5), event_time="ts")  # a row is in 4 windows
    s, _ = op.on_watermark(op.init_state(), 2_000, version=0)
    # ts 1_200: windows starting -500, 0 (closed: end <= 2000), 500, 1000 (open)
    s, _ = op.process(s, pa.table({"ts": [1_200, 100], "v": [1, 2]}))  # 100: all 4 closed
    assert op.metrics(s)["late_rows"] == 2 + 4
    s, out = op.on_watermark(s, WATERMARK_END, version=0)
    assert sorted(out.column("window_start").to_pylist()) == [500, 1_000]


def test_state_holds_only_the_candidates_of_open_windows():
    rows = stream(6, n=4_000, rate_ms=5.0, bound_ms=500)
    rows = rows.set_column(3, "v", pa.array(np.random.default_rng(6).random(rows.num_rows)))  # no ties
    for kind in ("tumbling", "hopping"):
        op = top(kind)
        d = Driver(op, bound_ms=500)
        for b in random_cuts(rows, 6, mean=100):
            d.feed(b)
            state = op.state_to_table(d.state)
            if state.num_rows:
                assert pc.min(state.column("window_end")).as_py() > d.watermark  # only open windows
            m = op.metrics(d.state)
            assert m["state_rows"] == m["open_windows"]  # by=(), no ties: one row per window
        out = d.end()
        assert op.metrics(d.state) == {"late_rows": 0, "open_windows": 0, "state_rows": 0}
        assert_same_rows(out, reference(op, rows), columns=COLS)


def test_many_groups_hold_at_most_about_twice_the_candidates():
    rows = stream(7, n=8_000, keys=400, rate_ms=1.0, bound_ms=200)
    rows = rows.set_column(3, "v", pa.array(np.random.default_rng(7).random(rows.num_rows)))
    op = top("tumbling", ("k",))
    d = Driver(op, bound_ms=200)
    peak = 0
    for b in random_cuts(rows, 7, mean=30):
        d.feed(b)
        held = op.metrics(d.state)["state_rows"]
        candidates = op.state_to_table(d.state).select(["window_start", "k"]).group_by(["window_start", "k"])
        n = candidates.aggregate([]).num_rows
        assert held <= 2 * n + b.num_rows
        peak = max(peak, held)
    assert peak < rows.num_rows / 4
    assert_same_rows(d.end(), reference(op, rows), columns=COLS)


def test_empty_state_round_trips_with_its_watermark_and_counter():
    op = top("tumbling")
    empty = op.state_to_table(op.init_state())
    assert empty.num_rows == 0 and empty.column_names == list(GIVEN)
    s, _ = op.process(op.init_state(), pa.table({"k": ["a"], "ts": [500], "v": [1]}))
    s, out = op.on_watermark(s, 5_000, version=1)
    assert out.num_rows == 1
    s, _ = op.process(s, pa.table({"k": ["a"], "ts": [600], "v": [1]}))  # late
    restored = snapshot_round_trip(op, s, ["k"])
    assert restored.watermark == 5_000
    assert op.metrics(restored) == {"late_rows": 1, "open_windows": 0, "state_rows": 0}
    assert op.on_watermark(restored, 5_000, version=2)[1] is None


def test_advance_with_nothing_due_keeps_the_state():
    op = top("tumbling")
    s, _ = op.process(op.init_state(), pa.table({"k": ["a"], "ts": [1_500], "v": [1]}))
    s1, out = op.on_watermark(s, 1_000, version=1)
    assert out is None and s1.due == 2_000
    s2, out = op.on_watermark(s1, 1_000, version=2)
    assert out is None and s2 is s1
    s3, out = op.on_watermark(s1, 900, version=2)  # never goes back
    assert out is None and s3.watermark == 1_000


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_timestamps_in_and_out(unit):
    rows = stream(8, n=1_000)
    ms = rows.column("ts").to_numpy()
    raw, as_ms = {
        "s": (ms // 1_000, ms // 1_000 * 1_000),
        "ms": (ms, ms),
        "us": (ms * 1_000 + 999, ms),  # sub-millisecond parts are floored
        "ns": (ms * 1_000_000 - 1, ms - 1),  # (also towards the past)
    }[unit]
    stamped = rows.set_column(2, "ts", pa.array(raw).cast(pa.timestamp(unit, "Europe/Paris")))
    op = top("tumbling")
    out_type = pa.timestamp("ms", "Europe/Paris")
    schema = op.check_input(stamped.schema)
    assert schema.names == COLS and schema.field("window_end").type == out_type
    out = run(op, random_cuts(stamped, 8, mean=30), restore_every=3)
    assert out.schema == schema
    expected = reference(op, rows.set_column(2, "ts", pa.array(as_ms)))
    for c in GIVEN:
        expected = expected.set_column(expected.column_names.index(c), c, expected.column(c).cast(out_type))
    assert_same_rows(out, expected, columns=["window_start", "window_end", "id", "k", "v"])


def test_the_chain_closes_every_window_at_the_end_of_a_bounded_input():
    chain = Chain([Top("v", tumbling_s=1, event_time="ts")])
    states = chain.init_states()
    assert chain.process(states, pa.table({"ts": [100, 1_100, 2_100], "v": [1, 2, 3]})) == []
    out = chain.finish(states)
    assert sorted(pa.concat_tables(out).column("v").to_pylist()) == [1, 2, 3]
    assert chain.metrics(states) == {"late_rows": 0, "open_windows": 0, "state_rows": 0}


# ---------------------------------------------------------------------------------- contract
def test_a_pipeline_accepts_a_key_that_is_not_a_group():
    table = pa.table({"auction": [1, 2], "ts": [0, 10], "price": [3, 4]})
    p = rf.Pipeline(
        name="q7-stage1",
        source=rf.sources.Table(table),
        key="auction",
        event_time="ts",
        operator=Top("price", tumbling_s=10),
        sink=Collect(),
    )
    assert p is not None


def test_event_time_from_the_pipeline_and_the_contract_hooks():
    op = Top("v", tumbling_s=1)
    assert op.stateful and op.uses_event_time and op.group_columns is None and not op.emits_upserts
    with pytest.raises(ConfigError, match="event-time column"):
        op.with_event_time(None)
    filled = op.with_event_time("ts")
    assert filled.event_time == "ts" and op.event_time is None
    assert filled.with_event_time("other").event_time == "ts"
    assert filled.spec() == {
        "type": "Top",
        "value": "v",
        "by": [],
        "window": {"kind": "tumbling", "size_ms": 1_000},
        "event_time": "ts",
    }
    assert repr(filled) == "rf.ops.Top(value='v', by=[], event_time='ts', tumbling_s=1)"
    hop = Top("v", by=["a", "b"], hopping_s=(10, 2.5), event_time="ts")
    assert hop.spec()["window"] == {"kind": "hopping", "size_ms": 10_000, "slide_ms": 2_500}
    assert repr(hop) == "rf.ops.Top(value='v', by=['a', 'b'], event_time='ts', hopping_s=(10, 2.5))"
    given = Top("v", window=GIVEN)
    assert given.with_event_time(None) is given and given.with_event_time("ts").event_time is None
    assert given.spec()["window"] == {"kind": "given", "columns": list(GIVEN)}
    assert repr(given) == "rf.ops.Top(value='v', by=[], window=('window_start', 'window_end'))"


def test_check_input_says_what_to_do():
    schema = pa.schema([("k", pa.string()), ("ts", pa.int64()), ("v", pa.float64()), ("s", pa.string())])
    out = top("tumbling", ("k",)).check_input(schema)
    assert out.names == ["window_start", "window_end", "k", "ts", "v", "s"]
    with pytest.raises(InputError, match=r"\['missing'\]"):
        Top("missing", tumbling_s=1, event_time="ts").check_input(schema)
    with pytest.raises(InputError, match=r"\['nope'\]"):
        Top("v", by="nope", tumbling_s=1, event_time="ts").check_input(schema)
    with pytest.raises(InputError, match=r"value column 's' has type string"):
        Top("s", tumbling_s=1, event_time="ts").check_input(schema)
    with pytest.raises(InputError, match=r"'ts' has type string"):
        top("tumbling").check_input(schema.set(1, pa.field("ts", pa.string())))
    with pytest.raises(ConfigError, match="needs an event-time column"):
        Top("v", tumbling_s=1).check_input(schema)
    carried = schema.append(pa.field("window_start", pa.int64())).append(pa.field("window_end", pa.int64()))
    with pytest.raises(InputError, match=r"use Top\(value='v', window=\('window_start', 'window_end'\)\)"):
        top("tumbling").check_input(carried)
    assert Top("v", window=GIVEN).check_input(carried) == carried
    with pytest.raises(InputError, match=r"window= names the columns"):
        Top("v", window=GIVEN).check_input(schema)
    with pytest.raises(InputError, match=r"window column 'window_end' has type string"):
        Top("v", window=GIVEN).check_input(carried.set(5, pa.field("window_end", pa.string())))
    for t in (
        pa.int8(),
        pa.float32(),
        pa.decimal128(10, 2),
        pa.timestamp("us"),
        pa.date32(),
        pa.time64("us"),
    ):
        top("tumbling").check_input(schema.set(2, pa.field("v", t)))
    for t in (pa.duration("s"), pa.float16(), pa.bool_()):
        with pytest.raises(InputError, match=re.escape(f"value column 'v' has type {t};")):
            top("tumbling").check_input(schema.set(2, pa.field("v", t)))


def test_bad_batches_are_input_errors():
    op = top("tumbling")
    with pytest.raises(InputError, match=r"'ts' has 2 null value\(s\)"):
        op.process(op.init_state(), pa.table({"k": ["a"] * 3, "ts": [1, None, None], "v": [1] * 3}))
    with pytest.raises(InputError, match=r"\['v'\]"):
        op.process(op.init_state(), pa.table({"k": ["a"], "ts": [1]}))
    given = Top("v", window=GIVEN)
    bad = pa.table({"window_start": [0, None], "window_end": [10, 10], "v": [1, 2]})
    with pytest.raises(InputError, match=r"window column 'window_start' has 1 null value"):
        given.process(given.init_state(), bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one way"),
        ({"tumbling_s": 1, "window": GIVEN}, "exactly one way"),
        ({"tumbling_s": 0}, "tumbling_s must be a positive number"),
        ({"tumbling_s": 0.0005}, "whole number of milliseconds"),
        ({"tumbling_s": True}, "tumbling_s must be"),
        ({"hopping_s": 5}, r"hopping_s is \(size_s, slide_s\)"),
        ({"hopping_s": (1, 2)}, "slide <= size"),
        ({"window": "window_start"}, r"window= is \(start_column, end_column\)"),
        ({"window": ("a", "a")}, r"window= is \(start_column, end_column\)"),
        ({"window": GIVEN, "event_time": "ts"}, "not used with window="),
        ({"tumbling_s": 1, "event_time": 3}, "event_time must be a column name"),
        ({"tumbling_s": 1, "by": 3}, "by= is a column name"),
        ({"tumbling_s": 1, "by": ["k", "k"]}, "names a column twice"),
        ({"window": GIVEN, "by": "window_start"}, "leave them out of by="),
        ({"tumbling_s": 1, "by": "window_end"}, "leave them out of by="),
    ],
)
def test_bad_arguments_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Top("v", **kwargs)
    with pytest.raises(ConfigError, match="value="):
        Top("", tumbling_s=1)


@pytest.mark.parametrize(
    "values",
    [
        pa.array([1, 3, 3, 2], pa.int8()),
        pa.array([1, 3, 3, 2], pa.float32()),
        pa.array([1, 3, 3, 2], pa.decimal128(10, 2)),
        pa.array([1, 3, 3, 2], pa.int64()).cast(pa.timestamp("us", "UTC")),
        pa.array([1, 3, 3, 2], pa.int32()).cast(pa.date32()),
        pa.array([1, 3, 3, 2], pa.int64()).cast(pa.time64("ns")),
    ],
)
def test_every_accepted_value_type_runs(values):
    op = Top("v", by="g", hopping_s=(2, 1), event_time="ts")
    rows = pa.table({"ts": [0, 100, 1_500, 1_600], "g": ["a", "a", "b", "a"], "v": values})
    s, _ = op.process(op.init_state(), rows)
    s, out = op.on_watermark(s, WATERMARK_END, version=0)
    # windows [-1000, 1000): a's 3; [0, 2000): a's 3, b's 3; [1000, 3000): a's 2, b's 3
    got = sorted((r["window_start"], r["g"], r["ts"]) for r in out.drop_columns(["v"]).to_pylist())
    assert got == [
        (-1_000, "a", 100),
        (0, "a", 100),
        (0, "b", 1_500),
        (1_000, "a", 1_600),
        (1_000, "b", 1_500),
    ]
