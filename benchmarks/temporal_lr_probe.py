"""Does the temporal branch leave the order-invariant plateau, and how soon? (CPU, minutes)

Trains MSTA on the synthetic world (rendered in memory, TSN sampling, no other augmentation)
once per --temporal-lr-mult value, same seed and data, and prints side by side: mean train
cross-entropy, test top-1 on all classes and on the reversal-pair classes, and the largest
temporal-filter weight, at four points of training. Accuracy counts over the trained classes.
    python benchmarks/temporal_lr_probe.py --classes 0,1 --epochs 100 --mults 1,30
    python benchmarks/temporal_lr_probe.py --shots 32 --epochs 12 --scale 0.3 --lr 6e-3 --mults 1,30
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from world_recipe_sweep import description_means, to_input, tsn, world_tensors

from msta.method.adapters import AdapterConfig, parse_layers
from msta.method.backbone import load_backbone
from msta.method.losses import msta_loss
from msta.method.model import MSTA
from msta.world.generate import CLASSES, REVERSAL_PAIRS


def train(args: argparse.Namespace, mult: float, data: dict[str, np.ndarray],
          desc: dict[str, torch.Tensor]) -> list[tuple[int, float, float, float, float]]:
    torch.manual_seed(args.seed)
    bb = load_backbone("msta-world", "synthetic-world", device="cpu")  # adapters attach to a fresh copy
    classes = data["classes"]
    model = MSTA(bb, AdapterConfig(dim=args.dim, layers=parse_layers(args.layers), scale=args.scale,
                                   temporal_branch=args.branch))
    opt = torch.optim.AdamW(model.parameter_groups(args.lr, mult), weight_decay=1e-3)
    steps = args.epochs * math.ceil(len(data["ytr"]) / args.batch)
    warm = max(1, steps // 20)  # then cosine, as the trainer
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    mean, std = torch.tensor(bb.mean).view(1, 1, 3, 1, 1), torch.tensor(bb.std).view(1, 1, 3, 1, 1)
    names = [CLASSES[c] for c in classes]
    ytr, yte = torch.from_numpy(data["ytr"]), torch.from_numpy(data["yte"])
    in_pairs = torch.isin(torch.tensor(classes)[yte], torch.tensor([c for p in REVERSAL_PAIRS for c in p]))
    d_s, d_t = desc["spatial"][classes], desc["temporal"][classes]
    temporal = model.adapters.temporal_parameters()
    rng = np.random.default_rng(args.seed)
    cpu, log, ces = torch.device("cpu"), [], []
    for epoch in range(args.epochs):
        model.train()
        order, idx = rng.permutation(len(ytr)), tsn(len(ytr), 16, args.frames, rng, test=False)
        for s in range(0, len(order), args.batch):
            b = order[s:s + args.batch]
            w = model.encode_classes(names)
            logits = model.logits(model.encode_video(to_input(data["xtr"][b[:, None], idx[b]], mean, std, cpu)), w)
            loss, ce, _ = msta_loss(logits, ytr[b], w, d_s, d_t, args.alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            ces.append(ce.item())
        if (epoch + 1) % max(1, args.epochs // 4) == 0 or epoch + 1 == args.epochs:
            model.eval()
            ti = tsn(len(yte), 16, args.frames, rng, test=True)
            with torch.no_grad():
                w = model.encode_classes(names)
                pred = torch.cat([model.logits(model.encode_video(to_input(
                    data["xte"][np.arange(s, min(s + 32, len(yte)))[:, None], ti[s:s + 32]], mean, std, cpu)), w)
                    .argmax(-1) for s in range(0, len(yte), 32)])
            top = max(p.detach().abs().max().item() for p in temporal)
            log.append((epoch + 1, float(np.mean(ces)), (pred == yte).float().mean().item(),
                        (pred[in_pairs] == yte[in_pairs]).float().mean().item(), top))
            ces = []
    return log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mults", default="1,30", help="comma-separated --temporal-lr-mult values to compare")
    ap.add_argument("--classes", default=",".join(map(str, range(len(CLASSES)))), help="class ids (default: all 12)")
    ap.add_argument("--shots", type=int, default=16, help="training clips per class")
    ap.add_argument("--test", type=int, default=16, help="test clips per class")
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--scale", type=float, default=0.1, help="adapter scale lambda")
    ap.add_argument("--layers", default="1-4")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--branch", default="paper", help="paper or bottleneck")
    ap.add_argument("--alpha", type=float, default=1.0, help="L_CC weight")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    classes = [int(c) for c in args.classes.split(",")]
    xtr, ytr = world_tensors(args.shots, "train", 0, classes)
    xte, yte = world_tensors(args.test, "test", 0, classes)
    remap = {c: i for i, c in enumerate(classes)}
    data = {"classes": classes, "xtr": xtr, "xte": xte,
            "ytr": np.array([remap[c] for c in ytr]), "yte": np.array([remap[c] for c in yte])}
    desc = description_means(load_backbone("msta-world", "synthetic-world", device="cpu"), torch.device("cpu"))
    print(f"{len(classes)} classes, {args.shots} clips each, {args.epochs} epochs of batch {args.batch}, lr {args.lr}, "
          f"lambda {args.scale}, layers {args.layers}, branch {args.branch}, alpha {args.alpha}")
    print("| temporal lr mult | epoch | train CE | test all | test pairs | max abs temporal weight |")
    print("|---|---|---|---|---|---|")
    for mult in (float(m) for m in args.mults.split(",")):
        t0 = time.perf_counter()
        for epoch, ce, acc, pairs, top in train(args, mult, data, desc):
            print(f"| {mult:g} | {epoch} | {ce:.3f} | {100 * acc:.1f} | {100 * pairs:.1f} | {top:.2f} |", flush=True)
        print(f"| {mult:g} | ({time.perf_counter() - t0:.0f} s) | | | | |", flush=True)


if __name__ == "__main__":
    main()
