"""A job of several stages, run together (DESIGN §12): :class:`StagedRun`.

Each stage is a pipeline of its own (a consumer group, actors, checkpoints,
a catalog), started with :class:`~rayflow._internal.runtime.Run`; stage ``i``
reads what stage ``i - 1`` publishes (``rf.sources.Upstream``). Nothing
passes between them but committed files, so each stage fails, recovers and
resumes on its own, and the whole stays exactly-once. This module only starts
them together, watches them together and stops them in order.
"""

from __future__ import annotations

import threading
import time

from rayflow._internal.runtime import JobSpec, Result, Run

_POLL_S = 0.1


class StagedRun:
    """The running stages of one pipeline: ``status()``, ``scale()``, ``wait()``, ``stop()``.

    ``runs``: each stage's :class:`Run`, upstream first. A stage that fails
    stops every stage (the others' committed work stays; the next start resumes
    each from its last commit) and its error is raised by :meth:`wait` or
    :meth:`status`. The result is the last stage's, with each stage's stats in
    ``stats["stages"]``.
    """

    def __init__(self, specs: list[JobSpec]):
        self.runs: list[Run] = []
        try:
            for spec in specs:  # upstream first: its exchange directory is there to read
                self.runs.append(Run(spec))
        except BaseException:
            self._stop_all(timeout_s=30.0)
            raise
        self._error: BaseException | None = None
        self._results: dict[int, Result] = {}
        self._result: Result | None = None
        self._lock = threading.Lock()

    @property
    def last(self) -> Run:
        return self.runs[-1]

    def status(self) -> dict:
        """The last stage's status, with every stage's under ``stages`` (upstream first)."""
        stages = [r.status() for r in self.runs]
        return {**stages[-1], "stages": stages}

    def scale(self, *, consumers: int, stage: int = -1) -> None:
        """Change the consumers of one stage (the last by default)."""
        self.runs[stage].scale(consumers=consumers)

    def query(self, sql: str):
        """Read-only SQL over the last stage's sink (``Run.query``)."""
        return self.last.query(sql)

    def wait(self, *, timeout_s: float | None = None) -> Result:
        """Wait until every stage has ended (a bounded input), upstream first; raise the first
        stage error (the other stages are stopped then)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        threads = [
            threading.Thread(target=self._wait_one, args=(i,), daemon=True) for i in range(len(self.runs))
        ]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            if self._error is not None:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"the stages {[r.spec.name for r in self.runs]} not done after {timeout_s} s"
                )
            time.sleep(_POLL_S)
        if self._error is not None:
            self._stop_all(timeout_s=30.0)
            raise self._error
        return self._combine(stopped=False)

    def _wait_one(self, i: int) -> None:
        try:
            self._results[i] = self.runs[i].wait()
        except BaseException as e:
            with self._lock:
                if self._error is None:
                    self._error = e

    def stop(self, *, timeout_s: float = 120.0) -> Result:
        """Stop every stage gracefully, upstream first (each drains and commits what it has; what
        a downstream stage has not read yet is read by the next start), and return the result."""
        if self._result is not None:
            return self._result
        for i, r in enumerate(self.runs):
            self._results[i] = r.stop(timeout_s=timeout_s)
        # Stopped: some stage had not ended on its own (a stage that had keeps its result).
        return self._combine(stopped=any(res.stats["stopped"] for res in self._results.values()))

    def _stop_all(self, *, timeout_s: float) -> None:
        for r in self.runs:
            try:
                r.stop(timeout_s=timeout_s)
            except BaseException:  # noqa: BLE001 - stopping the rest matters more; the first error is raised
                pass

    def _combine(self, *, stopped: bool) -> Result:
        last = self._results[len(self.runs) - 1]
        stats = dict(last.stats)
        stats["stopped"] = stopped
        stats["stages"] = [self._results[i].stats for i in range(len(self.runs))]
        self._result = Result(output=last.output, stats=stats, output_path=last.output_path)
        return self._result
