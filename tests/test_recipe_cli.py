"""`train --recipe` through the command line: the user's flags win over every value a preset sets,
the preset places a dataset by the paper dataset it declares, ViCLIP-B without weights is one clear
line, and on every setting of the authors' logs `--dry-run` prints the logged configuration."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.commands.authors import authors_recipe, parse_log
from pipeline.commands.dag import describe_import_request, stage_for
from stages.engine.runner import Runner
from stages.formats.datasets import Config

from .conftest import SHARED_DATA
from .test_train import prepared_home, world  # noqa: F401  (the module-scoped world fixture)

# A flag value for every option the authors' preset sets, each unlike the preset's.
OVERRIDES = {"epochs": ("--epochs", "2", 2), "lr": ("--lr", "0.5", 0.5), "weight_decay": ("--weight-decay", "0.01", 0.01),
             "warmup_epochs": ("--warmup-epochs", "0", 0), "batch_size": ("--batch-size", "8", 8),
             "frames": ("--frames", "4", 4), "adapter_dim": ("--adapter-dim", "16", 16),
             "adapter_layers": ("--adapter-layers", "3-4", "3-4"), "adapter_scale": ("--adapter-scale", "0.1", 0.1),
             "temporal_lr_mult": ("--temporal-lr-mult", "3", 3.0), "seed": ("--seed", "7", 7),
             "template": ("--template", "a clip of {}.", "a clip of {}."),
             "n_descriptions": ("--n-descriptions", "2", 2), "alpha": ("--alpha", "0.5", 0.5),
             "frame_pool": ("--frame-pool", "0", 0), "backbone": ("--backbone", "msta-tiny", "msta-tiny"),
             "class_names": ("--class-names", "display", "display"), "test_offsets": ("--test-offsets", "even", "even"),
             "jitter": ("--jitter", "clip", "clip"), "precision": ("--precision", "fp32", "fp32")}


def options(output: str) -> dict[str, tuple[str, str]]:
    """The dry run's `options` dump: field -> (JSON value, where it came from)."""
    return {m[1]: (m[2], m[3]) for m in re.finditer(r"^  (\w+): (.*)  \((flag|recipe \w+|default)\)$", output, re.M)}


def invoke(*args: str | Path) -> tuple[int, str]:
    r = CliRunner().invoke(app, [str(a) for a in args])
    code = getattr(r.exception, "exit_code", r.exit_code) if r.exception and not isinstance(r.exception, SystemExit) \
        else r.exit_code
    return code, r.output + (str(r.exception) if r.exception and not isinstance(r.exception, SystemExit) else "")


@pytest.fixture(scope="module")
def ucf_world(tmp_path_factory: pytest.TempPathFactory, world: Path) -> tuple[Path, Path]:  # noqa: F811
    """The world declared as the paper's UCF-101 (the preset: N=8), a home with its descriptions."""
    config = world / "msta_ucf.toml"  # beside the world's own: its relative paths hold
    config.write_text((world / "msta.toml").read_text().replace("[datasets.world]\n",
                                                                "[datasets.world]\npaper = \"ucf101\"\n", 1))
    home = tmp_path_factory.mktemp("ucf_world") / "home"
    prepared_home(home, world)
    return config, home


def test_every_flag_wins_over_the_preset(ucf_world: tuple[Path, Path]) -> None:
    config, home = ucf_world
    preset = authors_recipe("few-shot", "ucf101")
    assert set(OVERRIDES) >= set(preset) - {"shots"}  # every value the preset sets is overridden below
    flags = [a for flag, value, _ in OVERRIDES.values() for a in (flag, value)]
    code, out = invoke("train", "--recipe", "authors", "-d", "world", "--shots", "2", "--draw-shots", "--pretrained",
                       "random", *flags, "--config", config, "--home", home, "--dry-run", "--no-progress")
    assert code == 0, out
    seen = options(out)
    for name, (_, _, value) in OVERRIDES.items():
        assert seen[name][1] == "flag" and seen[name][0] == __import__("json").dumps(value), (name, seen[name])
    # Without the flags, the preset's values, each said to come from it.
    code, out = invoke("train", "--recipe", "authors", "-d", "world", "--shots", "2", "--draw-shots", "--backbone",
                       "msta-tiny", "--pretrained", "random", "--adapter-layers", "2-4", "--n-descriptions", "2",
                       "--config", config, "--home", home, "--dry-run", "--no-progress")
    assert code == 0, out
    seen = options(out)
    for name in ("epochs", "lr", "batch_size", "seed", "template", "class_names", "test_offsets", "jitter", "alpha"):
        assert seen[name][1] == "recipe authors", (name, seen[name])


def test_three_seeds_under_the_preset_are_three_runs(ucf_world: tuple[Path, Path]) -> None:
    config, home = ucf_world
    code, out = invoke("train", "--recipe", "authors", "-d", "world", "--shots", "2", "--draw-shots", "--backbone",
                       "msta-tiny", "--pretrained", "random", "--adapter-layers", "2-4", "--n-descriptions", "2",
                       "--seeds", "1,2,3", "--config", config, "--home", home, "--dry-run", "--no-progress")
    assert code == 0, out
    assert sorted(re.findall(r"would run train:adapter:world:few-shot:k2:\w+:seed(\d):", out)) == ["1", "2", "3"]


def test_the_preset_places_datasets_and_needs_weights(ucf_world: tuple[Path, Path], world: Path) -> None:  # noqa: F811
    config, home = ucf_world
    code, out = invoke("train", "--recipe", "authors", "-d", "world", "--shots", "2", "--config", config,
                       "--home", home, "--dry-run")
    assert code == 2 and "trains ViCLIP-B-16" in out and "--pretrained PATH" in out
    code, out = invoke("train", "--recipe", "authors", "-d", "world", "--shots", "2", "--pretrained", "random",
                       "--config", world / "msta.toml", "--home", home, "--dry-run")
    assert code == 2 and "cannot place dataset 'world'" in out and 'paper = "ucf101"' in out
    code, out = invoke("train", "-d", "world", "--shots", "2", "--precision", "bf16", "--device", "cpu",
                       "--config", config, "--home", home, "--dry-run")
    assert code == 2 and "--precision bf16 runs only on CUDA" in out


PAPER = {"hmdb51": ("hmdb_51", "hmdb_splits", "hmdb"), "ucf101": ("ucf_101", "ucf_splits", "ucf_101"),
         "ssv2": ("ssv2", "ssv2_splits", "ssv2"), "k400": ("kinetics_400", "k400_splits", "k400")}


def shared_config(folder: Path) -> Path:
    labels, splits = SHARED_DATA / "labels", SHARED_DATA / "splits"
    text = []
    for name, (stem, split_dir, _) in PAPER.items():
        base_stem = "ssv2_174" if name == "ssv2" else stem
        text += [f"[datasets.{name}]", f'labels = "{labels / (stem if name != "ssv2" else "ssv2") }_labels.csv"',
                 f'splits_dir = "{splits / split_dir}"', f'video_root = "{folder / "videos"}"',
                 f'base_labels = "{labels / base_stem}_base_labels.csv"',
                 f'novel_labels = "{labels / base_stem}_novel_labels.csv"',
                 f'b2n_splits_dir = "{splits / "base2novel_splits" / split_dir}"', ""]
    path = folder / "msta.toml"
    path.write_text("\n".join(text))
    return path


@pytest.mark.slow
def test_the_dry_run_of_every_logged_setting_prints_its_logged_config(tmp_path: Path) -> None:
    if not SHARED_DATA.exists():
        pytest.skip(f"the reference data folder {SHARED_DATA} is absent")
    config = shared_config(tmp_path)
    home = tmp_path / "home"
    runner = Runner(home, stage_for, {"progress": False}, echo=lambda s: None)
    cfg = Config(config)
    imported: set[tuple[str, int]] = set()
    logs = [parse_log(p) for p in sorted((SHARED_DATA / "authors_logs").glob("*.txt"))]
    logs = [g for g in logs if g.trains]
    assert len(logs) == 24
    for log in logs:
        c = log.config
        n = c["TRAINER.MMADAPTER.DES_N"]
        dataset = f"{log.dataset}-base" if log.protocol == "base2novel" else log.dataset
        if (dataset, n) not in imported:  # the authors' own description files, with their defects
            suffix = PAPER[log.dataset][2] + ("_base" if log.protocol == "base2novel" else "")
            for kind in ("spatial", "temporal"):
                path = SHARED_DATA / "msta_descriptions" / f"{n}_{kind[0]}_description_{suffix}.json"
                try:
                    runner.materialise(describe_import_request(runner, cfg.dataset(dataset), kind, path, n))
                except Exception as exc:  # a file with defects stores its valid classes and says which failed
                    assert "classes" in str(exc), exc
            imported.add((dataset, n))
        where = ["--shots", str(log.shots)] if log.protocol == "few-shot" else ["--split", str(log.split)]
        code, out = invoke("train", "--recipe", "authors", "-d", log.dataset, "--protocol", log.protocol, *where,
                           "--pretrained", "random", "--config", config, "--home", home, "--dry-run", "--no-progress")
        assert code == 0, (log.path.name, out)
        o = {k: __import__("json").loads(v) for k, (v, _) in options(out).items()}
        logged = {"backbone": {"ViCLIP-B": "ViCLIP-B-16"}[c["MODEL.ARCH"]], "epochs": c["TRAIN.EPOCHS"],
                  "lr": c["TRAIN.LR"], "weight_decay": c["TRAIN.WEIGHT_DECAY"],
                  "warmup_epochs": c["TRAIN.WARMUP_EPOCHS"], "batch_size": c["TRAIN.BATCH_SIZE"] * 8,
                  "frames": c["DATA.NUM_FRAMES"], "adapter_dim": c["TRAINER.MMADAPTER.ADAPTER_DIM"],
                  "adapter_layers": f"{c['TRAINER.MMADAPTER.ADAPTER_START']}-{c['TRAINER.MMADAPTER.ADAPTER_END']}",
                  "adapter_scale": c["TRAINER.MMADAPTER.ADAPTER_SCALE"], "seed": c["SEED"],
                  "template": c["TRAINER.MMADAPTER.CTX_INIT"] + " {}.", "n_descriptions": n,
                  "precision": {"O0": "fp32"}[c["TRAIN.OPT_LEVEL"]]}
        assert {k: o[k] for k in logged} == logged, log.path.name
        assert (o["alpha"] > 0) == c["TRAIN.Cons_LOSS"], log.path.name
        train_file = str(c["DATA.TRAIN_FILE"]).replace("_new.txt", ".txt").rsplit("/", 1)[1]
        expected = {"train1_few_shot": f"few_shot_{log.shots}", "fs_base": f"train_s{log.split}"}[
            "fs_base" if train_file.startswith("fs_base") else "train1_few_shot"]
        assert f"  train list: {dataset}:{expected}" in out, (log.path.name, train_file)


def test_evaluation_follows_the_runs_names_views_and_jitter(ucf_world: tuple[Path, Path], world: Path) -> None:  # noqa: F811
    from pipeline.commands.configs import TrainOptions
    from pipeline.commands.dag import EvalTarget, evaluate_request, train_request

    config, home = ucf_world
    cfg = Config(config)
    runner = Runner(home, stage_for, {"progress": False}, echo=lambda s: None)
    opts = TrainOptions(dataset="world", shots=2, draw=True, backbone="msta-tiny", pretrained="random",
                        adapter_layers="2-4", class_names="raw", test_offsets="random", jitter="frame")
    model = train_request(runner, cfg, opts)
    assert (model.params["class_names"], model.params["test_offsets"]) == ("raw", "random")
    assert model.params["augment"]["jitter_per_frame"] is True
    ev = evaluate_request(runner, EvalTarget(cfg.dataset("world"), "test", "top1"), model, "last", "msta-tiny", None,
                          model.params["template"], "cpu", "fp32")
    assert ev.params["class_names"] == "raw"
    assert ev.inputs["frames"].params["sampling"]["offsets"] == "random"
    plain = train_request(runner, cfg, TrainOptions(dataset="world", shots=2, draw=True, backbone="msta-tiny",
                                                    pretrained="random", adapter_layers="2-4"))
    ev = evaluate_request(runner, EvalTarget(cfg.dataset("world"), "test", "top1"), plain, "last", "msta-tiny", None,
                          plain.params["template"], "cpu", "fp32")
    assert "offsets" not in ev.inputs["frames"].params["sampling"] and ev.params["class_names"] == "display"
