"""Sinks without Ray: publication is idempotent, and what differs is a method, not a type test."""

from __future__ import annotations

import ast
import pathlib
import pickle

import duckdb
import pyarrow as pa
import pytest

import rayflow as rf
from rayflow._internal.checkpoint.store import Store
from rayflow.sinks import PENDING_DIR


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
