"""The DuckDB catalog: the single point of truth of what is committed (DESIGN §5).

Only the GroupManager opens the live file for writing (DuckDB allows one
writer process). Tools read a consistent copy (:func:`snapshot_copy`).

Tables:

- ``meta(key, value)``: the job's shape (partition map, key, operator
  specs, input schema, split names), checked on every restart (compat.py);
- ``commits``: one row per partition commit (lease epoch, positions per split,
  state files, output files, row counts, final flag, map version);
- ``leases(partition, owner, lease_epoch)``: the last grant of each partition,
  so epochs keep increasing across manager restarts;
- ``events(ts, kind, detail)``: joins, leaves, rebalances, failures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone

import duckdb

from rayflow._internal.checkpoint.commit import CommitRecord
from rayflow._internal.checkpoint.store import Store, is_remote, join
from rayflow.errors import CheckpointError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS commits (
    commit_id BIGINT, partition INTEGER, lease_epoch BIGINT, member VARCHAR,
    positions VARCHAR, state_files VARCHAR, output_files VARCHAR,
    rows_in BIGINT, rows_total BIGINT, state_rows BIGINT, final BOOLEAN,
    map_version INTEGER, committed_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS leases (partition INTEGER PRIMARY KEY, owner VARCHAR, lease_epoch BIGINT);
CREATE TABLE IF NOT EXISTS events (ts TIMESTAMP, kind VARCHAR, detail VARCHAR);
"""


#: How often (at most) the manager folds the catalog's WAL into its file, so that tools
#: reading a copy of a live catalog (``rayflow sql``) see commits at most this old.
CHECKPOINT_EVERY_S = 1.0
#: How long to wait for the catalog's write lock: the processes of a run that just died
#: (a crashed driver's actors) need a few seconds to be reaped by Ray and let go of it.
LOCK_TIMEOUT_S = 60.0


def _connect(path: str, lock_timeout_s: float) -> duckdb.DuckDBPyConnection:
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


class Catalog:
    """The catalog; with ``log_root`` (a remote checkpoint directory), also a durable log.

    The log is a sequence of small JSON objects under ``log_root/log/``, named by
    a sequence number that only grows: ``<n>-c.json`` (commits), ``<n>-l.json``
    (lease grants), ``<n>-r.json`` (state files retired), and ``meta.json``.
    Each is written (atomically, under a unique name) *before* the DuckDB
    transaction it mirrors, so the log is the point of truth: a manager on any
    node rebuilds or catches up its local DuckDB index from it at start.
    """

    def __init__(self, path: str, *, log_root: str | None = None, lock_timeout_s: float = LOCK_TIMEOUT_S):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.con = _connect(path, lock_timeout_s)
        self.con.execute(_SCHEMA)
        self.log = Store(log_root) if log_root else None
        row = self.con.execute("SELECT coalesce(max(commit_id), 0) FROM commits").fetchone()
        self._next_id = int(row[0]) + 1
        if self.log is not None:
            self._replay_log()
        self.con.execute("CHECKPOINT")
        self._last_checkpoint = time.monotonic()

    # ------------------------------------------------------------------ durable log
    def _replay_log(self) -> None:
        applied = self._log_applied()
        entries = []
        for rel in self.log.list_files("log"):
            name = rel.rsplit("/", 1)[1]
            if name == "meta.json":
                continue
            n, _, kind = name.partition("-")
            if n.isdigit() and kind in ("c.json", "l.json", "r.json"):
                entries.append((int(n), kind[0], rel))
        entries.sort()
        if self.log.exists("log/meta.json"):
            self._set_meta_local(json.loads(self.log.read_bytes("log/meta.json")))
        for n, kind, rel in entries:
            self._next_id = max(self._next_id, n + 1)
            if n <= applied:
                continue
            body = json.loads(self.log.read_bytes(rel))
            if kind == "c":
                self._insert_commits(body["member"], [(i, CommitRecord(**r)) for i, r in body["records"]])
            elif kind == "l":
                self._upsert_leases([tuple(g) for g in body["grants"]])
            else:
                self._clear_state_files(body["commit_ids"])
            self._set_meta_local({"_log_applied": str(n)})

    def _append(self, kind: str, body: dict) -> int:
        n = self._next_id
        self._next_id += 1
        if self.log is not None:
            self.log.write_bytes(f"log/{n:012d}-{kind}.json", json.dumps(body).encode())
        return n

    def _mark_applied(self, n: int) -> None:
        if self.log is not None:
            self._set_meta_local({"_log_applied": str(n)})

    def close(self) -> None:
        self.con.close()

    # meta
    def get_meta(self) -> dict[str, str]:
        """The job's shape as recorded (keys starting with ``_`` are the catalog's own)."""
        rows = self.con.execute("SELECT key, value FROM meta").fetchall()
        return {k: v for k, v in rows if not k.startswith("_")}

    def _log_applied(self) -> int:
        row = self.con.execute("SELECT value FROM meta WHERE key = '_log_applied'").fetchone()
        return int(row[0]) if row else 0

    def set_meta(self, values: dict[str, str]) -> None:
        if self.log is not None:
            self.log.write_bytes("log/meta.json", json.dumps(values).encode())
        self._set_meta_local(values)

    def _set_meta_local(self, values: dict[str, str]) -> None:
        cur = self.con.cursor()
        cur.execute("BEGIN TRANSACTION")
        for k, v in values.items():
            cur.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [k, v])
        cur.execute("COMMIT")

    # commits
    def latest_commits(self) -> dict[int, CommitRecord]:
        rows = self.con.execute(
            """SELECT partition, lease_epoch, positions, state_files, output_files, rows_in,
                      rows_total, state_rows, final, map_version
               FROM commits QUALIFY row_number() OVER (PARTITION BY partition ORDER BY commit_id DESC) = 1"""
        ).fetchall()
        return {
            r[0]: CommitRecord(
                partition=r[0],
                lease_epoch=r[1],
                positions=json.loads(r[2]),
                state_files=json.loads(r[3]),
                output_files=json.loads(r[4]),
                rows_in=r[5],
                rows_total=r[6],
                state_rows=r[7],
                final=r[8],
                map_version=r[9],
            )
            for r in rows
        }

    def all_output_files(self) -> list[str]:
        """Every committed output file, once each, in commit order."""
        rows = self.con.execute("SELECT output_files FROM commits ORDER BY commit_id").fetchall()
        return list(dict.fromkeys(f for (r,) in rows for f in json.loads(r)))

    def all_state_files(self) -> set[str]:
        rows = self.con.execute("SELECT state_files FROM commits").fetchall()
        return {f for (r,) in rows for f in json.loads(r)}

    def retire_state_files(self, *, keep: int) -> list[str]:
        """Stop naming the state files of all but the last ``keep`` commits per partition.

        Returns the files no row names any more (the caller deletes them). The
        positions and row counts of old commits stay, as history.
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
        n = self._append("r", {"commit_ids": ids})
        self._clear_state_files(ids)
        self._mark_applied(n)
        return [f for _, files in rows for f in json.loads(files)]

    def _clear_state_files(self, commit_ids: list[int]) -> None:
        cur = self.con.cursor()
        cur.execute("BEGIN TRANSACTION")
        cur.executemany(
            "UPDATE commits SET state_files = '[]' WHERE commit_id = ?", [[i] for i in commit_ids]
        )
        cur.execute("COMMIT")

    def record_commits(self, member: str, records: list[CommitRecord]) -> None:
        """Record several partition commits in one transaction (all or nothing)."""
        ids = list(range(self._next_id, self._next_id + len(records)))
        self._next_id += len(records)
        n = ids[-1]
        if self.log is not None:
            body = {"member": member, "records": [(i, dataclasses.asdict(r)) for i, r in zip(ids, records)]}
            self.log.write_bytes(f"log/{n:012d}-c.json", json.dumps(body).encode())
        self._insert_commits(member, list(zip(ids, records)))
        self._mark_applied(n)
        self._maybe_checkpoint()

    def _insert_commits(self, member: str, rows: list[tuple[int, CommitRecord]]) -> None:
        now = _now()
        cur = self.con.cursor()
        cur.execute("BEGIN TRANSACTION")
        try:
            for i, rec in rows:
                cur.execute(
                    "INSERT INTO commits VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [i, rec.partition, rec.lease_epoch, member, json.dumps(rec.positions),
                     json.dumps(rec.state_files), json.dumps(rec.output_files), rec.rows_in,
                     rec.rows_total, rec.state_rows, rec.final, rec.map_version, now],
                )  # fmt: skip
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def _maybe_checkpoint(self) -> None:
        """Fold the WAL into the file now and then, so a copy read by tools is recent."""
        now = time.monotonic()
        if now - self._last_checkpoint >= CHECKPOINT_EVERY_S:
            self.con.execute("CHECKPOINT")
            self._last_checkpoint = now

    # leases
    def lease_owners(self) -> dict[int, str]:
        return dict(self.con.execute("SELECT partition, owner FROM leases").fetchall())

    def lease_epochs(self) -> dict[int, int]:
        return dict(self.con.execute("SELECT partition, lease_epoch FROM leases").fetchall())

    def record_leases(self, grants: list[tuple[int, str, int]]) -> None:
        if not grants:
            return
        n = self._append("l", {"grants": grants})
        self._upsert_leases(grants)
        self._mark_applied(n)

    def _upsert_leases(self, grants: list[tuple[int, str, int]]) -> None:
        cur = self.con.cursor()
        cur.execute("BEGIN TRANSACTION")
        cur.executemany("INSERT OR REPLACE INTO leases VALUES (?, ?, ?)", grants)
        cur.execute("COMMIT")

    # events
    def record_event(self, kind: str, detail: dict) -> None:
        self.con.cursor().execute("INSERT INTO events VALUES (?, ?, ?)", [_now(), kind, json.dumps(detail)])


def snapshot_copy(path: str) -> str:
    """Copy a catalog file to a temp dir for read-only use by another process."""
    d = tempfile.mkdtemp(prefix="rayflow-catalog-")
    dst = os.path.join(d, "catalog.duckdb")
    shutil.copy(path, dst)
    if os.path.exists(path + ".wal"):
        shutil.copy(path + ".wal", dst + ".wal")
    return dst


class DuckDBSinkWriter:
    """Loads committed output files into a DuckDB table, each exactly once."""

    def __init__(self, path: str, table: str):
        self.table = table
        self.con = _connect(path, LOCK_TIMEOUT_S)
        self.con.execute(
            "CREATE TABLE IF NOT EXISTS _rayflow_applied (file VARCHAR PRIMARY KEY, applied_at TIMESTAMP)"
        )

    def load(self, name: str, parquet_path: str) -> bool:
        """Append the rows of ``parquet_path`` unless ``name`` was loaded before; one transaction."""
        cur = self.con.cursor()
        cur.execute("BEGIN TRANSACTION")
        try:
            if cur.execute("SELECT count(*) FROM _rayflow_applied WHERE file = ?", [name]).fetchone()[0]:
                cur.execute("ROLLBACK")
                return False
            src = f"read_parquet('{parquet_path.replace(chr(39), chr(39) * 2)}')"
            cur.execute(f'CREATE TABLE IF NOT EXISTS "{self.table}" AS SELECT * FROM {src} LIMIT 0')
            cur.execute(f'INSERT INTO "{self.table}" BY NAME SELECT * FROM {src}')
            cur.execute("INSERT INTO _rayflow_applied VALUES (?, ?)", [name, _now()])
            cur.execute("COMMIT")
            return True
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.con.close()
