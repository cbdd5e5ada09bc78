"""The MSTA authors' 36 logs as an oracle: `--recipe authors` resolves to each run's logged config, the
run's train list gives its logged steps per epoch, and our schedule gives its logged rate at every
logged step."""
from __future__ import annotations

from pathlib import Path

import pytest

from msta.method.schedule import cosine_lr
from msta.video.dataset import epoch_steps
from pipeline.commands.authors import GPUS, AuthorsLog, authors_recipe, parse_log
from stages.formats.datasets import BUILTINS, VideoSettings

from .conftest import SHARED_DATA

LOGS = sorted((SHARED_DATA / "authors_logs").glob("*.txt")) if SHARED_DATA.exists() else []


@pytest.fixture(scope="module", params=LOGS or [None], ids=lambda p: p.name if p else "absent")
def log(request: pytest.FixtureRequest) -> AuthorsLog:
    if request.param is None:
        pytest.skip(f"the authors' logs are absent ({SHARED_DATA}/authors_logs exists only beside the checkout)")
    return parse_log(request.param)


def test_all_36_logs_are_here() -> None:
    if not LOGS:
        pytest.skip("the authors' logs are absent")
    assert len(LOGS) == 36


def test_the_preset_resolves_to_the_logged_config(log: AuthorsLog) -> None:
    c = log.config
    recipe = authors_recipe(log.protocol, log.dataset)
    assert c["MODEL.ARCH"] == "ViCLIP-B" and recipe["backbone"] == "ViCLIP-B-16"  # B/16: InternVid's ViCLIP-B
    assert recipe["n_descriptions"] == c["TRAINER.MMADAPTER.DES_N"]
    if log.trains:  # the evaluation-only logs reload a trained model; their Cons_LOSS field is unused
        assert (recipe["alpha"] > 0) == c["TRAIN.Cons_LOSS"]
        assert recipe["alpha"] in (0.0, 1.0)
    assert recipe["lr"] == c["TRAIN.LR"] and recipe["weight_decay"] == c["TRAIN.WEIGHT_DECAY"]
    assert recipe["epochs"] == c["TRAIN.EPOCHS"] and recipe["warmup_epochs"] == c["TRAIN.WARMUP_EPOCHS"]
    assert recipe["batch_size"] == c["TRAIN.BATCH_SIZE"] * GPUS and c["TRAIN.ACCUMULATION_STEPS"] == 1
    assert recipe["frames"] == c["DATA.NUM_FRAMES"]
    assert recipe["adapter_dim"] == c["TRAINER.MMADAPTER.ADAPTER_DIM"]
    assert recipe["adapter_layers"] == f"{c['TRAINER.MMADAPTER.ADAPTER_START']}-{c['TRAINER.MMADAPTER.ADAPTER_END']}"
    assert recipe["adapter_scale"] == c["TRAINER.MMADAPTER.ADAPTER_SCALE"]
    assert recipe["seed"] == c["SEED"]
    assert recipe["template"] == c["TRAINER.MMADAPTER.CTX_INIT"] + " {}."
    assert recipe["precision"] == "fp32" and c["TRAIN.OPT_LEVEL"] == "O0"
    # Test views come with the built-in dataset, for this recipe and any other.
    assert BUILTINS[log.dataset].test_clips == c["TEST.NUM_CLIP"]
    assert VideoSettings().test_crops == c["TEST.NUM_CROP"]
    assert VideoSettings().frames == c["DATA.NUM_FRAMES"]


def _our_train_list(log: AuthorsLog) -> Path:
    # ViFi-CLIP's file names; the authors' copies carry a `_new` suffix for the same lists.
    name = str(log.config["DATA.TRAIN_FILE"]).removeprefix("datasets_splits/").replace("_new.txt", ".txt")
    return SHARED_DATA / "splits" / name


def test_steps_per_epoch_come_from_the_train_list(log: AuthorsLog) -> None:
    if not log.trains:
        pytest.skip("an evaluation-only log")
    videos = sum(1 for line in _our_train_list(log).read_text().splitlines() if line.strip())
    batch = authors_recipe(log.protocol, log.dataset)["batch_size"]
    # What our trainer runs under `torchrun --nproc_per_node 8`, the authors' layout.
    assert {s.steps_per_epoch for s in log.steps} == {epoch_steps(videos, batch, GPUS)}


def test_our_rate_at_every_logged_step(log: AuthorsLog) -> None:
    if not log.trains:
        pytest.skip("an evaluation-only log")
    recipe = authors_recipe(log.protocol, log.dataset)
    per_epoch = log.steps[0].steps_per_epoch
    total, warmup = per_epoch * recipe["epochs"], per_epoch * recipe["warmup_epochs"]
    for s in log.steps:
        ours = cosine_lr(s.step, recipe["lr"], total, warmup)
        # The logs print 9 decimals: below ~1e-5 that rounding alone is ~1e-4 relative.
        assert ours == pytest.approx(s.lr, rel=1e-4, abs=5e-10), f"step {s.step}"


def test_logged_accuracies_are_read(log: AuthorsLog) -> None:
    assert log.accuracies and all(0 <= top1 <= top5 <= 100 for top1, top5 in log.accuracies)
    if log.trains:
        # Evaluated every 5 epochs plus once before training, and the maximum is what the paper reports.
        assert len(log.accuracies) == 11
        assert log.max_accuracy == pytest.approx(max(a for a, _ in log.accuracies), abs=0.006)
