"""rf.sources.Files through a Pipeline: files that arrive in a watched directory while the job
runs (renamed into place, or written slowly under a temporary name) are each counted exactly once,
and a restart picks up the files that arrived while it was stopped without re-reading the others.
Also on S3 (a moto server on loopback)."""

from __future__ import annotations

import os

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from ray._common.test_utils import wait_for_condition

import rayflow as rf
from rayflow.testing import assert_same_rows
from tests.conftest import make_job

pytestmark = pytest.mark.ray

#: The engine re-lists the directory this often, and Files compares sizes across polls this far
#: apart: short, so that files are taken quickly, but no test outcome depends on either.
FAST = dict(poll_s=0.2)


def rows(file_no: int, n: int = 2_000) -> pa.Table:
    """File ``file_no``'s rows: every row is unique (file, id), so a row counted twice shows."""
    ids = pa.array(range(n), pa.int64())
    return pa.table(
        {
            "key": pa.array([f"k{(file_no * 31 + i) % 97}" for i in range(n)]),
            "value": pa.array([float(i % 13) for i in range(n)]),
            "file": pa.array([file_no] * n, pa.int64()),
            "id": ids,
        }
    )


def drop(directory, name: str, table: pa.Table) -> None:
    """Write under a temporary name, then rename into place: the way writers should."""
    tmp = os.path.join(directory, f"{name}.tmp")
    pq.write_table(table, tmp)
    os.rename(tmp, os.path.join(directory, name))


def published_rows(out) -> int:
    if not os.path.isdir(out):
        return 0
    return pads.dataset(str(out), format="parquet").count_rows()


def watch_job(tmp_path, inbox, out):
    return make_job(
        tmp_path,
        "watch",
        rf.sources.Files(str(inbox), format="parquet", watch=True, **FAST),
        operator=rf.ops.Map(lambda t: t),
        sink=rf.sinks.Parquet(str(out)),
        checkpoint_interval_s=0.2,
        config=rf.EngineConfig(discovery_interval_s=0.2),
    )


GROUPED = "SELECT key, count(*) AS n, sum(value) AS s FROM read_parquet('{}/**/*.parquet') GROUP BY key"


def test_files_dropped_while_running_count_once_and_a_restart_takes_only_new_ones(ray_session, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    drop(inbox, "00.parquet", rows(0))
    expected = 2_000

    run = watch_job(tmp_path, inbox, out).start()
    try:
        wait_for_condition(lambda: published_rows(out) >= expected, timeout=60)
        drop(inbox, "01.parquet", rows(1))
        expected += 2_000
        wait_for_condition(lambda: published_rows(out) >= expected, timeout=60)

        # A slow writer: one row group, a pause, another, the footer; under a temporary name
        # all along, so however long the pause, the half-written file is never taken.
        slow = inbox / "02.parquet.inprogress"
        part1, part2 = rows(2).slice(0, 1_000), rows(2).slice(1_000)
        writer = pq.ParquetWriter(str(slow), part1.schema)
        writer.write_table(part1)
        # The pause: until a file dropped after the first half is committed, i.e. the directory
        # has been polled (and the half-written file passed over) several times.
        drop(inbox, "03.parquet", rows(3))
        expected += 2_000
        wait_for_condition(lambda: published_rows(out) >= expected, timeout=60)
        writer.write_table(part2)
        writer.close()
        os.rename(slow, inbox / "02.parquet")
        expected += 2_000
        wait_for_condition(lambda: published_rows(out) >= expected, timeout=60)
    finally:
        run.stop()
    assert published_rows(out) == expected

    # Stopped: a file arrives meanwhile. The next run reads it and nothing it read before.
    drop(inbox, "04.parquet", rows(4, 500))
    expected += 500
    run = watch_job(tmp_path, inbox, out).start()
    try:
        wait_for_condition(lambda: published_rows(out) >= expected, timeout=60)
        assert run.status()["rows_read"] == 500  # old files are not read again
    finally:
        run.stop()

    got = pads.dataset(str(out), format="parquet").to_table()
    every_file = pa.concat_tables([rows(i) for i in range(4)] + [rows(4, 500)])
    assert_same_rows(got, every_file, columns=["file", "id", "key", "value"])
    con = duckdb.connect()
    by_key = con.sql(GROUPED.format(out)).to_arrow_table()
    assert_same_rows(by_key, con.sql(GROUPED.format(inbox)).to_arrow_table())
    con.close()


# ----------------------------------------------------------------------------- S3 (moto)


def test_s3_prefix_is_polled_and_read(ray_session, s3_query, tmp_path):
    """Objects under a prefix: temporary names skipped, a moved object taken, splits read in Ray."""
    uri = f"s3://rayflow-watch/inbox{s3_query}"
    fs, base = pafs.FileSystem.from_uri(uri)
    src = rf.sources.Files(uri, format="parquet", schema=rows(0).schema, assume_renamed=True, **FAST)
    assert src.splits() == []  # an empty prefix is an empty directory, not a missing one
    pq.write_table(rows(0), f"{base}/a/00.parquet", filesystem=fs)
    pq.write_table(rows(1), f"{base}/01.parquet.tmp", filesystem=fs)
    pq.write_table(rows(9), f"{base}/_pending/09.parquet", filesystem=fs)
    wait_for_condition(lambda: [s.name for s in src.splits()] == ["a/00.parquet"], timeout=10)
    fs.move(f"{base}/01.parquet.tmp", f"{base}/01.parquet")
    wait_for_condition(lambda: [s.name for s in src.splits()] == ["01.parquet", "a/00.parquet"], timeout=10)

    # The same prefix, bounded, through a pipeline: the splits open the bucket from Ray workers.
    out = tmp_path / "out"
    make_job(
        tmp_path,
        "s3watch",
        rf.sources.Files(uri, format="parquet", watch=False),
        operator=rf.ops.Map(lambda t: t),
        sink=rf.sinks.Parquet(str(out)),
    ).run(timeout_s=120)
    got = pads.dataset(str(out), format="parquet").to_table()
    assert_same_rows(got, pa.concat_tables([rows(0), rows(1)]), columns=["file", "id", "key", "value"])
