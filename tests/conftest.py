import os

# Ray 2.60 turns token auth on by default; a test cluster on loopback needs none.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Credentials for the S3-compatible test server on loopback (tests/integration/test_s3.py),
# set before Ray starts so that every worker inherits them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "rayflow-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "rayflow-test")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

import pytest


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
        _system_config={"metrics_report_interval_ms": 1000},
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def metrics_port(ray_session) -> int:
    """The local node's Prometheus port."""
    return METRICS_PORT
