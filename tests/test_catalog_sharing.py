"""A reader never keeps a writer out, a busy catalog never ends a stage's work, a home works where
it is (copied, moved or received), and what the catalog holds is printed safely."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from cache.catalog import Catalog, CatalogBusy, Deferred, insert_rows

from .conftest import ROOT, cli_env, described_toy_home, register_index, run_cli

LONG_QUERY = "SELECT count(*) FROM range(1000000000000) a WHERE a.range % 7 = 3"  # hours of work for DuckDB


@pytest.fixture(scope="module")
def toy_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return described_toy_home(tmp_path_factory.mktemp("sharing"), "A video \x1b]0;pwned\x07 of a crowd.")


def _sql(home: Path, query: str, *extra: str, tmp: Path | None = None) -> subprocess.Popen[str]:
    env = cli_env(TMPDIR=str(tmp)) if tmp else cli_env()
    return subprocess.Popen([sys.executable, "-m", "pipeline", "sql", query, "--home", str(home), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _wait_started(home: Path) -> None:
    """Until the query runs: the sql process has let go of the catalog once it has its copy."""
    time.sleep(1.5)


def test_a_long_query_never_keeps_a_writer_out(toy_home: Path) -> None:
    reader = _sql(toy_home, LONG_QUERY, "--timeout", "120")
    try:
        _wait_started(toy_home)
        assert reader.poll() is None, reader.stderr.read() if reader.stderr else ""
        # a writer with a short wait, as a training's epoch write has
        with Catalog(toy_home, wait_seconds=2).transaction() as con:
            con.execute("CREATE TABLE IF NOT EXISTS probe (x INTEGER)")
            con.execute("DROP TABLE probe")
    finally:
        reader.kill()
        reader.wait()


def _state(pid: int) -> str:
    """A process's state letter from /proc ("" once it is gone; "Z": ended, not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _children(pid: int) -> list[int]:
    """Live processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_killed_sql_leaves_no_query_running_and_no_copy(toy_home: Path, tmp_path: Path) -> None:
    """kill -9 of `sql` ends its query's process too: an orphan would run the query for hours. Its
    copy of the catalog (tens of MB at Kinetics size) is removed by the next `sql`, which leaves a
    running query's copy alone."""
    reader = _sql(toy_home, LONG_QUERY, "--timeout", "120", tmp=tmp_path)
    _wait_started(toy_home)
    children = _children(reader.pid)
    assert children, "the query's process was not found"
    [killed_copy] = tmp_path.glob("msta-sql-*")
    reader.kill()
    reader.wait()
    deadline = time.monotonic() + 20
    while any(_state(c) not in ("", "Z") for c in children):
        assert time.monotonic() < deadline, f"the query's process {children} outlived sql"
        time.sleep(0.1)
    assert (killed_copy / "catalog.duckdb").exists()
    running = _sql(toy_home, LONG_QUERY, "--timeout", "120", tmp=tmp_path)
    try:
        _wait_started(toy_home)
        [running_copy] = tmp_path.glob("msta-sql-*")
        assert running_copy != killed_copy
        r = run_cli("sql", "select 1", "--home", toy_home, env=cli_env(TMPDIR=str(tmp_path)))
        assert r.returncode == 0, r.stderr
        assert list(tmp_path.glob("msta-sql-*")) == [running_copy]
    finally:
        running.send_signal(signal.SIGINT)
        running.communicate(timeout=30)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_stops_a_query_at_once(toy_home: Path) -> None:
    reader = _sql(toy_home, LONG_QUERY, "--timeout", "120")
    _wait_started(toy_home)
    reader.send_signal(signal.SIGINT)
    start = time.monotonic()
    _, err = reader.communicate(timeout=30)
    assert reader.returncode == 130, err
    assert time.monotonic() - start < 10  # generous: the old query ignored SIGINT for minutes
    assert "interrupted" in err and "Traceback" not in err


def test_a_query_stops_at_its_time_limit(toy_home: Path) -> None:
    start = time.monotonic()
    r = run_cli("sql", LONG_QUERY, "--timeout", "1", "--home", toy_home, timeout=60)
    assert r.returncode == 1 and "--timeout" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert time.monotonic() - start < 30
    bad = run_cli("sql", "select 1", "--timeout", "0", "--home", toy_home)
    assert bad.returncode == 2 and "--timeout" in bad.stderr


def _holder(path: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process holding the catalog file (a duckdb shell left open), for `seconds`."""
    code = (f"import duckdb, sys, time; c = duckdb.connect({str(path)!r}); print('held', flush=True); "
            f"time.sleep({seconds})")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def test_rows_wait_for_a_busy_catalog_instead_of_failing(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path, wait_seconds=0.3)
    with catalog.transaction() as con:
        con.execute("CREATE TABLE epochs_probe (epoch INTEGER)")
    deferred = Deferred(catalog, lambda con, rows: insert_rows(con, "epochs_probe", rows), wait=0.3)
    holder = _holder(catalog.path, 3)
    try:
        with pytest.raises(CatalogBusy):  # what a stage's epoch write met before
            with catalog.transaction():
                pass
        with pytest.warns(UserWarning, match="recorded once it is free"):
            deferred.add([{"epoch": 1}])
        deferred.add([{"epoch": 2}])
        assert len(deferred.pending) == 2
        deferred.flush()  # waits for the holder to let go, however long that takes
    finally:
        holder.kill()
        holder.wait()
    with catalog.transaction() as con:
        assert con.execute("SELECT list(epoch ORDER BY epoch) FROM epochs_probe").fetchone()[0] == [1, 2]


def test_a_copied_home_reads_its_own_files(toy_home: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(toy_home, copy)
    moved = tmp_path / "moved-away"
    shutil.move(str(toy_home), moved)  # the original is gone
    try:
        r = run_cli("sql", "select count(*) as n from text_embeddings", "--home", copy, "--format", "csv")
        assert r.returncode == 0 and r.stdout.splitlines()[1] != "0", r.stderr
        stored = duckdb.connect(str(copy / "catalog.duckdb"), read_only=True)
        try:
            definition = stored.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'text_embeddings'"
                                        ).fetchone()[0]
        finally:
            stored.close()
        assert str(toy_home) not in definition  # the file's own views name paths relative to the home
    finally:
        shutil.move(str(moved), toy_home)


def _received(toy_home: Path, tmp_path: Path) -> tuple[Path, Path, duckdb.DuckDBPyConnection]:
    """A copy of the toy home as someone else's, a private file, and a connection to the copy's catalog."""
    received = tmp_path / "received"
    shutil.copytree(toy_home, received)
    secret = tmp_path / "secret.txt"
    secret.write_text("the-content-of-a-private-file")
    return received, secret, duckdb.connect(str(received / "catalog.duckdb"))


def test_views_of_a_received_catalog_are_never_run(toy_home: Path, tmp_path: Path) -> None:
    received, secret, con = _received(toy_home, tmp_path)
    try:
        con.execute(f"CREATE OR REPLACE VIEW text_embeddings AS SELECT content AS text FROM read_text('{secret}')")
        con.execute(f"CREATE VIEW evil AS SELECT content FROM read_text('{secret}')")
        con.execute("UPDATE text_embedding_files SET path = ?", [str(secret)])
        con.execute("INSERT INTO frame_lists VALUES ('frames:toy:t:t', 'd', 'toy', 't', ?)", [str(secret)])
    finally:
        con.close()
    for query in ("select * from text_embeddings", "select * from evil", "select * from frames"):
        r = run_cli("sql", query, "--home", received, "--format", "json")
        assert "the-content-of-a-private-file" not in r.stdout + r.stderr, query
    r = run_cli("sql", "select count(*) as n from text_embeddings", "--home", received, "--format", "csv")
    assert r.returncode == 0 and r.stdout.splitlines()[1] == "0" and "its rows are left out" in r.stderr
    r = run_cli("sql", "select count(*) as n from frames", "--home", received, "--format", "csv")
    assert r.returncode == 0 and r.stdout.splitlines()[1] == "0" and "secret.txt" in r.stderr


def test_sql_prints_control_characters_escaped_and_secrets_masked(toy_home: Path) -> None:
    env = cli_env(OPENAI_API_KEY="sk-test-abcdefghijkl")
    con = duckdb.connect(str(toy_home / "catalog.duckdb"))
    try:
        con.execute("CREATE TABLE IF NOT EXISTS notes AS SELECT 'the key is sk-test-abcdefghijkl' AS note")
    finally:
        con.close()
    for fmt in ("table", "csv", "json"):
        r = run_cli("sql", "select text from descriptions union all select note from notes", "--home", toy_home,
                    "--format", fmt, env=env)
        assert r.returncode == 0, r.stderr
        assert "\x1b" not in r.stdout and "\x07" not in r.stdout
        assert "sk-test-abcdefghijkl" not in r.stdout
        assert "pwned" in r.stdout  # shown, escaped


def test_macros_of_a_received_catalog_are_never_run(toy_home: Path, tmp_path: Path) -> None:
    """A stored macro named like the built-in `read_parquet` would run while the sandbox still reads
    files, and one named `duckdb_functions` would hide it from the clean-up; a schema named `system`
    or a view in another schema must not stop the query either."""
    received, secret, con = _received(toy_home, tmp_path)
    try:
        insert_rows(con, "frame_clips", [{"entry_key": "e1", "path": "artifacts/clips/e1", "bytes": 1}])
        register_index(con, received, "frames:toy:a", [{"video": "a.mp4", "entry_key": "e1"}])
        hide = "SELECT 'main' AS schema_name, 'x' AS function_name, 'macro' AS function_type, 'x' AS view_name, false AS internal"
        con.execute(f"CREATE MACRO duckdb_functions() AS TABLE {hide} WHERE false")
        con.execute(f"CREATE MACRO duckdb_views() AS TABLE {hide} WHERE false")
        for schema in ("main", "elsewhere", '"system"'):
            con.execute(f"CREATE SCHEMA IF NOT EXISTS catalog.{schema}")
            con.execute(f"CREATE MACRO catalog.{schema}.read_parquet(p) AS TABLE "
                        f"SELECT content AS video, 0 AS label, 'e1' AS entry_key FROM read_text('{secret}')")
            con.execute(f"CREATE VIEW catalog.{schema}.evil_view AS SELECT 1 AS x")
    finally:
        con.close()
    for query in ("select * from frames", "select text from text_embeddings"):
        r = run_cli("sql", query, "--home", received, "--format", "json")
        assert "the-content-of-a-private-file" not in r.stdout + r.stderr, query
        assert r.returncode == 0, r.stderr
    r = run_cli("sql", "select video from frames", "--home", received, "--format", "csv")
    assert r.stdout.splitlines()[1:] == ["a.mp4"], r
