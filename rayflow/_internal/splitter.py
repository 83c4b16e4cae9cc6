"""The driver's thread that splits hot partitions and merges cold neighbours
(``run.start_splitter(rf.Splits(...))``).

A thin shell: every ``Splits.interval_s`` it reads each partition's ``rate_ratio``
from ``run.status()``, asks the pure policy (``_internal/splits.py``, :func:`decide`)
and carries out its decision with ``run.split`` or ``run.merge``. After a change the partition
numbers from the split one up mean other ranges: the policy starts afresh (its
cooldown kept).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque

from rayflow._internal import splits
from rayflow._internal.driver_loop import DriverLoop
from rayflow.config import Splits

logger = logging.getLogger("rayflow")

#: Decisions kept for the status.
DECISIONS_KEPT = 20


class Splitter(DriverLoop):
    """Splits a :class:`Run`'s hot partitions on a daemon thread (module doc)."""

    doing = "splitting"

    def __init__(self, run, config: Splits):
        super().__init__(run, config.interval_s, "splits")
        self.config = config
        self.policy = splits.PolicyConfig(
            factor=config.factor,
            window_s=config.window_s,
            cooldown_s=config.cooldown_s,
            max_partitions=config.max_partitions,
            merge_below=config.merge_below,
            min_partitions=config.min_partitions,
        )
        self.state = splits.PolicyState()
        self.decisions: deque[dict] = deque(maxlen=DECISIONS_KEPT)
        #: The map version the policy's figures belong to (partition numbers mean its ranges).
        self._version: int | None = None

    def step(self) -> splits.Decision:
        """One interval: read the rates, decide, split."""
        st = self.run.status()
        if st.get("done"):
            return splits.Decision(None, "done")
        version = st.get("map_version")
        if version != self._version:
            if self._version is not None:  # changed by someone else (run.split/merge): start afresh
                self.state = splits.PolicyState(last_change=time.monotonic())
            self._version = version
        rates = {p["partition"]: p.get("rate_ratio") for p in st["partitions"] if not p.get("final")}
        # The policy counts the map's partitions (max_partitions) among its rates: finished ones too.
        rates.update({p["partition"]: None for p in st["partitions"] if p.get("final")})
        shares = {p["partition"]: p["hot_keys"][0]["share"] for p in st["partitions"] if p.get("hot_keys")}
        self.state, decision = splits.decide(self.state, rates, time.monotonic(), self.policy, shares)
        if decision.partition is not None and not self.halted:
            self.decisions.append({"t": time.time(), **dataclasses.asdict(decision)})
            act = self.run.split if decision.kind == "split" else self.run.merge
            try:
                act(decision.partition, reason=decision.reason, expect_version=version)
            finally:
                # Numbers from the changed one up now mean other ranges: rates start afresh.
                self.state = splits.PolicyState(last_change=self.state.last_change)
        return decision
