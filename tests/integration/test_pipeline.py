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


@pytest.mark.parametrize("consumers", [1, 3])
def test_keyed_1m_equals_duckdb(ray_session, job, events_1m, consumers):
    result = job(
        f"keyed-{consumers}", rf.sources.Synthetic(events=1_000_000), partitions=8, consumers=consumers
    ).run(timeout_s=300)
    assert_same_rows(result.output, duckdb_reference(KEYED_SQL, events=events_1m))
    assert result.stats["events"] == 1_000_000
    assert result.stats["consumers"] == consumers


def test_parquet_sink_and_source_directory(ray_session, tmp_path, job, events_1m):
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    for i in range(3):  # three files -> three splits
        pq.write_table(
            events_1m.slice(i * 300_000, 300_000), src_dir / f"part-{i}.parquet", row_group_size=70_000
        )
    out_dir = tmp_path / "out"
    result = job(
        "pq",
        rf.sources.Parquet(str(src_dir), batch_rows=100_000),
        partitions=8,
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


def test_csv_and_json_glob_sources(ray_session, tmp_path, job):
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
        aggs = [("amount", "count"), ("amount", "sum"), ("amount", "max")]
        result = job(name, source, key="user", operator=rf.ops.Aggregate(by="user", aggs=aggs)).run(
            timeout_s=300
        )
        assert_same_rows(result.output, expected)


def test_map_filter_chain_outputs_every_row_once(ray_session, job, events_1m):
    chain = [
        rf.ops.Filter(pc.field("value") < 100.0),
        rf.ops.Map(lambda t: t.append_column("double", pc.multiply(t["value"], 2.0))),
    ]
    small = events_1m.slice(0, 200_000)
    result = job("chain", small, batch_rows=25_000, operator=chain, checkpoint_interval_s=0.2).run(
        timeout_s=300
    )
    expected = duckdb_reference(
        "SELECT key, value, ts, value * 2 AS double FROM events WHERE value < 100", events=small
    )
    assert_same_rows(result.output, expected)


def test_resume_after_stop_gives_the_uninterrupted_result(ray_session, tmp_path, job, events_1m):
    """Stopped at a fault point (consumer-0 held after its third step), not at a time."""
    import threading

    from ray._common.test_utils import wait_for_condition

    from rayflow.testing import Fault, FaultPlan

    data = events_1m.slice(0, 400_000)
    expected = duckdb_reference(KEYED_SQL, events=data)

    def make(faults=None):
        return job(
            "resume",
            rf.sources.Table(data, batch_rows=20_000),
            partitions=4,
            consumers=2,
            operator=[throttle(400_000), rf.ops.Aggregate(by="key", aggs=AGG)],
            checkpoint_interval_s=0.1,
            config=rf.EngineConfig(fetch_max_bytes=100_000),
            faults=faults,
        )

    plan = FaultPlan(
        [Fault(point="consumer.step", actor="consumer-0", nth=3, action="pause")], dir=str(tmp_path / "f")
    )
    run = make(plan).start()
    wait_for_condition(lambda: bool(plan.fired()), timeout=60)
    stopper = threading.Thread(target=run.stop)
    stopper.start()  # the stop waits for consumer-0's held step: release it
    plan.resume()
    stopper.join(timeout=120)
    assert not stopper.is_alive(), "stop() did not return"
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


def test_running_a_finished_job_again_returns_the_same_output(ray_session, job, events_small):
    first = job("again", events_small, partitions=2, consumers=1).run(timeout_s=120)
    second = job("again", events_small, partitions=2, consumers=1).run(timeout_s=120)
    assert second.stats["events"] == 0
    assert_same_rows(second.output, first.output)


def test_mean_min_max_aggregate(ray_session, job, events_1m):
    data = events_1m.slice(0, 100_000)
    aggs = [("value", "mean"), ("value", "min"), ("value", "max"), ("ts", "count")]
    result = job(
        "mean",
        rf.sources.Table(data, batch_rows=10_000),
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


def _object_refs(obj, depth: int = 3) -> list:
    """ObjectRefs reachable from ``obj`` through attributes, lists, tuples and dicts."""
    import ray

    if isinstance(obj, ray.ObjectRef):
        return [obj]
    if depth == 0:
        return []
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("rayflow"):
        items = list(vars(obj).values())
    else:
        return []
    return [r for x in items for r in _object_refs(x, depth - 1)]


def test_source_and_manager_restart_with_no_object_ref_held(ray_session, tmp_path, job, events_1m):
    """Defect 8: restartable actors must not depend on constructor arguments in the object
    store (ray-project/ray#53727). The driver holds no reference at all; the source and the
    manager are killed midway and restarted by Ray; the job still ends exactly once."""
    import gc

    from ray._common.test_utils import wait_for_condition

    from rayflow.testing import Fault, FaultPlan

    data = events_1m.slice(0, 120_000)  # ~3 MB: Ray would put it in the object store
    plan = FaultPlan(
        [
            Fault(point="source.batch", actor="source-0", nth=6),
            Fault(point="manager.before_record", actor="manager", nth=3),
        ],
        dir=str(tmp_path / "faults"),
    )
    run = job(
        "restarts",
        rf.sources.Table(data, batch_rows=5_000),
        partitions=4,
        consumers=2,
        operator=[throttle(100_000), rf.ops.Aggregate(by="key", aggs=AGG)],
        checkpoint_interval_s=0.1,
        config=rf.EngineConfig(fetch_max_bytes=100_000),
        faults=plan,
    ).start()
    gc.collect()
    assert _object_refs(run) == [], "the driver must not pin constructor arguments"
    wait_for_condition(lambda: len(plan.fired()) == 2, timeout=120)
    result = run.wait(timeout_s=300)
    assert_same_rows(result.output, duckdb_reference(KEYED_SQL, events=data))


def test_relative_paths_resolve_in_the_driver_cwd(ray_session, tmp_path, monkeypatch, job, events_1m):
    """Defect 9: relative checkpoint and sink paths mean the driver's working directory, not
    each actor's (Ray's workers run elsewhere)."""
    import os

    import ray

    driver = tmp_path / "driver"
    driver.mkdir()
    monkeypatch.chdir(driver)
    probe = ray.remote(lambda: os.getcwd())
    assert ray.get(probe.remote(), timeout=60) != str(driver), "the test needs actors in another cwd"
    data = events_1m.slice(0, 20_000)
    import pyarrow.parquet as pq

    pq.write_table(data, driver / "in.parquet")
    result = job(
        "relative",
        rf.sources.Parquet("in.parquet"),  # a relative input path too
        partitions=2,
        consumers=1,
        sink=rf.sinks.Parquet("out"),
        checkpoint_dir="ck",
    ).run(timeout_s=120)
    assert result.output_path == str(driver / "out")
    assert (driver / "ck" / "relative" / "catalog.duckdb").exists()
    out = pads.dataset(str(driver / "out"), format="parquet").to_table()
    assert_same_rows(out, duckdb_reference(KEYED_SQL, events=data))
