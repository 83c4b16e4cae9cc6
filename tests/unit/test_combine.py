"""Combining at the source (no Ray): partials merged by the Aggregate equal the Aggregate over
the rows (DuckDB), and the combinations that cannot be exact are refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rayflow as rf
from rayflow._internal.combine import COMBINED_ROWS, check_new_splits, combiner_for, input_rows, is_combined
from rayflow._internal.watermarks import EventTime
from rayflow.errors import ConfigError
from rayflow.testing import assert_same_rows, duckdb_reference

AGGS = [("v", "count"), ("v", "sum"), ("v", "min"), ("v", "max"), ("v", "mean")]
SQL = (
    "SELECT k, count(v) AS v_count, sum(v) AS v_sum, min(v) AS v_min, max(v) AS v_max, avg(v) AS v_mean "
    "FROM events GROUP BY k"
)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 5), st.one_of(st.none(), st.integers(-9, 9))), max_size=30),
        min_size=1,
        max_size=5,
    )
)
def test_merged_partials_equal_the_aggregate_of_the_rows(batches):
    op = rf.ops.Aggregate(by="k", aggs=AGGS, combine_at_source=True).for_input(unbounded=False)
    combiner = combiner_for([op], key=["k"])
    schema = pa.schema([("k", pa.int64()), ("v", pa.int64())])
    tables = [pa.table({"k": [k for k, _ in b], "v": [v for _, v in b]}, schema=schema) for b in batches]
    state = op.init_state()
    for t in tables:
        if t.num_rows == 0:
            continue
        combined = pa.Table.from_batches([combiner.combine(b) for b in t.to_batches()])
        assert input_rows(combined) == t.num_rows and is_combined(combined)
        state, _ = op.process(state, combined)
    events = pa.concat_tables(tables)
    if events.num_rows == 0:
        return
    assert_same_rows(op.finish(state), duckdb_reference(SQL, events=events))


def test_an_input_column_named_like_the_marker_is_not_taken_for_partials():
    t = pa.table({"k": [1, 1], COMBINED_ROWS: [5, 5]})
    assert not is_combined(t) and input_rows(t) == 2


def test_refused_where_it_cannot_be_exact():
    agg = rf.ops.Aggregate(by="key", aggs=[("value", "sum")], combine_at_source=True)
    assert combiner_for([rf.ops.Aggregate(by="key", aggs=[("value", "sum")])], key=["key"]) is None
    with pytest.raises(ConfigError, match="only the chain's first operator"):
        combiner_for([rf.ops.Map(lambda t: t), agg], key=["key"])
    with pytest.raises(ConfigError, match="event_time"):
        combiner_for([agg], key=["key"], event_time=EventTime(column="ts"))
    with pytest.raises(ConfigError, match="several inputs"):
        combiner_for([agg], key=["key"], multi_input=True)

    @dataclasses.dataclass
    class Gappy:
        name: str = "topic-0"
        dense: bool = False

    with pytest.raises(ConfigError, match="positions with gaps"):
        combiner_for([agg], key=["key"], splits=[Gappy()])
    # A dynamic source may list no such split at the start and one later: refused then too.
    combiner = combiner_for([agg], key=["key"], splits=[])
    check_new_splits(combiner, [Gappy(dense=True)])
    check_new_splits(None, [Gappy()])  # the job does not combine
    with pytest.raises(ConfigError, match="positions with gaps"):
        check_new_splits(combiner, [Gappy(dense=True), Gappy()])
    with pytest.raises(ConfigError, match="key columns"):
        combiner_for(
            [rf.ops.Aggregate(by="other", aggs=[("value", "sum")], combine_at_source=True)], key=["key"]
        )
    with pytest.raises(ConfigError, match="True or False"):
        rf.ops.Aggregate(by="key", aggs=[("value", "sum")], combine_at_source="yes")


def test_a_pipeline_that_cannot_combine_fails_at_start(tmp_path):
    """The check runs when the job starts, before any actor: a typed error, no Ray needed."""
    events = pa.table({"key": np.arange(10), "value": np.ones(10)})
    p = rf.Pipeline(
        name="bad",
        source=rf.sources.Table(events),
        key="key",
        operator=[
            rf.ops.Filter(pa.compute.field("value") > 0),
            rf.ops.Aggregate(by="key", aggs=[("value", "sum")], combine_at_source=True),
        ],
        checkpoint_dir=str(tmp_path),
    )
    with pytest.raises(ConfigError, match="first operator"):
        p.start()
