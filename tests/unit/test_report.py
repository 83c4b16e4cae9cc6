"""History in the catalog and the report builder, on synthetic samples (no Ray)."""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timedelta, timezone

import pytest

from rayflow._internal import history, skew
from rayflow._internal.checkpoint.catalog import Catalog, read_history
from rayflow._internal.report import build_report, skew_figures, write_report
from rayflow.errors import CheckpointError

T0 = datetime(2026, 11, 1, 12, 0, 0)


def status(n: int, step: int, *, hot: int = 0, event_time: bool = True) -> dict:
    """A manager status (with lag added) after ``step`` samples: partition ``hot`` runs 3x."""
    parts = []
    for p in range(n):
        rate = 3000 if p == hot else 1000
        parts.append(
            {
                "partition": p, "owner": f"consumer-{p % 2}", "lease_epoch": 1 + (step > 5),
                "processed_rows": rate * 5 * step, "committed_rows": rate * 5 * max(0, step - 1),
                "load_rows_per_s": float(rate), "lag_rows": 100 * p, "lag_s": 0.1 * p,
                "watermark_ms": 1_700_000_000_000 + step * 5000 if event_time else None,
                "event_time_lag_s": 2.0 + p / 10 if event_time else None,
            }
        )  # fmt: skip
    return {"partitions": parts}


def sources(n: int) -> list[dict]:
    return [{"queued_bytes": [1000] * n}, {"queued_bytes": [500] * n, "spilled_bytes": [7] * n}]


def events(cat: Catalog, *kinds: str) -> None:
    """Events of these kinds, one a sample apart from the second sample on."""
    rows = [
        [T0 + timedelta(seconds=5 * i + 7), k, json.dumps({"member": "consumer-1"})]
        for i, k in enumerate(kinds)
    ]
    cat.con.cursor().executemany("INSERT INTO events VALUES (?, ?, ?)", rows)


def fill(cat: Catalog, n: int, steps: int, *, event_time: bool = True) -> None:
    """``steps`` samples 5 s apart, two consumers, a commit per partition and sample."""
    clocks: dict = {}
    for step in range(steps):
        ts = T0 + timedelta(seconds=5 * step)
        tally = history.CommitTally()
        for p in range(n):
            tally.add(p, rows=5000, nbytes=2**20, write_s=0.02, record_s=0.005 * (1 + (step == 3)))
        parts = history.partition_rows(
            status(n, step, event_time=event_time), sources(n), tally.take(), ts=ts
        )
        consumers = {
            f"consumer-{i}": {"busy_s": 2.5 * step, "commit_s": 0.5 * step, "rows_processed": 10 * step,
                              "rss_bytes": 300 * 2**20}
            for i in range(2)
        }  # fmt: skip
        rows, clocks = history.consumer_rows(consumers, clocks, ts=ts, now=5.0 * step)
        cat.record_history(parts, rows)


def test_partition_rows_take_lag_bytes_and_commits():
    tally = history.CommitTally()
    tally.add(0, rows=10, nbytes=100, write_s=0.2, record_s=0.1)
    tally.add(0, rows=5, nbytes=50, write_s=0.05, record_s=0.05)
    (row0, row1) = history.partition_rows(status(2, 3), sources(2), tally.take(), ts=T0)
    got = dict(zip([c for c, _ in history.PARTITION_COLUMNS], row0))
    assert got["queued_bytes"] == 1500 and got["spilled_bytes"] == 7
    assert (got["commits"], got["commit_rows"], got["commit_bytes"]) == (2, 15, 150)
    assert got["commit_s_sum"] == pytest.approx(0.4) and got["commit_s_max"] == pytest.approx(0.3)
    assert row1[-5:] == (0, 0, 0, 0.0, 0.0)  # no commit of partition 1
    assert tally.take() == {}  # taken: the next sample starts afresh
    # Sources that did not all answer: lag and bytes unknown, not understated.
    (row0, _) = history.partition_rows(status(2, 3), None, {}, ts=T0)
    got = dict(zip([c for c, _ in history.PARTITION_COLUMNS], row0))
    assert got["lag_rows"] is None and got["queued_bytes"] is None and got["processed_rows"] == 45_000


def test_consumer_fractions_over_the_interval():
    rows, clocks = history.consumer_rows({"c0": {"busy_s": 1.0, "commit_s": 0.0}}, {}, ts=T0, now=10.0)
    assert rows[0][2] is None  # first answer: no interval yet
    rows, clocks = history.consumer_rows(
        {"c0": {"busy_s": 3.0, "commit_s": 0.5, "rss_bytes": 7}}, clocks, ts=T0, now=14.0
    )
    assert rows[0][2:4] == (0.5, 0.125) and rows[0][5] == 7
    # A member that does not answer keeps its clock; one restarted (counters back) has no fraction.
    rows, clocks = history.consumer_rows({}, clocks, ts=T0, now=15.0)
    assert rows == [] and "c0" in clocks
    rows, _ = history.consumer_rows({"c0": {"busy_s": 0.1, "commit_s": 0.0}}, clocks, ts=T0, now=16.0)
    assert rows[0][2] is None


def test_history_survives_reopening_and_is_trimmed(tmp_path):
    path = str(tmp_path / "catalog.duckdb")
    cat = Catalog(path)
    fill(cat, 4, 6)
    cat.close()
    cat = Catalog(path)  # a restarted manager: the samples are in the file
    assert cat.con.execute("SELECT count(*) FROM history_partitions").fetchone()[0] == 24
    assert cat.con.execute("SELECT count(*) FROM history_consumers").fetchone()[0] == 12
    # Recent samples as well (a minute ago): the trim keeps them.
    recent = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(minutes=1)
    parts = history.partition_rows(status(4, 1), sources(4), {}, ts=recent)
    rows, _ = history.consumer_rows({"consumer-0": {"busy_s": 1.0, "commit_s": 0.1}}, {}, ts=recent, now=1.0)
    cat.record_history(parts, rows)
    assert cat.trim_history(retention_s=3600.0) == 36  # T0 is long ago: all older than an hour
    kept = cat.con.execute("SELECT DISTINCT ts FROM history_partitions").fetchall()
    assert kept == [(recent,)]
    assert cat.con.execute("SELECT count(*) FROM history_partitions").fetchone()[0] == 4
    assert cat.con.execute("SELECT count(*), min(ts) FROM history_consumers").fetchone() == (1, recent)
    cat.close()


def test_history_samples_on_a_fixed_cadence_skipping_missed_ticks():
    assert history.next_tick(10.0, 2.0, now=10.3) == 12.0  # a sample that took 0.3 s: no drift
    assert history.next_tick(12.0, 2.0, now=13.9) == 14.0
    assert history.next_tick(14.0, 2.0, now=14.0) == 16.0
    assert history.next_tick(14.0, 2.0, now=16.0) == 18.0  # due exactly now: the next one
    assert history.next_tick(14.0, 2.0, now=21.5) == 22.0  # 16, 18 and 20 were missed: skipped


def test_read_history_rates_buckets_and_events(tmp_path):
    path = str(tmp_path / "catalog.duckdb")
    cat = Catalog(path)
    fill(cat, 3, 10)
    events(cat, "crash")
    cat.record_events([("join", {})])  # now: long after the samples, still shown
    cat.close()  # read_history reads a copy: also while the file is held
    hist = read_history(path)
    parts = hist["partitions"].to_pylist()
    assert len(parts) == 30 and hist["info"]["samples"] == 10
    p0 = [r for r in parts if r["partition"] == 0]
    assert p0[0]["rows_per_s"] is None and p0[1]["rows_per_s"] == pytest.approx(3000)
    assert hist["events"].column("kind").to_pylist() == ["crash", "join"]
    # Fewer points than samples: buckets average them, rates stay rates.
    small = read_history(path, max_points=4)
    assert small["info"]["bucket_s"] == pytest.approx(15) and small["partitions"].num_rows == 3 * 4
    rates = [r["rows_per_s"] for r in small["partitions"].to_pylist() if r["partition"] == 1]
    # Four buckets (not one: an empty tail would make the check below hold vacuously).
    assert len(rates) == 4 and rates[0] is None and all(r == pytest.approx(1000) for r in rates[1:])


def test_skew_names_the_hot_partition():
    parts = [
        {"ts": T0 + timedelta(seconds=5 * i), "partition": p, "rows_delta": (3000 if p == 2 else 1000) * 5,
         "rows_per_s": 3000.0 if p == 2 else 1000.0}
        for i in range(4) for p in range(4)
    ]  # fmt: skip
    hottest, xs, ys = skew_figures(parts)
    assert hottest[0][0] == 2 and hottest[0][1] == pytest.approx(2.0)  # 3000 / mean 1500
    assert ys == [pytest.approx(2.0)] * 4 and len(xs) == 4


def _figure(page: str, div_id: str) -> dict:
    """The figure plotly.js is given for ``div_id`` (its ``data`` and ``layout``)."""
    m = re.search(r'Plotly\.newPlot\(\s*"' + div_id + r'",\s*', page)
    assert m, f"no figure {div_id}"
    decode = json.JSONDecoder().raw_decode
    data, end = decode(page, m.end())
    layout, _ = decode(page, re.compile(r",\s*").match(page, end).end())
    return {"data": data, "layout": layout}


@pytest.mark.parametrize("n", [4, 16])
def test_report_is_self_contained_with_every_plot(tmp_path, n):
    path = str(tmp_path / "catalog.duckdb")
    cat = Catalog(path)
    fill(cat, n, 12, event_time=n == 16)
    events(cat, "rebalance", "crash", "split")
    cat.close()
    out = write_report(str(tmp_path), str(tmp_path / "report.html"), name="synthetic")
    page = open(out, encoding="utf-8").read()
    # Offline: plotly.js inlined, no script or stylesheet fetched from anywhere.
    assert "Plotly.newPlot" in page and len(page) > 3_000_000
    assert not re.search(r'<(script|link)[^>]+(src|href)="(https?:)?//', page)
    timeline = _figure(page, "timeline")
    types = [t["type"] for t in timeline["data"]]
    assert types.count("heatmap") == (2 if n == 16 else 0)  # throughput and lag per partition
    names = {t.get("name") for t in timeline["data"]}
    assert {"all partitions", "commit, mean", "commit, longest", "consumer-0"} <= names
    assert {"event: rebalance", "event: crash", "event: split"} <= names  # any kind is a mark
    assert any(s["type"] == "line" for s in timeline["layout"]["shapes"])  # the crash, across plots
    annotations = " ".join(a["text"] for a in timeline["layout"]["annotations"])
    assert ("no event time" in annotations) == (n == 4)
    skew = _figure(page, "skew")
    assert skew["data"][0]["x"][0] == "p0"  # the hot partition of the synthetic samples
    assert "Hottest keys: none sampled" in page  # fill() records no sketch rows


def test_report_lists_the_last_samples_hottest_keys(tmp_path):
    def sample(whale: str, whale_rows: int) -> dict:
        """A status with skew added: partition 2 holds the whale, the others a key at 10%."""
        st = status(4, 3)
        for part in st["partitions"]:
            k = whale if part["partition"] == 2 else f"k{part['partition']}"
            n = whale_rows if part["partition"] == 2 else 100
            part.update(rate_ratio=1.0, input_rows=1000)
            part["hot_keys"] = [{"key": k, "hash": 7, "count": n, "share": n / 10_000, "error_rows": 2.0}]
        return st

    path = str(tmp_path / "catalog.duckdb")
    cat = Catalog(path)
    # An earlier sample's hot key is not the last one's.
    for ts, st in (
        (T0, sample("stale-whale-key", 9_000)),
        (T0 + timedelta(seconds=15), sample("whale", 4_500)),
    ):
        sk, hot = skew.history_rows(st, ts=ts)
        cat.record_history([], [], others={"history_skew": sk, "history_hot_keys": hot})
    cat.close()
    hist = read_history(path)
    hot = hist["hot_keys"].to_pylist()
    assert [r["key"] for r in hot] == ["whale", "k0", "k1", "k3"]  # hottest first, the last sample's
    assert hot[0]["partition"] == 2 and hot[0]["share"] == pytest.approx(0.45)
    page = build_report(hist, name="hot")
    assert "Hottest keys, at the last sample" in page
    assert "<td>p2</td><td>whale</td><td>45.0%</td><td>4,500</td>" in page
    assert "stale-whale-key" not in page


def test_report_of_a_job_without_history(tmp_path):
    Catalog(str(tmp_path / "catalog.duckdb")).close()
    page = build_report(read_history(str(tmp_path / "catalog.duckdb")), name="empty")
    assert "No history samples yet" in page and "Plotly.newPlot" in page


def test_cli_report_picks_one_job_and_says_which_to_pick(tmp_path, capsys):
    from rayflow.cli import main

    for name in ("a", "b"):
        os.makedirs(tmp_path / name)
        cat = Catalog(str(tmp_path / name / "catalog.duckdb"))
        fill(cat, 2, 3)
        cat.close()
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r.html")]) == 2
    assert "holds several jobs (a, b): pick one with --name" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--name", "b", "-o", str(tmp_path / "r.html")]) == 0
    assert "rayflow report: b" in (tmp_path / "r.html").read_text(encoding="utf-8")
    with pytest.raises(CheckpointError, match="no catalog at"):
        write_report(str(tmp_path), str(tmp_path / "x.html"))


def test_a_gather_cancelled_at_close_logs_nothing():
    """The manager's loops gather answers under ``asyncio.wait_for``; ``close`` cancels them.
    ``asyncio.gather`` would then log "_GatheringFuture exception was never retrieved"."""
    import asyncio
    import gc
    import logging

    from rayflow._internal.group.manager import _gather

    class Slow:
        def __await__(self):
            return asyncio.sleep(10).__await__()

    async def sample(gather) -> None:
        await asyncio.wait_for(gather(Slow(), Slow()), 5)

    async def cancel_one(gather) -> None:
        task = asyncio.get_running_loop().create_task(sample(gather))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        del task
        gc.collect()

    logged = []
    handler = logging.Handler()
    handler.emit = logged.append
    logging.getLogger("asyncio").addHandler(handler)
    try:
        asyncio.run(cancel_one(asyncio.gather))
        gc.collect()
        assert any("never retrieved" in r.getMessage() for r in logged)  # the problem, as asyncio has it
        logged.clear()
        asyncio.run(cancel_one(_gather))
        gc.collect()
        assert logged == []
    finally:
        logging.getLogger("asyncio").removeHandler(handler)
