"""Skew on real Ray: a Zipf s=1.5 stream's hot partition and hottest key in ``run.status()``
and in the catalog (``rayflow sql``), and the hot-key remedy (``combine_at_source``) exact
against DuckDB, across a consumer killed mid-commit and a
restarted source."""

from __future__ import annotations

import re

import pytest
from ray._common.test_utils import wait_for_condition

import rayflow as rf
from rayflow.cli import main as cli
from rayflow.partitioning import PartitionMap, hash_key
from rayflow.testing import KEYED_SQL, Fault, FaultPlan, assert_same_rows, duckdb_reference

pytestmark = pytest.mark.ray


def test_skewed_stream_shows_its_hot_key_and_combining_is_exact(ray_session, job, tmp_path, capsys):
    events = rf.sources.Synthetic(events=300_000, keys=20_000, seed=5, zipf_s=1.5).to_table()
    top = duckdb_reference(
        "SELECT key, count(*) AS n FROM events GROUP BY key ORDER BY n DESC LIMIT 1", events=events
    )
    hottest, hottest_rows = top["key"][0].as_py(), top["n"][0].as_py()
    hot_partition = int(PartitionMap.uniform(4).route([hash_key(hottest)])[0])
    # A consumer dies with its state files written, uncommitted: its partitions' new owner
    # replays the combined sub-batches from the last commit (exact only if they are cut alike).
    # And the source dies after queueing its 8th batch of 15: restarted by Ray, it reads again
    # from the lowest committed position and combines the replayed rows again.
    plan = FaultPlan(
        [
            Fault(point="consumer.after_state_write", actor="consumer-1", nth=2),
            Fault(point="source.batch", actor="source-0", nth=8),
        ],
        dir=str(tmp_path / "f"),
    )
    run = job(
        "skewed",
        rf.sources.Table(events, batch_rows=20_000),
        operator=rf.ops.Aggregate(
            by="key", aggs=[("value", "count"), ("value", "sum")], combine_at_source=True
        ),
        config=rf.EngineConfig(history_interval_s=0.3),
        checkpoint_interval_s=0.2,
        faults=plan,
    ).start()
    try:
        wait_for_condition(lambda: run.status()["done"], timeout=60, retry_interval_ms=200)
        st = run.status()
    finally:
        result = run.wait(timeout_s=60)
    # run.status(): the hot partition gets more than its share, the true hottest key is on top.
    assert st["hot_partition"] == hot_partition and st["skew"] > 1.0
    part = st["partitions"][hot_partition]
    assert part["rate_ratio"] == st["skew"]
    assert abs(sum(p["rate_ratio"] for p in st["partitions"]) - 4) < 1e-6
    x = st["hot_keys"][0]
    assert x["key"] == hottest and x["partition"] == hot_partition
    # The restarted source started its window afresh (docs/skew.md) with the rows it read again
    # (at least its last 7 batches of 15): its count is a lower bound of the key's rows since.
    assert hottest_rows / 3 < x["count"] <= hottest_rows
    assert part["hot_keys"][0]["key"] == hottest
    # The remedy is exact, after a replay too, and rows still count input rows.
    assert len(plan.fired()) == 2, plan
    assert_same_rows(result.output, duckdb_reference(KEYED_SQL, events=events))
    assert result.stats["events"] == 300_000
    assert 0 < st["combined_rows"] < 300_000 / 3  # combined: the hot keys' rows became few
    # The catalog: sampled hot keys, queryable with rayflow sql.
    query = (
        "SELECT key, partition FROM history_hot_keys WHERE rank = 1 "
        "AND count = (SELECT max(count) FROM history_hot_keys)"
    )
    assert cli(["sql", str(tmp_path / "ck"), "--name", "skewed", query]) == 0
    out = _cli_words(capsys)
    assert out[:2] == ["key", "partition"] and out[2:4] == [str(hottest), str(hot_partition)]
    assert (
        cli(
            ["sql", str(tmp_path / "ck"), "--name", "skewed", "SELECT max(rate_ratio) AS r FROM history_skew"]
        )
        == 0
    )
    assert float(_cli_words(capsys)[1]) > 1.0


def _cli_words(capsys) -> list[str]:
    """The words ``rayflow sql`` printed, without the lines Ray's workers log to the driver's
    stdout (``(raylet) ...``, ``(ConsumerActor pid=...) ...`` about the killed consumer: they
    may land in any read)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in capsys.readouterr().out.splitlines()]
    return [w for line in lines if not line.lstrip().startswith("(") for w in line.split()]
