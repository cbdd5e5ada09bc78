"""`predict` and `msta.load` against hostile input (issue 23): special files never block, view and label
counts are bounded, every value read from an exported folder is checked (one line naming the file and
key, exit 2; ExportError in Python), non-finite weights are refused and `--format jsonl` is strict JSON,
and --labels follows describe's rule for names that read the same.

The exported folder is built here in a second (msta-tiny on random weights, adapters as trained runs
save them), and the CLI runs in this process, so the whole file takes seconds; only the FIFO video,
which used to block for ever, runs as a subprocess under a timeout."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, cli_env
from .videos import write_video

CLASSES = ["moving up", "moving down", "spinning"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported folder as `msta-pipe export` writes the files predict reads (config.json and
    adapters.safetensors), with a clip beside it."""
    from msta.api import EXPORT_FORMAT
    from msta.method.adapters import AdapterConfig
    from msta.method.backbone import load_backbone
    from msta.method.model import MSTA

    out = tmp_path_factory.mktemp("bounds") / "model"
    out.mkdir()
    backbone = load_backbone("msta-tiny", None)
    model = MSTA(backbone, AdapterConfig(dim=8, layers=(2, 4)))
    model.save_adapters(out / "adapters.safetensors")
    i = backbone.identity
    cfg = {"format": EXPORT_FORMAT, "run_key": "f00ba4", "configuration": "MSTA", "seed": 1, "split": 1,
           "selection": "last", "backbone": {"model": "msta-tiny", "pretrained": "", "identity": i.name,
                                             "weights_sha256": i.weights_digest, "tokenizer": i.tokenizer},
           "adapter": model.cfg.to_dict(), "template": "a video of {}.", "frames": 4, "test_clips": 2,
           "test_crops": 1, "test_short_side": 32, "input_size": backbone.image_size, "mean": list(backbone.mean),
           "std": list(backbone.std), "classes": [{"id": n, "name": name, "prompt": name}
                                                  for n, name in enumerate(CLASSES)]}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    write_video(out.parent / "clip.mp4", 16, 64, 48)
    return out


@pytest.fixture
def clip(folder: Path) -> Path:
    return folder.parent / "clip.mp4"


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of blocking the test run for ever (a regression that opens a FIFO)."""
    def expire(*_: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def predict_cli(*args: str | Path, home: Path) -> tuple[int, str, str]:
    """`msta-pipe predict ARGS` through the CLI's own error handling, in this process (torch loads once):
    exit code, stdout, stderr."""
    from pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["msta-pipe", "predict", *map(str, args), "--no-progress", "--home", str(home)]
    try:
        with deadline(120), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def refused(result: tuple[int, str, str], *words: str) -> str:
    """The one error line of a usage error (exit 2) that names each of `words`."""
    code, _, err = result
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (code, err)
    assert err.startswith("error: ") and all(w in err for w in words), err
    return err


def strict_json(line: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


# --- 1. special files -------------------------------------------------------------------------------------


def test_a_fifo_video_is_an_error_row_and_never_blocks(folder: Path, clip: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    r = subprocess.run([sys.executable, "-m", "pipeline", "predict", str(fifo), str(clip), "--model", str(folder),
                        "--format", "jsonl", "--no-progress", "--home", str(tmp_path / "h")],
                       capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=90)
    assert r.returncode == 0, r.stderr
    rows = {row["video"]: row for row in map(strict_json, r.stdout.splitlines())}
    assert rows[str(fifo)]["error"] == f"{fifo}: not a regular file (a pipe, socket or device), not read"
    assert rows[str(clip)]["top"] and "1 of 2 videos could not be read" in r.stderr


def test_special_labels_and_model_files_are_refused_naming_them(folder: Path, clip: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "labels.txt"
    os.mkfifo(fifo)
    refused(predict_cli(clip, "--model", folder, "--labels", fifo, home=tmp_path / "h"),
            f"--labels {fifo}: not a regular file")
    for name in ("config.json", "adapters.safetensors"):
        copy = tmp_path / name / "model"
        shutil.copytree(folder, copy)
        (copy / name).unlink()
        os.mkfifo(copy / name)
        refused(predict_cli(clip, "--model", copy, home=tmp_path / "h"), f"{copy / name}: not a regular file")


# --- 2. bounded memory ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value, limits", [("--clips", 20000, "between 1 and 32"),
                                                 ("--crops", 1000, "between 1 and 10"),
                                                 ("--clips", 0, "between 1 and 32")])
def test_absurd_view_counts_are_refused(folder: Path, clip: Path, tmp_path: Path, flag: str, value: int,
                                        limits: str) -> None:
    refused(predict_cli(clip, "--model", folder, flag, value, home=tmp_path / "h"), f"{flag} must be {limits}")


def test_views_and_label_names_are_encoded_in_bounded_batches(folder: Path, clip: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from msta.inference import TEXT_BATCH, VIEW_BATCH
    from msta.method.model import VideoCLIP
    from pipeline.commands.predict import from_export, predict

    names = [f"thing number {n}" for n in range(600)]
    clf = replace(from_export(folder, None, None, torch.device("cpu")).with_views(32, 3),
                  class_ids=list(range(600)), class_names=names, prompts=names)
    videos, texts = [], []
    encode_video, encode_classes = VideoCLIP.encode_video, VideoCLIP.encode_classes
    monkeypatch.setattr(VideoCLIP, "encode_video", lambda self, v: videos.append(len(v)) or encode_video(self, v))
    monkeypatch.setattr(VideoCLIP, "encode_classes",
                        lambda self, c: texts.append(len(c)) or encode_classes(self, c))
    (p,) = predict(clf, [clip], 5, "pyav", torch.device("cpu"), "fp32", False)
    assert not p.error and sum(videos) == 96 and max(videos) <= VIEW_BATCH, videos
    assert sum(texts) == 600 and max(texts) == TEXT_BATCH, texts
    assert 0 < sum(prob for _, _, prob in p.top) <= 1


def test_too_many_label_names_are_refused_naming_the_file(folder: Path, clip: Path, tmp_path: Path) -> None:
    labels = tmp_path / "many.txt"
    labels.write_text("".join(f"class {n}\n" for n in range(20_001)))
    refused(predict_cli(clip, "--model", folder, "--labels", labels, home=tmp_path / "h"),
            f"--labels {labels}", "20,001", "20,000")


# --- 3. every value of an exported folder is checked -------------------------------------------------------

DEEP = "DEEP"  # in config.json, 600 levels of lists (parses, but no export nests so); in the adapter
# metadata, nesting past the JSON parser's recursion limit
HOSTILE_CONFIG: list[tuple[str, Any]] = [
    ("classes", "abc"), ("classes", []), ("classes", ["up"]), ("classes", [{"id": 0}]),
    ("classes", [{"id": "x", "name": "up"}]), ("classes", [{"id": 0, "name": 5}]),
    ("classes", [{"id": 0, "name": "up", "prompt": 3}]), ("classes", [{"id": 0, "name": "a"}, {"id": 0, "name": "b"}]),
    ("frames", "eight"), ("frames", 0), ("frames", -3), ("frames", math.nan), ("frames", 10**9), ("frames", 2.5),
    ("frames", True), ("test_clips", 0), ("test_clips", 100_000), ("test_crops", "x"), ("test_short_side", -1),
    ("test_short_side", math.inf), ("template", "{} and {}"), ("template", "no slot"), ("template", 5),
    ("template", "{0} {x}"), ("template", "{"), ("backbone", "x"), ("backbone.model", 5),
    ("backbone.pretrained", 7), ("backbone.weights_sha256", []), ("backbone.file", 3),
    ("backbone.file", "../elsewhere.safetensors"), ("configuration", {"a": 1}), ("run_key", [1]), ("extra", DEEP),
]
HOSTILE_ADAPTER: list[tuple[str, Any]] = [
    ("dim", 10**9), ("dim", 5000), ("dim", "abc"), ("layers", [1, 999]), ("layers", [0, 2]), ("scale", math.nan),
    ("temporal", "yes"), ("shared", 2), ("towers", "x"), ("nesting", DEEP),
]


def hostile_copy(folder: Path, tmp_path: Path, key: str, value: Any) -> Path:
    """A copy of `folder` with config.json's `key` (or the adapter metadata's `adapter.KEY`, or a NaN/inf
    adapter weight for `weights`) set to `value`."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    adapters = copy / "adapters.safetensors"
    if key.startswith(("adapter.", "weights")):
        with safe_open(str(adapters), "pt") as f:
            meta = dict(f.metadata())
        tensors = load_file(str(adapters))
        if key == "weights":
            tensors[sorted(tensors)[0]].view(-1)[0] = value
        elif value == DEEP:
            meta["adapter_config"] = "[" * 100_000 + "]" * 100_000  # past the parser's recursion limit
        else:
            meta["adapter_config"] = json.dumps({**json.loads(meta["adapter_config"]), key[len("adapter."):]: value})
        save_file(tensors, str(adapters), metadata=meta)
        return copy
    cfg = json.loads((copy / "config.json").read_text())
    parent, _, leaf = key.rpartition(".")
    (cfg[parent] if parent else cfg)[leaf] = "@" if value == DEEP else value
    (copy / "config.json").write_text(json.dumps(cfg).replace('"@"', "[" * 600 + "]" * 600))
    return copy


@pytest.mark.parametrize("key, value", [*HOSTILE_CONFIG, *[(f"adapter.{k}", v) for k, v in HOSTILE_ADAPTER],
                                        ("weights", math.nan), ("weights", math.inf)],
                         ids=lambda v: str(v)[:24])
def test_a_hostile_export_is_one_line_naming_the_file_and_key(folder: Path, clip: Path, tmp_path: Path, key: str,
                                                              value: Any) -> None:
    import msta

    copy = hostile_copy(folder, tmp_path, key, value)
    file = copy / ("config.json" if not key.startswith(("adapter.", "weights")) else "adapters.safetensors")
    # the key, or what is wrong where no key can be named (a weight, metadata past the parser's depth)
    named = "not finite" if key == "weights" else "nested" if key == "adapter.nesting" else key.removeprefix("adapter.")
    with deadline(60), pytest.raises(msta.ExportError) as raised:
        msta.load(copy)
    assert str(file) in str(raised.value) and named in str(raised.value), raised.value
    refused(predict_cli(clip, "--model", copy, "--format", "jsonl", home=tmp_path / "h"), str(file), named)


# --- 4. finite numbers, strict JSON ------------------------------------------------------------------------


def test_jsonl_is_strict_json_even_when_the_model_gives_nan(clip: Path, tmp_path: Path) -> None:
    """A frozen CLIP whose weights hold a NaN scores NaN: the video is an error row, never `NaN` in the JSON."""
    import torch
    from safetensors.torch import save_file

    from msta.method.backbone import load_backbone

    state = {k: v.detach().clone().contiguous() for k, v in load_backbone("msta-tiny", None).model.state_dict().items()}
    state["logit_scale"] = torch.tensor(math.nan)
    weights = tmp_path / "nan.safetensors"
    save_file(state, str(weights))
    labels = tmp_path / "labels.txt"
    labels.write_text("up\ndown\n")
    code, out, err = predict_cli(clip, "--frozen", "--backbone", "msta-tiny", "--pretrained", weights, "--labels",
                                 labels, "--format", "jsonl", home=tmp_path / "h")
    assert code == 0, err
    (row,) = map(strict_json, out.splitlines())
    assert "top" not in row and "not finite" in row["error"], row


# --- 5. names that read the same -----------------------------------------------------------------------------


def test_labels_that_describe_would_refuse_as_the_same_are_refused(folder: Path, clip: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("moving up\nspinning\nMoving Up\nmoving_up\n")
    refused(predict_cli(clip, "--model", folder, "--labels", labels, home=tmp_path / "h"),
            f"--labels {labels}", "'moving up'", "'Moving Up'", "'moving_up'")
