"""The engine's promises: skip fresh, rerun stale (and say why), --force, --dry-run, a crash
between file write and registration, a missing or altered artifact file, the one-writer rule."""
from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from cache.errors import UserError
from cache.keys import canonical_json, digest_value
from cache.lock import HomeLock
from stages.engine.runner import Runner
from stages.engine.stage import FileInput, Output, Request, Stage

from .conftest import ROOT, cli_env


class Upper(Stage):
    """Toy stage: upper-cases a text file into a one-column table; counts its executions."""
    code_version = "1"
    runs = 0

    def target(self, req: Request, upstream) -> str:
        return f"upper:{req.params['name']}"

    def run(self, req, inputs, ctx) -> Output:
        Upper.runs += 1
        text = inputs["src"].path.read_text()
        words = [w.upper() if req.params["upper"] else w for w in text.split()]
        return Output(kind="toy", table=pa.table({"word": words}))


class Count(Stage):
    """Toy downstream stage: counts the rows of its upstream artifact."""
    code_version = "1"
    runs = 0

    def target(self, req: Request, upstream) -> str:
        return "count"

    def run(self, req, inputs, ctx) -> Output:
        import pyarrow.parquet as pq

        Count.runs += 1
        n = pq.read_table(inputs["words"].path).num_rows
        return Output(kind="toy", data=str(n).encode(), ext=".txt")


TOY_STAGES: dict[str, type[Stage]] = {"upper": Upper, "count": Count}


def toy_stage(name: str) -> Stage:
    return TOY_STAGES[name]()


@pytest.fixture(autouse=True)
def toy_stages() -> None:
    Upper.runs = Count.runs = 0


def requests(src: Path, upper: bool = True) -> tuple[Request, Request]:
    up = Request("upper", {"name": "a", "upper": upper}, {"src": FileInput(src)})
    return up, Request("count", {}, {"words": up})


def quiet_runner(home: Path) -> tuple[Runner, list[str]]:
    lines: list[str] = []
    return Runner(home, toy_stage, echo=lines.append), lines


def test_canonical_json_is_stable_and_marks_floats() -> None:
    assert canonical_json({"b": 1, "a": [1.0, 2]}) == canonical_json({"a": [1.0, 2], "b": 1})
    assert digest_value({"x": 1}) != digest_value({"x": 1.0})  # 1 and 1.0 are different parameters
    assert canonical_json({"lr": 0.1}) == '{"lr":{"__float__":"0.1"}}'
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_fresh_stages_are_skipped_and_stale_ones_say_why(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "words.txt"
    src.write_text("a b c")
    runner, lines = quiet_runner(home)
    up, count = requests(src)
    art = runner.materialise(count)
    assert art.path.read_text() == "3" and (Upper.runs, Count.runs) == (1, 1)
    runner.materialise(count)
    assert (Upper.runs, Count.runs) == (1, 1)
    assert runner.freshness(count).state == "fresh"

    src.write_text("a b c d")  # input content changes: both stale, upstream named
    ev = runner.freshness(count)
    assert ev.state == "stale" and "upstream upper:a" in ev.reason
    assert "input content: src changed" in runner.freshness(up).reason
    runner.materialise(count)
    assert (Upper.runs, Count.runs) == (2, 2)

    up2, count2 = requests(src, upper=False)  # a parameter changes
    assert "params: upper true -> false" in runner.freshness(up2).reason


def test_identical_upstream_content_invalidates_nothing(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "words.txt"
    src.write_text("a b c")
    runner, _ = quiet_runner(home)
    runner.materialise(requests(src)[1])
    src.write_text("A B C")  # new input bytes, same upper-cased content
    runner.materialise(requests(src)[1])
    assert (Upper.runs, Count.runs) == (2, 1)


def test_code_version_change_makes_stale(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "words.txt"
    src.write_text("a")
    runner, _ = quiet_runner(home)
    up, _ = requests(src)
    runner.materialise(up)
    monkeypatch.setattr(Upper, "code_version", "2")
    assert runner.freshness(up).reason == "code version 1 -> 2"


def test_force_and_dry_run(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "words.txt"
    src.write_text("a b")
    runner, lines = quiet_runner(home)
    up, count = requests(src)
    assert runner.materialise(count, dry_run=True) is None
    assert Upper.runs == 0 and not (home / "catalog.duckdb").exists()
    assert any(l.startswith("would run upper:a (never run)") for l in lines)
    assert any(l.startswith("would run count (after its upstream)") for l in lines)
    runner.materialise(count)
    runner.materialise(count, force=True)
    assert (Upper.runs, Count.runs) == (1, 2)  # --force applies to the requested stage only


def test_missing_or_altered_artifact_is_a_miss(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "words.txt"
    src.write_text("a b")
    runner, _ = quiet_runner(home)
    up, _ = requests(src)
    art = runner.materialise(up)
    art.path.write_bytes(b"garbage")
    assert runner.freshness(up).reason == "artifact file missing or modified"
    art2 = runner.materialise(up)
    assert Upper.runs == 2 and art2.digest == art.digest and art2.path.read_bytes() != b"garbage"
    art2.path.unlink()
    runner.materialise(up)
    assert Upper.runs == 3


def test_crash_between_file_write_and_registration(home: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "words.txt"
    src.write_text("a b")
    runner, _ = quiet_runner(home)
    up, _ = requests(src)
    real = runner.catalog.transaction
    calls = {"n": 0}

    def dying_transaction(wait=None):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:  # the 1st records the start; the 2nd would register the artifact
            raise KeyboardInterrupt("killed after the file was written")
        return real(wait)

    monkeypatch.setattr(runner.catalog, "transaction", dying_transaction)
    with pytest.raises(KeyboardInterrupt):
        runner.materialise(up)
    monkeypatch.setattr(runner.catalog, "transaction", real)
    assert runner.freshness(up).state != "fresh"
    art = runner.materialise(up)
    assert Upper.runs == 2
    with runner.catalog.reader() as con:
        assert con.execute("SELECT count(*) FROM artifacts").fetchone()[0] == 1
        assert con.execute("SELECT count(*) FROM runs WHERE status = 'done'").fetchone()[0] == 1
    assert art.path.exists()


@contextlib.contextmanager
def holding(code: str) -> Iterator[subprocess.Popen[str]]:
    """Another process that takes a lock (code prints "held" once it has) and keeps it until killed."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code) + "\nprint('held', flush=True)\n"
                               "import time\ntime.sleep(60)\n"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def home_lock_code(home: Path) -> str:
    return f"from pathlib import Path\nfrom cache.lock import HomeLock\nlock = HomeLock(Path({str(home)!r}))\nlock.acquire()"


def test_second_writer_waits_then_fails_naming_the_holder(home: Path) -> None:
    with holding(home_lock_code(home)) as holder:
        started = time.monotonic()
        with pytest.raises(UserError) as err:
            HomeLock(home, wait_seconds=0.5).acquire()
        assert time.monotonic() - started >= 0.5
        assert f"pid {holder.pid}" in str(err.value) and err.value.exit_code == 1
    with HomeLock(home, wait_seconds=0.5):  # the kernel released the killed holder's lock
        pass


def test_catalog_held_by_another_process_gives_a_clear_error(home: Path) -> None:
    from cache.catalog import Catalog

    with Catalog(home).transaction():
        pass
    with holding(f"import duckdb\ncon = duckdb.connect({str(home / 'catalog.duckdb')!r})") as holder:
        with pytest.raises(UserError) as err:
            with Catalog(home, wait_seconds=0.5).reader():
                pass
        assert "locked by another process" in str(err.value) and f"PID {holder.pid}" in str(err.value)


def test_cli_refuses_a_busy_home(home: Path) -> None:
    labels = home.parent / "labels.txt"
    labels.write_text("a\nb\n")
    with holding(home_lock_code(home)) as holder:
        r = subprocess.run([sys.executable, "-m", "pipeline", "describe", "-d", "toy", "--labels", str(labels),
                            "--from-file", str(labels), "--kind", "spatial", "--home", str(home)],
                           capture_output=True, text=True, env=cli_env(), cwd=ROOT)
        assert r.returncode == 1 and f"pid {holder.pid}" in r.stderr
