"""The Kafka source: :class:`Kafka`, one split per topic partition, positions are offsets.

confluent-kafka (librdkafka) reads; values are decoded a whole batch at a
time in Arrow (never one message at a time in Python): JSON values are joined
into one newline-delimited buffer and parsed by ``pyarrow.json``, raw values
become one binary column, a callable gets the batch's values as one Arrow
array. Only collecting each message's offset, key and timestamp from
confluent-kafka's message objects is per message (list comprehensions), and
each becomes one Arrow array per batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson

from rayflow.errors import (
    BadRecordError,
    BrokerUnreachableError,
    ConfigError,
    EmptyInputError,
    PositionOutOfRangeError,
    TopicNotFoundError,
)
from rayflow.sources.base import IDLE_TICK_S, Source, Split

logger = logging.getLogger(__name__)


class _OncePer(logging.Filter):
    """Lets each message through once per ``window_s``: while a broker is down, librdkafka
    repeats the same connection failure many times a second."""

    def __init__(self, window_s: float):
        super().__init__()
        self.window_s = window_s
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key, now = record.getMessage(), time.monotonic()
        with self._lock:
            if now - self._last.get(key, -self.window_s) < self.window_s:
                return False
            if len(self._last) > 1_000:  # bounded: forget old messages wholesale
                self._last.clear()
            self._last[key] = now
        return True


#: librdkafka's own log lines (connection failures and the like), each at most every 10 s.
librdkafka_logger = logging.getLogger(f"{__name__}.librdkafka")
librdkafka_logger.addFilter(_OncePer(10.0))

#: The columns every batch of a Kafka source carries besides the decoded value's, named with a
#: ``kafka_`` prefix so they never clash with a field of the value (a clash is refused).
KEY_COLUMN = "kafka_key"
TIMESTAMP_COLUMN = "kafka_timestamp"
PARTITION_COLUMN = "kafka_partition"
OFFSET_COLUMN = "kafka_offset"
METADATA_SCHEMA = pa.schema(
    [
        pa.field(KEY_COLUMN, pa.binary()),  # the message key's bytes; null for a message without one
        pa.field(TIMESTAMP_COLUMN, pa.timestamp("ms", tz="UTC")),  # null where the broker has none
        pa.field(PARTITION_COLUMN, pa.int32(), nullable=False),
        pa.field(OFFSET_COLUMN, pa.int64(), nullable=False),
    ]
)
#: The column of ``value_format="raw"``: the value's bytes (null for a message without a value).
RAW_VALUE_COLUMN = "value"

#: Messages per batch at most: large enough that the source actor's per-batch cost (hashing,
#: one ``ray.put`` per partition) vanishes per row, small enough to keep memory and latency low.
KAFKA_BATCH_ROWS = 50_000
#: Longest a batch waits to fill before it is yielded with what came; also how often a quiet
#: partition yields an idle tick. Below IDLE_TICK_S, as the split contract asks.
MAX_BATCH_WAIT_S = 0.1
#: How long to wait for the broker to answer before the source reports it unreachable.
CONNECT_TIMEOUT_S = 10.0
#: Messages sampled to infer the schema of JSON values when none is given.
INFER_ROWS = 1_000
#: librdkafka's consumer group for reading: rayflow never joins it (partitions are assigned
#: explicitly) nor commits to it; librdkafka only wants a name.
_READER_GROUP = "rayflow-reader"
#: The header names of a dead letter (see ``on_bad_record``).
DEAD_LETTER_HEADERS = ("rayflow.topic", "rayflow.partition", "rayflow.offset", "rayflow.error")

_FORMATS = ("json", "raw")
_STARTS = ("earliest", "latest")
_POLICIES = ("fail", "skip", "dead_letter")


def _ck():
    """confluent_kafka, imported on first use: ``import rayflow`` does not load librdkafka."""
    import confluent_kafka

    return confluent_kafka


def client_config(
    bootstrap_servers: str, config: Mapping[str, Any], connect_timeout_s: float, **extra: Any
) -> dict[str, Any]:
    """librdkafka settings for a client of ``bootstrap_servers``: connection attempts time out
    after ``connect_timeout_s``, and librdkafka logs through Python's ``logging`` (logger
    ``rayflow.sources.kafka.librdkafka``, each repeated line at most every 10 s) rather than stderr. ``config`` (security settings and other
    librdkafka properties) overrides the rest."""
    return {
        "bootstrap.servers": bootstrap_servers,
        "socket.connection.setup.timeout.ms": max(1, int(connect_timeout_s * 1000)),
        "logger": librdkafka_logger,
        **extra,
        **dict(config),
    }


def list_topics(client, *, bootstrap_servers: str, timeout_s: float) -> dict:
    """All topics' metadata, or :class:`BrokerUnreachableError` after ``timeout_s``.

    All topics, never one by name: asking a broker about one topic by name
    creates it where ``auto.create.topics.enable`` is on (tansu always does),
    which would hide a misspelt topic behind a new empty one.
    """
    ck = _ck()
    try:
        return client.list_topics(timeout=timeout_s).topics
    except ck.KafkaException as e:
        raise BrokerUnreachableError(
            f"the Kafka broker(s) {bootstrap_servers!r} did not answer within {timeout_s:g} s "
            f"({e.args[0].str() if e.args else e}); check bootstrap_servers and that the broker "
            "runs and is reachable from this machine (or raise connect_timeout_s)"
        ) from e


def topic_partitions(topics: dict, topic: str, bootstrap_servers: str) -> list[int]:
    """The partition ids of ``topic`` in ``topics`` (metadata), or :class:`TopicNotFoundError`."""
    md = topics.get(topic)
    if md is None or md.error is not None:
        existing = sorted(t for t in topics if not t.startswith("__"))
        raise TopicNotFoundError(
            f"the Kafka topic {topic!r} does not exist on {bootstrap_servers!r}"
            + (f" ({md.error.str()})" if md is not None else "")
            + f"; existing topics: {existing[:50]}{' ...' if len(existing) > 50 else ''}. "
            "Create it (rayflow never creates topics) or fix the name",
            topic=topic,
        )
    return sorted(md.partitions)


# ----------------------------------------------------------------------------- decoding


class _Undecodable(Exception):
    """Values that a decoder cannot turn into exactly one row each."""


def _json_decoder(schema: pa.Schema) -> Callable[[list], pa.Table]:
    """Newline-delimited JSON over the values, parsed at once into ``schema`` (fields not in
    it are ignored). Values must be JSON objects, one row each."""
    parse = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")

    def decode(values: list) -> pa.Table:
        if None in values:  # a message without a value (a tombstone): a row of nulls
            values = [b"{}" if v is None else v for v in values]
        buf = b"\n".join(values)
        if buf.count(b"\n") != len(values) - 1:
            # A value holds a line break: whitespace in valid JSON (a string cannot hold a raw
            # one), so a space keeps its meaning and the one-line-per-message framing.
            buf = b"\n".join([v.replace(b"\n", b" ").replace(b"\r", b" ") for v in values])
        # A block must hold the longest line (a line never straddles two blocks).
        block = max(1 << 20, max(map(len, values), default=0) + 1)
        try:
            t = pajson.read_json(
                pa.BufferReader(buf),
                read_options=pajson.ReadOptions(use_threads=True, block_size=block),
                parse_options=parse,
            )
            t.validate(full=True)  # read_json does not check that strings are UTF-8
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise _Undecodable(str(e)) from e
        if t.num_rows != len(values):  # an empty value, or two objects in one
            raise _Undecodable(
                f"{len(values)} messages gave {t.num_rows} rows: a value must hold exactly one JSON object"
            )
        return t.select(schema.names)

    return decode


def _raw_decoder(values: list) -> pa.Table:
    return pa.table({RAW_VALUE_COLUMN: pa.array(values, pa.binary())})


def _callable_decoder(fn: Callable, schema: pa.Schema | None) -> Callable[[list], pa.Table]:
    def decode(values: list) -> pa.Table:
        try:
            out = fn(pa.array(values, pa.binary()))
        except Exception as e:  # the user's decoder refused these values
            raise _Undecodable(f"{type(e).__name__}: {e}") from e
        if isinstance(out, pa.RecordBatch):
            out = pa.Table.from_batches([out])
        if not isinstance(out, pa.Table):
            raise ConfigError(
                f"value_format={fn!r} returned a {type(out).__name__}; it must return a "
                "pyarrow.Table or RecordBatch with one row per value"
            )
        if out.num_rows != len(values):
            raise _Undecodable(f"value_format returned {out.num_rows} rows for {len(values)} values")
        if schema is not None and not out.schema.equals(schema):
            try:
                out = out.select(schema.names).cast(schema)
            except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
                raise _Undecodable(f"value_format returned {out.schema}, not the schema {schema}: {e}") from e
        return out

    return decode


def _decode_tolerant(
    decode: Callable[[list], pa.Table], values: list
) -> tuple[list[pa.Table], np.ndarray | None, list[tuple[int, str]]]:
    """Decode ``values`` at once; only when that fails, find the undecodable ones by bisection.

    Returns the decoded tables (in order), the indices of the values they hold
    (``None``: all of them) and ``(index, error)`` of each undecodable value. A
    batch with ``k`` bad values costs ``O(k log n)`` parses of shrinking slices,
    so a clean batch pays one parse and a dirty one stays vectorized.
    """
    try:
        return [decode(values)], None, []
    except _Undecodable:
        pass
    tables: list[pa.Table] = []
    good: list[np.ndarray] = []
    bad: list[tuple[int, str]] = []

    def go(lo: int, hi: int) -> None:
        try:
            tables.append(decode(values[lo:hi]))
            good.append(np.arange(lo, hi))
            return
        except _Undecodable as e:
            if hi - lo == 1:
                bad.append((lo, str(e)))
                return
        mid = (lo + hi) // 2
        go(lo, mid)
        go(mid, hi)

    go(0, len(values))
    return tables, (np.concatenate(good) if good else np.zeros(0, np.int64)), bad


def _empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array([], f.type) for f in schema], schema=schema)


# ----------------------------------------------------------------------------- the split


@dataclass(frozen=True)
class _KafkaSplit(Split):
    """One topic partition. Positions are Kafka offsets: the offset of the next message."""

    name: str
    topic: str
    partition: int
    bootstrap_servers: str
    #: Where to start when there is no committed position (``read(0)``): 0 for the log's start,
    #: or the offset ``start="latest"`` was pinned at when the job resolved its splits.
    start_offset: int
    value_format: Any  # "json", "raw" or a callable
    value_schema: pa.Schema
    schema: pa.Schema
    on_bad_record: str
    dead_letter_topic: str | None
    batch_rows: int
    max_batch_wait_s: float
    connect_timeout_s: float
    config: dict = field(default_factory=dict)

    unbounded = True
    dense = False  # transaction markers and compaction leave offsets without a message

    def row_positions(self, batch: pa.RecordBatch) -> np.ndarray:
        return batch.column(OFFSET_COLUMN).to_numpy()

    def available(self) -> int | None:
        """The partition's high watermark. Lag only: a broker's watermark may trail the
        messages it serves (tansu's trails by up to a produce batch)."""
        try:
            return _watermarks(self)[1]
        except Exception:  # lag is best effort: a broker hiccup must not stop reading
            logger.debug("no watermark for %s", self.name, exc_info=True)
            return None

    def _decoder(self) -> Callable[[list], pa.Table]:
        if self.value_format == "json":
            return _json_decoder(self.value_schema)
        if self.value_format == "raw":
            return _raw_decoder
        return _callable_decoder(self.value_format, self.value_schema)

    def read(self, position: int) -> Iterator[tuple[pa.RecordBatch, int]]:
        ck = _ck()
        consumer = ck.Consumer(
            client_config(
                self.bootstrap_servers,
                self.config,
                self.connect_timeout_s,
                **{
                    "group.id": _READER_GROUP,
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    # A committed offset the broker no longer holds is an error, never a silent jump.
                    "auto.offset.reset": "error",
                    "enable.partition.eof": False,
                    # The broker answers a fetch at once when it has data; with none it holds the
                    # fetch this long (librdkafka's 500 ms default adds that to latency on a quiet
                    # partition that just got a message: measured 209 -> 129 ms p50 on tansu).
                    "fetch.wait.max.ms": 50,
                },
            )
        )
        dead_letters = None
        try:
            parts = topic_partitions(
                list_topics(
                    consumer, bootstrap_servers=self.bootstrap_servers, timeout_s=self.connect_timeout_s
                ),
                self.topic,
                self.bootstrap_servers,
            )
            if self.partition not in parts:
                raise TopicNotFoundError(
                    f"partition {self.partition} of the Kafka topic {self.topic!r} does not exist "
                    f"(it has partitions {parts}); was the topic deleted and created again?",
                    topic=self.topic,
                )
            # read(0) means no committed position: the log's start, or where "latest" was pinned.
            pos = position or self.start_offset
            consumer.assign([ck.TopicPartition(self.topic, self.partition, pos or ck.OFFSET_BEGINNING)])
            decode = self._decoder()
            empty = _empty_batch(self.schema)
            while True:
                msgs = consumer.consume(self.batch_rows, timeout=self.max_batch_wait_s)
                if msgs and any(m.error() is not None for m in msgs):
                    msgs = self._drop_errors(msgs, pos)
                if msgs and msgs[0].offset() < pos:  # never a row before the asked position
                    msgs = [m for m in msgs if m.offset() >= pos]
                if not msgs:
                    yield empty, pos  # an idle tick: nothing new
                    continue
                batch, bad = self._decode(decode, msgs)
                if bad:
                    dead_letters = self._bad_records(msgs, bad, dead_letters)
                pos = msgs[-1].offset() + 1  # past the last message, decodable or not
                yield batch, pos
        finally:
            consumer.close()
            if dead_letters is not None:
                dead_letters.flush(self.connect_timeout_s)

    def _drop_errors(self, msgs: list, pos: int) -> list:
        """The messages of ``msgs`` that are data; raises for errors that stop reading."""
        ck = _ck()
        out = []
        for m in msgs:
            err = m.error()
            if err is None:
                out.append(m)
                continue
            code = err.code()
            if code in (ck.KafkaError._AUTO_OFFSET_RESET, ck.KafkaError.OFFSET_OUT_OF_RANGE):
                raise PositionOutOfRangeError(
                    f"{self.name}: offset {pos} is not on the broker ({err.str()}): retention "
                    "deleted it before the job read it (rows are lost), or the topic was deleted and "
                    "created again. Start a new job (another name) to read what the topic holds now, "
                    "or keep data longer"
                )
            if code in (ck.KafkaError.UNKNOWN_TOPIC_OR_PART, ck.KafkaError._UNKNOWN_TOPIC):
                raise TopicNotFoundError(
                    f"{self.name}: the topic or partition is gone ({err.str()})", topic=self.topic
                )
            if err.fatal():
                raise BrokerUnreachableError(f"{self.name}: reading failed: {err.str()}")
            # Anything else (a lost connection, a broker restarting) librdkafka retries on its
            # own: reading waits it out, yielding idle ticks meanwhile (lag shows it).
            logger.warning("%s: %s (librdkafka retries)", self.name, err.str())
        return out

    def _decode(self, decode, msgs: list) -> tuple[pa.RecordBatch, list[tuple[int, str]]]:
        """One batch from ``msgs``: the values decoded at once, the metadata columns beside them."""
        # Per message only what confluent-kafka hands out per message; Arrow does the rest.
        values = [m.value() for m in msgs]
        tables, good, bad = _decode_tolerant(decode, values)
        if bad and self.on_bad_record == "fail":
            i, err = bad[0]
            raise BadRecordError(
                f"{self.name} offset {msgs[i].offset()}: the message cannot be decoded as "
                f"{self._format_name()}: {err}. Value (first 200 bytes): {(values[i] or b'')[:200]!r}. "
                "Fix the producer, give schema=, or choose on_bad_record='skip' or 'dead_letter'",
                topic=self.topic,
                partition=self.partition,
                offset=msgs[i].offset(),
            )
        if good is not None:
            msgs = [msgs[i] for i in good.tolist()]
        n = len(msgs)
        if n == 0:
            return _empty_batch(self.schema), bad
        ts = np.array([m.timestamp()[1] for m in msgs], dtype=np.int64)
        value = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        value_cols = value.combine_chunks().to_batches()[0].columns  # n > 0 rows: one batch
        meta = [
            pa.array([m.key() for m in msgs], pa.binary()),
            pa.array(ts, mask=ts < 0).cast(pa.timestamp("ms", tz="UTC")),  # -1: no timestamp
            pa.array(np.full(n, self.partition, dtype=np.int32)),
            pa.array(np.array([m.offset() for m in msgs], dtype=np.int64)),
        ]
        return pa.RecordBatch.from_arrays(value_cols + meta, schema=self.schema), bad

    def _format_name(self) -> str:
        return self.value_format if isinstance(self.value_format, str) else repr(self.value_format)

    def _bad_records(self, msgs: list, bad: list[tuple[int, str]], producer):
        """Skip or dead-letter the undecodable messages ``bad`` (indices into ``msgs``)."""
        offsets = [msgs[i].offset() for i, _ in bad]
        if self.on_bad_record == "skip":
            logger.warning(
                "%s: skipped %d undecodable message(s) at offsets %s%s; first error: %s",
                self.name,
                len(bad),
                offsets[:10],
                " ..." if len(bad) > 10 else "",
                bad[0][1],
            )
            return producer
        if producer is None:
            producer = _ck().Producer(
                client_config(
                    self.bootstrap_servers,
                    self.config,
                    self.connect_timeout_s,
                    **{"enable.idempotence": True, "acks": "all"},
                )
            )
        failed: list[str] = []

        def delivered(err, _msg) -> None:
            if err is not None:
                failed.append(err.str())

        for (i, err), off in zip(bad, offsets):
            m = msgs[i]
            headers = [
                (DEAD_LETTER_HEADERS[0], self.topic.encode()),
                (DEAD_LETTER_HEADERS[1], str(self.partition).encode()),
                (DEAD_LETTER_HEADERS[2], str(off).encode()),
                (DEAD_LETTER_HEADERS[3], err.encode("utf-8", "replace")[:4096]),
            ]
            ts = m.timestamp()[1]
            producer.produce(
                self.dead_letter_topic,
                value=m.value(),
                key=m.key(),
                headers=headers,
                on_delivery=delivered,
                **({"timestamp": ts} if ts >= 0 else {}),
            )
        # Durable before the batch goes on: once its position is committed, its dead letters
        # must exist (a replay sends them again: at least once, keyed by partition and offset).
        left = producer.flush(self.connect_timeout_s)
        if left or failed:
            raise BrokerUnreachableError(
                f"{self.name}: {left or len(failed)} dead letter(s) for {self.dead_letter_topic!r} were "
                f"not acknowledged within {self.connect_timeout_s:g} s{': ' + failed[0] if failed else ''}"
            )
        logger.warning(
            "%s: %d undecodable message(s) at offsets %s sent to %r; first error: %s",
            self.name,
            len(bad),
            offsets[:10],
            self.dead_letter_topic,
            bad[0][1],
        )
        return producer


# ----------------------------------------------------------------------------- metadata clients

_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def _metadata_client(bootstrap_servers: str, config: dict, connect_timeout_s: float):
    """One consumer per process and cluster for metadata and watermarks (never reads)."""
    key = (bootstrap_servers, tuple(sorted((k, repr(v)) for k, v in config.items())))
    with _clients_lock:
        c = _clients.get(key)
        if c is None:
            c = _clients[key] = _ck().Consumer(
                client_config(
                    bootstrap_servers,
                    config,
                    connect_timeout_s,
                    **{"group.id": _READER_GROUP, "enable.auto.commit": False},
                )
            )
        return c


def _watermarks(split: _KafkaSplit) -> tuple[int, int]:
    ck = _ck()
    c = _metadata_client(split.bootstrap_servers, split.config, split.connect_timeout_s)
    wm = c.get_watermark_offsets(
        ck.TopicPartition(split.topic, split.partition), timeout=min(1.0, split.connect_timeout_s)
    )
    if wm is None:
        raise BrokerUnreachableError(f"{split.name}: no watermark within the timeout")
    return wm


# ----------------------------------------------------------------------------- the source


class Kafka(Source):
    """A Kafka topic: each partition is a split, and a position is an offset (the next one to
    read). The job reads until ``run.stop()``; partitions added to the topic while it runs are
    found by the engine's discovery (``EngineConfig.discovery_interval_s``) and read from
    their first offset.

    **Columns.** The decoded value's columns, then ``kafka_key`` (binary, null without a key),
    ``kafka_timestamp`` (``timestamp[ms, UTC]``, the message's create/append time; null if the
    broker has none), ``kafka_partition`` (int32) and ``kafka_offset`` (int64). A value field
    with one of these names is refused (:class:`ConfigError`).

    **Values** (``value_format``):

    - ``"json"``: each value is one JSON object, parsed into ``schema=`` (a ``pyarrow.Schema``:
      fields it lacks are ignored, missing ones are null). Without ``schema=`` the schema is
      inferred once, when the job starts, from up to :data:`INFER_ROWS` messages at the start
      of the partitions; an empty topic then raises :class:`EmptyInputError`. Inference only
      sees a sample (a field that is always null in it stays of type null, an int field later
      holding ``1.5`` makes those messages undecodable): pass ``schema=`` in production.
      A message without a value (a tombstone) gives a row of nulls.
    - ``"raw"``: the value's bytes as a binary column ``value``.
    - a callable: gets the batch's values as one ``pyarrow.BinaryArray`` and returns a
      ``pyarrow.Table`` or ``RecordBatch`` with one row per value (``schema=``, or inferred by
      calling it on a sample). An exception it raises marks the values undecodable.

    **Undecodable messages** (``on_bad_record``): a batch is decoded at once, and only when that
    fails are its bad messages found (by bisection). ``"fail"`` raises :class:`BadRecordError`
    naming the partition and offset (the job fails; nothing of that batch is committed).
    ``"skip"`` drops them, with a logged warning counting them. ``"dead_letter"`` produces each
    to ``dead_letter_topic`` (same cluster; it must exist), value and key unchanged, with the
    headers ``rayflow.topic``, ``rayflow.partition``, ``rayflow.offset`` and ``rayflow.error``,
    acknowledged before the batch goes on: at least once (a replay after a failure sends them
    again, with the same partition and offset headers).

    **Where reading starts** when the job has no committed position: ``start="earliest"``, the
    first offset the broker still holds; ``"latest"``, the high watermark of each partition when
    the job first resolves its splits (pinned then and carried with the split, so a replay or a
    restarted source reads from the same offset). Caveats: some brokers' watermarks trail
    (tansu's, by up to a produce batch), so ``"latest"`` may include a few older messages; and
    partitions found later are read from their first offset. A committed position always wins.
    A committed offset the broker has deleted since (retention) raises
    :class:`PositionOutOfRangeError` rather than skip rows.

    **Guarantees.** Reading is exactly once: positions are committed with the job's state in
    rayflow's catalog, which is the source of truth; nothing is committed to Kafka for reading.
    With ``group_id``, :meth:`on_commit` also commits those offsets to Kafka under that group,
    so Kafka's lag tools see the job (informational only; it never steers reading). Offsets
    have gaps (transaction markers, compaction): the split is ``dense = False``. Isolation is
    librdkafka's default, ``read_committed``.

    **Errors.** A broker that does not answer within ``connect_timeout_s`` raises
    :class:`BrokerUnreachableError`; a missing topic :class:`TopicNotFoundError`, listing the
    topics there are. Once reading, a broker outage is waited out (librdkafka reconnects) and
    shows as idle ticks, then lag. ``config`` passes librdkafka settings (security, fetch sizes).
    """

    dynamic = True

    def __init__(
        self,
        topic: str,
        *,
        bootstrap_servers: str,
        value_format: str | Callable[[pa.BinaryArray], pa.Table | pa.RecordBatch] = "json",
        start: str = "earliest",
        schema: pa.Schema | None = None,
        on_bad_record: str = "fail",
        dead_letter_topic: str | None = None,
        group_id: str | None = None,
        batch_rows: int = KAFKA_BATCH_ROWS,
        max_batch_wait_s: float = MAX_BATCH_WAIT_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        config: Mapping[str, Any] | None = None,
    ):
        if not topic or not isinstance(topic, str):
            raise ConfigError(f"rf.sources.Kafka needs a topic name, got {topic!r}")
        if not bootstrap_servers or not isinstance(bootstrap_servers, str):
            raise ConfigError(
                f"rf.sources.Kafka needs bootstrap_servers ('host:port[,host:port]'), got {bootstrap_servers!r}"
            )
        if not (value_format in _FORMATS or callable(value_format)):
            raise ConfigError(
                f"rf.sources.Kafka: value_format must be one of {_FORMATS} or a callable, got {value_format!r}"
            )
        if value_format == "raw" and schema is not None:
            raise ConfigError("rf.sources.Kafka: value_format='raw' has a fixed schema; drop schema=")
        if schema is not None and not isinstance(schema, pa.Schema):
            raise ConfigError(
                f"rf.sources.Kafka: schema must be a pyarrow.Schema, got {type(schema).__name__}"
            )
        if start not in _STARTS:
            raise ConfigError(f"rf.sources.Kafka: start must be one of {_STARTS}, got {start!r}")
        if on_bad_record not in _POLICIES:
            raise ConfigError(
                f"rf.sources.Kafka: on_bad_record must be one of {_POLICIES}, got {on_bad_record!r}"
            )
        if (on_bad_record == "dead_letter") != (dead_letter_topic is not None):
            raise ConfigError(
                "rf.sources.Kafka: on_bad_record='dead_letter' and dead_letter_topic= go together "
                f"(got on_bad_record={on_bad_record!r}, dead_letter_topic={dead_letter_topic!r})"
            )
        if dead_letter_topic == topic:
            raise ConfigError("rf.sources.Kafka: dead_letter_topic must differ from the topic read")
        if not isinstance(batch_rows, int) or not 1 <= batch_rows <= 1_000_000:
            raise ConfigError(
                f"rf.sources.Kafka: batch_rows must be an integer in [1, 1000000], got {batch_rows!r}"
            )
        if not 0 < max_batch_wait_s <= IDLE_TICK_S:
            raise ConfigError(
                f"rf.sources.Kafka: max_batch_wait_s must be in (0, {IDLE_TICK_S}] (a quiet partition "
                f"ticks that often), got {max_batch_wait_s!r}"
            )
        if not connect_timeout_s > 0:
            raise ConfigError(f"rf.sources.Kafka: connect_timeout_s must be > 0, got {connect_timeout_s!r}")
        self.topic = topic
        self.bootstrap_servers = bootstrap_servers
        self.value_format = value_format
        self.start = start
        self.on_bad_record = on_bad_record
        self.dead_letter_topic = dead_letter_topic
        self.group_id = group_id
        self.batch_rows = batch_rows
        self.max_batch_wait_s = max_batch_wait_s
        self.connect_timeout_s = connect_timeout_s
        self.config = dict(config or {})
        self._given_schema = schema
        if schema is not None:
            _check_names(schema)
        #: ``start="latest"``: partition -> offset, pinned by the first splits() (travels with
        #: the instance to the source actors, so their discovery keeps the same starts).
        self._pinned: dict[int, int] | None = None
        self._committer = None

    # -- resolution (driver, and discovery in the source actors)

    def _client(self):
        return _metadata_client(self.bootstrap_servers, self.config, self.connect_timeout_s)

    def _partitions(self) -> list[int]:
        topics = list_topics(
            self._client(), bootstrap_servers=self.bootstrap_servers, timeout_s=self.connect_timeout_s
        )
        parts = topic_partitions(topics, self.topic, self.bootstrap_servers)
        if self.dead_letter_topic is not None:
            topic_partitions(topics, self.dead_letter_topic, self.bootstrap_servers)
        return parts

    def splits(self) -> list[Split]:
        """One split per partition the topic has now (broker metadata)."""
        parts = self._partitions()
        if self.start == "latest" and self._pinned is None:
            self._pinned = {p: self._high_watermark(p) for p in parts}
        schema, value_schema = self.schema, self._value_schema
        return [
            _KafkaSplit(
                f"kafka:{self.topic}/{p}",
                self.topic,
                p,
                self.bootstrap_servers,
                (self._pinned or {}).get(p, 0),
                self.value_format,
                value_schema,
                schema,
                self.on_bad_record,
                self.dead_letter_topic,
                self.batch_rows,
                self.max_batch_wait_s,
                self.connect_timeout_s,
                self.config,
            )
            for p in parts
        ]

    def _high_watermark(self, partition: int) -> int:
        ck = _ck()
        wm = self._client().get_watermark_offsets(
            ck.TopicPartition(self.topic, partition), timeout=self.connect_timeout_s
        )
        if wm is None:
            raise BrokerUnreachableError(
                f"no high watermark for {self.topic}/{partition} within {self.connect_timeout_s:g} s"
            )
        return wm[1]

    @property
    def schema(self) -> pa.Schema:
        """The value's columns, then :data:`METADATA_SCHEMA`."""
        return pa.schema(list(self._value_schema) + list(METADATA_SCHEMA))

    @cached_property
    def _value_schema(self) -> pa.Schema:
        if self.value_format == "raw":
            return pa.schema([pa.field(RAW_VALUE_COLUMN, pa.binary())])
        if self._given_schema is not None:
            return self._given_schema
        schema = self._infer()
        _check_names(schema)
        return schema

    def _infer(self) -> pa.Schema:
        """The schema of a sample of the topic's first messages (JSON or the callable's)."""
        values = self._sample()
        if self.value_format == "json":
            buf = b"\n".join(v.replace(b"\n", b" ") for v in values if v)
            try:
                return pajson.read_json(pa.BufferReader(buf)).schema
            except pa.ArrowInvalid:
                pass
            good = []  # a bad message in the sample: infer from the ones that parse alone
            for v in values:
                try:
                    pajson.read_json(pa.BufferReader(v))
                    good.append(v)
                except pa.ArrowInvalid:
                    continue
            if not good:
                raise EmptyInputError(
                    f"none of the first {len(values)} messages of the Kafka topic {self.topic!r} is "
                    "a JSON object, so no schema can be inferred: pass schema= or value_format='raw'"
                )
            return pajson.read_json(pa.BufferReader(b"\n".join(good))).schema
        tables, _, bad = _decode_tolerant(_callable_decoder(self.value_format, None), values)
        if not tables:
            raise EmptyInputError(
                f"value_format={self.value_format!r} refused all of the first {len(values)} messages of "
                f"the Kafka topic {self.topic!r} ({bad[0][1]}), so no schema can be inferred: pass schema="
            )
        return tables[0].schema

    def _sample(self) -> list:
        ck = _ck()
        parts = self._partitions()
        client = self._client()
        wms = {
            p: client.get_watermark_offsets(ck.TopicPartition(self.topic, p), timeout=self.connect_timeout_s)
            for p in parts
        }
        nonempty = [p for p, wm in wms.items() if wm is not None and wm[1] > wm[0]]
        if not nonempty:
            raise EmptyInputError(
                f"the Kafka topic {self.topic!r} holds no messages yet, so the schema of its values "
                "cannot be inferred: pass schema= (a pyarrow.Schema of the JSON fields)"
            )
        consumer = ck.Consumer(
            client_config(
                self.bootstrap_servers,
                self.config,
                self.connect_timeout_s,
                **{"group.id": _READER_GROUP, "enable.auto.commit": False, "auto.offset.reset": "earliest"},
            )
        )
        values: list = []
        try:
            consumer.assign([ck.TopicPartition(self.topic, p, ck.OFFSET_BEGINNING) for p in nonempty])
            deadline = time.monotonic() + self.connect_timeout_s
            while len(values) < INFER_ROWS and time.monotonic() < deadline:
                msgs = consumer.consume(INFER_ROWS - len(values), timeout=0.5)
                values += [m.value() for m in msgs if m.error() is None]
                if values and not msgs:
                    break  # what the broker had at once is enough
        finally:
            consumer.close()
        if not values:
            raise EmptyInputError(
                f"no message of the Kafka topic {self.topic!r} arrived within {self.connect_timeout_s:g} s "
                "to infer the schema of its values from: pass schema="
            )
        return values

    # -- offsets for Kafka's tools

    def on_commit(self, positions: Mapping[str, int]) -> None:
        """Commit ``positions`` (split name -> offset every rayflow partition has committed up
        to) to Kafka under ``group_id``, so ``kafka-consumer-groups`` shows the job's lag.

        Informational and best effort: meant to be called by the engine after a
        recorded commit (the catalog stays the source of truth); does nothing
        without ``group_id``; a failure is logged, never raised.
        """
        if self.group_id is None:
            return
        ck = _ck()
        prefix = f"kafka:{self.topic}/"
        offsets = [
            ck.TopicPartition(self.topic, int(name[len(prefix) :]), int(pos))
            for name, pos in positions.items()
            if name.startswith(prefix) and pos > 0
        ]
        if not offsets:
            return
        try:
            if self._committer is None:
                self._committer = ck.Consumer(
                    client_config(
                        self.bootstrap_servers,
                        self.config,
                        self.connect_timeout_s,
                        **{"group.id": self.group_id, "enable.auto.commit": False},
                    )
                )
            self._committer.commit(offsets=offsets, asynchronous=False)
        except Exception:  # informational: never fail a job for Kafka's view of it
            logger.warning(
                "could not commit offsets of %s to group %r", self.topic, self.group_id, exc_info=True
            )

    def close(self) -> None:
        """Release the client :meth:`on_commit` opened."""
        if self._committer is not None:
            self._committer.close()
            self._committer = None

    def __getstate__(self) -> dict:  # an open client never travels with the source
        return {**self.__dict__, "_committer": None}

    def __repr__(self) -> str:
        return f"rf.sources.Kafka({self.topic!r}, bootstrap_servers={self.bootstrap_servers!r})"


def _check_names(schema: pa.Schema) -> None:
    clash = sorted(set(schema.names) & set(METADATA_SCHEMA.names))
    if clash:
        raise ConfigError(
            f"rf.sources.Kafka: the value has field(s) {clash}, which clash with the columns the "
            f"source adds ({METADATA_SCHEMA.names}); rename them in the producer or in schema="
        )
