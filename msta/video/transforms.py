"""Clip-level augmentation and test views, the ViFi-CLIP / X-CLIP recipe (msta/METHOD.md §3).

Each function takes a whole clip and draws ONE set of random parameters for all its frames,
so that the frames stay consistent in space and colour (as a video is, and as the temporal
adapter expects); the colour jitter can instead draw new factors for every frame, as
ViFi-CLIP's ColorJitter does (the authors' recipe). Geometry and colour run on uint8, like the PIL/OpenCV pipelines these
recipes were tuned with (and several times faster than on float); normalisation comes last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as F

from msta.video import augment

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SCALES = (1.0, 0.875, 0.75, 0.66)

# SimCLR / ViFi-CLIP colour jitter (brightness .4, contrast .4, saturation .2, hue .1) as the
# ranges torchvision's ColorJitter draws from: multipliers 1 +- strength, hue shift +- .1.
_JITTER_RANGES = ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
# mmaction MultiScaleCrop: crop width and height scales differ by at most one step; a crop
# side within this many pixels of the output size becomes exactly the output size.
_MAX_SCALE_GAP = 1
_SNAP = 3

Clip = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class TrainParams:
    """Everything random about one training augmentation of one clip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    jitter: bool
    # Brightness, contrast, saturation multipliers and hue shift, and the order they apply in.
    factors: tuple[float, float, float, float]
    order: tuple[int, ...]
    grayscale: bool
    # Per-frame jitter (ViFi-CLIP's): (factors, order) for every frame; empty: `factors` for all.
    frame_jitter: tuple[tuple[tuple[float, float, float, float], tuple[int, ...]], ...] = ()


def sample_train_params(
    height: int,
    width: int,
    size: int,
    generator: torch.Generator,
    hflip: float = augment.HFLIP,
    scales: Sequence[float] = SCALES,
    color_jitter_p: float = augment.COLOR_JITTER,
    grayscale_p: float = augment.GRAYSCALE,
    jitter_frames: int = 0,
) -> TrainParams:
    """Draw the parameters for a (height, width) clip; with `jitter_frames` = T, new colour factors
    and order for each of its T frames (drawn after, so the clip's other choices do not change).
    Every draw is made whatever the probabilities, so changing one probability does not change the
    other choices."""
    sizes = _crop_sizes(height, width, size, scales)
    crop_w, crop_h = sizes[_randint(len(sizes), generator)]
    offsets = _fixed_offsets(height, width, crop_h, crop_w)
    left, top = offsets[_randint(len(offsets), generator)]
    coins = torch.rand(3, generator=generator).tolist()
    flip, jitter, grayscale = coins[0] < hflip, coins[1] < color_jitter_p, coins[2] < grayscale_p
    factors, order = _jitter_draw(generator)
    per_frame = tuple(_jitter_draw(generator) for _ in range(jitter_frames))
    return TrainParams(top, left, crop_h, crop_w, flip, jitter, factors, order, grayscale, per_frame)


def _jitter_draw(generator: torch.Generator) -> tuple[tuple[float, float, float, float], tuple[int, ...]]:
    """Brightness, contrast, saturation multipliers and hue shift, and the order they apply in."""
    u = torch.rand(4, generator=generator).tolist()
    b, c, s, h = (lo + (hi - lo) * x for (lo, hi), x in zip(_JITTER_RANGES, u))
    return (b, c, s, h), tuple(torch.randperm(4, generator=generator).tolist())


def apply_train_params(
    clip: Clip,
    params: TrainParams,
    size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> normalised float (T, 3, size, size)."""
    x = _channels_first(clip)
    x = x[..., params.top : params.top + params.height, params.left : params.left + params.width]
    x = F.resize(x, [size, size], antialias=True)
    if params.flip:
        x = x.flip(-1)
    if params.jitter and params.frame_jitter:
        if len(params.frame_jitter) != x.shape[0]:
            raise ValueError(f"per-frame jitter drawn for {len(params.frame_jitter)} frames, clip has {x.shape[0]}")
        x = torch.cat([_color_jitter(x[t : t + 1], f, o) for t, (f, o) in enumerate(params.frame_jitter)])
    elif params.jitter:
        x = _color_jitter(x, params.factors, params.order)
    if params.grayscale:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    return normalize(x, mean, std)


def train_transform(
    clip_uint8: Clip,
    size: int,
    generator: torch.Generator,
    hflip: float = augment.HFLIP,
    scales: Sequence[float] = SCALES,
    color_jitter_p: float = augment.COLOR_JITTER,
    grayscale_p: float = augment.GRAYSCALE,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    jitter_per_frame: bool = False,
) -> torch.Tensor:
    """Multi-scale crop, resize to size x size, flip, colour jitter (per clip, or per frame),
    greyscale, normalise: uint8 (T, H, W, 3) -> float (T, 3, size, size); all randomness from
    `generator`."""
    height, width = clip_uint8.shape[1:3]
    params = sample_train_params(height, width, size, generator, hflip, scales, color_jitter_p, grayscale_p,
                                 clip_uint8.shape[0] if jitter_per_frame else 0)
    return apply_train_params(clip_uint8, params, size, mean, std)


def multi_views(
    clip_uint8: Clip,
    size: int,
    crops: int = 3,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """uint8 (S, T, H, W, 3) -> float (S * crops, T, 3, size, size), view s * crops + c.

    Each clip's short side is resized to `size`, then `crops` size x size crops are taken evenly
    along the long side (3: left/centre/right or top/centre/bottom, as mmaction's ThreeCrop;
    1: centre)."""
    if crops < 1:
        raise ValueError(f"crops must be >= 1, got {crops}")
    S, T = clip_uint8.shape[:2]
    x = _channels_first(clip_uint8.reshape(S * T, *clip_uint8.shape[2:]))
    x = F.resize(x, size, antialias=True)  # an int resizes the short side
    height, width = x.shape[-2:]
    long_side, vertical = (height, True) if height > width else (width, False)
    starts = [(long_side - size) // 2] if crops == 1 else [k * (long_side - size) // (crops - 1) for k in range(crops)]
    views = [x[..., s : s + size, :size] if vertical else x[..., :size, s : s + size] for s in starts]
    out = torch.stack(views, dim=1)  # (S*T, crops, 3, size, size)
    out = out.reshape(S, T, crops, 3, size, size).transpose(1, 2).reshape(S * crops, T, 3, size, size)
    return normalize(out, mean, std)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 ((x / 255) - mean) / std, per channel."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x.float() / 255 - m) / s


def _channels_first(clip: Clip) -> torch.Tensor:
    x = torch.as_tensor(clip)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected a uint8 clip (T, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2)


def _randint(n: int, generator: torch.Generator) -> int:
    return int(torch.randint(n, (), generator=generator))


def _crop_sizes(height: int, width: int, size: int, scales: Sequence[float]) -> list[tuple[int, int]]:
    """Candidate (width, height) crops: sides from the short side times each scale, the two
    sides at most one scale step apart (aspect jitter), as mmaction's MultiScaleCrop."""
    base = min(height, width)
    sides = [int(base * s) for s in scales]
    snapped = [size if abs(side - size) < _SNAP else side for side in sides]
    return [
        (min(snapped[j], width), min(snapped[i], height))
        for i in range(len(sides))
        for j in range(len(sides))
        if abs(i - j) <= _MAX_SCALE_GAP
    ]


def _fixed_offsets(height: int, width: int, crop_h: int, crop_w: int) -> list[tuple[int, int]]:
    """(left, top) of the four corners and the centre (TSN's fixed crops, no random jitter)."""
    w_step, h_step = (width - crop_w) // 4, (height - crop_h) // 4
    return [(0, 0), (4 * w_step, 0), (0, 4 * h_step), (4 * w_step, 4 * h_step), (2 * w_step, 2 * h_step)]


def _color_jitter(x: torch.Tensor, factors: Sequence[float], order: Sequence[int]) -> torch.Tensor:
    adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    for k in order:
        x = adjust[k](x, factors[k])
    return x
