"""Event time end to end (issue 10): windows, late rows, failures, idle splits, bounded state and
dedup, each checked against DuckDB SQL over the same input rows.

No outcome depends on timing. The inputs are built so that a row's fate follows from the order of
its split alone: a split's watermark (its largest event time read, less the out-of-orderness
bound) moves with the rows read before, so

- rows shuffled by less than the bound (and by less than the bound minus a batch's time span) are
  never late;
- the late rows of a test sit in their split far after the rows that moved the watermark past
  their windows, so they are late in every run, whatever the batches, commits or failures.

Every wait is a condition (``wait_for_condition``) with a timeout, never a sleep.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from ray._common.test_utils import wait_for_condition

import rayflow as rf
from rayflow.sinks.kafka import json_lines
from rayflow.testing import (
    Fault,
    FaultPlan,
    assert_same_rows,
    duckdb_reference,
    kill_actor,
    scale_out_while_held,
    throttle,
)
from tests.conftest import make_job

pytestmark = pytest.mark.ray

FAST = rf.EngineConfig(
    heartbeat_interval_s=0.1, session_timeout_s=5.0, commit_retry_initial_s=0.05, discovery_interval_s=0.5
)
#: For the tests with late rows: a fetch (and so a step's worth of rows processed before the
#: watermark moves) holds about two batches of a partition, 1 s of event time at most, however
#: far the source has read ahead; the late rows trail the watermark by 5 s or more.
SMALL_FETCHES = dataclasses.replace(FAST, fetch_max_bytes=16_000)

# ----------------------------------------------------------------------------- the input

#: Event times start here (ms; a multiple of every window size, so windows align on it too).
T0 = 1_700_000_000_000
EVENTS = 40_000
KEYS = 1_000
SPAN_MS = 20_000  # 2 rows per ms of event time
JITTER_MS = 1_000  # how far a row's time may trail the largest time read before it
BOUND_S = 3.0  # max_out_of_orderness_s: above the jitter plus a batch's time span
BATCH_ROWS = 2_000  # 1 s of event time per batch
AGGS = [("value", "count"), ("value", "sum"), ("value", "mean")]
WINDOW_COLUMNS = ["key", "window_start", "window_end", "value_count", "value_sum", "value_mean"]

TUMBLE_MS = 2_000
HOP_SIZE_MS, HOP_SLIDE_MS = 3_000, 1_000
#: Odd, while every event time is even: no two rows of a key are ever exactly one gap apart.
GAP_MS = 999

#: The late rows of the late tests: times in the first two tumbling windows, placed in the split
#: among rows 13 to 17 s later (the watermark is then past T0 + 8 s, at least).
LATE_ROWS = 300
LATE_SPAN_MS = 2 * TUMBLE_MS
LATE_AT_MS = (13_000, 17_000)


def events(
    n: int = EVENTS,
    *,
    keys: int = KEYS,
    span_ms: int = SPAN_MS,
    jitter_ms: int = JITTER_MS,
    late: int = 0,
    seed: int = 0,
) -> pa.Table:
    """``key, value, ts, seq``, in the order a split reads them: arrival times sorted, each row's
    event time its arrival time plus up to ``jitter_ms`` (so a row trails the largest time before
    it by ``jitter_ms`` at most). Event times are even. ``late`` rows more arrive between
    :data:`LATE_AT_MS` with times in ``[T0, T0 + LATE_SPAN_MS)``: far behind the watermark by
    then. ``seq`` numbers the rows (the late ones from ``n`` on). Values are dyadic, so sums and
    means are exact whatever the order of summation."""
    rng = np.random.default_rng(seed)
    arrival = 2 * rng.integers(0, span_ms // 2, n)
    ts = T0 + arrival + 2 * rng.integers(0, jitter_ms // 2 + 1, n)
    if late:
        arrival = np.concatenate([arrival, rng.integers(*LATE_AT_MS, late)])
        ts = np.concatenate([ts, T0 + 2 * rng.integers(0, LATE_SPAN_MS // 2, late)])
    total = n + late
    order = np.argsort(arrival, kind="stable")
    return pa.table(
        {
            "key": rng.integers(0, keys, total)[order],
            "value": (rng.integers(0, 1_024_000, total) / 1024.0)[order],
            "ts": ts[order].astype(np.int64),
            "seq": np.arange(total, dtype=np.int64)[order],
        }
    )


def write_files(table: pa.Table, directory, files: int) -> None:
    """``table``'s rows dealt round-robin to ``files`` Parquet files (one split each), each file
    keeping their order (so each keeps the out-of-orderness bound on its own)."""
    directory.mkdir()
    idx = np.arange(table.num_rows)
    for f in range(files):
        pq.write_table(table.filter(pa.array(idx % files == f)), directory / f"part-{f}.parquet")


# ----------------------------------------------------------------------------- SQL references

_AGG_SQL = "count(value) AS value_count, sum(value) AS value_sum, sum(value) / count(value) AS value_mean"


def tumbling_sql(size_ms: int, table: str = "ev") -> str:
    return f"""
        SELECT key, (ts // {size_ms}) * {size_ms} AS window_start,
               (ts // {size_ms}) * {size_ms} + {size_ms} AS window_end, {_AGG_SQL}
        FROM {table} GROUP BY ALL"""


def hopping_sql(size_ms: int, slide_ms: int, table: str = "ev") -> str:
    """Every window ``[k * slide, k * slide + size)`` holding the row: an unnest of the starts."""
    return f"""
        WITH w AS (
            SELECT *, unnest(generate_series((ts // {slide_ms}) * {slide_ms} - {size_ms} + {slide_ms},
                                             (ts // {slide_ms}) * {slide_ms}, {slide_ms})) AS window_start
            FROM {table})
        SELECT key, window_start, window_start + {size_ms} AS window_end, {_AGG_SQL}
        FROM w WHERE window_start <= ts AND ts < window_start + {size_ms} GROUP BY ALL"""


def session_sql(gap_ms: int, table: str = "ev") -> str:
    """Gaps and islands: a row more than a gap after the previous row of its key starts a session
    ``[first ts, last ts + gap)``."""
    return f"""
        WITH o AS (
            SELECT *, CASE WHEN ts - lag(ts) OVER (PARTITION BY key ORDER BY ts, seq) < {gap_ms}
                      THEN 0 ELSE 1 END AS starts
            FROM {table}),
        s AS (
            SELECT *, sum(starts) OVER (PARTITION BY key ORDER BY ts, seq ROWS UNBOUNDED PRECEDING) AS sid
            FROM o)
        SELECT key, min(ts) AS window_start, max(ts) + {gap_ms} AS window_end, {_AGG_SQL}
        FROM s GROUP BY key, sid"""


def no_duplicate_windows(out: pa.Table, by: tuple[str, ...] = ("key", "window_start")) -> None:
    """Each window emitted once: no two rows of an append output share ``by``."""
    cols = ", ".join(by)
    dup = duckdb_reference(
        f"SELECT {cols}, count(*) AS n FROM o GROUP BY ALL HAVING count(*) > 1 ORDER BY n DESC LIMIT 5", o=out
    )
    assert dup.num_rows == 0, f"windows emitted more than once: {dup.to_pylist()}"


def assert_windows(got: pa.Table, expected: pa.Table, columns: list[str] = WINDOW_COLUMNS) -> None:
    """``got`` holds the rows of ``expected`` (as multisets over ``columns``); on a difference, the
    message shows the rows one has more than the other (a few of each)."""
    cols = ", ".join(columns)
    diff = duckdb_reference(
        f"""(SELECT 'unexpected' AS what, * FROM (SELECT {cols} FROM g EXCEPT ALL SELECT {cols} FROM e) LIMIT 5)
            UNION ALL
            (SELECT 'missing' AS what, * FROM (SELECT {cols} FROM e EXCEPT ALL SELECT {cols} FROM g) LIMIT 5)""",
        g=got.select(columns),
        e=expected.select(columns).cast(got.select(columns).schema, safe=False),
    )
    assert diff.num_rows == 0, (
        f"{got.num_rows} rows, expected {expected.num_rows}; differ: {diff.to_pylist()}"
    )
    assert_same_rows(got, expected, columns=columns)


def published(out) -> pa.Table:
    return pads.dataset(str(out), format="parquet").to_table()


# ----------------------------------------------------------------------------- status helpers


def op_metric(st: dict, name: str) -> int:
    """An operator metric (``late_rows``, ``open_windows``, ``state_rows``,
    ``duplicates_dropped``) summed over the partitions of a ``run.status()``."""
    found = [p["operators"][name] for p in st["partitions"] if name in p.get("operators", {})]
    assert found, f"run.status() reports no {name!r} in its partitions: {st['partitions'][:1]}"
    return int(sum(found))


def watermarks(st: dict) -> list[int | None]:
    """Each partition's watermark (ms) in a ``run.status()``; None before any."""
    return [p["watermark_ms"] for p in st["partitions"]]


def min_watermark(run) -> int | None:
    wms = watermarks(run.status())
    return None if not wms or any(w is None for w in wms) else min(wms)


#: A partition's watermark once its bounded input has ended.
WATERMARK_END = 2**63 - 1


def finish(run, *, timeout_s: float = 180) -> tuple[rf.Result, dict]:
    """Wait until a bounded job is done; its result, and its last status: operator metrics of the
    final states. The actors stay up until ``wait()``, so the finished job still answers; the
    status shows each partition as of its owner's last heartbeat, so it is waited for until
    every partition shows the end of event time (its heartbeat came after its final state)."""
    last: list[dict] = []

    def ended() -> bool:
        last[:] = [run.status()]
        return last[0]["done"] and all(w == WATERMARK_END for w in watermarks(last[0]))

    try:
        wait_for_condition(ended, timeout=timeout_s, retry_interval_ms=200)
        return run.wait(timeout_s=timeout_s), last[0]
    finally:
        run.stop()


def rows_of(run, sql: str) -> int:
    """``sql``'s single count over the running job's output; 0 before anything is published."""
    try:
        return int(run.query(sql).column(0)[0].as_py() or 0)
    except rf.errors.ConfigError:
        return 0


# ----------------------------------------------------------------------------- jobs


def window_job(tmp_path, name, source, window, **kw):
    kw.setdefault("partitions", 8)
    kw.setdefault("consumers", 2)
    kw.setdefault("checkpoint_interval_s", 0.2)
    kw.setdefault("config", FAST)
    kw.setdefault("event_time", "ts")
    kw.setdefault("max_out_of_orderness_s", BOUND_S)
    pre = kw.pop("pre", [])
    return make_job(tmp_path, name, source, operator=[*pre, window], **kw)


def tumbling(**kw) -> rf.ops.Window:
    return rf.ops.Window("key", AGGS, tumbling_s=TUMBLE_MS / 1000, **kw)


@pytest.fixture(scope="module")
def data() -> pa.Table:
    return events(seed=1)


@pytest.fixture(scope="module")
def late_data() -> pa.Table:
    return events(late=LATE_ROWS, seed=2)


def late_rows_of(table: pa.Table) -> pa.Table:
    """The late rows of :func:`events` (``seq`` from ``EVENTS`` on), with their window."""
    return duckdb_reference(
        f"""SELECT *, (ts // {TUMBLE_MS}) * {TUMBLE_MS} AS window_start,
                   (ts // {TUMBLE_MS}) * {TUMBLE_MS} + {TUMBLE_MS} AS window_end
            FROM t WHERE seq >= {EVENTS}""",
        t=table,
    )


def test_the_inputs_keep_their_promises(data, late_data):
    """The premise of every test here: no row trails the largest time read before it by more than
    the jitter, but the late ones, which trail the watermark by far more than a window."""
    for t, late in ((data, 0), (late_data, LATE_ROWS)):
        ts, seq = t["ts"].to_numpy(), t["seq"].to_numpy()
        on_time = seq < EVENTS
        prior_max = np.maximum.accumulate(np.where(on_time, ts, 0))
        trail = np.concatenate([[0], prior_max[:-1]]) - ts
        assert trail[on_time].max() <= JITTER_MS
        assert (ts % 2 == 0).all()
        if late:
            assert on_time.sum() == EVENTS and (~on_time).sum() == late
            # Watermark when a late row comes, a batch earlier at worst: past its window's end.
            batch_start = (np.arange(t.num_rows) // BATCH_ROWS) * BATCH_ROWS
            wm_before = prior_max[np.maximum(batch_start - 1, 0)] - int(BOUND_S * 1000)
            ends = (ts // TUMBLE_MS + 1) * TUMBLE_MS
            assert (wm_before[~on_time] >= ends[~on_time] + 2 * TUMBLE_MS).all()


# ----------------------------------------------------------------------------- 1. windows = SQL


def test_tumbling_windows_equal_sql(ray_session, tmp_path, data):
    """One split (a Table), 8 partitions, 2 consumers: windows close while the input is read (they
    are published over several commits), none is late, and together they are the GROUP BY."""
    out = tmp_path / "out"
    run = window_job(
        tmp_path, "tumble", rf.sources.Table(data, batch_rows=BATCH_ROWS), tumbling(),
        sink=rf.sinks.Parquet(out), pre=[throttle(40_000)],
    ).start()  # fmt: skip
    _, st = finish(run)
    got = published(out)
    no_duplicate_windows(got)
    assert_windows(got, duckdb_reference(tumbling_sql(TUMBLE_MS), ev=data))
    assert op_metric(st, "late_rows") == 0
    files = [f for f in out.iterdir() if f.suffix == ".parquet"]
    assert len(files) > 8, "windows should close and be published as the watermark moves, not at the end"
    assert got.schema.field("window_start").type == pa.int64()
    assert got.schema.field("window_end").type == pa.int64()


@pytest.mark.parametrize("kind", ["hopping", "session"])
def test_hopping_and_session_windows_equal_sql(ray_session, tmp_path, data, kind):
    """Three Parquet files (three splits, each shuffled within the bound): a partition's watermark
    is the least of its splits', so no row of a split behind the others is late."""
    write_files(data, tmp_path / "in", files=3)
    if kind == "hopping":
        window = rf.ops.Window("key", AGGS, hopping_s=(HOP_SIZE_MS / 1000, HOP_SLIDE_MS / 1000))
        sql = hopping_sql(HOP_SIZE_MS, HOP_SLIDE_MS)
    else:
        window = rf.ops.Window("key", AGGS, session_gap_s=GAP_MS / 1000)
        sql = session_sql(GAP_MS)
    source = rf.sources.Parquet(str(tmp_path / "in"), batch_rows=BATCH_ROWS // 3)
    result, st = finish(window_job(tmp_path, kind, source, window).start())
    expected = duckdb_reference(sql, ev=data)
    no_duplicate_windows(result.output)
    assert_windows(result.output, expected)
    assert op_metric(st, "late_rows") == 0
    if kind == "session":  # the gaps do split sessions: many per key
        assert expected.num_rows > 3 * KEYS


# ----------------------------------------------------------------------------- 2. late rows


def test_late_rows_are_dropped_and_counted(ray_session, tmp_path, late_data):
    """``late="drop"`` (the default): the windows are SQL over the rows that are not late, and
    ``late_rows`` in ``run.status()`` counts the late ones."""
    result, st = finish(
        window_job(
            tmp_path,
            "drop",
            rf.sources.Table(late_data, batch_rows=BATCH_ROWS),
            tumbling(late="drop"),
            config=SMALL_FETCHES,
        ).start()
    )
    on_time = late_data.filter(pc.less(late_data["seq"], EVENTS))
    no_duplicate_windows(result.output)
    assert_windows(result.output, duckdb_reference(tumbling_sql(TUMBLE_MS), ev=on_time))
    assert op_metric(st, "late_rows") == LATE_ROWS


def test_late_rows_go_to_the_side_sink_exactly(ray_session, tmp_path, late_data):
    """``late="side"``: the late sink gets exactly the late rows, each with the window it missed."""
    late_out = tmp_path / "late"
    window = tumbling(late="side", late_sink=rf.sinks.Parquet(late_out))
    result, st = finish(
        window_job(
            tmp_path, "side", rf.sources.Table(late_data, batch_rows=BATCH_ROWS), window, config=SMALL_FETCHES
        ).start()
    )
    on_time = late_data.filter(pc.less(late_data["seq"], EVENTS))
    no_duplicate_windows(result.output)
    assert_windows(result.output, duckdb_reference(tumbling_sql(TUMBLE_MS), ev=on_time))
    got = published(late_out)
    assert_same_rows(
        got, late_rows_of(late_data), columns=["seq", "key", "value", "ts", "window_start", "window_end"]
    )
    assert op_metric(st, "late_rows") == LATE_ROWS


def test_late_rows_update_their_windows(ray_session, tmp_path, late_data):
    """``late="update"``: a window fires when the watermark passes its end, and fires again (a new
    ``_version``) when a late row within the allowed lateness changes it; the latest row per
    window is the GROUP BY over every row."""
    out = tmp_path / "out"
    window = tumbling(late="update", allowed_lateness_s=60.0)
    run = window_job(
        tmp_path,
        "update",
        rf.sources.Table(late_data, batch_rows=BATCH_ROWS),
        window,
        sink=rf.sinks.Parquet(out),
        config=SMALL_FETCHES,
    ).start()
    finish(run)
    latest = run.query("SELECT * FROM latest")
    assert_windows(latest, duckdb_reference(tumbling_sql(TUMBLE_MS), ev=late_data))
    # The windows the late rows fell in (and that had on-time rows) fired before them and again after.
    refired = duckdb_reference(
        f"""WITH touched AS (SELECT DISTINCT key, (ts // {TUMBLE_MS}) * {TUMBLE_MS} AS window_start
                             FROM ev WHERE seq >= {EVENTS}),
                 had AS (SELECT DISTINCT key, (ts // {TUMBLE_MS}) * {TUMBLE_MS} AS window_start
                         FROM ev WHERE seq < {EVENTS})
            SELECT t.key, t.window_start, count(o.key) AS n
            FROM touched t JOIN had USING (key, window_start)
                 LEFT JOIN o ON o.key = t.key AND o.window_start = t.window_start
            GROUP BY ALL""",
        ev=late_data,
        o=published(out),
    )
    assert refired.num_rows > 0
    assert min(refired["n"].to_pylist()) >= 2, "a window updated by a late row was emitted only once"


# ----------------------------------------------------------------------------- 3. failures


@pytest.mark.parametrize(
    "faults",
    [
        [Fault(point="consumer.after_state_write", actor="consumer-0", nth=3)],  # files, no commit
        [Fault(point="consumer.after_commit", actor="consumer-1", nth=2)],  # committed, no trim
        [Fault(point="manager.after_record", actor="manager", nth=4)],  # recorded, not published
    ],
    ids=["kill-after-write", "kill-after-commit", "manager"],
)
def test_windows_and_late_rows_are_exactly_once_under_kills(ray_session, tmp_path, late_data, faults):
    """A process killed mid-window: its partitions resume from their commits (open windows and
    watermark included). Every window is emitted once with the SQL values, and every late row
    reaches the side sink once."""
    plan = FaultPlan(faults, dir=str(tmp_path / "faults"))
    out, late_out = tmp_path / "out", tmp_path / "late"
    window = tumbling(late="side", late_sink=rf.sinks.Parquet(late_out))
    run = window_job(
        tmp_path, "kill", rf.sources.Table(late_data, batch_rows=1_000), window, pre=[throttle(20_000)],
        sink=rf.sinks.Parquet(out), checkpoint_interval_s=0.1, faults=plan, config=SMALL_FETCHES,
    ).start()  # fmt: skip
    result, _ = finish(run)
    assert plan.fired(), f"{plan} never fired"
    if plan.faults[0].actor != "manager":  # a consumer died: its partitions were recovered
        assert result.stats["recoveries"] >= 1
    got = published(out)
    no_duplicate_windows(got)
    on_time = late_data.filter(pc.less(late_data["seq"], EVENTS))
    assert_windows(got, duckdb_reference(tumbling_sql(TUMBLE_MS), ev=on_time))
    assert_same_rows(
        published(late_out), late_rows_of(late_data), columns=["seq", "key", "value", "ts", "window_start"]
    )


def test_a_partition_taken_over_with_a_backlog_moves_its_watermark_as_it_processes(
    ray_session, tmp_path, late_data
):
    """As above with the default fetch size: the survivor of a killed consumer takes over its
    partitions with seconds of rows queued for them, fetched at once. Its watermark must move as
    it processes them (each batch carries its split's watermark), so the late rows among them,
    5 s or more behind the watermark of the rows before them, are late still: in the side sink,
    not in a window."""
    plan = FaultPlan(
        [Fault(point="consumer.after_state_write", actor="consumer-0", nth=3)], dir=str(tmp_path / "faults")
    )
    out, late_out = tmp_path / "out", tmp_path / "late"
    window = tumbling(late="side", late_sink=rf.sinks.Parquet(late_out))
    run = window_job(
        tmp_path, "backlog", rf.sources.Table(late_data, batch_rows=1_000), window, pre=[throttle(10_000)],
        sink=rf.sinks.Parquet(out), checkpoint_interval_s=0.1, faults=plan,
    ).start()  # fmt: skip
    _, st = finish(run)
    assert plan.fired(), f"{plan} never fired"
    late = published(late_out)
    accepted = sorted(set(range(EVENTS, EVENTS + LATE_ROWS)) - set(late["seq"].to_pylist()))
    assert not accepted, (
        f"{len(accepted)} late rows (seq {accepted[:5]}...) were counted in windows closed long "
        f"before; late_rows={op_metric(st, 'late_rows')}"
    )
    on_time = late_data.filter(pc.less(late_data["seq"], EVENTS))
    assert_windows(published(out), duckdb_reference(tumbling_sql(TUMBLE_MS), ev=on_time))


def test_a_rebalance_while_windows_are_open_moves_them_whole(ray_session, tmp_path, data):
    """Consumers join (partitions are revoked, committed with their open windows, and reloaded by
    the new owners) and leave again, while every partition holds open windows."""
    plan = FaultPlan(
        [Fault(point="consumer.step", actor="consumer-0", nth=3, action="pause")], dir=str(tmp_path / "f")
    )
    out = tmp_path / "out"
    run = window_job(
        tmp_path, "rebalance", rf.sources.Table(data, batch_rows=1_000), tumbling(), pre=[throttle(8_000)],
        sink=rf.sinks.Parquet(out), partitions=4, consumers=1, checkpoint_interval_s=60.0, faults=plan,
    ).start()  # fmt: skip
    try:
        scale_out_while_held(run, plan, consumers=3)  # its revocations wait for the held step
        assert not run.status()["done"]
        run.scale(consumers=1)
        result, _ = finish(run)
    finally:
        plan.resume()
        run.stop()
    assert result.stats["rebalances"] >= 2
    got = published(out)
    no_duplicate_windows(got)
    assert_windows(got, duckdb_reference(tumbling_sql(TUMBLE_MS), ev=data))


LIVE_RATE = 20_000
LIVE_KEYS = 200
LIVE_WINDOW_MS = 1_000
LIVE_BOUND_S = 0.5


def live_window_job(tmp_path, name, out, start_ms, **kw):
    source = rf.sources.Synthetic(rate=LIVE_RATE, keys=LIVE_KEYS, splits=2, start_ms=start_ms)
    window = rf.ops.Window("key", AGGS, tumbling_s=LIVE_WINDOW_MS / 1000)
    kw.setdefault("config", rf.EngineConfig(num_sources=2, heartbeat_interval_s=0.1, session_timeout_s=5.0))
    return window_job(
        tmp_path, name, source, window, partitions=4, sink=rf.sinks.Parquet(out), checkpoint_interval_s=0.3,
        max_out_of_orderness_s=LIVE_BOUND_S, **kw,
    )  # fmt: skip


def check_live_windows(out, start_ms: int, closed_by: int) -> pa.Table:
    """Each emitted window once, with the values of every row of the stream in it (a paced split's
    times never go back, so a closed window has all its rows), and none missing among the windows
    that ended by ``closed_by`` (a watermark every partition had passed before it stopped)."""
    got = published(out)
    no_duplicate_windows(got)
    last_end = max([closed_by, *got["window_end"].to_pylist()])
    per_split = LIVE_RATE // 2 * (last_end - start_ms + 2 * LIVE_WINDOW_MS) // 1000
    ref = rf.sources.Synthetic(rate=LIVE_RATE, keys=LIVE_KEYS, splits=2, start_ms=start_ms)
    stream = ref.to_table({s.name: per_split for s in ref.splits()})
    expected = duckdb_reference(
        f"""WITH e AS ({tumbling_sql(LIVE_WINDOW_MS, "stream")})
            SELECT e.* FROM e WHERE window_end <= {closed_by}
               OR EXISTS (SELECT 1 FROM got g WHERE g.key = e.key AND g.window_start = e.window_start)""",
        stream=stream,
        got=got,
    )
    short = duckdb_reference(  # windows emitted with fewer rows than the stream holds: late rows
        """SELECT count(*) AS windows, coalesce(sum(e.value_count - g.value_count), 0) AS rows
            FROM got g JOIN expected e USING (key, window_start) WHERE g.value_count < e.value_count""",
        got=got,
        expected=expected,
    ).to_pylist()[0]
    assert short["windows"] == 0, f"{short} rows of the stream missing from emitted windows (counted late?)"
    assert_windows(got, expected)
    return got


@pytest.mark.slow
def test_a_live_job_killed_stopped_and_resumed_emits_each_window_once(ray_session, tmp_path):
    """A live stream (Synthetic(rate=...), event time = generation time): a consumer is killed
    while windows are open, the job is stopped, and started again, which resumes the open windows
    from the commits. Every window is emitted exactly once, equal to SQL over the stream."""
    out = tmp_path / "out"
    start_ms = int(time.time() * 1000) // LIVE_WINDOW_MS * LIVE_WINDOW_MS
    run = live_window_job(tmp_path, "live", out, start_ms).start()
    try:
        wait_for_condition(lambda: (min_watermark(run) or 0) >= start_ms + 2 * LIVE_WINDOW_MS, timeout=90)
        kill_actor("live", "consumer-0", how="ray.kill")
        wait_for_condition(lambda: run.status()["recoveries"] >= 1, timeout=60)
        wait_for_condition(lambda: (min_watermark(run) or 0) >= start_ms + 4 * LIVE_WINDOW_MS, timeout=90)
        first_closed = min_watermark(run)
    finally:
        first = run.stop()
    assert first.stats["stopped"] and first.stats["recoveries"] >= 1
    got = check_live_windows(out, start_ms, first_closed)
    assert got.num_rows > 0

    run = live_window_job(tmp_path, "live", out, start_ms).start()
    try:
        wait_for_condition(lambda: (min_watermark(run) or 0) >= first_closed + 3 * LIVE_WINDOW_MS, timeout=90)
        closed = min_watermark(run)
    finally:
        run.stop()
    assert check_live_windows(out, start_ms, closed).num_rows > got.num_rows


# ----------------------------------------------------------------------------- 4. idle splits

KAFKA_SCHEMA = pa.schema([("key", pa.int64()), ("value", pa.float64()), ("ts", pa.int64())])
KAFKA_ROWS = 2_000
KAFKA_SPAN_MS = 10_000
KAFKA_BOUND_S = 0.5


def kafka_events() -> pa.Table:
    """Times in order over 10 s, the last one at exactly ``T0 + 10 s``."""
    rng = np.random.default_rng(4)
    ts = np.sort(T0 + rng.integers(0, KAFKA_SPAN_MS, KAFKA_ROWS))
    ts[-1] = T0 + KAFKA_SPAN_MS
    return pa.table(
        {
            "key": rng.integers(0, 20, KAFKA_ROWS),
            "value": rng.integers(0, 1_024_000, KAFKA_ROWS) / 1024.0,
            "ts": ts.astype(np.int64),
        },
        schema=KAFKA_SCHEMA,
    )


def produce_to(kafka, topic: str, table: pa.Table, partition: int) -> None:
    keys = [str(k).encode() for k in table["key"].to_pylist()]
    kafka.produce(topic, [v.encode() for v in json_lines(table).to_pylist()], keys=keys, partition=partition)


@pytest.mark.kafka
@pytest.mark.slow
def test_an_idle_kafka_partition_holds_windows_until_its_idle_timeout(ray_session, kafka, tmp_path):
    """A 2-partition topic whose partition 1 never gets a message. Its split has no watermark, and
    a partition's watermark is the least of its splits': without idle detection no window closes,
    however long the job runs; with ``idle_timeout_s`` the idle split is skipped once it has
    been quiet that long, and the windows behind the watermark of partition 0 close while the job
    runs. (A message on partition 1 then moves its split on, closing them as well.)"""
    rows = kafka_events()
    closed_by = T0 + KAFKA_SPAN_MS - int(KAFKA_BOUND_S * 1000)
    expected = duckdb_reference(
        f"SELECT * FROM ({tumbling_sql(1_000)}) WHERE window_end <= {closed_by}", ev=rows
    )
    count_sql = "SELECT count(*) FROM output"

    def job(name, topic, out, idle_timeout_s):
        source = rf.sources.Kafka(topic, bootstrap_servers=kafka.bootstrap, schema=KAFKA_SCHEMA)
        window = rf.ops.Window("key", AGGS, tumbling_s=1.0)
        return window_job(
            tmp_path, name, source, window, partitions=2, consumers=1, sink=rf.sinks.Parquet(out),
            max_out_of_orderness_s=KAFKA_BOUND_S, idle_timeout_s=idle_timeout_s,
        )  # fmt: skip

    def all_read_and_quiet(run, topic, quiet_s: float) -> bool:
        st = run.status()
        idle = st["splits"].get(f"kafka:{topic}/1", {}).get("since_data_s", 0.0)
        return st["processed_rows"] == KAFKA_ROWS and idle >= quiet_s

    # Idle detection off: every row processed, partition 1 quiet for long, and still no window.
    topic = kafka.create_topic(2)
    produce_to(kafka, topic, rows, partition=0)
    out = tmp_path / "off"
    run = job("idle-off", topic, out, None).start()
    try:
        wait_for_condition(lambda: all_read_and_quiet(run, topic, 3.0), timeout=60)
        st = run.status()
        assert watermarks(st) == [None, None], (
            f"an idle split without rows holds the watermark: {st['partitions']}"
        )
        assert rows_of(run, count_sql) == 0
        assert op_metric(run.status(), "open_windows") > 0
        # A message on partition 1, far ahead: its split's watermark moves, the windows close.
        produce_to(kafka, topic, rows.slice(0, 1).set_column(2, "ts", pa.array([T0 + 60_000])), partition=1)
        wait_for_condition(lambda: rows_of(run, count_sql) == expected.num_rows, timeout=60)
    finally:
        run.stop()
    assert_windows(published(out), expected)

    # Idle detection on: the windows close with partition 1 still silent.
    topic = kafka.create_topic(2)
    produce_to(kafka, topic, rows, partition=0)
    out = tmp_path / "on"
    run = job("idle-on", topic, out, 1.0).start()
    try:
        wait_for_condition(lambda: rows_of(run, count_sql) == expected.num_rows, timeout=60)
        assert not run.status()["done"]
        # The status shows each partition's last heartbeat: a moment behind the output.
        wait_for_condition(lambda: watermarks(run.status()) == [closed_by, closed_by], timeout=30)
    finally:
        run.stop()
    assert_windows(published(out), expected)


# ----------------------------------------------------------------------------- 5. bounded state


@pytest.mark.slow
def test_window_state_stays_bounded_over_an_unbounded_stream(ray_session, tmp_path):
    """Over a live stream the Window holds only its open windows: per partition at most
    ``(bound + size) / size + 2`` window ranges, and at most the rows of the event time they span
    (``bound + 2 * size``: whether it keeps rows or partial aggregates, it never holds more
    than the rows). Both stay flat while the events processed grow five times past them."""
    keys, size_s, bound_s, rate, partitions = 100, 0.2, 0.2, 40_000, 4
    max_open = partitions * (int((bound_s + size_s) / size_s) + 2)  # + one filling, rounding
    max_state = int(rate * (bound_s + 2 * size_s))
    run = make_job(
        tmp_path, "bounded", rf.sources.Synthetic(rate=rate, keys=keys, splits=1),
        partitions=partitions, operator=rf.ops.Window("key", AGGS, tumbling_s=size_s),
        sink=rf.sinks.Parquet(tmp_path / "o"), checkpoint_interval_s=0.3, config=FAST, event_time="ts",
        max_out_of_orderness_s=bound_s,
    ).start()  # fmt: skip
    samples: list[tuple[int, int, int]] = []  # (events processed, open windows, state rows)

    def sample() -> bool:
        st = run.status()
        samples.append((st["processed_rows"], op_metric(st, "open_windows"), op_metric(st, "state_rows")))
        return samples[-1][0] >= 5 * max_state  # about 3 s of the stream

    try:
        wait_for_condition(sample, timeout=90, retry_interval_ms=200)
    finally:
        run.stop()
    warm = [s for s in samples if s[0] >= max_state]
    assert len(warm) >= 6, samples
    assert max(s[1] for s in warm) <= max_open, samples
    assert max(s[2] for s in warm) <= max_state, samples
    assert all(s[1] > 0 and s[2] > 0 for s in warm), samples


# ----------------------------------------------------------------------------- 6. dedup

DEDUP_IDS = 10_000
DEDUP_WITHIN_S = 5.0


def retried_events(seed: int = 5) -> pa.Table:
    """``id, value, ts, copy, seq``: each id once, and about a third of them retried one to three
    times, every 1.05 to 1.3 s of event time (so a copy is later than the original, in time and in
    the split, even after the jitter, and all are within ``DEDUP_WITHIN_S`` of it); shuffled within the jitter like :func:`events`."""
    rng = np.random.default_rng(seed)
    arrival = 2 * rng.integers(0, SPAN_MS // 2, DEDUP_IDS)
    ids = rng.permutation(DEDUP_IDS).astype(np.int64)
    values = rng.integers(0, 1_024_000, DEDUP_IDS) / 1024.0
    retries = rng.choice([0, 0, 0, 0, 0, 0, 1, 1, 2, 3], DEDUP_IDS)
    delay = rng.integers(JITTER_MS + 50, 1_300, DEDUP_IDS)  # a producer's retry interval
    src = np.repeat(np.arange(DEDUP_IDS), retries + 1)
    copy = np.concatenate([np.arange(r + 1) for r in retries])
    arr = arrival[src] + delay[src] * copy
    ts = T0 + arr + 2 * rng.integers(0, JITTER_MS // 2 + 1, len(src))
    order = np.argsort(arr, kind="stable")
    return pa.table(
        {
            "id": ids[src][order],
            "value": values[src][order],
            "ts": ts[order].astype(np.int64),
            "copy": copy[order].astype(np.int64),
            "seq": np.arange(len(src), dtype=np.int64),
        }
    )


def test_dedup_keeps_the_first_row_per_id_under_a_consumer_kill(ray_session, tmp_path):
    rows = retried_events()
    assert rows.num_rows > DEDUP_IDS * 1.3
    plan = FaultPlan(
        [Fault(point="consumer.after_state_write", actor="consumer-0", nth=2)], dir=str(tmp_path / "f")
    )
    run = make_job(
        tmp_path, "dedup", rf.sources.Table(rows, batch_rows=1_000), key="id", partitions=8, consumers=2,
        operator=[throttle(10_000), rf.ops.Dedup("id", within_s=DEDUP_WITHIN_S)], checkpoint_interval_s=0.1,
        config=FAST, faults=plan, event_time="ts", max_out_of_orderness_s=BOUND_S,
    ).start()  # fmt: skip
    result, st = finish(run)
    assert plan.fired(), f"{plan} never fired"
    assert result.stats["recoveries"] >= 1
    expected = duckdb_reference(
        "SELECT * FROM ev QUALIFY row_number() OVER (PARTITION BY id ORDER BY ts) = 1", ev=rows
    )
    assert expected.num_rows == DEDUP_IDS and set(expected["copy"].to_pylist()) == {0}
    assert_same_rows(result.output, expected, columns=["id", "value", "ts", "copy", "seq"])
    assert op_metric(st, "late_rows") == 0
    assert op_metric(st, "duplicates_dropped") == rows.num_rows - DEDUP_IDS
