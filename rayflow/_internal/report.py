"""``rayflow report``: one self-contained HTML file with plots of a job's history (DESIGN §7).

- :func:`build_report` (pure): the history as :func:`catalog.read_history` returns it
  (Arrow tables) in, the HTML text out.
- :func:`write_report` (the shell): reads a copy of a job's catalog (safe while the
  job runs: its manager holds the live file) and writes the file.

The plots are drawn by plotly (plotly.py builds the figures; plotly.js, inlined
once, draws them), so the file opens offline and fetches nothing. On one time
axis (zooming one plot zooms all): throughput, whole and per partition; lag per
partition in rows; the largest lag in seconds; event-time lag; commit duration;
the consumers' busy fraction and memory; and the events of the catalog
(rebalances, failures, recoveries, splits, scaling: every kind it holds) as
marks, with failures also drawn as lines across every plot. Then skew: the
hottest partitions by rows processed against the mean, and the busiest
partition's rate over the mean through time.

Caveats: the hottest *keys* are not measured (the engine does not count rows per
key yet), and the report says so instead of guessing. Throughput is the growth
of each partition's processed rows between samples: rows processed again after a
failure (from the last commit) count again. Samples are averaged into at most
``catalog.HISTORY_MAX_POINTS`` time buckets, so a long history shows the largest
lag of each bucket, not every sample.
"""

from __future__ import annotations

import html
import json
import os
from datetime import datetime

from rayflow.errors import CheckpointError

#: From this many partitions on, per-partition plots are heat maps (partitions x time)
#: rather than one line each: past 8 lines, colours no longer tell partitions apart.
HEATMAP_FROM_PARTITIONS = 9
#: Partitions the skew plot lists (the hottest first).
SKEW_TOP = 10
#: Failure events drawn as lines across every plot (the first ones; all are marks in the events row).
FAILURE_LINES_MAX = 200
#: Event kinds drawn as failures (red lines across the plots).
FAILURE_KINDS = ("crash", "expiry")
#: Pixels per row of the timeline.
ROW_PX = 210

_EVENT_COLORS = {
    "crash": "#d62728", "expiry": "#ff7f0e", "rebalance": "#1f77b4", "move": "#2ca02c",
    "join": "#9467bd", "leave": "#8c564b", "release": "#7f7f7f",
}  # fmt: skip


def write_report(job_dir: str, out: str, *, name: str | None = None) -> str:
    """Write the report of the job whose checkpoint directory is ``job_dir`` to ``out``;
    returns ``out``. Works on a finished job and on a running one (reads a copy)."""
    from rayflow._internal.checkpoint.catalog import read_history

    name = name or os.path.basename(os.path.abspath(job_dir))
    path = os.path.join(job_dir, "catalog.duckdb")
    if not os.path.exists(path):
        raise CheckpointError(
            f"no catalog at {path}: give the checkpoint directory of one job (the directory that "
            "holds its catalog.duckdb; `rayflow checkpoints DIR` lists the jobs under DIR)"
        )
    hist = read_history(path)
    text = build_report(hist, name=name)
    tmp = f"{out}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, out)  # a reader (a browser refreshing) never sees half a file
    return out


# ---------------------------------------------------------------------------------- pure part
def build_report(hist: dict, *, name: str, generated_at: datetime | None = None) -> str:
    """The report's HTML: one page, plotly.js inlined, one ``div`` per figure (ids
    ``timeline`` and ``skew``). ``hist``: as ``catalog.read_history`` returns it."""
    import plotly.io as pio
    import plotly.offline

    parts = hist["partitions"].to_pylist()
    consumers = hist["consumers"].to_pylist()
    events = hist["events"].to_pylist()
    info = hist["info"]
    figures = [
        ("timeline", "Over time", _timeline(parts, consumers, events)),
        ("skew", "Skew", _skew(parts)),
    ]
    # No tool bar: it sits on the legend. Dragging zooms (every plot over time at once),
    # double-clicking resets; the page says so.
    config = {"displaylogo": False, "responsive": True, "displayModeBar": False}
    body = [
        f"<h2>{html.escape(title)}</h2>"
        + pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id, config=config)
        + (_hot_keys_table(hist["hot_keys"].to_pylist()) if div_id == "skew" else "")
        for div_id, title, fig in figures
    ]
    return _PAGE.format(
        title=html.escape(f"rayflow report: {name}"),
        plotlyjs=plotly.offline.get_plotlyjs(),
        summary=_summary(name, parts, consumers, events, info, generated_at or datetime.now()),
        latest=_latest_table(parts),
        body="\n".join(body),
    )


def _by(rows: list[dict], key: str) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(r[key], []).append(r)
    return out


def _times(parts: list[dict]) -> list[datetime]:
    return sorted({r["ts"] for r in parts})


def _totals(parts: list[dict], column: str) -> tuple[list[datetime], list[float | None]]:
    """Per bucket, the sum of ``column`` over the partitions that have it (None: none has)."""
    sums: dict[datetime, float | None] = {}
    for r in parts:
        v = r[column]
        if v is not None:
            sums[r["ts"]] = (sums.get(r["ts"]) or 0.0) + v
        else:
            sums.setdefault(r["ts"], None)
    xs = sorted(sums)
    return xs, [sums[x] for x in xs]


def _extreme(rows: list[dict], column: str, fn=max) -> tuple[list[datetime], list[float | None]]:
    """Per bucket, ``fn`` of ``column`` over the rows that have it."""
    values: dict[datetime, list[float]] = {}
    for r in rows:
        values.setdefault(r["ts"], [])
        if r[column] is not None:
            values[r["ts"]].append(r[column])
    xs = sorted(values)
    return xs, [fn(values[x]) if values[x] else None for x in xs]


def _timeline(parts: list[dict], consumers: list[dict], events: list[dict]):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    by_part = _by(parts, "partition")
    many = len(by_part) >= HEATMAP_FROM_PARTITIONS
    stamps = [r["ts"] for r in parts] + [r["ts"] for r in consumers] + [e["ts"] for e in events]
    span = (min(stamps), max(stamps)) if stamps else ()
    titles = [
        "Throughput, all partitions (rows/s)",
        "Throughput per partition (rows/s)" + (": heat map" if many else ""),
        "Lag per partition (rows not yet committed)" + (": heat map" if many else ""),
        "Lag in seconds: the largest partition's (estimate)",
        "Event-time lag (s): now minus the watermark" + (", largest and median" if many else ""),
        "Commit duration (s): mean and longest per interval",
        "Consumers: busy fraction",
        "Consumers: resident memory (MiB)",
        "Events",
    ]
    fig = make_subplots(
        rows=len(titles), cols=1, shared_xaxes=True, subplot_titles=titles, vertical_spacing=0.025
    )
    row = iter(range(1, len(titles) + 1))

    r = next(row)
    xs, ys = _totals(parts, "rows_per_s")
    fig.add_trace(go.Scatter(x=xs, y=ys, name="all partitions", mode="lines", line_color="#1f77b4"), r, 1)

    for column in ("rows_per_s", "lag_rows"):
        r = next(row)
        if many:
            fig.add_trace(_heatmap(parts, column, fig, r), r, 1)
        else:
            for p, rows in sorted(by_part.items()):
                fig.add_trace(
                    go.Scatter(
                        x=[x["ts"] for x in rows], y=[x[column] for x in rows], mode="lines",
                        name=f"partition {p}", legendgroup=f"p{p}", showlegend=column == "rows_per_s",
                        line_color=_color(p),
                    ),
                    r, 1,
                )  # fmt: skip

    r = next(row)
    xs, ys = _extreme(parts, "lag_s")
    fig.add_trace(go.Scatter(x=xs, y=ys, name="lag (s), largest", mode="lines", showlegend=False), r, 1)

    r = next(row)
    if any(x["event_time_lag_s"] is not None for x in parts):
        if many:
            for label, fn in (("largest", max), ("median", _median)):
                xs, ys = _extreme(parts, "event_time_lag_s", fn)
                fig.add_trace(go.Scatter(x=xs, y=ys, name=f"event-time lag, {label}", mode="lines"), r, 1)
        else:
            for p, rows in sorted(by_part.items()):
                fig.add_trace(
                    go.Scatter(
                        x=[x["ts"] for x in rows], y=[x["event_time_lag_s"] for x in rows], mode="lines",
                        name=f"partition {p}", legendgroup=f"p{p}", showlegend=False, line_color=_color(p),
                    ),
                    r, 1,
                )  # fmt: skip
    else:
        _note(fig, r, "no event time in this job (Pipeline(event_time=...) not set)", span=span)

    r = next(row)
    xs, mean, longest, mib = _commit_series(parts)
    if xs:
        hover = [f"{m:.2f} MiB per commit" if m is not None else "" for m in mib]
        fig.add_trace(go.Scatter(x=xs, y=mean, name="commit, mean", mode="lines+markers", text=hover), r, 1)
        fig.add_trace(go.Scatter(x=xs, y=longest, name="commit, longest", mode="lines+markers"), r, 1)
    else:
        _note(fig, r, "no commit recorded in the sampled time", span=span)

    for column, scale in (("busy_fraction", 1.0), ("rss_bytes", 1 / 2**20)):
        r = next(row)
        for i, (member, rows) in enumerate(sorted(_by(consumers, "member").items())):
            fig.add_trace(
                go.Scatter(
                    x=[x["ts"] for x in rows],
                    y=[None if x[column] is None else x[column] * scale for x in rows],
                    mode="lines", name=member, legendgroup=member, showlegend=column == "busy_fraction",
                    line_color=_color(i, dark=True),
                ),
                r, 1,
            )  # fmt: skip
        if not consumers:
            _note(fig, r, "no consumer sampled", span=span)

    r = next(row)
    for kind, rows in sorted(_by(events, "kind").items()):
        fig.add_trace(
            go.Scatter(
                x=[e["ts"] for e in rows], y=[kind] * len(rows), mode="markers", name=f"event: {kind}",
                marker={"size": 9, "symbol": "line-ns-open" if kind == "move" else "diamond",
                        "color": _EVENT_COLORS.get(kind), "line": {"width": 2}},
                text=[_short(e["detail"]) for e in rows], hovertemplate="%{x}<br>%{text}<extra>" + kind + "</extra>",
            ),
            r, 1,
        )  # fmt: skip
    if not events:
        _note(fig, r, "no event recorded", span=span)
    failures = [e for e in events if e["kind"] in FAILURE_KINDS][:FAILURE_LINES_MAX]
    for e in failures:  # across every plot: what a failure did to throughput, lag, commits
        fig.add_shape(
            type="line", xref="x", yref="paper", x0=e["ts"], x1=e["ts"], y0=0, y1=1,
            line={"color": _EVENT_COLORS.get(e["kind"], "#d62728"), "width": 1, "dash": "dot"},
        )  # fmt: skip
    fig.update_xaxes(title_text="time (UTC)", row=len(titles), col=1)
    fig.update_yaxes(rangemode="tozero")
    fig.update_layout(
        height=ROW_PX * len(titles) + 60, margin={"l": 70, "r": 30, "t": 100, "b": 50},
        hovermode="x unified", template="plotly_white",
        legend={"orientation": "h", "x": 0, "y": 1, "yanchor": "top", "yref": "container"},
    )  # fmt: skip
    return fig


def _heatmap(parts: list[dict], column: str, fig, r: int):
    """Partitions x time buckets of ``column``, its colour bar beside its own row."""
    import plotly.graph_objects as go

    xs = _times(parts)
    col = {x: i for i, x in enumerate(xs)}
    ps = sorted({x["partition"] for x in parts})
    row_of = {p: i for i, p in enumerate(ps)}
    z: list[list[float | None]] = [[None] * len(xs) for _ in ps]
    for x in parts:
        z[row_of[x["partition"]]][col[x["ts"]]] = x[column]
    axis = fig.layout["yaxis" if r == 1 else f"yaxis{r}"]
    lo, hi = axis.domain
    return go.Heatmap(
        x=xs, y=[str(p) for p in ps], z=z, colorscale="Viridis", showlegend=False,
        colorbar={"y": (lo + hi) / 2, "len": hi - lo, "thickness": 12},
        hovertemplate="partition %{y}<br>%{x}<br>%{z}<extra></extra>",
    )  # fmt: skip


def _commit_series(parts: list[dict]):
    """Per bucket with commits: mean and longest duration (s), and mean MiB per commit."""
    acc: dict[datetime, list[float]] = {}
    for r in parts:
        n = r["commits"] or 0
        if n:
            a = acc.setdefault(r["ts"], [0, 0.0, 0.0, 0])
            a[0] += n
            a[1] += r["commit_s_sum"] or 0.0
            a[2] = max(a[2], r["commit_s_max"] or 0.0)
            a[3] += r["commit_bytes"] or 0
    xs = sorted(acc)
    return (
        xs,
        [acc[x][1] / acc[x][0] for x in xs],
        [acc[x][2] for x in xs],
        [acc[x][3] / acc[x][0] / 2**20 for x in xs],
    )


def skew_figures(parts: list[dict]) -> tuple[list[tuple[int, float, int]], list[datetime], list[float]]:
    """The hottest partitions ``(partition, ratio to the mean, rows)``, hottest first, and the
    skew through time: per bucket, the busiest partition's rate over the mean rate (buckets where
    nothing was processed are left out)."""
    rows: dict[int, int] = {}
    for r in parts:
        rows[r["partition"]] = rows.get(r["partition"], 0) + (r["rows_delta"] or 0)
    mean = sum(rows.values()) / len(rows) if rows else 0
    hottest = sorted(
        ((p, n / mean if mean else 0.0, n) for p, n in rows.items()), key=lambda t: (-t[1], t[0])
    )[:SKEW_TOP]
    rates: dict[datetime, list[float]] = {}
    for r in parts:
        if r["rows_per_s"] is not None:
            rates.setdefault(r["ts"], []).append(r["rows_per_s"])
    xs = [x for x in sorted(rates) if sum(rates[x]) > 0]
    ys = [max(rates[x]) / (sum(rates[x]) / len(rates[x])) for x in xs]
    return hottest, xs, ys


def _skew(parts: list[dict]):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    hottest, xs, ys = skew_figures(parts)
    fig = make_subplots(
        rows=1, cols=2, column_widths=[0.4, 0.6],
        subplot_titles=[
            f"Hottest partitions: rows processed / mean (top {SKEW_TOP})",
            "Skew over time: busiest partition's rate / mean",
        ],
    )  # fmt: skip
    if hottest:
        fig.add_trace(
            go.Bar(
                x=[f"p{p}" for p, _, _ in hottest], y=[ratio for _, ratio, _ in hottest],
                hovertext=[f"{n:,} rows" for _, _, n in hottest], name="rows / mean", marker_color="#ff7f0e",
            ),
            1, 1,
        )  # fmt: skip
        fig.add_hline(y=1.0, line_dash="dot", line_color="#7f7f7f", row=1, col=1)
    else:
        _note(fig, 1, "no rows processed in the sampled time", col=1)
    if xs:
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="busiest / mean"), 1, 2)
    else:
        _note(fig, 1, "no rates sampled", col=2)
    fig.update_yaxes(rangemode="tozero")
    fig.update_layout(
        height=380, showlegend=False, template="plotly_white", margin={"l": 60, "r": 30, "t": 50, "b": 40}
    )
    return fig


def _note(fig, row: int, text: str, col: int = 1, span: tuple = ()) -> None:
    """Say why a plot is empty, in it (an empty plot and a broken one look alike). ``span``: the
    time range of the other plots: an invisible trace over it, else plotly.js gives the empty
    plot its default range (1970), and every plot sharing its time axis with it."""
    import plotly.graph_objects as go

    fig.add_trace(
        go.Scatter(x=list(span), y=[None] * len(span), mode="lines", showlegend=False, hoverinfo="skip"),
        row, col,
    )  # fmt: skip
    sp = fig.get_subplot(row, col)
    x, y = (a.plotly_name.replace("axis", "") for a in (sp.xaxis, sp.yaxis))  # "xaxis2" -> "x2"
    fig.add_annotation(
        text=text, xref=f"{x} domain", yref=f"{y} domain", x=0.5, y=0.5,
        showarrow=False, font={"color": "#7f7f7f"},
    )  # fmt: skip


def _color(i: int, *, dark: bool = False) -> str:
    """The ``i``-th colour: the same partition (or consumer) has the same colour in every plot."""
    from plotly.colors import qualitative

    palette = qualitative.Dark24 if dark else qualitative.Plotly
    return palette[i % len(palette)]


def _median(values: list[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def _short(detail: str | None, limit: int = 160) -> str:
    if not detail:
        return ""
    try:
        text = json.dumps(json.loads(detail), separators=(", ", ": "))
    except ValueError:
        text = detail
    return html.escape(text if len(text) <= limit else text[: limit - 1] + "…")


def _summary(name, parts, consumers, events, info, generated_at: datetime) -> str:
    first, last = info["first"], info["last"]
    span = f"{first:%Y-%m-%d %H:%M:%S} to {last:%Y-%m-%d %H:%M:%S} UTC" if first else "no samples yet"
    kinds: dict[str, int] = {}
    for e in events:
        kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
    facts = [
        ("job", name),
        ("sampled", span),
        ("samples", _samples(info)),
        ("partitions", str(len({r["partition"] for r in parts}))),
        ("consumers seen", ", ".join(sorted({r["member"] for r in consumers})) or "-"),
        ("commits sampled", f"{sum(r['commits'] or 0 for r in parts):,}"),
        ("events", ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "-"),
        ("generated", f"{generated_at:%Y-%m-%d %H:%M:%S}"),
    ]
    items = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts)
    note = (
        ""
        if first
        else "<p class=note>No history samples yet: the job has not run a sampling interval "
        "(EngineConfig.history_interval_s), or it ran before history existed.</p>"
    )
    return f"<table class=facts>{items}</table>{note}"


def _samples(info: dict) -> str:
    """How many samples, and the buckets they are averaged in when those are wider."""
    n = info["samples"] or 0
    if n < 2:
        return str(n)
    every = (info["last"] - info["first"]).total_seconds() / (n - 1)
    text = f"{n:,}, every {every:.3g} s"
    return text + (
        f" (averaged in {info['bucket_s']:.3g} s buckets)" if info["bucket_s"] > 1.5 * every else ""
    )


def _latest_table(parts: list[dict]) -> str:
    """Each partition's last sampled figures."""
    last: dict[int, dict] = {}
    for r in parts:
        last[r["partition"]] = r
    if not last:
        return ""

    def fmt(v, spec: str = ",") -> str:
        return "-" if v is None else format(v, spec)

    head = ["partition", "owner", "epoch", "processed rows", "lag rows", "lag s", "event-time lag s"]
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(c)}</td>"
            for c in (
                str(p),
                str(r["owner"] or "-"),
                fmt(r["lease_epoch"]),
                fmt(r["processed_rows"]),
                fmt(r["lag_rows"]),
                fmt(r["lag_s"], ".2f"),
                fmt(r["event_time_lag_s"], ".2f"),
            )
        )  # fmt: skip
        + "</tr>"
        for p, r in sorted(last.items())
    )
    return (
        "<details><summary>Last sample per partition</summary><table class=latest><tr>"
        + "".join(f"<th>{h}</th>" for h in head)
        + f"</tr>{rows}</table></details>"
    )


def _hot_keys_table(hot: list[dict]) -> str:
    """The last sample's hottest keys (``history_hot_keys``): what to split or pre-aggregate."""
    if not hot:
        return (
            "<p class=note>Hottest keys: none sampled. The sources count keys per partition "
            "(docs/skew.md) and each history sample keeps the hottest; a job that ended before its "
            "first sample has none.</p>"
        )
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(c)}</td>"
            for c in (
                f"p{r['partition']}",
                str(r["key"]),
                f"{r['share']:.1%}",
                f"{r['count']:,}",
                f"{r['error_rows']:,.0f}",
            )
        )  # fmt: skip
        + "</tr>"
        for r in hot
    )
    return (
        f"<h3>Hottest keys, at the last sample ({html.escape(str(hot[0]['ts']))} UTC)</h3>"
        "<table class=latest><tr><th>partition</th><th>key</th><th>share of the partition's input</th>"
        f"<th>rows counted</th><th>± rows</th></tr>{rows}</table>"
        "<p class=note>Counted by the sources' heavy-hitter sketches over their last one to two "
        "minutes of input (docs/skew.md). One key with a large share of a partition cannot be split "
        "by range: pre-aggregate it (<code>Aggregate(combine_at_source=True)</code>).</p>"
    )


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }}
th, td {{ text-align: left; padding: 2px 12px 2px 0; font-size: 14px; }}
table.latest td, table.latest th {{ text-align: right; }}
.note {{ color: #666; font-size: 14px; }}
h1 {{ font-size: 22px; }} h2 {{ font-size: 18px; margin-top: 1.2em; }}
</style>
<script type="text/javascript">{plotlyjs}</script>
</head><body>
<h1>{title}</h1>
{summary}
{latest}
<p class=note>Drag across a plot to zoom (the plots over time share their time axis), double-click to
zoom out; click a legend entry to hide it. Times are UTC. Dotted lines: consumer failures
(red: a crash, orange: an expired session).</p>
{body}
</body></html>
"""
