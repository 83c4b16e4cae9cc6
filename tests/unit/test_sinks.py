"""Sinks without Ray: publication is idempotent, and what differs is a method, not a type test."""

from __future__ import annotations

import ast
import json
import pathlib
import pickle

import duckdb
import pyarrow as pa
import pytest

import rayflow as rf
from rayflow._internal.checkpoint.store import Store
from rayflow.sinks import PENDING_DIR
from rayflow.sinks.base import UPSERT_KEY_METADATA, VERSION_COLUMN


def pending(store: Store, name: str, table: pa.Table) -> None:
    store.write_parquet(f"{PENDING_DIR}/{name}", table)


def test_parquet_publish_moves_once_and_a_repeat_replaces_the_same_rows(tmp_path):
    sink = rf.sinks.Parquet(tmp_path / "out")
    store = Store(sink.root(pipeline_root=str(tmp_path / "ck")))
    t = pa.table({"k": [1, 2]})
    pending(store, "part-1.parquet", t)
    sink.publish(store, "part-1.parquet")
    sink.publish(store, "part-1.parquet")  # published already: nothing more
    pending(store, "part-1.parquet", t)  # a repeated commit wrote the same rows again
    sink.publish(store, "part-1.parquet")
    assert store.list_files("") == ["part-1.parquet"]
    assert store.read_parquet("part-1.parquet").equals(t)
    assert sink.read_output(store, ["part-1.parquet"]) is None


def test_duckdb_publish_loads_each_file_exactly_once(tmp_path):
    sink = rf.sinks.DuckDB(tmp_path / "out.duckdb", "events")
    store = Store(sink.root(pipeline_root=str(tmp_path / "ck")))
    t = pa.table({"k": [1, 2, 3]})
    for _ in range(2):  # the second time: a repeated commit's copy of the same file
        pending(store, "part-1.parquet", t)
        sink.publish(store, "part-1.parquet")
    sink.publish(store, "part-1.parquet")
    assert pickle.loads(pickle.dumps(sink))._writer is None  # a connection never travels
    sink.close()
    assert store.list_files(PENDING_DIR) == []
    con = duckdb.connect(str(tmp_path / "out.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM events").fetchone()[0] == 3
    con.close()


def test_collect_reads_its_published_files_in_order(tmp_path):
    sink = rf.sinks.Collect()
    assert sink.keeps_output_list and not rf.sinks.Parquet("x").keeps_output_list
    root = sink.root(pipeline_root="s3://bucket/ck/job?endpoint_override=h:1")
    assert root == "s3://bucket/ck/job/collect?endpoint_override=h:1"
    store = Store(sink.root(pipeline_root=str(tmp_path)))
    for i in range(3):
        pending(store, f"p{i}.parquet", pa.table({"k": [i]}))
        sink.publish(store, f"p{i}.parquet")
    assert sink.read_output(store, ["p2.parquet", "p0.parquet"]).column("k").to_pylist() == [2, 0]
    assert sink.read_output(store, []).num_rows == 0


def test_public_sinks_module_imports_nothing_from_internal_at_run_time():
    """DESIGN §9: public modules do not reach into ``_internal`` for helpers (type hints aside)."""
    for module in pathlib.Path(rf.sinks.__file__).parent.glob("*.py"):
        _check_no_internal_imports(ast.parse(module.read_text()))


def _check_no_internal_imports(tree: ast.Module) -> None:
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            assert "_internal" not in node.module, node.module
        if isinstance(node, ast.Import):
            assert all("duckdb" not in a.name for a in node.names)  # only the DuckDB sink's writer


def test_a_committed_output_deleted_before_publication_is_a_loud_error(tmp_path):
    """A recorded output that is neither pending nor published lost its rows: never a silent no-op."""
    for sink in (rf.sinks.Parquet(tmp_path / "out"), rf.sinks.DuckDB(tmp_path / "o.duckdb", "t")):
        store = Store(sink.root(pipeline_root=str(tmp_path / "ck")))
        with pytest.raises(rf.errors.ProtocolError, match="neither pending nor published"):
            sink.publish(store, "part-9.parquet")
        sink.close()


# ----------------------------------------------------------------------------- upsert streams


def upserts(rows: list[tuple], key=("k",)) -> pa.Table:
    """An upsert stream as rf.ops.Aggregate emits it: (k, total, _version) rows."""
    t = pa.table(
        {
            "k": pa.array([r[0] for r in rows], pa.int64()),
            "total": pa.array([r[1] for r in rows], pa.float64()),
            VERSION_COLUMN: pa.array([r[2] for r in rows], pa.int64()),
        }
    )
    return t.replace_schema_metadata({UPSERT_KEY_METADATA: json.dumps(list(key)).encode()})


def table_rows(path, table="view") -> list[tuple]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(f"SELECT k, total, _version FROM {table} ORDER BY k").fetchall()
    finally:
        con.close()


def test_duckdb_applies_an_upsert_stream_newer_versions_only(tmp_path):
    sink = rf.sinks.DuckDB(tmp_path / "out.duckdb", "view")
    store = Store(sink.root(pipeline_root=str(tmp_path / "ck")))
    # One file may hold several rows of a key (a retried attempt's flushes): the newest wins.
    pending(store, "c2.parquet", upserts([(1, 10.0, 20), (2, 5.0, 20), (1, 12.0, 21)]))
    # An older commit's file published late (its publication was retried): must not overwrite.
    pending(store, "c1.parquet", upserts([(1, 3.0, 10), (3, 7.0, 10)]))
    sink.publish(store, "c2.parquet")
    sink.publish(store, "c1.parquet")
    pending(store, "c1.parquet", upserts([(1, 3.0, 10), (3, 7.0, 10)]))  # a repeated commit's copy
    sink.publish(store, "c1.parquet")
    assert sink.query(store, "SELECT count(*) AS n FROM _rayflow_applied").column("n").to_pylist() == [2]
    sink.close()
    assert table_rows(tmp_path / "out.duckdb") == [(1, 12.0, 21), (2, 5.0, 20), (3, 7.0, 10)]
    con = duckdb.connect(str(tmp_path / "out.duckdb"), read_only=True)
    pk = con.execute(
        "SELECT constraint_column_names FROM duckdb_constraints() "
        "WHERE table_name = 'view' AND constraint_type = 'PRIMARY KEY'"
    ).fetchall()
    con.close()
    assert pk == [(["k"],)]


def test_duckdb_upserts_refuse_null_keys_and_a_table_without_the_key(tmp_path):
    sink = rf.sinks.DuckDB(tmp_path / "out.duckdb", "view")
    store = Store(sink.root(pipeline_root=str(tmp_path / "ck")))
    nulls = upserts([(1, 1.0, 1)]).set_column(0, "k", pa.array([None], pa.int64()))
    pending(store, "n.parquet", nulls)
    with pytest.raises(rf.errors.ConfigError, match="null in its key"):
        sink.publish(store, "n.parquet")
    assert store.exists(f"{PENDING_DIR}/n.parquet")  # left pending: nothing applied
    pending(store, "a.parquet", pa.table({"k": [1], "total": [1.0], VERSION_COLUMN: [1]}))  # append
    other = rf.sinks.DuckDB(tmp_path / "out.duckdb", "appended")
    other._writer = sink._writer  # the same database, as one manager would hold it
    other.publish(store, "a.parquet")
    pending(store, "u.parquet", upserts([(1, 1.0, 2)]))
    with pytest.raises(rf.errors.ConfigError, match="no primary key"):
        other.publish(store, "u.parquet")
    sink.close()


def test_sink_queries_are_read_only_and_see_the_latest_row_per_key(tmp_path):
    db = rf.sinks.DuckDB(tmp_path / "out.duckdb", "view")
    store = Store(db.root(pipeline_root=str(tmp_path / "ck")))
    with pytest.raises(rf.errors.ConfigError, match="does not exist yet"):
        db.query(store, "SELECT 1")
    pending(store, "c1.parquet", upserts([(1, 1.0, 1), (2, 2.0, 1)]))
    db.publish(store, "c1.parquet")
    assert db.query(store, "SELECT sum(total) AS s FROM view").column("s").to_pylist() == [3.0]
    for bad in ("DELETE FROM view", "SELECT 1; SELECT 2", "ATTACH 'x.duckdb' AS x"):
        with pytest.raises(rf.errors.ConfigError, match="read-only|may only read"):
            db.query(store, bad)
    with pytest.raises(rf.errors.ConfigError, match="the query failed"):
        db.query(store, "SELECT nope FROM view")
    db.close()
    # After the run: a read-only connection of its own.
    assert db.query(store, "SELECT count(*) AS n FROM view").column("n").to_pylist() == [2]

    out = rf.sinks.Parquet(tmp_path / "pq")
    store = Store(out.root(pipeline_root=str(tmp_path / "ck")))
    with pytest.raises(rf.errors.ConfigError, match="no output is published"):
        out.query(store, "SELECT * FROM output")
    pending(store, "c1.parquet", upserts([(1, 1.0, 5), (2, 2.0, 5)]))
    pending(store, "c2.parquet", upserts([(1, 4.0, 9)]))
    out.publish(store, "c1.parquet")
    out.publish(store, "c2.parquet")
    pending(store, "c3.parquet", upserts([(2, 99.0, 10)]))  # not published: invisible
    got = out.query(store, "SELECT k, total, _version FROM latest ORDER BY k")
    assert got.to_pylist() == [
        {"k": 1, "total": 4.0, "_version": 9},
        {"k": 2, "total": 2.0, "_version": 5},
    ]
    assert out.query(store, "SELECT count(*) AS n FROM output").column("n").to_pylist() == [3]
    plain = rf.sinks.Parquet(tmp_path / "plain")
    store = Store(plain.root(pipeline_root=str(tmp_path / "ck")))
    pending(store, "p.parquet", pa.table({"k": [1]}))
    plain.publish(store, "p.parquet")
    with pytest.raises(rf.errors.ConfigError, match="latest"):  # an append stream has no latest
        plain.query(store, "SELECT * FROM latest")
