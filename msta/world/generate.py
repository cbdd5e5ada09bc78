"""A procedural video world: the miniature of the real setting this project can run here.

Static captioned images (one coloured shape on a noisy background) pre-train a tiny CLIP that
never sees motion; short videos whose class depends only on time are what adapters must learn.

Ten of the twelve video classes form five time-reversal pairs: a clip of the second class is the
time-reversal of an independently generated clip of the first, so both hold the same kind of
frames and any order-invariant pooling of per-frame features (frame-mean CLIP) is at chance
inside a pair. The two "wobbling" classes differ by shape only, so the frozen frame-mean CLIP is
not useless everywhere.

Everything is pure numpy and deterministic given a ``np.random.Generator``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from fractions import Fraction
from importlib.resources import files
from pathlib import Path
from typing import Callable

import numpy as np

CLASSES: tuple[str, ...] = (
    "moving from left to right",
    "moving from right to left",
    "moving up",
    "moving down",
    "growing bigger",
    "shrinking",
    "appearing",
    "disappearing",
    "turning from red to blue",
    "turning from blue to red",
    "a wobbling triangle",
    "a wobbling cross",
)
TEMPLATE = "a video of {}."
REVERSAL_PAIRS: tuple[tuple[int, int], ...] = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
APPEARANCE_CLASSES: tuple[int, ...] = (10, 11)
# Each reversal pair stays inside one half, so a half never holds only one direction of a pair.
# Base: left/right, grow/shrink, red/blue. Novel: up/down, appear/disappear and both appearance
# classes, so novel classes need both transferred temporal skill and the frozen spatial one.
BASE_CLASSES: tuple[int, ...] = (0, 1, 4, 5, 8, 9)
NOVEL_CLASSES: tuple[int, ...] = (2, 3, 6, 7, 10, 11)

SHAPES: tuple[str, ...] = ("circle", "square", "diamond", "ring", "triangle", "cross")
WOBBLE_SHAPES: dict[int, str] = {10: "triangle", 11: "cross"}
# Motion classes never use the wobble shapes, so shape alone cannot reveal a wobble class.
MOTION_SHAPES: tuple[str, ...] = ("circle", "square", "diamond", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
    "white": (235, 235, 235),
    "purple": (150, 60, 200),
    "orange": (240, 130, 30),
    "cyan": (40, 200, 210),
}
# Radii in pixels of a 64-pixel frame; scaled with the frame size.
SIZES: dict[str, tuple[float, float]] = {"small": (4.5, 7.0), "large": (10.0, 14.0)}
# Centre of each named position as fractions of the frame (x, y), y pointing down.
POSITIONS: dict[str, tuple[float, float]] = {
    "on the left": (0.25, 0.5),
    "on the right": (0.75, 0.5),
    "at the top": (0.5, 0.25),
    "at the bottom": (0.5, 0.75),
    "in the center": (0.5, 0.5),
    "in the top left corner": (0.25, 0.25),
    "in the top right corner": (0.75, 0.25),
    "in the bottom left corner": (0.25, 0.75),
    "in the bottom right corner": (0.75, 0.75),
}
# Caption attribute -> its possible values, keyed like the parameters of ``caption``.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "size_name": tuple(SIZES), "colour": tuple(COLOURS), "shape": SHAPES,
    "position": tuple(POSITIONS),
}
# Openings a pre-training caption may have, so the text tower meets "<prefix> a <shape>"
# phrasings such as the class template "a video of a wobbling triangle." too.
PREFIXES: tuple[str, ...] = ("", "a photo of ", "an image of ", "a picture of ")
_REF_SIZE = 64
_SUPERSAMPLE = 2  # anti-aliasing, so sub-pixel motion and growth stay smooth
FPS = 8
FEW_SHOT: tuple[int, ...] = (2, 4, 8, 16)  # K of the few-shot lists
B2N_SEEDS: tuple[int, ...] = (1, 2, 3)  # the three base-to-novel train draws
B2N_SHOTS = 16


# ----------------------------------------------------------------------------- drawing


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled pixel-centre coordinates (in output pixels) as (x, y), each (H*ss, W*ss)."""
    c = (np.arange(size * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    return np.meshgrid(c, c, indexing="xy")


def _shape_coverage(
    shape: str, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, angle: np.ndarray, size: int
) -> np.ndarray:
    """Fraction of each pixel covered by the shape, (F, size, size) for F parameter sets."""
    gx, gy = _grid(size)
    cx, cy, r, angle = (np.asarray(a, dtype=np.float64)[:, None, None] for a in (cx, cy, r, angle))
    dx, dy = gx - cx, cy - gy  # dy points up so angles turn anticlockwise on screen
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # coordinates in the shape's own frame
    if shape == "circle":
        inside = u**2 + v**2 <= r**2
    elif shape == "ring":
        d2 = u**2 + v**2
        inside = (d2 <= r**2) & (d2 >= (0.5 * r) ** 2)
    elif shape == "square":
        inside = np.maximum(np.abs(u), np.abs(v)) <= 0.85 * r
    elif shape == "diamond":
        inside = np.abs(u) + np.abs(v) <= 1.2 * r
    elif shape == "triangle":
        # Equilateral, pointing up; circumradius 1.25 r so its area is close to the circle's.
        inside = np.ones(u.shape, dtype=bool)
        for phi in (np.pi / 2 * 3, np.pi / 6, np.pi / 6 * 5):  # outward edge normals
            inside &= u * np.cos(phi) + v * np.sin(phi) <= 0.625 * r
    elif shape == "cross":
        au, av = np.abs(u), np.abs(v)
        arm = 0.35 * r
        inside = ((au <= arm) & (av <= r)) | ((av <= arm) & (au <= r))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    f = inside.shape[0]
    ss = _SUPERSAMPLE
    return inside.reshape(f, size, ss, size, ss).mean(axis=(2, 4))


def _smooth_field(rng: np.random.Generator, size: int, knots: int) -> np.ndarray:
    """A (size, size, 3) field in [-1, 1]: random values on a coarse grid, bilinearly upsampled.

    Element-wise interpolation rather than a matrix product keeps the bytes independent of the
    BLAS library and its threading.
    """
    coarse = rng.uniform(-1.0, 1.0, (knots, knots, 3))
    pos = (np.arange(size) + 0.5) / size * (knots - 1)
    i0 = np.minimum(pos.astype(int), knots - 2)
    frac = (pos - i0)[:, None]
    rows = coarse[i0] * (1.0 - frac[..., None]) + coarse[i0 + 1] * frac[..., None]
    return rows[:, i0] * (1.0 - frac[None]) + rows[:, i0 + 1] * frac[None]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dark to mid-grey noise texture with a slight tint, float (size, size, 3) in 0..255."""
    base = rng.uniform(12.0, 115.0) + rng.uniform(-8.0, 8.0, 3)
    texture = _smooth_field(rng, size, int(rng.integers(3, 9))) * rng.uniform(8.0, 35.0)
    return base + texture


def _compose(
    background: np.ndarray,
    coverage: np.ndarray,
    colour: np.ndarray,
    alpha: np.ndarray,
    noise_sigma: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Blend the shape over the background frame by frame and add fresh sensor noise per frame."""
    a = (coverage * np.asarray(alpha)[:, None, None])[..., None]
    frames = background[None] * (1.0 - a) + np.asarray(colour)[:, None, None, :] * a
    frames = frames + rng.normal(0.0, noise_sigma, frames.shape)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def _colour(rng: np.random.Generator, name: str) -> np.ndarray:
    """A named colour with a small per-object jitter, so a colour word covers a range of RGB."""
    return np.clip(np.array(COLOURS[name], dtype=np.float64) + rng.uniform(-15, 15, 3), 0, 255)


def _radius(rng: np.random.Generator, size_name: str, size: int) -> float:
    lo, hi = SIZES[size_name]
    return rng.uniform(lo, hi) * size / _REF_SIZE


# ----------------------------------------------------------------------------- static images


def caption(size_name: str | None, colour: str | None, shape: str, position: str | None,
            prefix: str = "") -> str:
    """A caption such as "a small red circle on the left"; attributes given as None are left
    out ("an orange circle"), and a prefix such as "a photo of " may lead it."""
    words = " ".join(w for w in (size_name, colour, shape) if w)
    article = "an" if words[0] in "aeiou" else "a"
    return f"{prefix}{article} {words}" + (f" {position}" if position else "")


def parse_caption(text: str) -> dict[str, str]:
    """Inverse of :func:`caption` for a full caption without prefix: the four attributes."""
    words = text.split()
    return {"size_name": words[1], "colour": words[2], "shape": words[3],
            "position": " ".join(words[4:])}


def render_image(rng: np.random.Generator, size: int = 64, *, shape: str | None = None,
                 colour: str | None = None, size_name: str | None = None,
                 position: str | None = None) -> tuple[np.ndarray, str]:
    """One captioned still: a single shape of a named size, colour and position; (H, W, 3) uint8.

    Attributes not given are drawn at random (pre-training fixes some to build hard negatives).
    """
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
    size_name = size_name or list(SIZES)[rng.integers(len(SIZES))]
    position = position or list(POSITIONS)[rng.integers(len(POSITIONS))]
    fx, fy = POSITIONS[position]
    cx, cy = (np.array([fx, fy]) + rng.uniform(-0.05, 0.05, 2)) * size
    # Triangles and crosses also appear tilted (as in the wobbling clips); squares and diamonds
    # only slightly, because a square turned by 45 degrees is a diamond.
    max_tilt = {"triangle": 30.0, "cross": 30.0}.get(shape, 10.0)
    angle = np.deg2rad(rng.uniform(-max_tilt, max_tilt))
    r = _radius(rng, size_name, size)
    coverage = _shape_coverage(shape, [cx], [cy], [r], [angle], size)
    image = _compose(
        _background(rng, size), coverage, _colour(rng, colour)[None], np.ones(1),
        rng.uniform(2.0, 10.0), rng,
    )
    return image[0], caption(size_name, colour, shape, position)


# ----------------------------------------------------------------------------- videos


def _clip(
    rng: np.random.Generator,
    frames: int,
    size: int,
    shape: str,
    cx: np.ndarray,
    cy: np.ndarray,
    r: np.ndarray,
    angle: np.ndarray | None = None,
    colour: np.ndarray | None = None,
    alpha: np.ndarray | None = None,
) -> np.ndarray:
    """Render one clip from per-frame parameters; missing ones are constant over time."""
    ones = np.ones(frames)
    angle = np.zeros(frames) if angle is None else angle
    if colour is None:
        colour = np.repeat(_colour(rng, list(COLOURS)[rng.integers(len(COLOURS))])[None], frames, 0)
    alpha = ones if alpha is None else alpha
    coverage = _shape_coverage(shape, cx * ones, cy * ones, r * ones, angle, size)
    return _compose(_background(rng, size), coverage, colour, alpha, rng.uniform(2.0, 10.0), rng)


def _ramp(rng: np.random.Generator, t: np.ndarray, start: tuple[float, float],
          width: tuple[float, float]) -> np.ndarray:
    """0 before a random onset, 1 after it plus a random duration, linear in between."""
    t0, w = rng.uniform(*start), rng.uniform(*width)
    return np.clip((t - t0) / w, 0.0, 1.0)


def _motion_shape(rng: np.random.Generator) -> str:
    return MOTION_SHAPES[rng.integers(len(MOTION_SHAPES))]


def _random_size(rng: np.random.Generator, size: int) -> float:
    return _radius(rng, list(SIZES)[rng.integers(len(SIZES))], size)


def _left_to_right(rng: np.random.Generator, frames: int, size: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, frames)
    x0, x1 = rng.uniform(0.15, 0.3) * size, rng.uniform(0.7, 0.85) * size
    cy = rng.uniform(0.25, 0.75) * size
    r = _random_size(rng, size) * 0.85  # large objects would leave the frame at the ends
    return _clip(rng, frames, size, _motion_shape(rng), x0 + (x1 - x0) * t, cy, r)


def _moving_up(rng: np.random.Generator, frames: int, size: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, frames)
    y0, y1 = rng.uniform(0.7, 0.85) * size, rng.uniform(0.15, 0.3) * size
    cx = rng.uniform(0.25, 0.75) * size
    r = _random_size(rng, size) * 0.85
    return _clip(rng, frames, size, _motion_shape(rng), cx, y0 + (y1 - y0) * t, r)


def _growing(rng: np.random.Generator, frames: int, size: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, frames)
    r0, r1 = rng.uniform(3.5, 5.5) * size / _REF_SIZE, rng.uniform(11.0, 14.0) * size / _REF_SIZE
    cx, cy = rng.uniform(0.35, 0.65, 2) * size
    return _clip(rng, frames, size, _motion_shape(rng), cx, cy, r0 + (r1 - r0) * t)


def _appearing(rng: np.random.Generator, frames: int, size: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, frames)
    alpha = _ramp(rng, t, start=(0.15, 0.45), width=(0.15, 0.35))
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    r = _random_size(rng, size)
    return _clip(rng, frames, size, _motion_shape(rng), cx, cy, r, alpha=alpha)


def _red_to_blue(rng: np.random.Generator, frames: int, size: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, frames)
    s = _ramp(rng, t, start=(0.1, 0.35), width=(0.3, 0.55))[:, None]
    colour = _colour(rng, "red")[None] * (1.0 - s) + _colour(rng, "blue")[None] * s
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    r = _random_size(rng, size)
    return _clip(rng, frames, size, _motion_shape(rng), cx, cy, r, colour=colour)


def _wobbling(shape: str) -> Callable[[np.random.Generator, int, int], np.ndarray]:
    def render(rng: np.random.Generator, frames: int, size: int) -> np.ndarray:
        t = np.linspace(0.0, 1.0, frames)
        amplitude = np.deg2rad(rng.uniform(15.0, 30.0))  # within the stills' tilts
        angle = amplitude * np.sin(2 * np.pi * (rng.uniform(1.0, 2.0) * t + rng.uniform()))
        cx, cy = rng.uniform(0.3, 0.7, 2) * size
        r = _random_size(rng, size)
        return _clip(rng, frames, size, shape, cx, cy, r, angle=angle)

    return render


_FORWARD: dict[int, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    0: _left_to_right,
    2: _moving_up,
    4: _growing,
    6: _appearing,
    8: _red_to_blue,
    10: _wobbling(WOBBLE_SHAPES[10]),
    11: _wobbling(WOBBLE_SHAPES[11]),
}
_REVERSED_OF: dict[int, int] = {b: a for a, b in REVERSAL_PAIRS}


def render_video(class_id: int, rng: np.random.Generator, frames: int = 16,
                 size: int = 64) -> np.ndarray:
    """One clip of a class, uint8 (frames, size, size, 3).

    The second class of a reversal pair is the first class's clip played backwards, drawn with
    the same use of ``rng``: ``render_video(b, g)`` equals ``render_video(a, g')[::-1]`` for
    identically seeded ``g``, ``g'``.
    """
    if class_id in _REVERSED_OF:
        return np.ascontiguousarray(_FORWARD[_REVERSED_OF[class_id]](rng, frames, size)[::-1])
    if class_id not in _FORWARD:
        raise ValueError(f"class id {class_id} not in 0..{len(CLASSES) - 1}")
    return _FORWARD[class_id](rng, frames, size)


# ----------------------------------------------------------------------------- dataset


def shipped_descriptions(kind: str) -> dict[int, list[str]]:
    """The project's hand-written spatial or temporal descriptions of the world's classes, by class id."""
    text = files("msta").joinpath(f"descriptions/world_{kind}.json").read_text(encoding="utf-8")
    return {int(k): v for k, v in json.loads(text).items()}


def class_slug(name: str) -> str:
    """Folder name of a class: "moving up" -> "moving_up"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def clip_rng(seed: int, split: str, class_id: int, index: int) -> np.random.Generator:
    """An independent stream per clip: a test clip never depends on how many train clips exist."""
    return np.random.default_rng([seed, {"train": 0, "test": 1}[split], class_id, index])


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """BT.601 limited-range YUV 4:2:0 planes stacked in PyAV's (H * 3 / 2, W) layout.

    Converting here pins the colour maths to this code, not to the installed swscale version.
    """
    rgb = frame.astype(np.float64)
    h, w = frame.shape[:2]
    y = 16.0 + rgb @ np.array([65.481, 128.553, 24.966]) / 255.0
    # Chroma of each 2x2 block from its mean colour (4:2:0 subsampling).
    mean = rgb.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    u = 128.0 + mean @ np.array([-37.797, -74.203, 112.0]) / 255.0
    v = 128.0 + mean @ np.array([112.0, -93.786, -18.214]) / 255.0
    planes = [np.clip(np.rint(p), 0, 255).astype(np.uint8) for p in (y, u, v)]
    return np.concatenate([planes[0], planes[1].reshape(h // 4, w), planes[2].reshape(h // 4, w)])


def encode_mp4(frames: np.ndarray, path: Path, fps: int = FPS) -> None:
    """Encode (F, H, W, 3) uint8 frames as H.264 yuv420p, byte-identical for identical frames.

    x264 on frames this small gave different bitstreams run to run (in one process and across
    processes) unless B-frames, weighted P prediction and macroblock-tree rate control were all
    off; with one thread and bitexact muxing (no version strings) the bytes are then stable.
    """
    import av

    if frames.shape[1] % 4 or frames.shape[2] % 4:
        raise ValueError(f"frame sides must be multiples of 4 for 4:2:0, got {frames.shape[1:3]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        stream.codec_context.options = {
            "crf": "12", "preset": "veryfast", "x264-params": "bframes=0:weightp=0:mbtree=0",
        }
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(image), format="yuv420p")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    path.write_bytes(buffer.getvalue())


def _write_labels(path: Path, class_ids: tuple[int, ...] | range) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", "name"])
        for new_id, class_id in enumerate(class_ids):
            writer.writerow([new_id, CLASSES[class_id]])


def _write_list(path: Path, entries: list[tuple[str, int]]) -> None:
    path.write_text("".join(f"{rel} {label}\n" for rel, label in entries))


def _entries(pool: dict[int, list[str]], classes: tuple[int, ...] | range,
             relabel: dict[int, int] | None = None, shots: int | None = None,
             draw_seed: list[int] | None = None) -> list[tuple[str, int]]:
    """List entries of the given classes: all clips, or ``shots`` per class drawn with a seed.

    Each class's draw is a prefix of one seeded permutation, so lists drawn with the same seed
    are nested (every 2-shot clip is in the 4-shot list). A class with fewer clips than
    ``shots`` contributes all of them.
    """
    out = []
    for c in classes:
        idx = np.arange(len(pool[c]))
        if draw_seed is not None:
            idx = np.sort(np.random.default_rng([*draw_seed, c]).permutation(len(idx))[:shots])
        out += [(pool[c][i], c if relabel is None else relabel[c]) for i in idx]
    return out


def _video_table(frames: int, size: int) -> str:
    sampled = min(8, frames)
    return (
        f"frames = {sampled}\ntrain_short_side = {size}\ntest_short_side = {size}\n"
        f"crop_size = {size}\ntest_clips = 2\ntest_crops = 1\n"
        "hflip = 0.0  # horizontal flips would swap the left/right classes\n"
        "color_jitter = 0.0  # a hue shift or greyscale would blur the red/blue classes and captions\n"
        "grayscale = 0.0\n"
    )


def manifest(frames: int, size: int) -> str:
    """The world's msta.toml: datasets world, world-base, world-novel with their lists and video settings."""
    video = _video_table(frames, size)
    fs = "".join(f'few_shot_{k} = "lists/few_shot_{k}.txt"\n' for k in FEW_SHOT)
    b2n = "".join(f'train_s{s} = "lists/base_train_s{s}.txt"\n' for s in B2N_SEEDS)
    return (
        "# The procedural MSTA world, written by msta.world.write_dataset. Paths are relative to"
        " this file.\n\n"
        '[datasets.world]\nlabels = "labels.csv"\nvideo_root = "videos"\n'
        f'[datasets.world.lists]\ntrain = "lists/train.txt"\ntest = "lists/test.txt"\n{fs}'
        f"[datasets.world.video]\n{video}\n"
        '[datasets.world-base]\nlabels = "labels_base.csv"\nvideo_root = "videos"\n'
        f'[datasets.world-base.lists]\n{b2n}val = "lists/base_val.txt"\n'
        f"[datasets.world-base.video]\n{video}\n"
        '[datasets.world-novel]\nlabels = "labels_novel.csv"\nvideo_root = "videos"\n'
        '[datasets.world-novel.lists]\nval = "lists/novel_val.txt"\n'
        f"[datasets.world-novel.video]\n{video}"
    )


def _readme(videos_per_class: int, test_per_class: int, seed: int, frames: int, size: int) -> str:
    return (
        f"Procedural MSTA world: 12 classes, {videos_per_class} train + {test_per_class} test clips"
        f" per class, {frames} frames of {size}x{size} at {FPS} fps, seed {seed}.\n"
        "Written by msta.world.write_dataset; the same arguments give byte-identical files.\n"
        "videos/<class>/<n>.mp4: H.264 yuv420p; n < train count are train clips, the rest test.\n"
        "labels.csv: id,name of all classes; labels_base.csv / labels_novel.csv: the two halves,"
        " ids renumbered from 0.\n"
        "lists/*.txt: 'relative/path.mp4 label_id' per line (ViFi-CLIP style), paths under"
        " videos/.\n"
        "lists/train.txt, test.txt: all clips of each split; few_shot_K.txt: K train clips per"
        " class (nested).\n"
        "lists/base_train_s{1,2,3}.txt: 16 train clips per base class, three draws, base ids;"
        " base_val / novel_val: test clips.\n"
        "Lists ask for at most the clips that exist: with fewer train clips than K they hold"
        " them all.\n"
        "Reversal pairs (0,1) (2,3) (4,5) (6,7) (8,9): the second class is the first played"
        " backwards; 10 and 11 differ by shape.\n"
        "msta.toml declares the datasets world, world-base and world-novel for the pipeline.\n"
    )


def write_dataset(out_dir: str | Path, videos_per_class: int, test_per_class: int, seed: int,
                  frames: int = 16, size: int = 64) -> Path:
    """Write the world as an ordinary video dataset (see README.txt there); returns out_dir."""
    out = Path(out_dir)
    (out / "lists").mkdir(parents=True, exist_ok=True)
    pools: dict[str, dict[int, list[str]]] = {"train": {}, "test": {}}
    for c, name in enumerate(CLASSES):
        counts = {"train": (0, videos_per_class), "test": (videos_per_class, test_per_class)}
        for split, (first, count) in counts.items():
            pools[split][c] = []
            for i in range(count):
                rel = f"{class_slug(name)}/{first + i}.mp4"
                clip = render_video(c, clip_rng(seed, split, c, i), frames, size)
                encode_mp4(clip, out / "videos" / rel)
                pools[split][c].append(rel)

    every = range(len(CLASSES))
    base_ids = {c: i for i, c in enumerate(BASE_CLASSES)}
    novel_ids = {c: i for i, c in enumerate(NOVEL_CLASSES)}
    _write_labels(out / "labels.csv", every)
    _write_labels(out / "labels_base.csv", BASE_CLASSES)
    _write_labels(out / "labels_novel.csv", NOVEL_CLASSES)
    lists = out / "lists"
    train, test = pools["train"], pools["test"]
    _write_list(lists / "train.txt", _entries(train, every))
    _write_list(lists / "test.txt", _entries(test, every))
    for k in FEW_SHOT:
        draw = _entries(train, every, shots=k, draw_seed=[seed, 2])
        _write_list(lists / f"few_shot_{k}.txt", draw)
    for s in B2N_SEEDS:
        draw = _entries(train, BASE_CLASSES, base_ids, B2N_SHOTS, draw_seed=[seed, 3, s])
        _write_list(lists / f"base_train_s{s}.txt", draw)
    _write_list(lists / "base_val.txt", _entries(test, BASE_CLASSES, base_ids))
    _write_list(lists / "novel_val.txt", _entries(test, NOVEL_CLASSES, novel_ids))
    (out / "msta.toml").write_text(manifest(frames, size))
    (out / "README.txt").write_text(_readme(videos_per_class, test_per_class, seed, frames, size))
    return out
