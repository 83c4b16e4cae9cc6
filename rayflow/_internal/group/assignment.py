"""Target assignment of partitions to members: a pure function (DESIGN §4).

``assign(loads, members, current)`` returns the owner each partition should
have. Guarantees, each held by a property test:

- **Balanced.** Every member gets ``floor(P / N)`` or ``ceil(P / N)``
  partitions (weighted by capacity when capacities differ). Among the
  partitions that must move, each goes to the member with the least load so
  far, heaviest partition first, so load evens out and not only counts.
- **Sticky.** A partition stays with its current owner whenever that owner is
  still a member and under its quota; so a join moves about ``P / (N + 1)``
  partitions and a leave moves only the leaver's.
- **Deterministic.** Same input, same output: ties break by member id and
  partition number, never by dict or set order.

With priority tiers (docs/tiers.md), :func:`tier_roles` says which members
are dedicated to which tier and :func:`assign_tiered` assigns tier by tier,
most critical first, each tier within its pool of members, with the same
three guarantees per tier.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


def quotas(
    num_partitions: int, members: Mapping[str, float], current_counts: Mapping[str, int]
) -> dict[str, int]:
    """How many partitions each member should own: shares by capacity, rounded sticky.

    The remainder left by rounding down goes to the members that hold the most
    now (then by id), which avoids needless moves.
    """
    ids = sorted(members)
    total_cap = sum(members[m] for m in ids)
    exact = {m: num_partitions * members[m] / total_cap for m in ids}
    q = {m: int(exact[m]) for m in ids}
    left = num_partitions - sum(q.values())
    order = sorted(ids, key=lambda m: (-(exact[m] - q[m]), -current_counts.get(m, 0), m))
    for m in order[:left]:
        q[m] += 1
    return q


def assign(
    loads: Mapping[int, float],
    members: Mapping[str, float],
    current: Mapping[int, str | None],
) -> dict[int, str]:
    """Target owner of every partition in ``loads``.

    ``loads``: partition -> measured load (rows/s, or 1.0 when unknown).
    ``members``: member id -> capacity (> 0). ``current``: partition -> owner
    (or ``None``); owners that are not members are ignored.
    """
    if not members:
        return {}
    parts = sorted(loads, key=lambda p: (-loads[p], p))
    counts: dict[str, int] = {m: 0 for m in members}
    for p in loads:
        o = current.get(p)
        if o in counts:
            counts[o] += 1
    quota = quotas(len(loads), members, counts)
    target: dict[int, str] = {}
    _deal(parts, members, quota, current, loads, {m: 0.0 for m in members}, target)
    return target


# ----------------------------------------------------------------------------- tiers


def _member_order(m: str) -> tuple[int, str]:
    """Members in join order: ``consumer-2`` before ``consumer-10`` (shorter ids first)."""
    return (len(m), m)


def tier_roles(
    ranks: Sequence[int],
    dedicated: Sequence[int],
    members: Iterable[str],
    current: Mapping[int, str | None],
    *,
    live: Iterable[int],
) -> dict[str, int]:
    """Which members are dedicated to which tier: member id -> rank (members not named: shared).

    ``ranks``: the rank of each partition (0: most critical); ``dedicated``: the
    dedicated consumers each rank asks for; ``current``: partition -> owner;
    ``live``: the partitions still to serve (a tier whose partitions are all
    final needs no member). Roles are filled in rank order, most critical
    first, while at least one member stays shared when some live partition's
    tier has no dedicated consumers; so after deaths or a scale-down the least critical
    tiers lose theirs first, and a tier left with none is served by the
    shared members. No role is stored: each vacancy goes to the free member
    that holds the most of that tier's partitions less its other partitions
    (then join order), so a member keeps its role across rebalances, a
    restarted coordinator finds the roles again in the leases, and a
    promotion moves as few partitions as it can.
    """
    ms = sorted(members, key=_member_order)
    present = {ranks[p] for p in live}
    free = len(ms) - (1 if any(dedicated[r] == 0 for r in present) else 0)
    held: dict[str, dict[int, int]] = {m: {} for m in ms}
    for p, o in current.items():
        if o in held and p < len(ranks):
            held[o][ranks[p]] = held[o].get(ranks[p], 0) + 1
    roles: dict[str, int] = {}
    for r, want in enumerate(dedicated):
        for _ in range(want if r in present else 0):
            if free <= 0:
                return roles
            cands = [m for m in ms if m not in roles]
            mine = {m: held[m].get(r, 0) for m in cands}
            others = {m: sum(held[m].values()) - mine[m] for m in cands}
            best = max(cands, key=lambda m: (mine[m] - others[m], -ms.index(m)))
            roles[best] = r
            free -= 1
    return roles


def assign_tiered(
    loads: Mapping[int, float],
    members: Mapping[str, float],
    current: Mapping[int, str | None],
    *,
    ranks: Sequence[int],
    roles: Mapping[str, int],
) -> dict[int, str]:
    """Target owner of every partition in ``loads``, tier by tier (most critical first).

    Each rank's partitions go to its *pool*: its dedicated members
    (``roles``), else the shared members (those without a role), else, when
    every member has a role, all members. Within a pool, as :func:`assign`:
    sticky (a partition stays with its owner while that owner is in the pool
    and under its quota for the rank), balanced per rank (``floor``/``ceil`` of
    the rank's partitions over the pool, weighted by capacity; a remainder goes
    to the members with the fewest partitions so far, so counts also even out
    over the ranks), and by load (the rest go heaviest first to the member
    with the least load so far, counting the ranks placed before).
    Deterministic: ties break by member id and partition number.
    """
    if not members:
        return {}
    shared = {m: c for m, c in members.items() if m not in roles}
    count = {m: 0 for m in members}
    load = {m: 0.0 for m in members}
    target: dict[int, str] = {}
    for r in sorted({ranks[p] for p in loads}):
        pool = {m: c for m, c in members.items() if roles.get(m) == r} or shared or dict(members)
        parts = sorted((p for p in loads if ranks[p] == r), key=lambda p: (-loads[p], p))
        mine = {m: 0 for m in pool}
        for p in parts:
            o = current.get(p)
            if o in mine:
                mine[o] += 1
        total = sum(pool.values())
        exact = {m: len(parts) * pool[m] / total for m in pool}
        quota = {m: int(exact[m]) for m in pool}
        left = len(parts) - sum(quota.values())
        order = sorted(pool, key=lambda m: (-(exact[m] - quota[m]), count[m] / pool[m], -mine[m], m))
        for m in order[:left]:
            quota[m] += 1
        held = _deal(parts, pool, quota, current, loads, load, target)
        for m, k in held.items():
            count[m] += k
    return target


def _deal(
    parts: list[int],
    pool: Mapping[str, float],
    quota: Mapping[str, int],
    current: Mapping[int, str | None],
    loads: Mapping[int, float],
    load: dict[str, float],
    target: dict[int, str],
) -> dict[str, int]:
    """Deal ``parts`` (heaviest first) to ``pool`` within ``quota`` into ``target``: first what
    can stay with its owner, then the rest on the least loaded member with room (``load``,
    per capacity, carries over between calls). Returns how many each member got."""
    held = {m: 0 for m in pool}
    # 1. Keep what can stay, heaviest first so the heavy ones stay put.
    for p in parts:
        o = current.get(p)
        if o in held and held[o] < quota[o]:
            target[p] = o
            held[o] += 1
            load[o] += loads[p]
    # 2. Place the rest, heaviest first, on the least loaded member with room.
    for p in parts:
        if p in target:
            continue
        room = [m for m in pool if held[m] < quota[m]]
        m = min(room, key=lambda m: (load[m] / pool[m], held[m], m))
        target[p] = m
        held[m] += 1
        load[m] += loads[p]
    return held
