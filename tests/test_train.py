"""Training and evaluation end to end on cached artifacts: no description is re-encoded while
training, a killed run resumes to the identical result, evaluation fills `results` (with the
base-to-novel harmonic mean) and `report` shows it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from pipeline.commands.dag import TrainOptions, describe_import_request, embed_request, stage_for, train_request
from pipeline.commands.demo import world_descriptions
from stages.engine.runner import Runner
from stages.formats.datasets import Config

from .conftest import ROOT, catalog_rows, cli_env, docs_text, readme_query, run_cli

TINY = ["--backbone", "msta-tiny", "--pretrained", "random", "--adapter-layers", "2-4", "--adapter-dim", "8",
        "--batch-size", "8", "--warmup-epochs", "1", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic world, small: 16 training and 2 test clips per class."""
    from msta.world.generate import write_dataset

    folder = write_dataset(tmp_path_factory.mktemp("world") / "world", 16, 2, seed=0)
    world_descriptions(folder)
    return folder


def prepared_home(home: Path, world: Path, datasets: tuple[str, ...] = ("world",)) -> Runner:
    runner = Runner(home, stage_for, {"progress": False}, echo=lambda s: None)
    config = Config(world / "msta.toml")
    for name in datasets:
        ds = config.dataset(name)
        for kind in ("spatial", "temporal"):
            runner.materialise(describe_import_request(runner, ds, kind, world / f"descriptions_{kind}.json", 2))
        runner.materialise(embed_request(runner, ds, "msta-tiny", None))
    return runner



def test_a_new_train_option_is_one_declaration(home: Path, world: Path) -> None:
    """A field added to TrainOptions is a CLI flag with its help, is checked against its limit, enters
    the key and the catalog's params: nothing else is edited."""
    import json
    from dataclasses import make_dataclass, replace

    import typer
    from typer.testing import CliRunner

    from cache.keys import plain_json
    from pipeline.commands.flags import PROBABILITY
    from pipeline.commands.options import opt, resolve, with_options

    extended = make_dataclass("Extended", [("label_smoothing", float, opt(0.0, "Label smoothing of the CE loss",
                                                                           limit=PROBABILITY))],
                              bases=(TrainOptions,), frozen=True)
    seen: list[object] = []
    app = typer.Typer()

    @app.command()
    @with_options(extended)
    def train(given: dict) -> None:
        opts = resolve(extended, given)
        opts.check()
        seen.append(opts)

    cli = CliRunner()
    assert "--label-smoothing" in cli.invoke(app, ["--help"]).output
    refused = cli.invoke(app, ["--dataset", "world", "--label-smoothing", "2"])
    assert "--label-smoothing must be between 0 and 1, not 2" in str(refused.exception)
    assert refused.exception.exit_code == 2
    ok = cli.invoke(app, ["--dataset", "world", "--label-smoothing", "0.1", "--backbone", "msta-tiny",
                          "--pretrained", "random", "--adapter-layers", "2-4", "--shots", "2", "--draw-shots",
                          "--no-consistency"])
    assert ok.exit_code == 0, ok.output
    opts = seen[-1]
    assert opts.label_smoothing == 0.1 and opts.alpha == 1.0 and not opts.consistency
    runner = Runner(home, stage_for, {"progress": False}, echo=lambda s: None)
    config = Config(world / "msta.toml")
    a = train_request(runner, config, opts)
    b = train_request(runner, config, replace(opts, label_smoothing=0.0))
    assert a.params["label_smoothing"] == 0.1 and runner.key_of(a, {}) != runner.key_of(b, {})
    assert json.loads(plain_json(dict(a.params)))["label_smoothing"] == 0.1  # the catalog's params: a number
    assert a.params["alpha"] == 0.0  # --no-consistency resolves to alpha 0 in the key
    # Locators and the fields that only choose inputs stay out of the params.
    faster = train_request(runner, config, replace(opts, workers=7, frame_workers=3))
    assert runner.key_of(faster, {}) == runner.key_of(a, {}) and faster.locators["workers"] == 7
    assert not {"workers", "frame_workers", "draw", "heldout_per_class", "hflip", "consistency", "adapter_dim",
                "only"} & set(a.params)


def test_training_never_runs_the_frozen_description_branch(home: Path, world: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import open_clip.model

    from msta.method.backbone import Backbone

    runner = prepared_home(home, world)
    calls: list[int] = []
    real_encode_text = open_clip.model.CLIP.encode_text

    def refuse(*args, **kwargs):
        raise AssertionError("training re-encoded descriptions through the frozen text tower")

    def counting(self, text, normalize=False):
        calls.append(text.shape[0])
        return real_encode_text(self, text, normalize)

    monkeypatch.setattr(Backbone, "encode_text_frozen", refuse)
    monkeypatch.setattr(open_clip.model.CLIP, "encode_text", counting)
    config = Config(world / "msta.toml")
    opts = TrainOptions(protocol="few-shot", dataset="world", shots=2, epochs=1, batch_size=8, backbone="msta-tiny",
                        pretrained="random",
                        adapter_dim=8, adapter_layers="2-4", warmup_epochs=0, workers=0, frame_workers=1,
                        heldout_per_class=1)
    art = runner.materialise(train_request(runner, config, opts))
    assert art.kind == "adapters" and art.meta["best_epoch"] == 1
    # the text tower only ever saw the 12 class prompts (each step, and once per held-out pass)
    assert calls and set(calls) == {12}
    (loss, cc), = catalog_rows(home, "SELECT loss, cc FROM epochs")
    assert cc > 0 and loss > cc  # L_CC entered the loss from the cached embeddings


@pytest.mark.slow  # trains and evaluates two halves (~45 s)
def test_base_to_novel_evaluation_and_report(home: Path, world: Path) -> None:
    prepared_home(home, world, ("world-base",))
    config = world / "msta.toml"
    r = run_cli("train", "-d", "world", "--protocol", "base2novel", "--seed", "1", "--epochs", "1", *TINY,
                "--config", config, "--home", home)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli("evaluate", "-d", "world", "--config", config, "--home", home, "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    metrics = dict(((d, m), v) for d, m, v in catalog_rows(home, "SELECT dataset, metric, value FROM results "
                                                         "WHERE selection = 'last'"))
    base, novel, hm = metrics[("world-base", "base")], metrics[("world-novel", "novel")], metrics[("world", "hm")]
    assert hm == pytest.approx(0 if base + novel == 0 else 2 * base * novel / (base + novel))
    assert catalog_rows(home, "SELECT DISTINCT views FROM results") == [("2x1",)]
    assert len(catalog_rows(home, "SELECT * FROM class_accuracy WHERE dataset = 'world-novel'")) == 6
    report = run_cli("report", "--home", home)
    name = catalog_rows(home, "SELECT configuration FROM runs WHERE stage = 'train'")[0][0]
    assert name.startswith("MSTA #") and len(name) == len("MSTA #") + 8
    assert "## Base-to-novel" in report.stdout and f"| world | {name} | last | {100 * base:.1f} (n=1) |" in report.stdout
    assert (home / "runs").glob("*/confusion.png")


def test_train_dry_run_and_bad_flags(home: Path, world: Path) -> None:
    prepared_home(home, world)
    config = world / "msta.toml"
    r = run_cli("train", "-d", "world", "--protocol", "few-shot", "--shots", "2", *TINY, "--config", config,
                "--home", home, "--dry-run")
    assert r.returncode == 0 and "would run train:adapter:world:few-shot:k2" in r.stdout
    assert not catalog_rows(home, "SELECT * FROM runs WHERE stage = 'train'")
    r = run_cli("train", "-d", "world", "--protocol", "few-shot", *TINY, "--config", config, "--home", home)
    assert r.returncode == 2 and "--shots" in r.stderr
    r = run_cli("train", "-d", "world", "--protocol", "few-shot", "--shots", "2", *TINY, "--adapter-layers", "3-9",
                "--config", config, "--home", home)
    assert r.returncode == 2 and "do not fit" in r.stderr
    r = run_cli("train", "-d", "world", "--shots", "2", *TINY, "--temporal-lr-mult", "0", "--config", config,
                "--home", home)
    assert r.returncode == 2 and "--temporal-lr-mult must be positive" in r.stderr


@pytest.mark.slow
def test_a_killed_training_resumes_to_the_same_result(tmp_path: Path, world: Path) -> None:
    config = world / "msta.toml"
    args = ["train", "-d", "world", "--protocol", "few-shot", "--shots", "4", "--epochs", "4", "--deterministic",
            *TINY, "--config", str(config)]
    homes = {name: tmp_path / name for name in ("straight", "killed")}
    for h in homes.values():
        prepared_home(h, world)
    straight = run_cli(*args, "--home", homes["straight"])
    assert straight.returncode == 0, straight.stderr
    cmd = [sys.executable, "-m", "pipeline", *args, "--home", str(homes["killed"])]
    victim = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill it during epoch 3, after two checkpoints
        ckpts = list((homes["killed"] / "runs").glob("*/checkpoint.pt"))
        if ckpts and _epochs_done(homes["killed"]) >= 2:
            break
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert 2 <= _epochs_done(homes["killed"]) < 4
    resumed = run_cli(*args, "--home", homes["killed"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the checkpoint of epoch" in resumed.stdout
    final = {name: catalog_rows(h, "SELECT output FROM runs WHERE stage = 'train' AND status = 'done'") for name, h in homes.items()}
    assert final["straight"] == final["killed"]  # bit-identical adapters: the same artifact digest
    epochs = {name: catalog_rows(h, "SELECT epoch, loss, train_acc, heldout_acc FROM epochs ORDER BY epoch") for name, h in homes.items()}
    assert epochs["straight"] == epochs["killed"]


def _epochs_done(home: Path) -> int:
    try:
        return catalog_rows(home, "SELECT count(*) FROM epochs")[0][0]
    except duckdb.Error:
        return 0  # the catalog is being written right now


@pytest.mark.slow
def test_torchrun_two_processes_train_one_run(home: Path, world: Path) -> None:
    """DDP over gloo on the CPU: rank 0 materialises upstream stages and registers the run, rank 1
    trains beside it and writes nothing; the result is one completed run."""
    prepared_home(home, world)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571",
           "-m", "pipeline", "train", "-d", "world", "--protocol", "few-shot", "--shots", "2", "--epochs", "1",
           "--device", "cpu", *TINY, "--config", str(world / "msta.toml"), "--home", str(home)]
    r = subprocess.run(cmd, cwd=ROOT, env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert catalog_rows(home, "SELECT status, count(*) FROM runs WHERE stage = 'train' GROUP BY ALL") == [("done", 1)]
    ((seen,),) = catalog_rows(home, "SELECT train_acc IS NOT NULL FROM epochs")
    assert seen


def test_text_embeddings_answer_the_readme_query_and_embed_is_cached(home: Path, world: Path) -> None:
    prepared_home(home, world)
    query = readme_query("SELECT a.class_name, b.class_name", "world")
    r = run_cli("sql", query, "--home", home, "--format", "json")
    assert r.returncode == 0, r.stderr
    pairs = json.loads(r.stdout)
    assert len(pairs) == 5 and pairs[0]["sim"] >= pairs[-1]["sim"] and -1 <= pairs[-1]["sim"] <= 1
    assert catalog_rows(home, "SELECT typeof(embedding) FROM text_embeddings LIMIT 1") == [("FLOAT[32]",)]
    again = run_cli("embed", "-d", "world", "--backbone", "msta-tiny", "--pretrained", "random",
                    "--config", world / "msta.toml", "--home", home)
    assert again.returncode == 0 and "fresh  embed:world:msta-tiny" in again.stdout


def readme_commands(section: str) -> list[list[str]]:
    """The `msta-pipe ...` commands of a README section's bash block, continuation lines joined."""
    import shlex

    text = docs_text().split(f"## {section}", 1)[1]
    block = text.split("```bash", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [shlex.split(line.split("#", 1)[0])[1:] for line in block.splitlines() if line.startswith("msta-pipe ")]


def test_readme_reproduction_recipe_dry_runs(tmp_path: Path, home: Path, shared_data: Path) -> None:
    """The README's paper recipe (HMDB-51, K=2, ViT-B/16) plans every stage with the real label and split
    files; the temporal descriptions come from the test LLM server and the spatial ones from the authors'
    file, since the recipe's DeepSeek endpoint is not reachable here."""
    from tests.llm_server import LLMServer

    config = tmp_path / "msta.toml"
    config.write_text(f'[datasets.hmdb51]\nlabels = "{shared_data}/labels/hmdb_51_labels.csv"\n'
                      f'video_root = "{tmp_path}/videos"\nsplits_dir = "{shared_data}/splits/hmdb_splits"\n')
    weights = tmp_path / "ViT-B-16.safetensors"
    weights.write_bytes(b"not read by a dry run")
    describe, train, evaluate = readme_commands("Reproducing the paper")[:3]
    assert describe[0] == "describe" and train[:3] == ["train", "--stage", "adapter"] and evaluate[0] == "evaluate"
    common = ["--config", config, "--home", home]
    r = run_cli(*describe, "--dry-run", *common, env={**cli_env(), "OPENAI_API_KEY": "sk-test"})
    assert r.returncode == 0 and "51 requests would be sent to https://api.deepseek.com/v1" in r.stdout, r.stderr
    r = run_cli("describe", "-d", "hmdb51", "--kind", "spatial", "--from-file",
                shared_data / "msta_descriptions" / "2_s_description_hmdb.json", *common)
    assert r.returncode == 0, r.stderr
    with LLMServer() as server:
        r = run_cli("describe", "-d", "hmdb51", "--kind", "temporal", "--model", "m", "--base-url", server.base_url,
                    *common)
    assert r.returncode == 0, r.stderr
    train = [str(weights) if a == "/weights/ViT-B-16.safetensors" else a for a in train]
    r = run_cli(*train, "--dry-run", *common)
    assert r.returncode == 0, r.stderr
    assert "would run frames:hmdb51:few_shot_2:train" in r.stdout and "would run embed:hmdb51:ViT-B-16" in r.stdout
    assert "train adapter on hmdb51 (few-shot) for 50 epochs, batch 32, lr 0.001, on cuda" in r.stdout
    # The resolved config the authors' logs show for HMDB-51 K=2 (see test_authors_logs.py).
    for line in ('template: "a photo of a {}."', "alpha: 1.0", "n_descriptions: 2", "seed: 2048",
                 'precision: "fp32"', "frame_pool: 512", "backbone: \"ViT-B-16-quickgelu\""):
        assert line in r.stdout, line
    assert not catalog_rows(home, "SELECT * FROM runs WHERE stage IN ('train', 'embed', 'frames')")
