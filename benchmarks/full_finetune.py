"""Training throughput and peak memory: MSTA adapters vs full fine-tuning of the same backbone.

MSTA trains its adapters with CE + L_CC (cached description embeddings); the baseline trains
every backbone parameter of a frame-mean CLIP with CE (the ViFi-CLIP recipe). Both use AdamW on
the same batches. Each variant runs in a fresh process (peak memory is per process), the
variants interleaved over --rounds; medians reported.

    python benchmarks/full_finetune.py [--model msta-tiny|ViT-B-16] [--rounds 3] [--reps 3]
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
    run_child,
)

from msta.method.backbone import load_backbone
from msta.method.model import full_finetune
from msta.method.runtime import resolve_device, seed_everything


def child(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    if args.child == "msta":
        model, mode = build_msta(args, device), "cached"
    else:
        seed_everything(0)
        model, mode = full_finetune(load_backbone(args.model, None, device=device)).train(), "ce"
    wl = make_workload(model.backbone, args, device, encode_descriptions=False)
    step = make_step(model, wl, mode, device, args.precision, args.descriptions)
    result = measure_step(step, device, args.reps)
    result["trainable"] = float(sum(p.numel() for p in model.trainable_parameters()))
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, reps=3)
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per variant, interleaved")
    parser.add_argument("--child", choices=["msta", "full"], help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    apply_threads(args)
    if args.child:
        return child(args)

    print(describe_setup(args, resolve_device(args.device)))
    print(f"{args.rounds} interleaved rounds of a fresh process per variant, {args.reps} timed steps each; medians")
    keys = ["msta", "full"]
    results: dict[str, list[dict[str, float]]] = {k: [] for k in keys}
    for r in range(args.rounds):
        for k in keys[r % 2:] + keys[:r % 2]:
            results[k].append(run_child(__file__, [*common_argv(args), "--reps", str(args.reps), "--child", k]))
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in results.items()}
    labels = {"msta": "MSTA adapters", "full": "full fine-tuning"}
    for k in keys:
        print(f"  {labels[k]:<17} {med[k]['trainable']:>13,.0f} trainable   "
              f"{args.batch / med[k]['step_s']:8.3g} clips/s   peak memory of a step {mib(med[k]['peak_bytes'])}")
    print(f"  ratio MSTA/full: throughput {med['full']['step_s'] / med['msta']['step_s']:.2f}x   "
          f"memory {med['msta']['peak_bytes'] / med['full']['peak_bytes']:.2f}x")


if __name__ == "__main__":
    main()
