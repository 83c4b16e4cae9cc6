"""The Nexmark generator (rayflow/sources/nexmark.py) follows the reference (Beam's
``sources.generator``, nexmark-flink's bids) and is a pure function of (seed, event id).

Fast (no Ray): statistical checks use a fixed seed over 200k events, with
tolerances of several standard deviations.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import rayflow as rf
from rayflow.errors import ConfigError
from rayflow.sources import nexmark as nx

N = 200_000  # events: 4,000 persons, 12,000 auctions, 184,000 bids
BASE = nx.NEXMARK_BASE_TIME_MS


@pytest.fixture(scope="module")
def stream() -> dict[str, pa.Table]:
    return {kind: nx.generate(kind, 0, N, seed=7) for kind in nx.KINDS}


def ms(col) -> np.ndarray:
    return col.cast(pa.int64()).to_numpy()


def test_schemas_are_the_flink_ddl(stream):
    ts = pa.timestamp("ms")
    s = pa.string()
    i = pa.int64()
    person = [("id", i), ("name", s), ("emailAddress", s), ("creditCard", s), ("city", s),
              ("state", s), ("dateTime", ts), ("extra", s)]  # fmt: skip
    auction = [("id", i), ("itemName", s), ("description", s), ("initialBid", i), ("reserve", i),
               ("dateTime", ts), ("expires", ts), ("seller", i), ("category", i), ("extra", s)]  # fmt: skip
    bid = [
        ("auction", i),
        ("bidder", i),
        ("price", i),
        ("channel", s),
        ("url", s),
        ("dateTime", ts),
        ("extra", s),
    ]
    for kind, fields in (("person", person), ("auction", auction), ("bid", bid)):
        assert stream[kind].schema == pa.schema(fields)
        assert rf.sources.Nexmark(kind, events=100).schema == pa.schema(fields)
        assert stream[kind].column("extra").null_count == 0


def test_kinds_by_event_id_are_exactly_1_3_46():
    assert [nx.kind_of(e) for e in range(50)] == ["person"] + ["auction"] * 3 + ["bid"] * 46
    assert nx.kind_of(50) == "person" and nx.kind_of(53) == "auction" and nx.kind_of(54) == "bid"
    for events in (N, 200_037, 1, 4, 5):
        got = {kind: nx.generate(kind, 0, events).num_rows for kind in nx.KINDS} if events < 1000 else None
        want = {kind: nx.kind_count(kind, events) for kind in nx.KINDS}
        assert sum(want.values()) == events
        if got is not None:
            assert got == want
    assert {k: nx.kind_count(k, N) for k in nx.KINDS} == {"person": 4000, "auction": 12000, "bid": 184000}
    assert {k: nx.kind_count(k, 200_037) for k in nx.KINDS} == {
        "person": 4001,
        "auction": 12003,
        "bid": 184033,
    }
    k = np.arange(10_000)
    for kind in nx.KINDS:  # event_id_of is the inverse of kind_count
        e = nx.event_id_of(kind, k)
        assert all(nx.kind_of(int(x)) == kind for x in e[:200])
        assert (nx.kind_count(kind, e) == k).all() and (nx.kind_count(kind, e + 1) == k + 1).all()


def test_ids_are_consecutive_and_times_follow_the_event_ids(stream):
    person, auction = stream["person"], stream["auction"]
    assert (person["id"].to_numpy() == 1000 + np.arange(4000)).all()
    assert (auction["id"].to_numpy() == 1000 + np.arange(12000)).all()
    for kind, t in stream.items():  # dateTime = base + event id * 1000 / 10,000 events/s
        e = nx.event_id_of(kind, np.arange(t.num_rows))
        assert (ms(t["dateTime"]) == BASE + e // 10).all()
    merged = np.concatenate([ms(t["dateTime"]) for t in stream.values()])
    order = np.concatenate([nx.event_id_of(k, np.arange(t.num_rows)) for k, t in stream.items()])
    by_event = merged[np.argsort(order, kind="stable")]
    assert (np.diff(by_event) >= 0).all()  # non-decreasing by event id, over all kinds
    assert by_event[-1] - by_event[0] == (N - 1) // 10  # 10,000 events/s
    slow = nx.generate("bid", 0, 5000, first_event_rate=1000, base_time_ms=0)
    e = nx.event_id_of("bid", np.arange(slow.num_rows))
    assert (ms(slow["dateTime"]) == e).all()  # 1,000 events/s: one ms per event
    assert (np.diff(ms(slow["dateTime"])) >= 0).all()


def test_references_point_back_as_the_reference_does(stream):
    """Sellers, bidders and auctions are ids generated at or before the referring event, or at
    most PERSON_ID_LEAD / AUCTION_ID_LEAD past the newest one (the reference's deliberate leads)."""
    auction, bid = stream["auction"], stream["bid"]
    a_event = nx.event_id_of("auction", np.arange(auction.num_rows))
    newest_person = 1000 + a_event // 50
    seller = auction["seller"].to_numpy()
    assert (seller >= 1000).all() and (seller <= newest_person + nx.PERSON_ID_LEAD).all()
    assert (seller > newest_person).mean() < 0.01  # ~0.25%: a random seller (1/4) in the lead (10/1010)
    assert (seller >= newest_person - 1000).all()  # among the 1,000 active people
    b_event = nx.event_id_of("bid", np.arange(bid.num_rows))
    newest_auction = 1000 + 3 * (b_event // 50) + 2
    a = bid["auction"].to_numpy()
    assert (a >= 1000).all() and (a <= newest_auction + nx.AUCTION_ID_LEAD).all()
    assert (a >= newest_auction - 100).all()  # in flight
    assert 0.02 < (a > newest_auction).mean() < 0.07  # ~4.5%: random (1/2) in the lead (10/111)
    bidder = bid["bidder"].to_numpy()
    newest_person = 1000 + b_event // 50
    assert (bidder >= 1000).all() and (bidder <= newest_person + nx.PERSON_ID_LEAD).all()
    assert (bidder > newest_person).mean() < 0.02
    # every id referred to exists in the stream, a few epochs on (the leads are that short)
    persons = set(nx.generate("person", 0, N + 50 * 11, seed=7)["id"].to_pylist())
    auctions = set(nx.generate("auction", 0, N + 50 * 4, seed=7)["id"].to_pylist())
    assert set(seller) <= persons and set(bidder) <= persons and set(a) <= auctions


def test_hot_auctions_bidders_sellers(stream):
    a = stream["bid"]["auction"].to_numpy() - 1000
    # half the bids go to the hot auction (base-0 id a multiple of 100), the rest spread over ~111
    share = ((a % 100) == 0).mean()
    assert abs(share - (0.5 + 0.5 / 111)) < 0.01
    counts = np.bincount(a)
    top = np.sort(counts)[::-1]
    assert top[: len(counts) // 100 + 1].sum() / len(a) > 0.45  # ~1% of auctions get ~half the bids
    bidder = stream["bid"]["bidder"].to_numpy() - 1000
    assert abs(((bidder % 100) == 1).mean() - 0.75) < 0.01  # hotBiddersRatio=4: 3/4 hot
    seller = stream["auction"]["seller"].to_numpy() - 1000
    assert abs(((seller % 100) == 0).mean() - 0.75) < 0.02  # hotSellersRatio=4: 3/4 hot
    channel = stream["bid"]["channel"]
    hot = pc.is_in(channel, value_set=pa.array(nx.HOT_CHANNELS)).to_numpy(zero_copy_only=False)
    assert abs(hot.mean() - 0.5) < 0.01
    category = stream["auction"]["category"].to_numpy()
    assert set(category) == {10, 11, 12, 13, 14}


def test_prices_are_log_uniform(stream):
    for price in (stream["bid"]["price"], stream["auction"]["initialBid"]):
        p = price.to_numpy()
        assert p.min() >= 100 and p.max() <= 100_000_000
        assert abs((p < 100 * 10**3).mean() - 0.5) < 0.01
        decades = np.histogram(np.log10(p / 100), bins=6, range=(0, 6))[0] / len(p)
        assert np.abs(decades - 1 / 6).max() < 0.02
    auction = stream["auction"]
    assert (auction["reserve"].to_numpy() > auction["initialBid"].to_numpy()).all()


def test_auctions_expire_after_they_start(stream):
    auction = stream["auction"]
    length = ms(auction["expires"]) - ms(auction["dateTime"])
    assert (length >= 1).all()
    # nextAuctionLengthMs: uniform 1 .. 2 * horizon, horizon = 1,666 events at 10,000/s = 166 ms
    assert length.max() <= 2 * 167 and abs(length.mean() - 167) < 5


def test_strings_and_sizes(stream):
    person, auction, bid = stream["person"], stream["auction"], stream["bid"]
    assert set(person["state"].to_pylist()) == set(nx.US_STATES)
    assert set(person["city"].to_pylist()) == set(nx.US_CITIES)
    assert pc.all(pc.match_substring_regex(person["creditCard"], r"^\d{4} \d{4} \d{4} \d{4}$")).as_py()
    assert pc.all(pc.match_substring_regex(person["emailAddress"], r"^[a-z ]*@[a-z ]*\.com$")).as_py()
    assert pc.all(pc.match_substring_regex(person["name"], r"^[A-Z][a-z]+ [A-Z][a-z]+$")).as_py()
    for col, most in ((auction["itemName"], 19), (auction["description"], 99)):
        n = pc.utf8_length(col).to_numpy()
        assert n.max() <= most
        assert not pc.any(pc.starts_with(col, " ")).as_py() and not pc.any(pc.ends_with(col, " ")).as_py()
    assert pc.all(pc.match_substring_regex(bid["url"], r"^https://www\.nexmark\.com/[a-z_]{3,4}/")).as_py()
    for t in stream.values():
        assert pc.all(pc.match_substring_regex(t["extra"], r"^[a-z]*$")).as_py()

    def size(t: pa.Table, fixed: int) -> float:
        text = [
            pc.utf8_length(t[c]).to_numpy() for c in t.column_names if t.schema.field(c).type == pa.string()
        ]
        return float(np.mean(fixed + sum(text)))

    # the sizes the reference pads to (its idea of a row: 8 bytes a number, a string's length)
    assert abs(size(person, 8) - 200) < 2
    assert abs(size(auction, 8 * 6) - 500) < 3
    assert abs(size(bid.drop_columns(["channel", "url"]), 8 * 4) - 100) < 1


def test_same_seed_same_rows_other_seed_other_rows(stream):
    for kind in nx.KINDS:
        again = nx.generate(kind, 0, 20_000, seed=7)
        assert again.equals(stream[kind].slice(0, again.num_rows))
        other = nx.generate(kind, 0, 20_000, seed=8)
        assert not other.equals(again)
        assert (
            other["extra"].to_numpy(zero_copy_only=False) != again["extra"].to_numpy(zero_copy_only=False)
        ).mean() > 0.99
    # ids do not depend on the seed (they are the event ids' arithmetic)
    assert nx.generate("auction", 0, 5000, seed=1)["id"].equals(nx.generate("auction", 0, 5000, seed=2)["id"])


@pytest.mark.parametrize("start,stop", [(0, 1), (1, 2), (49, 51), (3, 50_003), (123_457, 150_000), (50, 50)])
def test_any_event_range_is_the_slice_of_the_whole(stream, start, stop):
    for kind in nx.KINDS:
        part = nx.generate(kind, start, stop, seed=7)
        a, b = nx.kind_count(kind, start), nx.kind_count(kind, stop)
        assert part.num_rows == b - a
        assert part.equals(stream[kind].slice(a, b - a))


def read_all(split, position):
    out, pos = [], position
    for batch, nxt in split.read(position):
        assert nxt == pos + batch.num_rows  # positions chain exactly
        assert nxt % split.batch_rows == 0 or nxt == split.size  # the grid
        out.append(batch)
        pos = nxt
    return pa.Table.from_batches(out, schema=split_schema(split)), pos


def split_schema(split):
    return nx.SCHEMAS[split.kind]


def test_splits_are_contiguous_epoch_ranges_of_one_stream(stream):
    src = rf.sources.Nexmark("bid", events=N, seed=7, splits=3, batch_rows=7_000)
    splits = src.splits()
    assert [s.name for s in splits] == [
        "nexmark-bid[0:66650]",
        "nexmark-bid[66650:133300]",
        "nexmark-bid[133300:200000]",
    ]
    assert all(s.first_event % 50 == 0 for s in splits)
    parts = [read_all(s, 0)[0] for s in splits]
    assert pa.concat_tables(parts).equals(stream["bid"])
    assert src.to_table().equals(stream["bid"])
    assert len({s.fingerprint() for s in splits}) == 3
    other = rf.sources.Nexmark("bid", events=N, seed=8, splits=3).splits()[0]
    assert other.name == splits[0].name and other.fingerprint() != splits[0].fingerprint()
    # three kinds: views of one stream, the person and auction sources hold what bids refer to
    for kind in nx.KINDS:
        assert rf.sources.Nexmark(kind, events=N, seed=7, splits=2).to_table().equals(stream[kind])


@pytest.mark.parametrize("position", [0, 1, 7_000, 12_345, 61_317, 61_318])
def test_a_split_resumes_exactly_at_a_position(stream, position):
    split = rf.sources.Nexmark("bid", events=N, seed=7, splits=3, batch_rows=7_000).splits()[0]
    tail, end = read_all(split, position)
    assert end == split.size == nx.kind_count("bid", 66_650)
    assert tail.equals(stream["bid"].slice(position, split.size - position))
    head = min(10, split.size - position)  # rows() stops at the split's end
    assert split.rows(position, position + 10).equals(stream["bid"].slice(position, head))


def test_paced_stream_is_the_unpaced_rows_in_real_time():
    rate, events = 1_000_000, 30_000  # 30 ms of events
    base = 1_000_000
    # batch_ms=5: blocks of 100 epochs (5,000 events), dealt to the splits round robin
    paced = rf.sources.Nexmark(
        "auction", rate=rate, events=events, splits=2, seed=3, base_time_ms=base, batch_ms=5
    )
    assert paced.unbounded is False and all(s.unbounded for s in paced.splits())
    want = nx.generate("auction", 0, events, seed=3, first_event_rate=rate, base_time_ms=base)
    got = paced.to_table().sort_by("id")
    assert got.equals(want)
    live = rf.sources.Nexmark("bid", rate=rate, events=events, splits=2, seed=3, batch_ms=5)
    names = [s.name for s in live.splits()]
    assert names == ["nexmark-bid[0::2]<30000", "nexmark-bid[1::2]<30000"]
    now = int(time.time() * 1000)
    read = []
    for s in live.splits():
        bound = s.bind(job_started_ms=now)
        t, end = read_all_paced(bound)
        assert end == bound.size
        assert t.equals(bound.rows(0, bound.size))
        assert 0 <= bound.available() <= bound.size
        read.append(t)
    got = pa.concat_tables(read).sort_by([("dateTime", "ascending"), ("extra", "ascending")])
    want = nx.generate("bid", 0, events, seed=3, first_event_rate=rate, base_time_ms=now)
    assert got.equals(want.sort_by([("dateTime", "ascending"), ("extra", "ascending")]))
    assert rf.sources.Nexmark("person", rate=rate).unbounded


def read_all_paced(split):
    out, pos = [], 0
    for batch, nxt in split.read(0):
        assert nxt == pos + batch.num_rows
        out.append(batch)
        pos = nxt
    return pa.Table.from_batches(out, schema=nx.SCHEMAS[split.kind]), pos


def test_arguments_are_checked():
    with pytest.raises(ConfigError, match="kind must be one of"):
        rf.sources.Nexmark("bids", events=10)
    with pytest.raises(ConfigError, match="events must be an integer >= 1"):
        rf.sources.Nexmark("bid", events=0)
    with pytest.raises(ConfigError, match="seed must be an integer"):
        rf.sources.Nexmark("bid", events=10, seed=-1)
    with pytest.raises(ConfigError, match="unknown option"):
        rf.sources.Nexmark("bid", events=10, hot_auction_ration=3)
    with pytest.raises(ConfigError, match="leave out first_event_rate"):
        rf.sources.Nexmark("bid", rate=1000, first_event_rate=2000)
    with pytest.raises(ConfigError, match="first_event_rate must be an integer"):
        nx.generate("bid", 0, 10, first_event_rate=0)
    with pytest.raises(ConfigError, match="start_event must be an integer"):
        nx.generate("bid", -1, 10)
    with pytest.raises(ConfigError, match="batch_rows"):
        rf.sources.Nexmark("bid", events=10, batch_rows=0)
    assert (
        nx.generate("bid", 0, 1000, hot_auction_ratio=1)["auction"].to_numpy().max() <= 1000 + 3 * 19 + 2 + 10
    )
