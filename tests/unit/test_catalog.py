"""The catalog without Ray: outputs driven to publication, bounded growth, the compacted log."""

from __future__ import annotations

import dataclasses
import json

import duckdb
import pytest

from rayflow._internal.checkpoint import catalog as catalog_mod
from rayflow._internal.checkpoint.catalog import Catalog
from rayflow._internal.checkpoint.commit import CommitRecord
from rayflow._internal.checkpoint.store import Store


def rec(p: int, pos: int, *, epoch: int = 1, outputs=(), state=(), final: bool = False) -> CommitRecord:
    return CommitRecord(
        partition=p,
        lease_epoch=epoch,
        positions={"s": pos},
        state_files=list(state),
        output_files=list(outputs),
        rows_in=1,
        rows_total=pos,
        state_rows=0,
        final=final,
        map_version=1,
    )


def fill(cat: Catalog, partitions: int, commits: int, *, outputs: bool = True) -> None:
    for i in range(1, commits + 1):
        cat.record_commits(
            "m",
            [rec(p, i, outputs=[f"out-{p}-{i}.parquet"] if outputs else ()) for p in range(partitions)],
        )


def test_recorded_outputs_are_unpublished_until_marked(tmp_path):
    cat = Catalog(str(tmp_path / "c.duckdb"))
    cat.record_commits("m", [rec(0, 5, outputs=["a.parquet"]), rec(1, 7, outputs=["b.parquet"])])
    assert cat.unpublished_outputs() == ["a.parquet", "b.parquet"]
    cat.set_published(["a.parquet"])
    assert cat.unpublished_outputs() == ["b.parquet"]
    cat.set_published(["b.parquet"], ["a.parquet"])  # a repeat's copy of a failed again
    assert cat.unpublished_outputs() == ["a.parquet"]
    assert cat.output_files() == ["a.parquet", "b.parquet"]
    cat.close()


def test_trim_keeps_latest_commits_live_state_and_unpublished_outputs(tmp_path):
    cat = Catalog(str(tmp_path / "c.duckdb"))
    fill(cat, partitions=2, commits=30)
    cat.record_commits("m", [rec(0, 31, state=["state/keep.parquet"])])
    cat.set_published([f"out-{p}-{i}.parquet" for p in range(2) for i in range(1, 25)])
    cat.record_events([("join", {"member": f"c{i}"}) for i in range(20)])
    deleted = cat.trim(keep_published_outputs=False, commits_kept=5, events_kept=3)
    assert deleted["commits"] == 2 * 30 + 1 - 2 * 5
    latest = cat.latest_commits()
    assert latest[0].positions == {"s": 31} and latest[1].positions == {"s": 30}
    assert cat.all_state_files() == {"state/keep.parquet"}
    # Published outputs of trimmed commits go; unpublished ones stay whatever their age.
    assert cat.unpublished_outputs() == [f"out-{p}-{i}.parquet" for i in range(25, 31) for p in range(2)]
    assert set(cat.output_files()) == {f"out-{p}-{i}.parquet" for p in range(2) for i in range(25, 31)}
    assert cat.con.execute("SELECT count(*) FROM events").fetchone()[0] <= 20
    cat.close()


def test_trim_never_deletes_a_commit_that_names_state_files(tmp_path):
    cat = Catalog(str(tmp_path / "c.duckdb"))
    for i in range(1, 11):
        cat.record_commits("m", [rec(0, i, state=[f"state/{i}.parquet"])])
    cat.trim(keep_published_outputs=False, commits_kept=1)
    assert len(cat.all_state_files()) == 10  # not retired yet: every row stays
    retired = cat.retire_state_files(keep=3)
    assert len(retired) == 7
    cat.trim(keep_published_outputs=False, commits_kept=1)
    assert cat.all_state_files() == {f"state/{i}.parquet" for i in (8, 9, 10)}
    assert cat.con.execute("SELECT count(*) FROM commits").fetchone()[0] == 3
    cat.close()


def test_a_collect_sink_keeps_its_whole_output_list(tmp_path):
    cat = Catalog(str(tmp_path / "c.duckdb"))
    fill(cat, partitions=1, commits=20)
    cat.set_published(cat.unpublished_outputs())
    cat.trim(keep_published_outputs=True, commits_kept=2)
    assert cat.output_files() == [f"out-0-{i}.parquet" for i in range(1, 21)]
    cat.close()


def test_a_catalog_from_before_the_outputs_table_lists_its_outputs_to_publish(tmp_path):
    path = str(tmp_path / "c.duckdb")
    con = duckdb.connect(path)
    con.execute(catalog_mod._SCHEMA)
    con.execute(
        "INSERT INTO commits VALUES (1, 0, 1, 'm', '{\"s\": 5}', '[]', '[\"x.parquet\", \"y.parquet\"]', "
        "5, 5, 0, false, 1, now(), NULL)"
    )
    con.close()
    cat = Catalog(path)
    assert sorted(cat.unpublished_outputs()) == ["x.parquet", "y.parquet"]
    cat.close()


def test_remote_log_is_compacted_and_rebuilt_from_snapshot_plus_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog_mod, "LOG_SNAPSHOT_EVERY", 10)
    log_root = str(tmp_path / "bucket")
    cat = Catalog(str(tmp_path / "node-a" / "c.duckdb"), log_root=log_root)
    cat.set_meta({"key": '["key"]'})
    cat.record_leases([(0, "c0", 1), (1, "c1", 1)])
    fill(cat, partitions=2, commits=12)
    cat.set_published([f"out-{p}-{i}.parquet" for p in range(2) for i in range(1, 11)])
    assert cat.compact_log()
    fill_after = [rec(p, 13, outputs=[f"out-{p}-13.parquet"]) for p in range(2)]
    cat.record_commits("m", fill_after)
    cat.record_leases([(1, "c0", 2)])
    expected = (cat.latest_commits(), cat.unpublished_outputs(), cat.lease_owners(), cat.lease_epochs())
    cat.close()

    names = [r.rsplit("/", 1)[1] for r in Store(log_root).list_files("log")]
    snapshots = [n for n in names if n.startswith("snapshot-")]
    entries = [n for n in names if n[0].isdigit()]
    assert len(snapshots) == 1 and len(entries) == 2, names  # everything older went into the snapshot

    # Another node: no local index. It rebuilds the same catalog from the snapshot and the entries.
    other = Catalog(str(tmp_path / "node-b" / "c.duckdb"), log_root=log_root)
    got = (other.latest_commits(), other.unpublished_outputs(), other.lease_owners(), other.lease_epochs())
    assert got == expected
    assert other.get_meta() == {"key": '["key"]'}
    # New ids continue after the log's, so a later entry never hides under the snapshot.
    other.record_commits("m", [rec(0, 14)])
    assert other.latest_commits()[0].positions == {"s": 14}
    other.close()


def test_a_local_index_newer_than_the_snapshot_is_caught_up_not_reloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog_mod, "LOG_SNAPSHOT_EVERY", 5)
    log_root = str(tmp_path / "bucket")
    path = str(tmp_path / "node" / "c.duckdb")
    cat = Catalog(path, log_root=log_root)
    fill(cat, partitions=1, commits=6)
    cat.compact_log()
    cat.record_events([("join", {"member": "c0"})])  # local only: survives a catch-up
    cat.close()
    Store(log_root).write_bytes(
        "log/000000000100-c.json",
        json.dumps({"member": "m", "records": [(100, rec(0, 99).__dict__)]}).encode(),
    )
    again = Catalog(path, log_root=log_root)
    assert again.latest_commits()[0].positions == {"s": 99}
    assert again.con.execute("SELECT count(*) FROM events").fetchone()[0] == 1
    again.close()


@pytest.mark.parametrize("commits", [50, 150])
def test_start_reads_a_bounded_log(tmp_path, monkeypatch, commits):
    """However many commits a job made, a start lists a snapshot and fewer than
    LOG_SNAPSHOT_EVERY entries (the manager compacts with every trim)."""
    monkeypatch.setattr(catalog_mod, "LOG_SNAPSHOT_EVERY", 20)
    log_root = str(tmp_path / "bucket")
    cat = Catalog(str(tmp_path / "a" / "c.duckdb"), log_root=log_root)
    for i in range(1, commits + 1):
        cat.record_commits("m", [rec(0, i)])
        if i % 20 == 0:
            cat.trim(keep_published_outputs=False, commits_kept=5)
            cat.compact_log()
    cat.close()
    assert len(Store(log_root).list_files("log")) <= 20 + 1


def test_a_logged_commit_the_index_missed_is_caught_up_from_the_log(tmp_path, monkeypatch):
    """The log is the point of truth: a commit in it happened even if the local insert failed."""
    cat = Catalog(str(tmp_path / "a" / "c.duckdb"), log_root=str(tmp_path / "bucket"))
    cat.record_commits("m", [rec(0, 5)])
    real = cat._insert_commits

    def broken(*args, **kwargs):
        raise duckdb.IOException("disk full")

    monkeypatch.setattr(cat, "_insert_commits", broken)
    with pytest.raises(catalog_mod.IndexBehindLog, match="durable log"):
        cat.record_commits("m", [rec(0, 9, outputs=["late.parquet"])])
    assert cat.latest_commits()[0].positions == {"s": 5}
    monkeypatch.setattr(cat, "_insert_commits", real)
    cat.catch_up()
    assert cat.latest_commits()[0].positions == {"s": 9}
    assert cat.unpublished_outputs() == ["late.parquet"]
    cat.close()


# ----------------------------------------------------------------------------- split fingerprints


def test_the_first_fingerprint_of_a_split_wins_and_a_missing_one_is_filled(tmp_path):
    cat = Catalog(str(tmp_path / "c.duckdb"))
    assert cat.add_splits({}) == {}
    # Names only (the manager, from the job's meta): known, nothing to compare yet.
    assert cat.add_splits({"a": None, "b": None}) == {"a": None, "b": None}
    assert cat.add_splits({"a": "size=1", "c": "size=3"}) == {"a": "size=1", "c": "size=3"}
    # Another fingerprint under a known name is not recorded: the caller sees the first one.
    assert cat.add_splits({"a": "size=9", "b": None, "c": "size=3"}) == {
        "a": "size=1",
        "b": None,
        "c": "size=3",
    }
    assert cat.known_splits() == ["a", "b", "c"]
    cat.close()
    again = Catalog(str(tmp_path / "c.duckdb"))
    assert again.add_splits({"a": "size=9", "b": "size=2"}) == {"a": "size=1", "b": "size=2"}
    again.close()


def test_split_fingerprints_survive_the_log_and_its_snapshots(tmp_path):
    log_root = str(tmp_path / "bucket")
    cat = Catalog(str(tmp_path / "node-a" / "c.duckdb"), log_root=log_root)
    cat.add_splits({"a": None, "b": "fb"})
    cat.add_splits({"a": "fa"})  # fills a's: logged too
    assert cat.compact_log(force=True)
    cat.add_splits({"c": "fc", "d": None})  # an entry after the snapshot
    cat.close()
    other = Catalog(str(tmp_path / "node-b" / "c.duckdb"), log_root=log_root)
    got = other.add_splits(dict.fromkeys("abcd", "x"))
    assert got == {"a": "fa", "b": "fb", "c": "fc", "d": "x"}
    other.close()


def test_splits_logged_before_fingerprints_read_as_known_without_one(tmp_path):
    """Log entries and snapshots of names only (the old form): the names are known, their
    fingerprints are not, and the first one recorded now is kept."""
    log_root = str(tmp_path / "bucket")
    store = Store(log_root)
    store.write_bytes(
        "log/snapshot-000000000002.json",
        json.dumps(
            {"seq": 2, "next_id": 3, "commits": [], "outputs": [], "leases": [], "splits": ["a"]}
        ).encode(),
    )
    store.write_bytes("log/000000000003-s.json", json.dumps({"splits": ["b"]}).encode())
    cat = Catalog(str(tmp_path / "node" / "c.duckdb"), log_root=log_root)
    assert cat.known_splits() == ["a", "b"]
    assert cat.add_splits({"a": "fa", "b": "fb"}) == {"a": "fa", "b": "fb"}
    assert cat.add_splits({"a": "x", "b": "y"}) == {"a": "fa", "b": "fb"}
    cat.close()


def test_a_catalog_from_before_split_fingerprints_gains_the_column(tmp_path):
    path = str(tmp_path / "c.duckdb")
    con = duckdb.connect(path)
    con.execute("CREATE TABLE splits (name VARCHAR PRIMARY KEY, first_seen TIMESTAMP)")
    con.execute("INSERT INTO splits VALUES ('a', now())")
    con.close()
    cat = Catalog(path)
    assert cat.known_splits() == ["a"]
    assert cat.add_splits({"a": "fa", "b": "fb"}) == {"a": "fa", "b": "fb"}
    assert cat.add_splits({"a": "x"}) == {"a": "fa"}
    cat.close()


# ----------------------------------------------------------------------------- log compatibility


def test_the_log_leaves_measurements_out_and_replay_ignores_unknown_keys(tmp_path):
    """A commit's ``write_s``/``nbytes`` (history only) are not in the durable log, so the
    release before them can replay it after a rollback; and a replay ignores keys it does not
    know (an entry from a newer release) instead of failing to rebuild the catalog."""
    log_root = str(tmp_path / "bucket")
    cat = Catalog(str(tmp_path / "a" / "c.duckdb"), log_root=log_root)
    r = dataclasses.replace(rec(0, 5), write_s=0.25, nbytes=4096)
    cat.record_commits("m", [r])
    cat.close()
    store = Store(log_root)
    (entry,) = [f for f in store.list_files("log") if f.endswith("-c.json")]
    ((_, logged),) = json.loads(store.read_bytes(entry.split(log_root + "/", 1)[-1]))["records"]
    assert "write_s" not in logged and "nbytes" not in logged
    assert CommitRecord(**logged).positions == {"s": 5}  # what the previous release's replay does
    # An entry from a newer release, with a field this one does not know.
    newer = {**logged, "positions": {"s": 9}, "rows_total": 9, "a_field_from_the_future": [1, 2]}
    store.write_bytes(
        "log/000000000100-c.json", json.dumps({"member": "m", "records": [[100, newer]]}).encode()
    )
    other = Catalog(str(tmp_path / "b" / "c.duckdb"), log_root=log_root)
    assert other.latest_commits()[0].positions == {"s": 9}
    other.close()


# ----------------------------------------------------------------------------- the sql command


def test_rayflow_sql_takes_the_query_before_or_after_its_options(tmp_path, capsys):
    """``rayflow sql CK --name NAME "SQL"`` (the runbooks' form) and ``rayflow sql --name NAME
    CK "SQL"`` both run the query; a stray option is still refused."""
    from rayflow.cli import main

    for name in ("job", "other"):
        cat = Catalog(str(tmp_path / "ck" / name / "catalog.duckdb"))
        cat.record_commits("m", [rec(0, 5), rec(1, 7)])
        cat.close()
    ck, query = str(tmp_path / "ck"), "SELECT sum(rows_total) AS total_rows FROM latest"
    for argv in (
        ["sql", ck, "--name", "job", query],
        ["sql", "--name", "job", ck, query],
        ["sql", ck, query, "--name", "job"],
    ):
        assert main(argv) == 0, argv
        out = capsys.readouterr().out
        assert out.split() == ["total_rows", "12"], (argv, out)
    with pytest.raises(SystemExit):
        main(["sql", ck, "--name", "job", query, "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
