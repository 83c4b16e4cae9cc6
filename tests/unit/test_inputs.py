"""Several inputs in one pipeline (DESIGN §12): the union schema, keys, and split names."""

from __future__ import annotations

import pyarrow as pa
import pytest

import rayflow as rf
from rayflow.errors import ConfigError, MissingKeyColumnError
from rayflow.sources.inputs import SOURCE_COLUMN, Inputs, input_columns


def _persons(n=10):
    return pa.table({"id": pa.array(range(n), pa.int64()), "name": [f"p{i}" for i in range(n)]})


def _auctions(n=30):
    return pa.table(
        {
            "id": pa.array(range(1000, 1000 + n), pa.int64()),
            "seller": pa.array([i % 10 for i in range(n)], pa.int32()),
        }
    )


def _inputs(**kw):
    return Inputs(
        [
            rf.sources.Input("person", rf.sources.Table(_persons(), batch_rows=4), key="id"),
            rf.sources.Input("auction", rf.sources.Table(_auctions(), batch_rows=7), key="seller", **kw),
        ]
    )


def test_union_schema_orders_columns_and_names_each_input():
    src = _inputs()
    assert src.schema.names == ["id", "name", "seller", SOURCE_COLUMN]
    assert input_columns(src.schema) == {"person": ["id", "name"], "auction": ["id", "seller"]}
    assert src.keys == {"person": ("id",), "auction": ("seller",)}


def test_each_split_is_conformed_and_keeps_its_positions():
    src = _inputs()
    splits = src.splits()
    assert [s.name.split("/")[0] for s in splits] == ["person"] * len(splits[:1]) + ["auction"] * (
        len(splits) - 1
    )
    auction = splits[-1]
    assert auction.key == ("seller",)
    batches = list(auction.read(0))
    t = pa.Table.from_batches([b for b, _ in batches])
    assert t.schema == src.schema
    assert t.column("name").null_count == t.num_rows
    assert set(t.column(SOURCE_COLUMN).to_pylist()) == {"auction"}
    assert [end for _, end in batches] == [7, 14, 21, 28, 30]
    # Resuming mid-way gives the tail, as the inner split does.
    tail = pa.Table.from_batches([b for b, _ in auction.read(14)])
    assert tail.equals(t.slice(14))


def test_a_shared_name_with_two_types_is_refused_with_a_rename_hint():
    other = pa.table({"id": pa.array(["a"]), "seller": pa.array([1], pa.int64())})
    src = Inputs(
        [
            rf.sources.Input("person", rf.sources.Table(_persons()), key="id"),
            rf.sources.Input("auction", rf.sources.Table(other), key="seller"),
        ]
    )
    with pytest.raises(ConfigError, match="rename"):
        _ = src.schema
    fixed = Inputs(
        [
            rf.sources.Input("person", rf.sources.Table(_persons()), key="id"),
            rf.sources.Input("auction", rf.sources.Table(other), key="seller", rename={"id": "item"}),
        ]
    )
    assert fixed.schema.names == ["id", "name", "item", "seller", SOURCE_COLUMN]
    split = fixed.splits()[-1]
    (batch, _), *_ = split.read(0)
    assert batch.column("item").to_pylist() == ["a"]


def test_keys_must_be_alike_column_by_column():
    strs = pa.table({"seller": pa.array(["x"])})
    src = Inputs(
        [
            rf.sources.Input("person", rf.sources.Table(_persons()), key="id"),
            rf.sources.Input("auction", rf.sources.Table(strs), key="seller"),
        ]
    )
    with pytest.raises(ConfigError, match="integers hash alike"):
        _ = src.schema
    with pytest.raises(MissingKeyColumnError):
        _ = Inputs([rf.sources.Input("person", rf.sources.Table(_persons()), key="nope")]).schema


def test_bad_inputs_are_refused_clearly():
    t = rf.sources.Table(_persons())
    with pytest.raises(ConfigError, match="names no key"):
        Inputs([rf.sources.Input("person", t)])
    with pytest.raises(ConfigError, match="must differ"):
        Inputs([rf.sources.Input("a", t, key="id"), rf.sources.Input("a", t, key="id")])
    with pytest.raises(ConfigError, match="name"):
        rf.sources.Input("1bad", t, key="id")
    with pytest.raises(ConfigError, match="takes rf.sources.Input"):
        rf.Pipeline(name="x", source=[t], key="id")


def test_the_pipeline_key_serves_inputs_that_name_none():
    p = rf.Pipeline(
        name="x",
        source=[
            rf.sources.Input("a", rf.sources.Table(_persons())),
            rf.sources.Input("b", rf.sources.Table(_persons())),
        ],
        key="id",
    )
    assert p.key == ["a:id", "b:id"]
    assert p.output_schema.names == ["id", "name", SOURCE_COLUMN]


def test_a_union_is_complete_when_its_growing_inputs_are(tmp_path):
    import pyarrow.parquet as pq

    from rayflow.sinks.files import COMPLETE_MARKER

    up = rf.sources.Upstream(str(tmp_path / "x"), schema=_persons().schema, ends=True)
    src = Inputs(
        [rf.sources.Input("a", rf.sources.Table(_persons()), key="id"), rf.sources.Input("b", up, key="id")]
    )
    assert src.dynamic and not src.unbounded
    assert not src.complete()
    assert [s.name for s in src.splits()] == ["a/" + src.splits()[0].inner.name]
    pq.write_table(_persons(3), tmp_path / "x" / "part-0.parquet")
    (tmp_path / "x" / COMPLETE_MARKER).write_text("{}")
    assert src.complete()
    assert [s.name for s in src.splits()][-1] == "b/part-0.parquet"  # the listing after the marker
