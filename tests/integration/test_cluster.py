"""Multi-node: a node holding consumers, or the source, is removed mid-job (ray.cluster_utils).

Each case runs in its own process (a Cluster needs its own Ray) and must produce exactly the
result of DuckDB's GROUP BY over the same input.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "node_loss.py")


@pytest.mark.parametrize("lose", ["consumers", "source"])
def test_node_loss_keeps_the_result_exact(tmp_path, lose):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=os.getcwd())
    out = subprocess.run(
        [sys.executable, SCRIPT, str(tmp_path / "ck"), lose],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-5000:]
    report = json.loads(lines[-1])
    assert report["correct"], report
    if lose == "source":
        assert report["source_on_victim"], report
    else:
        assert report["lost_consumers"] and not report["source_on_victim"], report


def test_a_node_local_checkpoint_dir_is_refused_on_a_multi_node_cluster(tmp_path):
    """Defect 9: more than one node and a local checkpoint_dir: a ConfigError that says what to
    do, before anything starts; with ``local_paths_shared=True`` the same job runs, exactly."""
    script = os.path.join(os.path.dirname(__file__), "scripts", "shared_paths.py")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=os.getcwd())
    out = subprocess.run(
        [sys.executable, script, str(tmp_path / "ck")], capture_output=True, text=True, timeout=400, env=env
    )
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-5000:]
    report = json.loads(lines[-1])
    assert report["nodes"] == 2, report
    assert report["refused"] and "2 nodes" in report["refused"], report
    assert "s3://" in report["refused"] and "local_paths_shared=True" in report["refused"], report
    assert report["started_nothing"], report
    assert report["correct"] is True, report
