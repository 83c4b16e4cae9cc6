"""rf.sources.Kafka, split by split, in process, against the tansu broker (tests/kafka_broker.py)."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pyarrow as pa
import pytest
from ray import cloudpickle

import rayflow as rf
from rayflow.errors import (
    BadRecordError,
    BrokerUnreachableError,
    ConfigError,
    EmptyInputError,
    TopicNotFoundError,
)
from rayflow.sources.kafka import METADATA_SCHEMA, OFFSET_COLUMN
from tests.kafka_broker import WAIT_S, Broker, tansu, wait_until

pytestmark = pytest.mark.kafka

SCHEMA = pa.schema([("key", pa.string()), ("value", pa.int64())])


def events(n: int, start: int = 0) -> list[bytes]:
    return [json.dumps({"key": f"k{i % 7}", "value": i}).encode() for i in range(start, start + n)]


def take(split, position: int, rows: int) -> tuple[pa.Table, list[int]]:
    """Read ``split`` from ``position`` until ``rows`` rows came; the rows and each batch's end."""
    it = split.read(position)
    batches, ends = [], []

    def more() -> bool:
        b, end = next(it)
        batches.append(b)
        ends.append(end)
        return sum(x.num_rows for x in batches) >= rows

    try:
        wait_until(more, what=f"{rows} rows from {split.name}")
    finally:
        it.close()
    return pa.Table.from_batches(batches, schema=split.schema), ends


# ----------------------------------------------------------------------------- splits and positions


def test_one_split_per_partition_positions_are_offsets(kafka):
    topic = kafka.create_topic(3)
    for p in range(3):
        kafka.produce(topic, events(10 * (p + 1)), partition=p)
    src = rf.sources.Kafka(topic, bootstrap_servers=kafka.bootstrap, schema=SCHEMA)
    assert src.dynamic and src.unbounded
    splits = src.splits()
    assert [s.name for s in splits] == [f"kafka:{topic}/{p}" for p in range(3)]
    assert all(s.unbounded and not s.dense for s in splits)
    assert src.schema == pa.schema(list(SCHEMA) + list(METADATA_SCHEMA))

    t, ends = take(splits[2], 0, 30)
    assert t[OFFSET_COLUMN].to_pylist() == list(range(30))
    assert t["value"].to_pylist() == list(range(30))
    assert t["kafka_partition"].to_pylist() == [2] * 30
    assert ends[-1] == 30  # the next offset to read
    assert t.schema == src.schema


def test_read_from_a_position_starts_exactly_there(kafka):
    topic = kafka.create_topic(1)
    kafka.produce(topic, events(100))
    (split,) = rf.sources.Kafka(topic, bootstrap_servers=kafka.bootstrap, schema=SCHEMA).splits()
    t, ends = take(split, 37, 63)
    assert t["value"].to_pylist() == list(range(37, 100))  # never a row before the position
    assert ends[-1] == 100
    batch = t.to_batches()[0]
    np.testing.assert_array_equal(split.row_positions(batch), batch.column(OFFSET_COLUMN).to_numpy())


def test_quiet_partition_yields_idle_ticks_and_closing_closes_the_consumer(kafka, monkeypatch):
    import confluent_kafka

    closed = []

    class Recording(confluent_kafka.Consumer):
        def close(self):
            closed.append(True)
            return super().close()

    monkeypatch.setattr(confluent_kafka, "Consumer", Recording)
    topic = kafka.create_topic(1)
    kafka.produce(topic, events(5))
    (split,) = rf.sources.Kafka(topic, bootstrap_servers=kafka.bootstrap, schema=SCHEMA).splits()
    it = split.read(0)
    got = 0
    while got < 5:
        b, end = next(it)
        got += b.num_rows
    for _ in range(3):  # nothing new: empty batches of the schema, at the same position
        b, tick_end = next(it)
        assert b.num_rows == 0 and b.schema == split.schema and tick_end == end == 5
    kafka.produce(topic, events(2, start=5))
    b = wait_until(lambda: (x := next(it)[0]).num_rows and x, what="the new rows")
    assert b["value"].to_pylist() == [5, 6]
    assert not closed
    it.close()
    assert closed == [True]


def test_transaction_markers_leave_gaps_the_positions_cover(kafka):
    topic = kafka.create_topic(1)
    p = kafka.producer(**{"transactional.id": f"tx-{topic}"})
    p.init_transactions(WAIT_S)
    for first in (0, 3):
        p.begin_transaction()
        for v in events(3, start=first):
            p.produce(topic, value=v)
        p.commit_transaction(WAIT_S)  # the commit marker takes an offset
    (split,) = rf.sources.Kafka(topic, bootstrap_servers=kafka.bootstrap, schema=SCHEMA).splits()
    t, ends = take(split, 0, 6)
    offsets = t[OFFSET_COLUMN].to_pylist()
    assert t["value"].to_pylist() == list(range(6))
    assert offsets == sorted(offsets) and offsets[-1] > 5  # gaps: dense = False
    assert ends[-1] == offsets[-1] + 1
    resumed, _ = take(split, offsets[3], 3)  # from a position just past a gap
    assert resumed["value"].to_pylist() == [3, 4, 5]


def test_start_latest_is_pinned_when_the_splits_are_resolved(kafka):
    topic = kafka.create_topic(1)
    p = kafka.producer()
    for v in events(5):  # one produce batch each: tansu's watermark trails by a batch
        p.produce(topic, value=v)
        p.flush(WAIT_S)
    src = rf.sources.Kafka(topic, bootstrap_servers=kafka.bootstrap, schema=SCHEMA, start="latest")
    (split,) = src.splits()
    assert split.start_offset == 5
    kafka.produce(topic, events(3, start=5))
    assert src.splits()[0].start_offset == 5  # discovery keeps the pin
    moved = cloudpickle.loads(cloudpickle.dumps(split))  # as a restarted source actor gets it
    t, _ = take(moved, 0, 3)
    assert t["value"].to_pylist() == [5, 6, 7]
    assert take(moved, 2, 6)[0]["value"].to_pylist() == [2, 3, 4, 5, 6, 7]  # a committed position wins


def test_first_tick_of_latest_is_at_the_pinned_offset(kafka):
    topic = kafka.create_topic(1)
    kafka.produce(topic, events(1))
    (split,) = rf.sources.Kafka(
        topic, bootstrap_servers=kafka.bootstrap, schema=SCHEMA, start="latest"
    ).splits()
    it = split.read(0)
    try:
        b, end = next(it)
    finally:
        it.close()
    assert b.num_rows == 0 and end == split.start_offset == 1


def test_new_partitions_appear_in_splits(kafka):
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = kafka.create_topic(2)
    src = rf.sources.Kafka(topic, bootstrap_servers=kafka.bootstrap, schema=SCHEMA)
    assert [s.partition for s in src.splits()] == [0, 1]
    # tansu cannot add partitions (CreatePartitions): the topic is made again with three.
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    admin.delete_topics([topic])[topic].result(WAIT_S)
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result(WAIT_S)
    assert [s.name for s in src.splits()] == [f"kafka:{topic}/{p}" for p in range(3)]


def test_available_is_the_high_watermark(kafka):
    topic = kafka.create_topic(1)
    (split,) = rf.sources.Kafka(topic, bootstrap_servers=kafka.bootstrap, schema=SCHEMA).splits()
    assert split.available() == 0
    kafka.produce(topic, events(20))
    # tansu's watermark may trail by a produce batch: never the end of the data, only lag.
    assert wait_until(lambda: split.available(), what="a watermark") <= 20


# ----------------------------------------------------------------------------- decoding


def test_json_schema_is_inferred_from_the_first_messages(kafka):
    topic = kafka.create_topic(2)
    kafka.produce(topic, [b'{"user": "a", "n": 1, "score": 1.5, "tags": ["x"]}'] * 3, partition=1)
    src = rf.sources.Kafka(topic, bootstrap_servers=kafka.bootstrap)
    assert src.schema.names[:4] == ["user", "n", "score", "tags"]
    assert src.schema.field("n").type == pa.int64()
    assert src.schema.field("tags").type == pa.list_(pa.string())
    t, _ = take(src.splits()[1], 0, 3)
    assert t.select(["user", "n", "score"]).to_pylist() == [{"user": "a", "n": 1, "score": 1.5}] * 3


def test_empty_topic_needs_a_schema(kafka):
    topic = kafka.create_topic(1)
    with pytest.raises(EmptyInputError, match="schema="):
        rf.sources.Kafka(topic, bootstrap_servers=kafka.bootstrap).splits()
    (split,) = rf.sources.Kafka(topic, bootstrap_servers=kafka.bootstrap, schema=SCHEMA).splits()
    it = split.read(0)
    try:
        assert next(it)[0].num_rows == 0  # an idle tick
    finally:
        it.close()


def test_json_framing_keys_timestamps_and_tombstones(kafka):
    topic = kafka.create_topic(1)
    values = [b'{"key": "a",\n "value": 1}', None, b'{"value": 3, "extra": "ignored"}']
    kafka.produce(topic, values, keys=[b"k1", b"k2", None])
    (split,) = rf.sources.Kafka(topic, bootstrap_servers=kafka.bootstrap, schema=SCHEMA).splits()
    t, _ = take(split, 0, 3)
    assert t.select(["key", "value", "kafka_key"]).to_pylist() == [
        {"key": "a", "value": 1, "kafka_key": b"k1"},  # a line break inside a value
        {"key": None, "value": None, "kafka_key": b"k2"},  # a tombstone: a row of nulls
        {"key": None, "value": 3, "kafka_key": None},
    ]
    assert t["kafka_timestamp"].type == pa.timestamp("ms", tz="UTC")
    assert t["kafka_timestamp"].null_count == 0


def test_raw_values(kafka):
    topic = kafka.create_topic(1)
    kafka.produce(topic, [b"\x00\xff", b"plain"])
    src = rf.sources.Kafka(topic, bootstrap_servers=kafka.bootstrap, value_format="raw")
    assert src.schema.field("value").type == pa.binary()
    t, _ = take(src.splits()[0], 0, 2)
    assert t["value"].to_pylist() == [b"\x00\xff", b"plain"]


def split_csv(values: pa.BinaryArray) -> pa.Table:
    """A value_format callable: ``"a,1"`` -> key, value (Arrow compute, no Python per value)."""
    import pyarrow.compute as pc

    parts = pc.split_pattern(values.cast(pa.string()), ",")
    if pc.any(pc.not_equal(pc.list_value_length(parts), 2)).as_py():
        raise ValueError("want two comma-separated fields")
    return pa.table({"key": pc.list_element(parts, 0), "value": pc.list_element(parts, 1).cast(pa.int64())})


def test_callable_values_with_inferred_schema_and_bad_records(kafka):
    topic = kafka.create_topic(1)
    kafka.produce(topic, [b"a,1", b"b,2", b"broken", b"c,3"])
    src = rf.sources.Kafka(
        topic, bootstrap_servers=kafka.bootstrap, value_format=split_csv, on_bad_record="skip"
    )
    assert src.schema.names[:2] == ["key", "value"]
    t, ends = take(src.splits()[0], 0, 3)
    assert t.select(["key", "value"]).to_pylist() == [
        {"key": "a", "value": 1},
        {"key": "b", "value": 2},
        {"key": "c", "value": 3},
    ]
    assert t[OFFSET_COLUMN].to_pylist() == [0, 1, 3] and ends[-1] == 4


# ----------------------------------------------------------------------------- bad input

BAD = [*events(3), b"not json", *events(2, start=3), b'{"key": "x", "value": "NaN-ish"}', *events(1, start=5)]


def test_bad_record_fails_naming_partition_and_offset(kafka):
    topic = kafka.create_topic(1)
    kafka.produce(topic, BAD)
    (split,) = rf.sources.Kafka(topic, bootstrap_servers=kafka.bootstrap, schema=SCHEMA).splits()
    with pytest.raises(BadRecordError, match="offset 3") as e:
        take(split, 0, len(BAD))
    assert (e.value.topic, e.value.partition, e.value.offset) == (topic, 0, 3)
    assert cloudpickle.loads(cloudpickle.dumps(e.value)).offset == 3  # crosses Ray intact


def test_bad_records_skipped_are_counted(kafka, caplog):
    topic = kafka.create_topic(1)
    kafka.produce(topic, BAD)
    src = rf.sources.Kafka(topic, bootstrap_servers=kafka.bootstrap, schema=SCHEMA, on_bad_record="skip")
    with caplog.at_level(logging.WARNING, logger="rayflow.sources.kafka"):
        t, ends = take(src.splits()[0], 0, 6)
    assert t["value"].to_pylist() == list(range(6))
    assert t[OFFSET_COLUMN].to_pylist() == [0, 1, 2, 4, 5, 7]
    assert ends[-1] == len(BAD)
    assert "skipped 2 undecodable message(s) at offsets [3, 6]" in caplog.text


def test_bad_records_go_to_the_dead_letter_topic(kafka):
    topic, dlq = kafka.create_topic(1), kafka.create_topic(1, prefix="dlq")
    kafka.produce(topic, BAD, keys=[str(i).encode() for i in range(len(BAD))])
    src = rf.sources.Kafka(
        topic,
        bootstrap_servers=kafka.bootstrap,
        schema=SCHEMA,
        on_bad_record="dead_letter",
        dead_letter_topic=dlq,
    )
    t, _ = take(src.splits()[0], 0, 6)
    assert t["value"].to_pylist() == list(range(6))
    letters = kafka.read(dlq, 2)
    assert [(k, v) for _, _, k, v, _ in letters] == [(b"3", b"not json"), (b"6", BAD[6])]
    headers = dict(letters[0][4])
    assert headers["rayflow.topic"] == topic.encode()
    assert (headers["rayflow.partition"], headers["rayflow.offset"]) == (b"0", b"3")
    assert b"JSON parse error" in headers["rayflow.error"]


def test_missing_topic_is_named_with_what_exists_and_not_created(kafka):
    existing = kafka.create_topic(1)
    src = rf.sources.Kafka("no-such-topic", bootstrap_servers=kafka.bootstrap, schema=SCHEMA)
    with pytest.raises(TopicNotFoundError, match="'no-such-topic' does not exist") as e:
        src.splits()
    assert existing in str(e.value) and e.value.topic == "no-such-topic"
    with pytest.raises(TopicNotFoundError):
        src.splits()  # still missing: asking did not create it


def test_unreachable_broker_is_reported_within_the_timeout(kafka):
    from tests.conftest import free_port

    nowhere = f"127.0.0.1:{free_port()}"
    with pytest.raises(BrokerUnreachableError, match="did not answer within 1 s"):
        rf.sources.Kafka("t", bootstrap_servers=nowhere, schema=SCHEMA, connect_timeout_s=1).splits()
    topic = kafka.create_topic(1)
    (split,) = rf.sources.Kafka(topic, bootstrap_servers=kafka.bootstrap, schema=SCHEMA).splits()
    gone = dataclasses.replace(split, bootstrap_servers=nowhere, connect_timeout_s=1)
    with pytest.raises(BrokerUnreachableError):
        next(gone.read(0))


def test_a_broker_outage_is_waited_out_with_idle_ticks(tmp_path):
    with tansu(tmp_path) as (bootstrap, proc):
        own = Broker(bootstrap)
        topic = own.create_topic(1)
        own.produce(topic, events(3))
        (split,) = rf.sources.Kafka(topic, bootstrap_servers=bootstrap, schema=SCHEMA).splits()
        it = split.read(0)
        try:
            rows = []
            wait_until(lambda: rows.append(next(it)[0].num_rows) or sum(rows) == 3, what="the rows")
            proc.terminate()
            proc.wait(WAIT_S)
            for _ in range(10):  # librdkafka reconnects meanwhile; reading neither fails nor moves
                b, end = next(it)
                assert b.num_rows == 0 and end == 3
        finally:
            it.close()


def test_offsets_committed_to_a_group_for_kafka_tools(kafka):
    from confluent_kafka import Consumer, TopicPartition

    topic = kafka.create_topic(2)
    src = rf.sources.Kafka(topic, bootstrap_servers=kafka.bootstrap, schema=SCHEMA, group_id=f"g-{topic}")
    src.on_commit({f"kafka:{topic}/0": 7, f"kafka:{topic}/1": 0, "kafka:other/0": 3})
    src.close()
    c = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": f"g-{topic}"})
    try:
        got = c.committed([TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=WAIT_S)
    finally:
        c.close()
    assert got[0].offset == 7 and got[1].offset < 0  # nothing committed where nothing was read


# ----------------------------------------------------------------------------- arguments (no broker)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"value_format": "avro"}, "value_format"),
        ({"start": "middle"}, "start"),
        ({"on_bad_record": "ignore"}, "on_bad_record"),
        ({"on_bad_record": "dead_letter"}, "dead_letter_topic"),
        ({"dead_letter_topic": "d"}, "dead_letter_topic"),
        ({"value_format": "raw", "schema": SCHEMA}, "raw"),
        ({"schema": pa.schema([("kafka_offset", pa.int64())])}, "clash"),
        ({"max_batch_wait_s": 5}, "max_batch_wait_s"),
        ({"batch_rows": 0}, "batch_rows"),
        ({"bootstrap_servers": ""}, "bootstrap_servers"),
    ],
)
def test_bad_arguments_are_refused(kw, match):
    kw = {"bootstrap_servers": "127.0.0.1:9", **kw}
    with pytest.raises(ConfigError, match=match):
        rf.sources.Kafka("t", **kw)


def test_source_and_split_pickle_without_clients(kafka):
    topic = kafka.create_topic(1)
    kafka.produce(topic, events(2))
    src = rf.sources.Kafka(topic, bootstrap_servers=kafka.bootstrap, schema=SCHEMA, group_id="g")
    src.on_commit({f"kafka:{topic}/0": 1})  # opens a client, which must not travel
    again = cloudpickle.loads(cloudpickle.dumps(src))
    assert again.schema == src.schema and again._committer is None
    src.close()
    (split,) = again.splits()
    assert take(cloudpickle.loads(cloudpickle.dumps(split)), 0, 2)[0].num_rows == 2
