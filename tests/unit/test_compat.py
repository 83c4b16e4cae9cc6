"""Resuming from a checkpoint of another job shape: what evolves, what is refused (pure)."""

from __future__ import annotations

import pyarrow as pa
import pytest

import rayflow as rf
from rayflow._internal.compat import JobMeta, check_resume
from rayflow.errors import IncompatibleCheckpointError

BASE_SCHEMA = pa.schema([("key", pa.int64()), ("value", pa.float64())])


def meta(schema=BASE_SCHEMA, aggs=(("value", "sum"),), by="key", partitions=4, splits=("a",)) -> JobMeta:
    return JobMeta.build(
        key=["key"],
        partition_map_json=rf.partitioning.PartitionMap.uniform(partitions).to_json(),
        operators=[rf.ops.Aggregate(by=by, aggs=list(aggs)).spec()],
        splits=list(splits),
        schema=schema,
    )


def test_same_shape_and_new_splits_resume():
    check_resume("j", meta(), meta())
    check_resume("j", meta(), meta(splits=("a", "b")))
    check_resume("j", None, meta())


def test_the_record_round_trips_through_the_catalog_form():
    m = meta()
    assert JobMeta.from_dict(m.to_dict()) == m
    assert JobMeta.from_dict({}) is None
    # A record of an older catalog (no splits, no schema) checks what it has.
    old = JobMeta.from_dict({k: v for k, v in m.to_dict().items() if k in ("key", "partition_map")})
    assert old.splits is None and old.input_schema is None
    check_resume("j", old, meta(splits=("b",)))
    with pytest.raises(IncompatibleCheckpointError, match="partition_map"):
        check_resume("j", old, meta(partitions=5))


def test_a_finished_job_takes_no_new_split():
    check_resume("j", meta(), meta(splits=("a", "b")), finished=False)
    with pytest.raises(IncompatibleCheckpointError, match=r"has finished.*\['b'\]"):
        check_resume("j", meta(), meta(splits=("a", "b")), finished=True)


def test_added_nullable_column_with_a_new_aggregation_evolves():
    wider = BASE_SCHEMA.append(pa.field("extra", pa.float64(), nullable=True))
    check_resume("j", meta(), meta(schema=wider, aggs=(("value", "sum"), ("extra", "max"))))


def test_dropping_an_aggregation_evolves():
    check_resume("j", meta(aggs=(("value", "sum"), ("value", "max"))), meta(aggs=(("value", "sum"),)))


def test_mean_from_kept_sum_and_count_evolves():
    check_resume("j", meta(aggs=(("value", "sum"), ("value", "count"))), meta(aggs=(("value", "mean"),)))


@pytest.mark.parametrize(
    ("new", "match"),
    [
        (meta(partitions=5), "partition_map"),
        (meta(schema=pa.schema([("key", pa.int64())])), "input column 'value' \\(double\\) is gone"),
        (
            meta(schema=pa.schema([("key", pa.int64()), ("value", pa.int64())])),
            "'value' changed type from double to int64",
        ),
        (
            meta(schema=BASE_SCHEMA.append(pa.field("x", pa.int64(), nullable=False))),
            "'x' \\(int64\\) is not nullable",
        ),
        (
            meta(aggs=(("value", "sum"), ("value", "max"))),
            "adds \\('value', 'max'\\).*already in the committed rows",
        ),
        (meta(splits=("b",)), "split\\(s\\) \\['a'\\] have committed positions"),
    ],
)
def test_refused_changes_name_what_and_what_to_do(new, match):
    with pytest.raises(IncompatibleCheckpointError, match=match) as e:
        check_resume("j", meta(), new)
    assert "new checkpoint_dir or name" in str(e.value)


def test_aggregate_state_gains_empty_partials():
    agg = rf.ops.Aggregate(by="key", aggs=[("value", "sum"), ("extra", "count"), ("extra", "max")])
    old_state = pa.table({"key": [1, 2], "value_sum": [1.0, 2.0]})
    state = agg.state_from_table(old_state)
    state, _ = agg.process(state, pa.table({"key": [1], "value": [3.0], "extra": [5.0]}))
    out = agg.finish(state).sort_by("key").to_pylist()
    assert out == [
        {"key": 1, "value_sum": 4.0, "extra_count": 1, "extra_max": 5.0},
        {"key": 2, "value_sum": 2.0, "extra_count": 0, "extra_max": None},
    ]


def test_a_resume_that_changes_the_emit_mode_is_refused():
    """A job that emitted final results cannot resume emitting changes (or back): the output of
    one mode misses what the other never emitted."""

    def emitting(mode: str, unbounded: bool) -> JobMeta:
        op = rf.ops.Aggregate(by="key", aggs=[("value", "sum")]).for_input(unbounded=unbounded)
        assert op.emit == mode
        return JobMeta.build(
            key=["key"],
            partition_map_json=rf.partitioning.PartitionMap.uniform(4).to_json(),
            operators=[op.spec()],
            splits=["a"],
            schema=BASE_SCHEMA,
        )

    check_resume("j", emitting("changes", True), emitting("changes", True))
    check_resume("j", meta(), emitting("final", False))  # a checkpoint from before emit= existed
    with pytest.raises(IncompatibleCheckpointError, match="emitted 'final' and would now emit 'changes'"):
        check_resume("j", emitting("final", False), emitting("changes", True))
    with pytest.raises(IncompatibleCheckpointError, match="emitted 'changes'"):
        check_resume("j", emitting("changes", True), emitting("final", False))
