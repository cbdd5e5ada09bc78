"""MSTA on ViCLIP-B/16 (joint space-time attention) vs on ViT-B/16 (frames batched): step time, memory.

The same MSTA training step (r=128, layers 8-12, CE + L_CC from cached description means, AdamW)
on random weights: ViCLIP-B/16 attends over one sequence of 1 + 196 x T tokens per clip, the image
CLIP over T sequences of 197 tokens. Each backbone runs in fresh processes (peak memory is per
process: CUDA max_memory_allocated, or the CPU resident set's high-water mark), interleaved over
--rounds, medians reported. One more step per process runs under torch.profiler to list the attention
operators that ran: on ViCLIP every call, forward and backward, is aten::scaled_dot_product_attention
(open_clip's blocks below the adapters take nn.MultiheadAttention's fused no-grad path instead).

    python benchmarks/viclip_step.py [--device auto] [--precision bf16] [--batch 4] [--rounds 3] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
from train_step import (
    add_common_args,
    apply_threads,
    build_msta,
    common_argv,
    describe_setup,
    make_step,
    make_workload,
    measure_step,
    mib,
    run_child,
)

from msta.method.runtime import resolve_device

BACKBONES = ("ViCLIP-B-16", "ViT-B-16")


def attention_ops(step: object) -> dict[str, int]:
    """Attention-related operator calls in one profiled step, by name."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step()  # type: ignore[operator]
    return {e.key: e.count for e in prof.key_averages()
            if "attention" in e.key.lower() or "multi_head" in e.key.lower()}


def child(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    args.model = args.child
    model = build_msta(args, device)
    wl = make_workload(model.backbone, args, device, encode_descriptions=False)
    step = make_step(model, wl, "cached", device, args.precision, args.descriptions)
    result: dict[str, object] = dict(measure_step(step, device, args.reps))
    result["ops"] = attention_ops(step)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, reps=3)
    parser.set_defaults(classes=51, batch=4)  # HMDB-51's label set, the paper's 4 clips per GPU
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per backbone, interleaved")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure one backbone
    args = parser.parse_args()
    apply_threads(args)
    if args.child:
        return child(args)

    device = resolve_device(args.device)
    args.model = " vs ".join(BACKBONES)
    print(describe_setup(args, device))
    print(f"MSTA r=128, layers 8-12; {args.rounds} interleaved rounds of a fresh process per backbone, "
          f"{args.reps} timed steps each; medians")
    results: dict[str, list[dict]] = {k: [] for k in BACKBONES}
    for r in range(args.rounds):
        for name in BACKBONES[r % 2:] + BACKBONES[:r % 2]:
            argv = [*common_argv(args), "--reps", str(args.reps), "--child", name]
            results[name].append(run_child(__file__, argv))
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("peak_bytes", "step_s")} for k, v in results.items()}
    for name in BACKBONES:
        print(f"  {name:>12}: step {med[name]['step_s'] * 1000:10.1f} ms   peak memory of a step "
              f"{mib(med[name]['peak_bytes'])}")
        print(f"  {'':>12}  attention ops in one step: {results[name][-1]['ops']}")
    a, b = med["ViCLIP-B-16"], med["ViT-B-16"]
    print(f"  ratio ViCLIP-B-16 / ViT-B-16: time {a['step_s'] / b['step_s']:.2f}x   "
          f"memory {a['peak_bytes'] / b['peak_bytes']:.2f}x")


if __name__ == "__main__":
    main()
