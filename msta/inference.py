"""How a video is scored and embedded at test time, in one place (msta/METHOD.md §3).

A video is seen as clips x crops views; the model's `encode_video` embeds each view (frame-mean
CLIP, MSTA, or a video CLIP that attends over the T frames jointly); the class scores are the
per-view softmax probabilities summed over the views. The evaluate stage, the features stage and
`msta-pipe predict` all go through these functions, so that they agree to the bit.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from msta.video.transforms import Clip, multi_views

# How much one forward pass of `predict` or `msta.classify` holds: a video's views (whole clips, at least
# one) and class names are encoded this many at a time, so memory does not grow with --clips x --crops or
# with the number of names (100,000 --labels in one batch took 10.5 GB).
VIEW_BATCH = 8
TEXT_BATCH = 256


def view_batches(clip_uint8: Clip, size: int, crops: int, mean: Sequence[float],
                 std: Sequence[float]) -> Iterator[torch.Tensor]:
    """The test views of decoded (S, T, H, W, 3) clips, as multi_views gives them and in its order, a few
    whole clips (about VIEW_BATCH views) at a time: never all of a video's views as floats at once."""
    step = max(1, VIEW_BATCH // crops)
    for start in range(0, len(clip_uint8), step):
        yield multi_views(clip_uint8[start:start + step], size, crops, mean, std)


def video_probs(model: Any, batches: Iterable[torch.Tensor], class_emb: torch.Tensor) -> torch.Tensor:
    """(C,): one video's per-view softmax averaged over all its views, given as (V, T, 3, H, W) batches."""
    total, views = torch.zeros(class_emb.shape[0], device=class_emb.device), 0
    for batch in batches:
        total += view_scores(model, embed_views(model, batch[None].to(class_emb.device)), class_emb)[0]
        views += batch.shape[0]
    return total / views


def encode_names(model: Any, names: Sequence[str]) -> torch.Tensor:
    """(N, D) normalised embeddings of class names through the model's template and text branch,
    TEXT_BATCH names at a time."""
    return torch.cat([model.encode_classes(list(names[i:i + TEXT_BATCH])) for i in range(0, len(names), TEXT_BATCH)])


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
