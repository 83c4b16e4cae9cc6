"""Regression tests for the event-time defects of the issue 10 review, the pure ones (no Ray; the
end-to-end ones are in tests/integration/test_review_event_time.py). Each fails if its defect
comes back:

- a commit's main output and a side stream's (late rows) sharing one sink root: each keeps a file
  of its own (``write_commit`` gave every stream one name, the second overwrote the first);
- a fetch's watermarks applied after the first run of a step instead of the last (``in_hand`` in
  ``_internal/partition_task.py``): the watermark passed the rows still to process;
- a live batch whose event-time column has a wrong type (digit strings, strings, doubles, int32)
  is an ``InputError`` (``batch_max_ms``), not a wrong watermark or a bare error.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from rayflow._internal import partition_task as pt
from rayflow._internal.checkpoint import commit as cm
from rayflow._internal.checkpoint.store import Store
from rayflow._internal.consumer import _by_watermark
from rayflow._internal.queues import Entry
from rayflow._internal.watermarks import WATERMARK_END, batch_max_ms
from rayflow.errors import InputError
from rayflow.ops.base import side_stream


def test_a_late_sink_sharing_the_main_sinks_root_keeps_both_outputs(tmp_path):
    """Window(late='side', late_sink=Parquet(X)) with sink=Parquet(X): write_commit writes the
    main output and the late rows to the same X/_pending/<name>; the record names both, one
    file survives (commit.py write_commit: one `name` for every stream)."""
    root = str(tmp_path / "out")
    main = pa.table({"window_start": [0], "value_count": [3]})
    late = side_stream(pa.table({"ts": [1, 2]}), "op0-late")
    rec = cm.write_commit(
        partition=0, epoch=1, seq=1, state_tables={}, outputs=[main, late], committed_positions={},
        positions={"s": 10}, rows_total=10, rows_committed=0, final=False, map_version=1, key=["k"],
        state_store=Store(str(tmp_path / "state")), sink_store=Store(root),
        side_stores={"op0-late": Store(root)},
    )  # fmt: skip
    assert len(rec.output_files) == 2
    files = {f: Store(root).read_parquet(cm.pending_path(cm.output_stream(f)[1])) for f in rec.output_files}
    main_file, side_file = rec.output_files
    assert files[main_file].column_names == ["window_start", "value_count"], "main output overwritten"
    assert files[side_file].column_names == ["ts"]


def test_the_watermark_of_a_fetch_applies_after_the_last_run_of_the_step():
    """One fetch reply (everything served: watermarks as of everything read, the split ended),
    taken whole by one step and processed in runs of one watermark: after the first run the
    watermark must not be past the rows of the runs still to process. (Also found by the
    colleague's tests/unit/test_watermark_steps.py.)"""
    t = pt.PartitionTask.from_commit(0, 1, [None], None, event_time=True, num_sources=1)
    batch = pa.table({"x": [1]})
    entries = [
        (Entry("s", 0, 10, 1, 0, None, 0, watermark=100), batch),
        (Entry("s", 10, 20, 1, 0, None, 10, watermark=200), batch),
    ]
    t.fetch_applied(
        pt.Fetched(source=0, entries=entries, frontier={"s": 20}, watermarks={"s": WATERMARK_END}, idle=set())
    )
    taken = t.take(10.0, 1e-12)
    first, second = _by_watermark(taken)
    t.batch_processed([e for e, _ in first], [], 1)
    assert t.watermark_target <= 100, f"watermark {t.watermark_target} before the second run (ts >= 100)"


@pytest.mark.parametrize(
    "col",
    [pa.array(["1700000000000", "999"]), pa.array(["abc"]), pa.array([1.7e12]), pa.array([5], pa.int32())],
    ids=["digit-strings", "string", "double", "int32"],
)
def test_a_live_batch_with_a_wrong_event_time_type_is_an_input_error(col):
    """check_input checks the source's declared schema once; a live batch whose event-time column
    has another type gets a watermark from pc.max of it ('999' > '1700000000000' as strings) or a
    bare ValueError / TypeError from the source actor."""
    with pytest.raises(InputError):
        batch_max_ms(pa.table({"ts": col}), "ts")
