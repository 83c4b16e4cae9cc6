"""A decision loop on a daemon thread of the driver: the shell shared by the autoscaler and the splitter.

Each interval it calls :meth:`DriverLoop.step` (the subclass's one decision);
an exception there is counted, kept in ``last_error`` and logged, never
raised: the job goes on as it is, and the next interval tries again.
:meth:`stop` ends the loop and waits for a step in progress (an action such as
a scale or a split is not cut in half).
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("rayflow")


class DriverLoop:
    """Calls :meth:`step` every ``interval_s`` on a daemon thread until :meth:`stop`."""

    #: What the loop does, for its thread's name and its log lines ("autoscaling", "splitting").
    doing = "deciding"

    def __init__(self, run, interval_s: float, thread_name: str):
        self.run = run
        self.interval_s = interval_s
        self.errors = 0
        self.last_error: str | None = None
        self._halt = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"rayflow-{thread_name}-{run.spec.name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 120.0) -> None:
        """Stop deciding; wait (at most ``timeout_s``) for a step in progress."""
        self._halt.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning(
                    "rayflow: %s %r did not stop in %s s", self.doing, self.run.spec.name, timeout_s
                )

    @property
    def halted(self) -> bool:
        return self._halt.is_set()

    def step(self):
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._halt.is_set():
            try:
                self.step()
            except Exception as e:  # logged, never raised: the job goes on as it is
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                logger.warning("rayflow: %s %r failed this interval: %s", self.doing, self.run.spec.name, e)
            self._halt.wait(self.interval_s)
