"""What the benchmarks share."""

from __future__ import annotations

import json
import os


def write_json(path: str, obj, *, indent: int = 2, default=None, lead: str = "") -> None:
    """Write a benchmark's results to ``path`` as JSON (its folder made first), and say where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent, default=default)
    print(f"{lead}wrote {path}")
