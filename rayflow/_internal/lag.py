"""Lag, rate and freshness of a running job, from the manager's status and the sources' stats
(pure). Used by ``Run.status()`` (the driver) and the manager's Prometheus metrics, so both show
the same figures."""

from __future__ import annotations

from rayflow._internal.skew import add_skew


def add_lag(st: dict, sources: list[dict], *, wall: float) -> None:
    """Add lag figures to a status (``st`` from the manager, ``sources`` the source actors'
    stats, ``wall`` the time now, s since the epoch; pure, in place). DESIGN §7 and §11: for an unbounded input, rate and lag, not a
    percentage.

    Lag follows Kafka's consumer lag: rows the input holds that are not yet
    *committed* (results appear with commits). Per partition:

    - ``lag_rows``: its queued rows (read, not committed; in memory or spilled) plus its share of the
      rows available at the sources but not read yet (``Split.available``);
      shares are the rows routed to each partition so far (uniform before any).
    - ``rate_rows_per_s``: its processing rate (smoothed, from heartbeats).
    - ``lag_s``: how far behind the head of the input it is, in time:
      ``lag_rows`` over its share of the arrival rate (the growth of
      ``available``); over its processing rate where no split reports
      ``available``, or nothing arrives. ``None`` when neither is known.
      Caveat: an estimate; for a backlog that is being caught up, it is the
      age of the backlog, not the time to drain it.
    - ``last_commit_at`` (wall time, s since the epoch) and ``last_commit_age_s``
      (``None``: never committed).

    Overall: ``lag_rows`` (sum), ``lag_s`` (the largest), ``rate_rows_per_s``
    (sum), ``arrival_rows_per_s`` (None: unknown), ``unread_rows``,
    ``last_commit_at`` / ``last_commit_age_s`` (the latest of any partition).

    And the skew figures (``skew.add_skew``: ``rate_ratio`` and ``hot_keys`` per partition,
    ``skew``, ``hot_partition``, ``hot_keys`` overall).
    """
    parts = st["partitions"]
    n = max(1, len(parts))
    routed = [sum(s.get("routed_rows", [0] * n)[p["partition"]] for s in sources) for p in parts]
    total_routed = sum(routed)
    unread = sum(s.get("unread_rows", 0) for s in sources)
    known = [s["arrival_rows_per_s"] for s in sources if s.get("arrival_rows_per_s") is not None]
    arrival = sum(known) if known else None
    for part, routed_p in zip(parts, routed):
        share = routed_p / total_routed if total_routed else 1.0 / n
        lag = int(part.get("queued_rows", 0) + round(share * unread))
        rate = float(part.get("load_rows_per_s", 0.0))
        flow = share * arrival if arrival else 0.0
        flow = flow if flow > 0 else rate
        part["lag_rows"] = lag
        part["rate_rows_per_s"] = rate
        part["lag_s"] = 0.0 if lag == 0 else (lag / flow if flow > 0 else None)
        at = part.get("last_commit_at")
        part["last_commit_age_s"] = max(0.0, wall - at) if at is not None else None
    lags = [p["lag_s"] for p in parts if p["lag_s"] is not None]
    commits = [p["last_commit_at"] for p in parts if p.get("last_commit_at") is not None]
    st["lag_rows"] = sum(p["lag_rows"] for p in parts)
    st["lag_s"] = max(lags) if lags else None
    st["rate_rows_per_s"] = sum(p["rate_rows_per_s"] for p in parts)
    st["arrival_rows_per_s"] = arrival
    st["unread_rows"] = unread
    st["last_commit_at"] = max(commits) if commits else None
    st["last_commit_age_s"] = max(0.0, wall - st["last_commit_at"]) if commits else None
    add_skew(st, sources)
