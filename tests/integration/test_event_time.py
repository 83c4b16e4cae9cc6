"""Event-time plumbing (DESIGN §11), with a probe operator rather than a window, so that what is
checked is the engine's part alone: watermarks move with the rows processed (never ahead of them:
no row inside the out-of-orderness bound is ever late), never go back, reach the end of time at the
end of a bounded input, are committed and restored, show in ``run.status()``; side streams reach
their own sink exactly once, through the commit path, also when a consumer is killed."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import rayflow as rf
from rayflow.ops.base import WATERMARK_END, WATERMARK_NONE, Operator, side_stream
from rayflow.testing import Fault, FaultPlan, throttle
from tests.conftest import make_job

pytestmark = pytest.mark.ray

FAST = rf.EngineConfig(
    heartbeat_interval_s=0.1, session_timeout_s=5.0, commit_retry_initial_s=0.05, fetch_max_bytes=60_000
)
BOUND_MS = 2_000


class Probe(Operator):
    """Counts rows older than its watermark (late) and emits each watermark it is advanced to
    (``wm`` column) with the rows it had seen then; late rows go to the side stream ``late``
    (with ``late_sink``). State: one row (watermark, rows seen, late rows)."""

    stateful = True

    def __init__(self, late_sink=None, event_time=None):
        self.late_sink = late_sink
        self.event_time = event_time

    @property
    def uses_event_time(self) -> bool:
        return True

    def with_event_time(self, column):
        return Probe(self.late_sink, self.event_time or column)

    def side_sinks(self):
        return {"late": self.late_sink} if self.late_sink is not None else {}

    def init_state(self):
        return (WATERMARK_NONE, 0, 0)

    def process(self, state, table):
        wm, rows, late = state
        is_late = pc.less(table.column(self.event_time), pa.scalar(wm, pa.int64()))
        n_late = pc.sum(is_late).as_py() or 0
        state = (wm, rows + table.num_rows, late + n_late)
        if n_late and self.late_sink is not None:
            return state, side_stream(table.filter(is_late), "late")
        return state, None

    def on_watermark(self, state, watermark_ms, *, version):
        wm, rows, late = state
        if watermark_ms <= wm:
            return state, None
        out = pa.table({"wm": [watermark_ms], "rows_seen": [rows], "late": [late], "version": [version]})
        return (watermark_ms, rows, late), out

    def metrics(self, state):
        return {"late_rows": state[2], "probe_rows": state[1]}

    def state_to_table(self, state):
        return pa.table({"wm": [state[0]], "rows": [state[1]], "late": [state[2]]})

    def state_from_table(self, table):
        r = table.to_pylist()[0]
        return (r["wm"], r["rows"], r["late"])


def events(n: int, *, seed: int, keys: int = 50, shuffle_ms: int = BOUND_MS) -> pa.Table:
    """``n`` events, 1 ms apart, shuffled so that no row is more than ``shuffle_ms`` out of order."""
    rng = np.random.default_rng(seed)
    ts = 1_700_000_000_000 + np.arange(n, dtype=np.int64)
    order = np.argsort(ts + rng.integers(0, shuffle_ms, n), kind="stable")
    return pa.table(
        {
            "key": rng.integers(0, keys, n),
            "value": rng.random(n),
            "ts": ts[order],
        }
    )


def probe_job(tmp_path, name, data, **kw):
    return make_job(
        tmp_path,
        name,
        rf.sources.Table(data, batch_rows=500),
        partitions=kw.pop("partitions", 4),
        operator=[throttle(kw.pop("rows_per_s", 50_000)), Probe(kw.pop("late_sink", None))],
        event_time="ts",
        max_out_of_orderness_s=kw.pop("bound_s", BOUND_MS / 1000),
        config=FAST,
        checkpoint_interval_s=0.1,
        **kw,
    )


def test_watermarks_follow_the_rows_and_reach_the_end(ray_session, tmp_path):
    """Shuffled within the bound: no row is ever late; each partition's watermarks only grow,
    and the last one is the end of time, with every row seen before it."""
    data = events(20_000, seed=1)
    res = probe_job(tmp_path, "wm", data).run(timeout_s=180)
    out = res.output.to_pydict()
    assert out["wm"].count(WATERMARK_END) == 4  # one per partition
    assert sum(out["rows_seen"][i] for i, w in enumerate(out["wm"]) if w == WATERMARK_END) == 20_000
    assert sum(out["late"][i] for i, w in enumerate(out["wm"]) if w == WATERMARK_END) == 0
    finite = [w for w in out["wm"] if w != WATERMARK_END]
    assert finite, "the watermark never moved before the end"
    assert max(finite) <= int(pc.max(data["ts"]).as_py()) - BOUND_MS


def test_a_too_small_bound_makes_rows_late_and_the_side_sink_gets_them_once(ray_session, tmp_path):
    """With a bound smaller than the shuffle, some rows are late: the side sink holds exactly the
    rows the probe counted as late, once each, also across a consumer killed mid-run."""
    data = events(20_000, seed=2, shuffle_ms=3_000)
    late_dir = tmp_path / "late"
    faults = FaultPlan(
        [
            Fault(point="consumer.after_commit", actor="consumer-0", nth=4),
            Fault(point="consumer.after_state_write", actor="consumer-1", nth=6),
        ],
        dir=str(tmp_path / "faults"),
    )
    run = probe_job(
        tmp_path,
        "late",
        data,
        bound_s=0.2,
        late_sink=rf.sinks.Parquet(str(late_dir)),
        faults=faults,
    ).start()
    res = run.wait(timeout_s=180)
    st = res.stats
    late = pq.read_table(str(late_dir))
    assert late.num_rows > 0
    # Each late row once: (ts) is unique in the input.
    assert late.num_rows == len(set(late["ts"].to_pylist()))
    ends = res.output.filter(pc.equal(res.output["wm"], WATERMARK_END))
    assert sum(ends["rows_seen"].to_pylist()) == data.num_rows
    # The committed history's late count is what the side sink got: none lost, none twice.
    assert sum(ends["late"].to_pylist()) == late.num_rows
    assert st["stopped"] is False
    assert faults.fired(), "no fault fired: the run did not test recovery"


def test_watermarks_are_committed_restored_and_shown(ray_session, tmp_path):
    """A live job: run.status() shows each partition's watermark and event-time lag; after a stop
    and a resume the watermarks start where they were committed (never back)."""
    import duckdb

    data = events(60_000, seed=3)
    job = probe_job(tmp_path, "resume", data, rows_per_s=20_000)
    run = job.start()
    from ray._common.test_utils import wait_for_condition

    def shows():
        st = run.status()
        return st["watermark_ms"] is not None and all(p["watermark_ms"] is not None for p in st["partitions"])

    wait_for_condition(shows, timeout=60, retry_interval_ms=100)
    st = run.status()
    assert st["event_time_lag_s"] is not None and st["event_time_lag_s"] > 0
    assert all(p["operators"].get("late_rows") == 0 for p in st["partitions"])
    run.stop()
    con = duckdb.connect(str(tmp_path / "ck" / "resume" / "catalog.duckdb"), read_only=True)
    rows = con.execute(
        "SELECT partition, watermarks FROM commits QUALIFY row_number() OVER "
        "(PARTITION BY partition ORDER BY commit_id DESC) = 1"
    ).fetchall()
    con.close()
    committed = {p: json.loads(w)["partition"] for p, w in rows}
    assert committed and all(w > WATERMARK_NONE for w in committed.values())
    res = job.run(timeout_s=180)
    out = res.output.to_pydict()  # both runs' outputs (Collect)
    assert out["wm"].count(WATERMARK_END) == 4
    assert sum(out["late"][i] for i, w in enumerate(out["wm"]) if w == WATERMARK_END) == 0
    # Over both runs, each partition's committed watermark never went back: the resumed run
    # started from the restored one, and its first commit is not below it.
    con = duckdb.connect(str(tmp_path / "ck" / "resume" / "catalog.duckdb"), read_only=True)
    history = con.execute("SELECT partition, watermarks FROM commits ORDER BY commit_id").fetchall()
    con.close()
    last: dict[int, int] = {}
    for p, w in history:
        wm = json.loads(w)["partition"]
        assert wm >= last.get(p, WATERMARK_NONE), f"partition {p}: watermark went back"
        last[p] = wm
    assert all(last[p] == WATERMARK_END for p in range(4))
