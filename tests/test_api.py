"""The public Python API and the exported folder as a hub model: `msta.load` + `msta.classify` in five
lines give `predict --model`'s probabilities; a folder exported with --include-backbone works in a
process with no home, no config and no other file; the model card's YAML parses and its snippet runs;
open_clip rebuilds the frozen tower from the folder itself."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, cli_env, run_cli
from .test_predict import world_test_videos
from .test_train import prepared_home, world  # noqa: F401  (the module-scoped world fixture)

pytestmark = pytest.mark.slow

FIVE_LINES = """import json, sys
import msta
model, preprocess, tokenizer = msta.load(sys.argv[1])
probs = msta.classify(model, sys.argv[2:], preprocess=preprocess)
print(json.dumps(probs.tolist()))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, world: Path) -> tuple[Path, Path]:  # noqa: F811
    """A run trained on tiny weights from a file, exported with the file inside; the original file moved
    away afterwards. (folder, home)"""
    from safetensors.torch import save_file

    from msta.method.backbone import load_backbone

    root = tmp_path_factory.mktemp("api")
    weights = root / "tiny.safetensors"
    state = load_backbone("msta-tiny", None).model.state_dict()
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(weights))
    home = root / "home"
    prepared_home(home, world)
    r = run_cli("train", "-d", "world", "--shots", "2", "--draw-shots", "--epochs", "1", "--backbone", "msta-tiny",
                "--pretrained", weights, "--adapter-layers", "2-4", "--adapter-dim", "8", "--batch-size", "8",
                "--warmup-epochs", "1", "--workers", "0", "--config", world / "msta.toml", "--home", home)
    assert r.returncode == 0, r.stderr
    folder = root / "model"
    r = run_cli("export", "-d", "world", "--out", folder, "--include-backbone", "--home", home,
                "--config", world / "msta.toml")
    assert r.returncode == 0, r.stderr
    assert "backbone weights included (open_clip_model.safetensors)" in r.stdout and " MB" in r.stdout
    weights.rename(root / "elsewhere.safetensors")  # the folder must not need it
    return folder, home


def test_five_lines_give_predicts_probabilities_with_nothing_but_the_folder(exported: tuple[Path, Path],
                                                                            world: Path, tmp_path: Path) -> None:  # noqa: F811
    folder, home = exported
    videos = world_test_videos(world)[:6]
    predicted = run_cli("predict", *videos, "--model", folder, "--format", "jsonl", "--top-k", "12", "--no-progress",
                        "--home", tmp_path / "no-home")
    assert predicted.returncode == 0, predicted.stderr
    script = tmp_path / "five.py"
    script.write_text(FIVE_LINES)
    assert len(FIVE_LINES.strip().splitlines()) == 5
    env = {k: v for k, v in cli_env().items() if not k.startswith("MSTA")}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, str(script), str(folder), *map(str, videos)], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    probs = json.loads(r.stdout)
    for line, row in zip(predicted.stdout.splitlines(), probs):
        for top in json.loads(line)["top"]:
            assert abs(row[top["class_id"]] - top["prob"]) <= 1e-6
    assert not (tmp_path / "no-home").exists() and not (tmp_path / ".msta").exists()


def test_the_model_card_is_a_hub_card_and_its_snippet_runs(exported: tuple[Path, Path], world: Path,  # noqa: F811
                                                           tmp_path: Path) -> None:
    import yaml

    folder, _ = exported
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "msta-pipe" and meta["license"] == "mit" and meta["datasets"] == ["world"]
    assert "video-classification" in meta["tags"] and meta["base_model"]
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    video = world_test_videos(world)[0]
    code = snippet.replace("THIS_FOLDER", str(folder)).replace("clip.mp4", str(video))
    env = {**cli_env(), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=300)
    cfg = json.loads((folder / "config.json").read_text())
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() in {c["name"] for c in cfg["classes"]}


def test_the_folder_is_readable_by_the_group_and_open_clip_rebuilds_the_tower(exported: tuple[Path, Path]) -> None:
    import open_clip
    import torch
    from safetensors.torch import load_file

    folder, _ = exported
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in folder.iterdir())
    clip = open_clip.create_model("local-dir:" + str(folder))
    weights = load_file(str(folder / "open_clip_model.safetensors"))
    state = clip.state_dict()
    assert set(weights) <= set(state) and all(torch.equal(state[k], v) for k, v in weights.items())


def test_load_refuses_other_weights_and_a_missing_file(exported: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    import msta

    folder, _ = exported
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "open_clip_model.safetensors").unlink()
    with pytest.raises(msta.ExportError, match="are missing"):
        msta.load(copy)
    with pytest.raises(msta.ExportError, match="sha256"):
        msta.load(copy, pretrained="random")
    r = run_cli("predict", os.devnull, "--model", copy, "--pretrained", "random", "--home", tmp_path / "h")
    assert r.returncode == 2 and "--pretrained random has sha256" in r.stderr
