"""Incremental commits end to end (DESIGN §5): a keyed job commits deltas and compacts them in
the background, stays exact against DuckDB when consumers are killed between a delta and a
compaction, and resumes from a base plus deltas."""

from __future__ import annotations

import json

import duckdb
import pyarrow as pa
import pytest
from ray._common.test_utils import wait_for_condition

import rayflow as rf
from rayflow._internal.checkpoint.commit import is_delta
from rayflow.cli import _open_copy
from rayflow.testing import KEYED_SQL, Fault, FaultPlan, assert_same_rows, duckdb_reference, throttle
from tests.conftest import make_job

pytestmark = pytest.mark.ray

AGG = [("value", "count"), ("value", "sum")]


@pytest.fixture(scope="module")
def data() -> pa.Table:
    return rf.sources.Synthetic(events=120_000, keys=6_000, seed=23).to_table()


@pytest.fixture(scope="module")
def expected(data) -> pa.Table:
    return duckdb_reference(KEYED_SQL, events=data)


def job(name, data, tmp_path, *, faults=None, rows_per_s=150_000, deltas_max=2):
    """A throttled keyed job with short commits: many deltas, compactions every few commits."""
    return make_job(
        tmp_path,
        name,
        data,
        batch_rows=5_000,
        partitions=4,
        operator=[throttle(rows_per_s), rf.ops.Aggregate(by="key", aggs=AGG)],
        consumers=2,
        checkpoint_interval_s=0.1,
        config=rf.EngineConfig(
            fetch_max_bytes=100_000,
            heartbeat_interval_s=0.1,
            session_timeout_s=5.0,
            state_deltas_max=deltas_max,
        ),
        faults=faults,
    )


def latest_state_files(root) -> list[list[str]]:
    con = duckdb.connect(str(root / "catalog.duckdb"), read_only=True)
    rows = con.execute(
        "SELECT state_files FROM commits QUALIFY row_number() OVER (PARTITION BY partition ORDER BY commit_id DESC) = 1"
    ).fetchall()
    named = con.execute("SELECT state_files FROM commits").fetchall()
    con.close()
    for (files,) in named:  # a commit row never points at a missing file
        for f in json.loads(files):
            assert (root / f).exists(), f"a commit names the missing state file {f}"
    return [json.loads(f) for (f,) in rows]


def test_deltas_and_compactions_are_exact(ray_session, tmp_path, data, expected):
    result = job("incr", data, tmp_path).run(timeout_s=120)
    assert_same_rows(result.output, expected)
    stats = result.stats
    assert stats["state_deltas"] > stats["state_bases"] > 0, stats
    assert stats["compactions"] > 0, stats
    root = tmp_path / "ck" / "incr"
    chains = latest_state_files(root)
    assert all(len(c) <= 1 + 4 * 2 for c in chains)  # the hard cap: a restore never reads more
    con = duckdb.connect(str(root / "catalog.duckdb"), read_only=True)
    named = {f for (r,) in con.execute("SELECT state_files FROM commits").fetchall() for f in json.loads(r)}
    con.close()
    on_disk = {str(p.relative_to(root)) for p in (root / "state").rglob("*.parquet")}
    # Nothing on disk that no row names, beyond one compaction base per partition no commit named
    # yet. (This run is too short for the manager's retirement tick: the catalog unit tests cover
    # retirement over chains.)
    assert len(on_disk - named) <= 4, sorted(on_disk - named)
    con, _ = _open_copy(str(root))  # rayflow sql's state view folds a base and its deltas
    n, total = con.execute("SELECT count(*), sum(value_count) FROM state").fetchone()
    con.close()
    assert (n, total) == (expected.num_rows, data.num_rows)


def test_kills_between_a_delta_and_a_compaction_are_exact(ray_session, tmp_path, data, expected):
    plan = FaultPlan(
        [
            Fault(point="consumer.after_compaction", actor="consumer-0", nth=1),
            Fault(point="consumer.after_state_write", actor="consumer-1", nth=8),
            Fault(point="consumer.after_compaction", actor="consumer-1", nth=2, action="raise"),
        ],
        dir=str(tmp_path / "faults"),
    )
    result = job("incr-kill", data, tmp_path, faults=plan).run(timeout_s=150)
    assert len(plan.fired()) >= 2, f"{plan} fired only {plan.fired()}"
    assert_same_rows(result.output, expected)
    latest_state_files(tmp_path / "ck" / "incr-kill")


def test_resume_from_a_base_and_its_deltas(ray_session, tmp_path, data, expected):
    """A stopped job whose commits name base + deltas resumes from them, exactly."""
    pipeline = job("incr-resume", data, tmp_path, rows_per_s=60_000, deltas_max=50)
    run = pipeline.start()
    wait_for_condition(
        lambda: sum(c["state_deltas"] for c in run.status()["consumers"].values()) >= 6, timeout=60
    )
    assert run.stop().stats["stopped"]
    chains = latest_state_files(tmp_path / "ck" / "incr-resume")
    assert any(len(c) > 1 and is_delta(c[-1]) for c in chains), chains
    result = job("incr-resume", data, tmp_path, rows_per_s=10**9, deltas_max=50).run(timeout_s=120)
    assert_same_rows(result.output, expected)
