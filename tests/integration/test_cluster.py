"""Multi-node: a node holding consumers, or the source, is removed mid-job (ray.cluster_utils);
a node-local checkpoint_dir on a multi-node cluster.

A Cluster needs its own Ray, so the cases run in one process of their own
(scripts/cluster_cases.py), one after another on one cluster: building the 3-node cluster costs
more than a case. Each node-loss case must produce exactly the result of DuckDB's GROUP BY over
the same input.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "cluster_cases.py")


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    """Each case's JSON report, by case name; a case the script did not reach is missing (its
    test fails with the script's output)."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=os.getcwd())
    ck = tmp_path_factory.mktemp("cluster") / "ck"
    out = subprocess.run(
        [sys.executable, SCRIPT, str(ck)], capture_output=True, text=True, timeout=600, env=env
    )
    found = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            report = json.loads(line)
            found[report["case"]] = report
    found["_output"] = f"rc={out.returncode}\n" + out.stdout[-3000:] + out.stderr[-5000:]
    return found


@pytest.mark.parametrize("lose", ["consumers", "source"])
def test_node_loss_keeps_the_result_exact(reports, lose):
    assert lose in reports, reports["_output"]
    report = reports[lose]
    assert report["correct"], report
    if lose == "source":
        assert report["source_on_victim"], report
    else:
        assert report["lost_consumers"] and not report["source_on_victim"], report


def test_a_node_local_checkpoint_dir_is_refused_on_a_multi_node_cluster(reports):
    """Defect 9: more than one node and a local checkpoint_dir: a ConfigError that says what to
    do, before anything starts; with ``local_paths_shared=True`` the same job runs, exactly."""
    assert "shared" in reports, reports["_output"]
    report = reports["shared"]
    assert report["nodes"] == 2, report
    assert report["refused"] and "2 nodes" in report["refused"], report
    assert "s3://" in report["refused"] and "local_paths_shared=True" in report["refused"], report
    assert report["started_nothing"], report
    assert report["correct"] is True, report
