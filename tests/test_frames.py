"""`msta-pipe frames` on a dataset declared in msta.toml: good clips cached, broken files reported
(not fatal unless --strict), reruns decode nothing, kill -9 resumes with only the missing clips."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from msta.clipstore import load_clip
from tests.videos import write_text_as_video, write_truncated, write_video, write_zero_byte

from .conftest import ROOT, catalog_rows, cli_env, run_cli

CLASSES = ["pushing left", "pushing right", "lifting"]


def make_dataset(root: Path, per_class: int = 4, broken: bool = True) -> Path:
    videos = root / "videos"
    lines = []
    fmts = ["mp4", "webm", "avi"]
    for c in range(len(CLASSES)):
        for i in range(per_class):
            fmt = fmts[(c + i) % 3]
            rel = f"c{c}/v{i}{'.avi' if fmt == 'avi' else '.' + fmt}"
            (videos / rel).parent.mkdir(parents=True, exist_ok=True)
            write_video(videos / rel, num_frames=20 + 3 * i, width=96, height=64, fmt=fmt)
            lines.append(f"{rel} {c}")
    if broken:
        write_truncated(videos / "c0/v0.mp4", videos / "c0/truncated.mp4")
        write_zero_byte(videos / "c1/empty.mp4")
        write_text_as_video(videos / "c2/notes.mp4")
        lines += ["c0/truncated.mp4 0", "c1/empty.mp4 1", "c2/notes.mp4 2"]
    (root / "labels.csv").write_text("id,name\n" + "".join(f"{i},{n}\n" for i, n in enumerate(CLASSES)))
    (root / "lists").mkdir(exist_ok=True)
    (root / "lists" / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "msta.toml").write_text("""
[datasets.toy]
labels = "labels.csv"
video_root = "videos"
[datasets.toy.lists]
train = "lists/train.txt"
[datasets.toy.video]
frames = 4
samplings = 2
train_short_side = 48
""")
    return root / "msta.toml"



def test_good_clips_cached_broken_ones_reported_and_rerun_decodes_nothing(tmp_path: Path, home: Path) -> None:
    config = make_dataset(tmp_path)
    r = run_cli("frames", "-d", "toy", "--list", "train", "--config", config, "--home", home, "--workers", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "12 clips (12 decoded, 0 cached), 3 failed" in r.stdout
    failed = catalog_rows(home, "SELECT video, error FROM frame_failures ORDER BY video")
    assert [v for v, _ in failed] == ["c0/truncated.mp4", "c1/empty.mp4", "c2/notes.mp4"]
    assert all(e for _, e in failed)
    ((n, shape),) = catalog_rows(home, "SELECT count(*), any_value(shape) FROM frames WHERE dataset='toy'")
    assert n == 12 and shape[:2] == [2, 4] and min(shape[2:4]) == 48
    clip = load_clip(home / catalog_rows(home, "SELECT clip_path FROM frames LIMIT 1")[0][0])
    assert clip.dtype == np.uint8 and clip.shape[-1] == 3
    again = run_cli("frames", "-d", "toy", "--list", "train", "--config", config, "--home", home)
    assert again.returncode == 0 and "fresh  frames:toy:train:train" in again.stdout
    strict = run_cli("frames", "-d", "toy", "--list", "train", "--config", config, "--home", home, "--strict", "--force")
    assert strict.returncode == 1 and "3 videos could not be decoded" in strict.stderr
    assert "0 decoded, 12 cached" in strict.stdout  # --force reruns the stage; the clip cache still holds


def test_a_changed_video_makes_the_index_stale(tmp_path: Path, home: Path) -> None:
    config = make_dataset(tmp_path, per_class=2, broken=False)
    assert run_cli("frames", "-d", "toy", "--list", "train", "--config", config, "--home", home).returncode == 0
    write_video(tmp_path / "videos/c1/v0.webm", num_frames=30, width=96, height=64, fmt="webm")
    r = run_cli("frames", "-d", "toy", "--list", "train", "--config", config, "--home", home, "--dry-run")
    assert "video c1/v0.webm changed" in r.stdout
    r = run_cli("frames", "-d", "toy", "--list", "train", "--config", config, "--home", home)
    assert "1 decoded, 5 cached" in r.stdout


def test_missing_videos_fail_unless_skipped(tmp_path: Path, home: Path) -> None:
    config = make_dataset(tmp_path, per_class=2, broken=False)
    (tmp_path / "videos/c0/v1.webm").unlink()
    r = run_cli("frames", "-d", "toy", "--list", "train", "--config", config, "--home", home)
    assert r.returncode == 2 and "1 of 6 videos" in r.stderr and "c0/v1.webm" in r.stderr and "--skip-missing" in r.stderr
    r = run_cli("frames", "-d", "toy", "--list", "train", "--config", config, "--home", home, "--skip-missing")
    assert r.returncode == 0 and "5 clips" in r.stdout


def test_shots_draw_is_reproducible(tmp_path: Path, home: Path) -> None:
    config = make_dataset(tmp_path, per_class=4, broken=False)
    for seed in (0, 0, 1):
        r = run_cli("frames", "-d", "toy", "--list", "train", "--shots", "2", "--seed", str(seed), "--config", config,
                    "--home", home)
        assert r.returncode == 0, r.stderr
    picks = {seed: [v for (v,) in catalog_rows(
        home, f"SELECT video FROM frames WHERE target LIKE '%2pc-s{seed}' ORDER BY video")] for seed in (0, 1)}
    assert len(picks[0]) == 6 and picks[0] != picks[1]


@pytest.mark.slow
def test_kill_9_then_rerun_decodes_only_the_missing_clips(tmp_path: Path, home: Path) -> None:
    config = make_dataset(tmp_path, per_class=12, broken=False)
    args = [sys.executable, "-m", "pipeline", "frames", "-d", "toy", "--list", "train", "--config", str(config),
            "--home", str(home), "--workers", "1", "--no-progress", "--decoder", "pyav"]
    victim = subprocess.Popen(args, cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clips = home / "artifacts" / "clips"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(clips.rglob("*.clip"))) < 10:
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    done_before = len(list(clips.rglob("*.clip")))
    assert 10 <= done_before < 36
    r = subprocess.run(args, cwd=ROOT, env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"36 clips ({36 - done_before} decoded, {done_before} cached)" in r.stdout
    assert catalog_rows(home, "SELECT count(*), count(DISTINCT entry_key) FROM frame_clips") == [(36, 36)]
