"""Clip augmentation and test views: one parameter set per clip, determinism, geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msta.video.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    sample_train_params,
    multi_views,
    train_transform,
)

MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_clip(T: int = 8, H: int = 128, W: int = 170, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (T, H, W, 3), dtype=np.uint8)


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Undo CLIP normalisation: back to 0..255."""
    return (x * STD + MEAN) * 255


@pytest.mark.parametrize("shape", [(8, 128, 170), (4, 170, 128), (8, 112, 112)])
def test_train_transform_shape_and_dtype(shape: tuple[int, int, int]) -> None:
    clip = random_clip(*shape)
    for source in (clip, torch.from_numpy(clip)):
        out = train_transform(source, 112, gen(0))
        assert out.shape == (shape[0], 3, 112, 112) and out.dtype == torch.float32
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("seed", range(8))
def test_identical_frames_stay_identical(seed: int) -> None:
    clip = np.repeat(random_clip(1, seed=seed), 8, axis=0)
    out = train_transform(clip, 96, gen(seed), color_jitter_p=1.0, grayscale_p=0.5)
    assert all(torch.equal(out[0], out[t]) for t in range(1, 8))


def test_same_generator_seed_same_output_and_seeds_differ() -> None:
    clip = random_clip()
    a = train_transform(clip, 96, gen(11))
    assert torch.equal(a, train_transform(clip, 96, gen(11)))
    assert not torch.equal(a, train_transform(clip, 96, gen(12)))


def test_probabilities_do_not_shift_other_draws() -> None:
    base = sample_train_params(128, 170, 112, gen(3))
    other = sample_train_params(128, 170, 112, gen(3), hflip=0.0, color_jitter_p=0.0, grayscale_p=1.0)
    assert (base.top, base.left, base.height, base.width, base.factors) == (
        other.top,
        other.left,
        other.height,
        other.width,
        other.factors,
    )


def horizontal_ramp(T: int = 4, H: int = 128, W: int = 200) -> np.ndarray:
    ramp = np.linspace(0, 255, W).astype(np.uint8)
    return np.broadcast_to(ramp[None, None, :, None], (T, H, W, 3)).copy()


@pytest.mark.parametrize("hflip, increasing", [(0.0, True), (1.0, False)])
def test_flip_probability(hflip: float, increasing: bool) -> None:
    for seed in range(20):
        out = train_transform(horizontal_ramp(), 64, gen(seed), hflip=hflip, color_jitter_p=0.0, grayscale_p=0.0)
        row = out[0, 0, 32]
        assert bool(row[-1] > row[0]) is increasing


def test_flip_happens_about_half_the_time() -> None:
    flips = [sample_train_params(128, 170, 112, gen(s)).flip for s in range(400)]
    assert 150 < sum(flips) < 250


def test_multiscale_crop_candidates() -> None:
    # short side 256, scales (1, .875, .75, .66): sides 256, 224, 192, 168; the two sides of
    # a crop at most one scale step apart; 224 is the output size.
    sides = [256, 224, 192, 168]
    allowed = {(sides[i], sides[j]) for i in range(4) for j in range(4) if abs(i - j) <= 1}
    seen = set()
    for seed in range(300):
        p = sample_train_params(256, 340, 224, gen(seed))
        assert (p.height, p.width) in allowed
        w_step, h_step = (340 - p.width) // 4, (256 - p.height) // 4
        assert p.left in (0, 2 * w_step, 4 * w_step) and p.top in (0, 2 * h_step, 4 * h_step)
        seen.add((p.height, p.width))
    assert seen == allowed


def test_normalisation_of_a_constant_clip() -> None:
    clip = np.full((2, 64, 80, 3), (200, 100, 50), np.uint8)
    out = train_transform(clip, 32, gen(0), color_jitter_p=0.0, grayscale_p=0.0)
    expected = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out[:, :, 5, 5], expected.expand(2, 3))
    custom = train_transform(clip, 32, gen(0), color_jitter_p=0.0, grayscale_p=0.0, mean=(0.5,) * 3, std=(0.25,) * 3)
    torch.testing.assert_close(custom[0, :, 0, 0], (torch.tensor([200, 100, 50]) / 255 - 0.5) / 0.25)


def test_grayscale_always_and_never() -> None:
    clip = random_clip()
    grey = to_pixels(train_transform(clip, 64, gen(1), grayscale_p=1.0))
    torch.testing.assert_close(grey[:, 0], grey[:, 1], atol=1e-3, rtol=0)
    colour = to_pixels(train_transform(clip, 64, gen(1), color_jitter_p=0.0, grayscale_p=0.0))
    assert (colour[:, 0] - colour[:, 1]).abs().mean() > 10


def test_colour_jitter_changes_colours_only_when_applied() -> None:
    clip = random_clip()
    plain = train_transform(clip, 64, gen(4), color_jitter_p=0.0, grayscale_p=0.0)
    jittered = train_transform(clip, 64, gen(4), color_jitter_p=1.0, grayscale_p=0.0)
    assert (plain - jittered).abs().mean() > 0.01


def column_clip(S: int, T: int, H: int, W: int) -> np.ndarray:
    """Channel 0 = position along the long side // 2, channel 1 = 50 * clip index."""
    x = np.zeros((S, T, H, W, 3), np.uint8)
    along = np.arange(max(H, W)) // 2
    if W >= H:
        x[..., 0] = along[None, None, None, :W]
    else:
        x[..., 0] = along[None, None, :H, None]
    x[..., 1] = (50 * np.arange(S))[:, None, None, None]
    return x


@pytest.mark.parametrize("landscape", [True, False])
def test_three_crops_left_centre_right(landscape: bool) -> None:
    H, W = (224, 448) if landscape else (448, 224)
    out = multi_views(column_clip(2, 4, H, W), 224, crops=3)
    assert out.shape == (6, 4, 3, 224, 224) and out.dtype == torch.float32
    pixels = to_pixels(out).round()
    for view in range(6):
        clip, crop = divmod(view, 3)
        assert pixels[view, :, 1].unique().tolist() == [50.0 * clip]
        # channel 0 of the crop's first pixel: crops start at 0, 112, 224 px along the long side
        assert pixels[view, 0, 0, 0, 0].item() == [0, 56, 112][crop]


def test_test_views_resize_short_side_and_centre_crop() -> None:
    clip = column_clip(1, 2, 112, 224)  # short side 112 -> 224, long side 224 -> 448
    out = multi_views(clip, 224, crops=1)
    assert out.shape == (1, 2, 3, 224, 224)
    pixels = to_pixels(out).round()
    # The centre crop spans resized columns 112..335, source columns 56..168 (values 28..84).
    assert pixels[0, 0, 0, 100, 0].item() == pytest.approx(28, abs=1.5)
    assert pixels[0, 0, 0, 100, -1].item() == pytest.approx(83.5, abs=1.5)


def test_test_views_are_deterministic_and_reject_bad_crops() -> None:
    clip = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 90, 3), dtype=np.uint8)
    assert torch.equal(multi_views(clip, 48), multi_views(clip, 48))
    with pytest.raises(ValueError):
        multi_views(clip, 48, crops=0)


def test_per_frame_colour_jitter_draws_new_factors_for_every_frame() -> None:
    """ViFi-CLIP's ColorJitter: the coin per clip, new factors per frame; the clip's other draws and
    the per-clip path are unchanged."""
    from msta.video.transforms import _color_jitter, apply_train_params

    clip = np.repeat(random_clip(1, seed=3), 8, axis=0)
    per_clip = train_transform(clip, 96, gen(5), color_jitter_p=1.0, grayscale_p=0.0)
    per_frame = train_transform(clip, 96, gen(5), color_jitter_p=1.0, grayscale_p=0.0, jitter_per_frame=True)
    assert all(torch.equal(per_clip[0], per_clip[t]) for t in range(8))
    assert len({per_frame[t].sum().item() for t in range(8)}) == 8  # eight colourings of one frame
    a = sample_train_params(128, 170, 96, gen(5), color_jitter_p=1.0)
    b = sample_train_params(128, 170, 96, gen(5), color_jitter_p=1.0, jitter_frames=8)
    assert (a.top, a.left, a.flip, a.factors, a.order, a.grayscale) == (b.top, b.left, b.flip, b.factors, b.order,
                                                                           b.grayscale)
    assert len(b.frame_jitter) == 8 and len({f for f, _ in b.frame_jitter}) == 8
    # each frame is the per-clip jitter with that frame's own factors and order
    frame3 = apply_train_params(clip[3:4], b.__class__(**{**b.__dict__, "frame_jitter": (), "jitter": False}), 96)
    pixels = to_pixels(frame3).round().clamp(0, 255).to(torch.uint8)
    expected = _color_jitter(pixels, *b.frame_jitter[3]).float()
    got = to_pixels(apply_train_params(clip, b, 96)[3:4]).round()
    assert (got - expected).abs().max() <= 1
    with pytest.raises(ValueError, match="per-frame jitter"):
        apply_train_params(clip[:4], b, 96)
