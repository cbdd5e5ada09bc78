"""How a video is scored and embedded at test time, in one place (msta/METHOD.md §3).

A video is seen as clips x crops views; the model's `encode_video` embeds each view (frame-mean
CLIP, MSTA, or a video CLIP that attends over the T frames jointly); the class scores are the
per-view softmax probabilities summed over the views. The evaluate stage, the features stage and
`msta-pipe predict` all go through these functions, so that they agree to the bit.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from msta.video.decode import Sampling, decode_clip
from msta.video.transforms import multi_views


def video_views(path: str | os.PathLike[str], sampling: Sampling, size: int, crops: int, mean: Sequence[float],
                std: Sequence[float], decoder: str) -> torch.Tensor:
    """A video file's test views, float (clips * crops, T, 3, size, size): decoded and sampled as the
    `frames` stage caches a test list, cropped as the evaluate stage crops it."""
    return multi_views(decode_clip(path, sampling, decoder=decoder), size, crops, mean, std)


def embed_views(model: Any, views: torch.Tensor) -> torch.Tensor:
    """(B, V, T, 3, H, W) -> (B, V, D): the normalised embedding of every view."""
    b, v = views.shape[:2]
    return model.encode_video(views.flatten(0, 1)).view(b, v, -1)


def view_scores(model: Any, view_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """(B, V, D) view embeddings -> (B, C) scores: a softmax over the classes per view, summed over views."""
    b, v = view_emb.shape[:2]
    return model.logits(view_emb.flatten(0, 1), class_emb).float().softmax(-1).view(b, v, -1).sum(1)


def video_embedding(view_emb: torch.Tensor) -> torch.Tensor:
    """(B, V, D) -> (B, D): one embedding per video, the normalised mean of its views."""
    return F.normalize(view_emb.float().mean(1), dim=-1)
