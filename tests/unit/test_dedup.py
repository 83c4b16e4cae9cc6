"""rf.ops.Dedup, driven directly (no Ray): against a per-row model of its documented semantics,
against DuckDB, across snapshot/restore, with forced hash collisions, and its state bound."""

from __future__ import annotations

import io
import random
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rayflow.ops.dedup as dedup_mod
from rayflow._internal.checkpoint.commit import with_hash
from rayflow.errors import ConfigError, InputError
from rayflow.ops.base import WATERMARK_END, WATERMARK_NONE
from rayflow.ops.dedup import Dedup
from rayflow.partitioning import hash_table
from rayflow.testing import duckdb_reference as duckdb_query

# ----------------------------------------------------------------------------- helpers


class Model:
    """The class doc's semantics, one row at a time in plain Python (slow, obviously right)."""

    def __init__(self, within_ms: int):
        self.w = within_ms
        self.anchors: dict[tuple, list[int]] = {}
        self.watermark = WATERMARK_NONE
        self.late_rows = 0
        self.duplicates_dropped = 0

    def process(self, keys: list[tuple], ts: list[int]) -> list[int]:
        """The indices (ascending) of the rows kept."""
        kept = []
        for i in sorted(range(len(ts)), key=lambda i: (ts[i], i)):
            k, t = keys[i], ts[i]
            if self.watermark != WATERMARK_NONE and t < self.watermark - self.w:
                self.late_rows += 1
            elif any(abs(t - t0) < self.w for t0 in self.anchors.get(k, [])):
                self.duplicates_dropped += 1
            else:
                self.anchors.setdefault(k, []).append(t)
                kept.append(i)
        return sorted(kept)

    def advance(self, watermark: int) -> None:
        self.watermark = max(self.watermark, watermark)
        for k in list(self.anchors):
            live = [
                t0
                for t0 in self.anchors[k]
                if self.watermark != WATERMARK_END and t0 > self.watermark - 2 * self.w
            ]
            if live:
                self.anchors[k] = live
            else:
                del self.anchors[k]

    def metrics(self) -> dict[str, int]:
        return {
            "late_rows": self.late_rows,
            "duplicates_dropped": self.duplicates_dropped,
            "state_rows": sum(len(v) for v in self.anchors.values()),
        }


def snapshot_restore(op: Dedup, state, pipeline_key: list[str]):
    """What the engine does at a commit and a restore: state_to_table, ``_hash`` over the
    pipeline key, sorted by it, through Parquet, ``_hash`` dropped, state_from_table, then
    advance to the committed watermark (which must emit nothing)."""
    table = with_hash(op.state_to_table(state), pipeline_key)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    restored = op.state_from_table(pq.read_table(io.BytesIO(buf.getvalue())).drop_columns(["_hash"]))
    restored, out = op.on_watermark(restored, state.watermark, version=1)
    assert out is None or out.num_rows == 0
    return restored


def run(
    op: Dedup, batches: list[pa.Table], watermarks: list[int], *, restore_at: int | None = None, key=None
):
    """Process each batch then advance to its watermark; returns (outputs concatenated, state)."""
    state, outs = op.init_state(), []
    for i, (b, wm) in enumerate(zip(batches, watermarks)):
        if i == restore_at:
            state = snapshot_restore(op, state, key or op.by[:1])
        state, out = op.process(state, b)
        assert out.schema == b.schema
        outs.append(out)
        state, emitted = op.on_watermark(state, wm, version=i)
        assert emitted is None
    return pa.concat_tables(outs), state


def retry_stream(
    seed: int,
    *,
    events: int,
    within_ms: int,
    ooo_ms: int,
    max_copies: int = 3,
    id_type: pa.DataType | None = None,
) -> pa.Table:
    """Events with unique ids, each sent 1..max_copies times with event times within the bound
    of the first, arriving shuffled by at most ``ooo_ms`` (a row arrives at most ``ooo_ms`` of
    event time behind the largest seen before it, so none is behind the watermark)."""
    rng = np.random.default_rng(seed)
    base = np.cumsum(rng.integers(0, 40, events)) + 1_700_000_000_000
    copies = rng.integers(1, max_copies + 1, events)
    ids = np.repeat(np.arange(events), copies)
    ts = np.repeat(base, copies) + np.where(
        np.concatenate([[True], np.diff(ids) != 0]), 0, rng.integers(0, within_ms, ids.shape[0])
    )
    arrival = np.argsort(ts + rng.uniform(0, ooo_ms, ts.shape[0]), kind="stable")
    ids, ts = ids[arrival], ts[arrival]
    id_col = pa.array(ids) if id_type is None else pa.array([f"evt-{i}" for i in ids], id_type)
    return pa.table({"id": id_col, "ts": pa.array(ts), "seq": pa.array(np.arange(ids.shape[0]))})


def split(table: pa.Table, seed: int, *, max_rows: int) -> list[pa.Table]:
    rng = random.Random(seed)
    out, i = [], 0
    while i < table.num_rows:
        n = rng.randint(1, max_rows)
        out.append(table.slice(i, n))
        i += n
    return out


def bounded_watermarks(batches: list[pa.Table], ooo_ms: int) -> list[int]:
    """After each batch: the largest event time seen so far minus the out-of-orderness bound."""
    out, seen = [], WATERMARK_NONE
    for b in batches:
        seen = max(seen, int(np.max(b.column("ts").to_numpy())))
        out.append(seen - ooo_ms)
    return out


def keys_of(table: pa.Table, by: list[str]) -> list[tuple]:
    cols = [table.column(c).to_pylist() for c in by]
    return list(zip(*cols))


def assert_matches_model(op: Dedup, batches, watermarks, *, restore_at=None, key=None):
    model = Model(op.within_ms)
    state, outs = op.init_state(), []
    for i, (b, wm) in enumerate(zip(batches, watermarks)):
        if i == restore_at:
            state = snapshot_restore(op, state, key or op.by[:1])
            assert op.metrics(state) == model.metrics()
        keep = model.process(keys_of(b, op.by), b.column(op.event_time).to_pylist())
        state, out = op.process(state, b)
        assert out.to_pylist() == b.take(pa.array(keep, pa.int64())).to_pylist(), f"batch {i}"
        model.advance(wm)
        state, _ = op.on_watermark(state, wm, version=i)
        assert op.metrics(state) == model.metrics(), f"after batch {i}"
        outs.append(out)
    out = pa.concat_tables(outs)
    # the guarantee: no two output rows of one key less than W apart in event time
    seen: dict[tuple, list[int]] = {}
    for k, t in zip(keys_of(out, op.by), out.column(op.event_time).to_pylist()):
        assert all(abs(t - t0) >= op.within_ms for t0 in seen.get(k, [])), (k, t)
        seen.setdefault(k, []).append(t)
    return out, state


# ----------------------------------------------------------------------------- config and input


def test_config_errors():
    with pytest.raises(ConfigError, match="within_s"):
        Dedup("id", within_s=0, event_time="ts")
    with pytest.raises(ConfigError, match="within_s"):
        Dedup("id", within_s=-1, event_time="ts")
    with pytest.raises(ConfigError, match="within_s"):
        Dedup("id", within_s=float("nan"), event_time="ts")
    with pytest.raises(ConfigError, match="one millisecond"):
        Dedup("id", within_s=0.0001, event_time="ts")
    with pytest.raises(ConfigError, match="by="):
        Dedup([], within_s=1, event_time="ts")
    with pytest.raises(ConfigError, match="_rayflow_kept_ms"):
        Dedup(["_rayflow_kept_ms"], within_s=1, event_time="ts")
    with pytest.raises(ConfigError, match="event-time column"):
        Dedup("id", within_s=1).with_event_time(None)
    with pytest.raises(ConfigError, match="event-time column"):
        Dedup("id", within_s=1).check_input(pa.schema([("id", pa.int64())]))


def test_with_event_time_fills_a_copy():
    op = Dedup("id", within_s=1.5)
    filled = op.with_event_time("ts")
    assert filled is not op and filled.event_time == "ts" and op.event_time is None
    assert filled.within_ms == 1500
    own = Dedup("id", within_s=1, event_time="t0")
    assert own.with_event_time("ts") is own
    assert op.uses_event_time and op.stateful and not op.emits_changes
    assert filled.group_columns == ["id"]
    assert filled.spec() == {"type": "Dedup", "by": ["id"], "within_ms": 1500, "event_time": "ts"}
    assert repr(filled) == "rf.ops.Dedup(by=['id'], within_s=1.5, event_time='ts')"


def test_check_input():
    op = Dedup(["id", "region"], within_s=1, event_time="ts")
    schema = pa.schema(
        [
            ("id", pa.int64()),
            ("region", pa.dictionary(pa.int32(), pa.string())),
            ("ts", pa.timestamp("us", "UTC")),
        ]
    )
    assert op.check_input(schema) == schema
    with pytest.raises(InputError, match=r"\['region'\]"):
        op.check_input(pa.schema([("id", pa.int64()), ("ts", pa.int64())]))
    with pytest.raises(InputError, match="'ts' has type double"):
        op.check_input(pa.schema([("id", pa.int64()), ("region", pa.string()), ("ts", pa.float64())]))
    with pytest.raises(InputError, match="'id' has type double"):
        op.check_input(pa.schema([("id", pa.float64()), ("region", pa.string()), ("ts", pa.int64())]))


def test_null_event_time_is_an_input_error():
    op = Dedup("id", within_s=1, event_time="ts")
    with pytest.raises(InputError, match=r"'ts' has 2 null"):
        op.process(op.init_state(), pa.table({"id": [1, 2, 3], "ts": [1, None, None]}))


def test_event_time_out_of_range_is_an_input_error():
    op = Dedup("id", within_s=1, event_time="ts")
    with pytest.raises(InputError, match="2\\*\\*61"):
        op.process(op.init_state(), pa.table({"id": [1], "ts": [2**62]}))
    with pytest.raises(InputError, match="2\\*\\*61"):
        op.process(op.init_state(), pa.table({"id": [1], "ts": pa.array([2**60], pa.timestamp("s"))}))


def test_null_keys_are_one_key():
    op = Dedup(["a", "b"], within_s=0.01, event_time="ts")
    t = pa.table({"a": [None, None, "x", None, ""], "b": [None, None, 1, 1, None], "ts": [0, 5, 0, 1, 2]})
    _, out = op.process(op.init_state(), t)
    assert out.to_pydict() == {"a": [None, "x", None, ""], "b": [None, 1, 1, None], "ts": [0, 0, 1, 2]}


@pytest.mark.parametrize(
    "ts",
    [
        pa.array([1_000, 1_500, 9_000], pa.int64()),
        pa.array([1_000_000, 1_500_000, 9_000_000], pa.timestamp("us", "Europe/Paris")),
        pa.array([1_000_000_999, 1_500_000_000, 9_000_000_000], pa.timestamp("ns")),
        pa.array([1, 1, 9], pa.timestamp("s")),
    ],
)
def test_event_time_types(ts):
    op = Dedup("id", within_s=1, event_time="ts")
    state, out = op.process(op.init_state(), pa.table({"id": ["a", "a", "a"], "ts": ts}))
    assert out.column("ts").cast(pa.int64()).to_pylist() == ts.take([0, 2]).cast(pa.int64()).to_pylist()
    assert op.metrics(state)["duplicates_dropped"] == 1


def test_event_time_must_be_int64_ms_or_a_timestamp():
    op = Dedup("id", within_s=1, event_time="ts")
    with pytest.raises(InputError, match="int64 milliseconds"):
        op.process(op.init_state(), pa.table({"id": ["a"], "ts": pa.array([1], pa.int32())}))


def test_dictionary_and_chunked_keys():
    op = Dedup("k", within_s=1, event_time="ts")
    k = pa.chunked_array([pa.array(["a", "b"]).dictionary_encode(), pa.array(["a", "c"]).dictionary_encode()])
    t = pa.table({"k": k, "ts": pa.chunked_array([[0, 0], [10, 0]])})
    state, out = op.process(op.init_state(), t)
    assert out.column("k").to_pylist() == ["a", "b", "c"]
    state, out = op.process(state, pa.table({"k": pa.array(["a", "d"]).dictionary_encode(), "ts": [500, 0]}))
    assert out.column("k").to_pylist() == ["d"]


# ----------------------------------------------------------------------------- semantics


def test_within_batch_keeps_lowest_event_time_then_arrival():
    op = Dedup("id", within_s=0.01, event_time="ts")
    t = pa.table({"id": [7, 7, 7, 7, 7], "ts": [5, 3, 3, 12, 13], "n": [0, 1, 2, 3, 4]})
    state, out = op.process(op.init_state(), t)
    # 3 (first to arrive at 3) kept; 3, 5, 12 within 10 ms of it; 13 is 10 ms after: a new event.
    assert out.column("n").to_pylist() == [1, 4]
    assert op.metrics(state) == {"late_rows": 0, "duplicates_dropped": 3, "state_rows": 2}


def test_duplicate_bound_is_strict_and_two_sided():
    op = Dedup("id", within_s=0.01, event_time="ts")
    state, _ = op.process(op.init_state(), pa.table({"id": [1], "ts": [100]}))
    state, out = op.process(state, pa.table({"id": [1, 1, 1, 1], "ts": [91, 109, 90, 110]}))
    assert out.column("ts").to_pylist() == [90, 110]
    assert op.metrics(state)["duplicates_dropped"] == 2


def test_late_rows_are_dropped_and_counted():
    op = Dedup("id", within_s=0.01, event_time="ts")
    state, _ = op.process(op.init_state(), pa.table({"id": [1], "ts": [100]}))
    state, _ = op.on_watermark(state, 100, version=1)
    # late below 100 - 10 = 90: a new id at 89 is dropped all the same; 90 is not late.
    state, out = op.process(state, pa.table({"id": [2, 3, 1, 4], "ts": [89, 90, 85, 50]}))
    assert out.to_pydict() == {"id": [3], "ts": [90]}
    assert op.metrics(state) == {"late_rows": 3, "duplicates_dropped": 0, "state_rows": 2}


def test_advance_never_goes_back_and_emits_nothing():
    op = Dedup("id", within_s=0.01, event_time="ts")
    state, _ = op.process(op.init_state(), pa.table({"id": [1, 2], "ts": [100, 200]}))
    state, out = op.on_watermark(state, 200, version=1)
    assert out is None and state.watermark == 200
    state, out = op.on_watermark(state, 150, version=2)
    assert out is None and state.watermark == 200
    # 100 <= 200 - 20: expired; 200 is not.
    assert op.metrics(state)["state_rows"] == 1
    state, out = op.on_watermark(state, WATERMARK_END, version=3)
    assert out is None and op.metrics(state)["state_rows"] == 0


def test_no_false_drop_at_the_expiry_boundary():
    """An id is remembered as long as a row that is not late can match it."""
    op = Dedup("id", within_s=0.01, event_time="ts")
    model = Model(10)
    state = op.init_state()
    for wm, rows in [(WATERMARK_NONE, [(1, 81)]), (100, [(1, 90), (1, 91)]), (111, [(1, 101), (1, 100)])]:
        state, _ = op.on_watermark(state, wm, version=0)
        model.advance(wm)
        ids, ts = [r[0] for r in rows], [r[1] for r in rows]
        state, out = op.process(state, pa.table({"id": ids, "ts": ts}))
        keep = model.process([(i,) for i in ids], ts)
        assert out.column("ts").to_pylist() == [ts[i] for i in keep]
    assert op.metrics(state) == model.metrics()


# ----------------------------------------------------------------------------- against DuckDB


@pytest.mark.parametrize("id_type", [None, pa.string()])
def test_retries_match_duckdb(id_type):
    within_ms, ooo_ms = 200, 100
    events = retry_stream(7, events=5_000, within_ms=within_ms, ooo_ms=ooo_ms, id_type=id_type)
    batches = split(events, 8, max_rows=700)
    op = Dedup("id", within_s=within_ms / 1000, event_time="ts")
    out, state = assert_matches_model(op, batches, bounded_watermarks(batches, ooo_ms))
    per_id = duckdb_query("SELECT id, count(*) AS n FROM out GROUP BY id ORDER BY id", out=out)
    expected = duckdb_query("SELECT DISTINCT id FROM events ORDER BY id", events=events)
    assert per_id.column("id").equals(expected.column("id"))
    assert set(per_id.column("n").to_pylist()) == {1}
    m = op.metrics(state)
    assert m["late_rows"] == 0 and m["duplicates_dropped"] == events.num_rows - out.num_rows


def test_in_order_stream_keeps_the_first_row_per_id_like_sql():
    """Rows arriving in event-time order: the output is SQL's first row per id."""
    within_ms = 300
    events = retry_stream(11, events=3_000, within_ms=within_ms, ooo_ms=0, max_copies=4)
    events = events.take(
        pa.array(np.lexsort((events.column("seq").to_numpy(), events.column("ts").to_numpy())))
    )
    batches = split(events, 12, max_rows=400)
    op = Dedup("id", within_s=within_ms / 1000, event_time="ts")
    out, _ = run(op, batches, bounded_watermarks(batches, 0))
    expected = duckdb_query(
        "SELECT id, ts, seq FROM events QUALIFY row_number() OVER (PARTITION BY id ORDER BY ts, seq) = 1 ORDER BY seq",
        events=events,
    )
    assert out.select(["id", "ts", "seq"]).to_pylist() == expected.to_pylist()


# ----------------------------------------------------------------------------- checkpoints


def test_snapshot_restore_mid_stream_gives_the_same_result():
    within_ms, ooo_ms = 200, 150
    events = retry_stream(3, events=4_000, within_ms=within_ms, ooo_ms=ooo_ms)
    events = events.append_column(
        "region", pa.array(np.array(["eu", "us", None])[np.arange(events.num_rows) % 3])
    )
    batches = split(events, 4, max_rows=500)
    wms = bounded_watermarks(batches, ooo_ms)
    op = Dedup(["id", "region"], within_s=within_ms / 1000, event_time="ts")
    straight, s1 = run(op, batches, wms)
    for at in (1, len(batches) // 2, len(batches) - 1):
        resumed, s2 = run(op, batches, wms, restore_at=at, key=["id"])
        assert resumed.equals(straight)
        assert op.metrics(s2) == op.metrics(s1)


def test_restore_of_an_empty_state_keeps_watermark_and_counters():
    op = Dedup("id", within_s=0.01, event_time="ts")
    state, _ = op.process(op.init_state(), pa.table({"id": [1, 1], "ts": [0, 1]}))
    state, _ = op.on_watermark(state, 1_000, version=1)
    state, _ = op.process(state, pa.table({"id": [2], "ts": [0]}))
    restored = snapshot_restore(op, state, ["id"])
    assert restored.num_rows == 0 and restored.watermark == 1_000
    assert op.metrics(restored) == {"late_rows": 1, "duplicates_dropped": 1, "state_rows": 0}


# ----------------------------------------------------------------------------- state bound


def test_state_is_bounded_as_the_watermark_moves():
    within_ms, ooo_ms = 500, 200
    rate_per_ms = 2
    op = Dedup("id", within_s=within_ms / 1000, event_time="ts")
    state = op.init_state()
    rng = np.random.default_rng(5)
    peak = 0
    for step in range(200):
        ts = step * 100 + rng.integers(0, 100, 100 * rate_per_ms)
        ids = np.arange(ts.shape[0]) + step * 1_000_000
        state, out = op.process(state, pa.table({"id": ids, "ts": ts}))
        assert out.num_rows == ts.shape[0]
        state, _ = op.on_watermark(state, int(ts.max()) - ooo_ms, version=step)
        peak = max(peak, op.metrics(state)["state_rows"])
        # held rows: the live ones, plus at most a quarter of each segment expired, not yet dropped
        assert state.num_rows <= op.metrics(state)["state_rows"] * 4 / 3 + len(state.segments)
    # live ids: event times in (watermark - 2W, max seen] = 2W + ooo + one batch's spread
    assert peak <= (2 * within_ms + ooo_ms + 100) * rate_per_ms
    state, _ = op.on_watermark(state, WATERMARK_END, version=999)
    assert op.metrics(state)["state_rows"] == 0 and state.num_rows == 0


def test_expiry_drops_or_compacts_segments_and_stays_exact():
    op = Dedup("id", within_s=0.01, event_time="ts")
    n = 100_000
    state, _ = op.process(op.init_state(), pa.table({"id": np.arange(n), "ts": np.arange(n) // 1_000}))
    seg0 = state.segments[0]
    state, _ = op.on_watermark(state, 30, version=1)  # expires ts <= 10: 11% of the rows, left in place
    assert state.segments == (seg0,) and op.metrics(state)["state_rows"] == n - 11_000
    # 5 (ts 0) has expired: not a duplicate; 30_000 (ts 30) is one; ts 15 is late (< 30 - 10).
    state, out = op.process(state, pa.table({"id": [5, 30_000, 6], "ts": [35, 35, 15]}))
    assert out.to_pydict() == {"id": [5], "ts": [35]}
    assert op.metrics(state) == {"late_rows": 1, "duplicates_dropped": 1, "state_rows": n - 11_000 + 1}
    assert [s.num_rows for s in state.segments] == [n, 1]
    # expires ts <= 35: 36% of the first segment (rewritten without them), all of the second (dropped)
    state, _ = op.on_watermark(state, 55, version=2)
    assert [s.num_rows for s in state.segments] == [n - 36_000]
    assert op.metrics(state)["state_rows"] == n - 36_000 and state.segments[0].min_kept == 36
    state, out = op.process(state, pa.table({"id": [45_000, 5, 41_000], "ts": [50, 50, 50]}))
    assert out.to_pydict() == {"id": [5], "ts": [50]}
    restored = snapshot_restore(op, state, ["id"])
    assert op.metrics(restored) == op.metrics(state)


def test_small_batches_on_a_large_state_stay_in_few_segments():
    op = Dedup("id", within_s=10, event_time="ts")
    state, _ = op.process(
        op.init_state(), pa.table({"id": np.arange(100_000), "ts": np.zeros(100_000, np.int64)})
    )
    for i in range(300):
        state, out = op.process(state, pa.table({"id": [i, 1_000_000 + i], "ts": [1, 1]}))
        assert out.column("id").to_pylist() == [1_000_000 + i]
        sizes = [s.num_rows for s in state.segments]
        assert all(a > 2 * b for a, b in zip(sizes, sizes[1:])) and len(sizes) <= 10
    assert op.metrics(state)["state_rows"] == 100_300 and state.segments[0].num_rows == 100_000


# ----------------------------------------------------------------------------- hash collisions


def colliding(bits: int):
    """A hash_table keeping only ``bits`` bits of the real hash (spread over the 64), so that
    distinct keys collide, in the state and within a batch."""
    shift = np.uint64(64 - bits)

    def fake(table, key):
        return (hash_table(table, key) >> shift) << shift

    return mock.patch.object(dedup_mod, "hash_table", fake)


@pytest.mark.parametrize("bits", [0, 2, 33])
def test_a_hash_collision_never_drops_a_distinct_key(bits):
    within_ms, ooo_ms = 100, 50
    events = retry_stream(21, events=600, within_ms=within_ms, ooo_ms=ooo_ms, id_type=pa.string())
    batches = split(events, 22, max_rows=90)
    op = Dedup("id", within_s=within_ms / 1000, event_time="ts")
    with colliding(bits):
        out, _ = assert_matches_model(op, batches, bounded_watermarks(batches, ooo_ms), restore_at=3)
    assert sorted(out.column("id").to_pylist()) == sorted(set(events.column("id").to_pylist()))


def test_a_constructed_state_collision_keeps_the_row():
    """Two keys with one hash, one in the state: the other is not a duplicate of it."""
    op = Dedup("id", within_s=1, event_time="ts")
    with mock.patch.object(dedup_mod, "hash_table", lambda t, k: np.full(t.num_rows, 42, np.uint64)):
        state, _ = op.process(op.init_state(), pa.table({"id": ["a"], "ts": [0]}))
        state, out = op.process(state, pa.table({"id": ["b", "a", "b"], "ts": [1, 2, 3]}))
    assert out.to_pydict() == {"id": ["b"], "ts": [1]}


# ----------------------------------------------------------------------------- properties

keys_st = st.tuples(st.sampled_from(["a", "b", "", None]), st.sampled_from([0, 1, -1, None]))


@st.composite
def streams(draw):
    n = draw(st.integers(0, 60))
    rows = draw(st.lists(st.tuples(keys_st, st.integers(-30, 60)), min_size=n, max_size=n))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=6)))
    batches = [rows[a:b] for a, b in zip([0] + cuts, cuts + [n])]
    steps = draw(st.lists(st.integers(-5, 25), min_size=len(batches), max_size=len(batches)))
    return batches, steps


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream=streams(),
    within_ms=st.integers(1, 20),
    restore_at=st.none() | st.integers(0, 6),
    collide_bits=st.sampled_from([None, 0, 1, 40]),
)
def test_property_equals_the_per_row_model(stream, within_ms, restore_at, collide_bits):
    batches, steps = stream
    tables = [
        pa.table(
            {
                "k": pa.array([r[0][0] for r in b], pa.string()),
                "j": pa.array([r[0][1] for r in b], pa.int32()),
                "ts": pa.array([r[1] for r in b], pa.int64()),
            }
        )
        for b in batches
    ]
    wm, wms = WATERMARK_NONE, []
    for s in steps:  # the watermark starts somewhere, then moves by the step (or stays)
        wm = s if wm == WATERMARK_NONE else wm + max(s, 0)
        wms.append(wm)
    op = Dedup(["k", "j"], within_s=within_ms / 1000, event_time="ts")
    if collide_bits is None:
        assert_matches_model(op, tables, wms, restore_at=restore_at, key=["k"])
    else:
        with colliding(collide_bits):
            assert_matches_model(op, tables, wms, restore_at=restore_at, key=["k"])


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    events=st.integers(1, 300),
    within_ms=st.integers(1, 200),
    ooo_ms=st.integers(0, 300),
    max_rows=st.integers(1, 200),
)
def test_property_retries_appear_once_whatever_the_split_and_shuffle(
    seed, events, within_ms, ooo_ms, max_rows
):
    """Copies of an event within the bound, arriving shuffled within the out-of-orderness
    bound, split into any batches: each id comes out exactly once, and nothing is late."""
    table = retry_stream(seed, events=events, within_ms=within_ms, ooo_ms=ooo_ms)
    batches = split(table, seed, max_rows=max_rows)
    op = Dedup("id", within_s=within_ms / 1000, event_time="ts")
    out, state = run(op, batches, bounded_watermarks(batches, ooo_ms))
    ids = out.column("id").to_numpy()
    assert np.array_equal(np.sort(ids), np.arange(events))
    assert op.metrics(state)["late_rows"] == 0


def test_long_chains_in_one_batch():
    """One key, many rows in one batch, spaced around the bound: the greedy chain is exact
    (pointer doubling), and the overflow-safe fallback agrees."""
    rng = np.random.default_rng(1)
    ts = np.cumsum(rng.integers(0, 8, 5_000))
    ids = rng.integers(0, 3, ts.shape[0])
    t = pa.table({"id": ids, "ts": ts}).take(pa.array(rng.permutation(ts.shape[0])))
    op = Dedup("id", within_s=0.01, event_time="ts")
    model = Model(10)
    keep = model.process(keys_of(t, ["id"]), t.column("ts").to_pylist())
    _, out = op.process(op.init_state(), t)
    assert out.equals(t.take(pa.array(keep)))
    group_start = np.ones(ts.shape[0], dtype=bool)
    group_start[1:] = False
    assert np.array_equal(
        dedup_mod._greedy_chains(ts, group_start, 10), dedup_mod._greedy_rounds(ts, group_start, 10)
    )
