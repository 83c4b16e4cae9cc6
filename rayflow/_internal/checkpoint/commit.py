"""The commit protocol (DESIGN §5): what a commit is, and its steps, in order.

A commit makes one partition's progress durable: its operator state, its
positions per split, and the outputs it staged since the last commit. The
steps, numbered once here and in ``docs/checkpoints.md``:

1. **Write** (consumer, :func:`write_commit`). Each stateful operator's state
   goes to a Parquet file sorted by ``_hash`` under a unique name
   (``state/p<partition>/e<epoch>-s<seq>-<uuid>-op<i>.parquet``), or, for an
   operator whose state can be committed incrementally, only what changed
   since the last recorded commit: a *delta* file (``...-op<i>-d.parquet``,
   also sorted by ``_hash``), the commit then naming the base and every
   delta since, in order (a *state chain*, see :class:`StateChain`). A
   background compaction folds a chain into a new base (``...-op<i>-c.parquet``)
   that a later commit names instead. The staged
   outputs go to one file in the sink's pending area, named by the lease epoch
   and the positions it covers (:func:`output_name`), so a repeat by the same
   owner rewrites the same name and never adds a second copy. Nothing is
   visible yet. The staged outputs include what operators that emit changes
   flushed right before this step (the consumer flushes once per attempt and
   keeps the result staged until a commit naming it is recorded), so a
   state file never holds a change its commit's outputs lack: one output
   file per commit and partition, an upsert stream's rows ordered by their
   ``_version`` (several rows of a key when earlier attempts failed).
2. **Validate and fence** (manager, ``Coordinator.check_commit``). The caller
   must hold the partition under the record's lease epoch (checked first: a
   stale owner is fenced even when it repeats the last recorded commit); an
   exact repeat of the recorded commit is a no-op; positions never go back;
   nothing follows a final commit; every file named exists.
3. **Durable log** (manager; remote checkpoint directories only). The record
   is appended to the commit log in the bucket before the catalog row.
4. **Catalog transaction** (manager). All records of one call are one DuckDB
   transaction. From here on the commit *happened*: the catalog row is the
   single point of truth.
5. **Publish** (manager, driven by the catalog). The outputs the row names are
   made visible (moved out of the pending area, or loaded into a DuckDB
   table). Idempotent and retried by the manager, on repeats and at start,
   never left to the consumer that asked.
6. **Trim** (consumer -> sources). The sources drop queued entries the
   committed positions cover, under the lease epoch (a stale one is refused).
7. **Retire** (manager). State files of older commits stop being named by the
   catalog first, then are deleted: a row never points at a missing file (a
   file a later row still names, a chain's base, stays).

After a commit call that failed (an error, a lost reply, a manager restart),
the consumer does not know whether step 4 happened. Before it writes or
stages anything again it **reconciles** (:func:`outcome`): it asks the manager
for the partition's latest recorded commit; if that is its attempt, the
attempt counts as committed (its outputs will be published by the manager);
if it is older, from this owner or before, the attempt's files are deleted
(:func:`discard`) and its state, positions and staged outputs stay in memory
for the next attempt; if a newer owner has committed since, nothing is
deleted (the attempt may be history the catalog still names).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import pyarrow as pa

from rayflow._internal.checkpoint.store import Store
from rayflow.ops.base import side_stream_of, without_side_stream
from rayflow.partitioning import hash_table
from rayflow.sinks import PENDING_DIR

_NO_SIDES: Mapping[str, Store] = MappingProxyType({})


@dataclass(frozen=True, kw_only=True)
class CommitRecord:
    """What a consumer asks the manager to record for one partition (step 1's result)."""

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
    #: The partition's watermark and its splits' (``watermarks.PartitionClock.committed``), for a
    #: job with event time; ``None`` otherwise (and in commits recorded before watermarks existed).
    watermarks: dict | None = None
    #: The state files this attempt names but did not write (a chain's base and earlier deltas,
    #: recorded before; a compaction's base): never deleted with the attempt (:func:`discard`).
    #: Not recorded in the catalog (a recorded row's files are all named alike).
    inherited: tuple[str, ...] = ()
    #: The rows of each state file this attempt wrote (the consumer's count of a chain's rows).
    written_rows: dict[str, int] = field(default_factory=dict)
    #: Seconds step 1 took for this record, and the Arrow bytes it wrote (state and outputs, in
    #: memory: the files are compressed), for the history ``rayflow report`` draws. Not part of
    #: what identifies an attempt (``compare=False``), and not in the ``commits`` table.
    write_s: float = field(default=0.0, compare=False)
    nbytes: int = field(default=0, compare=False)

    def to_log(self) -> dict:
        """The record as the durable commit log stores it: every field but the measurements
        (``write_s``, ``nbytes``: history only), so that a release that does not know them can
        still replay the log after a rollback."""
        body = dataclasses.asdict(self)
        for name in _NOT_LOGGED:
            body.pop(name, None)
        return body

    @classmethod
    def from_log(cls, body: dict) -> CommitRecord:
        """A record from a log entry, ignoring keys this release does not know (an entry
        written by a newer release): the log is forward-compatible."""
        return cls(**{k: v for k, v in body.items() if k in _FIELDS})


#: Fields of :class:`CommitRecord` left out of the durable log (:meth:`CommitRecord.to_log`): the
#: measurements, the fields that take no part in comparing records.
_NOT_LOGGED = tuple(f.name for f in dataclasses.fields(CommitRecord) if not f.compare)
_FIELDS = frozenset(f.name for f in dataclasses.fields(CommitRecord))


_STATE_FILE = re.compile(r"-op(\d+)(-[dc])?\.parquet$")


def state_file_op(path: str) -> int:
    """The index, in the operator chain, of the operator whose state ``path`` holds."""
    m = _STATE_FILE.search(path)
    if m is None:
        raise ValueError(f"not a state file name: {path}")
    return int(m.group(1))


def is_delta(path: str) -> bool:
    """Whether the state file ``path`` is a delta (else a whole snapshot: a base)."""
    m = _STATE_FILE.search(path)
    return m is not None and m.group(2) == "-d"


@dataclass(frozen=True)
class StateChain:
    """One operator's recorded state in a partition: a base file, then the deltas after it, in
    commit order, with each file's row count. Folding them (``Operator.merge_states``) gives the
    state as of the commit that names them."""

    files: tuple[str, ...] = ()
    rows: tuple[int, ...] = ()

    @property
    def deltas(self) -> int:
        return sum(1 for f in self.files if is_delta(f))

    def then(self, file: str, rows: int) -> StateChain:
        return StateChain(self.files + (file,), self.rows + (rows,))

    def rebased(self, base: str, rows: int, folded: tuple[str, ...]) -> StateChain | None:
        """This chain with its first files ``folded`` replaced by the ``base`` that folds them
        (a compaction's result); None if the chain no longer starts with them."""
        if self.files[: len(folded)] != folded:
            return None
        n = len(folded)
        return StateChain((base,) + self.files[n:], (rows,) + self.rows[n:])


def state_chains(state_files: list[str]) -> dict[int, list[str]]:
    """A recorded commit's state files by operator index, in order (a base, then deltas)."""
    out: dict[int, list[str]] = {}
    for f in state_files:
        out.setdefault(state_file_op(f), []).append(f)
    return out


def output_name(partition: int, epoch: int, start: dict[str, int], end: dict[str, int]) -> str:
    """A deterministic name for the outputs of ``partition`` under lease ``epoch`` between two
    position vectors.

    The same owner over the same positions always writes the same name, so an
    attempt repeated after a lost reply rewrites (and, if it had landed,
    re-publishes) the same file, never a second copy. The epoch keeps owners
    apart: a new owner restored from the same commit reaches the same positions
    and must not share a name with a fenced zombie, whose clean-up
    (:func:`discard`) would otherwise delete the new owner's recorded output.
    """
    digest = hashlib.sha256(json.dumps([start, end], sort_keys=True).encode()).hexdigest()[:16]
    return f"part-{partition:05d}-e{epoch:06d}-{digest}.parquet"


def pending_path(name: str) -> str:
    """Where an output file waits, relative to the sink root, until its commit is recorded."""
    return f"{PENDING_DIR}/{name}"


def side_output(stream: str, name: str) -> str:
    """How a commit names an output of the side stream ``stream`` (``Operator.side_sinks``): the
    file ``name`` under that stream's sink. Main output names never hold a ``/``."""
    return f"{stream}/{name}"


def output_stream(output: str) -> tuple[str | None, str]:
    """``(side stream or None for the main sink, file name under that sink)`` of an output name."""
    stream, sep, name = output.partition("/")
    return (stream, name) if sep else (None, output)


def output_store(output: str, sink_store: Store, side_stores: Mapping[str, Store]) -> tuple[Store, str]:
    """The store an output lives in, and its name there."""
    stream, name = output_stream(output)
    return (sink_store if stream is None else side_stores[stream]), name


def write_state(store: Store, path: str, table: pa.Table, key: list[str]) -> tuple[str, int]:
    """Write one state table (a base or a delta) sorted by ``_hash``: ``(file, rows)``."""
    t = with_hash(table, key)
    return store.write_parquet(path, t, fast=True), t.num_rows


def read_state(store: Store, files: list[str] | tuple[str, ...]) -> tuple[list[pa.Table], dict[str, int]]:
    """The tables of the files a commit names for one operator (a base, then its deltas, for an
    incremental operator), without ``_hash``; with each file's rows."""
    tables = [store.read_parquet(f) for f in files]
    rows = {f: t.num_rows for f, t in zip(files, tables)}
    return [t.drop_columns(["_hash"]) if "_hash" in t.column_names else t for t in tables], rows


def compact(
    store: Store, *, partition: int, op_index: int, tag: str, chain: StateChain, op, key: list[str]
) -> tuple[str, int]:
    """Fold ``chain`` (a base and its deltas) into one new base file: ``(file, rows)``.

    Reads only files (never the live state), so it runs in the background
    while the partition goes on; the result names a state some recorded
    commit had, so a later commit may name it in place of the files it folds
    (:meth:`StateChain.rebased`). Until one does, nothing names it: a crash
    leaves garbage that the next fresh start deletes.
    """
    tables, _ = read_state(store, chain.files)
    table = tables[0] if len(tables) == 1 else op.merge_states(tables)
    return write_state(store, f"state/p{partition:05d}/{tag}-op{op_index}-c.parquet", table, key)


def state_tag(epoch: int, seq: int) -> str:
    """The unique part of a state file's name: lease epoch, attempt sequence, random suffix."""
    return f"e{epoch:06d}-s{seq:06d}-{uuid.uuid4().hex[:8]}"


def with_hash(t: pa.Table, key: list[str]) -> pa.Table:
    """The state table with its rows' key hash as ``_hash``, sorted by it (DESIGN §3)."""
    if t.num_rows == 0 or not all(k in t.column_names for k in key):
        return t.append_column("_hash", pa.array(np.zeros(t.num_rows, np.uint64)))
    h = hash_table(t, key)
    order = np.argsort(h)  # keys are unique in a state: a stable sort would buy nothing
    return t.take(pa.array(order)).append_column("_hash", pa.array(h[order]))


def write_commit(
    *,
    partition: int,
    epoch: int,
    seq: int,
    state_tables: dict[int, pa.Table],
    state_deltas: Mapping[int, tuple[StateChain, pa.Table]] = MappingProxyType({}),
    outputs: list[pa.Table],
    committed_positions: dict[str, int],
    positions: dict[str, int],
    rows_total: int,
    rows_committed: int,
    final: bool,
    map_version: int,
    key: list[str],
    state_store: Store,
    sink_store: Store,
    side_stores: Mapping[str, Store] = _NO_SIDES,
    watermarks: dict | None = None,
) -> CommitRecord:
    """Step 1: write state files and the pending output files; return the record to send.

    ``state_tables`` maps a stateful operator's index to its whole state as a
    table (a new base); ``state_deltas`` maps an incremental operator's index
    to its recorded chain and the delta since (an empty delta adds no file:
    the commit names the chain as it is). Outputs marked as a side stream
    (``rf.ops.base.side_stream``) go, unmarked, to one pending file in that
    stream's store (``side_stores``), the rest to one in ``sink_store``.
    ``state_rows`` of the record: the rows of every state file it names.
    Blocking I/O: call it from a worker thread.
    """
    t0 = time.perf_counter()
    tag = state_tag(epoch, seq)
    state_files, inherited, written, nbytes = [], [], {}, 0
    for i in sorted({*state_tables, *state_deltas}):
        if i in state_tables:
            table, suffix = state_tables[i], ""
        else:
            chain, table = state_deltas[i]
            state_files += chain.files
            inherited += chain.files
            if not table.num_rows:
                continue
            suffix = "-d"
        f, rows = write_state(state_store, f"state/p{partition:05d}/{tag}-op{i}{suffix}.parquet", table, key)
        nbytes += table.nbytes
        state_files.append(f)
        written[f] = rows
    state_rows = sum(written.values()) + sum(r for chain, _ in state_deltas.values() for r in chain.rows)
    output_files = []
    by_stream: dict[str | None, list[pa.Table]] = {}
    for t in outputs:
        if t.num_rows:
            by_stream.setdefault(side_stream_of(t), []).append(without_side_stream(t))
    name = output_name(partition, epoch, committed_positions, positions)
    for stream, outs in by_stream.items():
        store = sink_store if stream is None else side_stores[stream]
        file = name if stream is None else f"{stream}-{name}"  # apart even in one directory
        table = pa.concat_tables(outs, promote_options="permissive")
        store.write_parquet(pending_path(file), table)
        nbytes += table.nbytes
        output_files.append(file if stream is None else side_output(stream, file))
    return CommitRecord(
        partition=partition,
        lease_epoch=epoch,
        positions=dict(positions),
        state_files=state_files,
        output_files=output_files,
        rows_in=rows_total - rows_committed,
        rows_total=rows_total,
        state_rows=state_rows,
        final=final,
        map_version=map_version,
        watermarks=watermarks,
        inherited=tuple(inherited),
        written_rows=written,
        write_s=time.perf_counter() - t0,
        nbytes=nbytes,
    )


def outcome(attempt: CommitRecord, recorded: CommitRecord | None) -> str:
    """Reconcile one attempt with its partition's latest catalog row.

    - ``"landed"``: the row is this attempt (:func:`landed`).
    - ``"lost"``: the row is older than the attempt, from this owner's lease or
      an earlier one (or there is none). This owner commits the partition
      alone and never writes again before reconciling, so the attempt was not
      recorded: its files may be deleted (:func:`discard`).
    - ``"unknown"``: the row comes from a newer lease. The attempt may have
      landed before the partition moved on (a row the catalog keeps as
      history may name its files): the manager is asked which of its files a
      row names (``GroupManager.named``), and only the others are deleted.
    """
    if landed(attempt, recorded):
        return "landed"
    if recorded is None or recorded.lease_epoch <= attempt.lease_epoch:
        return "lost"
    return "unknown"


def landed(attempt: CommitRecord, recorded: CommitRecord | None) -> bool:
    """Reconcile: is ``recorded`` (the partition's latest catalog row) this attempt?

    State files carry a unique name per attempt, so equal state files, epoch,
    positions and final flag identify the attempt exactly. (An attempt of a
    stateless chain names no state file; then equal epoch, positions, final
    flag and outputs identify it: a second attempt with the same positions
    writes the same output name, so either one landing is the same commit.)
    """
    return (
        recorded is not None
        and recorded.lease_epoch == attempt.lease_epoch
        and recorded.positions == attempt.positions
        and recorded.final == attempt.final
        and recorded.state_files == attempt.state_files
        and recorded.output_files == attempt.output_files
    )


def discard(
    attempt: CommitRecord,
    *,
    state_store: Store,
    sink_store: Store,
    side_stores: Mapping[str, Store] = _NO_SIDES,
    keep: frozenset[str] = frozenset(),
) -> None:
    """Delete the files of an attempt that did not land (reconciled: not recorded).

    Safe because nothing names them: state files are unique per attempt; an
    output name carries the owner's lease epoch and positions, and within one
    epoch only this owner commits, and reconciles before it writes again, so
    no recorded commit names the output of an attempt that did not land.
    """
    for f in attempt.state_files:
        if f not in keep and f not in attempt.inherited:
            state_store.delete(f)
    for output in attempt.output_files:
        if output not in keep:
            store, name = output_store(output, sink_store, side_stores)
            store.delete(pending_path(name))
