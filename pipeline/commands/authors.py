"""The MSTA authors' runs: their recipe as a preset (`train --recipe authors`), and their training
logs read as data (config, learning rate per logged step, test accuracy every 5 epochs), so that
tests can check the preset against every log and `report` can put their numbers beside ours.

The logs are not shipped (they live in the reference data); nothing here needs them to resolve
the preset.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache.errors import UserError

GPUS = 8  # the authors' runs: BATCH_SIZE 4 per GPU on 8 GPUs

LOGGED = {"few-shot": ("hmdb51", "ucf101", "ssv2"), "base2novel": ("hmdb51", "ucf101", "ssv2", "k400")}
# Which description files the runs used (DES_N): 8 for UCF-101 and SSv2 few-shot, else 2.
_DES_N_8 = {("few-shot", "ucf101"), ("few-shot", "ssv2")}


def authors_recipe(protocol: str, dataset: str) -> dict[str, Any]:
    """Every training option the authors' logs fix for (protocol, paper dataset), by TrainOptions field.

    Test views are not here: the built-in datasets carry the logged clips x crops (NUM_CLIP,
    NUM_CROP), which `evaluate` uses for any recipe.
    """
    if protocol not in ("few-shot", "base2novel"):
        raise UserError(f"--recipe authors covers the logged protocols few-shot and base2novel, not {protocol!r}", 2)
    if dataset not in LOGGED[protocol]:
        raise UserError(f"--recipe authors: the authors logged {protocol} runs on {', '.join(LOGGED[protocol])}, "
                        f"not on {dataset!r}", 2)
    return {
        "backbone": "ViCLIP-B-16",  # MODEL.ARCH ViCLIP-B in every log; the weights come from --pretrained
        "epochs": 50, "lr": 1e-3, "weight_decay": 1e-3, "warmup_epochs": 5, "batch_size": 4 * GPUS,
        "frames": 8, "adapter_dim": 128, "adapter_layers": "8-12", "adapter_scale": 0.005,
        "temporal_lr_mult": 1.0, "seed": 2048, "template": "a photo of a {}.",  # CTX_INIT "a photo of a"
        # ViFi-CLIP's data path: raw class-list names in the prompt, random multi-clip test views,
        # colour jitter drawn per frame
        "class_names": "raw", "test_offsets": "random", "jitter": "frame",
        "n_descriptions": 8 if (protocol, dataset) in _DES_N_8 else 2,
        # Cons_LOSS False in every K400 base-to-novel run.
        "alpha": 0.0 if (protocol, dataset) == ("base2novel", "k400") else 1.0,
        "precision": "fp32",  # OPT_LEVEL O0
        # New TSN offsets every epoch: every frame of nearly any clip of these datasets is cached.
        "frame_pool": 512,
        **({"shots": 16} if protocol == "base2novel" else {}),
    }


# ------------------------------------------------------------------------------- the logs

_PREFIX = re.compile(r"^\[[^\]]+\] \([^)]*\): INFO ?")
_TRAIN = re.compile(r"Train: \[(\d+)/(\d+)\]\[(\d+)/(\d+)\].*?\blr ([0-9.eE+-]+)")
_ACCURACY = re.compile(r"\* Acc@1 ([0-9.]+) Acc@5 ([0-9.]+)")
_MAX = re.compile(r"Max accuracy: ([0-9.]+)%")
_DATASETS = {"hmdb51": "hmdb51", "ucf101": "ucf101", "ssv2": "ssv2", "kinetics400": "k400"}


@dataclass(frozen=True)
class LoggedStep:
    epoch: int
    index: int          # step inside the epoch
    steps_per_epoch: int
    lr: float

    @property
    def step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.index


@dataclass
class AuthorsLog:
    path: Path
    config: dict[str, Any]                               # dotted keys: TRAIN.LR, TRAINER.MMADAPTER.DES_N, ...
    steps: list[LoggedStep] = field(default_factory=list)
    accuracies: list[tuple[float, float]] = field(default_factory=list)  # (top1, top5) per evaluation, in order
    max_accuracy: float | None = None

    @property
    def dataset(self) -> str:
        return _DATASETS[self.config["DATA.DATASET"]]

    @property
    def trains(self) -> bool:
        return bool(self.steps)

    @property
    def protocol(self) -> str:
        return "base2novel" if "base2novel" in str(self.config["DATA.TRAIN_FILE"]) else "few-shot"

    @property
    def shots(self) -> int | None:
        m = re.search(r"few_shot_(\d+)", str(self.config["DATA.TRAIN_FILE"]))
        return int(m.group(1)) if m else None

    @property
    def split(self) -> int | None:
        m = re.search(r"_s(\d)_train", str(self.config["DATA.TRAIN_FILE"]))
        return int(m.group(1)) if m else None

    @property
    def evaluates_novel(self) -> bool:
        return "novel" in str(self.config.get("DATA.LABEL_LIST", ""))


def _value(text: str) -> Any:
    text = text.strip()
    if text in ("True", "False"):
        return text == "True"
    if text == "None":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_log(path: Path) -> AuthorsLog:
    """Read one of the authors' logs: the config dump at its top, then the run."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the log ({exc})", 2) from None
    start = next((i for i, line in enumerate(lines) if _PREFIX.sub("", line).strip() == "AUG:"), None)
    if start is None:
        raise UserError(f"{path}: no config dump (a line ending in 'INFO AUG:') in this log", 2)
    config: dict[str, Any] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing sections
    for raw in ["AUG:", *lines[start + 1:]]:
        if raw.startswith("["):
            break
        if not raw.strip() or ":" not in raw:
            continue
        indent = len(raw) - len(raw.lstrip())
        key, _, value = raw.strip().partition(":")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key])
        if value.strip():
            config[dotted] = _value(value)
        else:
            stack.append((indent, key))
    log = AuthorsLog(path, config)
    for line in lines:
        if m := _TRAIN.search(line):
            log.steps.append(LoggedStep(int(m.group(1)), int(m.group(3)), int(m.group(4)), float(m.group(5))))
        elif m := _ACCURACY.search(line):
            log.accuracies.append((float(m.group(1)), float(m.group(2))))
        elif m := _MAX.search(line):
            log.max_accuracy = float(m.group(1))
    return log


def read_logs(folder: Path) -> list[AuthorsLog]:
    if not folder.is_dir():
        raise UserError(f"--authors-logs {folder}: not a folder", 2)
    return [parse_log(p) for p in sorted(folder.glob("*.txt"))]
