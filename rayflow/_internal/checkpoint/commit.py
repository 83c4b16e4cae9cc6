"""The commit protocol (DESIGN §5): what a commit is, and its steps in order.

(The full protocol docstring is written with the consumer rework of issue 8.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class CommitRecord:
    """What a consumer asks the manager to record for one partition."""

    partition: int
    lease_epoch: int
    positions: dict[str, int]
    state_files: list[str]
    output_files: list[str]
    rows_in: int
    rows_total: int
    state_rows: int
    final: bool
    map_version: int
