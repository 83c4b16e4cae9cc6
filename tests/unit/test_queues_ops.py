"""Partition queues (bounds, fetch-after, trim) and operators, without Ray."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rayflow as rf
from rayflow._internal.chain import Chain
from rayflow._internal.queues import Entry, PartitionQueue, QueueState
from rayflow.testing import assert_same_rows, duckdb_reference


def entry(split, start, end):
    return Entry(split, start, end, end - start, (end - start) * 10, f"{split}:{end}")


def test_queue_bounds_fetch_and_trim():
    q = PartitionQueue(0, max_rows=250, max_bytes=10**9)
    for a in range(0, 300, 100):
        q.append(entry("s", a, a + 100))
    assert q.full and q.rows == 300
    got, rest = q.after({"s": 100}, max_bytes=1500)
    assert [e.end for e in got] == [200] and rest
    got, rest = q.after({"s": 100}, max_bytes=10**9)
    assert [e.end for e in got] == [200, 300] and not rest
    assert q.trim({"s": 200}) == 200
    assert not q.full and [e.end for e in q.entries] == [300]


def test_queue_lifecycle():
    q = PartitionQueue(0, max_rows=10, max_bytes=10)
    q.append(entry("s", 0, 5))
    q.close_input()
    assert q.state is QueueState.DRAINING
    with pytest.raises(RuntimeError, match="append to a draining queue"):
        q.append(entry("s", 5, 6))
    q.trim({"s": 5})
    assert q.state is QueueState.CLOSED


def test_aggregate_state_round_trip_and_lazy_merge():
    agg = rf.ops.Aggregate(
        by="k", aggs=[("v", "count"), ("v", "sum"), ("v", "mean"), ("v", "min"), ("v", "max")]
    )
    data = pa.table({"k": [i % 7 for i in range(10_000)], "v": [float(i % 13) for i in range(10_000)]})
    state = agg.init_state()
    for i in range(0, 10_000, 1000):
        state, out = agg.process(state, data.slice(i, 1000))
        assert out is None
    restored = agg.state_from_table(agg.state_to_table(state))
    got = agg.finish(restored)
    expected = duckdb_reference(
        "SELECT k, count(v) AS v_count, sum(v) AS v_sum, avg(v) AS v_mean, min(v) AS v_min, max(v) AS v_max FROM d GROUP BY k",
        d=data,
    )
    assert_same_rows(got, expected)


def test_chain_runs_finish_output_through_later_operators():
    chain = Chain(
        [
            rf.ops.Filter(pc.field("v") > 0),
            rf.ops.Aggregate(by="k", aggs=[("v", "sum")]),
            rf.ops.Map(lambda t: t.rename_columns({"v_sum": "total"})),
        ]
    )
    states = chain.init_states()
    assert chain.process(states, pa.table({"k": [1, 1, 2], "v": [1.0, 2.0, -1.0]})) == []
    (out,) = chain.finish(states)
    assert out.to_pylist() == [{"k": 1, "total": 3.0}]


def test_operator_argument_errors():
    with pytest.raises(rf.errors.ConfigError, match="'median' on column 'v' is not supported"):
        rf.ops.Aggregate(by="k", aggs=[("v", "median")])
    with pytest.raises(rf.errors.ConfigError, match="pyarrow.compute expression"):
        rf.ops.Filter("v > 0")
    with pytest.raises(rf.errors.ConfigError, match="needs a callable"):
        rf.ops.Map(3)
    with pytest.raises(rf.errors.InputError, match="must return a pyarrow Table"):
        rf.ops.Map(lambda t: 1).process(None, pa.table({"a": [1]}))
    with pytest.raises(rf.errors.ConfigError, match="queue_max_rows must be > 0"):
        rf.EngineConfig(queue_max_rows=0)


SCHEMA = pa.schema([("k", pa.int64()), ("v", pa.string()), ("x", pa.float64())])


def test_aggregate_refuses_a_column_type_at_check_with_what_to_do():
    agg = rf.ops.Aggregate(by="k", aggs=[("x", "sum"), ("v", "sum")])
    with pytest.raises(rf.errors.InputError) as e:
        Chain([agg]).check_input(SCHEMA)
    msg = str(e.value)
    assert msg.startswith("rf.ops.Aggregate(by=['k'], aggs=[('x', 'sum'), ('v', 'sum')]): ('v', 'sum')")
    assert "column 'v' of type string" in msg and "cast it in an rf.ops.Map" in msg
    assert "column_types" in msg
    # count, min and max take strings; mean needs numbers
    Chain([rf.ops.Aggregate(by="k", aggs=[("v", "count"), ("v", "min"), ("v", "max")])]).check_input(SCHEMA)
    with pytest.raises(rf.errors.InputError, match=r"\('v', 'mean'\) cannot aggregate column 'v'"):
        Chain([rf.ops.Aggregate(by="k", aggs=[("v", "mean")])]).check_input(SCHEMA)


def test_the_schema_flows_through_filters_and_declared_maps_only():
    bad = rf.ops.Aggregate(by="k", aggs=[("v", "sum")])
    with pytest.raises(rf.errors.InputError, match="column 'v' of type string"):
        Chain([rf.ops.Filter(pc.field("x") > 0), bad]).check_input(SCHEMA)
    # After a Map the schema is unknown: the rest is checked only when it runs.
    Chain([rf.ops.Map(lambda t: t), bad]).check_input(SCHEMA)
    # ... unless the Map declares its output schema.
    cast = pa.schema([("k", pa.int64()), ("v", pa.float64())])
    to_float = rf.ops.Map(lambda t: t.select(["k", "v"]).cast(cast), output_schema=cast)
    Chain([to_float, bad]).check_input(SCHEMA)
    with pytest.raises(rf.errors.InputError, match="column 'v' of type string"):
        Chain([rf.ops.Map(lambda t: t, output_schema=SCHEMA), bad]).check_input(SCHEMA)
    # An Aggregate's output schema flows on.
    with pytest.raises(rf.errors.InputError, match=r"uses column\(s\) \['x'\]"):
        Chain(
            [rf.ops.Aggregate(by="k", aggs=[("x", "sum")]), rf.ops.Aggregate(by="k", aggs=[("x", "max")])]
        ).check_input(SCHEMA)


def test_filter_is_checked_against_the_input():
    with pytest.raises(
        rf.errors.InputError,
        match=r"rf.ops.Filter\(.*cannot run on the input: No match for FieldRef.Name\(zz\)",
    ):
        Chain([rf.ops.Filter(pc.field("zz") > 1)]).check_input(SCHEMA)
    with pytest.raises(rf.errors.InputError, match="greater"):
        Chain([rf.ops.Filter(pc.field("v") > 1)]).check_input(SCHEMA)


def test_a_declared_map_schema_is_enforced():
    m = rf.ops.Map(lambda t: t, output_schema=pa.schema([("k", pa.int64())]))
    with pytest.raises(rf.errors.InputError, match="declared output_schema"):
        m.process(None, pa.table({"k": [1], "v": ["a"]}))
    with pytest.raises(rf.errors.ConfigError, match="output_schema must be a pyarrow.Schema"):
        rf.ops.Map(lambda t: t, output_schema={"k": "int64"})


def test_an_operator_error_comes_out_as_itself_naming_the_operator():
    from rayflow._internal.chain import operator_error

    def boom(t):
        return t.append_column("r", pa.array([1 / 0] * t.num_rows))

    chain = Chain([rf.ops.Filter(pc.field("x") > 0), rf.ops.Map(boom)])
    with pytest.raises(ZeroDivisionError, match="division by zero") as e:
        chain.process(chain.init_states(), pa.table({"x": [1.0]}), partition=3)
    assert operator_error(e.value) is e.value
    assert e.value.__notes__ == [
        "raised by operator #1 rf.ops.Map(test_an_operator_error_comes_out_as_itself_naming_the_operator.<locals>.boom) of partition 3"
    ]
    import pickle

    again = pickle.loads(pickle.dumps(e.value))  # as Ray ships it back to the driver
    assert operator_error(again) is again and again.__notes__ == e.value.__notes__
    assert operator_error(ValueError("not from an operator")) is None


# ----------------------------------------------------------------------------- trim cost


def _full_scan_drop(entries, positions):
    """The reference: every entry covered by ``positions`` goes, the rest keep their order."""
    gone = [e for e in entries if e.end <= positions.get(e.split, 0)]
    return gone, [e for e in entries if e.end > positions.get(e.split, 0)]


@st.composite
def _queue_and_trims(draw):
    """Several splits' entries interleaved at random (each split's in position order) and a
    sequence of commits (each split's positions only grow, landing on entry ends or not)."""
    splits = draw(st.lists(st.sampled_from("abcd"), min_size=0, max_size=40))
    at: dict[str, int] = {}
    entries = []
    for s in splits:
        start = at.get(s, 0) + draw(st.integers(0, 3))  # gaps: rows of other partitions
        end = start + draw(st.integers(1, 5))
        at[s] = end
        entries.append(
            Entry(s, start, end, end - start, end - start, f"{s}{end}", spilled=draw(st.booleans()))
        )
    commits, pos = [], {}
    for _ in range(draw(st.integers(1, 5))):
        for s in draw(st.lists(st.sampled_from("abcde"), max_size=4)):
            pos[s] = pos.get(s, 0) + draw(st.integers(0, 12))
        commits.append(dict(pos))
    return entries, commits


@given(_queue_and_trims())
@settings(max_examples=300, deadline=None)
def test_drop_matches_a_full_scan(case):
    entries, commits = case
    q = PartitionQueue(0, max_rows=10**9, max_bytes=10**9)
    for e in entries:
        q.append(e)
    ref = list(entries)
    for pos in commits:
        want_gone, ref = _full_scan_drop(ref, pos)
        assert q.drop(pos) == want_gone
        assert list(q.entries) == ref
        assert q.rows == sum(e.rows for e in ref if not e.spilled)
        assert q.spilled_rows == sum(e.rows for e in ref if e.spilled)
        assert q.spilled_entries == sum(e.spilled for e in ref)


class _CountingPositions(dict):
    looked = 0

    def get(self, *a):
        self.looked += 1
        return super().get(*a)


def test_drop_stops_at_the_first_entry_no_split_can_pass():
    """A trim looks at the entries it drops and stops at the first it keeps (one split), or
    once each split's first kept entry is seen: not at the whole queue."""
    q = PartitionQueue(0, max_rows=10**9, max_bytes=10**9)
    for i in range(100_000):
        q.append(entry("s", 10 * i, 10 * (i + 1)))
    pos = _CountingPositions(s=10 * 1_000)
    assert len(q.drop(pos)) == 1_000 and pos.looked == 1_001 and len(q.entries) == 99_000
    # Two splits: a's next entry is not covered, b's entries behind it are (one, then many).
    q = PartitionQueue(0, max_rows=10**9, max_bytes=10**9)
    q.append(entry("a", 0, 10))
    for i in range(50_000):
        q.append(entry("b", 10 * i, 10 * (i + 1)))
        q.append(entry("a", 10 * (i + 1), 10 * (i + 2)))
    pos = _CountingPositions(b=100)
    gone = q.drop(pos)
    assert [e.split for e in gone] == ["b"] * 10 and pos.looked <= 2 * 10 + 2
    head = [q.entries[i] for i in range(12)]
    assert head == [entry("a", 10 * i, 10 * (i + 1)) for i in range(11)] + [entry("b", 100, 110)]
