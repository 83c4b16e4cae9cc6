"""Review of issue 9 (live streams): defects found by reviewers; each test failed before its fix (no Ray)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import rayflow as rf
from rayflow._internal import partition_task as pt
from rayflow._internal.chain import Chain
from rayflow._internal.checkpoint.commit import CommitRecord
from rayflow._internal.group.leases import LeaseTable
from rayflow.sinks.base import upsert_key
from rayflow.sinks.duckdb import _DuckDBWriter

AGGS = [("value", "count"), ("value", "sum")]


def _apply(tmp_path, outputs: list[pa.Table], table: str = "view") -> pa.Table:
    """Apply upsert outputs, one file per commit, as the DuckDB sink's publication does."""
    w = _DuckDBWriter(str(tmp_path / "v.duckdb"), table)
    try:
        for i, t in enumerate(outputs):
            f = tmp_path / f"c{i}.parquet"
            pq.write_table(t, f)
            key = upsert_key(pq.read_schema(f))
            w.load(f"c{i}", str(f), key=key)
        return w.con.sql(f"SELECT * FROM {table}").to_arrow_table()
    finally:
        w.close()


def test_a_filter_after_a_changes_aggregate_is_refused():
    """Upserts carry no retractions: a key whose new value fails a Filter would keep its old,
    passing row in the view for ever. So the chain is refused, naming what to do instead."""
    keep = pc.field("value_count") < 2
    with pytest.raises(rf.errors.ConfigError, match="no retractions"):
        Chain([rf.ops.Aggregate(by="key", aggs=AGGS, emit="changes"), rf.ops.Filter(keep)])
    with pytest.raises(rf.errors.ConfigError, match="no retractions"):  # resolved for a live source
        Chain([rf.ops.Aggregate(by="key", aggs=AGGS), rf.ops.Filter(keep)]).for_input(unbounded=True)
    Chain([rf.ops.Aggregate(by="key", aggs=AGGS), rf.ops.Filter(keep)]).for_input(unbounded=False)
    Chain([rf.ops.Filter(keep), rf.ops.Aggregate(by="key", aggs=AGGS, emit="changes")])  # before: fine


def test_a_partition_reloaded_under_the_same_lease_epoch_keeps_its_versions_increasing():
    """leases.py: a release of a lease whose revocation was cancelled meanwhile is a no-op; "the
    caller, which has dropped the partition, finds it in its next heartbeat's assignment and
    reloads it from its commit" -- under the *same* epoch. The reloaded PartitionTask counts its
    flushes from 0 again, so its first upserts carry the same (or lower) ``_version`` as the ones
    the first task already committed: the DuckDB sink's ``excluded._version > _version`` drops
    them (the view keeps the older values)."""
    leases = LeaseTable(1)
    (g,) = leases.rebalance({0: "a"})
    leases.rebalance({0: "b"})  # scale up: revoke towards b
    leases.drop_member("b")  # b leaves before a releases (scale down again)
    assert leases.release(0, "a", g.epoch) is None  # no-op: a still owns it, same epoch
    assert leases.holds(0, "a", g.epoch)

    first = pt.PartitionTask.from_commit(0, g.epoch, [None], None)
    committed = []
    for rows in (10, 20, 30):  # three commits, each flushing the changes of new rows
        first.rows_total = rows
        committed.append(first.next_version())
    last = CommitRecord(
        partition=0, lease_epoch=g.epoch, positions={"s": 30}, state_files=[], output_files=[],
        rows_in=10, rows_total=30, state_rows=0, final=False, map_version=1,
    )  # fmt: skip
    again = pt.PartitionTask.from_commit(0, g.epoch, [None], last)  # reloaded, same epoch
    again.rows_total += 4  # its next flush has changes: it processed rows
    assert again.next_version() > max(committed), "an upsert of the reloaded task is older than one committed"


def test_an_aggregation_added_on_resume_is_applied_to_the_live_view(tmp_path):
    """compat.check_resume lets a resumed job add an aggregation over an input column that is new
    (DESIGN §5: "evolves what it can (added nullable columns)"). Over an unbounded input the
    DuckDB sink then gets upserts with a column its table (created by the first run's first
    file) lacks: ``INSERT ... BY NAME`` fails, publication is retried for ever and the view
    stops at the first run (sinks/duckdb.py _upsert: no ALTER TABLE ADD COLUMN)."""
    from rayflow._internal.compat import JobMeta, check_resume

    old_ops = [rf.ops.Aggregate(by="key", aggs=[("value", "count")], emit="changes").spec()]
    new_ops = [rf.ops.Aggregate(by="key", aggs=[("value", "count"), ("extra", "sum")], emit="changes").spec()]
    old_schema = pa.schema([("key", pa.int64()), ("value", pa.float64())])
    new_schema = old_schema.append(pa.field("extra", pa.float64()))
    old = JobMeta.build(
        key=["key"], partition_map_json="m", operators=old_ops, splits=["s"], schema=old_schema
    )
    new = JobMeta.build(
        key=["key"], partition_map_json="m", operators=new_ops, splits=["s"], schema=new_schema
    )
    check_resume("evolve", old, new)  # allowed

    run1 = rf.ops.Aggregate(by="key", aggs=[("value", "count")], emit="changes")
    s = run1.init_state()
    s, _ = run1.process(s, pa.table({"key": [1], "value": [1.0]}))
    s, out1 = run1.flush(s, version=pt.upsert_version(1, 1))
    run2 = rf.ops.Aggregate(by="key", aggs=[("value", "count"), ("extra", "sum")], emit="changes")
    s2 = run2.state_from_table(run1.state_to_table(s))
    s2, _ = run2.process(s2, pa.table({"key": [1], "value": [2.0], "extra": [3.0]}))
    s2, out2 = run2.flush(s2, version=pt.upsert_version(2, 2))

    view = _apply(tmp_path, [out1, out2])
    assert view.to_pylist() == [
        {"key": 1, "value_count": 2, "extra_sum": 3.0, "_version": pt.upsert_version(2, 2)}
    ]


def test_a_read_only_query_cannot_change_the_live_view(tmp_path):
    """run.query / rayflow sql --pipeline run on the manager's *writer* connection, guarded by
    sinks/duckdb.py _check_read_only, which lets every statement DuckDB classifies as SELECT or
    EXPLAIN through. ``EXPLAIN ANALYZE <statement>`` is classified EXPLAIN, and runs the
    statement: a DELETE (or UPDATE, INSERT) through the "read-only" door edits the view."""
    import json

    from rayflow._internal.checkpoint.store import Store
    from rayflow.sinks import PENDING_DIR
    from rayflow.sinks.base import UPSERT_KEY_METADATA, VERSION_COLUMN

    sink = rf.sinks.DuckDB(tmp_path / "out.duckdb", "view")
    store = Store(sink.root(pipeline_root=str(tmp_path / "ck")))
    t = pa.table({"k": [1, 2], "total": [1.0, 2.0], VERSION_COLUMN: pa.array([1, 1], pa.int64())})
    t = t.replace_schema_metadata({UPSERT_KEY_METADATA: json.dumps(["k"]).encode()})
    store.write_parquet(f"{PENDING_DIR}/c1.parquet", t)
    sink.publish(store, "c1.parquet")
    try:
        for sql in ("EXPLAIN ANALYZE DELETE FROM view", "EXPLAIN ANALYZE UPDATE view SET total = -1"):
            try:
                sink.query(store, sql)
            except rf.errors.ConfigError:
                pass  # refused: right
        rows = sink.query(store, "SELECT k, total FROM view ORDER BY k").to_pylist()
    finally:
        sink.close()
    assert rows == [{"k": 1, "total": 1.0}, {"k": 2, "total": 2.0}]


def test_an_aggregate_after_a_changes_aggregate_is_refused():
    """Over a live input both Aggregates of a rollup would emit changes, and the second would
    aggregate every *version* of the first one's rows as a new event: refused."""
    first, second = ("value", "count"), ("value_count", "sum")
    chain = Chain([rf.ops.Aggregate(by="key", aggs=[first]), rf.ops.Aggregate(by="key", aggs=[second])])
    with pytest.raises(rf.errors.ConfigError, match="count every version again"):
        chain.for_input(unbounded=True)
    chain.for_input(unbounded=False)  # over a bounded input the final result flows through: fine


def test_upsert_versions_keep_increasing_past_2_40_rows_of_a_partition():
    """A version packed as ``epoch << 40 | rows`` wrapped after 2**40 rows of one partition
    (12.7 days at 1M rows/s): every later upsert then lost ``excluded._version > _version`` in
    the DuckDB sink and the view froze, with no error. Versions have no width cap now."""
    before = pt.upsert_version(1, 2**40 - 1)
    after = pt.upsert_version(1, 2**40 + 5)
    assert after > before, f"version went back from {before} to {after} after 2**40 rows"
