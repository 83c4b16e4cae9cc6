"""Regression tests for the event-time defects of the issue 10 review (the pure ones are in
tests/unit/test_review_event_time.py). Each test fails if its defect comes back:

- a fetch's watermarks applied after the first run of a step instead of the last (``in_hand`` in
  ``_internal/partition_task.py``): rows within the bound late, Dedup drops unique rows;
- a watched directory's ended file sends its split's watermark to the end of time (``_watermarks``
  in ``_internal/source_actor.py``): every row of the next file late; and the news that a file
  ended, in the fetch reply with its last rows, skips its split before its watermark is applied
  (``_apply_pending`` in ``_internal/partition_task.py``): event time stands below its rows for ever;
- a late sink sharing the main sink's directory: refused (``ConfigError``) before anything starts;
- backpressure (a source blocked on a full queue) counted as idleness (``quiet_since``): a slow
  split skipped, the watermark jumps ahead, its rows late once reading resumes;
- a split with only null event times (rows without event time) holds every window open for ever;
- windows and late rows exactly once, and ``late="update"`` versions, across a source kill, a
  consumer kill before its state write and a manager kill at publication, with two source actors.

(A live batch with a wrong event-time type must be an ``InputError``: the unit file.)

No wait is a sleep: each is a condition with a timeout (``wait_for_condition``), a paused fault
(``Fault(action="pause")``) holds a consumer at an exact point; the sleeps left pace the data of
the custom sources.
"""

from __future__ import annotations

import glob
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
from ray._common.test_utils import wait_for_condition

import rayflow as rf
from rayflow._internal import naming
from rayflow.errors import ConfigError
from rayflow.ops.base import WATERMARK_END
from rayflow.sources.base import Source, Split
from rayflow.testing import Fault, FaultPlan, duckdb_reference, throttle
from tests.conftest import make_job

pytestmark = pytest.mark.ray

FAST = rf.EngineConfig(
    heartbeat_interval_s=0.1, session_timeout_s=5.0, commit_retry_initial_s=0.05, fetch_max_bytes=60_000
)
T0 = 1_700_000_000_000
SCHEMA = pa.schema([("key", pa.int64()), ("value", pa.float64()), ("ts", pa.int64())])


def shuffled(n: int, *, seed: int, keys: int = 5, shuffle_ms: int = 3_000) -> pa.Table:
    """``n`` rows 1 ms apart (``ts`` unique), shuffled by up to ``shuffle_ms``."""
    rng = np.random.default_rng(seed)
    ts = T0 + np.arange(n, dtype=np.int64)
    order = np.argsort(ts + rng.integers(0, shuffle_ms, n), kind="stable")
    return pa.table({"key": rng.integers(0, keys, n), "value": rng.random(n), "ts": ts[order]})


def _files(d) -> list[str]:
    return sorted(glob.glob(os.path.join(str(d), "*.parquet")))


def _published_sum(d, column: str = "value_count") -> int:
    return sum(int(pc.sum(pq.read_table(f)[column]).as_py() or 0) for f in _files(d))


# ----------------------------------------------------------------------------- (3) late sink directory


@pytest.mark.parametrize("same_dir", [False, True])
def test_late_sink_in_the_main_sinks_directory_loses_no_output(ray_session, tmp_path, same_dir):
    """late_sink=Parquet(X) with sink=Parquet(X): a commit's window rows and late rows would share
    X/_pending/<name>, one overwriting the other. The job is refused before anything starts;
    in directories of their own, the windows and the late rows together hold every row once."""
    data = shuffled(6_000, seed=7)
    out = tmp_path / "out"
    late_dir = out if same_dir else tmp_path / "late"
    win = rf.ops.Window(
        by="key",
        aggs=[("value", "count")],
        tumbling_s=1,
        late="side",
        late_sink=rf.sinks.Parquet(str(late_dir)),
    )
    name = f"samedir{int(same_dir)}"
    job = make_job(
        tmp_path, name, rf.sources.Table(data, batch_rows=500), partitions=1, consumers=1, operator=win,
        sink=rf.sinks.Parquet(str(out)), event_time="ts", max_out_of_orderness_s=0.2, config=FAST,
        checkpoint_interval_s=0.05,
    )  # fmt: skip
    if same_dir:
        with pytest.raises(ConfigError, match="same directory"):
            job.start().stop()  # stop(): only reached if it started (the defect), not to leave it running
        prefix = naming.actor_name(name, "")
        started = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
        assert not started, f"actors started before the refusal: {started}"
        assert not (tmp_path / "ck").exists() and not out.exists(), "files written before the refusal"
        return
    job.run(timeout_s=60)
    windows = _published_sum(out)
    late = pq.read_table(str(late_dir))
    assert late.num_rows > 0, "no late row: the side sink was not exercised"
    assert late.num_rows == len(set(late["ts"].to_pylist())), "a late row reached the side sink twice"
    assert windows + late.num_rows == data.num_rows, (windows, late.num_rows, data.num_rows)


# ----------------------------------------------------------------------------- (5) null event times


class _PacedSplit(Split):
    """Unbounded: 50 rows each 0.05 s (the data's pace), 10 ms of event time per row, or all null."""

    unbounded = True

    def __init__(self, name: str, null_ts: bool):
        self.name = name
        self.null_ts = null_ts

    def read(self, position):
        pos = position
        while True:
            n = 50
            p = np.arange(pos, pos + n)
            ts = pa.array([None] * n if self.null_ts else T0 + p * 10, pa.int64())
            pos += n
            time.sleep(0.05)
            yield pa.record_batch({"key": pa.array(p % 4), "value": pa.array(np.ones(n)), "ts": ts}), pos


class _WithNullSplit(Source):
    """Split "a" carries event time (5 s of it per wall second); split "b" only nulls."""

    def splits(self):
        return [_PacedSplit("a", False), _PacedSplit("b", True)]

    @property
    def schema(self):
        return SCHEMA


def test_a_split_with_only_null_event_times_does_not_hold_windows_open_for_ever(ray_session, tmp_path):
    """Rows without event time (filtered out before the Window, as its InputError advises) keep
    split "b"'s watermark at 'none': it is quiet, so skipped after the idle timeout, and the 1 s
    windows of split "a" close while the job runs."""
    out = tmp_path / "out"
    win = rf.ops.Window(by="key", aggs=[("value", "count")], tumbling_s=1)
    run = make_job(
        tmp_path, "nulls", _WithNullSplit(), partitions=2, consumers=1,
        operator=[rf.ops.Filter(pc.is_valid(pc.field("ts"))), win], sink=rf.sinks.Parquet(str(out)),
        event_time="ts", max_out_of_orderness_s=0.1, idle_timeout_s=1.0, config=FAST, checkpoint_interval_s=0.2,
    ).start()  # fmt: skip
    try:
        try:
            wait_for_condition(lambda: bool(_files(out)), timeout=20, retry_interval_ms=200)
        except RuntimeError:
            st = run.status()
            pytest.fail(
                f"no window closed in 20 s: watermark {st['watermark_ms']}, "
                f"open windows {st['operators'].get('open_windows')}"
            )
    finally:
        run.stop()


# ----------------------------------------------------------------------------- (2) watched directory


def _consumer_clocks(name: str) -> dict:
    """consumer-0's partitions: ``p -> (split watermarks, skipped splits)`` of their clocks."""
    handle = ray.get_actor(naming.actor_name(name, "consumer-0"), namespace=naming.NAMESPACE)
    return ray.get(
        handle.__ray_call__.remote(
            lambda self: {p: (dict(t.clock.splits), set(t.clock.idle)) for p, t in self.owned.items()}
        ),
        timeout=30,
    )


def _source_read_whole(name: str, split: str, rows: int) -> bool:
    """source-0 has read ``split`` to its end: its frontier is at ``rows`` and its reader is done
    (a finished bounded split is left out of ``stats()["splits"]``)."""
    handle = ray.get_actor(naming.source_name(name, 0), namespace=naming.NAMESPACE)
    st = ray.get(handle.stats.remote(), timeout=30)
    return st["frontier"].get(split, 0) >= rows and split not in st["splits"]


def test_a_watched_directory_between_files_does_not_end_event_time(ray_session, tmp_path):
    """Files(watch=True) is unbounded: once the file read so far has ended, its split must be
    skipped with its last watermark, not be at the end of time (every window closed, and every
    row of the next file, in order and well within the bound, late).

    And the watermark a file's rows reached holds once its split is skipped: the windows ending
    by a file's last watermark close even when the fetch reply that carries its last rows also
    says it ended (skipped). That reply came whenever the reader had hit the file's end before
    the consumer's next fetch (timing: about half of the full-suite runs stalled, every split
    skipped and event time standing below the file's rows); here it is forced for the third
    file, read whole while consumer-0 is held (a paused fault) in the step of the second."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    rows, step_ms = 2_000, 5  # 10 s of event time per file

    def part(i: int) -> pa.Table:
        ts = T0 + i * rows * step_ms + np.arange(rows, dtype=np.int64) * step_ms
        return pa.table({"key": np.arange(rows, dtype=np.int64) % 4, "value": np.ones(rows), "ts": ts})

    def closed_by(i: int) -> int:
        """Rows in windows (1 s) ending by file ``i``'s last watermark (0.5 s bound)."""
        return int(np.sum(part(i)["ts"].to_numpy() < T0 + (i + 1) * 10_000 - 1_000)) + i * rows

    # One partition: a file's rows (one batch) are one entry, so one consumer step whatever the
    # step's time budget (two partitions may take two steps under load): step 2 is the second file's.
    faults = FaultPlan(
        [Fault(point="consumer.step", actor="consumer-0", nth=2, action="pause")],
        dir=str(tmp_path / "faults"),
    )
    pq.write_table(part(0), inbox / "00.parquet")
    run = make_job(
        tmp_path, "watchend", rf.sources.Files(str(inbox), watch=True, assume_renamed=True, poll_s=0.2),
        partitions=1, consumers=1, operator=rf.ops.Window(by="key", aggs=[("value", "count")], tumbling_s=1),
        sink=rf.sinks.Parquet(str(out)), event_time="ts", max_out_of_orderness_s=0.5,
        config=rf.EngineConfig(heartbeat_interval_s=0.1, discovery_interval_s=0.2), checkpoint_interval_s=0.2,
        faults=faults,
    ).start()  # fmt: skip
    try:
        # Between the files: the partition has been told the first file's split ended (skipped,
        # or, the defect, at the end of time), and the first file's windows closed.
        def ended() -> bool:
            clocks = _consumer_clocks("watchend")
            return len(clocks) == 1 and all(
                sp and all(s in idle or w == WATERMARK_END for s, w in sp.items())
                for sp, idle in clocks.values()
            )

        wait_for_condition(ended, timeout=90, retry_interval_ms=100)
        between = {p: sp for p, (sp, _) in _consumer_clocks("watchend").items()}
        try:  # checked at the end: a stall at the third file is the deterministic check
            wait_for_condition(lambda: _published_sum(out) >= closed_by(0), timeout=30, retry_interval_ms=200)
            first = None
        except RuntimeError:
            first = f"{_published_sum(out)} of {closed_by(0)} rows published, clocks {_consumer_clocks('watchend')}"
        pq.write_table(part(1), inbox / "01.parquet")
        wait_for_condition(lambda: bool(faults.fired()), timeout=60, retry_interval_ms=100)
        # consumer-0 holds the second file's step: it fetches nothing until released. The third
        # file is read whole meanwhile, so one reply carries its rows and the news that it ended.
        pq.write_table(part(2), inbox / "02.parquet")
        wait_for_condition(lambda: _source_read_whole("watchend", "02.parquet", rows), timeout=60)
        faults.resume()
        closed = closed_by(2)  # 5.8k rows: windows ending by the third file's last watermark

        def settled() -> bool:
            return run.status()["operators"].get("late_rows", 0) > 0 or _published_sum(out) >= closed

        try:
            wait_for_condition(settled, timeout=90, retry_interval_ms=200)  # a bound: slow under load
        except RuntimeError:
            pytest.fail(
                f"the third file's windows never closed ({_published_sum(out)} of {closed} rows "
                f"published): clocks {_consumer_clocks('watchend')}, watermarks "
                f"{run.status().get('watermark_ms')}"
            )
        late = run.status()["operators"].get("late_rows", 0)
    finally:
        faults.resume()
        run.stop()
    assert first is None, f"the first file's windows did not close between the files: {first}"
    assert late == 0, (
        f"{late} rows of the later files were late; split watermarks between the files: {between}"
    )
    assert _published_sum(out) == closed


# ----------------------------------------------------------------------------- (4) backpressure


class _SkewedSplit(Split):
    """Unbounded: 20 rows each ``period_s`` (the data's pace), event time ``T0 + offset + 10 ms *
    position``."""

    unbounded = True

    def __init__(self, name, period_s, offset_ms):
        self.name, self.period_s, self.offset_ms = name, period_s, offset_ms

    def read(self, position):
        pos = position
        while True:
            n = 20
            p = np.arange(pos, pos + n)
            ts = pa.array(T0 + self.offset_ms + p * 10, pa.int64())
            pos += n
            time.sleep(self.period_s)
            yield pa.record_batch({"key": pa.array(p % 8), "value": pa.array(np.ones(n)), "ts": ts}), pos


class _Skewed(Source):
    """Split "a" is slow (a batch each 0.4 s) and 5 s behind split "b" (a batch each 0.04 s) in
    event time; each split is in order."""

    def splits(self):
        return [_SkewedSplit("a", 0.4, 0), _SkewedSplit("b", 0.04, 5_000)]

    @property
    def schema(self):
        return SCHEMA


def test_backpressure_is_not_idleness(ray_session, tmp_path):
    """consumer-1 is held (a paused fault) and spilling is off: its partition's queue fills and
    the source stops reading every split. A split not read because the queues are full is not idle: were it
    counted idle after idle_timeout_s, the slow split "a" would be skipped, consumer-0's
    partition would jump 5 s ahead on "b", and once reading resumes the rows of "a" (in order,
    within the bound) would be late."""
    idle_s = 1.0
    # A queue of 100 rows (not 300) fills a few seconds sooner once consumer-1 is held: the
    # blocking is the same, and the wait below still asks for twice the idle timeout of it.
    faults = FaultPlan(
        [Fault(point="consumer.step", actor="consumer-1", nth=20, action="pause")],
        dir=str(tmp_path / "faults"),
    )
    run = make_job(
        tmp_path, "bp", _Skewed(), partitions=2, consumers=2,
        operator=rf.ops.Window(by="key", aggs=[("value", "count")], tumbling_s=1),
        sink=rf.sinks.Parquet(str(tmp_path / "out")), event_time="ts", max_out_of_orderness_s=0.1,
        idle_timeout_s=idle_s,
        config=rf.EngineConfig(heartbeat_interval_s=0.1, session_timeout_s=30.0, queue_max_rows=100, fetch_wait_s=0.05, spill_max_bytes=0),
        checkpoint_interval_s=0.2, faults=faults,
    ).start()  # fmt: skip
    try:
        wait_for_condition(lambda: bool(faults.fired()), timeout=30, retry_interval_ms=100)

        def blocked_past_the_idle_timeout() -> bool:
            # No split has delivered rows for twice the idle timeout: the source is blocked.
            sp = run.status()["splits"]
            return all(sp[s]["since_data_s"] >= 2 * idle_s for s in ("a", "b"))

        wait_for_condition(blocked_past_the_idle_timeout, timeout=30, retry_interval_ms=100)
        a_at_resume = run.status()["splits"]["a"]["position"]
        faults.resume()
        # Split "a" delivers 5 more batches after the pause, and every row read is processed.
        wait_for_condition(lambda: run.status()["splits"]["a"]["position"] >= a_at_resume + 100, timeout=30)
        read = run.status()["rows_read"]
        wait_for_condition(lambda: run.status()["processed_rows"] >= read, timeout=30, retry_interval_ms=100)
        st = run.status()
    finally:
        faults.resume()
        run.stop()
    late = {p["partition"]: p["operators"].get("late_rows", 0) for p in st["partitions"]}
    assert sum(late.values()) == 0, f"rows of split 'a' were late after the pause: {late}"


# ----------------------------------------------------------------------------- (1) runs of a step


def test_dedup_of_unique_ids_keeps_every_row(ray_session, tmp_path):
    """Every id unique, rows in event-time order: Dedup keeps all of them. Were the fetch that
    ends the split applied after the first run of a step (the watermark then the end of time),
    the rows of the runs after it would be dropped as late."""
    n = 12_000
    data = pa.table(
        {
            "key": np.arange(n, dtype=np.int64) % 16,
            "id": np.arange(n, dtype=np.int64),
            "ts": T0 + np.arange(n, dtype=np.int64),
        }
    )
    job = make_job(
        tmp_path, "dedupall", rf.sources.Table(data, batch_rows=500), partitions=4, consumers=2,
        operator=[throttle(20_000), rf.ops.Dedup(["key", "id"], within_s=1)],
        sink=rf.sinks.Parquet(str(tmp_path / "out")), event_time="ts", max_out_of_orderness_s=0.5, config=FAST,
        checkpoint_interval_s=0.1,
    )  # fmt: skip
    job.run(timeout_s=60)
    got = pq.read_table(str(tmp_path / "out"))
    assert got.num_rows == n, f"{n - got.num_rows} unique rows dropped"


# ----------------------------------------------------------------------------- exactly once under faults

#: The most distinct fault points of the commit path not covered by test_windows.py's kills.
PLANS = {
    "source_kill": [Fault(point="source.batch", actor="source-0", nth=5)],
    "consumer_before_write": [Fault(point="consumer.before_state_write", actor="consumer-1", nth=3)],
    "manager_publish": [Fault(point="manager.publish", actor="manager", nth=3)],
}


def _two_files(tmp_path, n: int, seeds: tuple[int, int]) -> tuple[pa.Table, rf.sources.Parquet]:
    """Two files (two splits, one per source actor), rows shuffled by up to 3 s (a 0.2 s bound:
    many late rows), ``ts`` unique over both."""
    halves = [shuffled(n // 2, seed=s, keys=8) for s in seeds]
    halves[1] = halves[1].set_column(2, "ts", pc.add(halves[1]["ts"], 10_000_000))
    d = tmp_path / "in"
    d.mkdir()
    for name, half in zip(("a", "b"), halves):
        pq.write_table(half, d / f"{name}.parquet", row_group_size=400)
    return pa.concat_tables(halves), rf.sources.Parquet(str(d / "*.parquet"), batch_rows=400)


def _two_source_job(tmp_path, name, source, window, out, faults):
    return make_job(
        tmp_path, name, source, partitions=4, consumers=2, operator=[throttle(20_000), window],
        sink=rf.sinks.Parquet(str(out)), event_time="ts", max_out_of_orderness_s=0.2,
        config=rf.EngineConfig(
            heartbeat_interval_s=0.1, session_timeout_s=5.0, commit_retry_initial_s=0.05, fetch_max_bytes=60_000,
            num_sources=2,
        ),
        checkpoint_interval_s=0.1, faults=faults,
    )  # fmt: skip


def _by_window(t: pa.Table) -> dict:
    return dict(zip(zip(t["key"].to_pylist(), t["window_start"].to_pylist()), t["value_count"].to_pylist()))


COUNT_SQL = "SELECT key, (ts // 500) * 500 AS window_start, count(value) AS value_count FROM t GROUP BY ALL"


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_windows_and_late_rows_exactly_once_with_two_sources(ray_session, tmp_path, plan):
    n = 8_000
    data, source = _two_files(tmp_path, n, (11, 12))
    out, late_dir = tmp_path / "out", tmp_path / "late"
    faults = FaultPlan(PLANS[plan], dir=str(tmp_path / "faults"))
    win = rf.ops.Window(
        by="key", aggs=[("value", "count"), ("value", "sum")], tumbling_s=0.5, late="side",
        late_sink=rf.sinks.Parquet(str(late_dir)),
    )  # fmt: skip
    _two_source_job(tmp_path, f"eo-{plan.replace('_', '-')}", source, win, out, faults).run(timeout_s=60)
    assert faults.fired(), "no fault fired"
    windows = pq.read_table(str(out))
    # How many rows are late depends on when the second source is first heard from (until then
    # the watermark waits), so none may be: test_windows.py's side test forces them.
    late = pq.read_table(str(late_dir)) if late_dir.exists() else pa.table({"ts": pa.array([], pa.int64())})
    late_ts = set(late["ts"].to_pylist())
    assert late.num_rows == len(late_ts), "a late row reached the side sink twice"
    keys = list(zip(windows["key"].to_pylist(), windows["window_start"].to_pylist()))
    assert len(keys) == len(set(keys)), "a window was emitted twice"
    kept = data.filter(pc.invert(pc.is_in(data["ts"], pa.array(sorted(late_ts), pa.int64()))))
    got = _by_window(windows)
    assert got == _by_window(duckdb_reference(COUNT_SQL, t=kept))
    assert sum(got.values()) + len(late_ts) == n


def test_update_windows_versions_grow_and_latest_equals_sql(ray_session, tmp_path):
    """late='update' with a lateness that keeps every row, a consumer killed before its state
    write (its steps replayed): no window has two rows at one version, and the latest row of each window (highest _version) is SQL's GROUP BY."""
    data, source = _two_files(tmp_path, 8_000, (21, 22))
    out = tmp_path / "out"
    faults = FaultPlan(PLANS["consumer_before_write"], dir=str(tmp_path / "faults"))
    win = rf.ops.Window(
        by="key", aggs=[("value", "count")], tumbling_s=0.5, late="update", allowed_lateness_s=60
    )
    _two_source_job(tmp_path, "up-consumer", source, win, out, faults).run(timeout_s=60)
    assert faults.fired(), "no fault fired"
    t = pq.read_table(str(out))
    rows = list(zip(t["key"].to_pylist(), t["window_start"].to_pylist(), t["_version"].to_pylist(), t["value_count"].to_pylist()))  # fmt: skip
    seen = {}
    for k, w, v, c in rows:
        assert seen.setdefault((k, w, v), c) == c, f"window {(k, w)} has two rows at version {v}"
    # Whether a window fires before its late rows arrive depends on when the second source is
    # first heard from (until then the watermark waits): test_windows.py's update test forces
    # re-emissions; this one checks versions and values under a kill, whatever the timing.
    latest = {}
    for k, w, v, c in rows:
        if (k, w) not in latest or v > latest[(k, w)][0]:
            latest[(k, w)] = (v, c)
    assert {kw: c for kw, (_, c) in latest.items()} == _by_window(duckdb_reference(COUNT_SQL, t=data))
