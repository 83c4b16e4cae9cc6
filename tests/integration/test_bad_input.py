"""Bad input gets a clear, typed error, never a hang, and nothing false is committed."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import rayflow as rf
from rayflow.errors import (
    ConfigError,
    EmptyInputError,
    MalformedInputError,
    MissingKeyColumnError,
    SourceNotFoundError,
    UnsupportedKeyTypeError,
)

pytestmark = pytest.mark.ray

AGG = rf.ops.Aggregate(by="key", aggs=[("value", "sum")])


@pytest.fixture
def pipeline(job):
    """``pipeline(source, **kw)``: the job of this file (``job`` from conftest), named ``bad``."""

    def make(source, **kw):
        kw.setdefault("operator", AGG)
        return job("bad", source, partitions=2, consumers=1, **kw)

    return make


def test_missing_key_column(ray_session, tmp_path, pipeline):
    t = pa.table({"user": [1, 2], "value": [1.0, 2.0]})
    with pytest.raises(
        MissingKeyColumnError, match=r"key column 'key' is not in the input.*\['user', 'value'\]"
    ):
        pipeline(rf.sources.Table(t)).run(timeout_s=60)
    with pytest.raises(KeyError):  # catchable as the builtin too
        pipeline(rf.sources.Table(t)).run(timeout_s=60)


def test_unsupported_key_type(ray_session, tmp_path, pipeline):
    t = pa.table({"key": [1.5, 2.5], "value": [1.0, 2.0]})
    with pytest.raises(UnsupportedKeyTypeError, match=r"'key' has type double.*cast the column to int64"):
        pipeline(rf.sources.Table(t)).run(timeout_s=60)


def test_empty_inputs(ray_session, tmp_path, pipeline):
    empty = pa.table({"key": pa.array([], pa.int64()), "value": pa.array([], pa.float64())})
    with pytest.raises(EmptyInputError, match="holds no rows"):
        pipeline(rf.sources.Table(empty)).run(timeout_s=60)
    pq.write_table(empty, tmp_path / "empty.parquet")
    with pytest.raises(EmptyInputError, match="holds no rows"):
        pipeline(rf.sources.Parquet(str(tmp_path / "empty.parquet"))).run(timeout_s=60)
    (tmp_path / "empty.csv").write_text("key,value\n")
    with pytest.raises(EmptyInputError, match="holds no rows"):
        pipeline(rf.sources.CSV(str(tmp_path / "empty.csv"))).run(timeout_s=60)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(EmptyInputError, match="holds no Parquet files"):
        pipeline(rf.sources.Parquet(str(tmp_path / "emptydir"))).run(timeout_s=60)


def test_missing_file(ray_session, tmp_path, pipeline):
    with pytest.raises(SourceNotFoundError, match=r"does not exist; pass an existing file"):
        pipeline(rf.sources.Parquet(str(tmp_path / "nope.parquet"))).run(timeout_s=60)
    with pytest.raises(FileNotFoundError, match="matched no CSV files"):
        pipeline(rf.sources.CSV(str(tmp_path / "nope-*.csv"))).run(timeout_s=60)


def test_malformed_csv_row_mid_stream(ray_session, tmp_path, pipeline):
    good = pa.table({"key": list(range(20_000)), "value": [1.0] * 20_000})
    path = tmp_path / "in.csv"
    pacsv.write_csv(good, path)
    with open(path, "a") as f:
        f.write("7,1.0,extra\n")  # one column too many
    opts = {"read_options": pacsv.ReadOptions(block_size=1 << 14)}
    with pytest.raises(MalformedInputError, match=r"in.csv' could not be parsed.*Expected 2 columns, got 3"):
        pipeline(rf.sources.CSV(str(path), batch_rows=1000, **opts)).run(timeout_s=120)
    # Nothing recorded as committed beyond what was processed: no final commit, and
    # every committed row count is covered by its positions.
    con = duckdb.connect(str(tmp_path / "ck" / "bad" / "catalog.duckdb"), read_only=True)
    finals = con.execute("SELECT count(*) FROM commits WHERE final").fetchone()[0]
    con.close()
    assert finals == 0


def test_malformed_csv_at_start(ray_session, tmp_path, pipeline):
    path = tmp_path / "bad.csv"
    path.write_text("key,value\n1,2.0\n3\n")
    with pytest.raises(MalformedInputError, match="Expected 2 columns, got 1"):
        pipeline(rf.sources.CSV(str(path))).run(timeout_s=60)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"partitions": 0}, "partitions must be an integer >= 1, got 0"),
        ({"consumers": 0}, "consumers must be an integer >= 1, got 0"),
        ({"consumers": -2}, "consumers must be an integer >= 1, got -2"),
        ({"checkpoint_interval_s": 0}, "checkpoint_interval_s must be > 0"),
        ({"name": "a/b"}, "name must be"),
    ],
)
def test_config_errors(tmp_path, kw, match):
    args = dict(name="cfg", source=rf.sources.Synthetic(events=10), key="key", checkpoint_dir=str(tmp_path))
    args.update(kw)
    with pytest.raises(ConfigError, match=match):
        rf.Pipeline(**args)
    with pytest.raises(ValueError):
        rf.Pipeline(**args)


def test_aggregate_must_group_by_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"must group by the pipeline key \['key'\]"):
        rf.Pipeline(
            name="x",
            source=rf.sources.Synthetic(events=10),
            key="key",
            operator=rf.ops.Aggregate(by="ts", aggs=[("value", "sum")]),
            checkpoint_dir=str(tmp_path),
        )


def test_changed_job_shape_is_refused_on_resume(ray_session, job, pipeline):
    t = pa.table({"key": list(range(100)), "value": [1.0] * 100})
    pipeline(rf.sources.Table(t)).run(timeout_s=60)
    other = rf.ops.Aggregate(by="key", aggs=[("value", "max")])
    with pytest.raises(rf.errors.IncompatibleCheckpointError, match=r"adds \('value', 'max'\)"):
        pipeline(rf.sources.Table(t), operator=other).run(timeout_s=60)
    # Another partition count is no change of shape: the finished state is re-split (2 -> 3 merges
    # at the end of input, a consistent cut), and the job has nothing left to do.
    rerun = job("bad", rf.sources.Table(t), partitions=3, consumers=1, operator=AGG).run(timeout_s=60)
    assert rerun.stats["events"] == 0


def test_resume_evolves_an_added_nullable_column(ray_session, tmp_path, job):
    """Stopped midway, the job resumes over an input that gained a nullable column, with a
    new aggregation over it; the result equals DuckDB over all the rows."""
    import pyarrow.parquet as pq
    from ray._common.test_utils import wait_for_condition

    from rayflow.testing import assert_same_rows, duckdb_reference, throttle

    d = tmp_path / "in"
    d.mkdir()
    a = rf.sources.Synthetic(events=60_000, keys=500, seed=3).to_table().select(["key", "value"])
    pq.write_table(a, d / "a.parquet")

    def evolve(aggs):
        return job(
            "evolve",
            rf.sources.Parquet(str(d), batch_rows=2_000),
            partitions=2,
            consumers=1,
            operator=[throttle(30_000), rf.ops.Aggregate(by="key", aggs=aggs)],
            checkpoint_interval_s=0.1,
            config=rf.EngineConfig(fetch_max_bytes=50_000),
        )

    run = evolve([("value", "sum")]).start()
    wait_for_condition(lambda: any(p["committed_rows"] > 0 for p in run.status()["partitions"]), timeout=60)
    run.stop()
    b = pa.table({"key": [1, 4, 7], "value": [10.0, 20.0, 30.0], "extra": pa.array([7, None, 9], pa.int64())})
    pq.write_table(b, d / "b.parquet")
    out = evolve([("value", "sum"), ("extra", "count"), ("extra", "sum")]).run(timeout_s=120).output
    both = pa.concat_tables([a, b], promote_options="default")
    expected = duckdb_reference(
        "SELECT key, sum(value) AS value_sum, count(extra) AS extra_count, sum(extra) AS extra_sum "
        "FROM t GROUP BY key",
        t=both,
    )
    assert_same_rows(out, expected, columns=["key", "value_sum", "extra_count", "extra_sum"])


def test_a_finished_job_refuses_new_input(ray_session, tmp_path, pipeline):
    import pyarrow.parquet as pq

    d = tmp_path / "in"
    d.mkdir()
    pq.write_table(pa.table({"key": [1, 2], "value": [1.0, 2.0]}), d / "a.parquet")
    pipeline(rf.sources.Parquet(str(d))).run(timeout_s=60)
    pq.write_table(pa.table({"key": [3], "value": [3.0]}), d / "b.parquet")
    with pytest.raises(rf.errors.IncompatibleCheckpointError, match=r"finished.*b.parquet"):
        pipeline(rf.sources.Parquet(str(d))).run(timeout_s=60)


def test_a_column_of_the_wrong_type_is_refused_before_the_job_starts(ray_session, tmp_path, pipeline):
    """A CSV whose ``value`` column reads as strings: refused at start with what to do, not
    failed in a consumer with a Ray traceback."""
    path = tmp_path / "in.csv"
    path.write_text('key,value\n1,"12,5"\n2,"3,0"\n1,"1,0"\n')  # decimal commas: read as strings
    with pytest.raises(rf.errors.InputError) as e:
        pipeline(rf.sources.CSV(str(path))).run(timeout_s=60)
    msg = str(e.value)
    assert msg.startswith("rf.ops.Aggregate(by=['key'], aggs=[('value', 'sum')]): ('value', 'sum')"), msg
    assert "column 'value' of type string" in msg and "rf.ops.Map" in msg and "column_types" in msg
    assert "Traceback" not in msg and len(msg) < 800
    assert not (tmp_path / "ck" / "bad").exists(), "nothing may start (or be written) for a refused job"
    # Told what to do, the user reads the column as numbers, and the job runs.
    opts = pacsv.ConvertOptions(column_types={"value": pa.float64()}, decimal_point=",")
    out = pipeline(rf.sources.CSV(str(path), convert_options=opts)).run(timeout_s=60).output
    assert sorted(out.to_pylist(), key=lambda r: r["key"]) == [
        {"key": 1, "value_sum": 13.5},
        {"key": 2, "value_sum": 3.0},
    ]


def test_an_error_in_a_user_function_comes_back_as_itself(ray_session, tmp_path, pipeline):
    t = pa.table({"key": list(range(100)), "value": [1.0] * 100})

    def explode(table):
        return table.append_column("r", pa.array([1 / 0] * table.num_rows))

    with pytest.raises(ZeroDivisionError) as e:
        pipeline(rf.sources.Table(t), operator=rf.ops.Map(explode)).run(timeout_s=60)
    assert type(e.value) is ZeroDivisionError, type(e.value)  # not a RayTaskError
    assert str(e.value) == "division by zero"
    notes = "\n".join(e.value.__notes__)
    assert "raised by operator #0 rf.ops.Map(" in notes and "explode" in notes
    assert "of partition" in notes and "in consumer 'consumer-0' of pipeline 'bad'" in notes
