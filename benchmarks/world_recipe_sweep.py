"""Which adapter recipe learns the synthetic world's motion classes, and how fast (a GPU sweep).

Renders the world in memory (no files), trains MSTA variants on K clips per class with TSN
sampling (no other augmentation) and prints train/test top-1 on all classes and on the
reversal pairs every few epochs. Used to choose the demo's recipe; runs on CPU or CUDA.
    python benchmarks/world_recipe_sweep.py --device cuda --epochs 40
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import torch

from msta.method.adapters import AdapterConfig
from msta.method.backbone import Backbone, load_backbone
from msta.method.losses import class_means, msta_loss
from msta.method.model import MSTA
from msta.world.generate import CLASSES, REVERSAL_PAIRS, render_video, shipped_descriptions


def world_tensors(per_class: int, split: str, seed: int, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    clips, labels = [], []
    for c in classes:
        for i in range(per_class):
            rng = np.random.default_rng([seed, 0 if split == "train" else 1, c, i])
            clips.append(render_video(c, rng, frames=16, size=64))
            labels.append(c)
    return np.stack(clips), np.array(labels)


def to_input(frames: np.ndarray, mean: torch.Tensor, std: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(frames).to(device).permute(0, 1, 4, 2, 3).float() / 255
    return (x - mean) / std


def tsn(n: int, frames: int, t: int, rng: np.random.Generator, test: bool) -> np.ndarray:
    edges = np.arange(t + 1) * frames // t
    if test:
        return np.tile((edges[:-1] + edges[1:]) // 2, (n, 1))
    return edges[:-1] + rng.integers(0, edges[1:] - edges[:-1], size=(n, t))


def description_means(bb: Backbone, device: torch.device) -> dict[str, torch.Tensor]:
    """D_c^s and D_c^t of every world class from the shipped descriptions, by the frozen text tower."""
    out = {}
    for kind in ("spatial", "temporal"):
        by_id = shipped_descriptions(kind)
        texts = [t for c in range(len(CLASSES)) for t in by_id[c]]
        emb = bb.encode_text_frozen(texts, device=device).view(len(CLASSES), -1, bb.embed_dim)
        out[kind] = class_means(emb)
    return out


def run(cfg: dict, data: dict, bb_args: tuple[str, str], device: torch.device, epochs: int, batch: int,
        descriptions: dict[str, torch.Tensor] | None, t_frames: int = 8) -> list[dict]:
    torch.manual_seed(0)
    bb = load_backbone(*bb_args, device=device)
    mean = torch.tensor(bb.mean, device=device).view(1, 1, 3, 1, 1)
    std = torch.tensor(bb.std, device=device).view(1, 1, 3, 1, 1)
    model = MSTA(bb, AdapterConfig(dim=cfg["dim"], layers=tuple(cfg["layers"]), scale=cfg["scale"],
                                   temporal=cfg["temporal"], temporal_branch=cfg["branch"])).to(device)
    opt = torch.optim.AdamW(model.parameter_groups(cfg["lr"], cfg["mult"]), weight_decay=1e-3)
    steps = epochs * int(np.ceil(len(data["ytr"]) / batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=steps,
                                                pct_start=0.1)
    names = list(CLASSES)
    rng = np.random.default_rng(0)
    ytr = torch.from_numpy(data["ytr"]).to(device)
    log = []
    d_s = d_t = None
    if descriptions is not None and cfg["alpha"] > 0:
        d_s, d_t = descriptions["spatial"].to(device), descriptions["temporal"].to(device)
    pairs = torch.tensor([c for p in REVERSAL_PAIRS for c in p], device=device)
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(ytr))
        idx = tsn(len(ytr), 16, t_frames, rng, test=False)
        for s in range(0, len(order), batch):
            b = order[s:s + batch]
            x = to_input(data["xtr"][b[:, None], idx[b]], mean, std, device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                w = model.encode_classes(names)
                logits = model.logits(model.encode_video(x), w)
                loss, ce, cc = msta_loss(logits, ytr[b], w, d_s, d_t, cfg["alpha"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % max(1, epochs // 6) == 0 or epoch + 1 == epochs:
            model.eval()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                w = model.encode_classes(names)
                ti = tsn(len(data["yte"]), 16, t_frames, rng, test=True)
                preds = []
                for s in range(0, len(data["yte"]), 64):
                    x = to_input(data["xte"][np.arange(s, min(s + 64, len(data["yte"])))[:, None], ti[s:s + 64]],
                                 mean, std, device)
                    preds.append(model.logits(model.encode_video(x), w).argmax(-1))
                pred = torch.cat(preds)
                yte = torch.from_numpy(data["yte"]).to(device)
                in_pairs = torch.isin(yte, pairs)
                log.append({"epoch": epoch + 1, "loss": round(loss.item(), 3),
                            "test_all": round((pred == yte).float().mean().item(), 3),
                            "test_pairs": round((pred[in_pairs] == yte[in_pairs]).float().mean().item(), 3)})
    return log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--grid", default="small", help='"small", "one", or a JSON object of lists, e.g. '
                    '\'{"branch": ["paper"], "scale": [0.1], "lr": [0.01], "layers": [[3, 4]]}\'')
    ap.add_argument("--frames", type=int, default=8, help="T frames per clip")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--classes", default=",".join(map(str, range(len(CLASSES)))),
                    help="comma-separated class ids to train and test on (default: all 12)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    classes = [int(c) for c in args.classes.split(",")]
    xtr, ytr = world_tensors(args.shots, "train", 0, classes)
    xte, yte = world_tensors(8, "test", 0, classes)
    data = {"xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte}
    descriptions = description_means(load_backbone("msta-world", "synthetic-world", device=device), device)
    grid = {"mult": [30.0, 1.0], "branch": ["paper", "bottleneck"], "scale": [0.05, 0.2], "lr": [3e-3, 1e-2],
            "layers": [(1, 4), (3, 4)], "alpha": [1.0], "temporal": [True], "dim": [64]}
    if args.grid == "one":
        grid = {k: v[:1] for k, v in grid.items()}
    elif args.grid != "small":
        grid.update(json.loads(args.grid))
    for values in itertools.product(*grid.values()):
        cfg = dict(zip(grid.keys(), values))
        t0 = time.time()
        log = run(cfg, data, ("msta-world", "synthetic-world"), device, args.epochs, args.batch, descriptions,
                  args.frames)
        print(json.dumps({**cfg, "seconds": round(time.time() - t0, 1), "log": log}), flush=True)


if __name__ == "__main__":
    main()
