"""Cost of the description consistency constraint in one MSTA training step.

One step (forward + backward + AdamW) on batch 4 x 8 frames against C = 174 classes, in three forms:
  (a) CE only;
  (b) CE + L_CC with D_s, D_t read from precomputed tensors (this project's cache);
  (c) CE + L_CC re-encoding all C x 2 x N descriptions through the frozen text tower every step
      (what OST's code does).
The variants are interleaved (a b c, b c a, ...) and medians reported: the machine is noisy.
Random weights: the cost does not depend on them.

    python benchmarks/train_step.py [--model msta-tiny|ViT-B-16] [--reps 5] [--device auto] [--precision fp32]

This file also holds the harness the other benchmarks share (arguments, workload, step, timing,
peak memory in a fresh subprocess).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from msta.method.adapters import AdapterConfig
from msta.method.backbone import Backbone, load_backbone
from msta.method.losses import class_means
from msta.method.model import MSTA, VideoCLIP
from msta.method.runtime import autocast, resolve_device, seed_everything
from msta.train import Optimisation, Targets, Trainer

MODES = {"a": "ce", "b": "cached", "c": "reencode"}


def add_common_args(parser: argparse.ArgumentParser, reps: int = 5) -> None:
    parser.add_argument("--model", default="msta-tiny", help="open_clip model name (random weights)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="bf16 autocast on CUDA; the CPU always runs fp32")
    parser.add_argument("--reps", type=int, default=reps, help="timed repetitions of each variant")
    parser.add_argument("--batch", type=int, default=4, help="clips per step")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--classes", type=int, default=174, help="174 = SSv2")
    parser.add_argument("--descriptions", type=int, default=2, help="N descriptions of each kind per class")
    parser.add_argument("--dim", type=int, default=None,
                        help="adapter bottleneck r (default: the paper's 128 per 768 of vision width)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (1 is steadier on a shared machine)")


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def paper_dim(vision_width: int) -> int:
    """The paper's r = 128 for a 768-wide ViT, scaled to other widths."""
    return max(4, round(128 * vision_width / 768))


def paper_layers(depth: int) -> tuple[int, int]:
    """The paper's 8-12 of 12 blocks (the last 5/12), scaled to `depth` blocks."""
    return depth - max(1, round(depth * 5 / 12)) + 1, depth


@dataclass
class Workload:
    frames: torch.Tensor           # (B, T, 3, H, W)
    labels: torch.Tensor           # (B,)
    class_names: list[str]
    descriptions: list[str]        # C*N spatial, then C*N temporal, class-major
    d_spatial: torch.Tensor        # (C, E) cached class means
    d_temporal: torch.Tensor


def description_means(backbone: Backbone, descriptions: list[str], classes: int, n: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    emb = backbone.encode_text_frozen(descriptions, out_device=device).view(2, classes, n, -1)
    return class_means(emb[0]), class_means(emb[1])


def make_workload(backbone: Backbone, args: argparse.Namespace, device: torch.device,
                  encode_descriptions: bool = True) -> Workload:
    """Random clips and labels, realistic class names and descriptions, and their cached D_s, D_t.

    Without `encode_descriptions` D_s, D_t are random unit vectors: enough to time a step that
    reads them, without embedding 696 descriptions first (a minute for ViT-B/16 on a CPU).
    """
    g = torch.Generator().manual_seed(0)
    size = backbone.image_size
    frames = torch.randn(args.batch, args.frames, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    # Names and sentence frames as long as real SSv2 ones and the authors' description files.
    names = [f"pushing something number {i} from left to right" for i in range(args.classes)]
    spatial = [f"A video about a hand and object {i} on a wooden table in a bright room, view {k}."
               for i in range(args.classes) for k in range(args.descriptions)]
    temporal = [f"A video of {names[i]} generally involves the following step: the hand moves the object "
                f"slowly across the frame, part {k}, which is a sub-step."
                for i in range(args.classes) for k in range(args.descriptions)]
    descriptions = spatial + temporal
    if encode_descriptions:
        d_s, d_t = description_means(backbone, descriptions, args.classes, args.descriptions, device)
    else:
        d_s, d_t = (torch.nn.functional.normalize(torch.randn(args.classes, backbone.embed_dim, generator=g), dim=-1)
                    .to(device) for _ in range(2))
    return Workload(frames, labels, names, descriptions, d_s, d_t)


def make_step(model: VideoCLIP, wl: Workload, mode: str, device: torch.device, precision: str,
              n_desc: int) -> Callable[[], None]:
    """One training step of `model` in the given mode ('ce', 'cached' or 'reencode'): the training
    loop's own step (msta/train.py `Trainer.step`: forward, loss, backward, AdamW, lr step), so that
    this times the code that trains. 'reencode' first embeds every description with the frozen
    text tower, as OST's code does each step, and hands the means to the same step."""
    targets = Targets(wl.class_names, *((wl.d_spatial, wl.d_temporal) if mode == "cached" else (None, None)))
    recipe = Optimisation(epochs=10_000, warmup_epochs=0, batch_size=wl.labels.shape[0], precision=precision,
                    alpha=0.0 if mode == "ce" else 1.0)
    trainer = Trainer(model, recipe, targets, TensorDataset(wl.frames, wl.labels), device=device)

    def step() -> None:
        if mode == "reencode":
            with autocast(device, precision):
                trainer.d_spatial, trainer.d_temporal = description_means(
                    model.backbone, wl.descriptions, len(wl.class_names), n_desc, device)
        trainer.step(wl.frames, wl.labels)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved_medians(fns: dict[str, Callable[[], None]], reps: int, device: torch.device,
                        warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, the order rotating every repetition."""
    keys = list(fns)
    for _ in range(warmup):
        for k in keys:
            fns[k]()
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(reps):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            times[k].append(timed(fns[k], device))
    return {k: statistics.median(v) for k, v in times.items()}


def build_msta(args: argparse.Namespace, device: torch.device, layers: tuple[int, int] | None = None) -> MSTA:
    seed_everything(0)
    backbone = load_backbone(args.model, None, device=device)
    cfg = AdapterConfig(dim=args.dim or paper_dim(backbone.vision_width),
                        layers=layers or paper_layers(backbone.vision_layers))
    return MSTA(backbone, cfg).to(device).train()


def describe_setup(args: argparse.Namespace, device: torch.device) -> str:
    precision = args.precision if device.type == "cuda" else "fp32"
    threads = torch.get_num_threads()
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU, {threads} thread{'s' if threads > 1 else ''}")
    return (f"{args.model} (random weights) on {name}, {precision}; batch {args.batch} x {args.frames} frames, "
            f"{args.classes} classes, N={args.descriptions}")


# ---------------------------------------------------------------- peak memory in a fresh process


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def measure_step(step: Callable[[], None], device: torch.device, reps: int) -> dict[str, float]:
    """Peak memory of the first step (it allocates gradients and optimizer state), then step times.

    CUDA: torch.cuda.max_memory_allocated over the step. CPU: the rise of the resident set's
    high-water mark (VmHWM, reset through /proc/self/clear_refs) above the resident set before.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        before = _proc_status_kb("VmRSS")
        step()
        peak = (_proc_status_kb("VmHWM") - before) * 1024
    times = [timed(step, device) for _ in range(reps)]
    return {"peak_bytes": float(peak), "step_s": statistics.median(times)}


def run_child(script: str, argv: list[str]) -> dict[str, float]:
    """Run `script --child ...` in a fresh interpreter and read back its one JSON line."""
    out = subprocess.run([sys.executable, script, *argv], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def common_argv(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model, "--device", args.device, "--precision", args.precision,
            "--batch", str(args.batch), "--frames", str(args.frames), "--classes", str(args.classes),
            "--descriptions", str(args.descriptions), *(["--dim", str(args.dim)] if args.dim else []),
            *(["--threads", str(args.threads)] if args.threads else [])]


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    args = parser.parse_args()
    apply_threads(args)
    device = resolve_device(args.device)
    model = build_msta(args, device)
    wl = make_workload(model.backbone, args, device)
    steps = {k: make_step(model, wl, mode, device, args.precision, args.descriptions) for k, mode in MODES.items()}
    print(describe_setup(args, device))
    print(f"adapters r={model.cfg.dim}, layers {model.cfg.layers[0]}-{model.cfg.layers[1]}; "
          f"{len(wl.descriptions)} descriptions; {args.reps} interleaved repetitions, medians")
    med = interleaved_medians(steps, args.reps, device)
    labels = {"a": "(a) CE only", "b": "(b) CE + L_CC, cached D_s/D_t",
              "c": "(c) CE + L_CC, re-encoding descriptions"}
    for k, label in labels.items():
        print(f"  {label:<42} {med[k] * 1000:10.1f} ms/step")
    print(f"  ratio b/a = {med['b'] / med['a']:.3f}   ratio c/a = {med['c'] / med['a']:.3f}   "
          f"(c/b = {med['c'] / med['b']:.2f})")


if __name__ == "__main__":
    main()
