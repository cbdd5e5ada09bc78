"""Malformed files, flags, configs and homes fed to the real CLI: every case ends in exit 2 (bad input)
or 1 (failed work) with ONE line on stderr that names the file or flag, never a traceback.
(The LLM's malformed answers have their own tests in test_llm_hostile.py.)"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import ROOT, cli_env, run_cli

LIST = "train"


@dataclass
class World:
    """A valid toy dataset (three classes, a list, a config) that each case breaks in one place."""
    root: Path
    home: Path
    labels: Path
    list_file: Path
    config: Path
    descriptions: Path

    def write(self, name: str, data: str | bytes) -> Path:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return p

    def dataset_config(self, extra: str = "") -> Path:
        return self.write("msta.toml", f'[datasets.toy]\nlabels = "labels.csv"\nvideo_root = "videos"\n'
                                       f'[datasets.toy.lists]\n{LIST} = "train.txt"\n{extra}')


@pytest.fixture
def world(tmp_path: Path) -> World:
    (tmp_path / "videos").mkdir()
    w = World(tmp_path, tmp_path / "home", tmp_path / "labels.csv", tmp_path / "train.txt", tmp_path / "msta.toml",
              tmp_path / "d.json")
    w.write("labels.csv", "id,name\n0,waving\n1,clapping\n2,jumping\n")
    w.write("train.txt", "c0/a.mp4 0\nc1/b.mp4 1\n")
    w.write("d.json", json.dumps({"0": ["A video about a hand."], "1": ["A video about two hands."],
                                  "2": ["A video about legs."]}))
    w.dataset_config()
    return w


NESTED = "[" * 100_000 + "]" * 100_000


def describe(w: World, labels: Path | None = None, from_file: Path | None = None) -> list[str | Path]:
    return ["describe", "-d", "toy", "--labels", labels or w.labels, "--from-file", from_file or w.descriptions,
            "--kind", "spatial", "--home", w.home]


def frames(w: World, *extra: str | Path, list_name: str = LIST, home: Path | None = None) -> list[str | Path]:
    return ["frames", "-d", "toy", "--list", list_name, "--config", w.config, "--home", home or w.home, *extra]


def train(w: World, *extra: str) -> list[str | Path]:
    return ["train", "-d", "toy", "--config", w.config, "--home", w.home, *extra]


def with_config(toml: str, names: str) -> Callable[[World], tuple[list[str | Path], str]]:
    """A case whose msta.toml is `toml`; stderr must name the config file and `names`."""
    def case(w: World) -> tuple[list[str | Path], str]:
        w.write("msta.toml", toml)
        return frames(w), names
    return case


def with_video(settings: str, names: str) -> Callable[[World], tuple[list[str | Path], str]]:
    def case(w: World) -> tuple[list[str | Path], str]:
        w.dataset_config(f"[datasets.toy.video]\n{settings}\n")
        return frames(w), names
    return case


def list_is_a_directory(w: World) -> tuple[list[str | Path], str]:
    w.dataset_config('extra = "videos"\n')
    return frames(w, list_name="extra"), str(w.root / "videos")


# name -> (build the broken input: (CLI args, what the one line must name), exit code)
Case = Callable[[World], tuple[list[str | Path], str]]
CASES: dict[str, tuple[Case, int]] = {
    # class lists
    "labels is a directory": (lambda w: (describe(w, labels=w.root / "videos"), str(w.root / "videos")), 2),
    "labels not UTF-8": (lambda w: (describe(w, labels=w.write("l.csv", b"id,name\n0,\xff\xfe\n")), "l.csv"), 2),
    "labels id ² (csv)": (lambda w: (describe(w, labels=w.write("l.csv", "id,name\n²,waving\n")), "l.csv"), 2),
    "labels id ² (json)": (lambda w: (describe(w, labels=w.write("l.json", '{"waving": "²"}')), "l.json"), 2),
    "labels nested json": (lambda w: (describe(w, labels=w.write("l.json", '{"a":' + NESTED + "}")), "l.json"), 2),
    "labels ids with a gap": (lambda w: (describe(w, labels=w.write("l.csv", "id,name\n0,a\n2,b\n")), "l.csv"), 2),
    # descriptions to import
    "from-file not UTF-8": (lambda w: (describe(w, from_file=w.write("x.json", b"\xff\xfe{}")), "x.json"), 2),
    "from-file nested json": (lambda w: (describe(w, from_file=w.write("x.json", NESTED)), "x.json"), 2),
    "from-file is a directory": (lambda w: (describe(w, from_file=w.root / "videos"), str(w.root / "videos")), 2),
    # video lists
    "list not UTF-8": (lambda w: (frames(w), str(w.write("train.txt", b"a.mp4 0\n\xff\xfe 1\n"))), 2),
    "list nested json": (lambda w: (frames(w), str(w.write("train.txt", NESTED))), 2),
    "list label ²": (lambda w: (frames(w), str(w.write("train.txt", "a.mp4 ²\n"))), 2),
    "list label not in the class list": (lambda w: (frames(w), str(w.write("train.txt", "a.mp4 0\n\nb.mp4 7\n"))
                                                    + " line 3"), 2),
    "list is a directory": (list_is_a_directory, 2),
    # configs
    "config is a directory": (lambda w: (frames(w)[:6] + [w.root / "videos"] + frames(w)[7:],
                                         str(w.root / "videos")), 2),
    "config not UTF-8": (lambda w: (frames(w), str(w.write("msta.toml", b"\xff[datasets]"))), 2),
    "config include = [5]": (with_config("include = [5]\n", "`include`"), 2),
    "config include = 'a.toml' (missing)": (with_config('include = "a.toml"\n', "a.toml"), 2),
    "config datasets = 5": (with_config("datasets = 5\n", "`datasets`"), 2),
    "config lists = 'x'": (with_config('[datasets.toy]\nlabels = "labels.csv"\nlists = "x"\n', "lists"), 2),
    "config labels = 5": (with_config("[datasets.toy]\nlabels = 5\n", "labels"), 2),
    "config video.frames = 'eight'": (with_video('frames = "eight"', "video.frames"), 2),
    "config video.hflip = 2": (with_video("hflip = 2", "video.hflip"), 2),
    # flags
    "frames --shots -2": (lambda w: (frames(w, "--shots", "-2"), "--shots"), 2),
    "frames --workers 0": (lambda w: (frames(w, "--workers", "0"), "--workers"), 2),
    "frames without --list": (lambda w: (["frames", "-d", "toy", "--home", w.home], "--list"), 2),
    "train --shots -2": (lambda w: (train(w, "--shots", "-2"), "--shots"), 2),
    "train --epochs -1": (lambda w: (train(w, "--epochs", "-1"), "--epochs"), 2),
    "train --epochs abc": (lambda w: (train(w, "--epochs", "abc"), "--epochs"), 2),
    "train --batch-size 0": (lambda w: (train(w, "--batch-size", "0"), "--batch-size"), 2),
    "train --alpha inf": (lambda w: (train(w, "--alpha", "inf"), "--alpha"), 2),
    "train --lr nan": (lambda w: (train(w, "--lr", "nan"), "--lr"), 2),
    "train --hflip 1.5": (lambda w: (train(w, "--hflip", "1.5"), "--hflip"), 2),
    # homes
    "home is a file": (lambda w: (frames(w, home=w.write("h", "x")), "--home"), 2),
    "home below a file": (lambda w: (frames(w, home=w.write("h", "x") / "sub"), str(w.root / "h" / "sub")), 1),
}


def assert_one_line(r: subprocess.CompletedProcess[str], code: int, names: str) -> None:
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert names in lines[0], (names, lines[0])
    assert r.returncode == code, (r.returncode, lines[0])


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_input_is_one_line(world: World, name: str) -> None:
    case, code = CASES[name]
    args, names = case(world)
    assert_one_line(run_cli(*args), code, names)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody may write into: chmod for a normal user; for root (who ignores modes) the
    immutable attribute, where the file system and the capabilities allow it."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a folder read-only for root here (no chattr +i)")
    try:
        yield folder
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)


def test_read_only_home_is_one_line(world: World, read_only_dir: Path) -> None:
    assert_one_line(run_cli(*frames(world, home=read_only_dir)), 1, str(read_only_dir))


def test_full_disk_is_one_line_naming_the_catalog(world: World) -> None:
    """Writes past RLIMIT_FSIZE fail with EFBIG the way they fail with ENOSPC on a full disk. DuckDB's
    failed COMMIT once hid behind "cannot rollback - no transaction is active"."""
    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (13_000, 13_000))  # a new catalog is 12,288 bytes

    r = subprocess.run([sys.executable, "-m", "pipeline", *map(str, describe(world))], capture_output=True,
                       text=True, env=cli_env(), cwd=ROOT, preexec_fn=limit_file_size, timeout=120)
    assert_one_line(r, 1, str(world.home / "catalog.duckdb"))
    assert "cannot rollback" not in r.stderr
