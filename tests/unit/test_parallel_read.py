"""Parallel reading (issue 15, part 1): row-group splits of Parquet files, the synthetic stream's
default splits, the auto rule for the source actor count, and column projection. No Ray."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import rayflow as rf
from rayflow._internal.runtime import JobSpec, project_source, projected_columns
from rayflow._internal.watermarks import EventTime
from rayflow.config import auto_num_sources
from rayflow.errors import ConfigError, MalformedInputError
from rayflow.sources.files import row_group_ranges, row_group_split_name

AGGS = [("value", "count"), ("value", "sum")]


def read_split(split, position=0, schema=None) -> pa.Table:
    out, pos = [], position
    for batch, nxt in split.read(position):
        assert nxt == pos + batch.num_rows  # positions chain exactly
        out.append(batch)
        pos = nxt
    schema = schema or getattr(split, "schema", None) or rf.sources.SYNTHETIC_SCHEMA
    return pa.Table.from_batches(out, schema=schema)


@pytest.fixture(scope="module")
def events():
    return rf.sources.Synthetic(events=250_000, keys=1_000, seed=7).to_table()


# ----------------------------------------------------------------------------- row-group ranges


@pytest.mark.parametrize(
    "groups, split_rows, want",
    [
        ([1_000_000] * 10, 1_000_000, [(i, i + 1) for i in range(10)]),
        ([1_000_000] * 10, 2_000_000, [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]),
        ([10_000_000], 1_000_000, [(0, 1)]),  # one row group: one split
        ([300, 300, 300, 100], 500, [(0, 2), (2, 4)]),
        ([300, 300, 300], 500, [(0, 2), (2, 3)]),  # the last one may be short
        ([5, 5], None, [(0, 2)]),  # split_rows=None: the whole file
        ([], 10, [(0, 0)]),  # no row groups: one empty split
    ],
)
def test_row_group_ranges(groups, split_rows, want):
    assert row_group_ranges(groups, split_rows) == want


def test_split_names_are_stable_and_whole_files_keep_their_name():
    assert row_group_split_name("a.parquet", 0, 2, 10) == "a.parquet#rg0-1"
    assert row_group_split_name("a.parquet", 9, 10, 10) == "a.parquet#rg9-9"
    assert row_group_split_name("a.parquet", 0, 1, 1) == "a.parquet"
    assert row_group_split_name("a.parquet", 0, 0, 0) == "a.parquet"


def test_a_big_file_reads_as_several_splits_covering_every_row_once(tmp_path, events):
    path = str(tmp_path / "big.parquet")
    pq.write_table(events, path, row_group_size=20_000)  # 13 row groups
    src = rf.sources.Parquet(path, split_rows=50_000, batch_rows=30_000)
    splits = src.splits()
    assert [s.name for s in splits] == [
        f"{path}#rg0-2", f"{path}#rg3-5", f"{path}#rg6-8", f"{path}#rg9-11", f"{path}#rg12-12"
    ]  # fmt: skip
    assert src.splits_files
    got = pa.concat_tables([read_split(s) for s in splits])
    assert got.equals(events)


@pytest.mark.parametrize("position", [0, 1, 19_999, 20_000, 29_999, 30_001, 59_999, 60_000])
def test_a_row_group_split_resumes_exactly_at_any_position(tmp_path, events, position):
    path = str(tmp_path / "big.parquet")
    pq.write_table(events, path, row_group_size=20_000)
    splits = rf.sources.Parquet(path, split_rows=50_000, batch_rows=30_000).splits()
    second = splits[1]  # row groups 3-5: rows 60k-120k of the file
    got = read_split(second, position)
    assert got.equals(events.slice(60_000 + position, max(0, 60_000 - position)))
    # The batch grid does not depend on where reading starts (sources/base.py).
    ends = [nxt for _, nxt in second.read(position)]
    assert all(e % 30_000 == 0 for e in ends[:-1]) and (not ends or ends[-1] == 60_000)


def test_one_row_group_and_legacy_mode_keep_one_split_per_file(tmp_path, events):
    one = str(tmp_path / "one.parquet")
    pq.write_table(events, one, row_group_size=1_000_000)
    assert [s.name for s in rf.sources.Parquet(one).splits()] == [one]
    many = str(tmp_path / "many.parquet")
    pq.write_table(events, many, row_group_size=10_000)
    legacy = rf.sources.Parquet(many, split_rows=None)
    assert [s.name for s in legacy.splits()] == [many] and not legacy.splits_files
    assert read_split(legacy.splits()[0]).equals(events)


def test_a_file_replaced_by_one_with_fewer_row_groups_is_refused(tmp_path, events):
    path = str(tmp_path / "f.parquet")
    pq.write_table(events, path, row_group_size=20_000)
    last = rf.sources.Parquet(path, split_rows=50_000).splits()[-1]
    pq.write_table(events, path, row_group_size=200_000)
    with pytest.raises(MalformedInputError, match="replaced"):
        read_split(last)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1"])
def test_split_rows_is_validated(tmp_path, bad):
    with pytest.raises(ConfigError, match="split_rows"):
        rf.sources.Parquet(tmp_path / "x.parquet", split_rows=bad)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_reads_in_several_splits_by_default_with_workload_rows():
    src = rf.sources.Synthetic(events=3_500_000)
    names = [s.name for s in src.splits()]
    assert names == [
        "synthetic[0:1000000]",
        "synthetic[1000000:2000000]",
        "synthetic[2000000:3000000]",
        "synthetic[3000000:3500000]",
    ]  # fmt: skip: at most one split per block
    ten = rf.sources.Synthetic(events=10_000_000)
    assert len(ten.splits()) == 10


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_synthetic_rows_do_not_depend_on_the_split_count(splits):
    ref = rf.sources.Synthetic(events=2_300_000, splits=1).to_table()
    t = rf.sources.Synthetic(events=2_300_000, splits=splits).to_table()
    assert t.equals(ref)
    # Read split by split, as the source actors do.
    got = pa.concat_tables(
        [read_split(s) for s in rf.sources.Synthetic(events=2_300_000, splits=splits).splits()]
    )
    assert got.equals(ref)


def test_synthetic_default_still_gives_the_workload_check_values():
    t = rf.sources.Synthetic(events=1_000_000).to_table()
    assert pc.sum(t["key"]).as_py() == 55_500_617_083
    assert pc.sum(t["value"]).as_py() == 500_206_539.5205078


def test_a_paced_synthetic_keeps_one_split_by_default():
    assert len(rf.sources.Synthetic(rate=10).splits()) == 1


# ----------------------------------------------------------------------------- num_sources


@pytest.mark.parametrize(
    "cpus, consumers, splits, want",
    [
        (2, 2, 10, 2),  # 2 cores, 2 consumers: 2 readers (measured better than 1)
        (2, 1, 10, 1),  # one reader per consumer
        (2, 4, 10, 2),  # at most one per CPU
        (16, 8, 10, 8),
        (16, 8, 4, 4),  # never more than the splits
        (16, 2, 10, 2),
        (64, 32, 100, 32),
        (16, 16, None, 16),  # splits unknown
        (1, 4, 10, 1),
        (0.5, 1, 1, 1),  # at least one
        (8, 4, 0, 1),  # a dynamic source with no split yet: one reader
    ],
)
def test_auto_num_sources(cpus, consumers, splits, want):
    assert auto_num_sources(cpus=cpus, consumers=consumers, splits=splits) == want


def test_num_sources_is_auto_by_default_and_validated():
    assert rf.EngineConfig().num_sources is None
    assert rf.EngineConfig(num_sources=3).num_sources == 3
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ConfigError, match="num_sources"):
            rf.EngineConfig(num_sources=bad)


# ----------------------------------------------------------------------------- projection


def spec(source, operators, *, key=("key",), event_time=None) -> JobSpec:
    return JobSpec(
        name="p", source=source, key=key, partitions=2, operators=tuple(operators),
        sink=rf.sinks.Collect(), consumers=1, checkpoint_dir="ck", event_time=event_time,
    )  # fmt: skip


@pytest.fixture
def wide(tmp_path, events):
    t = events.append_column("extra", pa.array(["x"] * events.num_rows)).append_column(
        "tag", pc.cast(events["key"], pa.int32())
    )
    path = str(tmp_path / "wide.parquet")
    pq.write_table(t, path, row_group_size=50_000)
    return path, t


def test_columns_used_by_the_operators():
    schema = pa.schema([("key", pa.int64()), ("value", pa.float64()), ("ts", pa.int64())])
    agg = rf.ops.Aggregate(by="key", aggs=[("value", "sum"), ("value", "max")])
    assert agg.columns_used(schema) == ["key", "value"]
    win = rf.ops.Window(by="key", aggs=AGGS, event_time="ts", tumbling_s=1)
    assert win.columns_used(schema) == ["key", "value", "ts"]
    side = rf.ops.Window(
        by="key", aggs=AGGS, event_time="ts", tumbling_s=1, late="side", late_sink=rf.sinks.Parquet("late")
    )
    assert side.columns_used(schema) is None  # late rows go out whole
    assert rf.ops.Map(lambda t: t).columns_used(schema) is None
    assert rf.ops.Filter(pc.field("value") > 1).columns_used(schema) is None


def test_a_parquet_source_is_projected_to_the_job_columns(wide, events):
    path, t = wide
    src = rf.sources.Parquet(path, split_rows=100_000)
    s = spec(src, [rf.ops.Aggregate(by="key", aggs=AGGS)])
    assert projected_columns(s, src.schema) == ["key", "value"]
    splits = project_source(s, src.splits(), src.schema)
    assert [x.name for x in splits] == [x.name for x in src.splits()]  # positions unaffected
    got = pa.concat_tables([read_split(x) for x in splits])
    assert got.schema.names == ["key", "value"]
    assert got.equals(t.select(["key", "value"]))
    assert src.schema.names == ["key", "value", "ts", "extra", "tag"]  # the source itself is untouched


def test_projection_keeps_the_key_and_event_time(wide):
    path, _ = wide
    src = rf.sources.Parquet(path)
    s = spec(src, [rf.ops.Aggregate(by="tag", aggs=[("value", "sum")])], key=("tag",))
    assert projected_columns(s, src.schema) == ["value", "tag"]
    s = spec(src, [rf.ops.Aggregate(by="key", aggs=AGGS)], event_time=EventTime(column="ts"))
    assert projected_columns(s, src.schema) == ["key", "value", "ts"]


def test_no_projection_when_the_first_operator_does_not_say(wide):
    path, _ = wide
    src = rf.sources.Parquet(path)
    agg = rf.ops.Aggregate(by="key", aggs=AGGS)
    for ops in ([], [rf.ops.Map(lambda t: t), agg], [rf.ops.Filter(pc.field("value") > 1), agg]):
        assert projected_columns(spec(src, ops), src.schema) is None
    # Every column used: nothing to cut.
    narrow = rf.sources.Parquet(path, columns=["key", "value"])
    assert projected_columns(spec(narrow, [agg]), narrow.schema) is None


def test_projection_gives_the_same_aggregate(wide):
    path, t = wide
    agg = rf.ops.Aggregate(by="key", aggs=AGGS)
    src = rf.sources.Parquet(path, split_rows=100_000)
    splits = project_source(spec(src, [agg]), src.splits(), src.schema)
    state, _ = agg.process(agg.init_state(), pa.concat_tables([read_split(x) for x in splits]))
    full_state, _ = agg.process(agg.init_state(), t)
    assert agg.finish(state).sort_by("key").equals(agg.finish(full_state).sort_by("key"))


def test_with_columns_refuses_an_unknown_column(wide):
    path, _ = wide
    with pytest.raises(ConfigError, match="nope"):
        rf.sources.Parquet(path).with_columns(["key", "nope"])


# ----------------------------------------------------------------------------- older checkpoints


def test_a_checkpoint_with_whole_file_splits_gets_a_way_out(tmp_path, events):
    from rayflow._internal.runtime import _with_split_hint
    from rayflow.errors import IncompatibleCheckpointError, MissingSplitsError

    path = str(tmp_path / "f.parquet")
    pq.write_table(events, path, row_group_size=20_000)
    refused = MissingSplitsError(  # what the resume check raises (compat.check_resume)
        f"cannot resume pipeline 'p': input split(s) [{path!r}] have committed positions but are "
        "not in this run's source"
    )
    hinted = _with_split_hint(refused, rf.sources.Parquet(path, split_rows=50_000))
    assert isinstance(hinted, IncompatibleCheckpointError) and "split_rows=None" in str(hinted)
    assert "splits=1" in str(_with_split_hint(refused, rf.sources.Synthetic(events=3_000_000)))
    # Nothing to add: the source names its splits as before, or another refusal.
    assert _with_split_hint(refused, rf.sources.Parquet(path, split_rows=None)) is refused
    other = IncompatibleCheckpointError("cannot resume pipeline 'p': key changed")
    assert _with_split_hint(other, rf.sources.Parquet(path, split_rows=50_000)) is other
