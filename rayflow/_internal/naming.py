"""Names of a pipeline's Ray actors, in one place (DESIGN §8).

Every actor lives in the ``rayflow`` namespace, named ``<pipeline>/<role>``, so
an operator finds them with ``ray list actors`` and ``rayflow status`` finds a
running job's manager from another process.
"""

from __future__ import annotations

NAMESPACE = "rayflow"


def manager_name(pipeline: str) -> str:
    return f"{pipeline}/manager"


def source_name(pipeline: str, index: int) -> str:
    return f"{pipeline}/source-{index}"


def consumer_name(pipeline: str, member: str) -> str:
    """``member`` is the consumer's member id (``consumer-<i>``)."""
    return f"{pipeline}/{member}"


def actor_name(pipeline: str, role: str) -> str:
    """``role``: ``manager``, ``source-<i>`` or ``consumer-<i>``."""
    return f"{pipeline}/{role}"
