"""A partition's watermark follows the rows it has processed, batch by batch, within one step and
in the first fetch after the partition is loaded (found by tests/integration/test_windows.py).

Pure: a PartitionTask fed fetch replies as the consumer feeds them, no Ray."""

from __future__ import annotations

import pyarrow as pa

from rayflow._internal import partition_task as pt
from rayflow._internal.checkpoint.commit import CommitRecord
from rayflow._internal.consumer import _by_watermark
from rayflow._internal.queues import Entry

BATCH = pa.table({"x": [1]})


def _entries(split: str, first: int, n: int, *, wm0: int, rows: int = 10, step: int = 100) -> list:
    """``n`` fetched (entry, batch) pairs of ``split`` from position ``first``, each tagged with
    the split's watermark after it: ``wm0 + step``, ``wm0 + 2 * step``, ..."""
    return [
        (Entry(split, first + i * rows, first + (i + 1) * rows, rows, 0, None, first + i * rows, wm0 + (i + 1) * step), BATCH)
        for i in range(n)
    ]  # fmt: skip


def test_a_step_that_takes_several_batches_moves_the_watermark_only_past_those_processed():
    """The consumer takes every buffered batch in one step, then processes them in runs of one
    watermark (``_by_watermark``), advancing between runs. The buffer is empty from the take on,
    so the fetch reply's frontier and its "as of everything read" watermarks must wait for the
    last run: applied after the first, they move the watermark past rows still to be processed
    (which the next runs then find late) and the positions past rows not yet processed."""
    t = pt.PartitionTask.from_commit(0, 1, [None], None, event_time=True, num_sources=1)
    entries = _entries("s", 0, 4, wm0=0)
    t.fetch_applied(
        pt.Fetched(source=0, entries=entries, frontier={"s": 40}, watermarks={"s": 400}, idle=set())
    )
    taken = t.take(10.0, 1e-12)
    assert len(taken) == 4 and not t.buffer
    seen = []
    for group in _by_watermark(taken):
        t.batch_processed([e for e, _ in group], [], 1)
        seen.append((group[-1][0].end, t.positions["s"], t.watermark_target))
    assert seen == [(10, 10, 100), (20, 20, 200), (30, 30, 300), (40, 40, 400)]


def test_a_loaded_partition_moves_its_watermark_through_its_first_fetch():
    """A partition restored from its commit (a takeover after a kill, a rebalance, a restart)
    whose first fetch brings a backlog: the reply names the source's splits (more to serve), so
    the source is heard from then; each batch processed moves the watermark to the split
    watermark it carries, not only once the whole backlog is processed."""
    rec = CommitRecord(
        partition=0, lease_epoch=1, positions={"s": 100}, state_files=[], output_files=[], rows_in=100,
        rows_total=100, state_rows=0, final=False, map_version=1,
        watermarks={"partition": 1_000, "splits": {"s": 1_000}},
    )  # fmt: skip
    t = pt.PartitionTask.from_commit(0, 2, [None], rec, event_time=True, num_sources=1)
    backlog = _entries("s", 100, 5, wm0=1_000)
    t.fetch_applied(pt.Fetched(source=0, entries=backlog, watermarks={"s": None}, idle=None))
    targets = []
    for _ in range(5):
        [(e, _b)] = t.take(0.0, 1.0)
        t.batch_processed([e], [], e.rows)
        targets.append(t.watermark_target)
    assert targets == [1_100, 1_200, 1_300, 1_400, 1_500]
