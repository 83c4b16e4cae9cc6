"""Kafka end to end (DESIGN §11): keyed JSON events produced into a 4-partition topic while the
job runs, aggregated into a live DuckDB view (or back into Kafka), checked against DuckDB's
GROUP BY over everything produced. A job has caught up when the counts add up (never by
timing, nor by the broker's high watermarks, which tansu reports behind its data).

Run them alone with ``pytest -m kafka``; they need the tansu broker (tests/kafka_broker.py).
"""

from __future__ import annotations

import json

import duckdb
import pyarrow as pa
import pytest

import rayflow as rf
from rayflow.sinks.kafka import IDEMPOTENCY_HEADER, json_lines
from rayflow.testing import assert_same_rows, keyed_reference
from tests.conftest import make_job
from tests.kafka_broker import wait_until

pytestmark = [pytest.mark.ray, pytest.mark.kafka]

SCHEMA = pa.schema([("key", pa.int64()), ("value", pa.float64())])
COLUMNS = ["key", "value_count", "value_sum"]
FAST = rf.EngineConfig(heartbeat_interval_s=0.1, session_timeout_s=5.0, discovery_interval_s=0.5)


def chunks(n: int, parts: int, seed: int) -> list[pa.Table]:
    t = rf.sources.Synthetic(events=n * parts, keys=300, seed=seed).to_table().select(["key", "value"])
    return [t.slice(i * n, n) for i in range(parts)]


def produce(kafka, topic: str, table: pa.Table) -> None:
    """The rows as JSON values, keyed by ``key`` (so librdkafka spreads them over the partitions)."""
    keys = [str(k).encode() for k in table["key"].to_pylist()]
    kafka.produce(topic, [v.encode() for v in json_lines(table).to_pylist()], keys=keys)


def kafka_job(tmp_path, name: str, kafka, topic: str, **kw):
    source = rf.sources.Kafka(topic, bootstrap_servers=kafka.bootstrap, schema=SCHEMA)
    return make_job(tmp_path, name, source, checkpoint_interval_s=0.2, config=FAST, **kw)


def counted(run, table: str) -> int:
    """Events the live view covers (0 before the first publication creates the table)."""
    try:
        return int(run.query(f"SELECT coalesce(sum(value_count), 0) AS n FROM {table}")["n"][0].as_py())
    except rf.errors.ConfigError:
        return 0


def read_table(db, table: str) -> pa.Table:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.sql(f"SELECT * FROM {table}").to_arrow_table()
    finally:
        con.close()


def test_live_topic_equals_group_by_over_everything_produced(ray_session, kafka, tmp_path):
    topic = kafka.create_topic(4)
    parts = chunks(5_000, 3, seed=11)
    produce(kafka, topic, parts[0])
    db = tmp_path / "live.duckdb"
    run = kafka_job(tmp_path, "kafka-live", kafka, topic, sink=rf.sinks.DuckDB(db, "totals")).start()
    try:
        wait_until(lambda: counted(run, "totals") == parts[0].num_rows, what="the first chunk")
        for chunk in parts[1:]:  # produced while the job runs
            produce(kafka, topic, chunk)
        total = sum(p.num_rows for p in parts)
        wait_until(lambda: counted(run, "totals") == total, what=f"{total} events counted")
    finally:
        result = run.stop()
    assert result.stats["stopped"]
    assert_same_rows(read_table(db, "totals"), keyed_reference(pa.concat_tables(parts)), columns=COLUMNS)


def test_kill_stop_restart_and_produce_more_resumes_exactly(ray_session, kafka, tmp_path):
    """Along the way: a consumer is killed, the job stops, events arrive while it is stopped, it
    restarts, and more arrive: the view equals the GROUP BY over everything produced. With a
    ``group_id`` the committed offsets also reach Kafka (what its lag tools read)."""
    from confluent_kafka import Consumer, TopicPartition

    topic = kafka.create_topic(4)
    parts = chunks(3_000, 4, seed=12)
    db = tmp_path / "resume.duckdb"
    source = rf.sources.Kafka(topic, bootstrap_servers=kafka.bootstrap, schema=SCHEMA, group_id=f"g-{topic}")
    job = make_job(
        tmp_path, "kafka-resume", source, checkpoint_interval_s=0.2, config=FAST,
        sink=rf.sinks.DuckDB(db, "totals"),
    )  # fmt: skip
    produce(kafka, topic, parts[0])
    run = job.start()
    try:
        wait_until(lambda: counted(run, "totals") == parts[0].num_rows, what="the first chunk")
        ray_session.kill(run.consumers["consumer-0"])  # its partitions resume from their commits
        produce(kafka, topic, parts[1])
        upto = parts[0].num_rows + parts[1].num_rows
        wait_until(lambda: counted(run, "totals") == upto, what=f"{upto} events after the kill")
        group = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": f"g-{topic}"})
        try:

            def offsets_in_kafka() -> bool:
                tps = group.committed([TopicPartition(topic, p) for p in range(4)], timeout=5)
                return sum(max(tp.offset, 0) for tp in tps) > 0

            wait_until(offsets_in_kafka, what="the job's offsets committed to its Kafka group")
        finally:
            group.close()
    finally:
        run.stop()
    produce(kafka, topic, parts[2])  # while the job is stopped
    run = job.start()
    try:
        produce(kafka, topic, parts[3])
        total = sum(p.num_rows for p in parts)
        wait_until(lambda: counted(run, "totals") == total, what=f"{total} events counted")
    finally:
        run.stop()
    assert_same_rows(read_table(db, "totals"), keyed_reference(pa.concat_tables(parts)), columns=COLUMNS)


def test_kafka_to_kafka_changelog(ray_session, kafka, tmp_path):
    """Aggregate a topic into another: the latest message per key (highest ``_version``) is the
    GROUP BY, and every message carries an idempotency key."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    src, out = kafka.create_topic(4), kafka.create_topic(2, prefix="out")
    data = chunks(6_000, 1, seed=13)[0]
    produce(kafka, src, data)
    sink = rf.sinks.Kafka(out, bootstrap_servers=kafka.bootstrap)
    run = kafka_job(tmp_path, "kafka-to-kafka", kafka, src, sink=sink).start()
    latest: dict[int, dict] = {}
    c = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": "t", "enable.auto.commit": False})
    try:
        c.assign([TopicPartition(out, p, OFFSET_BEGINNING) for p in range(2)])

        def caught_up() -> bool:
            for m in c.consume(10_000, timeout=0.2):
                assert m.error() is None, m.error()
                assert dict(m.headers())[IDEMPOTENCY_HEADER].startswith(b"part-")
                row = json.loads(m.value())
                assert m.key() == str(row["key"]).encode()  # keyed by the upsert key
                if row["_version"] >= latest.get(row["key"], {}).get("_version", -1):
                    latest[row["key"]] = row
            return sum(r["value_count"] for r in latest.values()) == data.num_rows

        wait_until(caught_up, what=f"{data.num_rows} events in the changelog")
    finally:
        c.close()
        run.stop()
    got = pa.Table.from_pylist([{k: r[k] for k in COLUMNS} for r in latest.values()])
    assert_same_rows(got, keyed_reference(data), columns=COLUMNS)
