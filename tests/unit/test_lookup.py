"""rf.ops.Lookup without Ray (DESIGN §12): Parquet and DuckDB tables in real files, left and inner
lookups checked against DuckDB SQL, reloads on change, bad tables, pickling."""

from __future__ import annotations

import os
import pickle

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rayflow.ops.lookup as lookup_module
from rayflow.errors import ConfigError, InputError, SourceNotFoundError
from rayflow.ops import Lookup
from rayflow.testing import assert_same_rows, duckdb_reference


def dim(n: int = 500, *, seed: int = 0, scale: float = 1.0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "id": pa.array(rng.permutation(n) * 2),  # even ids only: odd ones never match
            "name": pa.array([f"n{i}" for i in range(n)]),
            "score": pa.array(np.arange(n) * scale),
        }
    )


def events(n: int = 2_000, *, seed: int = 1, ids: int = 1_000) -> pa.Table:
    rng = np.random.default_rng(seed)
    key = pa.array(rng.integers(0, ids, n))
    key = pa.array(np.where(rng.random(n) < 0.05, None, key.to_numpy()), pa.int64())
    return pa.table({"k": key, "name": pa.array([f"e{i}" for i in range(n)]), "v": pa.array(np.arange(n))})


def write(table: pa.Table, path, *, bump: int = 0) -> None:
    """Write atomically (as the docs ask), with an mtime ``bump`` seconds ahead so that a rewrite
    within the filesystem's timestamp resolution still looks changed."""
    tmp = f"{path}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    if bump:
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 10**9))


def run(op: Lookup, stream: pa.Table, pieces: int = 5) -> pa.Table:
    outs = []
    for b in np.array_split(np.arange(stream.num_rows), pieces):
        _, out = op.process(None, stream.take(pa.array(b)))
        if out is not None:
            outs.append(out)
    return pa.concat_tables(outs)


def sql(how: str, stream: pa.Table, table: pa.Table) -> pa.Table:
    kind = "LEFT JOIN" if how == "left" else "JOIN"
    return duckdb_reference(
        f"SELECT s.*, t.name AS name_lookup, t.score FROM s {kind} t ON s.k = t.id", s=stream, t=table
    )


@pytest.mark.parametrize("how", ["left", "inner"])
def test_parquet_file_lookup_equals_sql(tmp_path, how):
    table, stream = dim(), events()
    write(table, tmp_path / "dim.parquet")
    op = Lookup(tmp_path / "dim.parquet", on=("k", "id"), how=how)
    out = run(op, stream)
    assert out.schema == op.check_input(stream.schema)
    assert out.column_names == ["k", "name", "v", "name_lookup", "score"]
    assert_same_rows(out, sql(how, stream, table))
    if how == "left":  # every row, in input order
        assert out.column("v").to_pylist() == stream.column("v").to_pylist()


def test_parquet_directory_skips_hidden_and_unfinished_files(tmp_path):
    table = dim(300)
    d = tmp_path / "dim"
    d.mkdir()
    write(table.slice(0, 100), d / "part-0.parquet")
    write(table.slice(100), d / "part-1.parquet")
    (d / "_SUCCESS").write_text("")
    (d / "part-2.parquet.tmp").write_text("half a file")
    stream = events(ids=600)
    op = Lookup(str(d), on=("k", "id"), columns=["score"], how="inner")
    expected = duckdb_reference("SELECT s.*, t.score FROM s JOIN t ON s.k = t.id", s=stream, t=table)
    assert_same_rows(run(op, stream), expected)


@pytest.mark.parametrize("how", ["left", "inner"])
def test_duckdb_table_lookup_equals_sql(tmp_path, how):
    table, stream = dim(), events()
    path = str(tmp_path / "dims.duckdb")
    con = duckdb.connect(path)
    con.register("src", table)
    con.execute("CREATE TABLE people AS SELECT * FROM src")
    con.close()
    op = Lookup(path, table="people", on=("k", "id"), how=how)
    out = run(op, stream)
    assert out.schema == op.check_input(stream.schema)
    assert_same_rows(out, sql(how, stream, table))
    with pytest.raises(InputError, match="nope"):
        Lookup(path, table="nope", on="id").check_input(stream.schema)


def test_reload_when_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "dim.parquet"
    write(dim(scale=1.0), path)
    stream = events(n=200, ids=100)
    clock = [100.0]
    monkeypatch.setattr(lookup_module, "_monotonic", lambda: clock[0])
    op = Lookup(path, on=("k", "id"), columns=["score"], how="inner", reload_s=10)
    first = run(op, stream, 1)
    write(dim(scale=2.0), path, bump=5)
    clock[0] = 105.0  # within reload_s: not even checked
    assert run(op, stream, 1).equals(first)
    clock[0] = 110.0
    second = run(op, stream, 1)
    assert second.column("score").to_pylist() == [2 * s for s in first.column("score").to_pylist()]
    # reload_s=0: checked at every batch; an unchanged file is not read again.
    op0 = Lookup(path, on=("k", "id"), columns=["score"], how="inner", reload_s=0)
    run(op0, stream, 1)
    loaded = op0._loaded
    run(op0, stream, 1)
    assert op0._loaded.values is loaded.values
    write(dim(scale=3.0), path, bump=10)
    assert run(op0, stream, 1).column("score").to_pylist() == [
        3 * s for s in first.column("score").to_pylist()
    ]


def test_a_reload_that_cannot_read_keeps_the_table_but_a_bad_table_fails(tmp_path):
    path = tmp_path / "dim.parquet"
    write(dim(), path)
    stream = events(n=100, ids=100)
    op = Lookup(path, on=("k", "id"), reload_s=0)
    before = run(op, stream, 1)
    path.write_bytes(b"not parquet yet")  # a writer that does not rename into place
    assert run(op, stream, 1).equals(before)
    write(dim().drop_columns(["score"]), path, bump=5)
    with pytest.raises(InputError, match="without column"):
        run(op, stream, 1)


def test_duplicate_keys_are_refused_null_keys_never_match(tmp_path):
    path = tmp_path / "dup.parquet"
    write(pa.table({"id": [1, 2, 2, None, None], "x": ["a", "b", "c", "n1", "n2"]}), path)
    with pytest.raises(InputError, match=r"1 key\(s\) on several rows, e.g. \{.id.: 2\} \(2 rows\)"):
        run(Lookup(path, on="id"), pa.table({"id": [1]}), 1)
    write(pa.table({"id": [1, 2, None, None], "x": ["a", "b", "n1", "n2"]}), path)
    out = run(Lookup(path, on="id"), pa.table({"id": pa.array([1, None, 3, 2], pa.int64())}), 1)
    assert out.to_pylist() == [
        {"id": 1, "x": "a"},
        {"id": None, "x": None},
        {"id": 3, "x": None},
        {"id": 2, "x": "b"},
    ]


def test_composite_keys_of_other_widths_and_string_types(tmp_path):
    path = tmp_path / "dim.parquet"
    table = pa.table(
        {
            "a": pa.array([1, 1, 2], pa.int32()),
            "b": pa.array(["x", "y", "x"], pa.string()),
            "val": [10, 20, 30],
        }
    )
    write(table, path)
    stream = pa.table(
        {
            "a": pa.array([1, 2, 1, 2], pa.int64()),
            "b": pa.array(["y", "x", "z", None], pa.large_string()).dictionary_encode(),
        }
    )
    out = run(Lookup(path, on=["a", "b"]), stream, 1)
    assert out.column("val").to_pylist() == [20, 30, None, None]


def test_a_hash_collision_falls_back_to_a_hash_join(tmp_path, monkeypatch):
    write(dim(50), tmp_path / "dim.parquet")
    stream = events(n=300, ids=100)
    monkeypatch.setattr(lookup_module, "hash_arrays", lambda arrays: np.zeros(len(arrays[0]), np.uint64))
    op = Lookup(tmp_path / "dim.parquet", on=("k", "id"))
    out = run(op, stream)
    assert not op._loaded.exact
    assert_same_rows(out, sql("left", stream, dim(50)))


def test_check_input_and_config_errors(tmp_path):
    path = tmp_path / "dim.parquet"
    write(dim(), path)
    stream = events(n=10)
    with pytest.raises(SourceNotFoundError, match="does not exist"):
        Lookup(tmp_path / "missing.parquet", on="id").check_input(stream.schema)
    with pytest.raises(InputError, match="cannot be compared"):
        Lookup(path, on=("name", "id")).check_input(stream.schema)
    with pytest.raises(InputError, match="no column"):
        Lookup(path, on=("k", "id"), columns=["nope"]).check_input(stream.schema)
    with pytest.raises(InputError, match="no column"):
        Lookup(path, on="missing").check_input(stream.schema)
    with pytest.raises(ConfigError, match="table="):
        Lookup(tmp_path / "x.duckdb", on="id")
    with pytest.raises(ConfigError, match="how"):
        Lookup(path, on="id", how="right")
    with pytest.raises(ConfigError, match="reload_s"):
        Lookup(path, on="id", reload_s=-1)
    with pytest.raises(ConfigError, match="on="):
        Lookup(path, on=(["a", "b"], ["c"]))


def test_pickles_without_its_table(tmp_path):
    path = tmp_path / "dim.parquet"
    write(dim(), path)
    stream = events(n=300)
    op = Lookup(path, on=("k", "id"))
    first = run(op, stream)
    assert op._loaded is not None
    copy = pickle.loads(pickle.dumps(op))
    assert copy._loaded is None and copy.spec() == op.spec()
    assert len(pickle.dumps(op)) < 2_000  # the table does not travel
    assert run(copy, stream).equals(first)
