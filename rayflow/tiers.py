"""Priority tiers: which partitions matter most, and who serves them (docs/tiers.md).

A job may rank some of its partitions above others::

    rf.Pipeline(
        ...,
        partitions=16,
        consumers=4,
        tiers=[
            rf.Tier(name="critical", priority=10, keys=["acme", "globex"], dedicated_consumers=1),
            rf.Tier(name="standard", priority=5, partitions=[0, 1]),
        ],
    )

Partitions that no tier names fall in the lowest tier, ``"default"``. A tier
is a scheduling preference, not part of the job's state: it never changes
which rows a partition holds, what is committed, or the result, so a resume
may change the tiers freely.

What a tier does (each rule a pure function, unit-tested):

- **Assignment.** Tiers are assigned most critical first. A tier with
  ``dedicated_consumers=k`` has ``k`` consumers of its own: they take only
  its partitions, and its partitions go only to them while any is alive.
  Without enough live consumers (deaths, a scale-down) dedicated roles are
  filled in priority order while at least one consumer stays shared; a tier
  left with none falls back to the shared consumers (never stops).
- **Consumers** process a step's batches most critical tier first, and
  fetch a larger share for higher tiers: a busy consumer starves its
  lower tiers before its higher ones.
- **Sources** keep part of their object-store budget for higher tiers:
  lower tiers spill to disk first (``queues.place``).

Keys name the partitions that hold them, through the job's partition map
(DESIGN §3): the whole partition takes the tier, with every other key it
holds. Two tiers whose keys land in one partition are refused
(:class:`~rayflow.errors.TierError`): use more partitions, or fewer keys.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from rayflow.errors import TierError

__all__ = ["DEFAULT_TIER", "Tier"]

#: Name of the lowest tier: the partitions that no :class:`Tier` names.
DEFAULT_TIER = "default"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True, kw_only=True)
class Tier:
    """A priority tier of partitions.

    ``name``: letters, digits, ``_.-`` (not ``"default"``, the implicit lowest
    tier). ``priority``: an integer, higher is more critical; every tier of a
    job has its own. ``partitions``: partition numbers in ``[0, partitions)``.
    ``keys``: key values (a tuple per key for a composite key, in the key's
    column order; for a multi-input job, in each input's key order); each
    names the partition that holds it. A tier names at least one partition,
    by number or by key. ``dedicated_consumers``: consumers that serve only
    this tier (0: the tier shares the job's consumers).
    """

    name: str
    priority: int
    partitions: Sequence[int] = ()
    keys: Sequence[object] = ()
    dedicated_consumers: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise TierError(f"rf.Tier name must be 1-64 letters, digits, '_', '.' or '-', got {self.name!r}")
        if self.name == DEFAULT_TIER:
            raise TierError(
                f"rf.Tier name {DEFAULT_TIER!r} is the implicit lowest tier (partitions no tier "
                "names); give the tier another name"
            )
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise TierError(f"rf.Tier {self.name!r}: priority must be an integer, got {self.priority!r}")
        if isinstance(self.partitions, (str, bytes)) or not isinstance(self.partitions, Sequence):
            raise TierError(
                f"rf.Tier {self.name!r}: partitions must be a list of integers, got {self.partitions!r}"
            )
        bad = [p for p in self.partitions if isinstance(p, bool) or not isinstance(p, int) or p < 0]
        if bad:
            raise TierError(f"rf.Tier {self.name!r}: partitions must be integers >= 0, got {bad!r}")
        if isinstance(self.keys, (str, bytes)) or not isinstance(self.keys, Sequence):
            raise TierError(
                f"rf.Tier {self.name!r}: keys must be a list of key values (keys=['a'], not keys='a'), "
                f"got {self.keys!r}"
            )
        if not self.partitions and not self.keys:
            raise TierError(f"rf.Tier {self.name!r} names no partition: give partitions=[...] or keys=[...]")
        d = self.dedicated_consumers
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise TierError(f"rf.Tier {self.name!r}: dedicated_consumers must be an integer >= 0, got {d!r}")
        # Frozen and hashable: keep the sequences as tuples.
        object.__setattr__(self, "partitions", tuple(self.partitions))
        object.__setattr__(self, "keys", tuple(self.keys))
