"""Training throughput on one device: clips/s, model FLOP utilisation, peak memory, and what each
lever is worth, all measured in one run.

MSTA on the paper's geometry (ViT-B-16 random weights, 8 frames at 224 px, adapters r=128 on
layers 8-12, CE + L_CC from cached description means, C = 174 classes) through the training
loop's own `Trainer.step` (msta/train.py), at --batch clips per step (micro-batch = batch), in
fp32 and bf16; the full fine-tuning baseline (every CLIP weight trains, CE) beside it; then, in
bf16, each lever toggled alone against the project as it is, interleaved, as a time ratio:

  prefix-with-grad   the blocks below the first adapter record autograd state (ours: no_grad)
  torch-attention    torch's nn.MultiheadAttention path (ours: packed projection + SDPA)
  fused-adamw        AdamW(fused=True) (ours: the foreach default)
  compile            torch.compile of the step's model work
  cuda-graphs        torch.compile(mode="reduce-overhead"), which replays CUDA graphs
  host-sync          reading the step's statistics every step (ours: once per epoch)

FLOPs are counted by torch's FlopCounterMode over one step (forward and the partial backward);
utilisation divides the achieved rate by the device's dense peak (--peak-tflops, known for
A100/H100/H200). Finally the largest batch that fits (doubling until out of memory).

    python benchmarks/gpu_throughput.py --device cuda [--batch 32] [--reps 10]
    python benchmarks/gpu_throughput.py --device cpu --model msta-tiny --batch 4 --reps 2   # a smoke run
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode
from train_step import (
    Workload,
    add_common_args,
    apply_threads,
    build_msta,
    interleaved_medians,
    make_workload,
    mib,
)

from msta.method.adapters import FrozenBlock, text_transformer, vision_transformer
from msta.method.attention import PackedSelfAttention
from msta.method.backbone import load_backbone
from msta.method.model import VideoCLIP, full_finetune
from msta.method.runtime import resolve_device, seed_everything
from msta.train import Optimisation, Targets, Trainer

# Dense tensor-core peaks in TFLOP/s (bf16, and fp32 without TF32), from the vendors' data sheets.
PEAKS = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5)}
LEVERS = ("prefix-with-grad", "torch-attention", "fused-adamw", "compile", "cuda-graphs", "host-sync")


def trainer_for(model: VideoCLIP, wl: Workload, precision: str, alpha: float, device: torch.device) -> Trainer:
    recipe = Optimisation(epochs=10_000, warmup_epochs=0, batch_size=wl.labels.shape[0], precision=precision, alpha=alpha)
    targets = Targets(wl.class_names, wl.d_spatial, wl.d_temporal)
    return Trainer(model, recipe, targets, train_set=list(range(recipe.batch_size)), device=device)


def with_lever(trainer: Trainer, lever: str) -> Callable[[], object]:
    """`trainer` changed by one lever; returns the step to time (frames and labels bound later)."""
    model = trainer.model
    if lever == "prefix-with-grad":
        for tower in (vision_transformer, text_transformer):
            blocks = tower(model.backbone.model).resblocks  # type: ignore[union-attr]
            for i, block in enumerate(blocks):
                if isinstance(block, FrozenBlock):
                    blocks[i] = block.block
    elif lever == "torch-attention":
        for module in model.modules():
            if type(module) is PackedSelfAttention:
                module.__class__ = torch.nn.MultiheadAttention
    elif lever == "fused-adamw":
        trainer.optimizer = torch.optim.AdamW(model.parameter_groups(trainer.recipe.lr, 1.0), lr=trainer.recipe.lr,
                                              betas=(0.9, 0.98), eps=1e-8, weight_decay=trainer.recipe.weight_decay,
                                              fused=True)
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
    elif lever == "compile":
        trainer.step_module = torch.compile(trainer.step_module)  # type: ignore[assignment]
    elif lever == "cuda-graphs":
        trainer.step_module = torch.compile(trainer.step_module, mode="reduce-overhead")  # type: ignore[assignment]
    return trainer.step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, reps=10)
    parser.set_defaults(model="ViT-B-16", batch=32, dim=None)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak for MFU "
                        "(default: known for A100/H100/H200)")
    parser.add_argument("--levers", default=",".join(LEVERS), help="comma-separated subset of: " + ", ".join(LEVERS))
    parser.add_argument("--max-batch", type=int, default=1024, help="stop the largest-batch search here")
    args = parser.parse_args()
    apply_threads(args)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peaks = next((p for key, p in PEAKS.items() if key in name), None)
    precisions = ("fp32", "bf16") if device.type == "cuda" else ("fp32",)
    print(f"{args.model} (random weights) on {name}; batch {args.batch} x {args.frames} frames, {args.classes} "
          f"classes; medians of {args.reps} interleaved steps")

    msta = build_msta(args, device)
    wl = make_workload(msta.backbone, args, device, encode_descriptions=False)
    print(f"MSTA r={msta.cfg.dim}, layers {msta.cfg.layers[0]}-{msta.cfg.layers[1]}")
    for precision in precisions:
        trainer = trainer_for(msta, wl, precision, 1.0, device)
        step = lambda t=trainer: t.step(wl.frames, wl.labels)  # noqa: E731
        step()
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = interleaved_medians({"step": step}, args.reps, device)["step"]
        peak = mib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else "n/a on a CPU"
        tflops = flops / seconds / 1e12
        limit = args.peak_tflops or (peaks and peaks[precision == "fp32"])
        mfu = f", MFU {tflops / limit:.1%} of {limit:g}" if limit else ""
        print(f"  {precision}: {args.batch / seconds:8.1f} clips/s, {seconds * 1e3:7.1f} ms/step, "
              f"{flops / args.batch / 1e9:.3g} GFLOP/clip, {tflops:.1f} TFLOP/s{mfu}, peak {peak}")

    seed_everything(0)
    baseline = full_finetune(load_backbone(args.model, None, device=device)).to(device).train()
    for precision in precisions:
        trainer = trainer_for(baseline, wl, precision, 0.0, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = interleaved_medians({"step": lambda t=trainer: t.step(wl.frames, wl.labels)}, args.reps, device)
        peak = mib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else "n/a on a CPU"
        print(f"  full fine-tuning {precision}: {args.batch / seconds['step']:8.1f} clips/s, peak {peak}")
    del baseline

    precision = precisions[-1]
    levers = [lv for lv in args.levers.split(",") if lv and (device.type == "cuda" or lv not in ("fused-adamw",
                                                                                               "cuda-graphs"))]
    steps: dict[str, Callable[[], object]] = {}
    for lever in ("as-is", *levers):
        model = build_msta(args, device)
        trainer = trainer_for(model, wl, precision, 1.0, device)
        step = with_lever(trainer, lever)
        if lever == "host-sync":
            steps[lever] = lambda s=step: s(wl.frames, wl.labels).tolist()
        else:
            steps[lever] = lambda s=step: s(wl.frames, wl.labels)
    times = interleaved_medians(steps, args.reps, device, warmup=3)  # compiled variants compile in warm-up
    print(f"levers ({precision}), step time / as-is (below 1: the lever pays):")
    for lever in levers:
        print(f"  {lever:<18} {times[lever] / times['as-is']:.3f}")

    if device.type == "cuda":
        batch, fits = args.batch, args.batch
        while batch * 2 <= args.max_batch:
            batch *= 2
            rate = clips_per_second(msta, args, batch, precision, device)
            if rate is None:
                break
            fits = batch
            print(f"  batch {batch}: {rate:8.1f} clips/s ({precision})")
        print(f"largest batch that fits ({precision}): {fits}")


def clips_per_second(model: VideoCLIP, args: argparse.Namespace, batch: int, precision: str,
                     device: torch.device) -> float | None:
    """Training clips/s at `batch`, or None when it does not fit (its tensors are freed on return)."""
    try:
        wl = make_workload(model.backbone, argparse.Namespace(**{**vars(args), "batch": batch}), device,
                           encode_descriptions=False)
        trainer = trainer_for(model, wl, precision, 1.0, device)
        return batch / interleaved_medians({"s": lambda: trainer.step(wl.frames, wl.labels)}, 3, device)["s"]
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        torch.cuda.empty_cache()

if __name__ == "__main__":
    main()
