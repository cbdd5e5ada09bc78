"""Scratch folders (sql's catalog copy, gc's spill) survive no kill -9 of their process: the next
process of the same kind removes them, and never a folder whose process lives or one it did not make."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cache.scratch import OWNER, remove_orphans, scratch_dir

from .conftest import ROOT

HOLD = """import sys, time
from cache.scratch import scratch_dir
with scratch_dir("msta-t-") as d:
    (d / "copy").write_bytes(b"x" * 1000)
    print(d, flush=True)
    time.sleep(600)
"""


def _holder(tmp: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()  # "" if the child failed: the test fails, never hangs
    assert line, "the holder did not start"
    return proc, Path(line)


def test_a_killed_owners_folder_goes_a_live_ones_stays(tmp_path: Path) -> None:
    killed, dead_dir = _holder(tmp_path)
    alive, live_dir = _holder(tmp_path)
    foreign = tmp_path / "msta-t-foreign"  # no owner file: someone else's, or an older msta-pipe's
    foreign.mkdir()
    (foreign / "data").write_text("keep")
    elsewhere = tmp_path / "elsewhere"  # a link with the prefix, to a folder with an unlocked owner file
    elsewhere.mkdir()
    (elsewhere / OWNER).write_text("")
    (tmp_path / "msta-t-link").symlink_to(elsewhere)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert (dead_dir / "copy").exists()  # kill -9 ran no cleanup
        assert remove_orphans(tmp_path, "msta-t-") == [dead_dir]
        assert not dead_dir.exists() and (live_dir / "copy").exists() and (foreign / "data").exists()
        assert (tmp_path / "msta-t-link").is_symlink() and (elsewhere / OWNER).exists()
        assert remove_orphans(tmp_path, "msta-t-") == []
    finally:
        alive.kill()
        alive.wait()


def test_a_folder_is_removed_on_exit_and_on_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # gettempdir() reads TMPDIR again
    with scratch_dir("msta-t-") as d:
        assert (d / OWNER).exists() and d.parent == tmp_path
    assert not d.exists()
    with pytest.raises(RuntimeError), scratch_dir("msta-t-") as d:
        raise RuntimeError
    assert not d.exists()
    assert list(tmp_path.iterdir()) == []
