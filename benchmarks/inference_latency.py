"""Inference latency of the adapted model vs the frozen CLIP on one 8-frame clip (goal <= 1.10x).

Both classify one clip against precomputed class embeddings (at test time only w_c is needed,
computed once per label set), so the latency is the video encoder's plus one small matrix
product. The frozen model is a separate, unwrapped open_clip model with the same weights, so
the wrappers' own overhead is part of what is measured. Interleaved repetitions, medians.

    python benchmarks/inference_latency.py [--model msta-tiny|ViT-B-16] [--reps 30]
"""
from __future__ import annotations

import argparse

import torch
from train_step import add_common_args, apply_threads, build_msta, describe_setup, interleaved_medians

from msta.method.backbone import load_backbone
from msta.method.model import VideoCLIP
from msta.method.runtime import autocast, resolve_device, seed_everything


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, reps=30)
    args = parser.parse_args()
    apply_threads(args)
    device = resolve_device(args.device)
    adapted = build_msta(args, device).eval()
    seed_everything(0)  # build_msta seeds the same way: identical backbone weights
    frozen = VideoCLIP(load_backbone(args.model, None, device=device)).eval()
    names = [f"class {i}" for i in range(args.classes)]
    clip = torch.randn(1, args.frames, 3, adapted.backbone.image_size, adapted.backbone.image_size, device=device)

    def classify(model: VideoCLIP, class_emb: torch.Tensor) -> None:
        with torch.inference_mode(), autocast(device, args.precision):
            model.logits(model.encode_video(clip), class_emb).argmax(dim=-1)

    with torch.inference_mode(), autocast(device, args.precision):
        adapted_classes, frozen_classes = adapted.encode_classes(names), frozen.encode_classes(names)
    med = interleaved_medians({
        "frozen": lambda: classify(frozen, frozen_classes),
        "adapted": lambda: classify(adapted, adapted_classes),
    }, args.reps, device, warmup=3)
    print(describe_setup(args, device).replace(f"batch {args.batch}", "1 clip"))
    cfg = adapted.cfg
    print(f"adapters r={cfg.dim}, layers {cfg.layers[0]}-{cfg.layers[1]}; {args.reps} interleaved repetitions, medians")
    print(f"  frozen CLIP      {med['frozen'] * 1000:9.2f} ms/clip")
    print(f"  MSTA (adapted)   {med['adapted'] * 1000:9.2f} ms/clip")
    ratio = med["adapted"] / med["frozen"]
    print(f"  ratio adapted/frozen = {ratio:.3f}  (goal <= 1.10: {'met' if ratio <= 1.10 else 'NOT met'})")


if __name__ == "__main__":
    main()
