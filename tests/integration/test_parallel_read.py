"""Parallel reading on a real local Ray: two source actors share the row-group splits of one
Parquet file, read column-projected, and the result equals DuckDB's over the same input."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rayflow as rf
from rayflow.testing import KEYED_SQL, assert_same_rows, duckdb_reference

pytestmark = pytest.mark.ray


def test_two_sources_read_row_group_splits_projected_and_equal_duckdb(ray_session, job, tmp_path, events_1m):
    events = events_1m.slice(0, 200_000)
    # A column the job does not use: projected away, so it is never read.
    wide = events.append_column("note", pa.array(["unused"] * events.num_rows))
    path = str(tmp_path / "events.parquet")
    pq.write_table(wide, path, row_group_size=25_000)  # 8 row groups
    source = rf.sources.Parquet(path, split_rows=50_000)
    assert len(source.splits()) == 4
    result = job("parallel-read", source, consumers=2, config=rf.EngineConfig(num_sources=2)).run(
        timeout_s=120
    )
    assert result.stats["sources"] == 2
    assert result.stats["events"] == events.num_rows
    assert_same_rows(result.output, duckdb_reference(KEYED_SQL, events=events))
