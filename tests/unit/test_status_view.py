"""The ``rayflow status`` table without Ray: lag folded in from the sources' stats, the stalled
rule case by case, progress tracked across refreshes, the table and the ``--watch`` frames."""

from __future__ import annotations

import pytest

from rayflow._internal import status_view as sv
from rayflow.cli import main
from rayflow.errors import ConfigError


def status(**part) -> dict:
    """A manager status of one partition (``part`` overrides its fields)."""
    p = {
        "partition": 0,
        "owner": "consumer-0",
        "lease_epoch": 3,
        "state": "stable",
        "processed_rows": 1_000,
        "committed_rows": 900,
        "final": False,
        "load_rows_per_s": 500.0,
        "last_commit_at": 100.0,
        "watermark_ms": None,
        "event_time_lag_s": None,
        "operators": {},
        **part,
    }
    return {
        "partitions": [p],
        "members": ["consumer-0"],
        "rebalances": 1,
        "recoveries": 0,
        "done": False,
        "failed": None,
        "event_time_lag_s": None,
    }


def source(queued_rows=(40,), **kw) -> dict:
    n = len(queued_rows)
    return {
        "queued_rows": list(queued_rows),
        "queued_bytes": [r * 10 for r in queued_rows],
        "blocked_s": [0.0] * n,
        "routed_rows": [1] * n,
        "unread_rows": 0,
        "arrival_rows_per_s": None,
        **kw,
    }


def lagging(age_s: float, lag_rows: int = 5, **kw) -> dict:
    """A partition ``age_s`` after its last commit with ``lag_rows`` waiting, none of them
    processed since (``processed_rows == committed_rows``) unless ``kw`` says otherwise."""
    return {
        "final": False,
        "lag_rows": lag_rows,
        "last_commit_age_s": age_s,
        "processed_rows": 100,
        "committed_rows": 100,
        **kw,
    }


# ------------------------------------------------------------------------------------ the rule
def test_stall_after_is_five_checkpoint_intervals_and_never_under_ten_seconds():
    assert sv.stall_after_s(2.0) == 10.0
    assert sv.stall_after_s(6.0) == 30.0
    assert sv.stall_after_s(0.2) == sv.STALL_MIN_S
    assert sv.stall_after_s(None) == sv.stall_after_s(sv.DEFAULT_CHECKPOINT_INTERVAL_S)


def test_lag_and_an_old_commit_is_stalled():
    assert sv.stall_reason(lagging(11.0), stall_after_s=10.0) == "no commit for 11 s"


def test_lag_and_a_recent_commit_is_not_stalled():
    assert sv.stall_reason(lagging(9.0), stall_after_s=10.0) is None


def test_no_lag_is_never_stalled_however_old_the_commit():
    assert sv.stall_reason(lagging(1e6, lag_rows=0), stall_after_s=10.0) is None


def test_unknown_lag_and_an_old_commit_is_stalled_for_sources_not_answering():
    why = sv.stall_reason(lagging(11.0, lag_rows=None), stall_after_s=10.0)
    assert why == "no commit for 11 s; sources not answering"
    assert sv.stall_reason(lagging(9.0, lag_rows=None), stall_after_s=10.0) is None
    assert sv.stall_reason(lagging(None, lag_rows=None), stall_after_s=10.0) is None
    assert sv.stall_reason(lagging(1e6, lag_rows=None, final=True), stall_after_s=10.0) is None


def test_one_look_an_idle_partition_that_just_got_rows_is_not_stalled():
    """Idle for a minute (no commit needed), then rows arrive and are being processed: its last
    commit is old, but it has taken rows since (processed ahead of committed)."""
    fresh = lagging(60.0, processed_rows=130, committed_rows=100)
    assert sv.stall_reason(fresh, stall_after_s=10.0) is None
    # The same partition taking nothing since its commit a minute ago: stuck, or no owner.
    assert sv.stall_reason(lagging(60.0), stall_after_s=10.0) == "no commit for 60 s"


def test_watch_measures_a_missing_commit_from_when_the_lag_began():
    """An idle partition gets rows at t=100 (its last commit at t=40): in watch mode it is
    stalled only once rows have waited past the threshold without a commit."""
    idle = status(processed_rows=100, committed_rows=100, last_commit_at=40.0, lag_rows=0)
    seen = sv.track_progress({}, idle, now=90.0)
    assert seen == {0: (100, 90.0, None)}
    busy = status(processed_rows=130, committed_rows=100, last_commit_at=40.0, lag_rows=30)
    seen = sv.track_progress(seen, busy, now=100.0)
    assert seen == {0: (130, 100.0, 100.0)}
    for now, stalled in ((105.0, False), (109.0, False), (115.0, True)):
        seen = sv.track_progress(seen, busy, now=now)
        st = sv.combine(status(**{**busy["partitions"][0], "lag_rows": 30}), [source((30,))], wall=now)
        text = sv.render("job", st, stall_after_s=10.0, progress=seen, now=now)
        assert ("STALLED" in text) == stalled, (now, text)
    assert "STALLED: no commit for 75 s" in text
    # A commit, with rows still waiting (and being processed): the wait starts again from it.
    later = {**busy["partitions"][0], "last_commit_at": 114.0, "committed_rows": 130, "processed_rows": 160}
    st = sv.combine(status(**later), [source((30,))], wall=116.0)
    seen = sv.track_progress(seen, st, now=116.0)
    assert "STALLED" not in sv.render("job", st, stall_after_s=10.0, progress=seen, now=116.0)


def test_a_final_partition_is_never_stalled():
    assert sv.stall_reason(lagging(1e6, final=True), stall_after_s=10.0) is None


def test_never_committed_and_no_progress_is_stalled_only_once_seen_long_enough():
    part = lagging(None, processed_rows=0, committed_rows=0)
    assert sv.stall_reason(part, stall_after_s=10.0) is None  # one look: unknown
    assert sv.stall_reason(part, stall_after_s=10.0, no_progress_s=5.0) is None
    assert sv.stall_reason(part, stall_after_s=10.0, no_progress_s=12.0) == "no progress for 12 s"


# ------------------------------------------------------------------------------------ progress
def test_progress_restarts_when_the_rows_move_and_holds_while_they_do_not():
    st = status(processed_rows=10, lag_rows=3)
    seen = sv.track_progress({}, st, now=1.0)
    assert seen == {0: (10, 1.0, 1.0)}
    seen = sv.track_progress(seen, st, now=5.0)
    assert seen == {0: (10, 1.0, 1.0)}  # unchanged since 1.0
    seen = sv.track_progress(seen, status(processed_rows=11, lag_rows=None), now=7.0)
    assert seen == {0: (11, 7.0, 1.0)}  # an unknown lag keeps when the lag began
    seen = sv.track_progress(seen, status(processed_rows=11, lag_rows=0), now=8.0)
    assert seen == {0: (11, 7.0, None)}


# ------------------------------------------------------------------------------------ combine
def test_combine_sums_the_sources_figures_and_adds_lag():
    st = sv.combine(status(), [source((40,)), source((2,), spilled_bytes=[4096])], wall=110.0)
    (p,) = st["partitions"]
    assert p["queued_rows"] == 42 and p["queued_bytes"] == 420 and p["spilled_bytes"] == 4096
    assert p["lag_rows"] == 42 and p["last_commit_age_s"] == 10.0
    assert st["lag_rows"] == 42


def test_combine_keeps_figures_the_manager_gives():
    st = sv.combine(status(spilled_bytes=7), [source((1,), spilled_bytes=[4096])], wall=110.0)
    assert st["partitions"][0]["spilled_bytes"] == 7


def test_combine_without_sources_leaves_lag_unknown():
    st = sv.combine(status(), None, wall=110.0)
    (p,) = st["partitions"]
    assert p["lag_rows"] is None and p["lag_s"] is None and st["lag_rows"] is None
    assert p["last_commit_age_s"] == 10.0
    assert st["last_commit_at"] == 100.0 and st["last_commit_age_s"] == 10.0
    text = sv.render("job", st, stall_after_s=10.0)
    assert "lag ? rows" in text and "last commit 10.0 s ago" in text and "STALLED" not in text


def test_without_sources_an_old_commit_is_marked_as_sources_not_answering():
    st = sv.combine(status(), None, wall=111.0)  # committed 11 s ago; the sources did not answer
    text = sv.render("job", st, stall_after_s=10.0)
    assert "last commit 11.0 s ago" in text and "last commit never" not in text
    assert "STALLED: no commit for 11 s; sources not answering" in text


# ------------------------------------------------------------------------------------ the table
def test_the_table_shows_lag_owner_epoch_rate_and_commit_age():
    st = sv.combine(status(event_time_lag_s=1.25), [source((1_234,))], wall=103.5)
    text = sv.render("job", st, stall_after_s=10.0)
    head, totals, cols, row = text.splitlines()
    assert head == "pipeline job: members consumer-0; rebalances 1, recoveries 0; running"
    assert totals.startswith("lag 1,234 rows")
    assert cols.split()[:5] == ["partition", "owner", "epoch", "state", "lag"]
    assert "queued" in cols and "spilled" not in cols  # no source reports spilled bytes
    cells = row.split()
    assert cells[:5] == ["0", "consumer-0", "3", "stable", "1,234"]
    assert "1.2" in cells and "500" in cells and "3.5 s ago" in row and "12.1 KiB" in row
    assert row.rstrip().endswith("-")  # not stalled
    assert "\x1b[" not in text


def test_a_stalled_row_says_why_and_is_red_on_a_terminal():
    # Committed 60 s ago, 50 rows waiting, none processed since.
    st = sv.combine(status(processed_rows=900), [source((50,))], wall=160.0)
    plain = sv.render("job", st, stall_after_s=10.0)
    assert "STALLED: no commit for 60 s" in plain and "\x1b[" not in plain
    assert "stalled: rows waiting (or lag unknown) and no commit or no progress for over 10 s" in plain
    colored = sv.render("job", st, stall_after_s=10.0, color=True)
    assert "\x1b[1;31m" in colored and "STALLED" in colored


def test_no_progress_needs_the_watch_history():
    st = sv.combine(status(last_commit_at=None), [source((50,))], wall=160.0)
    assert "STALLED" not in sv.render("job", st, stall_after_s=10.0)
    seen = {0: (1_000, 0.0, 0.0)}  # the same processed rows since t=0, lagging since then
    text = sv.render("job", st, stall_after_s=10.0, progress=seen, now=30.0)
    assert "STALLED: no progress for 30 s" in text and "never" in text


def test_a_watch_frame_redraws_in_place_on_a_terminal_and_appends_otherwise():
    assert sv.frame("T\n", tty=True, stamp="12:00:00") == "\x1b[H\x1b[2J12:00:00\nT\n"
    assert sv.frame("T\n", tty=False, stamp="12:00:00") == "--- 12:00:00\nT\n\n"


def test_watch_period_must_be_positive(capsys):
    assert main(["status", "job", "--watch", "--interval", "0"]) == 2
    assert "--interval takes a refresh period in seconds > 0" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        from rayflow.cli import cmd_status

        cmd_status(type("A", (), {"watch": True, "interval": -1.0, "address": None, "name": "job"})())


def status_args(argv: list[str]):
    """What ``rayflow *argv`` parses to (the status command is not run)."""
    import rayflow.cli as cli

    seen = []
    real = cli.cmd_status
    cli.cmd_status = seen.append
    try:
        cli.main(argv)
    finally:
        cli.cmd_status = real
    (args,) = seen
    return args


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "--watch", "myjob"],
        ["status", "myjob", "--watch"],
        ["status", "--watch", "--interval", "0.5", "myjob"],
        ["status", "--interval", "0.5", "myjob", "--watch"],
    ],
)
def test_watch_is_a_switch_in_any_order(argv):
    args = status_args(argv)
    assert args.name == "myjob" and args.watch is True
    assert args.interval == (0.5 if "--interval" in argv else 2.0)
    once = status_args(["status", "myjob"])
    assert once.watch is False and once.interval == 2.0


def test_health_lines_show_failing_publication_maintenance_and_discovery():
    st = status()
    st.update(publish_failures=3, publish_pending=2, last_publish_error="OSError: disk full")
    st.update(maintenance_failures=1, last_maintenance_error="retire: OSError: gone")
    sv.combine(st, [source((0,), discovery_error="BrokerUnreachableError: no broker")], wall=110.0)
    text = sv.render("job", st, stall_after_s=10.0)
    assert "publishing outputs failing: 3 attempt(s), 2 pending; last error: OSError: disk full" in text
    assert "catalog maintenance failing: 1 time(s); last error: retire: OSError: gone" in text
    assert "source cannot list its splits: BrokerUnreachableError: no broker" in text


def test_the_skew_line_and_columns_come_from_the_sources_summaries():
    """Sources reporting heavy-hitters summaries (``SkewTracker.snapshot``): a skew line names
    the hot partition and keys, and each row shows its rate ratio and hottest key."""
    import numpy as np

    from rayflow._internal.skew import SkewTracker
    from rayflow.partitioning import PartitionMap, hash_key

    st = status()
    st["partitions"].append({**st["partitions"][0], "partition": 1})
    pmap, tracker = PartitionMap.uniform(2), SkewTracker(2)
    keys = np.asarray([7] * 30 + list(range(100, 110)), dtype=np.int64)
    tracker.observe(
        np.asarray([hash_key(int(k)) for k in keys], dtype=np.uint64), pmap.route, keys.__getitem__
    )
    hot = int(pmap.route(np.asarray([hash_key(7)], dtype=np.uint64))[0])
    st = sv.combine(st, [source((0, 0), skew=tracker.snapshot())], wall=110.0)
    text = sv.render("job", st, stall_after_s=10.0)
    line = text.splitlines()[2]
    assert line.startswith(f"skew {st['skew']:.2f}x (partition {hot},") and "hot keys: 7 75.0%" in line
    assert "rate x" in text and "hottest key" in text
    row = text.splitlines()[4 + hot]
    assert f"{st['partitions'][hot]['rate_ratio']:.2f}" in row and " 7 " in row
