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
import reprlib
import string
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from msta.fileio import sha256_file
from msta.inference import embed_views, encode_names, video_embedding, video_probs, view_batches, view_scores
from msta.method.adapters import AdapterConfig
from msta.video.decode import Sampling, decode_clip
from msta.video.transforms import Clip

EXPORT_FORMAT = "msta-export/1"
_NEEDED = ("backbone", "template", "classes", "frames", "test_clips", "test_crops", "test_short_side")
_NEEDED_BACKBONE = ("model", "pretrained", "identity", "weights_sha256")
_SHOWN = ("run_key", "configuration", "seed", "split", "selection")  # printed by predict, never computed with

# What an exported folder may ask for, checked before anything is allocated: a damaged or hostile config.json
# or adapter file is an ExportError naming the file and the key, never a huge allocation, a hang or a
# traceback. Generous beside real exports (T 8-32, 1-10 clips x 1-3 crops, r <= 256 in the paper).
VIEW_LIMITS = {"frames": 64, "test_clips": 32, "test_crops": 10, "test_short_side": 1024}
MAX_CLASSES = 20_000  # also the most names `predict --labels` scores
MAX_ADAPTER_DIM = 4096
_MAX_NESTING = 8  # an export's config.json nests 3 levels (classes, a class, its fields)
_MAX_CONFIG_BYTES = 64 << 20


class ExportError(ValueError):
    """A folder that is not a complete export, a value in it that no export holds, or weights that are not
    the ones it was trained on."""


def read_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """config.json of an exported folder, once every file it needs is there and every value it holds has
    the type and range an export writes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'} "
                          "(make one with `msta-pipe export --run KEY --out DIR`)")
    missing = [f for f in ("config.json", "adapters.safetensors") if not _plain_file(folder / f)]
    if missing:
        raise ExportError(f"{folder} is not an exported model: {', '.join(missing)} missing "
                          "(make one with `msta-pipe export --run KEY --out DIR`)")
    path = folder / "config.json"
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise ExportError(f"{path}: {path.stat().st_size:,} bytes, larger than any export's ({_MAX_CONFIG_BYTES:,})")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ExportError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != EXPORT_FORMAT:
        got = cfg.get("format") if isinstance(cfg, dict) else None
        raise ExportError(f"{path}: format {got!r}, expected {EXPORT_FORMAT!r}")
    b = cfg.get("backbone", {})
    _require(path, "backbone", b, isinstance(b, dict), "an object")
    absent = [k for k in _NEEDED if k not in cfg] + [f"backbone.{k}" for k in _NEEDED_BACKBONE if k not in b]
    if absent:
        raise ExportError(f"{path}: {', '.join(absent)} missing")
    _check_config(path, cfg)
    return cfg


def _check_config(path: Path, cfg: dict[str, Any]) -> None:
    """Every value of config.json that `load` and `predict` read, against what an export writes."""
    deep = [k for k, v in cfg.items() if _nesting(v) > _MAX_NESTING]
    if deep:
        raise ExportError(f"{path}: {deep[0]} nests lists or objects more than {_MAX_NESTING} levels deep; "
                          "no export does")
    b = cfg["backbone"]
    for k in _NEEDED_BACKBONE:
        _require(path, f"backbone.{k}", b[k], isinstance(b[k], str), "a string")
    file = b.get("file")  # joined to the folder: a bare name, never a path out of it
    _require(path, "backbone.file", file, file is None or (isinstance(file, str) and file not in ("", ".", "..")
                                                           and Path(file).name == file), "a file name in the folder")
    _require(path, "template", cfg["template"], isinstance(cfg["template"], str) and _one_slot(cfg["template"]),
             "a string with exactly one {} for the class name")
    for k, most in VIEW_LIMITS.items():
        _require(path, k, cfg[k], _is_int(cfg[k]) and 1 <= cfg[k] <= most, f"an integer between 1 and {most}")
    for k in _SHOWN:
        _require(path, k, cfg.get(k), cfg.get(k) is None or isinstance(cfg[k], str) or _is_int(cfg[k]),
                 "a string or an integer")
    classes = cfg["classes"]
    _require(path, "classes", classes, isinstance(classes, list) and 1 <= len(classes) <= MAX_CLASSES,
             f"a list of 1 to {MAX_CLASSES:,} classes")
    for n, c in enumerate(classes):
        _require(path, f"classes[{n}]", c, isinstance(c, dict), 'an object {"id": ..., "name": ..., "prompt": ...}')
        _require(path, f"classes[{n}].id", c.get("id"), _is_int(c.get("id")), "an integer")
        for k in ("name", "prompt") if "prompt" in c else ("name",):
            _require(path, f"classes[{n}].{k}", c.get(k), isinstance(c.get(k), str) and bool(c[k].strip()),
                     "a non-empty string")
    repeated = [cid for cid, count in Counter(c["id"] for c in classes).items() if count > 1]
    if repeated:
        raise ExportError(f"{path}: classes: class id {repeated[0]} appears more than once")


def _require(path: Path, key: str, value: Any, ok: bool, what: str) -> None:
    if not ok:
        raise ExportError(f"{path}: {key} must be {what}, got {reprlib.repr(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no count


def _one_slot(template: str) -> bool:
    """Exactly one bare `{}` (literal braces doubled), the one str.format fills with the class name."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError:  # a lone { or }
        return False
    return fields == [("", "", None)]


def _nesting(value: Any) -> int:
    """Levels of lists and objects in parsed JSON, counted level by level (no recursion to exhaust)."""
    depth, level = 0, [value]
    while level := [x for x in level if isinstance(x, (dict, list))]:
        depth += 1
        level = [v for x in level for v in (x.values() if isinstance(x, dict) else x)]
    return depth


def _plain_file(path: Path) -> bool:
    """Whether `path` exists; one that is no regular file once symlinks are followed (a FIFO, a socket, a
    device: opening one can block for ever) is refused."""
    if path.exists() and not path.is_file():
        raise ExportError(f"{path}: not a regular file (a pipe, socket, device or folder)")
    return path.exists()


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
        return torch.cat(list(self.batches(video)))

    def batches(self, video: str | os.PathLike[str] | np.ndarray | torch.Tensor) -> Iterator[torch.Tensor]:
        """The same views, a few whole clips at a time (msta.inference.view_batches): what `classify` and
        `predict` score, so that memory does not grow with the number of views. Decodes at once: a file
        that cannot be read raises here, not while iterating."""
        return view_batches(self.decode(video), self.size, self.crops, self.mean, self.std)

    def decode(self, video: str | os.PathLike[str] | np.ndarray | torch.Tensor) -> Clip:
        """uint8 (clips, T, H, W, 3): a file decoded and sampled as `frames` caches a test list, or frames given."""
        if isinstance(video, (str, os.PathLike)):
            return decode_clip(video, self.sampling, decoder=self.decoder)
        clip = torch.as_tensor(np.asarray(video))
        if clip.dtype != torch.uint8 or clip.ndim not in (4, 5) or clip.shape[-1] != 3:
            raise ValueError("decoded frames must be uint8 (T, H, W, 3) or (clips, T, H, W, 3)")
        return clip if clip.ndim == 5 else clip[None]


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
        adapted text branch, a batch of names at a time."""
        return encode_names(self.model, list(names))

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
    from msta.method.model import MSTA, AdapterLoadError
    from msta.method.registry import canonical_backbone, weights_file

    folder = Path(folder)
    cfg = read_config(folder)
    adapters = folder / "adapters.safetensors"
    adapter_cfg = _adapter_config(adapters)  # bounded before the backbone or any adapter is built
    b = cfg["backbone"]
    own = folder / b["file"] if b.get("file") else None
    if pretrained is None and own is not None:
        if not _plain_file(own):
            raise ExportError(f"{own}: the backbone weights this folder was exported with are missing")
        pretrained = own
    name, weights = canonical_backbone(backbone or b["model"], b["pretrained"] if pretrained is None else str(pretrained))
    if weights and Path(weights).is_absolute():  # a file named by the user or at export: no special file
        _plain_file(Path(weights))
    path = weights_file(name, weights)
    if path is not None or not weights:  # compared before loading: other weights are named, not a shape error
        _same(folder, b, sha256_file(path) if path is not None else RANDOM_INIT, pretrained)
    frozen = load_backbone(name, weights or None, device=torch.device(device))
    _same(folder, b, frozen.identity.weights_digest, pretrained)
    try:
        model = MSTA(frozen, adapter_cfg, cfg["template"])  # layers past the backbone's depth: refused first
        model.load_adapters(adapters)  # checks the backbone's name and weights too
    except (ValueError, AdapterLoadError) as exc:
        raise ExportError(f"{adapters}: {exc}" if isinstance(exc, ValueError) else str(exc)) from None
    damaged = next((n for n, t in model.adapter_state_dict().items() if not torch.isfinite(t).all()), None)
    if damaged is not None:
        raise ExportError(f"{adapters}: tensor {damaged} holds values that are not finite (NaN or inf); "
                          "the weights are damaged")
    classes = cfg["classes"]
    video = VideoModel(model.to(device).eval(), [c["name"] for c in classes],
                       [c.get("prompt", c["name"]) for c in classes], cfg)
    preprocess = Preprocess(cfg["frames"], cfg["test_clips"], cfg["test_crops"], cfg["test_short_side"],
                            frozen.image_size, tuple(frozen.mean), tuple(frozen.std))
    return video, preprocess, frozen.tokenizer


def _adapter_config(path: Path) -> AdapterConfig:
    """The AdapterConfig in an adapter file's metadata, its sizes within what any export needs."""
    from msta.method.model import AdapterLoadError, read_adapter_info

    try:
        cfg = read_adapter_info(path).config
    except AdapterLoadError as exc:
        raise ExportError(str(exc)) from None
    except RecursionError:
        raise ExportError(f"{path}: adapter_config is nested too deeply to be an adapter config") from None
    _require(path, "adapter_config.dim", cfg.dim, cfg.dim <= MAX_ADAPTER_DIM,
             f"an integer between 1 and {MAX_ADAPTER_DIM}")
    for k in ("shared", "temporal"):
        _require(path, f"adapter_config.{k}", getattr(cfg, k), isinstance(getattr(cfg, k), bool), "true or false")
    return cfg


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
    class_emb = model.encode_text(list(labels) if labels is not None else model.prompts)
    rows = [video_probs(model.model, preprocess.batches(v), class_emb).cpu() for v in videos]
    return torch.stack(rows) if rows else torch.zeros(0, class_emb.shape[0])
