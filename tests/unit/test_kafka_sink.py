"""rf.sinks.Kafka: publication against the tansu broker, and the vectorized JSON encoding."""

from __future__ import annotations

import datetime
import decimal
import json

import pyarrow as pa
import pytest

import rayflow as rf
from rayflow._internal.checkpoint.store import Store
from rayflow.errors import ProtocolError, TopicNotFoundError
from rayflow.sinks import PENDING_DIR
from rayflow.sinks.base import UPSERT_KEY_METADATA, VERSION_COLUMN
from rayflow.sinks.kafka import IDEMPOTENCY_HEADER, json_lines

NAME = "part-00003-e000002-0123abcd.parquet"
ROWS = pa.table({"key": ["a", "b", "c"], "value_count": [1, 2, 3], "value_sum": [1.5, None, -3.0]})


def stage(tmp_path, table: pa.Table = ROWS, name: str = NAME) -> Store:
    store = Store(str(tmp_path / "sink"))
    store.write_parquet(f"{PENDING_DIR}/{name}", table)
    return store


@pytest.mark.kafka
def test_a_file_is_produced_once_with_idempotency_keys(kafka, tmp_path):
    topic = kafka.create_topic(1)
    sink = rf.sinks.Kafka(topic, bootstrap_servers=kafka.bootstrap, key="key")
    store = stage(tmp_path)
    sink.publish(store, NAME)
    sink.publish(store, NAME)  # repeated (a retried commit, a manager restart): a no-op
    assert not store.exists(f"{PENDING_DIR}/{NAME}")
    got = kafka.read(topic, 3)
    rows = [
        (json.loads(v), k, dict(h)[IDEMPOTENCY_HEADER]) for _, _, k, v, h in got
    ]  # one partition: in order
    assert rows == [
        ({"key": "a", "value_count": 1, "value_sum": 1.5}, b"a", f"{NAME}/0".encode()),
        ({"key": "b", "value_count": 2, "value_sum": None}, b"b", f"{NAME}/1".encode()),
        ({"key": "c", "value_count": 3, "value_sum": -3.0}, b"c", f"{NAME}/2".encode()),
    ]
    # A later file's first row comes right after them: the repeated call produced nothing.
    later = "part-00003-e000003-ffff.parquet"
    sink.publish(stage(tmp_path, ROWS.slice(0, 1), later), later)
    got = kafka.read(topic, 4)
    assert dict(got[3][4])[IDEMPOTENCY_HEADER] == f"{later}/0".encode()


@pytest.mark.kafka
def test_a_publication_cut_short_repeats_rows_with_the_same_keys(kafka, tmp_path):
    topic = kafka.create_topic(1)
    sink = rf.sinks.Kafka(topic, bootstrap_servers=kafka.bootstrap)
    store = stage(tmp_path)
    sink._produce(ROWS, NAME)  # acknowledged, then the manager died before the marker
    sink.publish(store, NAME)  # the restarted manager publishes again
    got = kafka.read(topic, 6)
    assert len(got) == 6
    keys = [dict(h)[IDEMPOTENCY_HEADER] for *_, h in got]
    assert sorted(keys) == sorted([f"{NAME}/{i}".encode() for i in range(3)] * 2)  # duplicates, same keys
    assert all(k is None for _, _, k, _, _ in got)  # an append stream without key= has no key


@pytest.mark.kafka
def test_an_upsert_stream_is_keyed_by_its_key_columns(kafka, tmp_path):
    topic = kafka.create_topic(1)
    table = ROWS.append_column(VERSION_COLUMN, pa.array([7, 7, 7], pa.int64()))
    table = table.replace_schema_metadata({UPSERT_KEY_METADATA: json.dumps(["key"]).encode()})
    sink = rf.sinks.Kafka(topic, bootstrap_servers=kafka.bootstrap)
    sink.publish(stage(tmp_path, table), NAME)
    got = kafka.read(topic, 3)
    assert sorted(k for _, _, k, _, _ in got) == [b"a", b"b", b"c"]
    assert {json.loads(v)[VERSION_COLUMN] for _, _, _, v, _ in got} == {7}


@pytest.mark.kafka
def test_a_lost_file_and_a_missing_topic_are_loud(kafka, tmp_path):
    sink = rf.sinks.Kafka(kafka.create_topic(1), bootstrap_servers=kafka.bootstrap)
    with pytest.raises(ProtocolError, match="neither pending nor published"):
        sink.publish(Store(str(tmp_path / "empty")), NAME)
    missing = rf.sinks.Kafka("no-such-output", bootstrap_servers=kafka.bootstrap)
    store = stage(tmp_path)
    with pytest.raises(TopicNotFoundError, match="no-such-output"):
        missing.publish(store, NAME)
    assert store.exists(f"{PENDING_DIR}/{NAME}")  # left pending: retried


def test_json_lines_are_valid_json_for_every_common_type():
    t = pa.table(
        {
            "s": ['a"b\\c\nd\x01\t', None, "é\u2028"],
            "i": pa.array([1, None, -3], pa.int64()),
            "f": [1.5, float("nan"), 1e300],
            "b": [True, False, None],
            "ts": pa.array(
                [datetime.datetime(2024, 1, 1, 1, 2, 3, 456000), None, datetime.datetime(2024, 1, 1)],
                pa.timestamp("ms", tz="UTC"),
            ),
            "day": [datetime.date(2024, 2, 29), None, None],
            "d": pa.array([decimal.Decimal("1.50"), None, decimal.Decimal("-2")]),
            "l": [[1, 2], None, []],
            "dict": pa.array(["u", "v", None]).dictionary_encode(),
            "bin": [b"\x00\xff", None, b""],
            "n": pa.nulls(3),
        }
    )
    rows = [json.loads(x) for x in json_lines(t).to_pylist()]
    assert rows[0] == {
        "s": 'a"b\\c\nd\x01\t',
        "i": 1,
        "f": 1.5,
        "b": True,
        "ts": "2024-01-01T01:02:03.456Z",
        "day": "2024-02-29",
        "d": 1.5,
        "l": [1, 2],
        "dict": "u",
        "bin": "AP8=",
        "n": None,
    }
    assert rows[1]["f"] is None and rows[1]["s"] is None and rows[1]["dict"] == "v"
    assert rows[2]["s"] == "é\u2028" and rows[2]["f"] == 1e300 and rows[2]["bin"] == ""
