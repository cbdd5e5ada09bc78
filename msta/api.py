"""The public Python API: an exported model folder (`msta-pipe export`) loaded the way open_clip users
load a CLIP, its preprocessing, and classification with the probabilities `msta-pipe predict` prints.

    import msta
    model, preprocess, tokenizer = msta.load("hmdb51-k2/", pretrained="/weights/ViT-B-16.safetensors")
    probs = msta.classify(model, ["a.mp4", "b.mp4"], preprocess=preprocess)   # (2, classes)

`predict --model DIR` loads folders through `load` and scores through the same msta.inference
functions, so the two agree to the bit.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from msta.fileio import sha256_file
from msta.inference import embed_views, video_embedding, video_views, view_scores
from msta.video.decode import Sampling
from msta.video.transforms import multi_views

EXPORT_FORMAT = "msta-export/1"
_NEEDED = ("backbone", "template", "classes", "frames", "test_clips", "test_crops", "test_short_side")
_NEEDED_BACKBONE = ("model", "pretrained", "identity", "weights_sha256")


class ExportError(ValueError):
    """A folder that is not a complete export, or weights that are not the ones it was trained on."""


def read_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """config.json of an exported folder, once every file it needs is there."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder}: no such folder (make one with `msta-pipe export --run KEY --out DIR`)")
    missing = [f for f in ("config.json", "adapters.safetensors") if not (folder / f).is_file()]
    if missing:
        raise ExportError(f"{folder} is not an exported model: {', '.join(missing)} missing "
                          "(make one with `msta-pipe export --run KEY --out DIR`)")
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ExportError(f"{folder / 'config.json'}: not readable JSON ({exc})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != EXPORT_FORMAT:
        got = cfg.get("format") if isinstance(cfg, dict) else None
        raise ExportError(f"{folder / 'config.json'}: format {got!r}, expected {EXPORT_FORMAT!r}")
    absent = [k for k in _NEEDED if k not in cfg] + [f"backbone.{k}" for k in _NEEDED_BACKBONE
                                                     if k not in (cfg.get("backbone") or {})]
    if absent:
        raise ExportError(f"{folder / 'config.json'}: {', '.join(absent)} missing")
    return cfg


@dataclass(frozen=True)
class Preprocess:
    """A video (a path, or decoded uint8 frames) -> the model's test views, float (clips * crops, T, 3,
    size, size): decoded and sampled as `frames` caches a test list, cropped and normalised as
    `evaluate` sees it, with the run's own T, views and normalisation."""
    frames: int
    clips: int
    crops: int
    short_side: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    decoder: str = "decord"

    @property
    def sampling(self) -> Sampling:
        return Sampling("test", frames=self.frames, clips=self.clips, short_side=self.short_side)

    def __call__(self, video: str | os.PathLike[str] | np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(video, (str, os.PathLike)):
            return video_views(video, self.sampling, self.size, self.crops, self.mean, self.std, self.decoder)
        clip = torch.as_tensor(np.asarray(video))
        if clip.dtype != torch.uint8 or clip.ndim not in (4, 5) or clip.shape[-1] != 3:
            raise ValueError("decoded frames must be uint8 (T, H, W, 3) or (clips, T, H, W, 3)")
        return multi_views(clip if clip.ndim == 5 else clip[None], self.size, self.crops, self.mean, self.std)


class VideoModel(nn.Module):
    """An adapted video CLIP with the classes it was trained on. Embeddings are L2-normalised, as
    open_clip's `encode_image(..., normalize=True)`."""

    def __init__(self, model: nn.Module, class_names: list[str], prompts: list[str], config: dict[str, Any]):
        super().__init__()
        self.model = model
        self.class_names, self.prompts, self.config = class_names, prompts, config

    def encode_video(self, views: torch.Tensor) -> torch.Tensor:
        """(B, V, T, 3, H, W) views (or (B, T, 3, H, W), one view) -> (B, D): each video's views embedded,
        their mean normalised."""
        return video_embedding(embed_views(self.model, views if views.ndim == 6 else views[:, None]))

    def encode_text(self, names: Sequence[str]) -> torch.Tensor:
        """Class names -> (N, D): each put into the run's template (`a video of {}.`) and encoded by the
        adapted text branch."""
        return self.model.encode_classes(list(names))

    def class_scores(self, views: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        """(B, V, T, 3, H, W) -> (B, C): the per-view softmax over the classes, averaged over the views."""
        return view_scores(self.model, embed_views(self.model, views), class_emb) / views.shape[1]


def load(folder: str | os.PathLike[str], pretrained: str | os.PathLike[str] | None = None,
         device: str | torch.device = "cpu", backbone: str | None = None) -> tuple[VideoModel, Preprocess, Any]:
    """(model, preprocess, tokenizer) of an exported folder, as open_clip.create_model_and_transforms.

    The frozen backbone comes from the folder itself when it holds the weights file (`export
    --include-backbone`), else from `pretrained` or the weights path recorded at export; weights whose
    sha256 is not the one the adapters were trained on are refused (ExportError). `backbone` names
    another copy of the same architecture (an open_clip folder, say)."""
    from msta.method.backbone import RANDOM_INIT, load_backbone
    from msta.method.model import MSTA, read_adapter_info
    from msta.method.registry import canonical_backbone, weights_file

    folder = Path(folder)
    cfg = read_config(folder)
    b = cfg["backbone"]
    own = folder / b["file"] if b.get("file") else None
    if pretrained is None and own is not None:
        if not own.is_file():
            raise ExportError(f"{own}: the backbone weights this folder was exported with are missing")
        pretrained = own
    name, weights = canonical_backbone(backbone or b["model"], b["pretrained"] if pretrained is None else str(pretrained))
    path = weights_file(name, weights)
    if path is not None or not weights:  # compared before loading: other weights are named, not a shape error
        _same(folder, b, sha256_file(path) if path is not None else RANDOM_INIT, pretrained)
    frozen = load_backbone(name, weights or None, device=torch.device(device))
    _same(folder, b, frozen.identity.weights_digest, pretrained)
    model = MSTA(frozen, read_adapter_info(folder / "adapters.safetensors").config, cfg["template"])
    model.load_adapters(folder / "adapters.safetensors")  # checks the backbone's name and weights too
    classes = cfg["classes"]
    video = VideoModel(model.to(device).eval(), [c["name"] for c in classes],
                       [c.get("prompt", c["name"]) for c in classes], cfg)
    preprocess = Preprocess(int(cfg["frames"]), int(cfg["test_clips"]), int(cfg["test_crops"]),
                            int(cfg["test_short_side"]), frozen.image_size, tuple(frozen.mean), tuple(frozen.std))
    return video, preprocess, frozen.tokenizer


def _same(folder: Path, b: dict[str, Any], got: str, given: Any) -> None:
    if got != b["weights_sha256"]:
        what = f"pretrained={given}" if given is not None else f"the exported {b['pretrained'] or 'random init'}"
        raise ExportError(f"{folder} was trained on {b['identity']} weights with sha256 {b['weights_sha256']}, but "
                          f"{what} has sha256 {got}: pass the same weights")


@torch.no_grad()
def classify(model: VideoModel, videos: Sequence[str | os.PathLike[str] | np.ndarray | torch.Tensor],
             labels: Sequence[str] | None = None, preprocess: Preprocess | None = None) -> torch.Tensor:
    """(len(videos), classes) probabilities: each video's per-view softmax averaged over its views, as
    `msta-pipe predict` prints them. Videos are paths or decoded uint8 frames, seen through `preprocess`
    (the one `load` returned); `labels` scores other class names (open vocabulary) instead of the
    model's own."""
    if preprocess is None:
        raise ValueError("classify needs the preprocess that load() returned")
    device = next(model.parameters()).device
    class_emb = model.encode_text(list(labels) if labels is not None else model.prompts)
    rows = [model.class_scores(preprocess(v)[None].to(device), class_emb)[0].float().cpu() for v in videos]
    return torch.stack(rows) if rows else torch.zeros(0, class_emb.shape[0])
