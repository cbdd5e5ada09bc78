"""The catalog's kept instance: transactions in a `kept_open` scope share one DuckDB instance,
which still leaves the file to other processes after a short idle and at the scope's end."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pytest

import cache.catalog as catalog_module
from cache.catalog import Catalog, insert_rows
from cache.schema import MIGRATIONS
from stages.engine.runner import Runner

from .conftest import ROOT, catalog_rows
from .test_engine import requests, toy_stage


@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The read_only flag of every DuckDB instance the catalog opens."""
    seen: list[bool] = []
    real = Catalog._open

    def counting(self: Catalog, read_only: bool, wait=None):  # type: ignore[no-untyped-def]
        seen.append(read_only)
        return real(self, read_only, wait)

    monkeypatch.setattr(Catalog, "_open", counting)
    return seen


def insert(catalog: Catalog, key: str) -> None:
    with catalog.transaction() as con:
        con.execute("INSERT INTO meta (key, value) VALUES (?, 'x')", [key])


def keys(path: Path) -> set[str]:
    """The meta keys as another process sees them (it can open the file only once this one let go)."""
    code = ("import duckdb, sys\ncon = duckdb.connect(sys.argv[1], read_only=True)\n"
            "print(','.join(k for (k,) in con.execute(\"SELECT key FROM meta WHERE key LIKE 'k%'\").fetchall()))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT, check=True)
    return set(filter(None, out.stdout.strip().split(",")))


def test_without_a_scope_every_transaction_opens_and_closes(home: Path, opens: list[bool]) -> None:
    catalog = Catalog(home)
    for i in range(3):
        insert(catalog, f"k{i}")
    assert len(opens) == 3
    assert keys(catalog.path) == {"k0", "k1", "k2"}  # nothing held open


def test_a_ctrl_c_after_the_commit_does_not_write_deferred_rows_twice(home: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing the connection after COMMIT can take a while (DuckDB checkpoints): a Ctrl-C there
    used to leave the committed rows queued, and the interrupt's flush wrote them again."""
    from contextlib import contextmanager

    from cache.catalog import Deferred, insert_rows

    catalog = Catalog(home)
    with catalog.transaction() as con:
        con.execute("CREATE TABLE t (k INTEGER)")  # no key: nothing else would refuse a second copy
    real = Catalog._connection

    @contextmanager
    def interrupted_while_closing(self: Catalog, read_only: bool, wait=None):  # type: ignore[no-untyped-def]
        with real(self, read_only, wait) as con:
            yield con
        raise KeyboardInterrupt

    rows = Deferred(catalog, lambda con, ks: insert_rows(con, "t", [{"k": k} for k in ks]), batch=2)
    monkeypatch.setattr(Catalog, "_connection", interrupted_while_closing)
    with pytest.raises(KeyboardInterrupt):
        rows.add([1, 2])
    monkeypatch.setattr(Catalog, "_connection", real)
    rows.add([3])
    rows.flush()  # as frames' interrupt handler does
    with catalog.reader() as con:
        assert con.execute("SELECT k FROM t ORDER BY k").fetchall() == [(1,), (2,), (3,)]


def test_the_catalog_draws_no_progress_bar_on_stdout(home: Path) -> None:
    with Catalog(home).transaction() as con:
        assert con.execute("SELECT current_setting('enable_progress_bar')").fetchone() == (False,)


def test_the_idle_watcher_holds_no_reference_to_the_instance(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the kept state holds the connection: the watcher thread, dropping a last reference,
    would tear DuckDB down with the GIL released, which aborts an interpreter that is finalising."""
    monkeypatch.setattr(catalog_module, "IDLE_SECONDS", 30.0)  # the watcher sleeps through the test
    catalog = Catalog(home)
    with catalog.kept_open():
        insert(catalog, "k0")
        con = catalog_module._KEPT[catalog.path.resolve()].con
        assert con is not None
        held = sys.getrefcount(con)
    del con
    assert held == 3  # the kept state, `con` and getrefcount's argument: no watcher thread


def test_a_scope_shares_one_instance_between_transactions_and_readers(home: Path, opens: list[bool],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalog_module, "IDLE_SECONDS", 30.0)  # no pause of a loaded machine may close it
    catalog = Catalog(home)
    insert(catalog, "k0")
    opens.clear()
    with catalog.kept_open():
        insert(catalog, "k1")
        # another Catalog of the same file, named by another path, inside the scope: a stage's own reader
        other = Catalog(Path(str(home) + "/../" + home.name))
        with other.reader() as con:
            assert con.execute("SELECT count(*) FROM meta WHERE key LIKE 'k%'").fetchone()[0] == 2
        insert(other, "k2")
        assert opens == [False]
    assert keys(catalog.path) == {"k0", "k1", "k2"}  # the scope's end closed it: another process reads


def test_a_kept_instance_closes_after_its_idle_time_inside_the_scope(home: Path, opens: list[bool]) -> None:
    catalog = Catalog(home)
    with catalog.kept_open():
        insert(catalog, "k1")
        deadline = time.monotonic() + 10
        while catalog_module._KEPT[catalog.path.resolve()].con is not None:  # a long stage runs here
            assert time.monotonic() < deadline, "the kept instance was never closed"
            time.sleep(0.05)
        assert keys(catalog.path) == {"k1"}  # another process can open the file meanwhile
        insert(catalog, "k2")  # and the next transaction opens it again
        assert opens == [False, False]
    assert keys(catalog.path) == {"k1", "k2"}


def test_a_kept_instance_is_let_go_between_frequent_transactions(home: Path, opens: list[bool]) -> None:
    catalog = Catalog(home)
    with catalog.kept_open():
        started = time.monotonic()
        i = 0
        while time.monotonic() - started < 2.5 * catalog_module.HOLD_SECONDS:  # never idle long enough
            insert(catalog, f"k{i}")
            i += 1
            time.sleep(catalog_module.IDLE_SECONDS / 4)
    assert 3 <= len(opens) < i  # the file was free between some transactions, yet most shared one opening


def test_a_stages_own_work_lets_the_kept_instance_go(home: Path, opens: list[bool],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage's run (`let_go`): the kept instance is closed on entry, its transactions open their
    own (nothing accumulates in one instance over thousands of batches), and the scope's sharing
    resumes after it."""
    monkeypatch.setattr(catalog_module, "IDLE_SECONDS", 30.0)
    catalog = Catalog(home)
    with catalog.kept_open():
        insert(catalog, "k0")
        with catalog.let_go():
            assert keys(catalog.path) == {"k0"}  # let go at once: another process opens the file
            insert(catalog, "k1")
            insert(catalog, "k2")
            assert len(opens) == 3
        insert(catalog, "k3")
        insert(catalog, "k4")
        assert len(opens) == 4  # shared again
    assert keys(catalog.path) == {"k0", "k1", "k2", "k3", "k4"}


def test_a_thread_still_in_a_transaction_at_the_scope_end_closes_it(home: Path) -> None:
    catalog = Catalog(home)
    inside, leave = threading.Event(), threading.Event()

    def slow() -> None:
        with catalog.transaction() as con:
            con.execute("INSERT INTO meta (key, value) VALUES ('k1', 'x')")
            inside.set()
            leave.wait(10)

    with catalog.kept_open():
        worker = threading.Thread(target=slow)
        worker.start()
        assert inside.wait(10)
    assert not catalog_module._KEPT  # the scope is gone; its instance is in use by the worker
    insert(catalog, "k2")  # meanwhile this thread writes too: one file, attached once per process
    leave.set()
    worker.join(10)
    assert keys(catalog.path) == {"k1", "k2"}


def test_concurrent_transactions_in_a_scope_all_commit(home: Path) -> None:
    catalog = Catalog(home)
    with catalog.kept_open():
        threads = [threading.Thread(target=lambda i=i: [insert(catalog, f"k{i}-{j}") for j in range(20)])
                   for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(keys(catalog.path)) == 80


def test_overlapping_transactions_without_a_scope_share_the_file(home: Path) -> None:
    """Threads outside a scope each open the catalog; the file is attached once in the process."""
    catalog = Catalog(home)
    insert(catalog, "k0")
    both = threading.Barrier(2, timeout=10)

    def write(key: str) -> None:
        with Catalog(home).transaction() as con:
            con.execute("INSERT INTO meta (key, value) VALUES (?, 'x')", [key])
            both.wait()  # each is inside its transaction while the other opens

    threads = [threading.Thread(target=write, args=(f"k{i}",)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert keys(catalog.path) == {"k0", "k1", "k2"}


def test_a_failed_transaction_in_a_scope_rolls_back_and_the_instance_stays_usable(home: Path) -> None:
    catalog = Catalog(home)
    with catalog.kept_open():
        with pytest.raises(duckdb.Error), catalog.transaction() as con:
            con.execute("INSERT INTO meta (key, value) VALUES ('k-rolled-back', 'x')")
            con.execute("SELECT * FROM no_such_table")
        insert(catalog, "k1")
    assert keys(catalog.path) == {"k1"}


def test_materialise_opens_the_catalog_once_for_a_chain_of_stages(home: Path, tmp_path: Path, opens: list[bool],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalog_module, "IDLE_SECONDS", 30.0)  # no pause of a loaded machine may close it
    src = tmp_path / "src.txt"
    src.write_text("a b c")
    runner = Runner(home, toy_stage, echo=lambda s: None)
    _, count = requests(src)
    runner.materialise(count)  # two stages: ~8 catalog transactions and reads
    # once for the planning and once after each stage's own work (`let_go`), not once a transaction
    assert opens == [False] * 3
    assert keys(home / "catalog.duckdb") == set()  # and the file is free once materialise returns


def _catalog_at(home: Path, version: int) -> duckdb.DuckDBPyConnection:
    """A catalog file as an msta-pipe of schema `version` left it, open for writing old rows."""
    from cache.schema import EMPTY_TEXT_EMBEDDINGS

    home.mkdir(parents=True)
    con = duckdb.connect(str(home / "catalog.duckdb"))
    for migration in MIGRATIONS[:version]:
        con.execute(migration)
    con.execute(EMPTY_TEXT_EMBEDDINGS)
    con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(version)])
    return con


def test_an_old_frame_index_moves_its_list_facts_to_frame_lists(tmp_path: Path) -> None:
    """Rows `frames` registered before migration 7 read back through the `frames` view unchanged."""
    home = tmp_path / "home"
    con = _catalog_at(home, 6)
    for key, video in (("e1", "a.mp4"), ("e2", "b.mp4")):
        con.execute("INSERT INTO frame_clips (entry_key, path, bytes) VALUES (?, ?, 10)", [key, f"artifacts/{key}"])
        con.execute("INSERT INTO frame_index VALUES ('frames:toy:train:train', 'd1', 'toy', 'train', ?, 3, ?)",
                    [video, key])
    con.execute("INSERT INTO frame_index VALUES ('frames:toy:test:test', 'd2', 'toy', 'test', 'a.mp4', 3, 'e1')")
    before = con.execute("SELECT * FROM frames ORDER BY target, video").fetchall()
    con.execute(MIGRATIONS[6])
    assert con.execute("SELECT * FROM frames ORDER BY target, video").fetchall() == before
    assert con.execute("SELECT * FROM frame_lists ORDER BY target").fetchall() == [
        ("frames:toy:test:test", "d2", "toy", "test"), ("frames:toy:train:train", "d1", "toy", "train")]
    assert [d[0] for d in con.execute("SELECT * FROM frame_index").description] == [
        "target", "video", "label", "entry_key"]
    assert len(before) == 3
    con.close()


def test_migration_8_keeps_every_clip_row_and_drops_the_key(tmp_path: Path) -> None:
    home = tmp_path / "home"
    con = _catalog_at(home, 7)
    con.execute("INSERT INTO frame_clips (entry_key, video, shape, path, bytes, sha256, sampling) "
                "VALUES ('e1', '/v/a.mp4', [4, 8, 8, 3], 'artifacts/e1', 10, 's1', '{\"frames\": 4}'), "
                "('e2', '/v/b.mp4', NULL, 'artifacts/e2', 20, NULL, NULL)")
    con.execute("INSERT INTO frame_lists VALUES ('frames:toy:train:train', 'd1', 'toy', 'train')")
    con.execute("INSERT INTO frame_index VALUES ('frames:toy:train:train', 'a.mp4', 3, 'e1')")
    before = con.execute("SELECT * FROM frame_clips ORDER BY entry_key").fetchall()
    types = con.execute("SELECT column_name, data_type FROM information_schema.columns "
                        "WHERE table_name = 'frame_clips' ORDER BY ordinal_position").fetchall()
    c = con
    c.execute(MIGRATIONS[7])
    assert c.execute("SELECT * FROM frame_clips ORDER BY entry_key").fetchall() == before
    assert c.execute("SELECT column_name, data_type FROM information_schema.columns "
                     "WHERE table_name = 'frame_clips' ORDER BY ordinal_position").fetchall() == types
    assert c.execute("SELECT count(*) FROM duckdb_constraints() WHERE table_name = 'frame_clips' "
                     "AND constraint_type = 'PRIMARY KEY'").fetchone() == (0,)
    assert c.execute("SELECT video, bytes, artifact FROM frames").fetchall() == [("a.mp4", 10, "d1")]
    con.close()


@pytest.mark.parametrize("version", [6, 8])
def test_migration_9_reads_each_index_from_its_artifact(tmp_path: Path, version: int) -> None:
    """frame_index goes: the `frames` view reads the same rows from the index files `frames` wrote,
    from schema 6 (a list's facts on every row) as from 8; a list whose file is gone is left out,
    with a warning, and does not stop the migration."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    home = tmp_path / "home"
    con = _catalog_at(home, version)
    rows = [{"video": "a.mp4", "label": 3, "entry_key": "e1", "clip_path": "artifacts/e1", "source": "/v/a.mp4",
             "size": 1, "mtime_ns": 2}, {"video": "b.mp4", "label": 5, "entry_key": "e2",
                                        "clip_path": "artifacts/e2", "source": "/v/b.mp4", "size": 1, "mtime_ns": 2}]
    index = home / "artifacts" / "frame_index" / "d1" / "d1.parquet"
    index.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), index)
    for key in ("e1", "e2"):
        con.execute("INSERT INTO frame_clips (entry_key, path, bytes, shape) VALUES (?, ?, 10, [8, 4, 4, 3])",
                    [key, f"artifacts/{key}"])
    con.execute("INSERT INTO artifacts (digest, kind, path, file_sha256) VALUES "
                "('d1', 'frame_index', 'artifacts/frame_index/d1/d1.parquet', 'x'), "
                "('d2', 'frame_index', 'artifacts/frame_index/d2/d2.parquet', 'x')")  # d2's file is gone
    if version == 6:
        con.execute("INSERT INTO frame_index VALUES "
                    "('frames:toy:train:train', 'd1', 'toy', 'train', 'a.mp4', 3, 'e1'), "
                    "('frames:toy:train:train', 'd1', 'toy', 'train', 'b.mp4', 5, 'e2'), "
                    "('frames:toy:test:test', 'd2', 'toy', 'test', 'a.mp4', 3, 'e1')")
    else:
        con.execute("INSERT INTO frame_lists VALUES ('frames:toy:train:train', 'd1', 'toy', 'train'), "
                    "('frames:toy:test:test', 'd2', 'toy', 'test')")
        con.execute("INSERT INTO frame_index VALUES ('frames:toy:train:train', 'a.mp4', 3, 'e1'), "
                    "('frames:toy:train:train', 'b.mp4', 5, 'e2'), ('frames:toy:test:test', 'a.mp4', 3, 'e1')")
    before = con.execute("SELECT * FROM frames WHERE artifact = 'd1' ORDER BY video").fetchall()
    con.close()
    with pytest.warns(UserWarning, match="d2.parquet"), Catalog(home).transaction():
        pass
    assert catalog_rows(home, "SELECT * FROM frames ORDER BY video") == before
    assert catalog_rows(home, "SELECT target, artifact, dataset, list, path FROM frame_lists ORDER BY target") == [
        ("frames:toy:test:test", "d2", "toy", "test", "artifacts/frame_index/d2/d2.parquet"),
        ("frames:toy:train:train", "d1", "toy", "train", "artifacts/frame_index/d1/d1.parquet")]
    assert catalog_rows(home, "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'frame_index'") == [(0,)]
    assert len(before) == 2


def test_sql_on_a_catalog_not_yet_migrated_still_has_the_frames_view(tmp_path: Path) -> None:
    """`sql` only reads (it never migrates): on a schema-6 catalog its `frames` view reads the old columns."""
    from cache.views import define_views

    home = tmp_path / "home"
    con = _catalog_at(home, 6)
    con.execute("INSERT INTO frame_clips (entry_key, path, bytes) VALUES ('e1', 'artifacts/e1', 10)")
    con.execute("INSERT INTO frame_index VALUES ('frames:toy:train:train', 'd1', 'toy', 'train', 'a.mp4', 3, 'e1')")
    define_views(con, home)
    assert con.execute("SELECT dataset, list, video, label, artifact FROM frames").fetchall() == [
        ("toy", "train", "a.mp4", 3, "d1")]
    con.close()


def test_migration_7_runs_when_the_stored_frames_view_was_dropped(tmp_path: Path) -> None:
    home = tmp_path / "home"
    con = _catalog_at(home, 6)
    con.execute("DROP VIEW frames")  # e.g. by hand in a duckdb shell
    con.close()
    with Catalog(home).transaction() as c:
        assert c.execute("SELECT count(*) FROM frames").fetchone() == (0,)


def test_an_old_catalog_gets_plain_params(tmp_path: Path) -> None:
    """A catalog written before migration 6 (floats in the key's marker) reads as plain JSON after it."""
    import json

    home = tmp_path / "home"
    con = _catalog_at(home, 5)
    con.execute("""INSERT INTO runs (run_id, key, stage, target, code_version, params, status)
                   VALUES ('r', 'k', 'train', 't', '2', '{"alpha":{"__float__":"0.0"},"lr":{"__float__":"1e-05"},"epochs":3}',
                           'done')""")
    con.close()
    with Catalog(home).transaction():  # the next command that writes migrates
        pass
    with Catalog(home).reader() as c:
        alpha, lr, epochs, conf = c.execute("SELECT (params->>'alpha')::DOUBLE, params->'lr', params->>'epochs', "
                                            "configuration FROM runs").fetchone()
    assert (alpha, json.loads(lr), epochs, conf) == (0.0, 1e-05, "3", None)


def test_an_index_that_cannot_be_read_is_left_out_and_blocks_nothing(tmp_path: Path) -> None:
    """A damaged index file (here a Git LFS pointer) neither stops another list's registration nor
    `sql`: its rows are left out with one warning line naming it."""
    from .conftest import register_index, run_cli

    home = tmp_path / "home"
    with Catalog(home).transaction() as con:
        insert_rows(con, "frame_clips", [{"entry_key": k, "path": f"artifacts/clips/{k}", "bytes": 1}
                                         for k in ("e1", "e2")])
        register_index(con, home, "frames:toy:a", [{"video": "a.mp4", "entry_key": "e1"}])
        (index,) = con.execute("SELECT path FROM frame_lists").fetchone()
    (home / index).write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.warns(UserWarning, match="frames:toy:a"), Catalog(home).transaction() as con:
        register_index(con, home, "frames:toy:b", [{"video": "b.mp4", "entry_key": "e2"}])
    r = run_cli("sql", "SELECT target, video FROM frames", "--home", home, "--format", "csv")
    assert r.returncode == 0 and r.stdout.splitlines()[1:] == ["frames:toy:b,b.mp4"], r
    assert "warning: the frame index of frames:toy:a" in r.stderr
    assert catalog_rows(home, "SELECT target, video FROM frames") == [("frames:toy:b", "b.mp4")]
