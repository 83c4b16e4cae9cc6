"""rf.ops.Join without Ray (DESIGN §12): the operator driven batch by batch over multi-input tables,
watermark by watermark, snapshotted and restored mid-stream, and compared with DuckDB SQL over the
same rows."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rayflow.errors import ConfigError, InputError, UnsupportedKeyTypeError
from rayflow.ops import Join
from rayflow.ops.base import WATERMARK_END
from rayflow.ops.join import INPUTS_METADATA, SOURCE_COLUMN, input_columns, join_key_type
from rayflow.testing import assert_same_rows, duckdb_reference

AUCTION = pa.schema([("id", pa.int64()), ("seller", pa.int64()), ("ts", pa.int64()), ("price", pa.float64())])
PERSON = pa.schema([("id", pa.int64()), ("name", pa.string()), ("ts", pa.int64())])
#: The output of auction ⋈ person: the auction's columns, then the person's (clashes suffixed).
OUT = ["id", "seller", "ts", "price", "id_person", "name", "ts_person"]


# ---------------------------------------------------------------------------------- inputs
def union(parts: list[tuple[str, pa.Table]], *, metadata: bool = True) -> pa.Table:
    """Rows of several inputs as the pipeline hands them to operators: the union of their
    columns (first occurrence gives the position), nulls where an input lacks a column, the
    input's name in ``_source``, each input's own columns in the schema metadata. ``parts``
    are (input, rows) in arrival order."""
    fields: dict[str, pa.Field] = {}
    own: dict[str, list[str]] = {}
    for name, t in parts:
        own.setdefault(name, t.column_names)
        for f in t.schema:
            fields.setdefault(f.name, f)
    schema = pa.schema([*fields.values(), pa.field(SOURCE_COLUMN, pa.string())])
    tables = []
    for name, t in parts:
        n = t.num_rows
        cols = [
            t.column(f.name) if f.name in t.column_names else pa.nulls(n, f.type) for f in fields.values()
        ]
        tables.append(pa.Table.from_arrays([*cols, pa.array([name] * n, pa.string())], schema=schema))
    out = pa.concat_tables(tables) if tables else schema.empty_table()
    if metadata:
        out = out.replace_schema_metadata({INPUTS_METADATA: json.dumps(own).encode()})
    return out


def stream(
    seed: int, n: int = 1_200, keys: int = 25, rate_ms: float = 20.0, bound_ms: int = 1_500
) -> pa.Table:
    """Auctions and persons interleaved in arrival order; event times lag the arrival clock by at
    most ``bound_ms`` (so with that out-of-orderness no row is late). Some sellers are null."""
    rng = np.random.default_rng(seed)
    clock = np.cumsum(rng.exponential(rate_ms, n)).astype(np.int64) + 1_000_000
    ts = clock - rng.integers(0, bound_ms + 1, n)
    is_auction = rng.random(n) < 0.55
    seller = pa.array(rng.integers(0, keys, n))
    seller = pc.if_else(pa.array(rng.random(n) < 0.05), pa.nulls(n, pa.int64()), seller)
    auctions = pa.table(
        {
            "id": pa.array(np.arange(n) + 10_000),
            "seller": seller,
            "ts": pa.array(ts),
            "price": pa.array(rng.integers(1, 1_000, n).astype(np.float64)),
        }
    ).filter(pa.array(is_auction))
    persons = pa.table(
        {
            "id": pa.array(rng.integers(0, keys, n)),
            "name": pa.array([f"p{i}" for i in range(n)]),
            "ts": pa.array(ts),
        }
    ).filter(pa.array(~is_auction))
    # Arrival order: by clock position (each row keeps its place in the interleaving).
    order = np.argsort(
        np.concatenate([np.flatnonzero(is_auction), np.flatnonzero(~is_auction)]), kind="stable"
    )
    rows = union([("auction", auctions), ("person", persons)])
    return rows.take(pa.array(order))


def side(rows: pa.Table, name: str, schema: pa.Schema) -> pa.Table:
    return rows.filter(pc.equal(rows[SOURCE_COLUMN], name)).select(schema.names)


def reference(op: Join, rows: pa.Table) -> pa.Table:
    """The join in DuckDB SQL over all rows (auction ⋈ person on seller = id)."""
    spec = op.spec()["join"]
    if spec["kind"] == "interval":
        cond = f"r.ts BETWEEN l.ts + {spec['lower_ms']} AND l.ts + {spec['upper_ms']}"
        win = ""
    else:
        size = spec["size_ms"]
        cond = f"floor(l.ts / {size}) = floor(r.ts / {size})"
        win = (
            f"floor(l.ts / {size})::BIGINT * {size} AS window_start, "
            f"floor(l.ts / {size})::BIGINT * {size} + {size} AS window_end, "
        )
    on = f"l.seller = r.id AND {cond}"
    if op.how == "semi":
        sql = f"SELECT {win}l.* FROM L l WHERE EXISTS (SELECT 1 FROM R r WHERE {on})"
    else:
        kind = "JOIN" if op.how == "inner" else "LEFT JOIN"
        sql = (
            f"SELECT {win}l.id, l.seller, l.ts, l.price, r.id AS id_person, r.name, r.ts AS ts_person "
            f"FROM L l {kind} R r ON {on}"
        )
    return duckdb_reference(sql, L=side(rows, "auction", AUCTION), R=side(rows, "person", PERSON))


def snapshot_round_trip(op: Join, state):
    """What the engine does at a commit and a restore: the state table with a hash column, rows
    reordered by it, through Parquet (which keeps the schema metadata), the hash dropped."""
    table = op.state_to_table(state)
    rng = np.random.default_rng(table.num_rows)
    hashed = table.append_column("_hash", pa.array(rng.integers(0, 2**62, table.num_rows), pa.int64()))
    buf = io.BytesIO()
    pq.write_table(hashed.sort_by("_hash"), buf)
    return op.state_from_table(pq.read_table(io.BytesIO(buf.getvalue())).drop_columns(["_hash"]))


class Driver:
    """Drives one operator as the chain does: process each batch, then advance to the
    partition's watermark (the largest event time so far minus ``bound_ms``)."""

    def __init__(self, op: Join, *, bound_ms: int):
        self.op, self.bound_ms = op, bound_ms
        self.state = op.init_state()
        self.outputs: list[pa.Table] = []
        self.max_ts: int | None = None
        self.watermark = None

    def feed(self, batch: pa.Table) -> None:
        self.state, out = self.op.process(self.state, batch)
        self._keep(out)
        if batch.num_rows:
            ts = batch[self.op.event_time]
            if pa.types.is_timestamp(ts.type):
                ts = ts.cast(pa.timestamp("ms", ts.type.tz)).cast(pa.int64())
            self.max_ts = max(self.max_ts or -(2**62), int(pc.max(ts).as_py()))
            self.advance(self.max_ts - self.bound_ms)

    def advance(self, watermark: int) -> None:
        self.state, out = self.op.on_watermark(self.state, watermark, version=0)
        self.watermark = watermark
        self._keep(out)

    def _keep(self, out: pa.Table | None) -> None:
        if out is not None:
            assert out.num_rows > 0, "an operator returned an empty table instead of None"
            self.outputs.append(out)

    def restore(self) -> None:
        """Snapshot and restore; advancing the restored state to the same watermark emits nothing."""
        self.state = snapshot_round_trip(self.op, self.state)
        if self.watermark is not None:
            state, out = self.op.on_watermark(self.state, self.watermark, version=0)
            assert out is None, f"a restored state emitted {out.num_rows} row(s) again"
            self.state = state

    def end(self) -> pa.Table:
        self.advance(WATERMARK_END)
        assert self.op.metrics(self.state)["state_rows"] == 0
        return self.output()

    def output(self) -> pa.Table:
        schema = self.op.check_input(self._schema)
        for o in self.outputs:
            assert o.schema == schema, (o.schema, schema)
        return pa.concat_tables(self.outputs) if self.outputs else schema.empty_table()


def cut(rows: pa.Table, seed: int, pieces: int) -> list[pa.Table]:
    """``rows`` cut at random points into ``pieces`` batches (some may be empty)."""
    rng = np.random.default_rng(seed)
    points = np.sort(rng.integers(0, rows.num_rows + 1, pieces - 1))
    bounds = [0, *points.tolist(), rows.num_rows]
    return [rows.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]


def run(op: Join, rows: pa.Table, batches: list[pa.Table], *, bound_ms: int, restore_at=()) -> Driver:
    d = Driver(op, bound_ms=bound_ms)
    d._schema = rows.schema
    for i, b in enumerate(batches):
        d.feed(b)
        if i in restore_at:
            d.restore()
    d.end()
    return d


def join(how: str, kind: str = "interval", **kw) -> Join:
    shape = {"within_s": (-1.0, 2.0)} if kind == "interval" else {"tumbling_s": 1.0}
    return Join("auction", "person", on=("seller", "id"), how=how, event_time="ts", **shape, **kw)


# ---------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", ["interval", "window"])
@pytest.mark.parametrize("how", ["inner", "left", "semi"])
@pytest.mark.parametrize("pieces", [1, 7, 60])
def test_output_equals_sql_with_restores(kind, how, pieces):
    rows = stream(seed=pieces * 3 + len(how))
    op = join(how, kind)
    d = run(op, rows, cut(rows, pieces, pieces), bound_ms=1_500, restore_at={2, 5, 30})
    out = d.output()
    expected = reference(op, rows)
    assert out.num_rows > 0 and out.num_rows == expected.num_rows
    assert_same_rows(out, expected)
    assert op.metrics(d.state)["late_rows"] == 0  # within the bound nothing is late
    if how == "semi":  # each left row at most once
        assert pc.count_distinct(out["id"]).as_py() == out.num_rows


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    pieces=st.integers(1, 40),
    restore=st.sets(st.integers(0, 40), max_size=3),
    shape=st.sampled_from(
        [("interval", "inner"), ("interval", "left"), ("window", "semi"), ("window", "left")]
    ),
)
def test_any_batching_gives_the_sql_result(seed, pieces, restore, shape):
    kind, how = shape
    rows = stream(seed=seed, n=300, keys=8)
    op = join(how, kind)
    d = run(op, rows, cut(rows, seed, pieces), bound_ms=1_500, restore_at=restore)
    assert_same_rows(d.output(), reference(op, rows))


@pytest.mark.parametrize("within", [(0.0, 0.0), (-3.0, -0.5), (0.5, 4.0)])
def test_interval_bounds_one_sided_and_exact(within):
    rows = stream(seed=11, n=800, keys=10)
    op = Join("auction", "person", on=("seller", "id"), within_s=within, how="left", event_time="ts")
    d = run(op, rows, cut(rows, 4, 25), bound_ms=1_500, restore_at={10})
    assert_same_rows(d.output(), reference(op, rows))


def test_pairs_are_emitted_as_soon_as_both_rows_are_in():
    op = join("inner")
    rows = union(
        [
            ("auction", pa.table({"id": [1], "seller": [7], "ts": [10_000], "price": [1.0]}, schema=AUCTION)),
            ("person", pa.table({"id": [7], "name": ["ann"], "ts": [10_500]}, schema=PERSON)),
        ]
    )
    d = Driver(op, bound_ms=60_000)
    d._schema = rows.schema
    d.feed(rows.slice(0, 1))
    assert d.outputs == []
    d.feed(rows.slice(1, 1))  # the watermark is far behind: emitted by process, not at a purge
    assert [r["name"] for r in d.output().to_pylist()] == ["ann"]


# ---------------------------------------------------------------------------------- state
def test_state_is_purged_as_the_watermark_passes_each_rows_bound():
    op = join("left")  # left rows kept until wm > t + 2000, right rows until wm > t + 1000
    rows = union(
        [
            (
                "auction",
                pa.table(
                    {"id": [1, 2], "seller": [7, 8], "ts": [0, 5_000], "price": [1.0, 2.0]}, schema=AUCTION
                ),
            ),
            ("person", pa.table({"id": [7], "name": ["ann"], "ts": [0]}, schema=PERSON)),
        ]
    )
    d = Driver(op, bound_ms=10_000)
    d._schema = rows.schema
    d.feed(rows)
    assert op.metrics(d.state)["state_rows"] == 3
    d.advance(1_000)
    assert op.metrics(d.state)["state_rows"] == 3  # wm = R.t - lower: still kept
    d.advance(1_001)
    assert op.metrics(d.state)["state_rows"] == 2  # the person is gone
    d.advance(2_001)
    assert op.metrics(d.state)["state_rows"] == 1  # auction 1 (matched: nothing more to emit)
    assert [r["id"] for r in d.output().to_pylist()] == [1]
    d.advance(7_001)
    assert op.metrics(d.state)["state_rows"] == 0
    out = d.output().to_pylist()
    assert [(r["id"], r["name"]) for r in out] == [(1, "ann"), (2, None)]  # unmatched at its bound


def test_window_join_emits_when_the_window_closes():
    op = join("inner", "window")
    rows = union(
        [
            (
                "auction",
                pa.table(
                    {"id": [1, 2], "seller": [7, 7], "ts": [100, 1_100], "price": [1.0, 2.0]}, schema=AUCTION
                ),
            ),
            ("person", pa.table({"id": [7, 7], "name": ["a", "b"], "ts": [900, 1_999]}, schema=PERSON)),
        ]
    )
    d = Driver(op, bound_ms=10_000)
    d._schema = rows.schema
    d.feed(rows)
    assert op.metrics(d.state) == {"state_rows": 4, "late_rows": 0, "open_windows": 2}
    d.advance(999)
    assert d.outputs == []
    d.advance(1_000)  # [0, 1000) closes
    assert [(r["window_start"], r["id"], r["name"]) for r in d.output().to_pylist()] == [(0, 1, "a")]
    assert op.metrics(d.state) == {"state_rows": 2, "late_rows": 0, "open_windows": 1}
    d.end()
    assert [(r["window_end"], r["id"], r["name"]) for r in d.output().to_pylist()][1:] == [(2_000, 2, "b")]


@pytest.mark.parametrize("kind", ["interval", "window"])
def test_late_rows_are_counted_and_dropped(kind):
    op = join("left", kind)
    early = union(
        [
            ("auction", AUCTION.empty_table()),
            ("person", pa.table({"id": [7], "name": ["ann"], "ts": [50_000]}, schema=PERSON)),
        ]
    )
    d = Driver(op, bound_ms=0)
    d._schema = early.schema
    d.feed(early)  # watermark 50 000
    late = union(
        [
            (
                "auction",
                pa.table(
                    {"id": [1, 2], "seller": [7, 7], "ts": [10_000, 50_000], "price": [1.0, 2.0]},
                    schema=AUCTION,
                ),
            ),
            ("person", pa.table({"id": [7], "name": ["bob"], "ts": [49_999]}, schema=PERSON)),
        ]
    )
    d.feed(late)
    assert op.metrics(d.state)["late_rows"] == 2  # auction 1 and bob; auction 2 is on time
    out = d.end().to_pylist()
    assert sorted((r["id"], r["name"]) for r in out) == [(2, "ann")]
    restored = snapshot_round_trip(op, d.state)
    assert op.metrics(restored)["late_rows"] == 2


def test_null_keys_never_match_but_left_outer_emits_them():
    rows = union(
        [
            (
                "auction",
                pa.table(
                    {"id": [1, 2], "seller": [None, 7], "ts": [0, 0], "price": [1.0, 2.0]}, schema=AUCTION
                ),
            ),
            ("person", pa.table({"id": [None, 7], "name": ["nobody", "ann"], "ts": [0, 0]}, schema=PERSON)),
        ]
    )
    for kind in ("interval", "window"):
        got = {}
        for how in ("inner", "left", "semi"):
            d = run(join(how, kind), rows, [rows], bound_ms=0)
            got[how] = sorted((r["id"], r.get("name")) for r in d.output().to_pylist())
        assert got == {"inner": [(2, "ann")], "left": [(1, None), (2, "ann")], "semi": [(2, None)]}


def test_empty_state_round_trips_with_a_stable_schema():
    op = join("left")
    fresh = snapshot_round_trip(op, op.init_state())
    assert op.metrics(fresh)["state_rows"] == 0
    rows = stream(seed=1, n=50)
    d = run(op, rows, [rows], bound_ms=1_500)
    emptied = op.state_to_table(d.state)  # everything purged at the end
    assert emptied.num_rows == 0
    again = op.state_to_table(snapshot_round_trip(op, d.state))
    assert again.schema.remove_metadata() == emptied.schema.remove_metadata()
    busy = op.state_to_table(op.process(op.init_state(), rows)[0])
    assert busy.num_rows > 0 and busy.schema.remove_metadata() == emptied.schema.remove_metadata()


def test_a_restored_state_continues_without_seeing_a_batch_first():
    """A restore, then only watermarks: the unmatched left rows and closed windows still come out
    (the layout travels with the snapshot)."""
    for kind in ("interval", "window"):
        op = join("left", kind)
        rows = stream(seed=5, n=200)
        d = Driver(op, bound_ms=1_500)
        d._schema = rows.schema
        d.feed(rows)
        d.restore()
        d.end()
        assert_same_rows(d.output(), reference(op, rows))


# ---------------------------------------------------------------------------------- inputs
def test_rows_of_other_inputs_are_ignored_and_a_self_join_works():
    bids = pa.table({"auction": [1, 1, 2], "ts": [0, 10, 20], "bidder": ["x", "y", "z"]})
    rows = stream(seed=2, n=300)
    # A third input ("bid") in the union: its rows are ignored.
    auctions, persons = side(rows, "auction", AUCTION), side(rows, "person", PERSON)
    three = union([("auction", auctions), ("person", persons), ("bid", bids)])
    source = rows[SOURCE_COLUMN].to_numpy(zero_copy_only=False)
    arrival = np.concatenate([np.flatnonzero(source == "auction"), np.flatnonzero(source == "person")])
    order = np.concatenate([np.argsort(arrival), np.arange(bids.num_rows) + rows.num_rows])
    three = three.take(pa.array(order))  # the two inputs in their order, then the bids
    op = join("inner")
    d = run(op, three, cut(three, 3, 9), bound_ms=1_500)
    assert_same_rows(d.output(), reference(op, rows))
    # A self-join: each bid with the bids of its auction within 10 ms after it (itself included).
    self_op = Join("bid", "bid", on="auction", within_s=(0, 0.01), event_time="ts")
    bid_rows = union([("bid", bids)])
    out = run(self_op, bid_rows, [bid_rows.slice(0, 1), bid_rows.slice(1)], bound_ms=0).output()
    assert out.column_names == ["auction", "ts", "bidder", "auction_bid", "ts_bid", "bidder_bid"]
    pairs = sorted((r["bidder"], r["bidder_bid"]) for r in out.to_pylist())
    assert pairs == [("x", "x"), ("x", "y"), ("y", "y"), ("z", "z")]


def test_any_column_type_rides_along_and_keys_of_different_widths_compare():
    left = pa.table(
        {
            "k": pa.array(["a", "b", None], pa.large_string()),
            "t": pa.array([0, 1_000, 2_000], pa.timestamp("ms", "UTC")),
            "tags": pa.array([[1], [2, 3], []]),
            "meta": pa.array([{"x": 1}, {"x": 2}, {"x": 3}]),
        }
    )
    right = pa.table(
        {
            "name": pa.array(["a", "b", "b"]).dictionary_encode(),
            "t": pa.array([0, 1_500, 9_000], pa.timestamp("ms", "UTC")),
        }
    )
    rows = union([("l", left), ("r", right)])
    op = Join("l", "r", on=("k", "name"), tumbling_s=2, how="left", event_time="t")
    out = run(op, rows, [rows], bound_ms=0).output()
    assert out.schema.field("window_start").type == pa.timestamp("ms", "UTC")
    got = sorted(((r["k"] or ""), r["tags"], r["meta"]["x"], r["name"]) for r in out.to_pylist())
    assert got == [("", [], 3, None), ("a", [1], 1, "a"), ("b", [2, 3], 2, "b")]
    assert join_key_type(pa.int32(), pa.uint16()) == pa.int64()
    assert join_key_type(pa.string(), pa.large_string()) == pa.large_string()
    assert join_key_type(pa.int64(), pa.string()) is None


def test_output_columns_from_the_metadata_or_named():
    rows = stream(seed=3, n=100)
    op = join("inner")
    assert op.check_input(rows.schema).names == OUT
    assert join("semi").check_input(rows.schema).names == ["id", "seller", "ts", "price"]
    assert join("semi", "window").check_input(rows.schema).names == [
        "window_start",
        "window_end",
        "id",
        "seller",
        "ts",
        "price",
    ]
    named = join("inner", left_columns=["id", "price"], right_columns=["name"])
    assert named.check_input(rows.schema).names == ["id", "price", "name"]
    out = run(named, rows, [rows], bound_ms=1_500).output()
    assert_same_rows(out, reference(op, rows).select(["id", "price", "name"]))
    # Without the metadata (a Map dropped it) each side's columns are all columns but _source.
    bare = rows.schema.remove_metadata()
    assert op.check_input(bare).names == [
        "id",
        "seller",
        "ts",
        "price",
        "name",
        "id_person",
        "seller_person",
        "ts_person",
        "price_person",
        "name_person",
    ]
    assert input_columns(bare) is None
    assert input_columns(rows.schema) == {"auction": AUCTION.names, "person": PERSON.names}


@pytest.mark.parametrize(
    ("schema_change", "error", "match"),
    [
        (lambda s: s.remove(s.get_field_index(SOURCE_COLUMN)), InputError, "_source"),
        (
            lambda s: s.with_metadata({INPUTS_METADATA: b'{"auction": ["id"], "bid": []}'}),
            InputError,
            "'person'",
        ),
        (
            lambda s: s.set(s.get_field_index("seller"), pa.field("seller", pa.string())),
            InputError,
            "cannot be compared",
        ),
        (
            lambda s: s.set(s.get_field_index("seller"), pa.field("seller", pa.float64())),
            UnsupportedKeyTypeError,
            "seller",
        ),
        (lambda s: s.set(s.get_field_index("ts"), pa.field("ts", pa.string())), InputError, "event-time"),
        (lambda s: s.with_metadata({INPUTS_METADATA: b"[1]"}), InputError, "JSON"),
    ],
)
def test_check_input_refuses_what_cannot_be_joined(schema_change, error, match):
    schema = stream(seed=0, n=10).schema
    with pytest.raises(error, match=match):
        join("inner").check_input(schema_change(schema))


def test_check_input_refuses_clashing_output_names():
    schema = union(
        [
            ("auction", pa.table({"seller": [1], "ts": [0], "window_start": [0]})),
            ("person", pa.table({"id": [1], "ts": [0], "seller_person": [0], "seller": [0]})),
        ]
    ).schema
    with pytest.raises(InputError, match="window join adds itself"):
        join("inner", "window").check_input(schema)
    with pytest.raises(InputError, match="'seller_person'"):
        join("inner").check_input(schema)


def test_config_errors():
    with pytest.raises(ConfigError, match="exactly one"):
        Join("a", "b", on="k")
    with pytest.raises(ConfigError, match="exactly one"):
        Join("a", "b", on="k", within_s=(0, 1), tumbling_s=1)
    with pytest.raises(ConfigError, match="lower > upper"):
        Join("a", "b", on="k", within_s=(2, 1))
    with pytest.raises(ConfigError, match="how"):
        Join("a", "b", on="k", within_s=(0, 1), how="outer")
    with pytest.raises(ConfigError, match="on="):
        Join("a", "b", on=(["x", "y"], ["z"]), within_s=(0, 1))
    with pytest.raises(ConfigError, match="tumbling_s"):
        Join("a", "b", on="k", tumbling_s=0)
    with pytest.raises(ConfigError, match="semi"):
        Join("a", "b", on="k", within_s=(0, 1), how="semi", right_columns=["x"])
    with pytest.raises(ConfigError, match="event-time"):
        Join("a", "b", on="k", within_s=(0, 1)).with_event_time(None)
    assert Join("a", "b", on="k", within_s=(0, 1)).with_event_time("ts").event_time == "ts"


def test_partitioning_check_and_pickling():
    op = join("left")
    op.check_partitioning({"auction": ["seller"], "person": ["id"]})
    with pytest.raises(ConfigError, match="different partitions"):
        op.check_partitioning({"auction": ["id"], "person": ["id"]})
    two = Join("a", "b", on=(["x", "y"], ["u", "v"]), within_s=(0, 1))
    two.check_partitioning({"a": ["y"], "b": ["v"]})
    with pytest.raises(ConfigError, match="different partitions"):
        two.check_partitioning({"a": ["x"], "b": ["v"]})
    rows = stream(seed=9, n=200)
    op.check_input(rows.schema)
    copy = pickle.loads(pickle.dumps(op))
    assert copy.spec() == op.spec() and repr(copy) == repr(op)
    assert_same_rows(run(copy, rows, [rows], bound_ms=1_500).output(), reference(op, rows))


def test_in_a_chain_after_a_filter_the_end_of_input_emits_the_rest():
    """The chain keeps the multi-input metadata through a Filter and ends event-time operators by
    advancing them to the end of time (``Chain.finish``), which emits the open windows once."""
    from rayflow._internal.chain import Chain
    from rayflow.ops import Filter

    rows = stream(seed=8, n=600)
    op = join("left", "window")
    chain = Chain([Filter(pc.field("ts") > 1_003_000), op])
    chain.check_input(rows.schema)
    states, outs, max_ts = chain.init_states(), [], None
    for b in cut(rows, 8, 12):
        outs += chain.process(states, b)
        if b.num_rows:
            max_ts = max(max_ts or 0, pc.max(b["ts"]).as_py())
            outs += chain.advance(states, max_ts - 1_500, version=0)
    outs += chain.finish(states)
    assert chain.finish(states) == []  # nothing twice
    later = rows.filter(pc.field("ts") > 1_003_000)
    assert_same_rows(pa.concat_tables(outs), reference(op, later))


def test_the_multi_input_names_agree_with_the_sources():
    inputs = pytest.importorskip("rayflow.sources.inputs")
    assert (inputs.SOURCE_COLUMN, inputs.INPUTS_METADATA) == (SOURCE_COLUMN, INPUTS_METADATA)
