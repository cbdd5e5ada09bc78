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

from msta.video.clipstore import load_clip
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
    # `sql`'s sandbox reads the index files without DuckDB's file access, and from any folder
    sandboxed = run_cli("sql", "SELECT dataset, list, count(*), count(DISTINCT clip_path) FROM frames "
                        "GROUP BY ALL", "--format", "csv", "--home", home, cwd=tmp_path / "videos")
    assert sandboxed.returncode == 0 and sandboxed.stdout.splitlines()[1:] == ["toy,train,12,12"], sandboxed
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


def test_a_symlink_loop_or_a_fifo_in_a_list_is_a_failed_video(tmp_path: Path, home: Path) -> None:
    config = make_dataset(tmp_path, per_class=2, broken=False)
    loop, fifo = tmp_path / "videos/c0/v1.webm", tmp_path / "videos/c1/v0.webm"
    loop.unlink()
    loop.symlink_to(loop)
    fifo.unlink()
    os.mkfifo(fifo)
    r = run_cli("frames", "-d", "toy", "--list", "train", "--config", config, "--home", home, timeout=120)
    assert r.returncode == 0 and "4 clips" in r.stdout and "2 failed" in r.stdout, r.stdout + r.stderr
    errors = dict(catalog_rows(home, "SELECT video, error FROM frame_failures"))
    assert "not a regular file" in errors["c1/v0.webm"] and "c0/v1.webm" in errors


def test_two_paths_to_one_file_and_an_altered_clip_keep_one_row_a_clip(tmp_path: Path, home: Path) -> None:
    """frame_clips has no key constraint (checking one cost every commit a growing index): `frames`
    registers each clip once, and replaces the row of a clip it decodes anew."""
    config = make_dataset(tmp_path, per_class=2, broken=False)
    (tmp_path / "videos/c0/alias.webm").symlink_to(tmp_path / "videos/c0/v1.webm")  # one file, two list lines
    listing = tmp_path / "lists/train.txt"
    listing.write_text(listing.read_text() + "c0/alias.webm 0\n")
    unique = "SELECT count(*), count(DISTINCT entry_key) FROM frame_clips"
    r = run_cli("frames", "-d", "toy", "--list", "train", "--config", config, "--home", home)
    assert r.returncode == 0 and "7 clips" in r.stdout, r.stdout + r.stderr
    assert catalog_rows(home, unique) == [(6, 6)] and catalog_rows(home, "SELECT count(*) FROM frames") == [(7,)]
    clip = home / catalog_rows(home, "SELECT clip_path FROM frames WHERE video = 'c1/v0.webm'")[0][0]
    with clip.open("ab") as f:
        f.write(b"x")  # altered: its registered size no longer holds
    r = run_cli("frames", "-d", "toy", "--list", "train", "--config", config, "--home", home)
    assert r.returncode == 0 and "1 decoded, 6 cached" in r.stdout, r.stdout + r.stderr
    assert catalog_rows(home, unique) == [(6, 6)]
    assert catalog_rows(home, "SELECT c.bytes FROM frames f JOIN frame_clips c ON c.path = f.clip_path "
                              "WHERE f.video = 'c1/v0.webm'") == [(clip.stat().st_size,)]


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


def clip_of(home: Path, video: str) -> Path:
    return home / catalog_rows(home, f"SELECT clip_path FROM frames WHERE video = '{video}'")[0][0]


def test_an_altered_clip_is_a_miss_never_trusted(tmp_path: Path, home: Path) -> None:
    config = make_dataset(tmp_path, per_class=2, broken=False)
    args = ["frames", "-d", "toy", "--list", "train", "--config", config, "--home", home]
    assert run_cli(*args).returncode == 0
    clip = clip_of(home, "c0/v0.mp4")
    clip.write_bytes(clip.read_bytes()[:-10])  # other bytes, another size: `status` sees it at once
    r = run_cli("status", "--home", home)
    assert r.returncode == 3 and "the cached clip of c0/v0.mp4 was altered" in r.stdout
    assert "1 decoded, 5 cached" in run_cli(*args).stdout
    clip.write_bytes(bytes(clip.stat().st_size))  # same size: its digest tells, where the file is read
    r = run_cli(*args, "--force")
    assert "1 decoded, 5 cached" in r.stdout, r.stdout
    assert load_clip(clip).shape[:2] == (2, 4)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_loader_meeting_an_altered_clip_says_rerun_in_one_line(tmp_path: Path, home: Path, workers: int,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Start-up reads no clip (the index and the registered digests only); the loader checks each clip's
    digest where it reads it whole anyway, in the main process or a worker, and an altered one becomes
    one line, exit 1, after it is removed so that the rerun decodes it again."""
    from cache.errors import UserError
    from msta.video.dataset import ClipDataset, make_loader
    from stages.artifacts import clips_checked, read_frame_index

    config = make_dataset(tmp_path, per_class=2, broken=False)
    assert run_cli("frames", "-d", "toy", "--list", "train", "--config", config, "--home", home).returncode == 0
    (index,) = catalog_rows(home, "SELECT DISTINCT a.path FROM frames f JOIN artifacts a ON a.digest = f.artifact")
    reads: list[str] = []
    real_read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(str(self)) or real_read_bytes(self))
    items, digests = read_frame_index(home / index[0], home)
    assert len(items) == 6 and all(digests) and not [r for r in reads if "/clips/" in r or r.endswith(".jpg")]
    monkeypatch.undo()
    clip = clip_of(home, "c2/v1.mp4")
    clip.write_bytes(bytes(clip.stat().st_size))  # same size: only its digest tells
    loader = make_loader(ClipDataset(items, "test", 32, crops=1, digests=digests), batch_size=2, shuffle=False,
                         seed=0, epoch=0, workers=workers)
    with pytest.raises(UserError) as err, clips_checked():
        for _ in loader:
            pass
    assert err.value.exit_code == 1 and "\n" not in str(err.value)
    assert str(clip) in str(err.value) and "rerun" in str(err.value)
    assert not clip.exists()  # removed, so the rerun decodes it instead of failing the same way
    r = run_cli("frames", "-d", "toy", "--list", "train", "--config", config, "--home", home)
    assert "1 decoded, 5 cached" in r.stdout
    items, digests = read_frame_index(home / index[0], home)
    assert len(list(make_loader(ClipDataset(items, "test", 32, crops=1, digests=digests), batch_size=2,
                                shuffle=False, seed=0, epoch=0, workers=0))) == 3

def test_strict_judges_a_cached_result_too(tmp_path: Path, home: Path) -> None:
    config = make_dataset(tmp_path, per_class=1)
    args = ["frames", "-d", "toy", "--list", "train", "--config", config, "--home", home]
    assert run_cli(*args).returncode == 0  # 3 broken videos: reported, not fatal
    strict = run_cli(*args, "--strict")
    assert "fresh  frames:toy:train:train" in strict.stdout
    assert strict.returncode == 1 and strict.stderr.count("\n") == 1
    assert "3 videos of list 'train' could not be decoded (--strict)" in strict.stderr


def child_pids(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_frames(config: Path, home: Path, workers: int) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "pipeline", "frames", "-d", "toy", "--list", "train", "--config", str(config),
            "--home", str(home), "--workers", str(workers), "--no-progress", "--decoder", "pyav"]
    # Ctrl-C at its default, as a terminal starts a command: a test run launched in the background
    # by a non-interactive shell ignores SIGINT, and a child would inherit that.
    victim = subprocess.Popen(args, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    clips = home / "artifacts" / "clips"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(clips.rglob("*.clip"))) < 4:
        time.sleep(0.02)
    return victim


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_killed_command_and_status_says_interrupted(tmp_path: Path, home: Path) -> None:
    config = make_dataset(tmp_path, per_class=16, broken=False)
    victim = start_frames(config, home, workers=2)
    workers = [p for p in child_pids(victim.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
    assert workers
    os.kill(victim.pid, signal.SIGKILL)
    time.sleep(0.5)  # not reaped yet: a zombie's pid still answers kill(pid, 0)
    status = run_cli("status", "--home", home)
    assert "interrupted (process gone)" in status.stdout, status.stdout
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(p) for p in workers):
        time.sleep(0.05)
    assert not any(alive(p) for p in workers), "decoding workers outlived the killed command"
    clips = len(list((home / "artifacts" / "clips").rglob("*.clip")))
    time.sleep(1)
    assert len(list((home / "artifacts" / "clips").rglob("*.clip"))) == clips  # nobody writes any more
    victim.communicate(timeout=10)


@pytest.mark.slow
def test_ctrl_c_stops_at_once_and_keeps_what_is_done(tmp_path: Path, home: Path) -> None:
    config = make_dataset(tmp_path, per_class=16, broken=False)
    total = 3 * 16
    victim = start_frames(config, home, workers=2)
    os.kill(victim.pid, signal.SIGINT)
    started = time.monotonic()
    out, err = victim.communicate(timeout=30)
    assert victim.returncode == 130 and time.monotonic() - started < 5
    assert "interrupted; rerun the same command to resume" in err and "Traceback" not in err
    ((kept,),) = catalog_rows(home, "SELECT count(*) FROM frame_clips")
    assert f"interrupted: the {kept} clips decoded so far are cached" in out, out
    on_disk = len(list((home / "artifacts" / "clips").rglob("*.clip")))  # a clip may land unregistered
    time.sleep(1)
    assert kept <= on_disk == len(list((home / "artifacts" / "clips").rglob("*.clip"))) < total and on_disk >= 4
    r = run_cli("frames", "-d", "toy", "--list", "train", "--config", config, "--home", home, "--decoder", "pyav")
    assert f"{total} clips ({total - on_disk} decoded, {on_disk} cached)" in r.stdout
