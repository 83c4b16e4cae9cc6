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


def pipeline(source, tmp_path, key="key", **kw):
    kw.setdefault("operator", AGG)
    return rf.Pipeline(
        name="bad",
        source=source,
        key=key,
        partitions=2,
        consumers=1,
        checkpoint_dir=str(tmp_path / "ck"),
        progress=False,
        **kw,
    )


def test_missing_key_column(ray_session, tmp_path):
    t = pa.table({"user": [1, 2], "value": [1.0, 2.0]})
    with pytest.raises(
        MissingKeyColumnError, match=r"key column 'key' is not in the input.*\['user', 'value'\]"
    ):
        pipeline(rf.sources.Table(t), tmp_path).run(timeout_s=60)
    with pytest.raises(KeyError):  # catchable as the builtin too
        pipeline(rf.sources.Table(t), tmp_path).run(timeout_s=60)


def test_unsupported_key_type(ray_session, tmp_path):
    t = pa.table({"key": [1.5, 2.5], "value": [1.0, 2.0]})
    with pytest.raises(UnsupportedKeyTypeError, match=r"'key' has type double.*cast the column to int64"):
        pipeline(rf.sources.Table(t), tmp_path).run(timeout_s=60)


def test_empty_inputs(ray_session, tmp_path):
    empty = pa.table({"key": pa.array([], pa.int64()), "value": pa.array([], pa.float64())})
    with pytest.raises(EmptyInputError, match="holds no rows"):
        pipeline(rf.sources.Table(empty), tmp_path).run(timeout_s=60)
    pq.write_table(empty, tmp_path / "empty.parquet")
    with pytest.raises(EmptyInputError, match="holds no rows"):
        pipeline(rf.sources.Parquet(str(tmp_path / "empty.parquet")), tmp_path).run(timeout_s=60)
    (tmp_path / "empty.csv").write_text("key,value\n")
    with pytest.raises(EmptyInputError, match="holds no rows"):
        pipeline(rf.sources.CSV(str(tmp_path / "empty.csv")), tmp_path).run(timeout_s=60)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(EmptyInputError, match="holds no Parquet files"):
        pipeline(rf.sources.Parquet(str(tmp_path / "emptydir")), tmp_path).run(timeout_s=60)


def test_missing_file(ray_session, tmp_path):
    with pytest.raises(SourceNotFoundError, match=r"does not exist; pass an existing file"):
        pipeline(rf.sources.Parquet(str(tmp_path / "nope.parquet")), tmp_path).run(timeout_s=60)
    with pytest.raises(FileNotFoundError, match="matched no CSV files"):
        pipeline(rf.sources.CSV(str(tmp_path / "nope-*.csv")), tmp_path).run(timeout_s=60)


def test_malformed_csv_row_mid_stream(ray_session, tmp_path):
    good = pa.table({"key": list(range(20_000)), "value": [1.0] * 20_000})
    path = tmp_path / "in.csv"
    pacsv.write_csv(good, path)
    with open(path, "a") as f:
        f.write("7,1.0,extra\n")  # one column too many
    opts = {"read_options": pacsv.ReadOptions(block_size=1 << 14)}
    with pytest.raises(MalformedInputError, match=r"in.csv' could not be parsed.*Expected 2 columns, got 3"):
        pipeline(rf.sources.CSV(str(path), batch_rows=1000, **opts), tmp_path).run(timeout_s=120)
    # Nothing recorded as committed beyond what was processed: no final commit, and
    # every committed row count is covered by its positions.
    con = duckdb.connect(str(tmp_path / "ck" / "bad" / "catalog.duckdb"), read_only=True)
    finals = con.execute("SELECT count(*) FROM commits WHERE final").fetchone()[0]
    con.close()
    assert finals == 0


def test_malformed_csv_at_start(ray_session, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("key,value\n1,2.0\n3\n")
    with pytest.raises(MalformedInputError, match="Expected 2 columns, got 1"):
        pipeline(rf.sources.CSV(str(path)), tmp_path).run(timeout_s=60)


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


def test_changed_job_shape_is_refused_on_resume(ray_session, tmp_path):
    t = pa.table({"key": list(range(100)), "value": [1.0] * 100})
    pipeline(rf.sources.Table(t), tmp_path).run(timeout_s=60)
    other = rf.ops.Aggregate(by="key", aggs=[("value", "max")])
    with pytest.raises(rf.errors.IncompatibleCheckpointError, match=r"adds \('value', 'max'\)"):
        pipeline(rf.sources.Table(t), tmp_path, operator=other).run(timeout_s=60)
    with pytest.raises(rf.errors.IncompatibleCheckpointError, match="partition_map"):
        rf.Pipeline(
            name="bad",
            source=rf.sources.Table(t),
            key="key",
            partitions=3,
            consumers=1,
            operator=AGG,
            checkpoint_dir=str(tmp_path / "ck"),
            progress=False,
        ).run(timeout_s=60)


def test_resume_evolves_an_added_nullable_column(ray_session, tmp_path):
    """Stopped midway, the job resumes over an input that gained a nullable column, with a
    new aggregation over it; the result equals DuckDB over all the rows."""
    import pyarrow.parquet as pq
    from ray._common.test_utils import wait_for_condition

    from rayflow.testing import assert_same_rows, duckdb_reference, throttle

    d = tmp_path / "in"
    d.mkdir()
    a = rf.sources.Synthetic(events=60_000, keys=500, seed=3).to_table().select(["key", "value"])
    pq.write_table(a, d / "a.parquet")

    def job(aggs):
        return rf.Pipeline(
            name="evolve",
            source=rf.sources.Parquet(str(d), batch_rows=2_000),
            key="key",
            partitions=2,
            consumers=1,
            operator=[throttle(30_000), rf.ops.Aggregate(by="key", aggs=aggs)],
            checkpoint_dir=str(tmp_path / "ck"),
            checkpoint_interval_s=0.1,
            config=rf.EngineConfig(fetch_max_bytes=50_000),
            progress=False,
        )

    run = job([("value", "sum")]).start()
    wait_for_condition(lambda: any(p["committed_rows"] > 0 for p in run.status()["partitions"]), timeout=60)
    run.stop()
    b = pa.table({"key": [1, 4, 7], "value": [10.0, 20.0, 30.0], "extra": pa.array([7, None, 9], pa.int64())})
    pq.write_table(b, d / "b.parquet")
    out = job([("value", "sum"), ("extra", "count"), ("extra", "sum")]).run(timeout_s=120).output
    both = pa.concat_tables([a, b], promote_options="default")
    expected = duckdb_reference(
        "SELECT key, sum(value) AS value_sum, count(extra) AS extra_count, sum(extra) AS extra_sum "
        "FROM t GROUP BY key",
        t=both,
    )
    assert_same_rows(out, expected, columns=["key", "value_sum", "extra_count", "extra_sum"])


def test_a_finished_job_refuses_new_input(ray_session, tmp_path):
    import pyarrow.parquet as pq

    d = tmp_path / "in"
    d.mkdir()
    pq.write_table(pa.table({"key": [1, 2], "value": [1.0, 2.0]}), d / "a.parquet")
    pipeline(rf.sources.Parquet(str(d)), tmp_path).run(timeout_s=60)
    pq.write_table(pa.table({"key": [3], "value": [3.0]}), d / "b.parquet")
    with pytest.raises(rf.errors.IncompatibleCheckpointError, match=r"finished.*b.parquet"):
        pipeline(rf.sources.Parquet(str(d)), tmp_path).run(timeout_s=60)
