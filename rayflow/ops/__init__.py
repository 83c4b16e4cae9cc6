"""Operators: what a consumer does to each partition's batches (DESIGN §2.4, §11).

- :class:`Map` — ``fn(table) -> table``, stateless.
- :class:`Filter` — keeps the rows where a ``pyarrow.compute`` expression holds.
- :class:`Aggregate` — per-key aggregates. Over a bounded input, emitted
  once, when the input ends; over an unbounded one (or with
  ``emit="changes"``), an upsert stream: at each commit, the keys that changed
  since the previous commit with their new values. Supports ``count``,
  ``sum``, ``min``, ``max`` and ``mean`` with pyarrow's output naming
  (``value_count``, ...).
- :class:`Window` — per-key aggregates over tumbling, hopping or session
  windows of event time, emitted when the watermark closes them.
- :class:`Dedup` — drops a row whose key was already seen within a span of
  event time.
- :class:`Join` — joins the rows of two inputs by key within an interval or a
  tumbling window of event time (inner, left outer or semi).
- :class:`Lookup` — adds the columns of the matching row of a table (Parquet
  or DuckDB) that every consumer holds, reloaded when it changes.

The contract every operator follows is :class:`Operator` (``rayflow/ops/base.py``).
"""

from rayflow.ops.aggregate import Aggregate
from rayflow.ops.base import Operator, as_chain  # noqa: F401 (the Pipeline builds chains with it)
from rayflow.ops.dedup import Dedup
from rayflow.ops.join import Join
from rayflow.ops.lookup import Lookup
from rayflow.ops.stateless import Filter, Map
from rayflow.ops.top import Top
from rayflow.ops.window import Window

__all__ = ["Aggregate", "Dedup", "Filter", "Join", "Lookup", "Map", "Operator", "Top", "Window"]
