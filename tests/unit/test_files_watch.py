"""rf.sources.Files without Ray: which files a poll takes (the completeness rule), in which order,
and how their splits read (through a pyarrow filesystem, conformed to one schema, pinned to the
file as it was taken). Polls run on a fake clock: no sleeps, no timing."""

from __future__ import annotations

import os
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rayflow as rf
from rayflow.errors import ConfigError, EmptyInputError, MalformedInputError, SourceNotFoundError
from rayflow.sources.files import is_temporary

POLL_S = 5.0


class FakeClock:
    """``time.monotonic`` and ``time.sleep`` for a source: sleeping moves the clock."""

    def __init__(self) -> None:
        self.t = 1_000.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s

    def __setstate__(self, state: dict) -> None:
        # Unpickled in "another process": a monotonic clock there reads something unrelated.
        self.t = state["t"] + 1_000_000.0


def watched(path, **kw) -> tuple[rf.sources.Files, FakeClock]:
    kw.setdefault("poll_s", POLL_S)
    src = rf.sources.Files(path, **kw)
    clock = FakeClock()
    src._clock, src._sleep = clock, clock.sleep
    return src, clock


def poll(src: rf.sources.Files, clock: FakeClock) -> list[str]:
    """One poll, ``poll_s`` after the previous one: the names of the splits."""
    clock.t += src.poll_s
    return [s.name for s in src.splits()]


def table(n: int, start: int = 0) -> pa.Table:
    return pa.table(
        {"key": [f"k{i % 7}" for i in range(start, start + n)], "value": list(range(start, start + n))}
    )


def write_parquet(path, t: pa.Table) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(t, path)


def read_all(split, position: int = 0) -> pa.Table:
    batches = [b for b, _ in split.read(position)]
    return pa.Table.from_batches(batches) if batches else None


# ----------------------------------------------------------------------------- the completeness rule


def test_temporary_names_are_never_taken(tmp_path):
    for rel in ["a.parquet", ".a.parquet", "_b.parquet", "c.parquet.tmp", "d.part", "e.inprogress",
                "_pending/x.parquet", "sub/.hidden/y.parquet", "sub/z.parquet"]:  # fmt: skip
        write_parquet(tmp_path / rel, table(3))
    (tmp_path / "empty.parquet").touch()  # just created by a writer: no bytes yet
    src, clock = watched(tmp_path)
    assert [s.name for s in src.splits()] == ["a.parquet", "sub/z.parquet"]
    for _ in range(3):
        assert poll(src, clock) == ["a.parquet", "sub/z.parquet"]
    assert is_temporary("x/_SUCCESS") and is_temporary("a.csv.inprogress") and not is_temporary("a_b.csv")


def test_a_file_renamed_into_place_is_taken_at_the_next_poll(tmp_path):
    write_parquet(tmp_path / "a.parquet", table(3))
    src, clock = watched(tmp_path)
    assert [s.name for s in src.splits()] == ["a.parquet"]
    write_parquet(tmp_path / "b.parquet.tmp", table(4))
    assert poll(src, clock) == ["a.parquet"]
    os.rename(tmp_path / "b.parquet.tmp", tmp_path / "b.parquet")
    assert poll(src, clock) == ["a.parquet"]  # first seen: its size and mtime have no past yet
    assert poll(src, clock) == ["a.parquet", "b.parquet"]  # the same as at the poll before


def test_assume_renamed_takes_a_file_at_first_sight(tmp_path):
    src, clock = watched(tmp_path, assume_renamed=True, schema=table(1).schema)
    assert src.splits() == []
    write_parquet(tmp_path / "a.parquet", table(3))
    assert poll(src, clock) == ["a.parquet"]
    assert clock.t == 1_000.0 + POLL_S  # and the first poll did not wait


def test_a_growing_file_is_taken_only_once_stable(tmp_path):
    f = tmp_path / "events.csv"
    src, clock = watched(
        tmp_path, format="csv", schema=pa.schema([("key", pa.string()), ("value", pa.int64())])
    )
    assert src.splits() == []
    f.write_text("key,value\nk1,1\nk2,")  # half a row: the writer is still at it
    assert poll(src, clock) == []
    with open(f, "a") as out:
        out.write("2\nk3,3\n")
    assert poll(src, clock) == []  # it grew since the last poll
    assert poll(src, clock) == ["events.csv"]
    assert read_all(src.splits()[0]).to_pydict() == {"key": ["k1", "k2", "k3"], "value": [1, 2, 3]}


def test_files_complete_at_start_are_taken_at_start(tmp_path):
    """The first poll looks twice, poll_s apart, instead of leaving the files to the next one."""
    write_parquet(tmp_path / "a.parquet", table(3))
    src, clock = watched(tmp_path)
    assert [s.name for s in src.splits()] == ["a.parquet"]
    assert clock.t == 1_000.0 + POLL_S


def test_polls_closer_than_poll_s_take_nothing_new(tmp_path):
    src, clock = watched(tmp_path, schema=table(1).schema)
    assert src.splits() == []
    clock.t += POLL_S
    write_parquet(tmp_path / "a.parquet", table(3))
    calls = []
    listing = src._list
    src._list = lambda: calls.append(1) or listing()
    assert [s.name for s in src.splits()] == []  # a poll: a.parquet seen
    clock.t += POLL_S / 2
    assert [s.name for s in src.splits()] == []  # too soon after it: no listing, not taken
    assert len(calls) == 1
    clock.t += POLL_S / 2
    assert [s.name for s in src.splits()] == ["a.parquet"]
    assert len(calls) == 2


def test_splits_come_in_name_order_named_relative_to_the_directory(tmp_path):
    for rel in ["b/2.parquet", "a.parquet", "b/10.parquet", "c.parquet", "b/1/x.parquet"]:
        write_parquet(tmp_path / rel, table(2))
    src, _ = watched(tmp_path)
    names = [s.name for s in src.splits()]
    assert names == ["a.parquet", "b/1/x.parquet", "b/10.parquet", "b/2.parquet", "c.parquet"]
    # Names are stable: a new instance (a restarted job) names the same files the same way.
    again, _ = watched(str(tmp_path) + "/")
    assert [s.name for s in again.splits()] == names
    assert src.dynamic and src.unbounded


def test_a_handed_over_instance_keeps_its_memory_and_counts_the_hand_over_as_a_poll(tmp_path):
    write_parquet(tmp_path / "a.parquet", table(3))
    src, clock = watched(tmp_path)
    assert [s.name for s in src.splits()] == ["a.parquet"]
    clock.t += POLL_S
    write_parquet(tmp_path / "b.parquet", table(3))
    assert [s.name for s in src.splits()] == ["a.parquet"]  # b.parquet seen once
    actor_side = pickle.loads(pickle.dumps(src))  # the source actor's copy, on its own clock
    clock2 = actor_side._clock
    assert clock2.t > clock.t + POLL_S  # the driver's readings mean nothing there
    assert [s.name for s in actor_side.splits()] == ["a.parquet"]  # the hand-over counts as a poll
    clock2.t += POLL_S
    assert [s.name for s in actor_side.splits()] == ["a.parquet", "b.parquet"]
    assert actor_side.splits()[0] is actor_side.splits()[0]  # split objects are made once


# ----------------------------------------------------------------------------- schema and configuration


def test_schema_is_the_first_complete_file_and_others_are_conformed(tmp_path):
    write_parquet(tmp_path / "a.parquet", table(3))
    write_parquet(tmp_path / "b.parquet", pa.table({"value": [10, 11], "extra": [1.0, 2.0]}))
    write_parquet(tmp_path / "c.parquet", pa.table({"key": ["x"], "value": pa.array([7], pa.int32())}))
    src, _ = watched(tmp_path)
    assert src.schema == table(1).schema
    a, b, c = src.splits()
    assert read_all(b).to_pydict() == {"key": [None, None], "value": [10, 11]}  # extra dropped
    got_c = read_all(c)
    assert got_c.schema == src.schema and got_c.to_pydict() == {"key": ["x"], "value": [7]}


def test_a_file_that_does_not_fit_the_schema_names_the_file(tmp_path):
    write_parquet(tmp_path / "a.parquet", pa.table({"key": ["k"], "value": ["not a number"]}))
    schema = pa.schema([("key", pa.string()), ("value", pa.int64())])
    src, _ = watched(tmp_path, schema=schema)
    (split,) = src.splits()
    with pytest.raises(MalformedInputError, match="'a.parquet' does not fit"):
        read_all(split)
    (tmp_path / "b.parquet").write_bytes(b"not parquet at all")
    src, _ = watched(tmp_path, schema=schema)
    with pytest.raises(MalformedInputError, match="'b.parquet' is not a readable Parquet file"):
        read_all(src.splits()[1])


def test_csv_and_json_files_are_parsed_as_the_schema(tmp_path):
    (tmp_path / "1.csv").write_text("key,value\nk1,1.5\n")
    (tmp_path / "2.csv").write_text("value,key\n2,k2\n")  # alone, value would be int64
    src, _ = watched(tmp_path, format="csv")
    assert src.schema == pa.schema([("key", pa.string()), ("value", pa.float64())])
    got = pa.concat_tables(read_all(s) for s in src.splits())
    assert got.to_pydict() == {"key": ["k1", "k2"], "value": [1.5, 2.0]}
    jdir = tmp_path / "json"
    jdir.mkdir()
    (jdir / "a.json").write_text('{"key": "k1", "value": 1}\n')
    (jdir / "b.json").write_text('{"value": 2, "other": true}\n')
    src, _ = watched(jdir, format="json")
    got = pa.concat_tables(read_all(s) for s in src.splits())
    assert got.to_pydict() == {"key": ["k1", None], "value": [1, 2]}


def test_an_empty_directory_needs_a_schema(tmp_path):
    src, _ = watched(tmp_path)
    assert src.splits() == []  # a watched directory may start empty...
    with pytest.raises(EmptyInputError, match="schema="):
        src.schema  # noqa: B018 - ...but then the schema must be given
    given, _ = watched(tmp_path, schema=table(1).schema)
    assert given.splits() == [] and given.schema == table(1).schema
    (tmp_path / "half.csv").write_text("key,value\n")
    csv, _ = watched(tmp_path, format="csv")
    with pytest.raises(EmptyInputError, match="schema="):
        csv.schema  # noqa: B018 - a header alone has no rows to take the types from


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="format"):
        rf.sources.Files(tmp_path, format="avro")
    with pytest.raises(ConfigError, match="poll_s"):
        rf.sources.Files(tmp_path, poll_s=0)
    with pytest.raises(ConfigError, match="no reader options"):
        rf.sources.Files(tmp_path, parse_options=None)
    with pytest.raises(ConfigError, match="pyarrow.Schema"):
        rf.sources.Files(tmp_path, schema={"key": "string"})
    with pytest.raises(SourceNotFoundError, match="does not exist"):
        rf.sources.Files(tmp_path / "nope").splits()
    write_parquet(tmp_path / "a.parquet", table(1))
    with pytest.raises(ConfigError, match="is a file"):
        rf.sources.Files(tmp_path / "a.parquet").splits()


def test_watch_false_is_bounded_over_the_files_present(tmp_path):
    with pytest.raises(EmptyInputError, match="no Parquet files"):
        rf.sources.Files(tmp_path, watch=False).splits()
    write_parquet(tmp_path / "a.parquet", table(3))
    write_parquet(tmp_path / "b.parquet.tmp", table(3))
    src = rf.sources.Files(tmp_path, watch=False)
    src._sleep = None  # taken at once: a bounded read never waits
    assert not src.dynamic and not src.unbounded
    assert [s.name for s in src.splits()] == ["a.parquet"]
    write_parquet(tmp_path / "c.parquet", table(3))
    assert [s.name for s in src.splits()] == ["a.parquet"]  # the files of the first call


# ----------------------------------------------------------------------------- reading the splits


def test_splits_keep_the_split_contract(tmp_path):
    write_parquet(tmp_path / "p" / "a.parquet", table(25))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "b.csv").write_text("key,value\n" + "".join(f"k{i},{i}\n" for i in range(25)))
    for fmt, sub in [("parquet", "p"), ("csv", "c")]:
        src, _ = watched(tmp_path / sub, format=fmt, batch_rows=10)
        (split,) = src.splits()
        assert [(b.num_rows, end) for b, end in split.read(0)] == [(10, 10), (10, 20), (5, 25)]
        assert [(b.num_rows, end) for b, end in split.read(13)] == [(7, 20), (5, 25)]  # the same grid
        assert read_all(split, 13).column("value").to_pylist() == list(range(13, 25))
        assert pickle.loads(pickle.dumps(split)) == split


def test_a_file_that_changed_after_it_was_taken_is_refused(tmp_path):
    write_parquet(tmp_path / "a.parquet", table(3))
    src, _ = watched(tmp_path)
    (split,) = src.splits()
    write_parquet(tmp_path / "a.parquet", table(4))  # rewritten under the same name
    with pytest.raises(MalformedInputError, match="'a.parquet' of the watched directory changed"):
        read_all(split)


def test_a_deleted_file_is_fine_once_read_to_the_end(tmp_path):
    write_parquet(tmp_path / "a.parquet", table(3))
    src, clock = watched(tmp_path)
    (pq_split,) = src.splits()
    os.remove(tmp_path / "a.parquet")
    assert read_all(pq_split, 3) is None  # committed to the end: never opened again
    with pytest.raises(SourceNotFoundError, match="'a.parquet' of the watched directory is gone"):
        read_all(pq_split, 1)  # rows 1-2 were never committed: not skipped silently
    assert poll(src, clock) == []  # and it is no longer a split
    (tmp_path / "b.csv").write_text("key,value\nk,1\n")
    csv, _ = watched(tmp_path, format="csv")
    (csv_split,) = csv.splits()
    os.remove(tmp_path / "b.csv")
    with pytest.raises(SourceNotFoundError, match="'b.csv'"):
        read_all(csv_split, 1)  # text has no row count: rayflow cannot tell it was finished
