"""Second review of issue 9 (live streams, b80fb05 / 396eb05): defects, each as a failing test (no Ray)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from rayflow._internal import partition_task as pt
from rayflow.sinks.base import upsert_key
from rayflow.sinks.duckdb import _DuckDBWriter


def _apply(tmp_path, outputs: list[pa.Table], table: str = "view") -> pa.Table:
    """Apply upsert outputs, one file per commit, as the DuckDB sink's publication does."""
    w = _DuckDBWriter(str(tmp_path / "v.duckdb"), table)
    try:
        for i, t in enumerate(outputs):
            f = tmp_path / f"c{i}.parquet"
            pq.write_table(t, f)
            w.load(f"c{i}", str(f), key=upsert_key(pq.read_schema(f)))
        return w.con.sql(f"SELECT * FROM {table} ORDER BY ALL").to_arrow_table()
    finally:
        w.close()


# ----------------------------------------------------------------------------- 1. versions


def test_upsert_versions_keep_increasing_past_2_40_rows_of_a_partition():
    """partition_task.upsert_version = ``epoch << 40 | rows_total``. rows_total is the partition's
    whole history, so 2**40 rows (1.1e12) is reached by one partition at 1M rows/s in 12.7 days
    (the README's latency bench runs 1-2M events/s): a live job is meant to run for months.
    Past it, ``|`` folds the rows into the epoch's bits: with epoch 1 (bit 40 already set) the
    version falls back to that of row 0, every later upsert loses ``excluded._version >
    _version`` in the DuckDB sink and the view freezes (no error anywhere). The old flush
    counter had the same field width but counted flushes (35 years at one per ms)."""
    before = pt.upsert_version(1, 2**40 - 1)
    after = pt.upsert_version(1, 2**40 + 5)
    assert after > before, f"version went back from {before} to {after} after 2**40 rows"


# ----------------------------------------------------------------------------- 2. Map after upserts
