"""MSTA video classifier on a frozen CLIP, and the frame-mean full fine-tuning baseline.

    video  (B, T, 3, H, W) --adapted ViT on all B*T frames--> CLS per frame --mean over T--> normalise
           (a video CLIP such as ViCLIP: --adapted joint space-time ViT on each clip--> CLS --> normalise)
    class  "a video of {name}." --adapted text transformer--> EOT token --> normalise
    logits = exp(logit_scale) · cos(video, class)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from msta.fileio import atomic_write_bytes
from msta.method.adapters import AdapterConfig, attach_adapters
from msta.method.backbone import Backbone, BackboneError

DEFAULT_TEMPLATE = "a video of {}."
ADAPTER_FORMAT = "msta-adapters/1"
_RESERVED_KEYS = ("format", "backbone_name", "backbone_weights_digest", "adapter_config")


class AdapterLoadError(BackboneError):
    """An adapter file that does not belong to this model (message shown to users as is)."""


class VideoCLIP(nn.Module):
    """Frame-mean CLIP video classifier: the frozen zero-shot model, or the full fine-tuning baseline."""

    def __init__(self, backbone: Backbone, template: str = DEFAULT_TEMPLATE):
        super().__init__()
        if "{}" not in template:
            raise ValueError(f"the class template needs a '{{}}' for the class name, got {template!r}")
        self.backbone = backbone
        self.clip = backbone.model
        self.template = template
        self._tokens: dict[tuple[str, ...], torch.Tensor] = {}  # tokenised templates per label set

    def encode_frames(self, frames: torch.Tensor, num_frames: int) -> torch.Tensor:
        """(B*T, 3, H, W) -> (B*T, E) projected CLS embeddings, not normalised; a video CLIP takes the
        clips whole, (B, T, 3, H, W) -> (B, E)."""
        return self.clip.encode_image(frames)

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        b, t = frames.shape[:2]
        if getattr(self.clip, "joint_space_time", False):
            # ViCLIP attends over the T frames itself: a clip's embedding is its joint CLS, no frame mean.
            return F.normalize(self.encode_frames(frames, num_frames=t), dim=-1)
        per_frame = self.encode_frames(frames.flatten(0, 1), num_frames=t)
        return F.normalize(per_frame.reshape(b, t, -1).mean(dim=1), dim=-1)

    def class_tokens(self, class_names: list[str]) -> torch.Tensor:
        key = tuple(class_names)
        if key not in self._tokens:
            self._tokens[key] = self.backbone.tokenize([self.template.format(c) for c in class_names])
        device = self.clip.logit_scale.device
        if self._tokens[key].device != device:
            self._tokens[key] = self._tokens[key].to(device)
        return self._tokens[key]

    def encode_classes(self, class_names: list[str]) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(self.class_tokens(class_names)), dim=-1)

    def logits(self, video_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        return self.clip.logit_scale.exp() * video_emb @ class_emb.t()

    def forward(self, frames: torch.Tensor, class_names: list[str]) -> torch.Tensor:
        return self.logits(self.encode_video(frames), self.encode_classes(class_names))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self, lr: float, temporal_lr_mult: float = 1.0) -> list[dict[str, Any]]:
        """Optimiser groups; a full fine-tune has no temporal branch, so one group."""
        return [{"params": self.trainable_parameters(), "lr": lr}]


def full_finetune(backbone: Backbone, template: str = DEFAULT_TEMPLATE) -> VideoCLIP:
    """The `--stage full` baseline: frame-mean CLIP with every backbone parameter trainable."""
    model = VideoCLIP(backbone, template)
    for p in model.clip.parameters():
        p.requires_grad_(True)
    return model


@dataclass(frozen=True)
class AdapterFileInfo:
    backbone_name: str
    weights_digest: str
    config: AdapterConfig
    extra: dict[str, str]


def read_adapter_info(path: str | os.PathLike[str]) -> AdapterFileInfo:
    """The metadata of an adapter file: which backbone and adapter config it was trained for."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except FileNotFoundError as e:
        raise AdapterLoadError(f"adapter file not found: {path}") from e
    except Exception as e:  # safetensors' own error types for corrupt files
        raise AdapterLoadError(f"{path}: not a readable safetensors file ({e})") from e
    if meta.get("format") != ADAPTER_FORMAT or not all(k in meta for k in _RESERVED_KEYS):
        raise AdapterLoadError(f"{path}: not an MSTA adapter file (format {meta.get('format')!r})")
    try:
        config = AdapterConfig.from_dict(json.loads(meta["adapter_config"]))
    except ValueError as e:  # includes json.JSONDecodeError
        raise AdapterLoadError(f"{path}: unreadable adapter config ({e})") from e
    extra = {k: v for k, v in meta.items() if k not in _RESERVED_KEYS}
    return AdapterFileInfo(meta["backbone_name"], meta["backbone_weights_digest"], config, extra)


class MSTA(VideoCLIP):
    """Frozen CLIP + MSTA adapters in both towers (msta/METHOD.md §1). Only the adapters train."""

    def __init__(self, backbone: Backbone, cfg: AdapterConfig, template: str = DEFAULT_TEMPLATE):
        super().__init__(backbone, template)
        self.cfg = cfg
        # The adapter modules live inside the CLIP's wrapped blocks; `adapters` is the handle on them.
        self.adapters = attach_adapters(self.clip, cfg)

    def train(self, mode: bool = True) -> MSTA:
        # The frozen CLIP stays in eval mode (e.g. no patch dropout); the adapters have no
        # train-time behaviour, so the whole module can stay in eval.
        super().train(mode)
        self.clip.eval()
        return self

    def encode_frames(self, frames: torch.Tensor, num_frames: int) -> torch.Tensor:
        with self.adapters.frames(num_frames):
            return self.clip.encode_image(frames)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.adapters.parameters()

    def parameter_groups(self, lr: float, temporal_lr_mult: float = 1.0) -> list[dict[str, Any]]:
        """The temporal branches apart, at lr x temporal_lr_mult. A depthwise filter over frames does
        something only at weights of order one (a difference filter is [-1, 0, 1]); from its zero init,
        AdamW moves each weight by about lr per step, so at the Linear layers' lr it needs thousands of
        steps to matter, while the spatial path fits the training clips within a few hundred."""
        temporal = self.adapters.temporal_parameters()
        ids = {id(p) for p in temporal}
        groups = [{"params": [p for p in self.trainable_parameters() if id(p) not in ids], "lr": lr}]
        if temporal:
            groups.append({"params": temporal, "lr": lr * temporal_lr_mult})
        return groups

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter tensors by their name in the CLIP; a shared projection appears once."""
        ids = {id(p) for p in self.adapters.parameters()}
        return {n: p.detach() for n, p in self.clip.named_parameters() if id(p) in ids}

    def save_adapters(self, path: str | os.PathLike[str], extra_metadata: dict[str, str] | None = None) -> None:
        from safetensors.torch import save

        extra = dict(extra_metadata or {})
        clash = sorted(set(extra) & set(_RESERVED_KEYS))
        if clash:
            raise ValueError(f"extra_metadata may not use the reserved keys {clash}")
        identity = self.backbone.identity
        metadata = {
            **{k: str(v) for k, v in extra.items()},
            "format": ADAPTER_FORMAT,
            "backbone_name": identity.name,
            "backbone_weights_digest": identity.weights_digest,
            "adapter_config": json.dumps(self.cfg.to_dict(), sort_keys=True),
        }
        tensors = {n: t.to("cpu", copy=True).contiguous() for n, t in self.adapter_state_dict().items()}
        atomic_write_bytes(path, save(tensors, metadata=metadata))

    def load_adapters(self, path: str | os.PathLike[str]) -> dict[str, str]:
        """Load adapter weights saved by `save_adapters`; returns the file's extra metadata."""
        from safetensors.torch import load_file

        info = read_adapter_info(path)
        identity = self.backbone.identity
        if info.backbone_name != identity.name or info.weights_digest != identity.weights_digest:
            raise AdapterLoadError(
                f"{path} was trained on backbone {info.backbone_name} (weights {info.weights_digest[:12]}), "
                f"but this model is {identity.name} (weights {identity.weights_digest[:12]})"
            )
        if info.config != self.cfg:
            raise AdapterLoadError(
                f"{path} was trained with adapter config {info.config.to_dict()}, "
                f"but this model has {self.cfg.to_dict()}"
            )
        tensors = load_file(str(path), device="cpu")
        own = self.adapter_state_dict()
        if set(tensors) != set(own):
            missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
            raise AdapterLoadError(f"{path}: adapter tensors do not match (missing {missing}, unexpected {unexpected})")
        wrong = [f"{n} {tuple(tensors[n].shape)} != {tuple(p.shape)}" for n, p in own.items()
                 if tensors[n].shape != p.shape]
        if wrong:
            raise AdapterLoadError(f"{path}: adapter tensor shapes do not match: {'; '.join(wrong)}")
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(tensors[name])
        return info.extra
