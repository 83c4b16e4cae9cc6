"""In-memory sources: :class:`Table` (tests, demos)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa

from rayflow.errors import EmptyInputError
from rayflow.sources.base import DEFAULT_BATCH_ROWS, Source, Split, _check_batch_rows


@dataclass(frozen=True)
class _TableSplit(Split):
    name: str
    table: pa.Table
    batch_rows: int

    def read(self, position: int) -> Iterator[tuple[pa.RecordBatch, int]]:
        n = self.table.num_rows
        start = position
        while start < n:
            end = min((start // self.batch_rows + 1) * self.batch_rows, n)  # the absolute grid
            chunk = self.table.slice(start, end - start).combine_chunks()
            batches = chunk.to_batches()
            batch = batches[0] if batches else pa.RecordBatch.from_pylist([], schema=chunk.schema)
            yield batch, end
            start = end


class Table(Source):
    """An in-memory Arrow table, record batch or list of batches, as one split (tests, demos)."""

    def __init__(
        self,
        data: pa.Table | pa.RecordBatch | Sequence[pa.RecordBatch],
        *,
        batch_rows: int = DEFAULT_BATCH_ROWS,
    ):
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        elif not isinstance(data, pa.Table):
            data = list(data)
            if not data:
                raise EmptyInputError("rf.sources.Table got no batches; pass at least one row")
            data = pa.Table.from_batches(data)
        _check_batch_rows(batch_rows)
        self._table = data
        self._batch_rows = batch_rows

    @property
    def schema(self) -> pa.Schema:
        return self._table.schema

    def splits(self) -> list[Split]:
        if self._table.num_rows == 0:
            raise EmptyInputError("rf.sources.Table holds no rows; pass at least one row")
        return [_TableSplit("table", self._table, self._batch_rows)]
