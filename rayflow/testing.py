"""Test doubles and helpers shipped with rayflow (STYLE §11).

- :func:`duckdb_reference` runs SQL over Arrow tables in DuckDB: the oracle a
  pipeline's result is checked against.
- :func:`assert_same_rows` compares two tables as multisets of rows.
- :func:`throttle` is a pass-through operator that holds each batch for a
  while (a rate in rows/s), so a test can stop or kill a job midway without racing it.
"""

from __future__ import annotations

import time

import pyarrow as pa

from rayflow.ops import Map

__all__ = ["assert_same_rows", "duckdb_reference", "throttle"]


def duckdb_reference(sql: str, **tables: pa.Table) -> pa.Table:
    """Run ``sql`` in a fresh in-memory DuckDB where each keyword names an Arrow table."""
    import duckdb

    con = duckdb.connect()
    try:
        for name, t in tables.items():
            con.register(name, t)
        return con.sql(sql).to_arrow_table()
    finally:
        con.close()


def assert_same_rows(actual: pa.Table, expected: pa.Table, *, columns: list[str] | None = None) -> None:
    """Assert both tables hold the same rows (any order), comparing ``columns`` by name."""
    cols = columns or expected.column_names
    missing = [c for c in cols if c not in actual.column_names]
    assert not missing, f"result lacks columns {missing}; it has {actual.column_names}"
    a = actual.select(cols)
    e = (
        expected.select(cols).cast(a.schema, safe=False)
        if expected.select(cols).schema != a.schema
        else expected.select(cols)
    )
    order = [(c, "ascending") for c in cols]
    a, e = a.sort_by(order), e.sort_by(order)
    assert a.num_rows == e.num_rows, f"{a.num_rows} rows, expected {e.num_rows}"
    if not a.equals(e):
        for i in range(a.num_rows):
            ra, re_ = a.slice(i, 1).to_pylist()[0], e.slice(i, 1).to_pylist()[0]
            if ra != re_:
                raise AssertionError(f"first differing row (sorted) #{i}: got {ra}, expected {re_}")
        raise AssertionError("tables differ")


def throttle(rows_per_s: float) -> Map:
    """A pass-through :class:`~rayflow.ops.Map` that processes at most ``rows_per_s`` per call."""

    def _hold(table: pa.Table) -> pa.Table:
        time.sleep(table.num_rows / rows_per_s)
        return table

    return Map(_hold)
