"""Contrastive pre-training of the world CLIP on static captioned images, and its evaluations.

The shipped checkpoint ``msta/weights/synthetic-world.safetensors`` is produced by::

    python -m msta.world.pretrain --steps 1000 --batch-size 128 --lr 0.001 --seed 0 --config msta-world \
        --out msta/weights/synthetic-world.safetensors

which also writes ``synthetic-world.json`` next to it (recipe, versions, wall time, metrics).
The model never sees a video: motion has to be learnt later, by the adapters.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from tqdm import tqdm

from msta.fileio import atomic_write_bytes
from msta.world import generate as world

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = "msta-world"
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "synthetic-world.safetensors"


def register_configs() -> None:
    """Make the project's open_clip configs known by name (idempotent)."""
    if DEFAULT_CONFIG not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def image_size(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def to_model_input(images: np.ndarray, model: torch.nn.Module) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> the model's normalised (N, 3, S, S) float input."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    size = image_size(model)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
    cfg = model.visual.preprocess_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def render_batch(rng: np.random.Generator, n: int, size: int, hard_negatives: Sequence[str] = (),
                 ) -> tuple[np.ndarray, list[dict[str, str]]]:
    """``n`` stills and their attributes. With ``hard_negatives`` (attribute names such as
    "shape"), the second half repeats the first half's attributes with one of those changed.

    Contrastive training learns only what tells a batch's captions apart. Random batches are
    mostly told apart by colour and size, so shape and position were learnt late or not at all;
    captions that differ in one attribute only make the listed attributes matter in every batch.
    """
    stills = [world.render_image(rng, size) for _ in range(n - n // 2 if hard_negatives else n)]
    attrs = [world.parse_caption(text) for _, text in stills]
    for anchor in list(attrs[: n // 2] if hard_negatives else []):
        key = hard_negatives[rng.integers(len(hard_negatives))]
        partner = {**anchor, key: _other(rng, world.ATTRIBUTES[key], anchor[key])}
        stills.append(world.render_image(rng, size, **partner))
        attrs.append(partner)
    return np.stack([image for image, _ in stills]), attrs


def _other(rng: np.random.Generator, values: Sequence[str], current: str) -> str:
    others = [v for v in values if v != current]
    return others[rng.integers(len(others))]


def full_captions(attrs: Sequence[dict[str, str]]) -> list[str]:
    return [world.caption(**a) for a in attrs]


# Attributes a partial caption may leave out. Never the shape (the noun), nor the position:
# captions without it made "a circle" the positive of circles everywhere and taught both
# towers to ignore position (held-out position accuracy fell from 100 % to 25-42 %).
DROPPABLE: tuple[str, ...] = ("size_name", "colour")


def phrase(attrs: dict[str, str], rng: np.random.Generator,
           partial: float = 0.25) -> tuple[str, dict[str, str]]:
    """A training caption and the attributes it states.

    With probability ``partial`` the caption leaves out each of ``DROPPABLE`` with probability
    1/2, else it is full; any caption may get a prefix ("a photo of") and a full stop. A text
    tower trained on one rigid pattern maps other phrasings (the class template "a video of a
    wobbling triangle.") to noise instead of to their shape word.
    """
    stated = dict(attrs)
    if rng.random() < partial:
        stated = {k: v for k, v in attrs.items() if k not in DROPPABLE or rng.random() < 0.5}
    prefix = world.PREFIXES[rng.integers(len(world.PREFIXES))]
    text = world.caption(**{k: stated.get(k) for k in world.ATTRIBUTES}, prefix=prefix)
    return text + ("." if rng.random() < 0.5 else ""), stated


def positive_mask(image_attrs: Sequence[dict[str, str]],
                  stated: Sequence[dict[str, str]]) -> torch.Tensor:
    """(B, B) bool: caption j is true of image i, i.e. every attribute it states matches.

    Equal captions are positives of each other, and so is "a circle on the left" for every
    circle on the left: treating them as negatives would push apart what captions call the same.
    """
    return torch.tensor([[all(image[k] == v for k, v in s.items()) for s in stated]
                         for image in image_attrs])


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                     logit_scale: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE whose targets spread evenly over every positive (multi-positive);
    features are L2-normalised, ``positives`` is the (images, captions) mask."""
    logits = logit_scale * image_features @ text_features.T
    pos = positives.float()
    image_to_text = pos / pos.sum(dim=1, keepdim=True)
    text_to_image = pos.T / pos.T.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, image_to_text) + F.cross_entropy(logits.T, text_to_image))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's rule: no decay on gains, biases and the temperature."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        no_decay = p.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name
        (rest if no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@torch.no_grad()
def encode_texts(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    device = next(model.parameters()).device
    return F.normalize(model.encode_text(tokenizer(list(texts)).to(device)), dim=-1)


@torch.no_grad()
def encode_images(model: torch.nn.Module, images: np.ndarray,
                  batch_size: int = 256) -> torch.Tensor:
    device = next(model.parameters()).device
    chunks = [model.encode_image(to_model_input(images[i:i + batch_size], model).to(device))
              for i in range(0, len(images), batch_size)]
    return F.normalize(torch.cat(chunks), dim=-1)


@torch.no_grad()
def caption_retrieval(model: torch.nn.Module, tokenizer: Any, images: np.ndarray,
                      captions: Sequence[str]) -> dict[str, Any]:
    """Image -> caption top-1 over the distinct captions of a held-out set, with chance.

    Per-attribute accuracy of the retrieved caption says what was (not) learnt.
    """
    distinct = sorted(set(captions))
    scores = encode_images(model, images) @ encode_texts(model, tokenizer, distinct).T
    predicted = [distinct[i] for i in scores.argmax(dim=1).tolist()]
    attributes = {}
    for key in ("size_name", "colour", "shape", "position"):
        hits = [world.parse_caption(p)[key] == world.parse_caption(c)[key]
                for p, c in zip(predicted, captions)]
        attributes[key] = float(np.mean(hits))
    return {
        "retrieval_top1": float(np.mean([p == c for p, c in zip(predicted, captions)])),
        "retrieval_chance": 1.0 / len(distinct),
        "retrieval_captions": len(distinct),
        "retrieval_images": len(captions),
        "attribute_top1": attributes,
    }


def segment_centres(total: int, sampled: int) -> np.ndarray:
    """Indices of the centre frame of ``sampled`` equal segments (TSN-style test sampling)."""
    return ((np.arange(sampled) + 0.5) * total / sampled).astype(int)


@torch.no_grad()
def frame_mean_zero_shot(model: torch.nn.Module, tokenizer: Any, videos_per_class: int = 16,
                         seed: int = 1, frames: int = 8) -> dict[str, Any]:
    """Zero-shot accuracy of the frozen CLIP with the mean of per-frame embeddings.

    Inside a reversal pair the two classes hold the same kind of frames, so this order-invariant
    model scores about 50 % on the within-pair choice; only the appearance classes are open to it.
    """
    model.eval()
    names = [world.TEMPLATE.format(n) for n in world.CLASSES]
    text = encode_texts(model, tokenizer, names)
    rng = np.random.default_rng(seed)
    rendered = 16  # as many frames as the dataset's clips, then sampled like a test view
    keep = segment_centres(rendered, frames)
    videos, labels = [], []
    for c in range(len(world.CLASSES)):
        for _ in range(videos_per_class):
            clip = world.render_video(c, rng, frames=rendered, size=image_size(model))[keep]
            videos.append(F.normalize(encode_images(model, clip).mean(dim=0), dim=-1))
            labels.append(c)
    scores = torch.stack(videos) @ text.T
    y = torch.tensor(labels)
    correct = scores.argmax(dim=1) == y

    def within(classes: Sequence[int]) -> float:
        mask = torch.isin(y, torch.tensor(classes))
        sub = scores[mask][:, list(classes)].argmax(dim=1)
        return float((torch.tensor(classes)[sub] == y[mask]).float().mean())

    def top1(classes: Sequence[int]) -> float:
        return float(correct[torch.isin(y, torch.tensor(classes))].float().mean())

    pair_classes = [c for pair in world.REVERSAL_PAIRS for c in pair]
    return {
        "overall_top1": float(correct.float().mean()),
        "reversal_classes_top1": top1(pair_classes),
        "reversal_within_pair": float(np.mean([within(p) for p in world.REVERSAL_PAIRS])),
        "appearance_classes_top1": top1(world.APPEARANCE_CLASSES),
        "appearance_within": within(world.APPEARANCE_CLASSES),
        "per_class_top1": [top1([c]) for c in range(len(world.CLASSES))],
        "chance_overall": 1.0 / len(world.CLASSES),
        "chance_within_pair": 0.5,
        "videos_per_class": videos_per_class,
        "frames": frames,
        "seed": seed,
    }


def one_cycle(step: int, total: int, warmup: float = 0.1) -> float:
    """One-cycle LR factor: cosine rise from 1/25 to 1 over the first 10 % of the steps, then
    cosine decay to 0 (torch's OneCycleLR shape, which divides by zero for 10 steps)."""
    peak = max(1, round(warmup * total))
    if step < peak:
        return 1 / 25 + (1 - 1 / 25) * (1 - math.cos(math.pi * step / peak)) / 2
    return (1 + math.cos(math.pi * min(1.0, (step - peak) / max(1, total - peak)))) / 2


def pretrain(config_name: str = DEFAULT_CONFIG, steps: int = 1000, batch_size: int = 128,
             lr: float = 1e-3, seed: int = 0, device: str = "cpu", progress: bool = True,
             eval_images: int = 1000, hard_negatives: Sequence[str] = ("shape", "position"),
             partial_captions: float = 0.25) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train a CLIP from scratch on freshly rendered captioned stills; returns (state, metrics).

    Every step renders a new batch from one seeded stream, so there is no fixed pool to
    overfit; held-out images come from a second stream.
    """
    register_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(config_name, device=device)
    tokenizer = open_clip.get_tokenizer(config_name)
    size = image_size(model)
    optimizer = torch.optim.AdamW(_param_groups(model, 0.1), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: one_cycle(s, steps))
    rng = np.random.default_rng([seed, 0])
    losses: list[float] = []
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="pretrain", disable=not progress)
    for _ in bar:
        images, attrs = render_batch(rng, batch_size, size, hard_negatives)
        texts, stated = zip(*(phrase(a, rng, partial_captions) for a in attrs))
        image_features, text_features, logit_scale = model(
            to_model_input(images, model).to(device), tokenizer(list(texts)).to(device))[:3]
        loss = contrastive_loss(image_features, text_features, logit_scale,
                                positive_mask(attrs, stated).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # open_clip's cap on the temperature
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", refresh=False)
    seconds = time.perf_counter() - start
    model.eval()
    held_out, held_attrs = render_batch(np.random.default_rng([seed, 1]), eval_images, size)
    metrics = {
        **caption_retrieval(model, tokenizer, held_out, full_captions(held_attrs)),
        "final_loss": float(np.mean(losses[-20:])),
        "first_loss": losses[0],
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "hard_negatives": list(hard_negatives),
        "partial_captions": partial_captions,
        "seconds": seconds,
        "config_name": config_name,
        "config": open_clip.get_model_config(config_name),
    }
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, metrics


def save_checkpoint(state_dict: dict[str, torch.Tensor], path: str | Path,
                    metadata: dict[str, str] | None = None) -> None:
    """Store as float16 safetensors: the 49408-row token embedding dominates the size."""
    tensors = {k: v.to(torch.float16).contiguous() for k, v in state_dict.items()}
    atomic_write_bytes(Path(path), save(tensors, metadata=metadata))


def load_world_clip(path: str | Path = DEFAULT_WEIGHTS, config_name: str = DEFAULT_CONFIG,
                    device: str = "cpu") -> torch.nn.Module:
    """The world CLIP in float32 (the file stores float16), in eval mode."""
    register_configs()
    model = open_clip.create_model(config_name, device=device)
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def _load_average() -> list[float] | None:
    """1/5/15-minute load averages, where the platform has them (not on Windows)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _commands(args: argparse.Namespace) -> dict[str, str]:
    """The pipeline's command (flags it lacks take pretrain()'s defaults) and the module's."""
    recipe = (f"--steps {args.steps} --batch-size {args.batch_size} --lr {args.lr}"
              f" --seed {args.seed}")
    return {
        "command": f"msta-pipe train --stage pretrain --backbone {args.config} {recipe}"
                   f" --out {args.out}",
        "python_command": f"python -m msta.world.pretrain {recipe} --config {args.config}"
                          f" --partial-captions {args.partial_captions} --out {args.out}",
    }


def _record(args: argparse.Namespace, metrics: dict[str, Any], out: Path,
            evaluation: dict[str, Any], load_before: list[float] | None) -> dict[str, Any]:
    """The recipe, the machine and the metrics that go next to the checkpoint."""
    blob = out.read_bytes()
    return {
        **_commands(args),
        "seed": args.seed,
        "config_name": args.config,
        "config": metrics["config"],
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "optimizer": "AdamW(betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1 on matrices),"
                     " one-cycle LR (10 % cosine warm-up from lr/25, cosine to 0),"
                     " grad-norm clip 1.0",
        "loss": "symmetric InfoNCE; every caption true of an image is a positive of it",
        "data": "fresh world.render_image stills every step, rng default_rng([seed, 0]);"
                " half of each batch repeats the other half's captions with the shape or the"
                " position changed (hard negatives); captions phrased by pretrain.phrase"
                f" ({args.partial_captions:.0%} partial, optional prefix and full stop);"
                f" held-out: {args.eval_images} stills from default_rng([seed, 1])",
        "wall_seconds": round(metrics["seconds"], 1),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_before": load_before,
            "load_average_after": _load_average(),
            "note": "CPU shared with other processes during the run; a load average above the"
                    " CPU count means the wall time is longer than on an idle machine",
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "open_clip": open_clip.__version__, "numpy": np.__version__},
        "loss_first_step": round(metrics["first_loss"], 4),
        "loss_last_20_steps": round(metrics["final_loss"], 4),
        "retrieval_top1_float32": metrics["retrieval_top1"],
        **evaluation,
        "file": out.name,
        "file_bytes": len(blob),
        "file_sha256": hashlib.sha256(blob).hexdigest(),
        "dtype_stored": "float16 (cast to float32 when loaded)",
    }


def _evaluate_file(out: Path, config: str, seed: int, eval_images: int,
                   zero_shot_videos: int) -> dict[str, Any]:
    """Caption retrieval and frame-mean zero-shot of the checkpoint as shipped (float16)."""
    model = load_world_clip(out, config)
    tokenizer = open_clip.get_tokenizer(config)
    held_out, attrs = render_batch(np.random.default_rng([seed, 1]), eval_images,
                                   image_size(model))
    return {
        **caption_retrieval(model, tokenizer, held_out, full_captions(attrs)),
        "frame_mean_zero_shot": frame_mean_zero_shot(model, tokenizer, zero_shot_videos),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--partial-captions", type=float, default=0.25,
                        help="share of captions that state only some attributes")
    parser.add_argument("--out", default=str(DEFAULT_WEIGHTS))
    parser.add_argument("--eval-images", type=int, default=1000,
                        help="held-out stills for caption retrieval")
    parser.add_argument("--zero-shot-videos", type=int, default=16,
                        help="clips per class for the frame-mean zero-shot figure")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 wastes less CPU"
                             " time when other processes share the cores")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = _load_average()
    state, metrics = pretrain(args.config, args.steps, args.batch_size, args.lr, args.seed,
                              progress=not args.no_progress, eval_images=args.eval_images,
                              partial_captions=args.partial_captions)
    out = Path(args.out)
    save_checkpoint(state, out, {"config": args.config, "dtype": "float16", "seed": str(args.seed)})
    evaluation = _evaluate_file(out, args.config, args.seed, args.eval_images,
                                args.zero_shot_videos)
    record = _record(args, metrics, out, evaluation, load_before)
    atomic_write_bytes(out.with_suffix(".json"), (json.dumps(record, indent=2) + "\n").encode())
    summary = ("wall_seconds", "retrieval_top1", "retrieval_chance", "file_bytes")
    print(json.dumps({k: record[k] for k in summary}))
    zero_shot = evaluation["frame_mean_zero_shot"]
    print(json.dumps({k: v for k, v in zero_shot.items() if k != "per_class_top1"}))


if __name__ == "__main__":
    main()
