"""The Nexmark queries of bench/nexmark.py whose operators keep no state (q0, q1, q2, q13, q14,
q21): their chain over a generated stream, in batches, equals DuckDB's SQL of the query. The
queries with state, joins or stages run on Ray in tests/integration/test_nexmark.py."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pyarrow as pa
import pytest

from rayflow._internal.chain import Chain
from rayflow.sources.nexmark import generate

ROOT = pathlib.Path(__file__).parents[2]
_spec = importlib.util.spec_from_file_location("bench_nexmark", ROOT / "bench" / "nexmark.py")
nexmark = importlib.util.module_from_spec(_spec)
sys.modules["bench_nexmark"] = nexmark
_spec.loader.exec_module(nexmark)

EVENTS = 80_000


@pytest.fixture(scope="module")
def tables():
    return {k: generate(k, 0, EVENTS) for k in nexmark.KINDS}


def build(name, tmp_path):
    q = nexmark.QUERIES[name]
    src = nexmark.sources_for(q.kinds, events=EVENTS, seed=0, splits=2, input_dir=None)
    return q.build(src, name=f"nx-{name}", checkpoint_dir=str(tmp_path / "ck"), progress=False)


#: The stateless queries (tests/integration/test_nexmark.py runs every other one on Ray).
STATELESS = ("q0", "q1", "q2", "q13", "q14", "q21")


@pytest.mark.parametrize("name", STATELESS)
def test_stateless_queries_equal_duckdb(tmp_path, tables, name):
    p = build(name, tmp_path)
    assert len(p.stages) == 1 and all(not op.stateful and not op.uses_event_time for op in p.ops)
    chain = Chain(p.ops)
    assert (
        chain.check_input(p.source.schema) is not None
    )  # the output schema is known (a next stage reads it)
    states, out = chain.init_states(), []
    bids = tables["bid"]
    for start in range(0, bids.num_rows, 17_000):  # batches as a partition would see them
        out += chain.process(states, bids.slice(start, 17_000))
    got = pa.concat_tables(out)
    q = nexmark.QUERIES[name]
    assert got.column_names == list(q.columns)
    expected = nexmark.reference(q, tables)
    assert expected.num_rows > 0
    assert nexmark.same_rows(got, expected, q.columns), (got.num_rows, expected.num_rows)
