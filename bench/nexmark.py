"""Nexmark on rayflow: the queries, their DuckDB references, and events/s per core against Flink.

    python bench/nexmark.py --events 10000000                  # every query, generated events
    python bench/nexmark.py --events 200000 --queries q3 q4 --check   # and compare with DuckDB
    python bench/nexmark.py --input DIR --output DIR           # other people's events and answers

Events come from ``rf.sources.Nexmark`` (Beam's generator, vectorized; three
sources of one seed are three views of one stream: ``person``, ``auction``,
``bid``), or with ``--input DIR`` from ``persons.parquet``, ``auctions.parquet``
and ``bids.parquet`` (the Nexmark DDL's field names and types). ``--output DIR``
writes each query's result as ``qN.parquet``, its columns named as in the Flink
nexmark repo's sink table of the query.

The queries (definitions: the Flink nexmark repo's ``queries/qN.sql``) as
rayflow pipelines:

- q0 pass-through, q1 currency map, q2 filter: bids, one stage, no state.
- q3: persons in OR/ID/CA who sell in category 10: an interval join of auctions
  (keyed by seller) and persons (keyed by id). Flink's q3 is a join without a
  time bound (its state grows for ever); here a person is kept 60 s of event
  time, far beyond the generator's largest seller lag (about 6 s at the
  default rate), so the result is the same.
- q4: the average closing price per category: stage 1 joins auctions and bids
  by auction (a bid counts between the auction's start and its expiry) and
  takes the highest bid per auction; stage 2, keyed by category, averages.
  Over a bounded input stage 1 emits at its end (a bounded Aggregate), which
  is what the exchange between stages takes (append-only, see
  ``rf.sources.Upstream``).
- q5: the auctions with the most bids per 10 s window sliding by 2 s: stage 1,
  keyed by auction, counts per window and keeps each partition's top auctions
  per window (``rf.ops.Top``); stage 2, keyed by window, keeps the top among
  those.
- q7: the highest bids per 10 s tumbling window, in the same two stages.
  Flink's q7 compares ``dateTime BETWEEN window_end - 10 s AND window_end``
  (both ends inclusive, so a bid exactly on a boundary counts in two windows);
  here windows are half-open, as everywhere else.
- q8: persons who opened an auction in the 10 s window in which they
  registered: a tumbling-window semi join of persons (by id) and auctions (by
  seller).
- q11: bids per bidder session (10 s gap): a session window.
- q13: bids enriched from a side table (``key`` = auction mod 10,000): a
  lookup join (``rf.ops.Lookup``) against a Parquet file every consumer holds.
- q14: a computed projection of bids in a price range (hour kinds, a count of
  'c' in ``extra``): one vectorized Map.
- q21: a channel id from the channel's name or, by a regular expression, the
  url: one vectorized Map.

Reported per query: events/s (Nexmark events: persons + auctions + bids of the
stream; a query that reads only bids still stands for the whole stream, as in
Flink's suite, whose source generates all three), events/s per core
(``os.cpu_count()`` of this machine, every stage and actor included), and
Flink's published per-core figure of its V1 suite where the issue gives one.
Prints a table, writes ``bench/results/nexmark.json``. Never asserts timings.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

import rayflow as rf
from bench._common import write_json  # noqa: E402
from rayflow.partitioning import PartitionMap, hash_arrays
from rayflow.sources.nexmark import generate

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ("person", "auction", "bid")
#: File names of ``--input``.
FILES = {"person": "persons.parquet", "auction": "auctions.parquet", "bid": "bids.parquet"}
#: Flink V1 (8 x 1-slot task managers, RocksDB, exactly-once checkpoints), events/s per core.
FLINK_PER_CORE = {"q0": 155e3, "q1": 158e3, "q5": 22.1e3, "q7": 12.3e3, "q8": 146e3}
#: How long q3 keeps a person for the auctions that name it as seller (see the module doc).
Q3_PERSON_KEEP_S = 60.0
#: How long q4 keeps an auction for its bids: above the generator's longest auction.
Q4_AUCTION_KEEP_S = 60.0


@dataclass(frozen=True)
class Query:
    """One Nexmark query: the inputs it reads, its pipeline, its DuckDB reference."""

    name: str
    kinds: tuple[str, ...]
    #: ``build(sources, **pipeline kwargs) -> rf.Pipeline``; ``sources``: kind -> rf source.
    build: Callable[..., rf.Pipeline]
    #: DuckDB SQL over the tables ``person``, ``auction``, ``bid``: the expected result.
    sql: str
    #: The result's columns (the Flink sink table's names), in order.
    columns: tuple[str, ...]


def _select(columns: list[str], schema: pa.Schema) -> rf.ops.Map:
    """A projection, with its output schema (so a next stage knows what it reads)."""
    out = pa.schema([schema.field(c) for c in columns])
    return rf.ops.Map(lambda t: t.select(columns), output_schema=out)


def _renamed(names: dict[str, str], schema: pa.Schema) -> rf.ops.Map:
    """Select and rename ``{old: new}`` (in that order)."""
    out = pa.schema([schema.field(old).with_name(new) for old, new in names.items()])
    return rf.ops.Map(lambda t: t.select(list(names)).rename_columns(list(names.values())), output_schema=out)


BID = generate("bid", 0, 0).schema
PERSON = generate("person", 0, 0).schema
AUCTION = generate("auction", 0, 0).schema


# ----------------------------------------------------------------------------- the queries


def q0(src, **kw):
    return rf.Pipeline(source=src["bid"], key="auction", operator=_select(_Q0, BID), **kw)


_Q0 = ["auction", "bidder", "price", "dateTime", "extra"]


def _euro(t: pa.Table) -> pa.Table:
    t = t.select(_Q0)
    return t.set_column(2, "price", pc.multiply(t.column("price").cast(pa.float64()), 0.908))


def q1(src, **kw):
    out = pa.schema([BID.field(c) for c in _Q0]).set(2, pa.field("price", pa.float64()))
    return rf.Pipeline(source=src["bid"], key="auction", operator=rf.ops.Map(_euro, output_schema=out), **kw)


def q2(src, **kw):
    return rf.Pipeline(
        source=src["bid"],
        key="auction",
        operator=[
            rf.ops.Filter(pc.equal(pc.modulo(pc.field("auction"), 123), 0)),
            _select(["auction", "price"], BID),
        ],
        **kw,
    )


def q3(src, **kw):
    keep = (pc.field("_source") == "auction") & (pc.field("category") == 10)
    keep |= (pc.field("_source") == "person") & pc.field("state").isin(["OR", "ID", "CA"])
    joined = pa.schema(
        [("id", pa.int64()), ("name", pa.string()), ("city", pa.string()), ("state", pa.string())]
    )
    return rf.Pipeline(
        source=[rf.sources.Input("person", src["person"], key="id"), rf.sources.Input("auction", src["auction"], key="seller")],
        operator=[
            rf.ops.Filter(keep),
            rf.ops.Join(
                left="auction", right="person", on=("seller", "id"), within_s=(-Q3_PERSON_KEEP_S, 1.0),
                left_columns=["id"], right_columns=["name", "city", "state"],
            ),
            _select(["name", "city", "state", "id"], joined),
        ],
        event_time="dateTime",
        **kw,
    )  # fmt: skip


def q4(src, **kw):
    closing = pa.schema([("id", pa.int64()), ("category", pa.int64()), ("price_max", pa.int64())])
    return rf.Pipeline(
        source=[rf.sources.Input("auction", src["auction"], key="id"), rf.sources.Input("bid", src["bid"], key="auction")],
        operator=[
            rf.ops.Join(
                left="auction", right="bid", on=("id", "auction"), within_s=(0.0, Q4_AUCTION_KEEP_S),
                left_columns=["id", "category", "expires"], right_columns=["price", "dateTime"],
            ),
            rf.ops.Filter(pc.field("dateTime") <= pc.field("expires")),
            rf.ops.Aggregate(by=["id", "category"], aggs=[("price", "max")]),
            _select(["id", "category", "price_max"], closing),
        ],
        stages=[
            rf.Stage(
                key="category",
                operator=[
                    rf.ops.Aggregate(by="category", aggs=[("price_max", "mean")]),
                    _renamed({"category": "id", "price_max_mean": "final"},
                             pa.schema([("category", pa.int64()), ("price_max_mean", pa.float64())])),
                ],
            )
        ],
        event_time="dateTime",
        **kw,
    )  # fmt: skip


def q5(src, **kw):
    counted = pa.schema(
        [("window_start", pa.timestamp("ms")), ("window_end", pa.timestamp("ms")), ("auction", pa.int64()),
         ("auction_count", pa.int64())]
    )  # fmt: skip
    return rf.Pipeline(
        source=src["bid"],
        key="auction",
        operator=[
            rf.ops.Window(by="auction", aggs=[("auction", "count")], hopping_s=(10.0, 2.0)),
            rf.ops.Top(value="auction_count", window=("window_start", "window_end")),
        ],
        stages=[
            rf.Stage(
                key="window_start",
                event_time="window_start",
                operator=[
                    rf.ops.Top(value="auction_count", window=("window_start", "window_end")),
                    _renamed({"auction": "auction", "auction_count": "num"}, counted),
                ],
            )
        ],
        event_time="dateTime",
        **kw,
    )


def q7(src, **kw):
    top = pa.schema([*BID, ("window_start", pa.timestamp("ms")), ("window_end", pa.timestamp("ms"))])
    return rf.Pipeline(
        source=src["bid"],
        key="auction",
        operator=[rf.ops.Top(value="price", tumbling_s=10.0)],
        stages=[
            rf.Stage(
                key="window_start",
                event_time="window_start",
                operator=[
                    rf.ops.Top(value="price", window=("window_start", "window_end")),
                    _select(["auction", "price", "bidder", "dateTime", "extra"], top),
                ],
            )
        ],
        event_time="dateTime",
        **kw,
    )


def q8(src, **kw):
    joined = pa.schema([("id", pa.int64()), ("name", pa.string()), ("window_start", pa.timestamp("ms"))])
    return rf.Pipeline(
        source=[rf.sources.Input("person", src["person"], key="id"), rf.sources.Input("auction", src["auction"], key="seller")],
        operator=[
            rf.ops.Join(left="person", right="auction", on=("id", "seller"), tumbling_s=10.0, how="semi",
                        left_columns=["id", "name"]),
            _renamed({"id": "id", "name": "name", "window_start": "stime"}, joined),
        ],
        event_time="dateTime",
        **kw,
    )  # fmt: skip


def q11(src, **kw):
    sessions = pa.schema(
        [("window_start", pa.timestamp("ms")), ("window_end", pa.timestamp("ms")), ("bidder", pa.int64()),
         ("bidder_count", pa.int64())]
    )  # fmt: skip
    return rf.Pipeline(
        source=src["bid"],
        key="bidder",
        operator=[
            rf.ops.Window(by="bidder", aggs=[("bidder", "count")], session_gap_s=10.0),
            _renamed({"bidder": "bidder", "bidder_count": "bid_count", "window_start": "starttime",
                      "window_end": "endtime"}, sessions),
        ],
        event_time="dateTime",
        **kw,
    )  # fmt: skip


_Q14 = ["auction", "bidder", "price", "bidTimeType", "dateTime", "extra", "c_counts"]


def _q14(t: pa.Table) -> pa.Table:
    """Flink's q14: the euro price in a range, the hour's kind, the count of 'c' in extra."""
    euro = pc.multiply(t.column("price").cast(pa.float64()), 0.908)
    t = t.filter(pc.and_(pc.greater(euro, 1_000_000), pc.less(euro, 50_000_000)))
    euro = pc.multiply(t.column("price").cast(pa.float64()), 0.908)
    hour = pc.hour(t.column("dateTime"))
    day = pc.and_(pc.greater_equal(hour, 8), pc.less_equal(hour, 18))
    night = pc.or_(pc.less_equal(hour, 6), pc.greater_equal(hour, 20))
    kind = pc.if_else(day, "dayTime", pc.if_else(night, "nightTime", "otherTime"))
    extra = t.column("extra")
    c_counts = pc.subtract(pc.utf8_length(extra), pc.utf8_length(pc.replace_substring(extra, "c", "")))
    return pa.table(
        [
            t.column("auction"),
            t.column("bidder"),
            euro,
            kind,
            t.column("dateTime"),
            extra,
            c_counts.cast(pa.int64()),
        ],
        names=_Q14,
    )


def q14(src, **kw):
    out = pa.schema(
        [("auction", pa.int64()), ("bidder", pa.int64()), ("price", pa.float64()), ("bidTimeType", pa.string()),
         ("dateTime", pa.timestamp("ms")), ("extra", pa.string()), ("c_counts", pa.int64())]
    )  # fmt: skip
    return rf.Pipeline(source=src["bid"], key="auction", operator=rf.ops.Map(_q14, output_schema=out), **kw)


#: q13's side input: ``key`` 0..9999 and its ``value`` (as the nexmark repo's side_input.txt).
SIDE_KEYS = 10_000


def side_input(path: str) -> str:
    """Write q13's side input table (Parquet) at ``path`` once; returns the path."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        keys = pa.array(range(SIDE_KEYS), pa.int64())
        pq.write_table(pa.table({"key": keys, "value": pc.cast(keys, pa.string())}), path)
    return path


def _side_key(t: pa.Table) -> pa.Table:
    return t.append_column("key", pc.modulo(t.column("auction"), SIDE_KEYS))


def q13(src, **kw):
    side = side_input(os.path.join(os.fspath(kw["checkpoint_dir"]), "side_input.parquet"))
    keyed = pa.schema([*BID, ("key", pa.int64())])
    joined = pa.schema([*keyed, ("value", pa.string())])
    return rf.Pipeline(
        source=src["bid"],
        key="auction",
        operator=[
            rf.ops.Map(_side_key, output_schema=keyed),
            rf.ops.Lookup(side, on="key", how="inner", columns=["value"]),
            _renamed({"auction": "auction", "bidder": "bidder", "price": "price", "dateTime": "customTime",
                      "value": "value"}, joined),
        ],
        **kw,
    )  # fmt: skip


_CHANNEL_IDS = {"apple": "0", "google": "1", "facebook": "2", "baidu": "3"}


def _q21(t: pa.Table) -> pa.Table:
    """Flink's q21: a channel id from the channel's name, else from the url."""
    lower = pc.utf8_lower(t.column("channel"))
    found = pc.extract_regex(t.column("url"), r"(?:&|^)channel_id=(?P<id>[^&]*)")
    cid = pc.if_else(pc.is_valid(found), pc.struct_field(found, [0]), pa.scalar(None, pa.string()))
    for name, code in _CHANNEL_IDS.items():
        cid = pc.if_else(pc.equal(lower, name), code, cid)
    t = t.select(["auction", "bidder", "price", "channel"]).append_column("channel_id", cid)
    return t.filter(pc.is_valid(t.column("channel_id")))


def q21(src, **kw):
    out = pa.schema([BID.field("auction"), BID.field("bidder"), BID.field("price"), BID.field("channel"),
                     ("channel_id", pa.string())])  # fmt: skip
    return rf.Pipeline(source=src["bid"], key="auction", operator=rf.ops.Map(_q21, output_schema=out), **kw)


# DuckDB's references: the Flink SQL of each query, with windows as integer arithmetic on ms.
_MS = "epoch_ms(dateTime::TIMESTAMP)"  # (DuckDB 2.0 has no epoch_ms of a TIMESTAMP_MS)
QUERIES = {
    q.name: q
    for q in [
        Query("q0", ("bid",), q0, "SELECT auction, bidder, price, dateTime, extra FROM bid", tuple(_Q0)),
        Query(
            "q1", ("bid",), q1,
            "SELECT auction, bidder, 0.908 * price AS price, dateTime, extra FROM bid", tuple(_Q0),
        ),
        Query("q2", ("bid",), q2, "SELECT auction, price FROM bid WHERE auction % 123 = 0", ("auction", "price")),
        Query(
            "q3", ("person", "auction"), q3,
            "SELECT P.name, P.city, P.state, A.id FROM auction A JOIN person P ON A.seller = P.id "
            "WHERE A.category = 10 AND P.state IN ('OR', 'ID', 'CA')",
            ("name", "city", "state", "id"),
        ),
        Query(
            "q4", ("auction", "bid"), q4,
            "SELECT category AS id, avg(final) AS final FROM (SELECT A.id, A.category, max(B.price) AS final "
            "FROM auction A JOIN bid B ON A.id = B.auction AND B.dateTime BETWEEN A.dateTime AND A.expires "
            "GROUP BY A.id, A.category) GROUP BY category",
            ("id", "final"),
        ),
        Query(
            "q5", ("bid",), q5,
            f"WITH w AS (SELECT auction, ({_MS} // 2000 - k) * 2000 AS ws FROM bid, range(5) r(k)), "
            "c AS (SELECT auction, ws, count(*) AS num FROM w GROUP BY ALL) "
            "SELECT auction, num FROM c QUALIFY num = max(num) OVER (PARTITION BY ws)",
            ("auction", "num"),
        ),
        Query(
            "q7", ("bid",), q7,
            f"SELECT auction, price, bidder, dateTime, extra FROM bid "
            f"QUALIFY price = max(price) OVER (PARTITION BY {_MS} // 10000)",
            ("auction", "price", "bidder", "dateTime", "extra"),
        ),
        Query(
            "q8", ("person", "auction"), q8,
            f"SELECT DISTINCT P.id, P.name, epoch_ms(({_MS.replace('dateTime', 'P.dateTime')} // 10000) "
            "* 10000) AS stime FROM person P JOIN auction A ON P.id = A.seller AND "
            f"{_MS.replace('dateTime', 'P.dateTime')} // 10000 = {_MS.replace('dateTime', 'A.dateTime')} // 10000",
            ("id", "name", "stime"),
        ),
        Query(
            "q11", ("bid",), q11,
            f"WITH o AS (SELECT bidder, {_MS} AS t, CASE WHEN {_MS} - lag({_MS}) OVER (PARTITION BY bidder "
            f"ORDER BY {_MS}) < 10000 THEN 0 ELSE 1 END AS starts FROM bid), "
            "s AS (SELECT *, sum(starts) OVER (PARTITION BY bidder ORDER BY t ROWS UNBOUNDED PRECEDING) AS sid "
            "FROM o) SELECT bidder, count(*) AS bid_count, epoch_ms(min(t)) AS starttime, "
            "epoch_ms(max(t) + 10000) AS endtime FROM s GROUP BY bidder, sid",
            ("bidder", "bid_count", "starttime", "endtime"),
        ),
        Query(
            "q14", ("bid",), q14,
            "SELECT auction, bidder, 0.908 * price AS price, CASE WHEN hour(dateTime) BETWEEN 8 AND 18 THEN "
            "'dayTime' WHEN hour(dateTime) <= 6 OR hour(dateTime) >= 20 THEN 'nightTime' ELSE 'otherTime' END "
            "AS bidTimeType, dateTime, extra, length(extra) - length(replace(extra, 'c', '')) AS c_counts "
            "FROM bid WHERE 0.908 * price > 1000000 AND 0.908 * price < 50000000",
            tuple(_Q14),
        ),
        Query(
            "q13", ("bid",), q13,
            f"SELECT auction, bidder, price, dateTime AS customTime, CAST(auction % {SIDE_KEYS} AS VARCHAR) AS value "
            "FROM bid",
            ("auction", "bidder", "price", "customTime", "value"),
        ),
        Query(
            "q21", ("bid",), q21,
            "SELECT auction, bidder, price, channel, CASE lower(channel) WHEN 'apple' THEN '0' WHEN 'google' "
            "THEN '1' WHEN 'facebook' THEN '2' WHEN 'baidu' THEN '3' ELSE CASE WHEN "
            "regexp_matches(url, '(&|^)channel_id=([^&]*)') THEN regexp_extract(url, '(&|^)channel_id=([^&]*)', 2) "
            "END END AS channel_id FROM bid WHERE regexp_matches(url, '(&|^)channel_id=([^&]*)') OR "
            "lower(channel) IN ('apple', 'google', 'facebook', 'baidu')",
            ("auction", "bidder", "price", "channel", "channel_id"),
        ),
    ]
}  # fmt: skip


# ----------------------------------------------------------------------------- running


def sources_for(kinds, *, events: int | None, seed: int, splits: int, input_dir: str | None) -> dict:
    """The sources of a query's inputs: generated, or the ``--input`` files."""
    if input_dir is not None:
        return {k: rf.sources.Parquet(os.path.join(input_dir, FILES[k])) for k in kinds}
    return {k: rf.sources.Nexmark(k, events=events, seed=seed, splits=splits) for k in kinds}


def reference(query: Query, tables: dict[str, pa.Table]) -> pa.Table:
    """The query's expected result: its SQL in DuckDB over the same events."""
    import duckdb

    con = duckdb.connect()
    try:
        for kind, t in tables.items():
            con.register(kind, t)
        return con.sql(query.sql).to_arrow_table()
    finally:
        con.close()


def read_result(path: str) -> pa.Table:
    """A query's published result (the last stage's Parquet directory)."""
    if not os.path.isdir(path) or not any(f.endswith(".parquet") for f in os.listdir(path)):
        return pa.table({})
    return pads.dataset(path, format="parquet").to_table()


def same_rows(got: pa.Table, expected: pa.Table, columns) -> bool:
    """Both hold the same rows (a multiset), floats to 1e-9 relative."""
    if got.num_rows != expected.num_rows:
        return False
    if got.num_rows == 0:
        return True
    cols = list(columns)
    got = got.select(cols)
    expected = expected.select(cols).cast(got.schema, safe=False)
    order = [(c, "ascending") for c in cols]
    a, b = got.sort_by(order), expected.sort_by(order)
    for c in cols:
        x, y = a.column(c), b.column(c)
        if pa.types.is_floating(x.type):
            if not pc.all(pc.less_equal(pc.abs(pc.subtract(x, y)), pc.multiply(pc.abs(y), 1e-9))).as_py():
                return False
        elif not x.equals(y):
            return False
    return True


def run_query(
    query: Query,
    *,
    events: int | None,
    seed: int,
    input_dir: str | None,
    work: str,
    partitions: int,
    consumers: int,
    sources: int,
    interval_s: float,
    address: str | None = None,
) -> tuple[dict, pa.Table]:
    """Run one query to its end; returns its figures and its result."""
    out = os.path.join(work, query.name, "out")
    src = sources_for(query.kinds, events=events, seed=seed, splits=max(sources * 2, 1), input_dir=input_dir)
    pipeline = query.build(
        src,
        name=f"nexmark-{query.name}",
        partitions=partitions,
        consumers=consumers,
        sink=rf.sinks.Parquet(out),
        checkpoint_dir=os.path.join(work, query.name, "ck"),
        checkpoint_interval_s=interval_s,
        config=rf.EngineConfig(num_sources=sources),
        progress=False,
    )
    t0 = time.monotonic()
    result = pipeline.run()
    wall = time.monotonic() - t0
    stages = result.stats.get("stages", [result.stats])
    startup = max(s["startup_s"] for s in stages)
    return {"wall_s": wall, "startup_s": startup, "stages": len(stages)}, read_result(out)


def skew(
    *, events: int, seed: int, work: str, partitions: int, consumers: int, sources: int, interval_s: float
) -> dict:
    """How the hot auctions load the partitions: q5's first stage (bids keyed by auction, counted
    per hopping window), sampled every 0.5 s: per partition its share of the rows, its peak lag
    (rows read, not committed), and each consumer's busy fraction with the partitions it owns."""
    bids = rf.sources.Nexmark("bid", events=events, seed=seed, splits=max(2 * sources, 1))
    stage1 = rf.Pipeline(
        name="nexmark-skew", source=bids, key="auction", partitions=partitions, consumers=consumers,
        operator=[rf.ops.Window(by="auction", aggs=[("auction", "count")], hopping_s=(10.0, 2.0)),
                  rf.ops.Top(value="auction_count", window=("window_start", "window_end"))],
        event_time="dateTime", sink=rf.sinks.Parquet(os.path.join(work, "skew", "out")),
        checkpoint_dir=os.path.join(work, "skew", "ck"), checkpoint_interval_s=interval_s,
        config=rf.EngineConfig(num_sources=sources), progress=False,
    )  # fmt: skip
    # The hot auction moves (a new one every ~1,700 events), so skew is measured per second of
    # event time, on a sample straight from the generator: the hottest auction's share of that
    # second's bids, and the hottest partition's load over the mean.
    sample = generate("bid", 0, min(events, 1_000_000), seed=seed)
    second = pc.divide(pc.cast(sample.column("dateTime"), pa.int64()), 1000).to_numpy()
    auction = sample.column("auction").to_numpy()
    part = PartitionMap.uniform(partitions).route(hash_arrays([sample.column("auction")]))
    hot_auction, hot_partition = [], []
    for sec in np.unique(second):
        rows = second == sec
        hot_auction.append(np.unique(auction[rows], return_counts=True)[1].max() / rows.sum())
        hot_partition.append(np.bincount(part[rows], minlength=partitions).max() * partitions / rows.sum())
    run = stage1.start()
    peak_lag = [0] * partitions
    busy_at_start = {}
    t0 = time.monotonic()
    try:
        while True:
            st = run.status()
            for part in st["partitions"]:
                peak_lag[part["partition"]] = max(peak_lag[part["partition"]], part.get("lag_rows", 0))
            if not busy_at_start:
                busy_at_start = {m: c["busy_s"] for m, c in st["consumers"].items()}
            if st.get("done"):
                break
            time.sleep(0.5)
        wall = time.monotonic() - t0
        owners = {}
        for part in st["partitions"]:
            owners.setdefault(part.get("owner"), []).append(part["partition"])
        rows = [part["processed_rows"] for part in sorted(st["partitions"], key=lambda x: x["partition"])]
        busy = {m: (c["busy_s"] - busy_at_start.get(m, 0.0)) / wall for m, c in st["consumers"].items()}
    finally:
        run.stop()
    mean = sum(rows) / len(rows)
    return {
        "events": events, "partitions": partitions, "consumers": consumers,
        "hottest_auction_share_per_second": float(np.mean(hot_auction)),
        "hottest_partition_over_mean_per_second": float(np.mean(hot_partition)),
        "rows_per_partition": rows, "hottest_partition_over_mean": max(rows) / mean if mean else None,
        "peak_lag_rows_per_partition": peak_lag, "consumer_busy_fraction": busy, "partitions_by_owner": owners,
        "wall_s": wall,
    }  # fmt: skip


def event_count(events: int | None, input_dir: str | None) -> int:
    if input_dir is None:
        return int(events)
    return sum(pq.ParquetFile(os.path.join(input_dir, f)).metadata.num_rows for f in FILES.values())


def write_input(events: int, seed: int, path: str) -> None:
    """The three kinds of a generated stream as ``--input`` files (for other engines to read)."""
    os.makedirs(path, exist_ok=True)
    for kind in KINDS:
        with pq.ParquetWriter(os.path.join(path, FILES[kind]), generate(kind, 0, 0, seed=seed).schema) as w:
            step = 1_000_000
            for lo in range(0, events, step):
                w.write_table(generate(kind, lo, min(events, lo + step), seed=seed))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=10_000_000, help="Nexmark events to generate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--queries", nargs="+", default=list(QUERIES), choices=list(QUERIES))
    ap.add_argument("--input", help="read persons/auctions/bids.parquet from this directory instead")
    ap.add_argument("--output", help="write each query's result as qN.parquet here")
    ap.add_argument("--write-input", metavar="DIR", help="only write the generated events as --input files")
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--consumers", type=int, default=2)
    ap.add_argument("--sources", type=int, default=2, help="source actors per stage")
    ap.add_argument("--checkpoint-interval-s", type=float, default=2.0)
    ap.add_argument("--check", action="store_true", help="compare each result with DuckDB's")
    ap.add_argument("--address", help="a Ray cluster to join (default: a local Ray)")
    ap.add_argument(
        "--skew", action="store_true", help="also report how the hot auctions load the partitions"
    )
    ap.add_argument("--json", default=os.path.join(HERE, "results", "nexmark.json"))
    args = ap.parse_args(argv)
    if args.write_input:
        write_input(args.events, args.seed, args.write_input)
        return 0

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cores = os.cpu_count() or 1
    if args.address:
        ray.init(address=args.address, logging_level="ERROR")
    else:
        ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level="ERROR")
    events = event_count(args.events, args.input)
    tables = None
    if args.check:
        tables = (
            {k: pq.read_table(os.path.join(args.input, FILES[k])) for k in KINDS}
            if args.input
            else {k: generate(k, 0, args.events, seed=args.seed) for k in KINDS}
        )
    rows = []
    work = tempfile.mkdtemp(prefix="rayflow-nexmark-")
    try:
        for name in args.queries:
            q = QUERIES[name]
            fig, result = run_query(
                q, events=args.events, seed=args.seed, input_dir=args.input, work=work,
                partitions=args.partitions, consumers=args.consumers, sources=args.sources,
                interval_s=args.checkpoint_interval_s, address=args.address,
            )  # fmt: skip
            per_s = events / fig["wall_s"]
            row = {
                "query": name, "events": events, "result_rows": result.num_rows, **fig,
                "events_per_s": per_s, "events_per_s_per_core": per_s / cores,
                "flink_per_core": FLINK_PER_CORE.get(name),
            }  # fmt: skip
            if tables is not None:
                expected = reference(q, tables)
                row["exact"] = same_rows(result, expected, q.columns)
                if not row["exact"]:
                    _show_difference(result, expected, q.columns)
            if args.output:
                os.makedirs(args.output, exist_ok=True)
                pq.write_table(result.select(list(q.columns)) if result.num_rows else result,
                               os.path.join(args.output, f"{name}.parquet"))  # fmt: skip
            rows.append(row)
            shutil.rmtree(os.path.join(work, name), ignore_errors=True)
            _print_row(row, cores)
        skewed = None
        if args.skew and args.input is None:
            skewed = skew(
                events=args.events, seed=args.seed, work=work, partitions=args.partitions,
                consumers=args.consumers, sources=args.sources, interval_s=args.checkpoint_interval_s,
            )  # fmt: skip
            print(f"skew: the hottest partition holds {skewed['hottest_partition_over_mean']:.2f} x the mean; "
                  f"rows {skewed['rows_per_partition']}; peak lag {skewed['peak_lag_rows_per_partition']}; "
                  f"busy {skewed['consumer_busy_fraction']}; per second of event time, the hottest "
                  f"auction takes {skewed['hottest_auction_share_per_second']:.0%} of the bids and the "
                  f"hottest partition {skewed['hottest_partition_over_mean_per_second']:.2f} x the mean")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
        ray.shutdown()
    write_json(args.json, {"machine": {"cores": cores, "platform": platform.platform()}, "events": events,
                           "partitions": args.partitions, "consumers": args.consumers, "sources": args.sources,
                           "checkpoint_interval_s": args.checkpoint_interval_s, "queries": rows, "skew": skewed})  # fmt: skip
    return 0 if all(r.get("exact", True) for r in rows) else 1


def _show_difference(got: pa.Table, expected: pa.Table, columns) -> None:
    """Print the rows only one side has (a few), to tell a wrong result from a rounding."""
    import duckdb

    cols = ", ".join(f'"{c}"' for c in columns)
    con = duckdb.connect()
    con.register("got", got.select(list(columns)) if got.num_rows else got)
    con.register("expected", expected.select(list(columns)))
    for a, b in (("got", "expected"), ("expected", "got")):
        rows = con.sql(f"SELECT {cols} FROM {a} EXCEPT ALL SELECT {cols} FROM {b} LIMIT 5").fetchall()
        print(f"  only in {a}: {rows}", file=sys.stderr)
    con.close()


def _print_row(row: dict, cores: int) -> None:
    if not hasattr(_print_row, "head"):
        _print_row.head = True
        print(f"{'query':6} {'events/s':>12} {'per core':>12} {'Flink/core':>11} {'ratio':>7} {'wall s':>7} "
              f"{'startup s':>9} {'rows':>9} {'exact':>6}   ({cores} cores)")  # fmt: skip
    flink = row["flink_per_core"]
    ratio = f"{row['events_per_s_per_core'] / flink:6.1f}x" if flink else "      -"
    print(
        f"{row['query']:6} {row['events_per_s']:12,.0f} {row['events_per_s_per_core']:12,.0f} "
        f"{(f'{flink:,.0f}' if flink else '-'):>11} {ratio:>7} {row['wall_s']:7.1f} {row['startup_s']:9.1f} "
        f"{row['result_rows']:9,} {str(row.get('exact', '-')):>6}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
