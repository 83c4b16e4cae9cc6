"""The keyed job end to end on a real local Ray, checked against DuckDB over the same input."""

from __future__ import annotations

import json

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import rayflow as rf
from rayflow.testing import KEYED_SQL, assert_same_rows, duckdb_reference, throttle

pytestmark = pytest.mark.ray

AGG = [("value", "count"), ("value", "sum")]


@pytest.fixture(scope="module")
def events_1m() -> pa.Table:
    return rf.sources.Synthetic(events=1_000_000, keys=100_000, seed=42).to_table()


def keyed(name, source, tmp_path, **kw) -> rf.Pipeline:
    kw.setdefault("partitions", 8)
    kw.setdefault("operator", rf.ops.Aggregate(by="key", aggs=AGG))
    return rf.Pipeline(
        name=name, source=source, key="key", checkpoint_dir=str(tmp_path / "ck"), progress=False, **kw
    )


@pytest.mark.parametrize("consumers", [1, 3])
def test_keyed_1m_equals_duckdb(ray_session, tmp_path, events_1m, consumers):
    result = keyed(
        f"keyed-{consumers}", rf.sources.Synthetic(events=1_000_000), tmp_path, consumers=consumers
    ).run(timeout_s=300)
    assert_same_rows(result.output, duckdb_reference(KEYED_SQL, events=events_1m))
    assert result.stats["events"] == 1_000_000
    assert result.stats["consumers"] == consumers


def test_parquet_sink_and_source_directory(ray_session, tmp_path, events_1m):
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    for i in range(3):  # three files -> three splits
        pq.write_table(
            events_1m.slice(i * 300_000, 300_000), src_dir / f"part-{i}.parquet", row_group_size=70_000
        )
    out_dir = tmp_path / "out"
    result = keyed(
        "pq",
        rf.sources.Parquet(str(src_dir), batch_rows=100_000),
        tmp_path,
        sink=rf.sinks.Parquet(str(out_dir)),
        consumers=2,
    ).run(timeout_s=300)
    assert result.output is None
    out = pads.dataset(str(out_dir), format="parquet").to_table()
    assert_same_rows(out, duckdb_reference(KEYED_SQL, events=events_1m.slice(0, 900_000)))
    # the key column's state was written sorted by hash, with the hash alongside
    con = duckdb.connect(str(tmp_path / "ck" / "pq" / "catalog.duckdb"), read_only=True)
    files = [
        f
        for (r,) in con.execute("SELECT state_files FROM commits WHERE final").fetchall()
        for f in json.loads(r)
    ]
    con.close()
    state = pq.read_table(tmp_path / "ck" / "pq" / files[0])
    h = state["_hash"].to_numpy()
    assert (h[1:] >= h[:-1]).all()


def test_csv_and_json_glob_sources(ray_session, tmp_path):
    t = pa.table(
        {
            "user": pa.array([f"u{i % 37}" for i in range(5_000)]),
            "amount": pa.array([float(i % 101) for i in range(5_000)]),
        }
    )
    for i in range(2):
        pacsv.write_csv(t.slice(i * 2500, 2500), tmp_path / f"in-{i}.csv")
    with open(tmp_path / "in.json", "w") as f:
        for row in t.to_pylist():
            f.write(json.dumps(row) + "\n")
    sql = "SELECT user, count(amount) AS amount_count, sum(amount) AS amount_sum, max(amount) AS amount_max FROM events GROUP BY user"
    expected = duckdb_reference(sql, events=t)
    for name, source in (
        ("csv", rf.sources.CSV(str(tmp_path / "in-*.csv"), batch_rows=700)),
        ("json", rf.sources.JSON(str(tmp_path / "in.json"), batch_rows=700)),
    ):
        result = rf.Pipeline(
            name=name,
            source=source,
            key="user",
            partitions=4,
            consumers=2,
            operator=rf.ops.Aggregate(
                by="user", aggs=[("amount", "count"), ("amount", "sum"), ("amount", "max")]
            ),
            checkpoint_dir=str(tmp_path / "ck"),
            progress=False,
        ).run(timeout_s=300)
        assert_same_rows(result.output, expected)


def test_map_filter_chain_outputs_every_row_once(ray_session, tmp_path, events_1m):
    chain = [
        rf.ops.Filter(pc.field("value") < 100.0),
        rf.ops.Map(lambda t: t.append_column("double", pc.multiply(t["value"], 2.0))),
    ]
    small = events_1m.slice(0, 200_000)
    result = rf.Pipeline(
        name="chain",
        source=rf.sources.Table(small, batch_rows=25_000),
        key="key",
        partitions=4,
        operator=chain,
        consumers=2,
        checkpoint_dir=str(tmp_path / "ck"),
        checkpoint_interval_s=0.2,
        progress=False,
    ).run(timeout_s=300)
    expected = duckdb_reference(
        "SELECT key, value, ts, value * 2 AS double FROM events WHERE value < 100", events=small
    )
    assert_same_rows(result.output, expected)


def test_resume_after_stop_gives_the_uninterrupted_result(ray_session, tmp_path, events_1m):
    data = events_1m.slice(0, 400_000)
    expected = duckdb_reference(KEYED_SQL, events=data)

    def make():
        return keyed(
            "resume",
            rf.sources.Table(data, batch_rows=20_000),
            tmp_path,
            partitions=4,
            consumers=2,
            operator=[throttle(200_000), rf.ops.Aggregate(by="key", aggs=AGG)],
            checkpoint_interval_s=0.1,
            config=rf.EngineConfig(fetch_max_bytes=100_000),
        )

    from ray._common.test_utils import wait_for_condition

    run = make().start()
    wait_for_condition(lambda: 0 < run.status()["processed_rows"], timeout=60)
    wait_for_condition(lambda: any(p["committed_rows"] > 0 for p in run.status()["partitions"]), timeout=60)
    run.stop()
    con = duckdb.connect(str(tmp_path / "ck" / "resume" / "catalog.duckdb"), read_only=True)
    committed, finals = con.execute(
        "SELECT sum(rows_total), count(*) FILTER (WHERE final) FROM (SELECT * FROM commits "
        "QUALIFY row_number() OVER (PARTITION BY partition ORDER BY commit_id DESC) = 1)"
    ).fetchone()
    con.close()
    assert 0 < committed < data.num_rows, "the stop should land midway"
    result = make().run(timeout_s=300)
    assert_same_rows(result.output, expected)
    assert result.stats["events"] == data.num_rows - committed


def test_running_a_finished_job_again_returns_the_same_output(ray_session, tmp_path, events_1m):
    data = events_1m.slice(0, 50_000)
    first = keyed("again", rf.sources.Table(data), tmp_path, partitions=2, consumers=1).run(timeout_s=120)
    second = keyed("again", rf.sources.Table(data), tmp_path, partitions=2, consumers=1).run(timeout_s=120)
    assert second.stats["events"] == 0
    assert_same_rows(second.output, first.output)


def test_mean_min_max_aggregate(ray_session, tmp_path, events_1m):
    data = events_1m.slice(0, 100_000)
    aggs = [("value", "mean"), ("value", "min"), ("value", "max"), ("ts", "count")]
    result = keyed(
        "mean",
        rf.sources.Table(data, batch_rows=10_000),
        tmp_path,
        partitions=3,
        consumers=2,
        operator=rf.ops.Aggregate(by="key", aggs=aggs),
    ).run(timeout_s=120)
    expected = duckdb_reference(
        "SELECT key, avg(value) AS value_mean, min(value) AS value_min, max(value) AS value_max, "
        "count(ts) AS ts_count FROM events GROUP BY key",
        events=data,
    )
    got = result.output
    assert_same_rows(got, expected, columns=["key", "value_min", "value_max", "ts_count"])
    j = duckdb_reference(
        "SELECT max(abs(g.value_mean - e.value_mean)) AS d FROM g JOIN e USING (key)", g=got, e=expected
    )
    assert j["d"][0].as_py() < 1e-9
