"""The live table of ``rayflow status NAME [--watch]`` (pure: no Ray, no I/O).

A status comes from the manager (``GroupManager.status``) and the source actors' stats
(``SourceActor.stats``); :func:`combine` folds the sources' per-partition figures in and adds
the lag (:func:`rayflow._internal.lag.add_lag`, the same figures as ``Run.status()`` and the
Prometheus gauges). :func:`track_progress` remembers, across refreshes, when each partition last
made progress; :func:`stall_reason` says whether a partition is stalled; :func:`render` draws the
table.

**Stalled**, precisely: a partition that is not final is stalled when

- *rows wait* (``lag_rows > 0``) and, for longer than ``stall_after_s`` (:func:`stall_after_s`:
  :data:`STALL_INTERVALS` checkpoint intervals, at least :data:`STALL_MIN_S`), the rows have
  not been committed. The age of the last commit alone does not say that: an idle partition
  (no lag) needs no commit, so when new rows reach it its last commit is already old. Hence:

  - one look (``rayflow status NAME``; also every frame of a watch): the last commit is older
    than the threshold *and* nothing was processed since it (``processed_rows ==
    committed_rows``): the waiting rows are not being taken at all (a consumer stuck or gone,
    a partition without an owner). A healthy partition that just got rows after being idle
    processes them within a heartbeat (``heartbeat_interval_s``), so it is at most that long
    in this state. Not seen in one look: a partition that processed rows and then stopped
    before committing them (its count is ahead of its commit either way), which the watch
    catches;
  - watch mode (``--watch``, :func:`track_progress` remembers when each partition's lag was
    first seen > 0): lag > 0 on every look for longer than the threshold and no commit in that
    time (``min(last_commit_age_s, time lagging)``; lag counts uncommitted rows, so it cannot
    fall to 0 between looks without a commit); or its processed rows have not moved for longer
    than the threshold while lagging (``no progress``: also a partition that never committed).
    A watch measures from its first look, so a partition lagging when it starts is judged by
    the one-look rule until the threshold has passed;

- or *the lag is unknown* (the source actors did not answer) and its last commit is older than
  the threshold: said as "sources not answering", since the rows waiting cannot be known.

An idle partition (no lag) is never stalled, however old its last commit: an unbounded input
that brings nothing needs no commit. Caveat: a partition waiting on a single very slow step (one
fetch that takes longer than the threshold) looks stalled until the step ends.
"""

from __future__ import annotations

from collections.abc import Mapping

from rayflow._internal.lag import add_lag

#: Checkpoint intervals without a commit, while rows wait, after which a partition is stalled: a
#: healthy partition with lag commits every interval; five missed in a row is no scheduling
#: hiccup (a commit retry backs off at most 5 s, ``COMMIT_RETRY_MAX_S``).
STALL_INTERVALS = 5
#: The threshold never goes below this many seconds: a consumer presumed dead is replaced after
#: ``SESSION_TIMEOUT_S`` (10 s), and a partition being moved is not stalled.
STALL_MIN_S = 10.0
#: The checkpoint interval assumed when the manager's status does not say (the engine default).
DEFAULT_CHECKPOINT_INTERVAL_S = 2.0

_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen
_RED = "\x1b[1;31m"
_RESET = "\x1b[0m"


def stall_after_s(checkpoint_interval_s: float | None) -> float:
    """Seconds without a commit (or without progress), while rows wait, that make a partition
    stalled: ``max(STALL_INTERVALS * checkpoint_interval_s, STALL_MIN_S)``."""
    interval = checkpoint_interval_s or DEFAULT_CHECKPOINT_INTERVAL_S
    return max(STALL_INTERVALS * interval, STALL_MIN_S)


def combine(st: dict, sources: list[dict] | None, *, wall: float) -> dict:
    """Fold the source actors' stats into the manager's status ``st`` and add the lag (in
    place; returns ``st``). Per partition ``queued_rows``, ``queued_bytes``, ``blocked_s`` and,
    where the sources report it, ``spilled_bytes``, summed over the sources; a figure the
    manager already gives is kept. ``sources`` None (they could not be asked): the lag figures
    are None, never a made-up 0."""
    parts = st["partitions"]
    if sources is None:
        for part in parts:
            part.setdefault("lag_rows", None)
            part.setdefault("lag_s", None)
            part.setdefault("rate_rows_per_s", part.get("load_rows_per_s"))
            at = part.get("last_commit_at")
            part.setdefault("last_commit_age_s", max(0.0, wall - at) if at is not None else None)
        commits = [p["last_commit_at"] for p in parts if p.get("last_commit_at") is not None]
        st.setdefault("lag_rows", None)
        st.setdefault("lag_s", None)
        st.setdefault("rate_rows_per_s", sum(p.get("load_rows_per_s", 0.0) for p in parts))
        st.setdefault("last_commit_at", max(commits) if commits else None)
        at = st["last_commit_at"]
        st.setdefault("last_commit_age_s", max(0.0, wall - at) if at is not None else None)
        return st
    for part in parts:
        i = part["partition"]
        for key in ("queued_rows", "queued_bytes", "blocked_s", "spilled_bytes"):
            per_source = [s[key][i] for s in sources if key in s and i < len(s[key])]
            if per_source and key not in part:
                part[key] = sum(per_source)
    add_lag(st, sources, wall=wall)
    # A dynamic source (a watched directory, a Kafka topic) that cannot list its splits keeps
    # reading what it has; only its stats say so (runbook: Kafka unreachable).
    st["discovery_errors"] = sorted({s["discovery_error"] for s in sources if s.get("discovery_error")})
    return st


def track_progress(seen: Mapping[int, tuple], st: dict, *, now: float) -> dict[int, tuple]:
    """When each partition last made progress, and since when it lags (pure): ``seen`` maps a
    partition to ``(processed_rows, rows_since, lag_since)``: its processed rows and the time
    (s, any clock) they were first seen at that count; the time its lag was first seen > 0 in
    the current run of looks with lag (None: no lag at the last look). Returns the map for this
    status, taken at ``now``. A partition whose count moved (or is new) starts again at
    ``now``; a lag of 0 clears ``lag_since``; an unknown lag (sources not answering) keeps it."""
    out = {}
    for part in st["partitions"]:
        p, rows, lag = part["partition"], part.get("processed_rows", 0), part.get("lag_rows")
        before = seen.get(p)
        rows_since = before[1] if before is not None and before[0] == rows else now
        lag_before = before[2] if before is not None and len(before) > 2 else None
        if lag is None:
            lag_since = lag_before
        else:
            lag_since = (lag_before if lag_before is not None else now) if lag > 0 else None
        out[p] = (rows, rows_since, lag_since)
    return out


def stall_reason(
    part: Mapping,
    *,
    stall_after_s: float,
    no_progress_s: float | None = None,
    lagging_s: float | None = None,
) -> str | None:
    """Why the partition ``part`` (a partition of a :func:`combine`-d status) is stalled, or
    None when it is not (see the module docstring for the rule). ``no_progress_s``: seconds
    its processed rows have not moved while it lagged; ``lagging_s``: seconds its lag has been
    seen > 0 (both from :func:`track_progress`, watch mode; None: not known, a single look)."""
    if part.get("final"):
        return None
    lag, age = part.get("lag_rows"), part.get("last_commit_age_s")
    if lag is None:  # the sources did not answer: no lag figure, the commit age is all there is
        if age is not None and age > stall_after_s:
            return f"no commit for {age:.0f} s; sources not answering"
        return None
    if not lag:
        return None
    if age is not None and age > stall_after_s:
        idle = part.get("processed_rows") == part.get("committed_rows")  # nothing taken since
        if idle or (lagging_s is not None and lagging_s > stall_after_s):
            return f"no commit for {age:.0f} s"
    if no_progress_s is not None and no_progress_s > stall_after_s:
        return f"no progress for {no_progress_s:.0f} s"
    return None


def _rows(v) -> str:
    return "?" if v is None else f"{int(v):,}"


def _secs(v, none: str = "?") -> str:
    """Seconds; ``none`` stands for None (``?``: unknown; ``-``: not applicable)."""
    return none if v is None else f"{v:.1f}"


def _rate(v) -> str:
    if v is None:
        return "?"
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:.1f}{unit}"
    return f"{v:.0f}"


def _bytes(v) -> str:
    if v is None:
        return "-"
    for div, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if v >= div:
            return f"{v / div:.1f} {unit}"
    return f"{int(v)} B"


def render(
    name: str,
    st: dict,
    *,
    stall_after_s: float,
    progress: Mapping[int, tuple[int, float]] | None = None,
    now: float | None = None,
    color: bool = False,
) -> str:
    """The status table of the pipeline ``name`` as text: a summary line, a totals line, one row
    per partition. ``progress`` and ``now``: from :func:`track_progress` (watch mode; same
    clock). ``color``: ANSI bold red for stalled rows (a terminal); the ``stalled`` column says
    it in words either way. Queued and spilled bytes are shown when the status has them."""
    lines = [
        f"pipeline {name}: members {', '.join(st['members']) or '-'}; rebalances {st['rebalances']}, "
        f"recoveries {st['recoveries']}; {'done' if st['done'] else 'running'}"
    ]
    age = st.get("last_commit_age_s")
    lines.append(
        f"lag {_rows(st.get('lag_rows'))} rows ({_secs(st.get('lag_s'))} s); "
        f"event-time lag {_secs(st.get('event_time_lag_s'), '-')}{'' if st.get('event_time_lag_s') is None else ' s'}; "
        f"{_rate(st.get('rate_rows_per_s'))} rows/s; "
        f"last commit {'never' if age is None else f'{age:.1f} s ago'}"
    )
    skew = skew_line(st)
    if skew:
        lines.append(skew)
    if st.get("failed"):
        lines.append(f"FAILING: {st['failed']}")
    if st.get("publish_failures"):
        lines.append(
            f"publishing outputs failing: {st['publish_failures']} attempt(s), "
            f"{st.get('publish_pending', 0)} pending; last error: {st.get('last_publish_error')}"
        )
    if st.get("maintenance_failures"):
        lines.append(
            f"catalog maintenance failing: {st['maintenance_failures']} time(s); "
            f"last error: {st.get('last_maintenance_error')}"
        )
    for err in st.get("discovery_errors") or []:
        lines.append(f"source cannot list its splits: {err}")
    parts = st["partitions"]
    has_bytes = any("queued_bytes" in p for p in parts)
    has_spill = any("spilled_bytes" in p for p in parts)
    cols = ["partition", "owner", "epoch", "state", "lag rows", "lag s", "evt lag s", "rows/s", "processed"]
    cols += (
        ["last commit"] + (["queued"] if has_bytes else []) + (["spilled"] if has_spill else []) + ["stalled"]
    )
    has_skew = any(p.get("rate_ratio") is not None for p in parts)
    if has_skew:  # input rate over the mean partition's, and the hottest key (docs/skew.md)
        cols[-1:-1] = ["rate x", "hottest key"]
    rows, stalled = [], []
    for p in parts:
        seen = progress.get(p["partition"]) if progress is not None and now is not None else None
        lag_since = seen[2] if seen is not None and len(seen) > 2 else None
        why = stall_reason(
            p,
            stall_after_s=stall_after_s,
            # Progress counts while rows wait: an idle partition has nothing to process.
            no_progress_s=None if seen is None else now - max(seen[1], lag_since or seen[1]),
            lagging_s=None if lag_since is None else now - lag_since,
        )
        commit = p.get("last_commit_age_s")
        row = [
            str(p["partition"]),
            str(p["owner"] or "-"),
            str(p["lease_epoch"]),
            "final" if p.get("final") else str(p["state"]),
            _rows(p.get("lag_rows")),
            _secs(p.get("lag_s")),
            _secs(p.get("event_time_lag_s"), "-"),  # no event time
            _rate(p.get("rate_rows_per_s", p.get("load_rows_per_s"))),
            _rows(p.get("processed_rows")),
            "never" if commit is None else f"{commit:.1f} s ago",
        ]
        row += [_bytes(p.get("queued_bytes"))] if has_bytes else []
        row += [_bytes(p.get("spilled_bytes"))] if has_spill else []
        row += [_ratio(p.get("rate_ratio")), _hot(p.get("hot_keys"))] if has_skew else []
        row.append(f"STALLED: {why}" if why else "-")
        rows.append(row)
        stalled.append(why is not None)
    left = {"owner", "state", "last commit", "stalled", "hottest key"}
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if h in left else c.rjust(w) for c, w, h in zip(cells, widths, cols)
        ).rstrip()

    lines.append(fmt(cols))
    for row, bad in zip(rows, stalled):
        text = fmt(row)
        lines.append(f"{_RED}{text}{_RESET}" if bad and color else text)
    if any(stalled):
        lines.append(
            f"stalled: rows waiting (or lag unknown) and no commit or no progress for over {stall_after_s:.0f} s"
        )
    return "\n".join(lines) + "\n"


def _ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _hot(keys) -> str:
    """A partition's hottest key and its share of the partition's rows."""
    if not keys:
        return "-"
    x = keys[0]
    return f"{_short(x['key'])} {100 * x['share']:.0f}%"


def _short(key, width: int = 24) -> str:
    text = str(key)
    return text if len(text) <= width else text[: width - 1] + "~"


def skew_line(st: dict) -> str | None:
    """The job's skew in one line (None without figures): the largest rate ratio, its
    partition, and the hottest keys with their shares of all rows."""
    if st.get("skew") is None:
        return None
    hot = ", ".join(f"{_short(x['key'])} {100 * x['share']:.1f}%" for x in st.get("hot_keys") or [])
    window = st.get("skew_window_s")
    over = f" over the last {window:.0f} s" if window is not None else ""
    return (
        f"skew {st['skew']:.2f}x (partition {st['hot_partition']}, input rate over the mean{over}); "
        f"hot keys: {hot or '-'}"
    )


def frame(text: str, *, tty: bool, stamp: str) -> str:
    """One refresh of ``--watch``: on a terminal the screen is cleared and redrawn in place; else
    (a pipe, a log) each table follows the last, after a line with the time ``stamp``."""
    if tty:
        return f"{_CLEAR}{stamp}\n{text}"
    return f"--- {stamp}\n{text}\n"
