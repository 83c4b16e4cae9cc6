"""``rayflow report`` on a job with a kill and a rescale in it, drawn by headless Chromium.

The browser is Debian's ``chromium``, driven over the DevTools protocol on a pipe
(:class:`Browser`): it loads the report from disk with the network blocked, and the test
checks that nothing went wrong in the page (console errors, exceptions, failed loads),
that every plot has drawn traces with data, and that a screenshot is not blank.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time

import pytest
import ray
from ray._common.test_utils import wait_for_condition

import rayflow as rf
from rayflow.cli import main as cli
from rayflow.testing import kill_actor, throttle

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(
        shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)"
    ),
]

#: Subplots of the timeline (by the start of their title) that must show data in this job, and
#: how many traces with data at least. Event-time lag is empty here (no event time: the plot says
#: so), and the lag in seconds may be all zero (a short job keeps up).
DRAWN = {
    "Throughput, all": 1,
    "Throughput per partition": 4,
    "Lag per partition": 4,
    "Commit duration": 2,
    "Consumers: busy": 3,
    "Consumers: resident": 3,
    "Events": 3,  # at least join, rebalance and crash
}

#: True once plotly.js has drawn both figures of the report (it draws after the load event).
PLOTTED_JS = """
[...document.querySelectorAll('.js-plotly-plot')].filter(d => d._fullLayout && d.querySelector('g.trace'))
  .length === 2
"""
#: In the page, per figure: its subplots' titles, in order, and per subplot (``xy``, ``x2y2``,
#: ...) the traces plotly.js drew: the length of each line's path, markers, bars, heat map images.
DRAWN_JS = """
(() => {
  const out = {};
  for (const div of document.querySelectorAll('.js-plotly-plot')) {
    const fl = div._fullLayout, subplots = {};
    for (const [id, sp] of Object.entries(fl._plots)) {
      subplots[id] = [...sp.plotgroup.node().querySelectorAll('g.trace, g.hm')].map(t => ({
        line: ((t.querySelector('path.js-line') || {getAttribute: () => ''}).getAttribute('d') || '').length,
        points: t.querySelectorAll('path.point, g.point').length,
        images: t.querySelectorAll('image').length,
      }));
    }
    out[div.id] = {
      subplots,
      titles: fl.annotations.filter(a => a.xref === 'paper' && a.yref === 'paper').map(a => a.text),
      names: div.data.map(t => t.name),
      height: div.offsetHeight,
    };
  }
  return out;
})()
"""


def test_report_of_a_job_with_a_kill_and_a_rescale(ray_session, tmp_path, capsys):
    ck = tmp_path / "ck"
    run = rf.Pipeline(
        name="report",
        source=rf.sources.Synthetic(events=120_000, keys=2_000, seed=5),
        key="key",
        partitions=4,
        operator=[throttle(25_000), rf.ops.Aggregate(by="key", aggs=[("value", "sum")])],
        consumers=2,
        checkpoint_dir=str(ck),
        checkpoint_interval_s=0.2,
        config=rf.EngineConfig(history_interval_s=0.2, heartbeat_interval_s=0.1, fetch_max_bytes=50_000),
        progress=False,
    ).start()
    try:
        wait_for_condition(lambda: run.status()["processed_rows"] >= 25_000, timeout=60)
        kill_actor("report", "consumer-1", how="ray.kill")
        wait_for_condition(lambda: run.status()["recoveries"] >= 1, timeout=30)
        run.scale(consumers=3)
        # A report of the running job: the manager holds the catalog, the report reads a copy.
        assert cli(["report", str(ck), "-o", str(tmp_path / "live.html")]) == 0
        cost = ray.get(run.manager.status.remote(), timeout=30)["history"]
        assert cost["samples"] >= 3 and cost["last_write_s"] > 0
        result = run.wait(timeout_s=60)
    finally:
        run.stop()
    assert result.stats["recoveries"] >= 1
    assert cli(["report", str(ck), "-o", str(tmp_path / "report.html")]) == 0
    assert "report.html" in capsys.readouterr().out
    # The live report drew samples (its size says nothing: plotly.js alone is 3.5 MB).
    live = re.search(r"<th>samples</th><td>([\d,]+)", (tmp_path / "live.html").read_text())
    assert live and int(live.group(1).replace(",", "")) >= 3, live

    with Browser(width=1400, height=1000) as browser:
        browser.open(str(tmp_path / "report.html"))
        wait_for_condition(lambda: browser.evaluate(PLOTTED_JS), timeout=30)
        drawn = browser.evaluate(DRAWN_JS)
        png = browser.screenshot()
        # Errors thrown later (a timer, a late load) count too: wait until 2 s have passed since
        # the load, the last 1 s of it without a new error.
        browser.quiet(1.0, since_load_s=2.0)
        assert browser.errors == []
    (tmp_path / "report.png").write_bytes(png)
    timeline = drawn["timeline"]
    for i, title in enumerate(timeline["titles"], start=1):
        want = next((n for start, n in DRAWN.items() if title.startswith(start)), 0)
        traces = timeline["subplots"].get("xy" if i == 1 else f"x{i}y{i}", [])
        with_data = [t for t in traces if t["line"] > 10 or t["points"] or t["images"]]
        assert len(with_data) >= want, (title, traces)
    assert {"event: crash", "event: rebalance"} <= set(timeline["names"])
    assert "consumer-2" in timeline["names"] or "consumer-3" in timeline["names"]  # the rescale
    assert any(t["points"] for t in drawn["skew"]["subplots"]["xy"])  # the hottest partitions' bars
    assert png.startswith(b"\x89PNG") and len(png) > 50_000  # a blank page is a few KB


# ----------------------------------------------------------------------------- headless Chromium
#: Flags that work in a container, as root, with no GPU; no host name resolves, so a remote
#: load fails (and is caught as an error) on a runner with a network too. The page also blocks
#: every non-file URL (``Network.setBlockedURLs``).
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--remote-debugging-pipe", "--host-resolver-rules=MAP * ~NOTFOUND",
]  # fmt: skip


class Browser:
    """A headless Chromium driven over the DevTools protocol on a pipe (fd 3 in, fd 4 out: no
    port, no websocket library), with one page. Collects the page's console errors, uncaught
    exceptions and failed loads (``errors``). A context manager: the browser ends with it."""

    def __init__(self, *, width: int, height: int, timeout_s: float = 30.0):
        self.timeout_s = timeout_s
        self.errors: list[str] = []
        self._profile = tempfile.mkdtemp(prefix="rayflow-chromium-")
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()
        # The pipe's ends become fds 3 and 4 by bash redirections (not preexec_fn: unsafe in a
        # process with threads, as a Ray driver is).
        self._proc = subprocess.Popen(
            ["/bin/bash", "-c", f'exec 100<&{cmd_r} 101>&{out_w}; exec "$0" "$@" 3<&100 4>&101 100<&- 101>&-',
             shutil.which("chromium"), *CHROMIUM_FLAGS, f"--user-data-dir={self._profile}",
             f"--window-size={width},{height}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(cmd_r, out_w),
        )  # fmt: skip
        os.close(cmd_r)
        os.close(out_w)
        self._n = 0
        self._replies: dict[int, dict] = {}
        self._events: queue.Queue = queue.Queue()
        self._urls: dict[str, str] = {}  # request id -> URL, to name a failed load
        self._loaded_at = time.monotonic()  # of the last page opened
        self._cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            target = self._call("Target.createTarget", url="about:blank")["targetId"]
            self._session = self._call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Runtime", "Log", "Page", "Network"):
                self.call(f"{domain}.enable")
            self.call("Network.setBlockedURLs", urls=["http://*", "https://*", "ws://*", "wss://*"])
            self.call(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
        except BaseException:  # no browser left running, no profile left behind
            self._end()
            raise

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self._end()

    def _end(self) -> None:
        try:
            self._call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):  # already gone
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        os.close(self._cmd_w)
        shutil.rmtree(self._profile, ignore_errors=True)

    def quiet(self, quiet_s: float, *, since_load_s: float = 0.0, timeout_s: float = 10.0) -> None:
        """Return once the page has gone ``quiet_s`` without a new error and ``since_load_s``
        have passed since its load event (at most ``timeout_s``): errors thrown after the
        checks (a timer, a late load) are in ``errors`` then."""
        deadline = time.monotonic() + timeout_s
        count, since = len(self.errors), time.monotonic()
        while time.monotonic() < deadline and (
            time.monotonic() - since < quiet_s or time.monotonic() - self._loaded_at < since_load_s
        ):
            time.sleep(0.05)
            if len(self.errors) != count:
                count, since = len(self.errors), time.monotonic()

    def _read(self) -> None:
        buf = b""
        while chunk := os.read(self._out_r, 1 << 16):
            *messages, buf = (buf + chunk).split(b"\0")
            for msg in map(json.loads, messages):
                if "id" in msg:
                    with self._cv:
                        self._replies[msg["id"]] = msg
                        self._cv.notify_all()
                else:
                    self._note(msg)
                    self._events.put(msg)
        os.close(self._out_r)
        with self._cv:  # the browser is gone: every waiting call fails now, not at its timeout
            self._replies[-1] = {"error": "the browser closed its pipe"}
            self._cv.notify_all()

    def _note(self, msg: dict) -> None:
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            self.errors.append(
                "console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"])
            )
        elif method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            self.errors.append("exception: " + d.get("exception", {}).get("description", d["text"]))
        elif method == "Network.requestWillBeSent":
            self._urls[p["requestId"]] = p["request"]["url"]
        elif method == "Network.loadingFailed" and not p.get("canceled"):
            why = p.get("blockedReason") or p.get("errorText")
            self.errors.append(f"load failed ({why}): {self._urls.get(p['requestId'], '?')}")
        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
            e = p["entry"]
            self.errors.append(f"{e['source']}: {e['text']} {e.get('url', '')}")

    def _call(self, method: str, session: str | None = None, **params) -> dict:
        with self._cv:
            self._n += 1
            n = self._n
        msg = {"id": n, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        with self._cv:
            if not self._cv.wait_for(lambda: n in self._replies or -1 in self._replies, self.timeout_s):
                raise TimeoutError(f"chromium did not answer {method} within {self.timeout_s} s")
            reply = self._replies.pop(n, None) or self._replies[-1]
        if "error" in reply:
            raise RuntimeError(f"chromium, {method}: {reply['error']}")
        return reply["result"]

    def call(self, method: str, **params) -> dict:
        """A command to the page."""
        return self._call(method, self._session, **params)

    def open(self, path: str) -> None:
        """Load a local file; returns once its load event has fired."""
        self.call("Page.navigate", url="file://" + os.path.abspath(path))
        deadline = time.monotonic() + self.timeout_s
        try:
            while (
                self._events.get(timeout=max(0.01, deadline - time.monotonic()))["method"]
                != "Page.loadEventFired"
            ):
                pass
        except queue.Empty:
            raise TimeoutError(f"{path} did not finish loading within {self.timeout_s} s") from None
        self._loaded_at = time.monotonic()

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (returned as JSON)."""
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"evaluating {expression!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def screenshot(self) -> bytes:
        """A PNG of the whole page."""
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        return base64.b64decode(shot["data"])
