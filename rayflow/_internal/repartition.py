"""A different partition count on resume: re-split committed state by hash range (DESIGN §3).

A run that asks for another partition count than its checkpoint's map gets a
new map (``PartitionMap.uniform(new count)``, version + 1). Before anything
runs, the manager re-splits what is committed (:func:`repartition`), in this
order:

1. **Plan** (pure, :func:`parents_of`, :func:`inherit`). Each new partition
   ``[lo, hi)`` takes its state from the old partitions whose ranges overlap
   it (its *parents*), and its positions per split from them:

   - one parent (a split, or an unchanged range): the parent's positions,
     final flag, watermarks and ``rows_total``, and the parent's state
     filtered to ``[lo, hi)``. Exact: every key of the range was processed
     by the parent up to exactly those positions.
   - several parents (a merge): exact only if they all stand at the same
     positions (a *consistent cut*: a bounded job that finished, or an
     unbounded one stopped with ``run.stop(drain=True)``), with the same
     final flag and watermarks. Else :class:`RepartitionError`: one position
     vector per split cannot say "rows up to 100 for these keys, up to 80 for
     those". ``rows_total`` is the parents' sum, so the ``_version`` of the
     upsert stream a merged partition emits stays above what each parent
     published (it is the rows a partition has processed; see
     ``partition_task.upsert_version``).

2. **Write** (:func:`move_state`). For each new partition and stateful
   operator, its chain: one base (the parents' bases, each filtered to the
   range, in range order, streamed a row group at a time; row groups whose
   ``_hash`` statistics miss the range are not read), then every parent's
   deltas filtered alike (keys of different parents are disjoint, so the
   order of their deltas does not matter). Every file under a new unique
   name. Counters kept in a state's schema metadata (``late_rows``,
   ``duplicates_dropped``) go whole to the new partition holding the
   parent's low end, so their sum over partitions is unchanged; a merge adds
   them up. Watermarks kept there must agree between merged parents.

3. **Record** (the manager, ``Catalog.record_repartition``): the new
   partitions' commits (``map_version`` the new one, ``lease_epoch`` the
   highest epoch the old map ever granted, so the first grant of the new map
   fences every owner of the old one), their leases, the new map in ``meta``
   and a ``repartition`` event, in one transaction. Before it, the old map
   stands, and the new files are garbage the next fresh start deletes; after
   it, the run is a normal resume. The old map's commit rows stay as
   history, their state files un-named (the fresh start's clean-up deletes
   them). Under a remote checkpoint directory the change is one entry of the
   durable commit log, written first and replayed like the others.

State kinds: every stateful operator of a single-input job (``Aggregate``,
``Dedup``, ``Top``, ``Window``: their state rows carry the key columns) moves
by range. A job over several inputs (``rf.sources.Inputs``, which a ``Join``
needs) hashes each input by its own key columns, and its state rows carry no
hash of the job's key (``with_hash`` writes zeros): refused with
:class:`RepartitionError` while it holds state. ``rf.ops.Lookup`` is stateless.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayflow._internal.checkpoint.commit import CommitRecord, is_delta, state_chains
from rayflow._internal.checkpoint.store import Store
from rayflow.errors import RepartitionError
from rayflow.partitioning import PartitionMap, hash_table

#: Schema-metadata fields of a state that count events (summed over partitions in the status):
#: moved whole to one new partition, added up in a merge. In a JSON-valued metadata entry
#: (``rf.ops.Dedup``, ``rf.ops.Join``) by field name; otherwise by a key ending in ``.late_rows``.
_COUNTERS = ("late_rows", "duplicates_dropped")
_HASH = "_hash"
#: Rows written per row group of a moved state file (the writer's own bound, as ``Store``'s).
_ROW_GROUP_ROWS = 1 << 20


def parents_of(old: PartitionMap, new: PartitionMap) -> list[tuple[int, ...]]:
    """For each partition of ``new``, the partitions of ``old`` whose ranges overlap it, in
    range order. Every old partition is a parent of at least one new one (both maps cover the
    whole hash space)."""
    out = []
    for c in range(new.num_partitions):
        lo, hi = new.range_of(c)
        out.append(
            tuple(p for p in range(old.num_partitions) if old.bounds[p] < hi and old.bounds[p + 1] > lo)
        )
    return out


@dataclass(frozen=True, kw_only=True)
class Inherited:
    """What a new partition takes over from its parents' last commits."""

    positions: dict[str, int]
    rows_total: int
    final: bool
    watermarks: dict | None = None
    #: Parents that had a commit, in range order (their state moves).
    parents: tuple[int, ...] = field(default=())


def _moved(positions: Mapping[str, int]) -> dict[str, int]:
    """Positions without the splits still at 0 (a partition that never saw a split holds it at 0
    whether or not it names it)."""
    return {s: int(v) for s, v in positions.items() if v}


def inherit(
    partition: int, parents: Sequence[int], commits: Mapping[int, CommitRecord], *, name: str = ""
) -> Inherited | None:
    """What new ``partition`` inherits from its ``parents``' last commits (``None``: none of them
    has committed, it starts from scratch). Raises :class:`RepartitionError` for a merge of
    parents that do not stand at one consistent cut (see the module doc)."""
    recs = [(p, commits[p]) for p in parents if p in commits]
    if not recs:
        return None
    if len(parents) == 1:
        (_, rec) = recs[0]
        return Inherited(
            positions=dict(rec.positions),
            rows_total=rec.rows_total,
            final=rec.final,
            watermarks=rec.watermarks,
            parents=(parents[0],),
        )
    first = _moved(recs[0][1].positions)
    for p, rec in recs:
        if len(recs) < len(parents) and first:
            missing = [q for q in parents if q not in commits]
            _refuse_merge(name, partition, parents, f"old partition {missing[0]} has no commit yet")
        if _moved(rec.positions) != first:
            _refuse_merge(
                name,
                partition,
                parents,
                f"old partition {recs[0][0]} stands at positions {_short(recs[0][1].positions)} and "
                f"old partition {p} at {_short(rec.positions)}",
            )
        if rec.final != recs[0][1].final:
            _refuse_merge(name, partition, parents, f"old partition {p} has finished and another has not")
        if rec.watermarks != recs[0][1].watermarks:
            _refuse_merge(
                name,
                partition,
                parents,
                f"old partitions {recs[0][0]} and {p} committed different watermarks",
            )
    return Inherited(
        positions=dict(recs[0][1].positions),
        rows_total=sum(rec.rows_total for _, rec in recs),
        final=recs[0][1].final,
        watermarks=recs[0][1].watermarks,
        parents=tuple(p for p, _ in recs),
    )


def _short(positions: Mapping[str, int]) -> str:
    items = sorted(_moved(positions).items())
    more = f" and {len(items) - 3} more" if len(items) > 3 else ""
    return "{" + ", ".join(f"{s!r}: {v}" for s, v in items[:3]) + "}" + more


def _refuse_merge(name: str, partition: int, parents: Sequence[int], why: str) -> None:
    raise RepartitionError(
        f"cannot resume pipeline {name!r} with fewer partitions: new partition {partition} merges "
        f"old partitions {list(parents)}, but {why}. A merged partition has one position per split, "
        "so its parents must stand at the same positions (a consistent cut). Resume once with the "
        "old partition count and stop with run.stop(drain=True) (or let a bounded job finish), "
        "then change the count; or resume with a multiple of the old count (a pure split is always "
        "exact)."
    )


# ----------------------------------------------------------------------------- state files


def rows_in_range(hashes: np.ndarray, lo: int, hi: int) -> slice:
    """The slice of sorted ``hashes`` (uint64) that lies in ``[lo, hi)``; ``hi`` may be 2**64."""
    start = int(np.searchsorted(hashes, np.uint64(lo), side="left"))
    stop = hashes.shape[0] if hi >= 1 << 64 else int(np.searchsorted(hashes, np.uint64(hi), side="left"))
    return slice(start, max(start, stop))


def _hash_stats(meta: pq.FileMetaData, rg: int, col: int) -> tuple[int, int] | None:
    stats = meta.row_group(rg).column(col).statistics
    if stats is None or not stats.has_min_max:
        return None
    return int(stats.min), int(stats.max)


def read_range(store: Store, rel: str, lo: int, hi: int, key: Sequence[str]):
    """The rows of state file ``rel`` whose ``_hash`` lies in ``[lo, hi)``: yields one table per
    row group that holds some (others are skipped by their statistics, unread). Raises
    :class:`RepartitionError` for a state without the key columns (no hash to route by)."""
    pf = pq.ParquetFile(store.full(rel), filesystem=store.fs)
    names = pf.schema_arrow.names
    if pf.metadata.num_rows and not all(k in names for k in key):
        raise RepartitionError(
            f"state file {rel} holds {pf.metadata.num_rows} rows without the key column(s) "
            f"{[k for k in key if k not in names]}: its rows carry no key hash to re-split by. A job "
            "over several inputs (rf.sources.Inputs, e.g. a Join: each input hashed by its own key "
            "columns) cannot change its partition count yet. Resume with the old partition count, "
            "or start afresh with a new checkpoint_dir."
        )
    col = names.index(_HASH) if _HASH in names else None
    for rg in range(pf.metadata.num_row_groups):
        if col is not None:
            st = _hash_stats(pf.metadata, rg, col)
            if st is not None and (st[1] < lo or st[0] >= hi):
                continue
        t = pf.read_row_group(rg)
        if t.num_rows == 0:
            continue
        if col is None:  # not written by write_state (no hash, not sorted): hash it here
            h = hash_table(t, list(key))
            part = t.filter(pa.array((h >= np.uint64(lo)) & ((h < np.uint64(hi)) if hi < 1 << 64 else True)))
            if part.num_rows:
                yield part
            continue
        h = t.column(_HASH).to_numpy().astype(np.uint64, copy=False)
        r = rows_in_range(h, lo, hi)
        if r.stop > r.start:
            yield t.slice(r.start, r.stop - r.start)


def file_schema(store: Store, rel: str) -> pa.Schema:
    return pq.read_schema(store.full(rel), filesystem=store.fs)


def merged_metadata(
    metas: Sequence[Mapping[bytes, bytes] | None], shares: Sequence[bool], *, where: str
) -> dict[bytes, bytes] | None:
    """The schema metadata of a new state file made from parents' files with ``metas``:
    counters (:data:`_COUNTERS`) summed over the parents whose ``shares`` is true (the new
    partition that holds the parent's low end carries its counters), watermarks required equal
    (:class:`RepartitionError` else), anything else from the first parent that has it."""
    metas = [dict(m or {}) for m in metas]
    if not metas or not any(metas):
        return None
    out: dict[bytes, bytes] = {}
    for m in reversed(metas):  # a key from the first parent that has it
        out.update(m)
    for k in {k for m in metas for k in m}:
        values = [m.get(k) for m in metas]
        decoded = [_json_dict(v) for v in values]
        if all(d is not None for d in decoded):
            merged = dict(decoded[0])
            for f in _COUNTERS:
                if f in merged:
                    merged[f] = sum(int(d.get(f, 0)) for d, s in zip(decoded, shares) if s)
            wms = {json.dumps(d.get("watermark")) for d in decoded}
            if len(wms) > 1:
                _refuse_watermarks(where, wms)
            out[k] = json.dumps(merged).encode()
        elif k.endswith(b".late_rows"):
            out[k] = str(sum(int(v or 0) for v, s in zip(values, shares) if s)).encode()
        elif k.endswith(b".watermark"):
            if len({v for v in values if v is not None}) > 1:
                _refuse_watermarks(where, {v.decode() for v in values if v is not None})
    return out


def _refuse_watermarks(where: str, wms) -> None:
    raise RepartitionError(
        f"{where}: the merged partitions' operator watermarks differ ({sorted(map(str, wms))}), so "
        "the merged state has no one watermark. Stop the job with run.stop(drain=True) (or let it "
        "finish) under the old partition count first."
    )


def _json_dict(v: bytes | None) -> dict | None:
    if v is None or not v.startswith(b"{"):
        return None
    try:
        d = json.loads(v)
    except ValueError:
        return None
    return d if isinstance(d, dict) else None


@dataclass
class Moved:
    """One new partition's state files, as written by :func:`move_state`."""

    state_files: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    nbytes: int = 0


def _write_parts(store: Store, rel: str, schema: pa.Schema, parts) -> tuple[int, int]:
    """Write the tables ``parts`` (an iterable) to ``rel`` atomically, streamed (one row group
    or fewer at a time in memory), as ``Store.write_parquet(fast=True)`` writes state: returns
    ``(rows, Arrow bytes)``."""
    full = store.full(rel)
    parent = full.rsplit("/", 1)[0]
    store.fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
    rows = nbytes = 0
    with pq.ParquetWriter(
        tmp, schema, filesystem=store.fs, compression="lz4", use_dictionary=False
    ) as writer:
        for t in parts:
            t = _conform(t, schema) if t.schema != schema else t
            writer.write_table(t, row_group_size=_ROW_GROUP_ROWS)
            rows += t.num_rows
            nbytes += t.nbytes
    store.fs.move(tmp, full)
    return rows, nbytes


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """``t`` in ``schema``: its columns cast, in that order, and null columns for those it lacks
    (parents' states written before a column was added)."""
    cols = [
        t.column(f.name).cast(f.type) if f.name in t.column_names else pa.nulls(t.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(cols, schema=schema)


def move_state(
    store: Store,
    *,
    old: PartitionMap,
    new: PartitionMap,
    partition: int,
    parents: Sequence[int],
    commits: Mapping[int, CommitRecord],
    key: Sequence[str],
    tag: str,
) -> Moved:
    """Write new ``partition``'s state chains from its ``parents``' commits (see the module doc):
    per operator a base (the parents' bases, filtered, in range order), then each parent's deltas
    filtered. Blocking I/O."""
    lo, hi = new.range_of(partition)
    moved = Moved()
    chains = {p: state_chains(commits[p].state_files) for p in parents}
    ops = sorted({i for ch in chains.values() for i in ch})
    where = f"new partition {partition}"
    for i in ops:
        bases = [(p, chains[p][i][0]) for p in parents if i in chains[p] and not is_delta(chains[p][i][0])]
        deltas = [(p, f) for p in parents if i in chains[p] for f in chains[p][i] if is_delta(f)]
        files = [(f"state/p{partition:05d}/{tag}-op{i}.parquet", bases)] + [
            (f"state/p{partition:05d}/{tag}-{n:04d}-op{i}-d.parquet", [d]) for n, d in enumerate(deltas)
        ]
        for rel, sources in files:
            if not sources:
                continue
            schemas = [file_schema(store, f) for _, f in sources]
            # The parent's counters go with the new partition that holds its low end.
            shares = [lo <= old.bounds[p] < hi for p, _ in sources]
            # A parent that never got a row checkpoints an empty state of another schema (an
            # Aggregate's: its key columns, typed null): the rows' schema and the metadata come
            # from the parents with rows (range order among them), whatever their range order.
            counts = [pq.read_metadata(store.full(f), filesystem=store.fs).num_rows for _, f in sources]
            order = sorted(range(len(sources)), key=lambda j: not counts[j])
            with_rows = [schemas[j].remove_metadata() for j in order if counts[j]] or [schemas[0]]
            rows_schema = (
                pa.unify_schemas(with_rows, promote_options="permissive")
                if len(with_rows) > 1
                else with_rows[0]
            )
            meta = merged_metadata(
                [schemas[j].metadata for j in order], [shares[j] for j in order], where=where
            )
            schema = rows_schema.with_metadata(meta) if meta is not None else rows_schema.remove_metadata()

            def parts(sources=sources):
                for _, f in sources:
                    yield from read_range(store, f, lo, hi, key)

            rows, nbytes = _write_parts(store, rel, schema, parts())
            if rows == 0 and rel != files[0][0]:
                store.delete(rel)  # an empty delta adds nothing (a base stays: it holds the metadata)
                continue
            moved.state_files.append(rel)
            moved.rows[rel] = rows
            moved.nbytes += nbytes
    return moved


def new_tag() -> str:
    """The unique part of the names of a re-split's state files."""
    return f"r{uuid.uuid4().hex[:12]}"


def repartition(
    store: Store,
    *,
    name: str,
    old: PartitionMap,
    new: PartitionMap,
    commits: Mapping[int, CommitRecord],
    key: Sequence[str],
    lease_epoch: int,
) -> tuple[list[CommitRecord], int]:
    """Steps 1 and 2: the new partitions' commit records (state written, nothing recorded yet)
    and the Arrow bytes of state moved. ``lease_epoch``: the highest the old map granted (the
    records carry it; the first grant of the new map is above it). Raises
    :class:`RepartitionError` before writing anything when a merge is not exact."""
    plan = parents_of(old, new)
    inherited = {c: inherit(c, ps, commits, name=name) for c, ps in enumerate(plan)}
    tag = new_tag()
    records, nbytes = [], 0
    for c, inh in inherited.items():
        if inh is None:
            continue
        moved = move_state(
            store, old=old, new=new, partition=c, parents=inh.parents, commits=commits, key=key, tag=tag
        )
        nbytes += moved.nbytes
        records.append(
            CommitRecord(
                partition=c,
                lease_epoch=lease_epoch,
                positions=dict(inh.positions),
                state_files=moved.state_files,
                output_files=[],
                rows_in=0,
                rows_total=inh.rows_total,
                state_rows=sum(moved.rows.values()),
                final=inh.final,
                map_version=new.version,
                watermarks=inh.watermarks,
                written_rows=dict(moved.rows),
            )
        )
    return records, nbytes
