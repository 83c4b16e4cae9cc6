"""Unbounded jobs end to end (issue 9): a live Synthetic stream runs until stop(), which drains
and commits; the next start resumes; whatever was killed on the way, the committed output equals
exactly the input rows up to the committed positions (by DuckDB). Splits that appear while a
job runs are read, recorded in the catalog, and known to the next run. Positions with gaps."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import ray
from ray._common.test_utils import wait_for_condition

import rayflow as rf
from rayflow.partitioning import PartitionMap, hash_table
from rayflow.sources import Source, Split
from rayflow.testing import Fault, FaultPlan, assert_same_rows, duckdb_reference, kill_actor
from tests.conftest import make_job

pytestmark = pytest.mark.ray

PARTITIONS = 4
FAST = rf.EngineConfig(heartbeat_interval_s=0.1, session_timeout_s=5.0, discovery_interval_s=0.2)
GROUPED = "SELECT key, count(*) AS n, sum(value) AS s, sum(ts) AS t FROM x GROUP BY key"


def catalog(root) -> tuple[dict[int, dict[str, int]], int | None, list[str]]:
    """The latest committed positions per partition, the job's start time and its known splits."""
    con = duckdb.connect(str(root / "catalog.duckdb"), read_only=True)
    try:
        rows = con.execute(
            """SELECT partition, positions FROM commits
               QUALIFY row_number() OVER (PARTITION BY partition ORDER BY commit_id DESC) = 1"""
        ).fetchall()
        started = con.execute("SELECT value FROM meta WHERE key = '_started_ms'").fetchone()
        known = [n for (n,) in con.execute("SELECT name FROM splits ORDER BY name").fetchall()]
    finally:
        con.close()
    return {p: json.loads(pos) for p, pos in rows}, int(started[0]) if started else None, known


def expected_rows(src: rf.sources.Synthetic, positions: dict[int, dict[str, int]]) -> pa.Table:
    """Exactly the rows the committed positions cover: for each split, its rows before the
    committed position *of the partition each row belongs to* (partitions stop apart)."""
    pmap = PartitionMap.uniform(PARTITIONS)
    out = []
    for split in src.splits():
        limit = np.array([positions.get(p, {}).get(split.name, 0) for p in range(PARTITIONS)])
        rows = src.to_table({split.name: int(limit.max())})
        part = pmap.route(hash_table(rows, ["key"]))
        out.append(rows.filter(pa.array(np.arange(rows.num_rows) < limit[part])))
    return pa.concat_tables(out)


def published(out) -> pa.Table:
    return pads.dataset(str(out), format="parquet").to_table()


def check_exact(tmp_path, name: str, out, *, rate, splits) -> dict[int, dict[str, int]]:
    """The committed output, grouped by key in DuckDB, equals the same over the input rows the
    committed positions cover, with the same ts: the start time held across the runs."""
    positions, started, _ = catalog(tmp_path / "ck" / name)
    assert started is not None
    ref = rf.sources.Synthetic(rate=rate, keys=5_000, splits=splits, start_ms=started)
    want = expected_rows(ref, positions)
    got = published(out)
    assert got.num_rows == want.num_rows
    assert_same_rows(duckdb_reference(GROUPED, x=got), duckdb_reference(GROUPED, x=want))
    return positions


def live_job(tmp_path, name, out, *, rate=300_000, splits=2, progress=False, faults=None):
    return make_job(
        tmp_path,
        name,
        rf.sources.Synthetic(rate=rate, keys=5_000, splits=splits),
        partitions=PARTITIONS,
        consumers=2,
        operator=rf.ops.Map(lambda t: t),
        sink=rf.sinks.Parquet(str(out)),
        checkpoint_interval_s=0.3,
        config=rf.EngineConfig(
            num_sources=2, heartbeat_interval_s=0.1, session_timeout_s=5.0, discovery_interval_s=0.2
        ),
        progress=progress,
        faults=faults,
    )


def test_a_live_job_runs_until_stopped_resumes_and_is_exact(ray_session, tmp_path, capfd):
    out = tmp_path / "out"
    run = live_job(tmp_path, "live", out, progress=True).start()
    waited: list = []
    waiter = threading.Thread(target=lambda: waited.append(run.wait()))  # never done on its own
    waiter.start()
    wait_for_condition(lambda: run.status()["processed_rows"] > 300_000, timeout=60)

    def committed_and_measured() -> bool:
        st = run.status()
        return st["last_commit_at"] is not None and st["arrival_rows_per_s"] is not None

    wait_for_condition(committed_and_measured, timeout=30)
    st = run.status()
    assert st["unbounded"] and not st["done"]
    assert st["lag_s"] is not None and st["lag_rows"] >= 0 and st["rate_rows_per_s"] > 0
    assert all({"lag_rows", "lag_s", "rate_rows_per_s", "last_commit_at"} <= set(p) for p in st["partitions"])
    assert set(st["splits"]) == {"synthetic[0::2]", "synthetic[1::2]"}
    assert all(s["unbounded"] and s["available"] is not None for s in st["splits"].values())

    first = run.stop()
    waiter.join(timeout=60)
    assert waited == [first], "wait() in another thread returns stop()'s result"
    assert first.stats["stopped"] and first.stats["events"] > 0
    assert run.stop() is first  # idempotent
    err = capfd.readouterr().err
    assert "lag" in err and "last commit" in err and "stopped:" in err
    before = check_exact(tmp_path, "live", out, rate=300_000, splits=2)

    run = live_job(tmp_path, "live", out).start()
    done_before = sum(pos.get("synthetic[0::2]", 0) for pos in before.values())
    wait_for_condition(lambda: run.status()["processed_rows"] > 2 * first.stats["events"], timeout=60)
    second = run.stop()
    assert second.stats["events"] > 0
    after = check_exact(tmp_path, "live", out, rate=300_000, splits=2)
    assert sum(pos.get("synthetic[0::2]", 0) for pos in after.values()) > done_before


def test_a_consumer_killed_in_a_live_job_loses_nothing(ray_session, tmp_path):
    out = tmp_path / "out"
    run = live_job(tmp_path, "livekill", out).start()
    wait_for_condition(lambda: run.status()["processed_rows"] > 200_000, timeout=60)
    kill_actor("livekill", "consumer-0", how="ray.kill")
    # status() replaces the dead consumer; the survivors take its partitions from their commits.
    wait_for_condition(lambda: run.status()["recoveries"] >= 1, timeout=60)
    at_kill = run.status()["processed_rows"]
    wait_for_condition(lambda: run.status()["processed_rows"] > at_kill + 300_000, timeout=60)
    result = run.stop()
    assert result.stats["recoveries"] >= 1
    check_exact(tmp_path, "livekill", out, rate=300_000, splits=2)


# ----------------------------------------------------------------------------- discovery

DIR_SCHEMA = pa.schema(
    [("key", pa.int64()), ("value", pa.float64()), ("split", pa.string()), ("i", pa.int64())]
)
DIR_ROWS = 5_000


def dir_rows(name: str, start: int = 0, stop: int = DIR_ROWS) -> pa.Table:
    i = np.arange(start, stop, dtype=np.int64)
    return pa.table(
        {"key": (i * 7 + len(name)) % 50, "value": i.astype(np.float64), "split": [name] * len(i), "i": i},
        schema=DIR_SCHEMA,
    )


class _MarkerSplit(Split):
    """``DIR_ROWS`` rows made from the split's name, on a 500-row grid."""

    def __init__(self, name: str):
        self.name = name

    def read(self, position: int) -> Iterator[tuple[pa.RecordBatch, int]]:
        i = position
        while i < DIR_ROWS:
            end = min((i // 500 + 1) * 500, DIR_ROWS)
            yield dir_rows(self.name, i, end).to_batches()[0], end
            i = end


class _MarkerDir(Source):
    """A dynamic source: one split per ``*.split`` file in a directory, as files appear."""

    dynamic = True

    def __init__(self, path: str):
        self.path = path

    @property
    def schema(self) -> pa.Schema:
        return DIR_SCHEMA

    def splits(self) -> list[Split]:
        return [_MarkerSplit(f) for f in sorted(os.listdir(self.path)) if f.endswith(".split")]


def test_splits_that_appear_are_read_recorded_and_known_on_resume(ray_session, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()

    def add(*names):
        for n in names:
            (inbox / n).write_text("")

    def job():
        return make_job(
            tmp_path,
            "disc",
            _MarkerDir(str(inbox)),
            partitions=PARTITIONS,
            operator=rf.ops.Map(lambda t: t),
            sink=rf.sinks.Parquet(str(out)),
            checkpoint_interval_s=0.2,
            config=rf.EngineConfig(
                num_sources=2, heartbeat_interval_s=0.1, session_timeout_s=5.0, discovery_interval_s=0.2
            ),
        )

    def rows_out() -> int:
        return published(out).num_rows if out.exists() else 0

    def all_committed(run, names) -> bool:
        recs = ray.get(run.manager.recorded.remote(list(range(PARTITIONS))), timeout=30)
        return all(
            r is not None and all(r.positions.get(n) == DIR_ROWS for n in names) for r in recs.values()
        )

    add("a.split")
    run = job().start()
    try:
        assert run.unbounded and len(run.sources) == 2  # a dynamic source: every source actor
        wait_for_condition(lambda: rows_out() >= DIR_ROWS, timeout=60)
        add("b.split", "c.split", "d.split")  # owned by either actor, by a hash of the name
        wait_for_condition(lambda: rows_out() >= 4 * DIR_ROWS, timeout=60)
        # A source actor restarts: it finds its discovered splits again (and reads on from the
        # committed positions), and goes on discovering.
        kill_actor("disc", "source-0")
        kill_actor("disc", "source-1")
        add("e.split")
        wait_for_condition(lambda: rows_out() >= 5 * DIR_ROWS, timeout=60)
        names = [f"{c}.split" for c in "abcde"]
        wait_for_condition(lambda: all_committed(run, names), timeout=60)
    finally:
        run.stop()
    _, _, known = catalog(tmp_path / "ck" / "disc")
    assert known == names

    # While stopped: one split goes (a dynamic source may lose splits), one comes. The next run
    # resumes every known split from its committed position: only the new one is read.
    (inbox / "a.split").unlink()
    add("f.split")
    run = job().start()
    try:
        wait_for_condition(lambda: rows_out() >= 6 * DIR_ROWS, timeout=60)
        assert run.status()["rows_read"] == DIR_ROWS
    finally:
        run.stop()
    assert catalog(tmp_path / "ck" / "disc")[2] == names + ["f.split"]
    every = pa.concat_tables([dir_rows(f"{c}.split") for c in "abcdef"])
    assert_same_rows(published(out), every, columns=["split", "i", "key", "value"])


# ----------------------------------------------------------------------------- positions with gaps

GAP_ROWS = 20_000


class _GapSplit(Split):
    """Unbounded, positions with gaps (like Kafka offsets): row k sits at position 3k + 1;
    batches of 50 to 400 rows, drawn afresh at every read (unseeded on purpose), so a replay after
    a source restart cuts its batches elsewhere than the first read did, as a live Kafka read does
    (what a poll returns depends on what has arrived; the source
    must cut a replayed batch at the consumer's processed position). Past the last row, idle
    ticks move the position on by 5 each time (positions that hold no row), for ever."""

    name = "gaps"
    unbounded = True
    dense = False

    def read(self, position: int) -> Iterator[tuple[pa.RecordBatch, int]]:
        k = max(0, -(-(position - 1) // 3))  # the first row at or after position
        sizes = np.random.default_rng()  # batch boundaries only: the rows stay deterministic
        pos = position
        while k < GAP_ROWS:
            end = min(k + int(sizes.integers(50, 401)), GAP_ROWS)
            i = np.arange(k, end, dtype=np.int64)
            batch = pa.record_batch({"key": i % 101, "value": i.astype(np.float64), "i": i})
            pos = 3 * end  # past the batch's last row, at 3 * (end - 1) + 1
            yield batch, pos
            k = end
            time.sleep(0.002)
        empty = pa.record_batch(
            {
                "key": pa.array([], pa.int64()),
                "value": pa.array([], pa.float64()),
                "i": pa.array([], pa.int64()),
            }
        )
        while True:
            time.sleep(0.05)
            pos += 5
            yield empty, pos

    def row_positions(self, batch: pa.RecordBatch) -> np.ndarray:
        return 3 * batch["i"].to_numpy() + 1


class _Gaps(Source):
    @property
    def unbounded(self) -> bool:
        return True

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([("key", pa.int64()), ("value", pa.float64()), ("i", pa.int64())])

    def splits(self) -> list[Split]:
        return [_GapSplit()]


def test_positions_with_gaps_replay_exactly_and_idle_ticks_move_them(ray_session, tmp_path):
    out = tmp_path / "out"
    plan = FaultPlan([Fault(point="source.batch", actor="source-0", nth=15)], dir=str(tmp_path / "f"))
    job = make_job(
        tmp_path,
        "gaps",
        _Gaps(),
        partitions=PARTITIONS,
        operator=rf.ops.Map(lambda t: t),
        sink=rf.sinks.Parquet(str(out)),
        checkpoint_interval_s=1.0,  # processed rows wait uncommitted when the source dies
        config=FAST,
        faults=plan,
    )
    run = job.start()
    past_rows = 3 * GAP_ROWS + 50  # ten idle ticks past the last row

    def every_partition_past_the_rows() -> bool:
        recs = ray.get(run.manager.recorded.remote(list(range(PARTITIONS))), timeout=30)
        return all(r is not None and r.positions.get("gaps", 0) >= past_rows for r in recs.values())

    try:
        wait_for_condition(every_partition_past_the_rows, timeout=90)
    finally:
        run.stop()
    assert plan.fired(), "the source was never killed"
    want = pa.table({"i": np.arange(GAP_ROWS, dtype=np.int64)})
    assert_same_rows(published(out).select(["i"]), want)


# ----------------------------------------------------------------------------- the flagship

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_the_flagship_runs_a_live_stream_until_sigterm(tmp_path):
    """``jobs/pipeline.py --rate``: runs until SIGTERM (what ``ray job stop`` sends), then stops
    gracefully, prints its summary and exits 0; the committed positions resume the next run."""
    import signal
    import subprocess
    import sys

    ck = tmp_path / "ck"
    cmd = [
        sys.executable, os.path.join(ROOT, "jobs", "pipeline.py"), "--rate", "100000", "--keys", "1000",
        "--partitions", "2", "--consumers", "1", "--checkpoint-interval-s", "0.3", "--address", "local",
        "--output", str(tmp_path / "out"), "--checkpoint-dir", str(ck), "--name", "flag",
    ]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:

        def committed() -> bool:
            if not (ck / "flag" / "catalog.duckdb").exists():
                return False
            return any(p.name.endswith(".parquet") for p in (tmp_path / "out").glob("*.parquet"))

        wait_for_condition(committed, timeout=120, retry_interval_ms=500)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "SIGTERM: stopping" in stderr and "stopped     committed" in stdout, stdout + stderr[-3000:]
    positions, started, _ = catalog(ck / "flag")
    assert started is not None and sum(p.get("synthetic[0::1]", 0) for p in positions.values()) > 0
