"""Sources follow WORKLOAD.md exactly and read deterministically from any position."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import rayflow as rf


def check(t: pa.Table, key_sum, value_sum, distinct, first, last_ts):
    assert pc.sum(t["key"]).as_py() == key_sum
    assert pc.sum(t["value"]).as_py() == value_sum
    assert len(pc.unique(t["key"])) == distinct
    assert (t["key"][0].as_py(), t["value"][0].as_py()) == first
    assert t["ts"][-1].as_py() == last_ts


def test_synthetic_check_values_1m():
    t = rf.sources.Synthetic(events=1_000_000).to_table()
    check(t, 55_500_617_083, 500_206_539.5205078, 80_818, (21300, 665.28125), 1_700_000_000_999)


@pytest.mark.slow
def test_synthetic_check_values_10m():
    t = rf.sources.Synthetic(events=10_000_000).to_table()
    check(t, 554_708_944_330, 4_999_153_382.206055, 99_999, (21300, 665.28125), 1_700_000_009_999)


def test_synthetic_prefix_and_splits_are_the_same_stream():
    whole = rf.sources.Synthetic(events=2_500_000).to_table()
    split = rf.sources.Synthetic(events=2_500_000, splits=3).to_table()
    prefix = rf.sources.Synthetic(events=1_200_000).to_table()
    assert split.equals(whole)
    assert prefix.equals(whole.slice(0, 1_200_000))


def read_all(split, position):
    out, pos = [], position
    for batch, nxt in split.read(position):
        assert nxt == pos + batch.num_rows  # positions chain exactly
        out.append(batch)
        pos = nxt
    return pa.Table.from_batches(out) if out else None, pos


@pytest.mark.parametrize("position", [0, 1, 99_999, 123_457, 299_999])
def test_every_source_resumes_exactly_at_a_position(tmp_path, position):
    data = rf.sources.Synthetic(events=300_000).to_table()
    pq.write_table(data, tmp_path / "a.parquet", row_group_size=64_000)
    pacsv.write_csv(data, tmp_path / "a.csv")
    with open(tmp_path / "a.json", "w") as f:
        import json

        for r in data.slice(0, 300_000).to_pylist():
            f.write(json.dumps(r) + "\n")
    for src in (
        rf.sources.Table(data, batch_rows=50_000),
        rf.sources.Parquet(str(tmp_path / "a.parquet"), batch_rows=50_000),
        rf.sources.CSV(str(tmp_path / "a.csv"), batch_rows=50_000),
        rf.sources.JSON(str(tmp_path / "a.json"), batch_rows=50_000),
        rf.sources.Synthetic(events=300_000),
    ):
        (split,) = src.splits()
        got, end = read_all(split, position)
        assert end == 300_000
        assert got.cast(data.schema).equals(data.slice(position)), src


def test_synthetic_split_positions_are_relative():
    s = rf.sources.Synthetic(events=2_500_000, splits=2).splits()[1]
    got, end = read_all(s, 200_000)
    assert end == 1_500_000
    whole = rf.sources.Synthetic(events=2_500_000).to_table()
    assert got.equals(whole.slice(1_200_000))


def test_directory_and_glob_resolve_in_order(tmp_path):
    t = pa.table({"key": [1, 2, 3]})
    (tmp_path / "d").mkdir()
    for name in ("b", "a", "c"):
        pq.write_table(t, tmp_path / "d" / f"{name}.parquet")
    names = [s.name for s in rf.sources.Parquet(str(tmp_path / "d")).splits()]
    assert [n.rsplit("/", 1)[1] for n in names] == ["a.parquet", "b.parquet", "c.parquet"]
    names = [s.name for s in rf.sources.Parquet(str(tmp_path / "d" / "[ab].parquet")).splits()]
    assert len(names) == 2


@pytest.mark.parametrize("position", [0, 7, 50_000, 50_001, 123_457])
def test_batches_end_on_an_absolute_grid(tmp_path, position):
    data = rf.sources.Synthetic(events=200_000).to_table()
    pq.write_table(data, tmp_path / "a.parquet", row_group_size=30_000)
    for src in (
        rf.sources.Table(data, batch_rows=50_000),
        rf.sources.Parquet(str(tmp_path / "a.parquet"), batch_rows=50_000),
    ):
        (split,) = src.splits()
        ends = [end for _, end in split.read(position)]
        assert all(e % 50_000 == 0 for e in ends), (src, ends)


@pytest.mark.parametrize(("keys", "s"), [(100_000, 1.0), (7, 1.0), (1000, 1.3), (50_000, 0.6)])
def test_rank_lookup_equals_the_binary_search(keys, s):
    import numpy as np

    from rayflow.sources.synthetic import _SyntheticGenerator

    gen = _SyntheticGenerator(keys, 42, s)
    u = np.random.default_rng(3).random(200_000)
    edges = np.concatenate([gen.cdf, np.nextafter(gen.cdf, 0), np.nextafter(gen.cdf, 1)])
    u = np.clip(np.concatenate([u, edges, [0.0]]), 0.0, np.nextafter(1.0, 0))
    assert (gen.ranks(u) == np.searchsorted(gen.cdf, u, side="right")).all()
