import os

# Ray 2.60 turns token auth on by default; a test cluster on loopback needs none.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Credentials for the S3-compatible test server on loopback (tests/integration/test_s3.py),
# set before Ray starts so that every worker inherits them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "rayflow-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "rayflow-test")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

import pytest

pytest_plugins = ["tests.kafka_broker"]  # the tansu Kafka broker: kafka_broker, kafka


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """The xdist workers (``addopts``: ``-n 2``) take whole units: every integration test is in
    one (they share the session's one Ray instance and the machine's cores, so they run one after
    another on one worker), each unit-test module is one (a module's tests stay in order, on one
    worker). Not ``--dist loadgroup`` with ``xdist_group`` marks: on pytest 9.2 it no longer
    groups anything (pytest-xdist issue 1386), and two Ray instances on two cores would fight."""
    from xdist.scheduler import LoadScopeScheduling

    class RayTestsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "integration" if module.startswith("tests/integration/") else module

    return RayTestsTogether(config, log)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = free_port()


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole session (never attaches to another cluster)."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=400 * 1024 * 1024,
        logging_level="WARNING",
        log_to_driver=False,
        _metrics_export_port=METRICS_PORT,
        # Metrics reach the agent every 3 s (Ray's default is 10 s; two tests wait for them):
        # every worker exports on this cadence, and the agent's work is the suite's CPU too.
        _system_config={"metrics_report_interval_ms": 3000},
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def metrics_port(ray_session) -> int:
    """The local node's Prometheus port."""
    return METRICS_PORT


# ----------------------------------------------------------------------------- shared data and jobs

#: The keyed job's aggregations (WORKLOAD.md): per key, count and sum of value.
KEYED_AGGS = [("value", "count"), ("value", "sum")]


@pytest.fixture(scope="session")
def events_1m():
    """1M synthetic events (100k keys, seed 42): the input of the keyed job tests."""
    import rayflow as rf

    return rf.sources.Synthetic(events=1_000_000, keys=100_000, seed=42).to_table()


@pytest.fixture(scope="session")
def events_small(events_1m):
    """The first 50k of :func:`events_1m`: enough for a job, quick to check."""
    return events_1m.slice(0, 50_000)


def make_job(tmp_path, name: str, source, *, batch_rows: int | None = None, **kw):
    """The one job factory of the integration tests (the ``job`` fixture binds ``tmp_path``).

    ``make_job(tmp_path, name, source, **kw) -> rf.Pipeline``: ``source`` is an
    ``rf.sources`` source or an Arrow table (read by ``rf.sources.Table`` in
    ``batch_rows`` batches, default 1M). Defaults: ``key="key"``,
    ``partitions=4``, ``consumers=2``, the keyed ``Aggregate`` (count and sum of
    ``value``), ``checkpoint_dir=tmp_path / "ck"``, ``progress=False``; any other
    ``rf.Pipeline`` argument passes through.
    """
    import pyarrow as pa

    import rayflow as rf

    if isinstance(source, pa.Table):
        source = rf.sources.Table(source, **({"batch_rows": batch_rows} if batch_rows else {}))
    kw.setdefault("key", "key")
    kw.setdefault("partitions", 4)
    kw.setdefault("consumers", 2)
    kw.setdefault("operator", rf.ops.Aggregate(by=kw["key"], aggs=KEYED_AGGS))
    kw.setdefault("checkpoint_dir", str(tmp_path / "ck"))
    kw.setdefault("progress", False)
    return rf.Pipeline(name=name, source=source, **kw)


@pytest.fixture
def job(tmp_path):
    """:func:`make_job` bound to this test's ``tmp_path``: ``job(name, source, **kw)``."""
    import functools

    return functools.partial(make_job, tmp_path)


@pytest.fixture(scope="session")
def s3_query():
    """An S3-compatible server (moto) on loopback for the session, with the buckets
    ``rayflow-test`` and ``rayflow-watch``; yields the URI query that points pyarrow.fs at it
    (append it to ``s3://bucket/path``)."""
    moto_server = pytest.importorskip("moto.server")
    import pyarrow.fs as pafs

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    query = f"?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    for bucket in ("rayflow-test", "rayflow-watch"):
        fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}{query}&allow_bucket_creation=true")
        fs.create_dir(bucket)
    yield query
    server.stop()
