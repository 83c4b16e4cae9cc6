"""Nexmark (Person / Auction / Bid), the standard stream benchmark: :class:`Nexmark` and :func:`generate`.

A faithful, vectorized port of the reference generator: Beam's
``org.apache.beam.sdk.nexmark.sources.generator`` (``GeneratorConfig``,
``model/PersonGenerator``, ``AuctionGenerator``, ``BidGenerator``,
``PriceGenerator``, ``StringsGenerator``, ``LongGenerator``) with the bid
``channel`` and ``url`` of nexmark-flink (``nexmark/nexmark``,
``nexmark-flink/.../generator/model/BidGenerator.java``) and the defaults of
nexmark-flink's ``NexmarkConfiguration``.

**One stream, three views.** Events are numbered ``0, 1, 2, ...``; in each
epoch of 50 event ids, offset 0 is a person, 1..3 are auctions and 4..49 are
bids (``personProportion=1, auctionProportion=3, bidProportion=46``). A
source or a :func:`generate` call of one *kind* yields that kind's rows of the
shared event-id sequence, so the person, auction and bid sources of one
``seed`` and ``events`` are three views of ONE Nexmark stream: auctions'
sellers and bids' bidders are ids of the person view, bids' auctions ids of
the auction view, exactly as the reference derives them from the event id:

- person ``id = 1000 + epoch``; auction ``id = 1000 + 3 * epoch + offset - 1``
  (``lastBase0PersonId``, ``lastBase0AuctionId``);
- a seller is, with probability ``1 - 1/hot_sellers_ratio`` (3/4), the hot
  seller ``(lastPerson // 100) * 100`` (the first person of the last batch of
  100), else a random one of the last ``num_active_people`` persons plus
  ``PERSON_ID_LEAD`` (``nextBase0PersonId``); a bidder likewise with
  ``hot_bidders_ratio`` (the hot bidder is ``(lastPerson // 100) * 100 + 1``);
  a bid's auction is, with probability ``1 - 1/hot_auction_ratio`` (1/2), the
  hot auction ``(lastAuction // 100) * 100``, else a random one of the last
  ``num_in_flight_auctions`` auctions plus ``AUCTION_ID_LEAD``
  (``nextBase0AuctionId``). So about half of all bids go to one auction in
  100, and ids point at most ``PERSON_ID_LEAD`` / ``AUCTION_ID_LEAD`` (10)
  past the newest person / auction at that event: the reference makes "newPerson
  and newAuction events appear to have been swapped in time" on purpose, so
  a join of a prefix of the stream misses those few rows.
- ``dateTime = base_time_ms + event_id * 1000 // first_event_rate``
  (``timestampAndInterEventDelayUsForEvent`` for a constant rate), the same
  for every kind; an auction ``expires`` ``1 + uniform[0, 2 * horizon)`` ms
  later, the horizon being the time until ``num_in_flight_auctions`` more
  auctions are due (``nextAuctionLengthMs``).
- prices are log-uniform: ``round(10 ** (u * 6) * 100)`` cents, u uniform in
  [0, 1) (``PriceGenerator.nextPrice``); ``reserve = initialBid + nextPrice``.
- strings as ``StringsGenerator``: random ``a..z`` words of 3..max-1
  characters, a space (or ``_`` in urls) with probability 1/13, trimmed; an
  ``extra`` of random letters pads each event to the average sizes (person
  200, auction 500, bid 100 bytes), uniform in +-20% of what is missing.

**Determinism.** Every field is a pure function of ``(seed, configuration,
kind, event id)``: the random words of an event come from numpy's
counter-based Philox generator keyed by the seed and the kind, with the
counter at the event's index within its kind, so any range of events is
generated on its own, in one vectorized pass, and a sub-range regenerates
exactly the rows of the whole; splits of a source generate in parallel, and a
split resumed at a position yields the same rows.

**Deviations from the reference** (all deliberate, none changes a
distribution the queries depend on):

- The random numbers are Philox's, not ``java.util.Random(eventId)``'s, so the
  values differ from Beam's run for run (no two reference implementations
  agree here either: nexmark-flink draws from one unseeded ``Random``).
- Splits of one source cut ONE timeline (the event time is a function of the
  global event id) instead of Beam's parallel timelines per generator, so the
  union of the splits is the same stream whatever their number.
- A bid's bidder adds ``FIRST_PERSON_ID`` once, as Beam does (nexmark-flink
  adds it twice, a bug that moves bidders off the person ids).
- nexmark-flink's hot urls and channel urls come from an unseeded ``Random``
  (different in every process); here they come from the seed.
- Only a constant event rate (``first_event_rate``), no rate shapes, no
  out-of-order groups (``outOfOrderGroupSize=1``, the default).
- Padding letters come from random bytes (each letter with probability 9/256
  or 10/256) rather than ``nextExactString``'s base-26 digits (which also
  yields a few characters below ``a`` from negative ints).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayflow.errors import ConfigError
from rayflow.sources.base import Source, Split, _check_batch_rows, wait_until_due

# ----------------------------------------------------------------------------- reference constants

#: GeneratorConfig: ids start here so that queries find matches even on small data sets.
FIRST_PERSON_ID = 1000
FIRST_AUCTION_ID = 1000
FIRST_CATEGORY_ID = 10
#: AuctionGenerator: few categories, so that the example queries find results.
NUM_CATEGORIES = 5
#: GeneratorConfig proportions: out of every 50 event ids, 1 person, 3 auctions, 46 bids.
PERSON_PROPORTION = 1
AUCTION_PROPORTION = 3
BID_PROPORTION = 46
PROPORTION_DENOMINATOR = PERSON_PROPORTION + AUCTION_PROPORTION + BID_PROPORTION
#: Person / AuctionGenerator: how many not yet created ids a random pick may name.
PERSON_ID_LEAD = 10
AUCTION_ID_LEAD = 10
#: HOT_SELLER_RATIO / HOT_AUCTION_RATIO / HOT_BIDDER_RATIO: the hot one is the first of each batch of 100.
HOT_BATCH = 100
#: nexmark-flink BidGenerator: half the bids come from one of the hot channels.
HOT_CHANNELS_RATIO = 2
HOT_CHANNELS = ("Google", "Facebook", "Baidu", "Apple")
CHANNELS_NUMBER = 10_000
#: StringsGenerator: the shortest random string, before trimming.
MIN_STRING_LENGTH = 3
US_STATES = ("AZ", "CA", "ID", "OR", "WA", "WY")
US_CITIES = (
    "Phoenix", "Los Angeles", "San Francisco", "Boise", "Portland",
    "Bend", "Redmond", "Seattle", "Kent", "Cheyenne",
)  # fmt: skip
FIRST_NAMES = ("Peter", "Paul", "Luke", "John", "Saul", "Vicky", "Kate", "Julie", "Sarah", "Deiter", "Walter")
LAST_NAMES = ("Shultz", "Abrams", "Spencer", "White", "Bartels", "Walton", "Smith", "Jones", "Noris")

KINDS = ("person", "auction", "bid")

#: The event time of event 0 by default: fixed (nexmark-flink uses the wall clock), so that every
#: run and every process generates the same rows. 2023-11-14T22:13:20Z, WORKLOAD.md's T0.
NEXMARK_BASE_TIME_MS = 1_700_000_000_000
#: NexmarkConfiguration.firstEventRate: events per second of event time, all kinds together.
NEXMARK_FIRST_EVENT_RATE = 10_000
#: Rows per batch: a bid row is about 200 bytes in Arrow (an auction 700), so 100k rows keep a
#: batch near 20 MB (70 MB of auctions), large enough that per-batch costs vanish per row.
NEXMARK_BATCH_ROWS = 100_000
#: ``events`` not given and not paced: as ``Synthetic``, 10M events.
_DEFAULT_EVENTS = 10_000_000
#: A paced split releases its rows in blocks of about this many ms of event time (see Nexmark).
PACED_BATCH_MS = 50
#: Rows generated per pass: numpy's temporaries (a few MB) stay in the CPU caches and fresh
#: allocations stay small; measured faster than passes over 100k rows (and 8k-32k alike).
_CHUNK_ROWS = 16_384
#: Bumped when the generated values change (part of the fingerprint and the RNG key).
_VERSION = 1

PERSON_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("name", pa.string()),
        ("emailAddress", pa.string()),
        ("creditCard", pa.string()),
        ("city", pa.string()),
        ("state", pa.string()),
        ("dateTime", pa.timestamp("ms")),
        ("extra", pa.string()),
    ]
)
AUCTION_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("itemName", pa.string()),
        ("description", pa.string()),
        ("initialBid", pa.int64()),
        ("reserve", pa.int64()),
        ("dateTime", pa.timestamp("ms")),
        ("expires", pa.timestamp("ms")),
        ("seller", pa.int64()),
        ("category", pa.int64()),
        ("extra", pa.string()),
    ]
)
BID_SCHEMA = pa.schema(
    [
        ("auction", pa.int64()),
        ("bidder", pa.int64()),
        ("price", pa.int64()),
        ("channel", pa.string()),
        ("url", pa.string()),
        ("dateTime", pa.timestamp("ms")),
        ("extra", pa.string()),
    ]
)
SCHEMAS = {"person": PERSON_SCHEMA, "auction": AUCTION_SCHEMA, "bid": BID_SCHEMA}

# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True, kw_only=True)
class NexmarkConfig:
    """What the generated values depend on, besides the event id. Defaults: nexmark-flink's
    ``NexmarkConfiguration`` (and Beam's), except ``base_time_ms`` (fixed, see the module doc)."""

    seed: int = 0
    #: Events per second of event time (all kinds): ``dateTime`` advances by 1000 / rate ms per event.
    first_event_rate: int = NEXMARK_FIRST_EVENT_RATE
    #: ``dateTime`` of event 0, ms since the epoch.
    base_time_ms: int = NEXMARK_BASE_TIME_MS
    #: Bids go to the hot auction with probability 1 - 1/hot_auction_ratio.
    hot_auction_ratio: int = 2
    #: Auctions are the hot seller's with probability 1 - 1/hot_sellers_ratio.
    hot_sellers_ratio: int = 4
    #: Bids are the hot bidder's with probability 1 - 1/hot_bidders_ratio.
    hot_bidders_ratio: int = 4
    #: Random sellers and bidders are among the last this many persons (plus the lead).
    num_active_people: int = 1000
    #: Random bids go to the last this many auctions (plus the lead); also sets auction lengths.
    num_in_flight_auctions: int = 100
    avg_person_byte_size: int = 200
    avg_auction_byte_size: int = 500
    avg_bid_byte_size: int = 100

    def __post_init__(self) -> None:
        limits = {
            "seed": (0, 2**64 - 1),
            "first_event_rate": (1, 10**9),
            "base_time_ms": (0, 2**53),
            "hot_auction_ratio": (1, 2**31 - 1),
            "hot_sellers_ratio": (1, 2**31 - 1),
            "hot_bidders_ratio": (1, 2**31 - 1),
            "num_active_people": (1, 10**8),
            "num_in_flight_auctions": (1, 10**8),
            "avg_person_byte_size": (0, 1_000_000),
            "avg_auction_byte_size": (0, 1_000_000),
            "avg_bid_byte_size": (0, 1_000_000),
        }
        for name, (lo, hi) in limits.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ConfigError(f"rf.sources.Nexmark: {name} must be an integer in [{lo}, {hi}], got {v!r}")

    @classmethod
    def from_options(cls, where: str, **options: int) -> NexmarkConfig:
        """Build from keyword options, with a :class:`ConfigError` naming any unknown one."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"{where}: unknown option(s) {unknown}; the generator's options are {sorted(known)}"
            )
        return cls(**options)

    def time_ms(self, event_id):
        """``dateTime`` of ``event_id`` (int or int64 array): exact integer arithmetic."""
        return self.base_time_ms + (event_id * 1000) // self.first_event_rate

    def describe(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


# ----------------------------------------------------------------------------- id arithmetic

_PROPORTIONS = {"person": PERSON_PROPORTION, "auction": AUCTION_PROPORTION, "bid": BID_PROPORTION}
_FIRST_OFFSET = {"person": 0, "auction": PERSON_PROPORTION, "bid": PERSON_PROPORTION + AUCTION_PROPORTION}


def kind_of(event_id: int) -> str:
    """The kind of event ``event_id`` (``GeneratorConfig``: by its offset in its epoch of 50)."""
    off = event_id % PROPORTION_DENOMINATOR
    if off < PERSON_PROPORTION:
        return "person"
    if off < PERSON_PROPORTION + AUCTION_PROPORTION:
        return "auction"
    return "bid"


def kind_count(kind: str, event_id):
    """How many events of ``kind`` have an id below ``event_id`` (int or int64 array): the
    index within its kind of the first such event at or after ``event_id``."""
    epoch, off = divmod(event_id, PROPORTION_DENOMINATOR)
    per, first = _PROPORTIONS[kind], _FIRST_OFFSET[kind]
    if isinstance(off, np.ndarray):
        return epoch * per + np.clip(off - first, 0, per)
    return epoch * per + min(max(off - first, 0), per)


def event_id_of(kind: str, index):
    """The event id of the ``index``-th event of ``kind`` (int or int64 array)."""
    per = _PROPORTIONS[kind]
    return (index // per) * PROPORTION_DENOMINATOR + _FIRST_OFFSET[kind] + index % per


def last_base0_person_id(event_id):
    """``PersonGenerator.lastBase0PersonId``: the newest person at ``event_id`` (itself if a person)."""
    # With one person per epoch, at offset 0: the epoch's person, whatever the offset.
    return event_id // PROPORTION_DENOMINATOR


def last_base0_auction_id(event_id):
    """``AuctionGenerator.lastBase0AuctionId``: the newest auction at ``event_id`` (itself if an
    auction; -1 before the first)."""
    epoch, off = event_id // PROPORTION_DENOMINATOR, event_id % PROPORTION_DENOMINATOR
    # A person: the previous epoch's last auction; a bid: this epoch's last; an auction: itself.
    off = np.where(off < PERSON_PROPORTION, -1, np.minimum(off - PERSON_PROPORTION, AUCTION_PROPORTION - 1))
    return epoch * AUCTION_PROPORTION + off


# ----------------------------------------------------------------------------- random draws


class _Draws:
    """The random words of n events (an ``(n, width)`` uint64 matrix, one row per event), handed
    out column by column. Every field takes its own columns whatever the branch it ends in, so a
    row's values depend on its own words alone.

    With zero rows it measures: ``used`` tells how many columns a generator takes (its width).
    """

    def __init__(self, raw: np.ndarray, pad: np.ndarray):
        self.raw, self.pad = raw, pad
        self.n = raw.shape[0]
        self.used = self.pad_used = 0
        self._half: np.ndarray | None = None

    def words(self, count: int) -> tuple[int, int]:
        """``count`` fresh columns: their [start, stop) in ``raw``."""
        start = self.used
        self.used += count
        if self.used > self.raw.shape[1]:
            raise AssertionError("rf.sources.Nexmark: a generator drew more words than it measured")
        return start, self.used

    def u32(self) -> np.ndarray:
        """Uniform uint32 values (as uint64), two per word."""
        if self._half is not None:
            out, self._half = self._half, None
            return out
        a, _ = self.words(1)
        w = self.raw[:, a]
        self._half = w >> np.uint64(32)
        return w & np.uint64(0xFFFFFFFF)

    def below(self, bound) -> np.ndarray:
        """Uniform ints in [0, bound) (bound < 2**32, scalar or per row): ``Random.nextInt(bound)``
        by a multiply-shift (bias below bound / 2**32)."""
        b = np.asarray(bound).astype(np.uint64)
        return ((self.u32() * b) >> np.uint64(32)).astype(np.int64)

    def unit(self) -> np.ndarray:
        """Uniform float64 in [0, 1) with 53 random bits, as ``Random.nextDouble``."""
        a, _ = self.words(1)
        return (self.raw[:, a] >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))

    def u16(self, count: int) -> np.ndarray:
        """``(n, count)`` uniform uint16 values, four per word."""
        a, b = self.words(-(-count // 4))
        return self.raw[:, a:b].view(np.uint16)[:, :count]

    def letters(self, chars: int) -> np.ndarray:
        """At least ``chars`` random letters ``a..z`` per row: the second matrix (``pad``, kept
        apart so that it is contiguous), rewritten in place, as flat bytes (a row is
        ``pad.shape[1] * 8`` of them). One call per generator: it takes all of ``pad``. A byte b
        becomes ``'a' + b * 26 // 256``, computed eight bytes at a time."""
        if self.pad_used:
            raise AssertionError("rf.sources.Nexmark: letters() takes the whole pad, once per row")
        self.pad_used = -(-chars // 8)
        if self.pad_used > self.pad.shape[1]:
            raise AssertionError("rf.sources.Nexmark: a generator drew more letters than it measured")
        w = self.pad.reshape(-1)
        even = np.uint64(0x00FF00FF00FF00FF)
        hi = w >> np.uint64(8)
        hi &= even
        hi *= np.uint64(26)
        hi &= ~even
        w &= even
        w *= np.uint64(26)
        w >>= np.uint64(8)
        w &= even
        w |= hi
        w += np.uint64(0x6161616161616161)
        return w.view(np.uint8)


def _raw(seed: int, stream: int, first: int, n: int, width: int) -> np.ndarray:
    """The random words of rows ``first .. first + n - 1`` of a stream: row i takes the Philox
    counters ``i * width / 4 + 1 ..`` under the key (seed, stream), so its words are the same
    whatever range it is generated in."""
    per_row = width // 4  # Philox4x64 gives 4 words per counter
    gen = np.random.Generator(
        np.random.Philox(key=[seed, (_VERSION << 32) | stream], counter=[first * per_row, 0, 0, 0])
    )
    return gen.integers(0, 2**64 - 1, size=(n, width), dtype=np.uint64, endpoint=True)


#: Philox streams (the second half of the key): one per kind and its padding, one for channels.
_PERSON, _AUCTION, _BID, _CHANNELS = 1, 2, 3, 4
_PAD = 16  # + the kind's stream: the letters of its extra padding

# ----------------------------------------------------------------------------- strings


def _strings(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> pa.Array:
    """The strings ``buf[starts[i]:starts[i] + lengths[i]]`` (``buf`` flat uint8), in one copy:
    Arrow string views over ``buf`` (16 bytes per row, no data copied), cast to ``string`` in C++."""
    n = len(lengths)
    if n == 0 or buf.size == 0:
        return pa.array([""] * n, pa.string()) if buf.size == 0 else pa.array([], pa.string())
    if buf.size >= 2**31:
        raise AssertionError("rf.sources.Nexmark: a chunk's string buffer must stay below 2 GiB")
    views = np.zeros((n, 16), np.uint8)
    v32 = views.view(np.int32)
    v32[:, 0] = lengths
    starts = starts.astype(np.int64, copy=False)
    long = lengths > 12  # a view holds up to 12 bytes inline; longer ones: prefix, buffer, offset
    if long.all():  # (the padding: no mask to apply)
        views[:, 4:8] = buf[starts[:, None] + np.arange(4)]
        v32[:, 3] = starts
    elif long.any():
        s = starts[long]
        views[long, 4:8] = buf[s[:, None] + np.arange(4)]
        v32[long, 3] = s
    short = ~long
    if not long.all():
        s, ln = starts[short], lengths[short]
        inline = buf[np.minimum(s[:, None] + np.arange(12), buf.size - 1)]
        inline[np.arange(12) >= ln[:, None]] = 0  # inline bytes past the end are zero
        views[short, 4:16] = inline
    arr = pa.Array.from_buffers(pa.string_view(), n, [None, pa.py_buffer(views), pa.py_buffer(buf)])
    return arr.cast(pa.string())


def _next_string(d: _Draws, max_length: int, special: str = " ") -> tuple[pa.Array, np.ndarray]:
    """``StringsGenerator.nextString(random, max_length, special)``: 3 .. max_length-1 characters,
    each ``special`` with probability 1/13 (from a uint16: 5041 / 65536), else a letter; trimmed
    of spaces at both ends. Returns the strings and their lengths."""
    n, m = d.n, max_length - 1
    length = MIN_STRING_LENGTH + d.below(max_length - MIN_STRING_LENGTH)
    v = d.u16(m).astype(np.uint32)
    letters = np.uint32(97) + ((v - np.uint32(5041)) * np.uint32(26)) // np.uint32(65536 - 5041)
    chars = np.where(v < 5041, np.uint32(ord(special)), letters).astype(np.uint8)
    valid = np.arange(m) < length[:, None]
    start = np.zeros(n, np.int64)
    if special == " ":  # Java's trim(): the string without its leading and trailing spaces
        solid = valid & (chars != 32)
        any_ = solid.any(axis=1)
        first = solid.argmax(axis=1)
        last = m - 1 - solid[:, ::-1].argmax(axis=1)
        start = np.where(any_, first, 0)
        length = np.where(any_, last - first + 1, 0)
    return _strings(chars.reshape(-1), np.arange(n, dtype=np.int64) * m + start, length), length


def _extra_max(current_min: int, average: int) -> int:
    """The longest ``extra`` for a row whose other fields take ``current_min`` bytes."""
    if current_min > average:
        return 0
    desired = average - current_min
    delta = math.floor(desired * 0.2 + 0.5)
    return desired + max(delta - 1, 0)


def _next_extra(d: _Draws, current: np.ndarray | int, average: int, current_min: int) -> pa.Array:
    """``StringsGenerator.nextExtra``: letters so that a row's size is ``average`` bytes on
    average, uniform in ``desired - delta .. desired + delta - 1``, delta = 20% of desired."""
    n = d.n
    current = np.broadcast_to(np.asarray(current, dtype=np.int64), (n,))
    desired = np.maximum(average - current, 0)
    delta = np.floor(desired * 0.2 + 0.5).astype(np.int64)  # Java's Math.round
    pick = d.below(np.maximum(2 * delta, 1))
    size = np.where(current > average, 0, desired - delta + np.where(delta == 0, 0, pick))
    buf = d.letters(_extra_max(current_min, average))
    return _strings(buf, np.arange(n, dtype=np.int64) * (d.pad.shape[1] * 8), size)


def _next_price(d: _Draws) -> np.ndarray:
    """``PriceGenerator.nextPrice``: ``Math.round(10 ** (u * 6) * 100)``, log-uniform cents."""
    return np.floor(np.power(10.0, d.unit() * 6.0) * 100.0 + 0.5).astype(np.int64)


def _next_base0_person_id(d: _Draws, last_person: np.ndarray, cfg: NexmarkConfig) -> np.ndarray:
    """``PersonGenerator.nextBase0PersonId``: one of the last ``num_active_people`` persons, or up
    to ``PERSON_ID_LEAD`` ahead of the newest."""
    num_people = last_person + 1
    active = np.minimum(num_people, cfg.num_active_people)
    return num_people - active + d.below(active + PERSON_ID_LEAD)


# ----------------------------------------------------------------------------- the three kinds

_NAMES = pa.array([f"{f} {s}" for f in FIRST_NAMES for s in LAST_NAMES])
_NAME_LENGTHS = np.array([len(f) + 1 + len(s) for f in FIRST_NAMES for s in LAST_NAMES], np.int64)
_CITIES = pa.array(US_CITIES)
_CITY_LENGTHS = np.array([len(c) for c in US_CITIES], np.int64)
_STATES = pa.array(US_STATES)
_STATE_LENGTHS = np.array([len(s) for s in US_STATES], np.int64)
# The fewest bytes a row's other fields can take (the longest extra is drawn for it).
_PERSON_MIN = int(8 + min(_NAME_LENGTHS) + len("@.com") + 19 + min(_CITY_LENGTHS) + min(_STATE_LENGTHS))
_AUCTION_MIN = 8 + 0 + 0 + 8 * 5
_BID_SIZE = 8 * 4


def _ms(values: np.ndarray) -> pa.Array:
    return pa.array(values, type=pa.timestamp("ms"))


def _persons(d: _Draws, index: np.ndarray, cfg: NexmarkConfig) -> list[pa.Array]:
    """``PersonGenerator.nextPerson`` for the persons ``index`` (the k-th person is event 50 k)."""
    n = d.n
    event = event_id_of("person", index)
    name_ix = d.below(len(FIRST_NAMES)) * len(LAST_NAMES) + d.below(len(LAST_NAMES))
    user, user_len = _next_string(d, 7)
    host, host_len = _next_string(d, 5)
    email = pc.binary_join_element_wise(user, pc.binary_join_element_wise(host, ".com", ""), "@")
    card = np.stack([d.below(10_000) for _ in range(4)], axis=1)  # 4 groups of "%04d"
    digits = (card[:, :, None] // np.array([1000, 100, 10, 1])) % 10 + 48
    text = np.full((n, 4, 5), 32, np.uint8)
    text[:, :, :4] = digits
    text = text.reshape(n, 20)[:, :19]
    credit = pa.StringArray.from_buffers(
        n, pa.py_buffer(np.arange(n + 1, dtype=np.int32) * 19), pa.py_buffer(np.ascontiguousarray(text))
    )
    city_ix = d.below(len(US_CITIES))
    state_ix = d.below(len(US_STATES))
    size = (
        8 + _NAME_LENGTHS[name_ix] + user_len + host_len + 5 + 19 + _CITY_LENGTHS[city_ix]
        + _STATE_LENGTHS[state_ix]
    )  # fmt: skip
    extra = _next_extra(d, size, cfg.avg_person_byte_size, _PERSON_MIN)
    return [
        pa.array(index + FIRST_PERSON_ID),
        _NAMES.take(name_ix),
        email,
        credit,
        _CITIES.take(city_ix),
        _STATES.take(state_ix),
        _ms(cfg.time_ms(event)),
        extra,
    ]


def _auctions(d: _Draws, index: np.ndarray, cfg: NexmarkConfig) -> list[pa.Array]:
    """``AuctionGenerator.nextAuction`` for the auctions ``index`` (the auction's base-0 id)."""
    event = event_id_of("auction", index)
    last_person = last_base0_person_id(event)
    hot = d.below(cfg.hot_sellers_ratio) > 0
    seller = np.where(hot, (last_person // HOT_BATCH) * HOT_BATCH, _next_base0_person_id(d, last_person, cfg))
    category = FIRST_CATEGORY_ID + d.below(NUM_CATEGORIES)
    initial_bid = _next_price(d)
    now = cfg.time_ms(event)
    # nextAuctionLengthMs: the time until num_in_flight_auctions more auctions are due, doubled.
    ahead = (cfg.num_in_flight_auctions * PROPORTION_DENOMINATOR) // AUCTION_PROPORTION
    horizon = cfg.time_ms(event + ahead) - now
    length = 1 + np.floor(d.unit() * np.maximum(2 * horizon, 1)).astype(np.int64)
    name, name_len = _next_string(d, 20)
    desc, desc_len = _next_string(d, 100)
    reserve = initial_bid + _next_price(d)
    extra = _next_extra(d, 8 + name_len + desc_len + 8 * 5, cfg.avg_auction_byte_size, _AUCTION_MIN)
    return [
        pa.array(index + FIRST_AUCTION_ID),
        name,
        desc,
        pa.array(initial_bid),
        pa.array(reserve),
        _ms(now),
        _ms(now + length),
        pa.array(seller + FIRST_PERSON_ID),
        pa.array(category),
        extra,
    ]


def _bids(d: _Draws, index: np.ndarray, cfg: NexmarkConfig) -> list[pa.Array]:
    """``BidGenerator.nextBid`` (nexmark-flink's, with channel and url) for the bids ``index``."""
    event = event_id_of("bid", index)
    last_auction = last_base0_auction_id(event)
    last_person = last_base0_person_id(event)
    hot = d.below(cfg.hot_auction_ratio) > 0
    low = np.maximum(last_auction - cfg.num_in_flight_auctions, 0)  # nextBase0AuctionId
    some = low + d.below(last_auction - low + 1 + AUCTION_ID_LEAD)
    auction = np.where(hot, (last_auction // HOT_BATCH) * HOT_BATCH, some)
    hot = d.below(cfg.hot_bidders_ratio) > 0
    bidder = np.where(
        hot, (last_person // HOT_BATCH) * HOT_BATCH + 1, _next_base0_person_id(d, last_person, cfg)
    )
    price = _next_price(d)
    hot = d.below(HOT_CHANNELS_RATIO) > 0
    hot_ix = CHANNELS_NUMBER + d.below(len(HOT_CHANNELS))
    channel_ix = np.where(hot, hot_ix, d.below(CHANNELS_NUMBER))
    channels, urls = _channel_table(cfg.seed)
    extra = _next_extra(d, _BID_SIZE, cfg.avg_bid_byte_size, _BID_SIZE)
    return [
        pa.array(auction + FIRST_AUCTION_ID),
        pa.array(bidder + FIRST_PERSON_ID),
        pa.array(price),
        channels.take(channel_ix),
        urls.take(channel_ix),
        _ms(cfg.time_ms(event)),
        extra,
    ]


def _channel_rows(d: _Draws, index: np.ndarray, cfg: NexmarkConfig) -> list[pa.Array]:
    """nexmark-flink's channel table: ``channel-N`` and its url for N < 10,000 (with
    ``&channel_id=|reverse(N)|`` nine times in ten), then the hot channels and their urls."""
    parts = [_next_string(d, 5, "_")[0] for _ in range(3)]  # BidGenerator.getBaseUrl
    base = pc.binary_join_element_wise(
        "https://www.nexmark.com/", parts[0], "/", parts[1], "/", parts[2], "/item.htm?query=1", ""
    )
    with_id = (d.below(10) > 0) & (index < CHANNELS_NUMBER)
    number = np.minimum(index, CHANNELS_NUMBER - 1).astype(np.uint32)
    rev = number  # Integer.reverse, then Math.abs (which leaves Integer.MIN_VALUE negative, as Java)
    for shift, mask in ((1, 0x55555555), (2, 0x33333333), (4, 0x0F0F0F0F), (8, 0x00FF00FF)):
        m, s = np.uint32(mask), np.uint32(shift)
        rev = ((rev >> s) & m) | ((rev & m) << s)
    rev = (rev >> np.uint32(16)) | (rev << np.uint32(16))
    channel_id = pa.array(np.abs(rev.view(np.int32))).cast(pa.string())
    url = pc.if_else(with_id, pc.binary_join_element_wise(base, "&channel_id=", channel_id, ""), base)
    names = pc.binary_join_element_wise("channel-", pa.array(number).cast(pa.string()), "")
    hot = pa.array(
        np.array(HOT_CHANNELS, dtype=object)[np.maximum(index - CHANNELS_NUMBER, 0) % 4], pa.string()
    )
    names = pc.if_else(pa.array(index >= CHANNELS_NUMBER), hot, names)
    return [names, url]


@functools.lru_cache(maxsize=8)
def _channel_table(seed: int) -> tuple[pa.Array, pa.Array]:
    """Channel names and urls, indexed by channel number (hot ones at 10,000 + i), per seed."""
    chunks = _columns(
        _channel_rows, _CHANNELS, 0, CHANNELS_NUMBER + len(HOT_CHANNELS), NexmarkConfig(seed=seed)
    )
    return pa.concat_arrays([c[0] for c in chunks]), pa.concat_arrays([c[1] for c in chunks])


_Generator = Callable[[_Draws, np.ndarray, NexmarkConfig], list[pa.Array]]
_GENERATORS: dict[str, tuple[_Generator, int]] = {
    "person": (_persons, _PERSON),
    "auction": (_auctions, _AUCTION),
    "bid": (_bids, _BID),
}


@functools.lru_cache(maxsize=64)
def _width(fn: _Generator, cfg: NexmarkConfig) -> tuple[int, int]:
    """Words per row that ``fn`` draws, and padding words per row (multiples of 4, Philox's
    block), measured on zero rows."""
    d = _Draws(np.empty((0, 1 << 16), np.uint64), np.empty((0, 1 << 16), np.uint64))
    fn(d, np.empty(0, np.int64), cfg)
    return max(4, -(-d.used // 4) * 4), -(-d.pad_used // 4) * 4


def _columns(fn: _Generator, stream: int, first: int, stop: int, cfg: NexmarkConfig) -> list[list[pa.Array]]:
    """The columns of rows ``first .. stop - 1`` of a kind (indices within the kind), generated in
    chunks of ``_CHUNK_ROWS`` rows (any cut gives the same rows: each depends on its own words)."""
    width, pad_width = _width(fn, cfg)
    chunks = []
    for a in range(first, stop, _CHUNK_ROWS):
        b = min(stop, a + _CHUNK_ROWS)
        raw = _raw(cfg.seed, stream, a, b - a, width)
        pad = (
            _raw(cfg.seed, stream + _PAD, a, b - a, pad_width)
            if pad_width
            else np.empty((b - a, 0), np.uint64)
        )
        chunks.append(fn(_Draws(raw, pad), np.arange(a, b, dtype=np.int64), cfg))
    return chunks


def _kind_batches(kind: str, first: int, stop: int, cfg: NexmarkConfig) -> list[pa.RecordBatch]:
    """Rows ``first .. stop - 1`` of ``kind``, counted within the kind (the k-th auction, ...), as
    batches of up to ``_CHUNK_ROWS`` rows."""
    fn, stream = _GENERATORS[kind]
    return [
        pa.RecordBatch.from_arrays(c, schema=SCHEMAS[kind]) for c in _columns(fn, stream, first, stop, cfg)
    ]


def _kind_rows(kind: str, first: int, stop: int, cfg: NexmarkConfig) -> pa.RecordBatch:
    """:func:`_kind_batches` as one batch."""
    batches = _kind_batches(kind, first, stop, cfg)
    if len(batches) == 1:
        return batches[0]
    if not batches:
        return pa.RecordBatch.from_pylist([], schema=SCHEMAS[kind])
    return pa.RecordBatch.from_arrays(
        [pa.concat_arrays([b.column(i) for b in batches]) for i in range(len(SCHEMAS[kind]))],
        schema=SCHEMAS[kind],
    )


def _check_kind(kind: object, where: str) -> str:
    if kind not in KINDS:
        raise ConfigError(f"{where}: kind must be one of {list(KINDS)}, got {kind!r}")
    return kind  # type: ignore[return-value]


def generate(
    kind: str,
    start_event: int,
    stop_event: int,
    *,
    seed: int = 0,
    first_event_rate: int = NEXMARK_FIRST_EVENT_RATE,
    base_time_ms: int = NEXMARK_BASE_TIME_MS,
    **options: int,
) -> pa.Table:
    """The ``kind`` rows (``"person"``, ``"auction"`` or ``"bid"``) of the events with ids in
    ``[start_event, stop_event)``, in event-id order, with the kind's schema.

    The same rows as the :class:`Nexmark` source of the same seed and options
    (without pacing): ``generate("bid", 0, N)`` is ``Nexmark("bid",
    events=N).to_table()``, and any sub-range is the matching slice, so the
    benchmark's reference can regenerate exactly what a job read, and write
    the three kinds' files with the same ids. ``options``: the other fields of
    :class:`NexmarkConfig` (``hot_auction_ratio``, ``num_active_people``, ...).

    The table (chunks of up to 16,384 rows) is held in memory, about 200 bytes
    a bid and 700 an auction: write a large data set range by range (any cut
    gives the same rows). Raises :class:`ConfigError` for a bad argument.
    """
    _check_kind(kind, "rayflow.sources.nexmark.generate")
    for name, v in (("start_event", start_event), ("stop_event", stop_event)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"rayflow.sources.nexmark.generate: {name} must be an integer >= 0, got {v!r}")
    cfg = NexmarkConfig.from_options(
        "rayflow.sources.nexmark.generate",
        seed=seed,
        first_event_rate=first_event_rate,
        base_time_ms=base_time_ms,
        **options,
    )
    first, stop = kind_count(kind, start_event), kind_count(kind, max(start_event, stop_event))
    return pa.Table.from_batches(_kind_batches(kind, first, stop, cfg), schema=SCHEMAS[kind])


# ----------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class _NexmarkSplit(Split):
    """The ``kind`` rows of the events ``[first_event, stop_event)`` (``first_event`` on an epoch
    boundary): position p is the kind's row ``kind_count(first_event) + p``."""

    name: str
    kind: str
    first_event: int
    stop_event: int
    config: NexmarkConfig
    batch_rows: int

    @property
    def _first(self) -> int:
        return kind_count(self.kind, self.first_event)

    @property
    def size(self) -> int:
        return kind_count(self.kind, self.stop_event) - self._first

    def read(self, position: int) -> Iterator[tuple[pa.RecordBatch, int]]:
        size, first, p = self.size, self._first, position
        while p < size:
            end = min(size, (p // self.batch_rows + 1) * self.batch_rows)  # the grid: batch_rows
            yield _kind_rows(self.kind, first + p, first + end, self.config), end
            p = end

    def rows(self, start: int, stop: int) -> pa.Table:
        """Rows ``[start, stop)`` of the split at once (references and tests)."""
        first, stop = self._first, min(stop, self.size)
        return pa.Table.from_batches(
            [_kind_rows(self.kind, first + start, first + max(start, stop), self.config)]
        )

    def fingerprint(self) -> str:
        return (
            f"nexmark/v{_VERSION}:{self.kind}[{self.first_event}:{self.stop_event}]:{self.config.describe()}"
        )


@dataclass(frozen=True)
class _PacedNexmarkSplit(Split):
    """A paced part of the stream: the stream's events are cut into blocks of ``block_epochs``
    epochs, split ``index`` of ``stride`` takes blocks ``index, index + stride, ...`` (so every
    split keeps up with the clock), and position p is row ``p % rows_per_block`` of the split's
    ``p // rows_per_block``-th block. A batch is at most one block (and ends on the
    ``batch_rows`` grid too), released when its last event is due: ``start_ms`` plus its event's
    offset in event time. ``unbounded`` even when ``stop_event`` bounds it.
    """

    name: str
    kind: str
    index: int
    stride: int
    block_epochs: int
    stop_event: int | None  # None: never ends
    config: NexmarkConfig
    base_from_start: bool  # dateTime counts from start_ms (no base_time_ms was given)
    start_ms: int | None  # wall-clock ms of event 0's due time; None until bound to a job
    batch_rows: int
    unbounded = True

    def bind(self, *, job_started_ms: int) -> Split:
        if self.start_ms is not None:
            return self
        start = int(job_started_ms)
        cfg = dataclasses.replace(self.config, base_time_ms=start) if self.base_from_start else self.config
        return dataclasses.replace(self, start_ms=start, config=cfg)

    @property
    def _rows_per_block(self) -> int:
        return self.block_epochs * _PROPORTIONS[self.kind]

    def _kind_index(self, p: int) -> int:
        q, r = divmod(p, self._rows_per_block)
        return (self.index + q * self.stride) * self._rows_per_block + r

    def _rows_below(self, kind_rows: int) -> int:
        """How many of this split's positions hold kind rows below ``kind_rows``."""
        rpb = self._rows_per_block
        blocks = -(-kind_rows // rpb)  # the last may be partial
        mine = max(0, -(-(blocks - self.index) // self.stride))
        rows = mine * rpb
        if mine and (blocks - 1 - self.index) % self.stride == 0:
            rows -= blocks * rpb - kind_rows
        return rows

    @property
    def size(self) -> int | None:
        return None if self.stop_event is None else self._rows_below(kind_count(self.kind, self.stop_event))

    def _due_ms(self, p: int) -> int:
        """Wall-clock ms at which position ``p`` is due: when its event happens in event time."""
        event = event_id_of(self.kind, self._kind_index(p))
        return self.start_ms + (event * 1000) // self.config.first_event_rate

    def batch_end(self, p: int) -> int:
        """Where the batch holding ``p`` ends: its block's end, the ``batch_rows`` grid or the
        split's end, whichever comes first. A function of ``p`` alone (the grid)."""
        rpb = self._rows_per_block
        end = min((p // rpb + 1) * rpb, (p // self.batch_rows + 1) * self.batch_rows)
        size = self.size
        return end if size is None else min(end, size)

    def read(self, position: int) -> Iterator[tuple[pa.RecordBatch, int]]:
        if self.start_ms is None:
            raise ConfigError(f"{self.name}: a paced split must be bound to a start time (Split.bind)")
        idle = pa.RecordBatch.from_pylist([], schema=SCHEMAS[self.kind])
        size, p = self.size, position
        while size is None or p < size:
            end = self.batch_end(p)
            release_ms = self._due_ms(end - 1)
            yield from wait_until_due(release_ms, idle, p)
            k = self._kind_index(p)
            yield _kind_rows(self.kind, k, k + (end - p), self.config), end
            p = end

    def rows(self, start: int, stop: int) -> pa.Table:
        """Rows ``[start, stop)`` at once, without waiting (references and tests)."""
        out, p = [], start
        size = self.size
        stop = stop if size is None else min(stop, size)
        while p < stop:
            end = min(stop, (p // self._rows_per_block + 1) * self._rows_per_block)
            k = self._kind_index(p)
            out.append(_kind_rows(self.kind, k, k + (end - p), self.config))
            p = end
        return pa.Table.from_batches(out, schema=SCHEMAS[self.kind])

    def available(self) -> int | None:
        """The positions due so far (``None`` until bound to a start time)."""
        if self.start_ms is None:
            return None
        elapsed = int(time.time() * 1000) - self.start_ms
        if elapsed < 0:
            return 0
        # Events e with e * 1000 // rate <= elapsed: e < ceil((elapsed + 1) * rate / 1000).
        due = -(-(elapsed + 1) * self.config.first_event_rate // 1000)
        if self.stop_event is not None:
            due = min(due, self.stop_event)
        return self._rows_below(kind_count(self.kind, due))

    def fingerprint(self) -> str:
        return (
            f"nexmark/v{_VERSION}:{self.kind}[{self.index}::{self.stride}]x{self.block_epochs}"
            f":stop={self.stop_event}:{self.config.describe()}"
        )


# ----------------------------------------------------------------------------- the source


class Nexmark(Source):
    """Nexmark events of one ``kind`` (``"person"``, ``"auction"`` or ``"bid"``) as a source, with
    the Flink nexmark DDL's columns (see :data:`SCHEMAS`). See the module doc for the generator.

    Three sources of the same ``seed``, ``events`` and options (one per kind)
    are three views of one Nexmark stream; a job reading them joins bids to
    auctions and auctions to persons by id.

    - ``Nexmark(kind, events=N)`` (default 10M): the ``kind`` rows of the
      events ``[0, N)``, unpaced (as fast as they generate), ``dateTime`` from
      ``base_time_ms`` (default :data:`NEXMARK_BASE_TIME_MS`) at
      ``first_event_rate`` events/s. ``splits=n`` cuts the event ids into n
      contiguous ranges on epoch boundaries (50 events), one split each,
      named ``nexmark-<kind>[<first event>:<stop event>]``; positions count
      the split's rows of the kind. The rows are exactly ``generate(kind, 0,
      N)``'s.
    - ``Nexmark(kind, rate=R)``: a live stream, unbounded, paced at ``R``
      events/s of all kinds (``R * 46 / 50`` bids/s): each event is released
      when the wall clock reaches its event time, and its ``dateTime`` is that
      time (counted from the job's start, recorded in its catalog so that a
      resumed job reads the same rows; or from ``base_time_ms`` if given).
      ``rate`` is also the event-time rate (``first_event_rate``, which must
      then be left out or equal). With ``splits=n``, the events are cut into
      blocks of about ``batch_ms`` of event time, dealt round robin; a split
      releases a block at once when its last event is due. Add ``events=N``
      to end after N events. The values are those of the unpaced stream of
      the same rate, with the timestamps moved to the job's start.

    Caveats: ``batch_rows`` and ``batch_ms`` only cut batches; the seed, the
    options, ``events`` and ``splits`` make the data and the split names
    (names hold the event range, the fingerprint all the rest), so a job must
    resume with the same ones.
    """

    def __init__(
        self,
        kind: str,
        *,
        events: int | None = None,
        rate: int | None = None,
        seed: int = 0,
        splits: int = 1,
        batch_rows: int = NEXMARK_BATCH_ROWS,
        first_event_rate: int | None = None,
        base_time_ms: int | None = None,
        batch_ms: int = PACED_BATCH_MS,
        **options: int,
    ):
        where = "rf.sources.Nexmark"
        self.kind = _check_kind(kind, where)
        if events is None and rate is None:
            events = _DEFAULT_EVENTS
        for name, v in (("events", events), ("rate", rate), ("splits", splits), ("batch_ms", batch_ms)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{where}: {name} must be an integer >= 1, got {v!r}")
        _check_batch_rows(batch_rows)
        if rate is not None and first_event_rate is not None and first_event_rate != rate:
            raise ConfigError(
                f"{where}: rate={rate} paces the stream and is its event-time rate too; leave out "
                f"first_event_rate (got {first_event_rate}) or set it to the same value"
            )
        self.events, self.rate, self.seed, self.num_splits = events, rate, seed, splits
        self.batch_rows, self.batch_ms = batch_rows, batch_ms
        rate_ = rate if rate is not None else first_event_rate
        self.config = NexmarkConfig.from_options(
            where,
            seed=seed,
            first_event_rate=NEXMARK_FIRST_EVENT_RATE if rate_ is None else rate_,
            base_time_ms=NEXMARK_BASE_TIME_MS if base_time_ms is None else base_time_ms,
            **options,
        )
        self._base_from_start = rate is not None and base_time_ms is None

    @property
    def unbounded(self) -> bool:
        return self.events is None

    @property
    def schema(self) -> pa.Schema:
        return SCHEMAS[self.kind]

    def splits(self) -> list[Split]:
        kind, cfg = self.kind, self.config
        if self.rate is not None:
            n = self.num_splits
            block_epochs = max(1, round(self.rate * self.batch_ms / 1000 / PROPORTION_DENOMINATOR))
            if self.events is not None:  # no split without a block
                n = max(1, min(n, -(-self.events // (block_epochs * PROPORTION_DENOMINATOR))))
            stop = "" if self.events is None else f"<{self.events}"
            return [
                _PacedNexmarkSplit(
                    f"nexmark-{kind}[{j}::{n}]{stop}", kind, j, n, block_epochs, self.events, cfg,
                    self._base_from_start, None, self.batch_rows,
                )
                for j in range(n)
            ]  # fmt: skip
        epochs = -(-self.events // PROPORTION_DENOMINATOR)
        n = min(self.num_splits, epochs)
        cuts = [min(self.events, (epochs * j // n) * PROPORTION_DENOMINATOR) for j in range(n + 1)]
        return [
            _NexmarkSplit(f"nexmark-{kind}[{a}:{b}]", kind, a, b, cfg, self.batch_rows)
            for a, b in zip(cuts, cuts[1:])
        ]

    def to_table(self, positions: dict[str, int] | None = None) -> pa.Table:
        """The rows as one table, at once (references and tests): all of them, or each split's
        rows up to ``positions[split name]`` (e.g. a job's committed positions; required when
        unbounded). A paced split's ``dateTime`` counts from its ``start_ms`` when bound, else
        from ``base_time_ms``."""
        if positions is None and self.events is None:
            raise ConfigError("an unbounded Nexmark has no end: pass positions={split name: rows}")
        parts = [
            s.rows(0, s.size if positions is None else positions.get(s.name, 0))  # type: ignore[attr-defined]
            for s in self.splits()
        ]
        return pa.concat_tables(parts) if parts else self.schema.empty_table()

    def __repr__(self) -> str:
        pace = f", rate={self.rate}" if self.rate is not None else ""
        return f"rf.sources.Nexmark({self.kind!r}, events={self.events}, seed={self.seed}{pace})"
