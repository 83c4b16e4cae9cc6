"""bench/latency.py's per-event visibility maths (numpy), against a brute-force reference."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pyarrow as pa

_spec = importlib.util.spec_from_file_location(
    "bench_latency", pathlib.Path(__file__).parents[2] / "bench" / "latency.py"
)
latency = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(latency)


def test_occurrences_count_each_keys_events_in_order():
    keys = np.array([5, 3, 5, 5, 3, 9])
    assert latency.occurrences(keys).tolist() == [1, 1, 2, 3, 2, 1]


def test_visible_at_is_the_earliest_row_covering_the_event():
    rng = np.random.default_rng(7)
    keys = rng.integers(0, 20, 500)
    occ = latency.occurrences(keys)
    # Upserts: per key, a few cumulative counts, published at random times (some out of order).
    rows = []
    for k in range(20):
        n = int((keys == k).sum())
        for c in sorted(set(rng.integers(1, n + 1, 4).tolist()) | ({n} if k % 3 else set())):
            rows.append((k, c, int(rng.integers(1_000, 2_000))))
    log = pa.table({
        "key": [r[0] for r in rows], "value_count": [r[1] for r in rows],
        "visible_at_ms": [r[2] for r in rows],
    })  # fmt: skip
    got = latency.visible_at(log, keys, occ)
    for i, (k, j) in enumerate(zip(keys.tolist(), occ.tolist())):
        covering = [t for kk, c, t in rows if kk == k and c >= j]
        assert got[i] == (min(covering) if covering else -1), (k, j)
