"""Second review of issue 9 (live streams, b80fb05 / 396eb05): defects, each as a failing test (no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import rayflow as rf
from rayflow._internal import partition_task as pt
from rayflow._internal.chain import Chain
from rayflow.sinks.base import UPSERT_KEY_METADATA, VERSION_COLUMN, upsert_key
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


def test_a_map_that_drops_rows_after_a_changes_aggregate_is_refused_or_the_view_stays_exact(tmp_path):
    """chain._check_after_changes refuses a Filter after an upsert-emitting Aggregate (no
    retractions: "a Filter would leave a key's old value in the view"), but a Map doing the same
    (``t.filter(...)`` inside the function) is accepted, and nothing checks "one row per key"
    (the docstring says "the sinks check those": upsert_key only checks the key columns and
    _version are present). Key 1 first sums to 10 (kept), then to 2 (dropped by the Map): the
    view keeps 10, while the same chain over the bounded input (emit='final') has no key 1.
    (ops.Aggregate's docstring even still says "a Filter keeps the stream keyed".)"""
    drop_small = rf.ops.Map(lambda t: t.filter(pc.field("value_sum") > 5))
    aggs = [("value", "sum")]
    try:
        chain = Chain([rf.ops.Aggregate(by="key", aggs=aggs, emit="changes"), drop_small])
    except rf.errors.ConfigError:
        return  # refused: right
    states = chain.init_states()
    outs = []
    chain.process(states, pa.table({"key": [1, 2], "value": [10.0, 7.0]}))
    outs += chain.flush(states, version=pt.upsert_version(1, 2))
    chain.process(states, pa.table({"key": [1], "value": [-8.0]}))
    outs += chain.flush(states, version=pt.upsert_version(1, 3))
    view = _apply(tmp_path, outs).select(["key", "value_sum"]).to_pylist()

    final = Chain([rf.ops.Aggregate(by="key", aggs=aggs, emit="final"), drop_small])
    fs = final.init_states()
    final.process(fs, pa.table({"key": [1, 2, 1], "value": [10.0, 7.0, -8.0]}))
    want = sorted(pa.concat_tables(final.finish(fs)).to_pylist(), key=lambda r: r["key"])
    assert view == want, f"the view {view} is not the bounded result {want}"


# ----------------------------------------------------------------------------- 3. sinks' SQL


def _upserts(t: pa.Table) -> pa.Table:
    return t.replace_schema_metadata({UPSERT_KEY_METADATA: json.dumps(["key"]).encode()})


def test_the_latest_view_of_a_parquet_sink_has_the_column_an_aggregation_added_on_resume(tmp_path):
    """b80fb05 makes the DuckDB view gain the column of an aggregation added on resume (compat lets
    a resumed job add one over a new nullable input column). A Parquet sink's ``rayflow sql``
    (sinks/duckdb.py query_files) reads its files through ``pyarrow.dataset.dataset(files)``,
    whose schema is the *first* file's: the resumed run's column is invisible in ``output`` and
    ``latest`` (a query naming it fails with a binder error)."""
    from rayflow._internal.checkpoint.store import Store
    from rayflow.sinks.duckdb import query_files

    store = Store(str(tmp_path / "out"))
    v1, v2 = pt.upsert_version(1, 1), pt.upsert_version(2, 2)
    run1 = pa.table({"key": [1], "value_count": [1], VERSION_COLUMN: pa.array([v1], pa.int64())})
    run2 = pa.table(
        {"key": [1], "value_count": [2], "extra_sum": [3.0], VERSION_COLUMN: pa.array([v2], pa.int64())}
    )
    store.write_parquet("p0/c1.parquet", _upserts(run1))
    store.write_parquet("p0/c2.parquet", _upserts(run2))
    got = query_files(store, "SELECT key, value_count, extra_sum FROM latest").to_pylist()
    assert got == [{"key": 1, "value_count": 2, "extra_sum": 3.0}]


# ----------------------------------------------------------------------------- 5. Kafka on_commit

_ON_COMMIT = textwrap.dedent(
    """
    import socket, sys, threading, time
    import rayflow as rf
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()  # nobody listens
    src = rf.sources.Kafka("t", bootstrap_servers=f"127.0.0.1:{port}", group_id="g",
                           connect_timeout_s=1.0, schema=__import__("pyarrow").schema([("x", "int64")]))
    done = threading.Event()
    def tell():
        src.on_commit({"kafka:t/0": 10})
        done.set()
    threading.Thread(target=tell, daemon=True).start()
    took = 0.0 if done.wait(WAIT) else None
    print("on_commit returned" if took is not None else "on_commit still blocked", flush=True)
    closed = threading.Event()
    def close():
        src.close()
        closed.set()
    threading.Thread(target=close, daemon=True).start()
    print("close returned" if closed.wait(WAIT) else "close still blocked", flush=True)
    sys.stdout.flush()
    import os; os._exit(0)
    """
)


def _has_kafka() -> bool:
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_kafka(), reason="confluent-kafka is not installed")
def test_kafka_on_commit_and_close_return_when_the_broker_is_down(tmp_path):
    """Source.on_commit's contract: "informational and best effort ... must not raise"; the
    manager calls it every 5 s, at HEAD (396eb05/b80fb05) via ``_maintain`` on its single I/O
    thread, which also records every commit (manager.commit -> _in_io(self._record)). Kafka's
    ``commit(asynchronous=False)`` has no timeout (librdkafka waits for the group coordinator):
    with the broker down the I/O thread is held, every commit call waits behind it until
    call_timeout_s (120 s) and commit_max_failing_s (120 s) fail the job. The working tree moves
    the call to a thread of its own, but ``close()`` (manager._close_io, on the I/O thread, at the
    end of every run) then closes the committer while that thread is still inside commit().
    Run in a subprocess: a client closed under a concurrent call may crash the process."""
    script = _ON_COMMIT.replace("WAIT", "8.0")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    out = p.stdout
    assert p.returncode == 0, f"the process died (rc {p.returncode}): {out}\n{p.stderr[-2000:]}"
    assert "on_commit returned" in out, f"Kafka.on_commit blocks past 8 s with the broker down: {out}"
    assert "close returned" in out, f"Kafka.close blocks past 8 s: {out}"
