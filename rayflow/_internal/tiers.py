"""Tiers resolved against a partition map: the plain table every actor works from (pure).

:func:`resolve` turns the public ``rf.Tier`` list into a :class:`TierTable`:
tiers ordered by priority (rank 0 is the most critical, the implicit
``"default"`` tier is last), the rank of every partition, and the dedicated
consumers of each rank. It checks everything that needs the partition count
or the map (out-of-range partitions, two tiers on one partition, dedicated
consumers the job cannot spare) and raises :class:`TierError` saying what to
change.

The table is derived from the tiers *and the current map* at every start, so
after a resume with another map a tier's keys follow their keys; it is not
part of the checkpoint (a tier never changes what a partition holds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from rayflow.errors import TierError
from rayflow.partitioning import PartitionMap, _is_bytes_like, _is_int_like, hash_key
from rayflow.tiers import DEFAULT_TIER, Tier


@dataclass(frozen=True)
class TierTable:
    """Tiers by rank (0: most critical; the last one is ``"default"``)."""

    #: Name of each rank.
    names: tuple[str, ...]
    #: Rank of each partition.
    ranks: tuple[int, ...]
    #: Dedicated consumers of each rank (0: the rank shares the job's consumers).
    dedicated: tuple[int, ...]

    @property
    def num_tiers(self) -> int:
        return len(self.names)

    def name_of(self, partition: int) -> str:
        return self.names[self.ranks[partition]]

    @property
    def needs_shared(self) -> bool:
        """Some partition belongs to a rank without dedicated consumers."""
        return any(self.dedicated[r] == 0 for r in set(self.ranks))

    @property
    def trivial(self) -> bool:
        """One rank, no dedicated consumers: the same as no tiers at all."""
        return len(set(self.ranks)) == 1 and not any(self.dedicated)


def resolve(tiers: Sequence[Tier], partition_map: PartitionMap, *, consumers: int) -> TierTable:
    """The :class:`TierTable` of ``tiers`` under ``partition_map`` (checked, see module doc)."""
    tiers = list(tiers)
    if not all(isinstance(t, Tier) for t in tiers):
        raise TierError(f"tiers= takes a list of rf.Tier(name=..., priority=..., ...), got {tiers!r}")
    names = [t.name for t in tiers]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise TierError(f"tier names must be distinct, got {dup} more than once")
    prios = [t.priority for t in tiers]
    if len(set(prios)) != len(prios):
        same = sorted({(t.priority, t.name) for t in tiers if prios.count(t.priority) > 1})
        raise TierError(
            f"tiers must have distinct priorities (higher is more critical), got {same}: give each its own"
        )
    ordered = sorted(tiers, key=lambda t: -t.priority)
    n = partition_map.num_partitions
    owner: dict[int, tuple[str, str]] = {}  # partition -> (tier, how it was named)
    for t in ordered:
        named: list[tuple[int, str]] = []
        for p in t.partitions:
            if p >= n:
                raise TierError(
                    f"rf.Tier {t.name!r} names partition {p}, but the job has {n} partitions (0 to {n - 1})"
                )
            named.append((p, f"partition {p}"))
        if t.keys:
            hashes = np.array([hash_key(_key(t, k)) for k in t.keys], dtype=np.uint64)
            for k, p in zip(t.keys, partition_map.route(hashes).tolist()):
                named.append((int(p), f"key {k!r} (partition {p})"))
        for p, how in named:
            other = owner.get(p)
            if other is not None and other[0] != t.name:
                raise TierError(
                    f"partition {p} is named by two tiers: {other[0]!r} ({other[1]}) and {t.name!r} "
                    f"({how}); a partition has one tier (keys name the whole partition that holds "
                    "them): name it in one tier, or use more partitions so the keys fall apart"
                )
            owner.setdefault(p, (t.name, how))
    rank_of = {t.name: r for r, t in enumerate(ordered)}
    default = len(ordered)
    ranks = tuple(rank_of[owner[p][0]] if p in owner else default for p in range(n))
    table = TierTable(
        names=tuple([t.name for t in ordered] + [DEFAULT_TIER]),
        ranks=ranks,
        dedicated=tuple([t.dedicated_consumers for t in ordered] + [0]),
    )
    wanted = sum(table.dedicated)
    spare = consumers - (1 if table.needs_shared else 0)
    if wanted > spare:
        shared = " and keep one for the partitions no dedicated consumer serves" if table.needs_shared else ""
        raise TierError(
            f"the tiers ask for {wanted} dedicated consumers, but the job starts {consumers} consumers"
            f"{shared}: raise consumers= to at least {wanted + consumers - spare}, or lower "
            "dedicated_consumers"
        )
    return table


def _key(t: Tier, k: object) -> object:
    if isinstance(k, list):
        k = tuple(k)
    parts = k if isinstance(k, tuple) else (k,)
    if not all(p is None or isinstance(p, (int, str, bytes)) for p in parts):
        raise TierError(
            f"rf.Tier {t.name!r}: key {k!r} is not a key value (integers, strings or bytes, or a "
            "tuple of those for a composite key)"
        )
    # A one-column key hashes as its value (``hash_arrays`` of one array), not as a composite.
    return parts[0] if len(parts) == 1 else parts


# ----------------------------------------------------------------------------- consumer order

#: Per-partition fetch share of each tier relative to the tier above it (among the tiers a
#: consumer fetches for in one call): a quarter, so under a tight step budget the critical
#: partitions take most of it, and a lower tier still gets some (work-conserving: what a tier
#: does not use is left buffered for later steps, never lost).
FETCH_SHARE_STEP = 4


def step_order(partitions: Sequence[int], ranks: Sequence[int] | None, rr: int) -> list[int]:
    """The order a consumer's step serves its ``partitions``: most critical tier first, and
    within a tier round-robin from ``rr`` (so every partition of a tier progresses).

    With ``ranks=None`` (no tiers) this is plain round-robin from ``rr``. A step stops when its
    time budget is spent, so what comes last is what is throttled: the lowest tier. Strict
    priority, yet work-conserving: a lower tier is served whenever the higher ones have
    nothing buffered, so it is starved only while the higher ones keep the consumer busy.
    """
    groups: dict[int, list[int]] = {}
    for p in partitions:
        groups.setdefault(ranks[p] if ranks is not None else 0, []).append(p)
    out: list[int] = []
    for r in sorted(groups):
        g = groups[r]
        k = rr % len(g)
        out += g[k:] + g[:k]
    return out


def fetch_shares(budget: int, partitions: Sequence[int], ranks: Sequence[int] | None) -> dict[int, int]:
    """Bytes one fetch asks per partition, from the step's ``budget``: equal without tiers;
    with tiers, each tier's per-partition share is ``1 / FETCH_SHARE_STEP`` of the tier
    above's (among the tiers asked for), summing to about ``budget``; at least 1 byte (a fetch
    returns one entry whatever its size)."""
    if not partitions:
        return {}
    if ranks is None:
        return dict.fromkeys(partitions, max(1, budget // len(partitions)))
    levels = {r: i for i, r in enumerate(sorted({ranks[p] for p in partitions}))}
    weight = {p: FETCH_SHARE_STEP ** -levels[ranks[p]] for p in partitions}
    total = sum(weight.values())
    return {p: max(1, int(budget * weight[p] / total)) for p in partitions}


def check_keys(tiers: Sequence[Tier], schema: pa.Schema, key: Sequence[str]) -> None:
    """Each tier key against the key columns' types (when the job starts and the schema is
    known): a key value of another type hashes to some partition silently, never its own."""
    types = [schema.field(k).type for k in key]
    types = [t.value_type if pa.types.is_dictionary(t) else t for t in types]
    for t in tiers:
        for k in t.keys:
            parts = tuple(k) if isinstance(k, (tuple, list)) else (k,)
            if len(parts) != len(types):
                raise TierError(
                    f"rf.Tier {t.name!r}: key {k!r} has {len(parts)} part(s), but the job's key {list(key)} "
                    f"has {len(types)}: give a tuple of {len(types)} values in that order"
                )
            for part, col, typ in zip(parts, key, types):
                if part is None:
                    continue
                ints = isinstance(part, int)  # bool too, as in hash_key
                if (ints and not _is_int_like(typ)) or (not ints and not _is_bytes_like(typ)):
                    raise TierError(
                        f"rf.Tier {t.name!r}: key {k!r}: {part!r} does not match the key column "
                        f"{col!r} of type {typ} (integers for integer or time columns, str or bytes "
                        "for string or binary ones)"
                    )
