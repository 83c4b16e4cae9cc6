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
    return {"final": False, "lag_rows": lag_rows, "last_commit_age_s": age_s, **kw}


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


def test_unknown_lag_is_not_stalled():
    assert sv.stall_reason(lagging(1e6, lag_rows=None), stall_after_s=10.0) is None


def test_a_final_partition_is_never_stalled():
    assert sv.stall_reason(lagging(1e6, final=True), stall_after_s=10.0) is None


def test_never_committed_and_no_progress_is_stalled_only_once_seen_long_enough():
    part = lagging(None)
    assert sv.stall_reason(part, stall_after_s=10.0) is None  # one look: unknown
    assert sv.stall_reason(part, stall_after_s=10.0, no_progress_s=5.0) is None
    assert sv.stall_reason(part, stall_after_s=10.0, no_progress_s=12.0) == "no progress for 12 s"


# ------------------------------------------------------------------------------------ progress
def test_progress_restarts_when_the_rows_move_and_holds_while_they_do_not():
    st = status(processed_rows=10)
    seen = sv.track_progress({}, st, now=1.0)
    assert seen == {0: (10, 1.0)}
    seen = sv.track_progress(seen, st, now=5.0)
    assert seen == {0: (10, 1.0)}  # unchanged since 1.0
    seen = sv.track_progress(seen, status(processed_rows=11), now=7.0)
    assert seen == {0: (11, 7.0)}


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
    assert "lag ? rows" in sv.render("job", st, stall_after_s=10.0)


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
    st = sv.combine(status(), [source((50,))], wall=160.0)  # committed 60 s ago, 50 rows waiting
    plain = sv.render("job", st, stall_after_s=10.0)
    assert "STALLED: no commit for 60 s" in plain and "\x1b[" not in plain
    assert "stalled: lag > 0 and no commit or no progress for over 10 s" in plain
    colored = sv.render("job", st, stall_after_s=10.0, color=True)
    assert "\x1b[1;31m" in colored and "STALLED" in colored


def test_no_progress_needs_the_watch_history():
    st = sv.combine(status(last_commit_at=None), [source((50,))], wall=160.0)
    assert "STALLED" not in sv.render("job", st, stall_after_s=10.0)
    seen = {0: (1_000, 0.0)}  # the same processed rows since t=0
    text = sv.render("job", st, stall_after_s=10.0, progress=seen, now=30.0)
    assert "STALLED: no progress for 30 s" in text and "never" in text


def test_a_watch_frame_redraws_in_place_on_a_terminal_and_appends_otherwise():
    assert sv.frame("T\n", tty=True, stamp="12:00:00") == "\x1b[H\x1b[2J12:00:00\nT\n"
    assert sv.frame("T\n", tty=False, stamp="12:00:00") == "--- 12:00:00\nT\n\n"


def test_watch_period_must_be_positive(capsys):
    assert main(["status", "job", "--watch", "0"]) == 2
    assert "--watch takes a refresh period in seconds > 0" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        from rayflow.cli import cmd_status

        cmd_status(type("A", (), {"watch": -1.0, "address": None, "name": "job"})())


def test_health_lines_show_failing_publication_maintenance_and_discovery():
    st = status()
    st.update(publish_failures=3, publish_pending=2, last_publish_error="OSError: disk full")
    st.update(maintenance_failures=1, last_maintenance_error="retire: OSError: gone")
    sv.combine(st, [source((0,), discovery_error="BrokerUnreachableError: no broker")], wall=110.0)
    text = sv.render("job", st, stall_after_s=10.0)
    assert "publishing outputs failing: 3 attempt(s), 2 pending; last error: OSError: disk full" in text
    assert "catalog maintenance failing: 1 time(s); last error: retire: OSError: gone" in text
    assert "source cannot list its splits: BrokerUnreachableError: no broker" in text
