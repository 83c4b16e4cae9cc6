"""`ray job submit --working-dir . -- python jobs/pipeline.py` against a 2-node `ray start`
cluster on loopback: the flagship job finds rayflow through the uploaded working directory,
connects to the cluster and writes the exact result."""

from __future__ import annotations

import os
import tempfile
import time

import pyarrow.dataset as pads
import pytest

import rayflow as rf
from rayflow.testing import assert_same_rows, duckdb_reference

from .raycli import ray_cli, ray_env, stop_cluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    """Every port a node opens, chosen free: another Ray on this machine (the test session's
    own) already holds the defaults."""
    names = ["dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "node-manager-port", "object-manager-port"]  # fmt: skip
    return [f"--{n}={free_port()}" for n in names]


@pytest.fixture
def cluster():
    temp = tempfile.mkdtemp(prefix="rf-cluster-")
    gcs, dash = free_port(), free_port()
    try:
        head = ray_cli(
            "start", "--head", f"--port={gcs}", "--num-cpus=1", f"--temp-dir={temp}",
            "--node-ip-address=127.0.0.1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}",
            "--disable-usage-stats", *node_ports(),
        )  # fmt: skip
        assert head.returncode == 0, head.stdout + head.stderr
        # A second node on the same host needs its own node IP address, and its own temp dir:
        # two nodes unpacking the job's working dir into one folder delete each other's files.
        worker = ray_cli(
            "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=1", "--node-ip-address=127.0.0.2",
            f"--temp-dir={temp}/worker", "--disable-usage-stats", *node_ports(),
        )  # fmt: skip
        assert worker.returncode == 0, worker.stdout + worker.stderr
        yield f"http://127.0.0.1:{dash}"
    finally:
        stop_cluster(temp, gcs)


def test_ray_job_submit_runs_the_flagship(cluster, tmp_path):
    out = tmp_path / "out"
    args = (
        "job", "submit", "--address", cluster, "--working-dir", ROOT, "--",
        "python", "jobs/pipeline.py", "--events", "300000", "--partitions", "4", "--consumers", "2",
        "--output", str(out), "--checkpoint-dir", str(tmp_path / "ck"),
        "--local-paths-shared",  # both nodes are on this machine
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while True:  # the head's job agent comes up a little after `ray start` returns
        sub = ray_cli(*args, timeout=400, env=ray_env())
        if "No available agent" not in sub.stdout + sub.stderr or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert sub.returncode == 0, sub.stdout[-4000:] + sub.stderr[-4000:]
    assert "on running cluster" in sub.stdout or "on cluster at" in sub.stdout, sub.stdout[-3000:]
    got = pads.dataset(str(out), format="parquet").to_table()
    events = rf.sources.Synthetic(events=300_000).to_table()
    expected = duckdb_reference(
        'SELECT key, count(value) AS "count", sum(value) AS "sum" FROM events GROUP BY key', events=events
    )
    assert_same_rows(got, expected)
