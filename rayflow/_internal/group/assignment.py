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
"""

from __future__ import annotations

from collections.abc import Mapping


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
    held = {m: 0 for m in members}
    load = {m: 0.0 for m in members}
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
        room = [m for m in members if held[m] < quota[m]]
        m = min(room, key=lambda m: (load[m] / members[m], held[m], m))
        target[p] = m
        held[m] += 1
        load[m] += loads[p]
    return target
