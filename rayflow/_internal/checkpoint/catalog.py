"""The DuckDB catalog: the single point of truth of what is committed (DESIGN §5).

Only the GroupManager opens the live file for writing (DuckDB allows one
writer process), and only from its one I/O thread: every method here blocks.
Tools read a consistent copy (:func:`snapshot_copy`).

Tables:

- ``meta(key, value)``: the job's shape (partition map, key, operator
  specs, input schema, split names), checked on every restart (compat.py);
  keys starting with ``_`` are the catalog's own (``_log_applied``);
- ``commits``: one row per partition commit (lease epoch, positions per split,
  state files, output files, row counts, final flag, map version);
- ``outputs(file, partition, commit_id, published)``: every recorded output
  file and whether it is published yet, so publication is driven by the
  catalog (commit step 5) without listing directories or scanning commits;
- ``leases(partition, owner, lease_epoch)``: the last grant of each partition,
  so epochs keep increasing across manager restarts;
- ``events(ts, kind, detail)``: joins, leaves, rebalances, failures, changes of the
  partition count (``repartition``);
- ``history_partitions``, ``history_consumers``: samples of the running job
  every ``EngineConfig.history_interval_s`` (``_internal/history.py`` says what
  each column is), kept ``history_retention_s``, drawn by ``rayflow report``
  (:func:`read_history`);
- ``splits(name, first_seen, fingerprint)``: every split a *dynamic* source
  has had (the ones at each start, and those discovered while a job ran),
  recorded before any of its rows is served, so a resume knows them all; and
  what the split was when the job first saw it (``Split.fingerprint``: a
  file's size and mtime), so a later run, or a restarted source actor, that
  finds another input under the same name refuses it instead of reading it on
  from the old one's committed positions. NULL: nothing to check (a split
  without a fingerprint, or one recorded before the column existed): the first
  fingerprint recorded later for the name is kept.

The meta key ``_started_ms`` holds the wall-clock time at which the job
first started reading (:meth:`Catalog.ensure_started_ms`): the same at every
resume.

Growth is bounded (:meth:`Catalog.trim`): the latest commit of each partition
is kept for good (recovery), and so is every row that names live state files
or an unpublished output; older history is kept by count. History samples
are kept by age (:meth:`Catalog.trim_history`, ``history_retention_s``). The ``outputs``
rows of published files go with their commits, unless the sink reads its
output back from that list (``Sink.keeps_output_list``: the Collect sink).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from rayflow._internal.checkpoint.commit import CommitRecord
from rayflow._internal.checkpoint.store import Store, is_remote, join
from rayflow._internal.history import TABLES as HISTORY_TABLES
from rayflow.errors import CheckpointError

if TYPE_CHECKING:
    import duckdb

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS commits (
    commit_id BIGINT, partition INTEGER, lease_epoch BIGINT, member VARCHAR,
    positions VARCHAR, state_files VARCHAR, output_files VARCHAR,
    rows_in BIGINT, rows_total BIGINT, state_rows BIGINT, final BOOLEAN,
    map_version INTEGER, committed_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS leases (partition INTEGER PRIMARY KEY, owner VARCHAR, lease_epoch BIGINT);
CREATE TABLE IF NOT EXISTS events (ts TIMESTAMP, kind VARCHAR, detail VARCHAR);
CREATE TABLE IF NOT EXISTS splits (name VARCHAR PRIMARY KEY, first_seen TIMESTAMP, fingerprint VARCHAR);
-- A catalog from before split fingerprints: its splits are known, their fingerprints are not.
ALTER TABLE splits ADD COLUMN IF NOT EXISTS fingerprint VARCHAR;
-- A catalog from before event time: its commits carry no watermarks (NULL).
ALTER TABLE commits ADD COLUMN IF NOT EXISTS watermarks VARCHAR;
""" + "".join(  # history (``rayflow report``): the columns ``_internal/history.py`` defines
    f"CREATE TABLE IF NOT EXISTS {t} ({', '.join(f'{c} {ty}' for c, ty in cols)});\n"
    for t, cols in HISTORY_TABLES.items()
)
#: The commit rows of the current partition map: after a change of the partition count the old
#: map's rows stay as history (``Catalog.record_repartition``) but no longer speak for a partition.
CURRENT_MAP = "map_version = (SELECT max(map_version) FROM commits)"
#: The meta key of the job's first start (ms since the epoch); ``_``: the catalog's own.
STARTED_KEY = "_started_ms"
_OUTPUTS = """CREATE TABLE outputs (
    file VARCHAR PRIMARY KEY, partition INTEGER, commit_id BIGINT, published BOOLEAN)"""
_COMMIT_COLUMNS = (
    "commit_id, partition, lease_epoch, member, positions, state_files, output_files, rows_in, "
    "rows_total, state_rows, final, map_version, committed_at, watermarks"
)

#: How often (at most) the manager folds the catalog's WAL into its file, so that tools
#: reading a copy of a live catalog (``rayflow sql``) see commits at most this old.
CHECKPOINT_EVERY_S = 1.0
#: How long to wait for the catalog's write lock: the processes of a run that just died
#: (a crashed driver's actors) need a few seconds to be reaped by Ray and let go of it.
LOCK_TIMEOUT_S = 60.0
#: Commits kept per partition as history for ``rayflow sql``; older rows are trimmed. The latest
#: one (recovery) and any naming live state files are kept whatever their age. 50 keeps minutes of
#: history at the default 2 s interval while the table stays small enough to rebuild in
#: milliseconds (partitions x 50 rows).
COMMITS_KEPT_PER_PARTITION = 50
#: Events kept (the newest); older ones are trimmed. A rebalance writes a few, so this covers
#: thousands of rebalances: enough for ``bench/recovery.py`` and a post-mortem.
EVENTS_KEPT = 10_000
#: Entries of a remote commit log after which it is compacted into a snapshot (at the manager's
#: next trim): bounds what a manager lists and reads at start (the snapshot plus about this many
#: entries), at the cost of rewriting the (bounded) catalog once per this many commit calls.
LOG_SNAPSHOT_EVERY = 100
#: Log objects read at once when a manager catches up with a remote log.
_LOG_READERS = 16


def _connect(path: str, lock_timeout_s: float) -> duckdb.DuckDBPyConnection:
    import duckdb  # here, not at the top: only the manager's process opens the catalog

    deadline = time.monotonic() + lock_timeout_s
    while True:
        try:
            return duckdb.connect(path)
        except duckdb.IOException as e:
            if "lock" not in str(e).lower() or time.monotonic() > deadline:
                raise CheckpointError(
                    f"cannot open the catalog {path}: {e}. Another run of this pipeline still holds "
                    "it (DuckDB allows one writer): stop that run, or wait until it has exited."
                ) from e
            time.sleep(0.2)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _duckdb_error() -> type[Exception]:
    import duckdb

    return duckdb.Error


def catalog_path(root: str) -> str:
    """Where the DuckDB file of the job under ``root`` lives.

    Under a local checkpoint directory, there. Under a remote one (``s3://``),
    DuckDB cannot open the file, so it is a local index in the temp dir, and
    the durable form is the commit log under ``root/log`` (see :class:`Catalog`).
    """
    if not is_remote(root):
        return join(root, "catalog.duckdb")
    key = hashlib.sha256(root.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "rayflow-catalogs", key, "catalog.duckdb")


def _record(row) -> CommitRecord:
    """A ``commits`` row (partition, lease_epoch, positions, ... map_version) as a record."""
    return CommitRecord(
        partition=row[0],
        lease_epoch=row[1],
        positions=json.loads(row[2]),
        state_files=json.loads(row[3]),
        output_files=json.loads(row[4]),
        rows_in=row[5],
        rows_total=row[6],
        state_rows=row[7],
        final=row[8],
        map_version=row[9],
        watermarks=json.loads(row[10]) if len(row) > 10 and row[10] is not None else None,
    )


class IndexBehindLog(CheckpointError):
    """A commit reached the durable (remote) log, then the local DuckDB index failed to take it.

    The commit happened (the log is the point of truth): the caller treats it as recorded and
    calls :meth:`Catalog.catch_up` to bring the index up to the log."""


class Catalog:
    """The catalog; with ``log_root`` (a remote checkpoint directory), also a durable log.

    The log is a sequence of small JSON objects under ``log_root/log/``, named by
    a sequence number that only grows: ``<n>-c.json`` (commits), ``<n>-l.json``
    (lease grants), ``<n>-r.json`` (state files retired), ``<n>-s.json`` (known
    splits added, with their fingerprints), ``<n>-p.json`` (a change of the
    partition map: :meth:`record_repartition`), and ``meta.json``.
    Each is written (atomically, under a unique name) *before* the DuckDB
    transaction it mirrors, so the log is the point of truth: a manager on any
    node rebuilds or catches up its local DuckDB index from it at start.

    The log is compacted (:meth:`compact_log`): ``snapshot-<n>.json`` holds the
    whole catalog as of entry ``n`` (commits, outputs with their published
    flags, leases), and the entries up to ``n`` are then deleted. A start reads
    the newest snapshot (if its index is older) and the entries after it, so
    start-up time does not grow with the job's age.

    Caveats: events and history samples are not logged (a manager on another
    node starts with none); published flags are logged only by snapshots, so a rebuild checks
    the outputs recorded after the snapshot again (publication is idempotent).
    """

    def __init__(self, path: str, *, log_root: str | None = None, lock_timeout_s: float = LOCK_TIMEOUT_S):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.con = _connect(path, lock_timeout_s)
        self.con.execute(_SCHEMA)
        self._create_outputs()
        self.log = Store(log_root) if log_root else None
        self._missed: list[tuple[int, dict]] = []  # logged commit entries the index missed
        row = self.con.execute("SELECT coalesce(max(commit_id), 0) FROM commits").fetchone()
        self._next_id = max(int(row[0]), self._log_applied()) + 1
        self._log_entries = 0  # entries in the remote log after its newest snapshot
        if self.log is not None:
            self._replay_log()
        self.con.execute("CHECKPOINT")
        self._last_checkpoint = time.monotonic()

    def _create_outputs(self) -> None:
        """Create ``outputs``; in a catalog written before it existed, fill it from ``commits``
        (as unpublished: publishing checks each file, and does nothing for published ones)."""
        exists = self.con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'outputs'"
        ).fetchone()[0]
        if exists:
            return
        cur = self.con.cursor()
        cur.execute("BEGIN TRANSACTION")
        cur.execute(_OUTPUTS)
        cur.execute(
            """INSERT INTO outputs SELECT f, partition, max(commit_id), false FROM
                   (SELECT unnest(CAST(output_files AS VARCHAR[])) AS f, partition, commit_id FROM commits)
               GROUP BY f, partition"""
        )
        cur.execute("COMMIT")

    # ------------------------------------------------------------------ durable log
    def _replay_log(self) -> None:
        """Catch the local index up with the log: the newest snapshot (if the index is older),
        then the entries after it, read in parallel and applied in order in one transaction."""
        applied = self._log_applied()
        snapshots, entries, has_meta = [], [], False
        for rel in self.log.list_files("log"):
            name = rel.rsplit("/", 1)[1]
            if name == "meta.json":
                has_meta = True
            elif name.startswith("snapshot-") and name.endswith(".json"):
                n = name[len("snapshot-") : -len(".json")]
                if n.isdigit():
                    snapshots.append((int(n), rel))
            else:
                n, _, kind = name.partition("-")
                if n.isdigit() and kind in ("c.json", "l.json", "r.json", "s.json", "p.json"):
                    entries.append((int(n), kind[0], rel))
        entries.sort()
        seq = max(snapshots)[0] if snapshots else 0
        if seq > applied:  # the local index is older than the snapshot (or absent): reload it
            self._load_snapshot(json.loads(self.log.read_bytes(max(snapshots)[1])))
        self._next_id = max([self._next_id, seq + 1] + [n + 1 for n, _, _ in entries])
        if has_meta:
            self._set_meta_local(json.loads(self.log.read_bytes("log/meta.json")))
        todo = [(n, kind, rel) for n, kind, rel in entries if n > max(applied, seq)]
        self._log_entries = sum(1 for n, _, _ in entries if n > seq)
        if not todo:
            return
        # Object stores answer one small GET in tens of milliseconds: read them side by side.
        with ThreadPoolExecutor(max_workers=_LOG_READERS) as pool:
            bodies = list(pool.map(lambda e: json.loads(self.log.read_bytes(e[2])), todo))
        cur = self.con.cursor()
        cur.execute("BEGIN TRANSACTION")
        for (_, kind, _), body in zip(todo, bodies):
            if kind == "c":
                records = [(i, CommitRecord.from_log(r)) for i, r in body["records"]]
                self._insert_commits(cur, body["member"], records)
            elif kind == "l":
                self._upsert_leases(cur, [tuple(g) for g in body["grants"]])
            elif kind == "s":
                self._insert_splits(cur, _logged_splits(body))
            elif kind == "p":
                self._apply_repartition(cur, body)
            else:
                self._clear_state_files(cur, body["commit_ids"])
        self._set_applied(cur, todo[-1][0])
        cur.execute("COMMIT")

    def _write_log(self, n: int, kind: str, body: dict) -> None:
        if self.log is not None:
            self.log.write_bytes(f"log/{n:012d}-{kind}.json", json.dumps(body).encode())
            self._log_entries += 1

    def _take_id(self, count: int = 1) -> list[int]:
        ids = list(range(self._next_id, self._next_id + count))
        self._next_id += count
        return ids

    def _set_applied(self, cur, n: int) -> None:
        if self.log is not None:
            cur.execute("INSERT OR REPLACE INTO meta VALUES ('_log_applied', ?)", [str(n)])

    def _log_applied(self) -> int:
        row = self.con.execute("SELECT value FROM meta WHERE key = '_log_applied'").fetchone()
        return int(row[0]) if row else 0

    def compact_log(self, *, force: bool = False) -> bool:
        """Fold the remote log into a snapshot once it has enough entries; True if it did.

        Order matters for a crash at any point: the snapshot is written
        (atomically) first, then older entries and snapshots are deleted; a
        start ignores entries at or below the newest snapshot's sequence.
        """
        if self.log is None or (self._log_entries < LOG_SNAPSHOT_EVERY and not force):
            return False
        seq = self._log_applied()
        if seq == 0:
            return False
        commits = self.con.execute(
            f"SELECT {_COMMIT_COLUMNS.replace('committed_at', 'CAST(committed_at AS VARCHAR)')} "
            "FROM commits ORDER BY commit_id"
        ).fetchall()
        body = {
            "seq": seq,
            "next_id": self._next_id,
            "commits": [list(r) for r in commits],
            "outputs": [list(r) for r in self.con.execute("SELECT * FROM outputs").fetchall()],
            "leases": [list(r) for r in self.con.execute("SELECT * FROM leases").fetchall()],
            **_splits_body(self.con.execute("SELECT name, fingerprint FROM splits ORDER BY name").fetchall()),
        }
        self.log.write_bytes(f"log/snapshot-{seq:012d}.json", json.dumps(body).encode())
        for rel in self.log.list_files("log"):
            name = rel.rsplit("/", 1)[1]
            snapshot = name.startswith("snapshot-")
            n = name[len("snapshot-") : -len(".json")] if snapshot else name.partition("-")[0]
            if n.isdigit() and (int(n) < seq or (int(n) == seq and not snapshot)):
                self.log.delete(rel)
        self._log_entries = 0
        return True

    def _load_snapshot(self, body: dict) -> None:
        cur = self.con.cursor()
        cur.execute("BEGIN TRANSACTION")
        for table in ("commits", "outputs", "leases", "splits"):
            cur.execute(f"DELETE FROM {table}")
        if body["commits"]:
            cur.executemany(
                f"INSERT INTO commits ({_COMMIT_COLUMNS}) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, CAST(? AS TIMESTAMP), ?)",
                # Rows of a snapshot written before watermarks existed have none.
                [list(r) + [None] * (14 - len(r)) for r in body["commits"]],
            )
        if body["outputs"]:
            cur.executemany("INSERT INTO outputs VALUES (?, ?, ?, ?)", body["outputs"])
        if body["leases"]:
            cur.executemany("INSERT INTO leases VALUES (?, ?, ?)", body["leases"])
        self._insert_splits(cur, _logged_splits(body))  # absent from snapshots before the table
        self._set_applied(cur, body["seq"])
        cur.execute("COMMIT")
        self._next_id = max(self._next_id, int(body["next_id"]))

    def close(self) -> None:
        self.con.close()

    # ------------------------------------------------------------------ meta
    def get_meta(self) -> dict[str, str]:
        """The job's shape as recorded (keys starting with ``_`` are the catalog's own)."""
        rows = self.con.execute("SELECT key, value FROM meta").fetchall()
        return {k: v for k, v in rows if not k.startswith("_")}

    def started_ms(self) -> int | None:
        """The job's first start (ms since the epoch), if recorded (:data:`STARTED_KEY`)."""
        row = self.con.execute("SELECT value FROM meta WHERE key = ?", [STARTED_KEY]).fetchone()
        return int(row[0]) if row else None

    def ensure_started_ms(self, now_ms: int) -> int:
        """The job's first start (ms since the epoch): recorded as ``now_ms`` if absent. Returns
        the recorded value."""
        started = self.started_ms()
        if started is None:
            started = int(now_ms)
            self.set_meta({**self.get_meta(), STARTED_KEY: str(started)})
        return started

    def set_meta(self, values: dict[str, str]) -> None:
        """Record the job's meta (the recorded :data:`STARTED_KEY` is kept unless given)."""
        started = self.started_ms()
        if started is not None and STARTED_KEY not in values:
            values = {**values, STARTED_KEY: str(started)}
        if self.log is not None:
            self.log.write_bytes("log/meta.json", json.dumps(values).encode())
        self._set_meta_local(values)

    def _set_meta_local(self, values: dict[str, str]) -> None:
        cur = self.con.cursor()
        cur.execute("BEGIN TRANSACTION")
        for k, v in values.items():
            cur.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [k, v])
        cur.execute("COMMIT")

    # ------------------------------------------------------------------ known splits
    def known_splits(self) -> list[str]:
        """Every split name recorded (:meth:`add_splits`), sorted."""
        return [n for (n,) in self.con.execute("SELECT name FROM splits ORDER BY name").fetchall()]

    def add_splits(self, splits: Mapping[str, str | None]) -> dict[str, str | None]:
        """Record splits (name -> fingerprint, None: none); returns the recorded fingerprint of
        each given name (None: none recorded), in the given order. Idempotent.

        The first fingerprint recorded for a name wins: a name already known keeps
        its fingerprint, whatever is given now, and the caller compares (a split
        whose name is reused for other data must be refused, not read on). A name
        known without one (recorded by a caller that had none, or before
        fingerprints existed) takes the one given now. Under a remote checkpoint
        directory what changes is logged first.
        """
        recorded = self._split_fingerprints(list(splits))
        todo = [
            (n, fp)
            for n, fp in splits.items()
            if n not in recorded or (recorded[n] is None and fp is not None)
        ]
        if todo:
            (n,) = self._take_id()
            self._write_log(n, "s", _splits_body(todo))
            cur = self.con.cursor()
            cur.execute("BEGIN TRANSACTION")
            self._insert_splits(cur, todo)
            self._set_applied(cur, n)
            cur.execute("COMMIT")
        return {n: fp if recorded.get(n) is None else recorded[n] for n, fp in splits.items()}

    def _split_fingerprints(self, names: list[str]) -> dict[str, str | None]:
        """The recorded fingerprint of each of ``names`` that is known (None: known without one)."""
        if not names:
            return {}
        rows = self.con.execute(
            "SELECT name, fingerprint FROM splits JOIN (SELECT unnest(CAST(? AS VARCHAR[])) AS name) "
            "USING (name)",
            [names],
        ).fetchall()
        return dict(rows)

    def _insert_splits(self, cur, splits: list[tuple[str, str | None]]) -> None:
        """Insert ``(name, fingerprint)`` pairs; a known name keeps its fingerprint, or takes
        this one if it has none (so a replay of the log ends where the live catalog did)."""
        merged: dict[str, str | None] = {}
        for name, fp in splits:  # one row per name: DO UPDATE may not touch a row twice
            if merged.get(name) is None:
                merged[name] = fp
        if merged:
            # One statement for any number of names (a watched directory may hold thousands).
            cur.execute(
                """INSERT INTO splits
                   SELECT name, ?, fingerprint FROM (SELECT unnest(CAST(? AS VARCHAR[])) AS name,
                                                            unnest(CAST(? AS VARCHAR[])) AS fingerprint)
                   ON CONFLICT (name) DO UPDATE
                       SET fingerprint = coalesce(splits.fingerprint, excluded.fingerprint)""",
                [_now(), list(merged), list(merged.values())],
            )

    # ------------------------------------------------------------------ commits
    def last_commit_times(self) -> dict[int, float]:
        """When each partition's latest commit was recorded (seconds since the epoch)."""
        rows = self.con.execute(
            f"SELECT partition, epoch(max(committed_at)) FROM commits WHERE {CURRENT_MAP} GROUP BY partition"
        ).fetchall()
        return {p: float(t) for p, t in rows if t is not None}

    def latest_commits(self) -> dict[int, CommitRecord]:
        """Each partition's latest commit under the current partition map (the highest
        ``map_version``: rows of an earlier map are history, see :meth:`record_repartition`)."""
        rows = self.con.execute(
            f"""SELECT partition, lease_epoch, positions, state_files, output_files, rows_in,
                      rows_total, state_rows, final, map_version, watermarks
               FROM commits WHERE {CURRENT_MAP}
               QUALIFY row_number() OVER (PARTITION BY partition ORDER BY commit_id DESC) = 1"""
        ).fetchall()
        return {r[0]: _record(r) for r in rows}

    def record_repartition(
        self,
        records: list[CommitRecord],
        *,
        partition_map: str,
        leases: list[tuple[int, str, int]],
        event: dict,
    ) -> None:
        """Record a change of the partition map (``_internal/repartition.py``), all or nothing:
        the new partitions' commits (their state files written before), their leases in place of
        the old map's, the new map in ``meta`` and a ``repartition`` event. The old map's commit
        rows stay as history, no longer naming state files (the next fresh start deletes the
        files no row names) and no longer read as any partition's latest (:data:`CURRENT_MAP`).

        Under a remote checkpoint directory one log entry (``<n>-p.json``) holds it all and is
        written first (from then on the change happened: a replay applies it, and sets the map);
        then ``meta.json`` takes the new map (so a snapshot that folds the entry away, or a
        replay over an index that applied it, finds the new map there); then the local index.
        """
        ids = self._take_id(len(records))
        body = {
            "records": [(i, r.to_log()) for i, r in zip(ids, records)],
            "partition_map": partition_map,
            "leases": leases,
        }
        n = ids[-1] if ids else self._take_id()[0]
        self._write_log(n, "p", body)
        if self.log is not None:
            meta = {**self.get_meta(), "partition_map": partition_map}
            if self.started_ms() is not None:
                meta[STARTED_KEY] = str(self.started_ms())
            self.log.write_bytes("log/meta.json", json.dumps(meta).encode())
        cur = self.con.cursor()
        cur.execute("BEGIN TRANSACTION")
        try:
            self._apply_repartition(cur, body)
            cur.execute("INSERT INTO events VALUES (?, 'repartition', ?)", [_now(), json.dumps(event)])
            self._set_applied(cur, n)
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        self.con.execute("CHECKPOINT")

    def _apply_repartition(self, cur, body: dict) -> None:
        """The catalog's part of a map change (:meth:`record_repartition`, or its log entry)."""
        version = json.loads(body["partition_map"])["version"]
        cur.execute("UPDATE commits SET state_files = '[]' WHERE map_version < ?", [version])
        cur.execute("DELETE FROM leases")
        self._upsert_leases(cur, [tuple(g) for g in body["leases"]])
        self._insert_commits(cur, "repartition", [(i, CommitRecord.from_log(r)) for i, r in body["records"]])
        cur.execute("INSERT OR REPLACE INTO meta VALUES ('partition_map', ?)", [body["partition_map"]])

    def record_commits(self, member: str, records: list[CommitRecord]) -> None:
        """Record several partition commits, and their outputs as unpublished, all or nothing.

        Under a remote checkpoint directory the log entry is written first;
        once it is, the commits happened (a restart replays it).
        """
        ids = self._take_id(len(records))
        body = {"member": member, "records": [(i, r.to_log()) for i, r in zip(ids, records)]}
        self._write_log(ids[-1], "c", body)
        cur = self.con.cursor()
        cur.execute("BEGIN TRANSACTION")
        try:
            self._insert_commits(cur, member, list(zip(ids, records)))
            self._set_applied(cur, ids[-1])
            cur.execute("COMMIT")
        except BaseException as e:
            cur.execute("ROLLBACK")
            if self.log is not None:
                self._missed.append((ids[-1], body))
                raise IndexBehindLog(
                    f"commits {ids[0]}-{ids[-1]} are in the durable log but not in the local index: {e}"
                ) from e
            raise
        self._maybe_checkpoint()

    def catch_up(self) -> None:
        """Index the logged commits the local index missed (after :class:`IndexBehindLog`).

        Replays exactly those entries: later commits may have moved the index's
        applied marker past them, so a plain replay from the marker would skip them.
        """
        while self._missed:
            _, body = self._missed[0]
            cur = self.con.cursor()
            cur.execute("BEGIN TRANSACTION")
            try:
                self._insert_commits(
                    cur, body["member"], [(i, CommitRecord.from_log(r)) for i, r in body["records"]]
                )
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            self._missed.pop(0)

    def _insert_commits(self, cur, member: str, rows: list[tuple[int, CommitRecord]]) -> None:
        now = _now()
        cur.executemany(
            f"INSERT INTO commits ({_COMMIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                [i, rec.partition, rec.lease_epoch, member, json.dumps(rec.positions),
                 json.dumps(rec.state_files), json.dumps(rec.output_files), rec.rows_in,
                 rec.rows_total, rec.state_rows, rec.final, rec.map_version, now,
                 None if rec.watermarks is None else json.dumps(rec.watermarks)]
                for i, rec in rows
            ],
        )  # fmt: skip
        outputs = [[f, rec.partition, i, False] for i, rec in rows for f in rec.output_files]
        if outputs:
            # A name is a function of the positions it covers, so a second recording of the same
            # name can only be the same rows: it is published (again) like a new one.
            cur.executemany("INSERT OR REPLACE INTO outputs VALUES (?, ?, ?, ?)", outputs)

    def _maybe_checkpoint(self) -> None:
        """Fold the WAL into the file now and then, so a copy read by tools is recent."""
        now = time.monotonic()
        if now - self._last_checkpoint >= CHECKPOINT_EVERY_S:
            self._last_checkpoint = now
            try:
                self.con.execute("CHECKPOINT")
            except _duckdb_error() as e:  # only freshness for readers of a copy: never fail a commit
                logger.warning("rayflow catalog %s: CHECKPOINT failed (retried later): %s", self.path, e)

    # ------------------------------------------------------------------ outputs
    def unpublished_outputs(self) -> list[str]:
        """Recorded output files not yet published, in commit order."""
        rows = self.con.execute("SELECT file FROM outputs WHERE NOT published ORDER BY commit_id, file")
        return [f for (f,) in rows.fetchall()]

    def set_published(self, published: list[str], pending: list[str] = ()) -> None:
        """Mark outputs published, and others pending again (a repeat's copy whose publication
        failed), in one transaction. Files no longer listed (trimmed) are ignored."""
        rows = [[True, f] for f in published] + [[False, f] for f in pending]
        if not rows:
            return
        cur = self.con.cursor()
        cur.execute("BEGIN TRANSACTION")
        cur.executemany("UPDATE outputs SET published = ? WHERE file = ?", rows)
        cur.execute("COMMIT")

    def output_files(self) -> list[str]:
        """The recorded output files still listed, in commit order: all of them when the
        trim keeps published outputs (a Collect sink), else the recent and unpublished ones."""
        rows = self.con.execute("SELECT file FROM outputs ORDER BY commit_id, file").fetchall()
        return [f for (f,) in rows]

    # ------------------------------------------------------------------ state files
    def named_files(self, partition: int) -> set[str]:
        """Every state file and output file a commit row of ``partition`` still names."""
        rows = self.con.execute(
            "SELECT state_files, output_files FROM commits WHERE partition = ?", [partition]
        ).fetchall()
        named = {f for st, out in rows for f in (*json.loads(st), *json.loads(out))}
        # A trimmed commit row's unpublished outputs live on in ``outputs``.
        rows = self.con.execute("SELECT file FROM outputs WHERE partition = ?", [partition]).fetchall()
        return named | {f for (f,) in rows}

    def all_state_files(self) -> set[str]:
        rows = self.con.execute("SELECT state_files FROM commits WHERE state_files <> '[]'").fetchall()
        return {f for (r,) in rows for f in json.loads(r)}

    def retire_state_files(self, *, keep: int) -> list[str]:
        """Stop naming the state files of all but the last ``keep`` commits per partition.

        Returns the files no row names any more (the caller deletes them): a
        file a kept commit names too (the base of a state chain, its earlier
        deltas) stays. The positions and row counts of old commits stay, as history.
        """
        rows = self.con.execute(
            """SELECT commit_id, state_files FROM (
                   SELECT commit_id, state_files, row_number() OVER
                       (PARTITION BY partition ORDER BY commit_id DESC) AS rn
                   FROM commits WHERE state_files <> '[]')
               WHERE rn > ?""",
            [keep],
        ).fetchall()
        if not rows:
            return []
        ids = [r[0] for r in rows]
        (n,) = self._take_id()
        self._write_log(n, "r", {"commit_ids": ids})
        cur = self.con.cursor()
        cur.execute("BEGIN TRANSACTION")
        self._clear_state_files(cur, ids)
        self._set_applied(cur, n)
        cur.execute("COMMIT")
        named = self.all_state_files()
        return list(dict.fromkeys(f for _, files in rows for f in json.loads(files) if f not in named))

    def _clear_state_files(self, cur, commit_ids: list[int]) -> None:
        cur.executemany(
            "UPDATE commits SET state_files = '[]' WHERE commit_id = ?", [[i] for i in commit_ids]
        )

    # ------------------------------------------------------------------ growth
    def trim(
        self,
        *,
        keep_published_outputs: bool,
        commits_kept: int = COMMITS_KEPT_PER_PARTITION,
        events_kept: int = EVENTS_KEPT,
    ) -> dict[str, int]:
        """Delete history beyond the retention: returns the rows deleted per table.

        Kept whatever their age: the latest commit of each partition (what
        recovery reads), commits that name state files (retired first, by
        :meth:`retire_state_files`), unpublished outputs, and, with
        ``keep_published_outputs``, every output row.
        """
        cur = self.con.cursor()
        cur.execute("BEGIN TRANSACTION")
        commits = cur.execute(
            """DELETE FROM commits WHERE commit_id IN (
                   SELECT commit_id FROM (
                       SELECT commit_id, state_files, row_number() OVER
                           (PARTITION BY partition ORDER BY commit_id DESC) AS rn FROM commits)
                   WHERE rn > ? AND state_files = '[]')""",
            [max(1, commits_kept)],
        ).fetchone()[0]
        outputs = 0
        if not keep_published_outputs:
            outputs = cur.execute(
                """DELETE FROM outputs WHERE published
                       AND commit_id NOT IN (SELECT commit_id FROM commits)"""
            ).fetchone()[0]
        events = cur.execute(
            """DELETE FROM events WHERE ts < (
                   SELECT min(ts) FROM (SELECT ts FROM events ORDER BY ts DESC LIMIT ?))""",
            [events_kept],
        ).fetchone()[0]
        cur.execute("COMMIT")
        return {"commits": int(commits), "outputs": int(outputs), "events": int(events)}

    # ------------------------------------------------------------------ leases
    def lease_owners(self) -> dict[int, str]:
        return dict(self.con.execute("SELECT partition, owner FROM leases").fetchall())

    def lease_epochs(self) -> dict[int, int]:
        return dict(self.con.execute("SELECT partition, lease_epoch FROM leases").fetchall())

    def record_leases(self, grants: list[tuple[int, str, int]]) -> None:
        if not grants:
            return
        (n,) = self._take_id()
        self._write_log(n, "l", {"grants": grants})
        cur = self.con.cursor()
        cur.execute("BEGIN TRANSACTION")
        self._upsert_leases(cur, grants)
        self._set_applied(cur, n)
        cur.execute("COMMIT")

    def _upsert_leases(self, cur, grants: list[tuple[int, str, int]]) -> None:
        cur.executemany("INSERT OR REPLACE INTO leases VALUES (?, ?, ?)", grants)

    # ------------------------------------------------------------------ events
    def record_events(self, events: list[tuple[str, dict]]) -> None:
        if not events:
            return
        now = _now()
        cur = self.con.cursor()
        cur.executemany("INSERT INTO events VALUES (?, ?, ?)", [[now, k, json.dumps(d)] for k, d in events])

    # ------------------------------------------------------------------ history
    def record_history(
        self,
        partitions: list[tuple],
        consumers: list[tuple],
        *,
        others: Mapping[str, list[tuple]] | None = None,
    ) -> None:
        """Append one sample (rows as built by ``history.partition_rows`` / ``consumer_rows``;
        ``others``: rows of the other history tables, by name, e.g. ``skew.history_rows``),
        in one transaction. Arrow in, not row by row: DuckDB's ``executemany`` takes ~20 ms
        for 16 rows, an Arrow scan ~2 ms."""
        cur = self.con.cursor()
        cur.execute("BEGIN TRANSACTION")
        try:
            tables = {"history_partitions": partitions, "history_consumers": consumers, **(others or {})}
            for table, rows in tables.items():
                if rows:
                    cur.register("_sample", _arrow_rows(HISTORY_TABLES[table], rows))
                    cur.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _sample")
                    cur.unregister("_sample")
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        # No CHECKPOINT here: a reader's copy takes the WAL along (snapshot_copy), and commits
        # fold it often enough (DuckDB also does once it reaches its size limit).

    def trim_history(self, *, retention_s: float) -> int:
        """Delete history samples older than ``retention_s``; returns the rows deleted."""
        cutoff = _now() - timedelta(seconds=retention_s)
        cur = self.con.cursor()
        cur.execute("BEGIN TRANSACTION")
        try:
            n = sum(
                cur.execute(f"DELETE FROM {t} WHERE ts < ?", [cutoff]).fetchone()[0] for t in HISTORY_TABLES
            )
            cur.execute("COMMIT")
        except BaseException:  # never leave the cursor inside a transaction
            cur.execute("ROLLBACK")
            raise
        return int(n)


def _arrow_rows(columns: tuple[tuple[str, str], ...], rows: list[tuple]):
    """``rows`` as an Arrow table with the columns' names and types."""
    import pyarrow as pa

    types = {"TIMESTAMP": pa.timestamp("us"), "INTEGER": pa.int32(), "BIGINT": pa.int64(),
             "DOUBLE": pa.float64(), "VARCHAR": pa.string()}  # fmt: skip
    return pa.table(
        [pa.array(list(col), type=types[ty]) for (_, ty), col in zip(columns, zip(*rows))],
        names=[c for c, _ in columns],
    )


def _splits_body(splits) -> dict:
    """Known splits as logged (``-s`` entries, snapshots): names, and their fingerprints alongside
    (a separate list, so the names read as before by code that predates fingerprints)."""
    return {"splits": [n for n, _ in splits], "fingerprints": [fp for _, fp in splits]}


def _logged_splits(body: dict) -> list[tuple[str, str | None]]:
    """``(name, fingerprint)`` pairs of a log entry or snapshot; one written before fingerprints
    (names only) reads as fingerprint None, one written before the table as no splits."""
    names = body.get("splits", [])
    fingerprints = body.get("fingerprints") or [None] * len(names)
    return list(zip(names, fingerprints))


#: Points per series a report draws at most: longer histories are averaged into this many
#: time buckets (a week at 5 s is 120,960 samples; a browser draws 1,500 points per line easily).
HISTORY_MAX_POINTS = 1_500


#: Events shown from this long before the first sample (the manager samples as it starts, so
#: this covers the start's joins and first rebalance, not the events of runs before history).
HISTORY_EVENTS_BEFORE_S = 10.0


#: Hot keys the report lists (the last sample's, hottest first).
HISTORY_HOT_KEYS = 10


def read_history(path: str, *, max_points: int = HISTORY_MAX_POINTS) -> dict:
    """The history a catalog file holds, for ``rayflow report``: safe while the job runs (it
    reads a copy, :func:`snapshot_copy`).

    Samples are grouped into at most ``max_points`` time buckets (all of them
    when fewer). Returns Arrow tables: ``partitions`` (per bucket and
    partition: its last figures, the largest lags, ``rows_per_s`` from the
    growth of processed rows since the previous bucket (never negative: a
    restore to an older commit does not count back), the commits' sums and
    longest), ``consumers`` (per bucket and member), ``events`` (from just
    before the first sample on; all when there is none), ``hot_keys`` (the last
    sample's hottest keys over all partitions, at most :data:`HISTORY_HOT_KEYS`),
    and ``info``: a dict with
    ``bucket_s``, ``first``, ``last`` (datetimes, UTC, None without samples),
    ``samples`` and ``meta`` (the job's recorded meta).
    """
    import duckdb

    copy = snapshot_copy(path)
    try:
        con = duckdb.connect(copy)
        try:
            # A catalog written before history existed: the tables, empty.
            con.cursor().execute(_SCHEMA)
            return _read_history(con, max_points)
        finally:
            con.close()
    finally:
        shutil.rmtree(os.path.dirname(copy), ignore_errors=True)


def _read_history(con, max_points: int) -> dict:
    first, last, samples = (
        con.cursor().execute("SELECT min(ts), max(ts), count(DISTINCT ts) FROM history_partitions").fetchone()
    )
    span_ms = (last - first).total_seconds() * 1000 if first is not None else 0.0
    width_ms = max(1, -(-int(span_ms) // max(1, max_points - 1)))
    bucket = f"make_timestamp((epoch_ms(ts) // {width_ms}) * {width_ms} * 1000)"
    partitions = (
        con.cursor()
        .sql(
            f"""WITH b AS (
                SELECT {bucket} AS ts, partition, max(ts) AS sampled_at,
                       arg_max(processed_rows, ts) AS processed_rows, arg_max(committed_rows, ts) AS committed_rows,
                       avg(rate_rows_per_s) AS rate_rows_per_s, max(lag_rows) AS lag_rows, max(lag_s) AS lag_s,
                       arg_max(watermark_ms, ts) AS watermark_ms, max(event_time_lag_s) AS event_time_lag_s,
                       arg_max(owner, ts) AS owner, max(lease_epoch) AS lease_epoch,
                       max(queued_bytes) AS queued_bytes, max(spilled_bytes) AS spilled_bytes,
                       sum(commits)::BIGINT AS commits, sum(commit_rows)::BIGINT AS commit_rows,
                       sum(commit_bytes)::BIGINT AS commit_bytes, sum(commit_s_sum) AS commit_s_sum,
                       max(commit_s_max) AS commit_s_max
                FROM history_partitions GROUP BY ALL)
            SELECT * EXCLUDE (sampled_at),
                   greatest(0, processed_rows - lag(processed_rows) OVER w) AS rows_delta,
                   greatest(0, processed_rows - lag(processed_rows) OVER w)
                       / nullif(epoch(sampled_at) - epoch(lag(sampled_at) OVER w), 0) AS rows_per_s
            FROM b WINDOW w AS (PARTITION BY partition ORDER BY ts) ORDER BY ts, partition"""
        )
        .to_arrow_table()
    )
    consumers = (
        con.cursor()
        .sql(
            f"""SELECT {bucket} AS ts, member, avg(busy_fraction) AS busy_fraction,
                   avg(commit_fraction) AS commit_fraction, arg_max(rows_processed, ts) AS rows_processed,
                   max(rss_bytes) AS rss_bytes
            FROM history_consumers GROUP BY ALL ORDER BY ts, member"""
        )
        .to_arrow_table()
    )
    events = (
        con.cursor()
        .sql(
            "SELECT ts, kind, detail FROM events WHERE ts >= coalesce($since, ts) ORDER BY ts",
            params={"since": None if first is None else first - timedelta(seconds=HISTORY_EVENTS_BEFORE_S)},
        )
        .to_arrow_table()
    )
    # The hottest keys of the last sample, over every partition (the sources' sketches).
    hot_keys = (
        con.cursor()
        .sql(
            f"""SELECT ts, partition, rank, key, count, share, error_rows FROM history_hot_keys
            WHERE ts = (SELECT max(ts) FROM history_hot_keys)
            ORDER BY count DESC, partition, rank LIMIT {HISTORY_HOT_KEYS}"""
        )
        .to_arrow_table()
    )
    meta = dict(con.cursor().execute("SELECT key, value FROM meta").fetchall())
    info = {"bucket_s": width_ms / 1000, "first": first, "last": last, "samples": samples, "meta": meta}
    return {
        "partitions": partitions,
        "consumers": consumers,
        "events": events,
        "hot_keys": hot_keys,
        "info": info,
    }


def snapshot_copy(path: str) -> str:
    """Copy a catalog file to a temp dir for read-only use by another process."""
    d = tempfile.mkdtemp(prefix="rayflow-catalog-")
    dst = os.path.join(d, "catalog.duckdb")
    shutil.copy(path, dst)
    if os.path.exists(path + ".wal"):
        shutil.copy(path + ".wal", dst + ".wal")
    return dst
