"""`gc` deletes only files the store wrote: an export into the home's managed folders is refused,
a user's file there is left and named, and the leftovers of interrupted writes and set-aside
checkpoints are named by `gc --dry-run` and removed once their run is done."""
from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import run_cli
from .test_predict import run_key, trained  # noqa: F401  (trained is a fixture)
from .test_train import world  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow  # a trained home (~40 s); CI runs them


@pytest.mark.parametrize("inside", ["runs/my-model", "artifacts/my-model", "runs/0123456789abcdef/model"])
def test_export_into_a_managed_folder_is_refused(trained: Path, world: Path, inside: str) -> None:  # noqa: F811
    out = trained / inside
    r = run_cli("export", "--run", run_key(trained)[:10], "--out", out, "--config", world / "msta.toml",
                "--home", trained)
    assert r.returncode == 2 and "--out" in r.stderr and "gc" in r.stderr, r.stderr
    assert not out.exists()


def test_gc_leaves_what_it_did_not_write_and_names_the_leftovers(trained: Path) -> None:  # noqa: F811
    run_dir = trained / "runs" / run_key(trained)[:16]
    assert (run_dir / "checkpoint.pt").exists()
    tmp = run_dir / ".tmp-checkpoint.pt.orphan"
    aside = run_dir / "checkpoint.pt.set-aside-1764800000"
    mine = [trained / "runs" / "my-export" / "adapters.safetensors", run_dir / "notes.txt",
            trained / "artifacts" / "README.txt",
            trained / "artifacts" / "descriptions" / "ab" / "mine.json"]
    for path in [tmp, aside, *mine]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    dry = run_cli("gc", "--dry-run", "--home", trained)
    assert dry.returncode == 0, dry.stderr
    assert f"would delete {tmp.relative_to(trained)}: the temporary of an interrupted write" in dry.stdout
    assert f"would delete {aside.relative_to(trained)}: a checkpoint set aside" in dry.stdout
    assert "left 4 files msta-pipe did not write" in dry.stdout
    assert tmp.exists() and aside.exists()
    r = run_cli("gc", "--home", trained)
    assert r.returncode == 0, r.stderr
    assert not tmp.exists() and not aside.exists()
    assert all(path.exists() for path in mine)
    assert (run_dir / "checkpoint.pt").exists() and (run_dir / "curves.png").exists()  # the run's own files stay
    assert run_cli("status", "--home", trained).returncode == 0
