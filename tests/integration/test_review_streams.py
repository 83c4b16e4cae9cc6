"""Review of issue 9 (live streams): defects found by a reviewer, each as a failing test.

Every check compares the DuckDB view with DuckDB's GROUP BY over the same input."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pytest
import ray
from ray._common.test_utils import wait_for_condition

import rayflow as rf
from rayflow.sources import Source, Split
from rayflow.testing import Fault, FaultPlan, assert_same_rows, keyed_reference, throttle
from tests.conftest import KEYED_AGGS, make_job
from tests.integration.test_continuous import read_view

pytestmark = pytest.mark.ray

FAST = rf.EngineConfig(
    heartbeat_interval_s=0.1, session_timeout_s=5.0, commit_retry_initial_s=0.05, fetch_max_bytes=60_000
)
COLUMNS = ["key", "value_count", "value_sum"]


# ----------------------------------------------------------------------------- versions


def test_a_revocation_cancelled_while_its_commit_is_written_keeps_the_view_exact(ray_session, tmp_path):
    """Scale 1 -> 2 revokes partitions from consumer-0, which flushes (version e|1) and writes the
    commit; before it releases, consumer-1 leaves again (scale 2 -> 1), which cancels the
    revocation (leases.drop_member). The release is then a no-op, consumer-0 drops the partitions
    and reloads them under the *same* epoch e (partition_task.PartitionTask.from_commit: flushes
    = 0), so its next flushes carry versions e|1, e|2, ... again: the DuckDB sink keeps the older
    row where ``excluded._version > _version`` does not hold. The view loses updates."""
    data = rf.sources.Synthetic(events=20_000, keys=5_000, seed=7).to_table().select(["key", "value"])
    plan = FaultPlan(
        [Fault(point="consumer.before_state_write", actor="consumer-0", nth=1, action="pause")],
        dir=str(tmp_path / "f"),
    )
    db = tmp_path / "view.duckdb"
    run = make_job(
        tmp_path,
        "cancelled",
        rf.sources.Table(data, batch_rows=1_000),
        partitions=4,
        consumers=1,
        operator=[throttle(2_000), rf.ops.Aggregate(by="key", aggs=KEYED_AGGS, emit="changes")],
        sink=rf.sinks.DuckDB(db, "view"),
        checkpoint_interval_s=60.0,  # the revocation's commit is consumer-0's first
        config=FAST,
        faults=plan,
    ).start()
    try:
        wait_for_condition(lambda: run.status()["processed_rows"] > 0, timeout=60)
        run.scale(consumers=2)  # revokes from consumer-0: it flushes, then holds in _write
        wait_for_condition(lambda: bool(plan.fired()), timeout=60)
        run.scale(consumers=1)  # consumer-1 leaves: the revocations are cancelled
        plan.resume()
        result = run.wait(timeout_s=180)
    finally:
        plan.resume()
        run.stop()
    assert result.stats["rebalances"] >= 1
    assert_same_rows(read_view(db), keyed_reference(data), columns=COLUMNS)


# ----------------------------------------------------------------------------- emit mode on resume

ROWS = 6_000


class _RowsSplit(Split):
    """Row i: key i (each key once), value 1.0; a 500-row grid. Live: idle ticks after the rows."""

    name = "rows"

    def __init__(self, live: bool):
        self.unbounded = live

    def read(self, position: int):
        i = position
        while i < ROWS:
            end = min((i // 500 + 1) * 500, ROWS)
            k = np.arange(i, end, dtype=np.int64)
            yield pa.record_batch({"key": k, "value": np.ones(len(k))}), end
            i = end
        empty = pa.record_batch({"key": pa.array([], pa.int64()), "value": pa.array([], pa.float64())})
        while self.unbounded:
            time.sleep(0.1)
            yield empty, ROWS


class _Rows(Source):
    """The same split ("rows"), read bounded or live: a job may be resumed either way."""

    def __init__(self, live: bool):
        self.live = live

    @property
    def unbounded(self) -> bool:
        return self.live

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([("key", pa.int64()), ("value", pa.float64())])

    def splits(self) -> list[Split]:
        return [_RowsSplit(self.live)]


def test_a_resume_that_switches_the_default_emit_mode_keeps_the_view_exact(ray_session, tmp_path):
    """Run 1 reads the input bounded (``Aggregate(emit=None)`` resolves to "final") and is stopped
    midway: its state holds keys, nothing is emitted. Run 2 resumes the same split live
    (``emit=None`` now resolves to "changes"): the restored state's change set is empty
    (ops.Aggregate.state_from_table), so the keys run 1 counted are never emitted, and the resume
    check (compat.check_resume / _check_ops) compares neither ``emit`` nor the resolved mode.
    A refusal of the resume is accepted as correct."""
    db = tmp_path / "view.duckdb"

    def job(live: bool, rows_per_s: float):
        return make_job(
            tmp_path,
            "emitswitch",
            _Rows(live),
            partitions=2,
            consumers=1,
            operator=[throttle(rows_per_s), rf.ops.Aggregate(by="key", aggs=KEYED_AGGS)],
            sink=rf.sinks.DuckDB(db, "view"),
            checkpoint_interval_s=0.2,
            config=FAST,
        )

    def committed(run) -> int:
        return sum(p["committed_rows"] for p in run.status()["partitions"])

    run = job(False, 1_000).start()
    try:
        wait_for_condition(lambda: committed(run) >= 1_000, timeout=60)
        assert not run.status()["done"]
    finally:
        first = run.stop()
    assert 0 < first.stats["events"] < ROWS

    try:
        run = job(True, 1e9).start()
    except rf.errors.IncompatibleCheckpointError:
        return  # refused at start: as good as exact (nothing is missed silently)
    try:

        def all_committed() -> bool:
            recs = ray.get(run.manager.recorded.remote([0, 1]), timeout=30)
            return all(r is not None and r.positions.get("rows", 0) >= ROWS for r in recs.values())

        wait_for_condition(all_committed, timeout=90)
        time.sleep(1.0)  # publication follows the commit
    finally:
        run.stop()
    want = keyed_reference(pa.table({"key": np.arange(ROWS, dtype=np.int64), "value": np.ones(ROWS)}))
    assert_same_rows(read_view(db), want, columns=COLUMNS)


# ----------------------------------------------------------------------------- Files: a replaced file


def test_a_file_replaced_between_runs_is_refused_not_mixed(ray_session, tmp_path):
    """Files' doc: "A complete file must not change, and a name must never be reused: a read checks
    the file's size and mtime against those it was taken with and raises MalformedInputError
    otherwise (replaying a changed file would give other rows)". The pin lives only in the Files
    instance (files.py _take/_Pinned), never in the catalog: a resumed run (or a restarted source
    actor, for discovered files) takes the replaced file afresh and reads it on from the old
    file's committed position -- rows of two different files under one name, silently."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()

    def write(rows: np.ndarray) -> None:
        tmp = inbox / "a.parquet.tmp"
        pq.write_table(pa.table({"key": rows % 97, "i": rows}), tmp)
        tmp.rename(inbox / "a.parquet")

    def job():
        return make_job(
            tmp_path,
            "replaced",
            rf.sources.Files(str(inbox), format="parquet", watch=True, poll_s=0.2, assume_renamed=True),
            partitions=2,
            consumers=1,
            operator=rf.ops.Map(lambda t: t),
            sink=rf.sinks.Parquet(str(out)),
            checkpoint_interval_s=0.2,
            config=rf.EngineConfig(heartbeat_interval_s=0.1, session_timeout_s=5.0, discovery_interval_s=0.2),
        )

    write(np.arange(1_000, dtype=np.int64))
    run = job().start()
    try:

        def all_committed() -> bool:
            recs = ray.get(run.manager.recorded.remote([0, 1]), timeout=30)
            return all(r is not None and r.positions.get("a.parquet", 0) >= 1_000 for r in recs.values())

        wait_for_condition(all_committed, timeout=60)
    finally:
        run.stop()
    time.sleep(0.05)
    write(np.arange(10_000, 12_000, dtype=np.int64))  # same name, other rows (and size, mtime)

    run = job().start()
    try:

        def read_or_failed() -> bool:
            try:
                return run.status()["rows_read"] > 0
            except Exception:  # refused (MalformedInputError): what the doc promises
                return True

        try:
            wait_for_condition(read_or_failed, timeout=15)
        except RuntimeError:
            pass  # nothing read at all: fine too
        time.sleep(1.0)
    finally:
        try:
            run.stop()
        except Exception:
            pass
    got = sorted(pads.dataset(str(out), format="parquet").to_table()["i"].to_pylist())
    assert got == list(range(1_000)), f"{len(got) - 1_000} rows of the replacing file were read"
