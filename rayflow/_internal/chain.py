"""Running a chain of operators over one partition's tables (pure, no Ray)."""

from __future__ import annotations

import pyarrow as pa

from rayflow.ops import Operator


class Chain:
    """A list of operators run in order; stateful ones absorb input until the end.

    States are a list aligned with the operators (``None`` for stateless ones).
    """

    def __init__(self, ops: list[Operator]):
        self.ops = ops
        self.stateful_indices = [i for i, op in enumerate(ops) if op.stateful]

    def init_states(self) -> list:
        return [op.init_state() for op in self.ops]

    def _run_from(self, states: list, start: int, table: pa.Table | None, out: list[pa.Table]) -> None:
        for i in range(start, len(self.ops)):
            if table is None:
                return
            states[i], table = self.ops[i].process(states[i], table)
        if table is not None and table.num_rows:
            out.append(table)

    def process(self, states: list, table: pa.Table) -> list[pa.Table]:
        """Feed one table; states are updated in place; returns the outputs."""
        out: list[pa.Table] = []
        self._run_from(states, 0, table, out)
        return out

    def finish(self, states: list) -> list[pa.Table]:
        """End of input: each stateful operator's final output flows through the rest."""
        out: list[pa.Table] = []
        for i in self.stateful_indices:
            self._run_from(states, i + 1, self.ops[i].finish(states[i]), out)
        return out

    def spec(self) -> list[dict]:
        return [op.spec() for op in self.ops]
