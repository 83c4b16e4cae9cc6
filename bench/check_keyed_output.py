"""Check a flagship output directory (key, count, sum) against pyarrow over the same events.

    python bench/check_keyed_output.py OUT_DIR EVENTS [KEYS] [SEED]

Exits 0 when every key's count and sum equal pyarrow's group_by over the synthetic events.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pyarrow.dataset as ds

import rayflow as rf


def main(argv: list[str]) -> int:
    out_dir, events = argv[0], int(argv[1])
    keys = int(argv[2]) if len(argv) > 2 else 100_000
    seed = int(argv[3]) if len(argv) > 3 else 42
    out = ds.dataset(out_dir, format="parquet").to_table().sort_by("key")
    ref = (
        rf.sources.Synthetic(events=events, keys=keys, seed=seed)
        .to_table()
        .group_by("key")
        .aggregate([("value", "count"), ("value", "sum")])
        .sort_by("key")
    )
    ok = (
        out["key"].equals(ref["key"])
        and out["count"].equals(ref["value_count"])
        and out["sum"].equals(ref["value_sum"])
    )
    print(f"result: {out.num_rows:,} keys, {'equal to' if ok else 'DIFFERENT from'} pyarrow's group_by")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
