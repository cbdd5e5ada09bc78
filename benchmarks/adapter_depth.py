"""Adapters in the last blocks only (the paper's 8-12) vs in every block (1-12): memory and time.

Blocks below the first adapter run without autograd (nothing below them trains), so a shallow
range should save activation memory and backward time. Each variant runs in a fresh process
(peak memory is per process: CUDA max_memory_allocated, or the CPU resident set's high-water
mark), the variants interleaved over --rounds, medians reported. The step is the real recipe:
CE + L_CC with cached description embeddings. For models of other depths the ranges scale.

    python benchmarks/adapter_depth.py [--model msta-tiny|ViT-B-16] [--rounds 3] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import statistics

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
    paper_layers,
    run_child,
)

from msta.method.adapters import parse_layers
from msta.method.backbone import load_backbone
from msta.method.runtime import resolve_device


def child(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    model = build_msta(args, device, layers=parse_layers(args.child))
    wl = make_workload(model.backbone, args, device, encode_descriptions=False)
    step = make_step(model, wl, "cached", device, args.precision, args.descriptions)
    print(json.dumps(measure_step(step, device, args.reps)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, reps=3)
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per variant, interleaved")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure one layer range
    args = parser.parse_args()
    apply_threads(args)
    if args.child:
        return child(args)

    depth = load_backbone(args.model, None, device="meta").vision_layers
    start, end = paper_layers(depth)
    variants = {"last": f"{start}-{end}", "all": f"1-{depth}"}
    print(describe_setup(args, resolve_device(args.device)))
    print(f"adapters at layers {variants['last']} vs {variants['all']}; {args.rounds} interleaved rounds "
          f"of a fresh process per variant, {args.reps} timed steps each; medians")
    results: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    keys = list(variants)
    for r in range(args.rounds):
        for k in keys[r % 2:] + keys[:r % 2]:
            results[k].append(run_child(__file__, [*common_argv(args), "--reps", str(args.reps),
                                                   "--child", variants[k]]))
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("peak_bytes", "step_s")} for k, v in results.items()}
    for k, layers in variants.items():
        print(f"  layers {layers:>6}: step {med[k]['step_s'] * 1000:10.1f} ms   peak memory of a step "
              f"{mib(med[k]['peak_bytes'])}")
    print(f"  ratio all/last: time {med['all']['step_s'] / med['last']['step_s']:.2f}x   "
          f"memory {med['all']['peak_bytes'] / med['last']['peak_bytes']:.2f}x")


if __name__ == "__main__":
    main()
