"""What the benchmarks share."""

from __future__ import annotations

import json
import os
import threading


def write_json(path: str, obj, *, indent: int = 2, default=None, lead: str = "") -> None:
    """Write a benchmark's results to ``path`` as JSON (its folder made first), and say where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent, default=default)
    print(f"{lead}wrote {path}")


class Sampler:
    """Calls :meth:`sample` every ``interval_s`` on a daemon thread, from ``start()`` (or
    entering ``with``) until ``stop()`` (or leaving it), or until ``sample`` returns False (the
    run ended). Subclasses keep what they sample."""

    def __init__(self, run, interval_s: float):
        self.run, self.interval_s = run, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> bool:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set() and self.sample():
            self._stop.wait(self.interval_s)

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
