"""Test doubles and helpers shipped with rayflow (STYLE §11).

- :func:`duckdb_reference` runs SQL over Arrow tables in DuckDB: the oracle a
  pipeline's result is checked against.
- :func:`assert_same_rows` compares two tables as multisets of rows.
- :func:`throttle` is a pass-through operator that holds each batch for a
  while (a rate in rows/s), so a test can stop or kill a job midway without racing it.
- :class:`FaultPlan` injects crashes and failures at named points of the
  commit path (``Pipeline(faults=...)``), at a given arrival or on a seeded
  random schedule; :func:`kill_actor` kills an actor by name.
- :class:`VisibilityLog` wraps a sink and logs when each published output row
  became visible (``bench/latency.py``'s end-to-end latency).
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass

import pyarrow as pa

from rayflow.errors import ConfigError
from rayflow.ops import Map
from rayflow.sinks import Sink
from rayflow.sinks.base import PENDING_DIR

__all__ = [
    "FAULT_POINTS",
    "KEYED_SQL",
    "Fault",
    "FaultPlan",
    "InjectedFault",
    "VisibilityLog",
    "assert_same_rows",
    "duckdb_reference",
    "keyed_reference",
    "kill_actor",
    "throttle",
]


def duckdb_reference(sql: str, **tables: pa.Table) -> pa.Table:
    """Run ``sql`` in a fresh in-memory DuckDB where each keyword names an Arrow table."""
    import duckdb

    con = duckdb.connect()
    try:
        for name, t in tables.items():
            con.register(name, t)
        return con.sql(sql).to_arrow_table()
    finally:
        con.close()


#: The WORKLOAD keyed job in SQL, over a table registered as ``events``.
KEYED_SQL = "SELECT key, count(value) AS value_count, sum(value) AS value_sum FROM events GROUP BY key"


def keyed_reference(events: pa.Table) -> pa.Table:
    """The expected result of the keyed job (``Aggregate(by="key", aggs=[count, sum])``) by DuckDB."""
    return duckdb_reference(KEYED_SQL, events=events)


def assert_same_rows(actual: pa.Table, expected: pa.Table, *, columns: list[str] | None = None) -> None:
    """Assert both tables hold the same rows (any order), comparing ``columns`` by name."""
    cols = columns or expected.column_names
    missing = [c for c in cols if c not in actual.column_names]
    assert not missing, f"result lacks columns {missing}; it has {actual.column_names}"
    a = actual.select(cols)
    e = expected.select(cols).cast(a.schema, safe=False)  # a no-op when the types already match
    order = [(c, "ascending") for c in cols]
    a, e = a.sort_by(order), e.sort_by(order)
    assert a.num_rows == e.num_rows, f"{a.num_rows} rows, expected {e.num_rows}"
    if not a.equals(e):
        for i in range(a.num_rows):
            ra, re_ = a.slice(i, 1).to_pylist()[0], e.slice(i, 1).to_pylist()[0]
            if ra != re_:
                raise AssertionError(f"first differing row (sorted) #{i}: got {ra}, expected {re_}")
        raise AssertionError("tables differ")


def throttle(rows_per_s: float) -> Map:
    """A pass-through :class:`~rayflow.ops.Map` that processes at most ``rows_per_s`` per call."""

    def _hold(table: pa.Table) -> pa.Table:
        time.sleep(table.num_rows / rows_per_s)
        return table

    return Map(_hold)


# ----------------------------------------------------------------------------- fault injection

#: Where faults can be injected, in the order a commit meets them.
FAULT_POINTS = (
    "source.batch",  # a source actor has just queued a batch
    "consumer.step",  # a consumer has just processed a fetched step
    "consumer.before_state_write",  # commit step 1, before any file is written
    "consumer.after_state_write",  # files written, the manager not yet asked to record them
    "consumer.after_commit",  # the commit is recorded, the source not yet trimmed
    "consumer.after_compaction",  # a compaction wrote its new base, no commit names it yet
    "manager.before_record",  # a commit is validated, the catalog transaction not yet run
    "manager.after_record",  # the catalog recorded it, its outputs are not yet published
    "manager.restart",  # a manager restarted by Ray, before it loads the catalog (pause: a slow restart)
    "manager.publish",  # a recorded output is about to be published (each attempt)
)


#: The points :meth:`FaultPlan.random` draws from by default: a compaction happens only once a
#: partition has ``EngineConfig.state_deltas_max`` deltas, so a kill there may never fire in a
#: short job (tests schedule it explicitly).
RANDOM_FAULT_POINTS = tuple(p for p in FAULT_POINTS if p != "consumer.after_compaction")

#: Longest a ``"pause"`` fault holds an actor if the test never resumes it.
PAUSE_MAX_S = 120.0


class InjectedFault(RuntimeError):
    """Raised by a fault whose action is ``"raise"`` (a failed write, a failed transaction)."""


@dataclass(frozen=True, kw_only=True)
class Fault:
    """One fault: at ``point``, in the actor named ``actor`` (``consumer-1``, ``source-0``,
    ``manager``; None for any), on its ``nth`` arrival there, do ``action``: ``"kill"`` (SIGKILL
    the actor's own process, as a crash would), ``"raise"`` (:class:`InjectedFault`) or
    ``"pause"`` (hold that actor's thread at the point until :meth:`FaultPlan.resume`, so a test
    can stop, scale or kill a job at an exact point of its work instead of at a time).

    Each fault counts its own arrivals; an arrival that fires one fault is not counted by the
    faults listed after it, so ``[Fault(point=p, action="raise")] * 3`` fails the first three
    arrivals."""

    point: str
    actor: str | None = None
    nth: int = 1
    action: str = "kill"

    def __post_init__(self) -> None:
        if self.point not in FAULT_POINTS:
            raise ConfigError(f"unknown fault point {self.point!r}; use one of {FAULT_POINTS}")
        if self.action not in ("kill", "raise", "pause"):
            raise ConfigError(f"fault action must be 'kill', 'raise' or 'pause', got {self.action!r}")


class FaultPlan:
    """A schedule of faults, shared by every actor of a pipeline (``Pipeline(faults=...)``).

    Arrivals are counted in files under ``dir`` (local to the machine), so a
    fault fires exactly once even though the actor it kills is restarted with
    the same plan. ``fired()`` lists what fired, for the test's message.
    """

    def __init__(self, faults: list[Fault], *, dir: str):
        self.faults = list(faults)
        self.dir = dir
        os.makedirs(dir, exist_ok=True)

    @classmethod
    def random(
        cls,
        *,
        seed: int,
        dir: str,
        count: int = 3,
        points: tuple[str, ...] = RANDOM_FAULT_POINTS,
        actors: tuple[str, ...] = ("consumer-0", "consumer-1", "source-0", "manager"),
        max_nth: int = 6,
    ) -> FaultPlan:
        """A seeded random schedule of ``count`` kills at points that fit each actor."""
        rng = random.Random(seed)
        faults = []
        for _ in range(count):
            actor = rng.choice(actors)
            kind = actor.split("-")[0]
            fitting = [p for p in points if p.startswith(kind)]
            if fitting:
                faults.append(Fault(point=rng.choice(fitting), actor=actor, nth=rng.randint(1, max_nth)))
        return cls(faults, dir=dir)

    def __repr__(self) -> str:
        return f"FaultPlan({self.faults!r})"

    def hit(self, point: str, actor: str) -> None:
        """Called by the engine at each fault point."""
        for i, f in enumerate(self.faults):
            if f.point != point or (f.actor is not None and f.actor != actor):
                continue
            with open(os.path.join(self.dir, f"{i}.count"), "ab") as fh:
                fh.write(b".")
                n = fh.tell()
            if n != f.nth:
                continue
            with open(os.path.join(self.dir, f"{i}.fired"), "w") as fh:
                fh.write(f"{actor} {point} #{n}\n")
            if f.action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if f.action == "pause":
                self._hold(i)
                return
            raise InjectedFault(f"injected fault at {point} in {actor} (#{n})")

    def _hold(self, i: int) -> None:
        """Block until the test calls :meth:`resume` (at most ``PAUSE_MAX_S``, then go on)."""
        flag = os.path.join(self.dir, f"{i}.resume")
        deadline = time.monotonic() + PAUSE_MAX_S
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.01)

    def resume(self) -> None:
        """Release every paused fault (those that fired, and those yet to fire)."""
        for i in range(len(self.faults)):
            with open(os.path.join(self.dir, f"{i}.resume"), "w"):
                pass

    def fired(self) -> list[Fault]:
        return [f for i, f in enumerate(self.faults) if os.path.exists(os.path.join(self.dir, f"{i}.fired"))]


def scale_out_while_held(run, plan: FaultPlan, *, consumers: int, held: str = "consumer-0") -> None:
    """A rebalance mid-work: once ``plan`` has held ``held`` (a ``"pause"`` fault), scale ``run``
    to ``consumers`` (the revocations wait for the held step), release it, and wait until the new
    owners have processed rows. Condition waits only (60 s each)."""
    from ray._common.test_utils import wait_for_condition

    wait_for_condition(lambda: bool(plan.fired()), timeout=60)
    run.scale(consumers=consumers)
    plan.resume()

    def new_owners_work() -> bool:
        c = run.status()["consumers"]
        return sum(x["rows_processed"] for m, x in c.items() if m != held) > 0

    wait_for_condition(new_owners_work, timeout=60)


def kill_actor(pipeline_name: str, actor: str, *, how: str = "SIGKILL") -> None:
    """Kill a pipeline's actor by name (``consumer-1``, ``source-0``, ``manager``).

    ``how``: ``"SIGKILL"`` (the process dies as in a crash; Ray restarts the
    actors that are restartable) or ``"ray.kill"`` (no restart).
    """
    import ray

    from rayflow._internal import naming

    handle = ray.get_actor(naming.actor_name(pipeline_name, actor), namespace=naming.NAMESPACE)
    if how == "ray.kill":
        ray.kill(handle, no_restart=True)
        return
    pid = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    os.kill(pid, signal.SIGKILL)


class VisibilityLog(Sink):
    """A sink that publishes through ``inner`` and logs when each output row became visible.

    For every published output file it writes ``<log_dir>/<file name>``: the
    file's ``columns`` plus ``visible_at_ms`` (wall-clock ms, taken right after
    ``inner.publish`` returned, i.e. once a reader of the sink can see the
    rows). Idempotent like any publication: a file already logged is not
    logged again. ``log_dir`` is a local directory on the manager's node.
    Benchmarks join the log with the input to get each event's end-to-end
    latency (``bench/latency.py``).
    """

    def __init__(self, inner: Sink, log_dir: str | os.PathLike, *, columns: list[str]):
        if not isinstance(inner, Sink):
            raise ConfigError(f"VisibilityLog wraps an rf.sinks sink, got {inner!r}")
        self.inner = inner
        self.log_dir = os.path.abspath(os.fspath(log_dir))
        self.columns = list(columns)
        self.keeps_output_list = inner.keeps_output_list

    def root(self, *, pipeline_root: str) -> str:
        return self.inner.root(pipeline_root=pipeline_root)

    def publish(self, store, name: str) -> None:
        import pyarrow.parquet as pq

        log = os.path.join(self.log_dir, name)
        pending = f"{PENDING_DIR}/{name}"
        rows = store.read_parquet(pending).select(self.columns) if store.exists(pending) else None
        self.inner.publish(store, name)
        if rows is None or os.path.exists(log):
            return  # published (and logged) by an earlier call
        now = int(time.time() * 1000)
        rows = rows.append_column("visible_at_ms", pa.array([now] * rows.num_rows, pa.int64()))
        os.makedirs(self.log_dir, exist_ok=True)
        pq.write_table(rows, log + ".tmp")
        os.replace(log + ".tmp", log)

    def read_output(self, store, files):
        return self.inner.read_output(store, files)

    def query(self, store, sql: str) -> pa.Table:
        return self.inner.query(store, sql)

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"rayflow.testing.VisibilityLog({self.inner!r}, {self.log_dir!r})"
