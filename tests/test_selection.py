"""Checkpoints a user can trust: epoch snapshots and the authors' test-selected figure (labelled), a
--force that retrains from scratch, a damaged checkpoint set aside, and a home that can be moved."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .conftest import catalog_rows, run_cli
from .test_train import TINY, prepared_home, world  # noqa: F401  (world is a fixture)

pytestmark = pytest.mark.slow  # each trains several tiny runs (~3 min together); CI runs them


def _train_meta(home: Path) -> dict:
    ((meta,),) = catalog_rows(home, "SELECT a.meta FROM runs r JOIN artifacts a ON a.digest = r.output "
                                    "WHERE r.stage = 'train' AND r.status = 'done' ORDER BY r.finished_at DESC LIMIT 1")
    return json.loads(meta)


def test_snapshots_test_max_force_and_a_moved_home(tmp_path: Path, world: Path) -> None:  # noqa: F811
    home = tmp_path / "home"
    prepared_home(home, world)
    config = world / "msta.toml"
    train = ["train", "-d", "world", "--protocol", "few-shot", "--shots", "2", "--epochs", "7", *TINY,
             "--config", config]
    r = run_cli(*train, "--home", home)
    assert r.returncode == 0, r.stderr
    meta = _train_meta(home)
    assert sorted(meta["snapshots"], key=int) == ["1", "6", "7"]  # the authors' test epochs for 7 epochs
    assert not Path(meta["best_file"]).is_absolute() and (home / meta["best_file"]).exists()

    r = run_cli("evaluate", "-d", "world", "--selection", "test-max", "--config", config, "--home", home)
    assert r.returncode == 0, r.stderr
    per_epoch = dict(catalog_rows(home, "SELECT selection, value FROM results WHERE metric = 'top1' "
                                        "AND selection LIKE 'epoch:%'"))
    ((selected,),) = catalog_rows(home, "SELECT value FROM results WHERE metric = 'top1' AND selection = 'test-max'")
    assert set(per_epoch) == {"epoch:1", "epoch:6", "epoch:7"} and selected == max(per_epoch.values())
    assert "test-max (epoch" in r.stdout

    # A copied home reads its own files (paths are stored relative to the home).
    moved = tmp_path / "moved"
    shutil.copytree(home, moved)
    shutil.rmtree(home)
    r = run_cli("evaluate", "-d", "world", "--selection", "best-heldout", "--config", config, "--home", moved)
    assert r.returncode == 0, r.stderr

    # A damaged checkpoint never blocks the run, and --force retrains from scratch instead of resuming.
    (checkpoint,) = moved.glob("runs/*/checkpoint.pt")
    checkpoint.write_bytes(b"not a checkpoint")
    r = run_cli(*train, "--home", moved, "--force")
    assert r.returncode == 0, r.stderr
    assert "set aside" in r.stdout and "resuming" not in r.stdout and "Traceback" not in r.stderr
    epochs = catalog_rows(moved, "SELECT count(*) FROM epochs")[0][0]
    assert epochs == 7  # all seven epochs again, rows replaced, none duplicated


def test_seeds_train_as_cached_runs_and_report_mean_and_std(tmp_path: Path, world: Path) -> None:  # noqa: F811
    home = tmp_path / "home"
    prepared_home(home, world)
    config = world / "msta.toml"
    args = ["-d", "world", "--config", config, "--home", home]
    r = run_cli("train", "--protocol", "few-shot", "--shots", "2", "--epochs", "1", *TINY, "--seeds", "2048,1,2", *args)
    assert r.returncode == 0, r.stderr
    assert catalog_rows(home, "SELECT count(DISTINCT key) FROM runs WHERE stage = 'train' AND status = 'done'") == [(3,)]
    again = run_cli("train", "--protocol", "few-shot", "--shots", "2", "--epochs", "1", *TINY, "--seeds", "1,2", *args)
    assert again.returncode == 0 and "run    train" not in again.stdout  # cached per seed
    r = run_cli("evaluate", "--seeds", "2048,1,2", "--selection", "last", *args)
    assert r.returncode == 0, r.stderr
    values = [v for (v,) in catalog_rows(home, "SELECT value FROM results WHERE metric = 'top1' AND dataset = 'world'")]
    assert len(values) == 3
    import statistics

    report = run_cli("report", "--home", home).stdout
    expected = f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f} (n=3)"
    (name,) = {c for (c,) in catalog_rows(home, "SELECT configuration FROM runs WHERE stage = 'train'")}
    assert f"| world | test | {name} | last | {expected} |" in report, report
    bad = run_cli("train", "--protocol", "few-shot", "--shots", "2", *TINY, "--seeds", "1,x", *args)
    assert bad.returncode == 2 and "--seeds" in bad.stderr and "Traceback" not in bad.stderr
