"""The Kafka sink: each committed output file's rows produced to a topic, as JSON."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from rayflow.errors import BrokerUnreachableError, ConfigError
from rayflow.sinks.base import PENDING_DIR, Sink, _lost, _under, upsert_key
from rayflow.sources.kafka import CONNECT_TIMEOUT_S, _ck, client_config, list_topics, topic_partitions

if TYPE_CHECKING:
    from rayflow._internal.checkpoint.store import Store

#: The header every produced message carries: ``<output file name>/<row index>``, the same
#: for the same row however often the file is published (see :class:`Kafka`).
IDEMPOTENCY_HEADER = "rayflow.idempotency_key"
#: Where a published file leaves its marker, under the sink's root (see :meth:`Kafka.publish`).
PUBLISHED_DIR = "_published"
#: How long a publication waits for the broker to acknowledge every message of a file.
DELIVERY_TIMEOUT_S = 60.0


class Kafka(Sink):
    """Produce the output to ``topic``: one message per row, the value the row as a JSON object,
    the key the ``key`` column's value (text; several columns: a JSON object of them). Without
    ``key``, an upsert stream (a continuous ``Aggregate``, see ``sinks/base.py``) is keyed by its
    key columns, so the topic is a changelog (its ``_version`` column, in the value, orders the
    rows of a key; compaction keeps the latest); an append stream has no key, and librdkafka
    spreads its rows over the partitions.

    **At least once, with an idempotency key.** Each committed output file is produced once
    its commit is recorded, and every message carries the header ``rayflow.idempotency_key``:
    ``<output file name>/<row index>``, identical each time the same row is produced. After
    the broker has acknowledged every message of a file (``acks=all``, librdkafka's idempotent
    producer, so its own retries never duplicate), an empty marker ``_published/<name>`` is
    written under the sink's root and the pending file deleted; a repeated publication finds
    the marker and produces nothing. Only a crash between the acknowledgement and the marker
    produces a file again: the duplicates then carry the same idempotency keys, and a consumer
    that needs exactly once drops keys it has seen (for a changelog, keeping the highest
    ``_version`` per key is enough: a duplicate repeats a version).
    Transactions are not used: the broker the tests run against (tansu) accepts them but
    does not hide aborted messages from ``read_committed`` readers.

    **Encoding** is vectorized (Arrow compute builds each row's JSON text): numbers, booleans,
    strings (escaped), decimals as numbers, timestamps and dates as ISO 8601 strings, nulls and
    non-finite floats as ``null``. Binary becomes base64 text and other types (lists, structs)
    go through Python's ``json``, row by row: a slower path.

    Caveats: the topic must exist (checked at the first publication); the markers (one empty
    file per output file) stay, as the DuckDB sink's applied table does; ``config`` passes
    librdkafka settings (security, ``compression.type``, ``linger.ms``).
    """

    def __init__(
        self,
        topic: str,
        *,
        bootstrap_servers: str,
        key: str | Sequence[str] | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        delivery_timeout_s: float = DELIVERY_TIMEOUT_S,
        config: Mapping[str, Any] | None = None,
    ):
        if not topic or not isinstance(topic, str):
            raise ConfigError(f"rf.sinks.Kafka needs a topic name, got {topic!r}")
        if not bootstrap_servers or not isinstance(bootstrap_servers, str):
            raise ConfigError(
                f"rf.sinks.Kafka needs bootstrap_servers ('host:port[,host:port]'), got {bootstrap_servers!r}"
            )
        if not connect_timeout_s > 0 or not delivery_timeout_s > 0:
            raise ConfigError("rf.sinks.Kafka: connect_timeout_s and delivery_timeout_s must be > 0")
        self.topic = topic
        self.bootstrap_servers = bootstrap_servers
        self.key = [key] if isinstance(key, str) else list(key or [])
        self.connect_timeout_s = connect_timeout_s
        self.delivery_timeout_s = delivery_timeout_s
        self.config = dict(config or {})
        self._producer = None

    def root(self, *, pipeline_root: str) -> str:
        return _under(pipeline_root, "kafka-sink")

    def publish(self, store: Store, name: str) -> None:
        """Produce the rows of ``_pending/<name>`` unless its marker says they were; then
        write the marker and delete the pending file (see the class doc)."""
        pending = f"{PENDING_DIR}/{name}"
        marker = f"{PUBLISHED_DIR}/{name}"
        if not store.exists(pending):
            if store.exists(marker):
                return  # published by an earlier call
            raise _lost(name)
        if not store.exists(marker):
            self._produce(store.read_parquet(pending), name)
            store.write_bytes(marker, b"")
        store.delete(pending)

    def _produce(self, table: pa.Table, name: str) -> None:
        if table.num_rows == 0:
            return
        key = self.key or upsert_key(table.schema) or []
        missing = [k for k in key if k not in table.column_names]
        if missing:
            raise ConfigError(
                f"rf.sinks.Kafka: key column(s) {missing} are not in the output (columns: {table.column_names})"
            )
        producer = self._open()
        values = json_lines(table).to_pylist()
        if not key:
            keys = [None] * table.num_rows
        elif len(key) == 1:
            keys = _key_text(table.column(key[0])).to_pylist()
        else:
            keys = json_lines(table.select(key)).to_pylist()
        failed: list[str] = []

        def delivered(err, _msg) -> None:  # called per message by librdkafka; keep it trivial
            if err is not None:
                failed.append(err.str())

        prefix = f"{name}/"
        for i, (v, k) in enumerate(zip(values, keys)):
            headers = [(IDEMPOTENCY_HEADER, prefix + str(i))]
            while True:
                try:
                    producer.produce(self.topic, value=v, key=k, headers=headers, on_delivery=delivered)
                    break
                except BufferError:  # librdkafka's local queue is full: let deliveries drain it
                    producer.poll(0.1)
        left = producer.flush(self.delivery_timeout_s)
        if left or failed:
            # Raising leaves the file pending: the manager publishes it again (same keys).
            raise BrokerUnreachableError(
                f"rf.sinks.Kafka: {left or len(failed)} of {table.num_rows} message(s) of {name} were not "
                f"acknowledged by {self.bootstrap_servers!r} within {self.delivery_timeout_s:g} s"
                f"{': ' + failed[0] if failed else ''}; publication is retried"
            )

    def _open(self):
        if self._producer is None:
            ck = _ck()
            producer = ck.Producer(
                client_config(
                    self.bootstrap_servers,
                    self.config,
                    self.connect_timeout_s,
                    **{"enable.idempotence": True, "acks": "all", "linger.ms": 20},
                )
            )
            topics = list_topics(
                producer, bootstrap_servers=self.bootstrap_servers, timeout_s=self.connect_timeout_s
            )
            topic_partitions(topics, self.topic, self.bootstrap_servers)
            self._producer = producer
        return self._producer

    def query(self, store: Store, sql: str) -> pa.Table:
        raise ConfigError(
            f"rf.sinks.Kafka keeps no output to query: its rows are in the Kafka topic {self.topic!r}; "
            "read them with a Kafka consumer (or rf.sources.Kafka)"
        )

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(self.delivery_timeout_s)
            self._producer = None

    def __getstate__(self) -> dict:  # an open producer never travels with the sink
        return {**self.__dict__, "_producer": None}

    def __repr__(self) -> str:
        return f"rf.sinks.Kafka({self.topic!r}, bootstrap_servers={self.bootstrap_servers!r})"


# ----------------------------------------------------------------------------- JSON, vectorized

_CONTROL = [chr(c) for c in range(0x20) if chr(c) not in "\n\r\t"]


def json_lines(table: pa.Table) -> pa.StringArray:
    """Each row of ``table`` as the text of one JSON object (fields in column order)."""
    table = table.combine_chunks()
    parts: list = []
    for i, (f, col) in enumerate(zip(table.schema, table.columns)):
        arr = col.chunk(0) if col.num_chunks else pa.array([], f.type)
        parts += [("{" if i == 0 else ",") + json.dumps(f.name, ensure_ascii=False) + ":", json_text(arr)]
    if not parts:
        return pa.array(["{}"] * table.num_rows, pa.string())
    return pc.binary_join_element_wise(*parts, "}", "")


def json_text(arr: pa.Array) -> pa.StringArray:
    """Each value of ``arr`` as JSON text (never null: a null is ``null``)."""
    t = arr.type
    if pa.types.is_dictionary(t):
        return json_text(arr.dictionary_decode())
    if pa.types.is_null(t):
        out = pa.nulls(len(arr), pa.string())
    elif pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_decimal(t):
        out = pc.cast(arr, pa.string())
    elif pa.types.is_floating(t):  # inf and nan have no JSON form: null
        out = pc.if_else(pc.is_finite(arr), pc.cast(arr, pa.string()), pa.scalar(None, pa.string()))
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        out = _quoted(pc.cast(arr, pa.string()))
    elif pa.types.is_timestamp(t):
        out = _quoted(pc.replace_substring(pc.cast(arr, pa.string()), " ", "T"))  # ISO 8601
    elif pa.types.is_date(t):
        out = _quoted(pc.cast(arr, pa.string()))
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        out = _quoted(  # bytes have no JSON form: base64 text (Python, row by row: rare in outputs)
            pa.array(
                [None if v is None else base64.b64encode(v).decode() for v in arr.to_pylist()], pa.string()
            )
        )
    else:  # nested, durations...: rare in outputs; Python's json, row by row
        out = pa.array(
            [None if v is None else json.dumps(v, default=str, ensure_ascii=False) for v in arr.to_pylist()],
            pa.string(),
        )
    return pc.fill_null(out, "null")


def _quoted(s: pa.StringArray) -> pa.StringArray:
    """``s`` as JSON string literals: escaped and quoted."""
    for raw, esc in (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t")):
        s = pc.replace_substring(s, raw, esc)
    if pc.any(pc.match_substring_regex(s, "[\\x00-\\x1f]")).as_py():  # rare: other control chars
        for c in _CONTROL:
            s = pc.replace_substring(s, c, f"\\u{ord(c):04x}")
    return pc.binary_join_element_wise('"', s, '"', "")


def _key_text(arr: pa.ChunkedArray) -> pa.StringArray:
    """A key column as message keys: a string as it is, anything else as its JSON text."""
    arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return pc.cast(arr, pa.string())
    text = json_text(arr)
    return pc.if_else(pc.is_null(arr), pa.scalar(None, pa.string()), text)
