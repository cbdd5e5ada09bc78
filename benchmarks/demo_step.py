"""Where the demo's time goes, and how far below it a CPU could go.

The demo (`msta-pipe demo`) spends ~90 % of its wall time in its five training runs (a stage
profile: `msta-pipe sql "select stage, sum(seconds) from runs group by 1"`). This times the demo's
own training step (msta/train.py's `Trainer.step`, the demo's model, adapters and batch) and counts
its floating-point operations with torch's FlopCounterMode; beside it, in the same run, the rate
this machine's BLAS reaches on the step's own dominant matrix product. Their ratio says how much
faster the step could get from better kernels alone, and the demo's step count turns both into
seconds: the floor for training that any change short of changing the experiment meets. The step
is also timed, interleaved, with torch's own nn.MultiheadAttention path in place of the packed
self-attention (msta/method/attention.py), the one lever that paid on this CPU.

    python benchmarks/demo_step.py [--reps 10] [--threads N]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from gpu_throughput import with_lever
from torch.utils.flop_counter import FlopCounterMode
from train_step import interleaved_medians

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msta.method.adapters import AdapterConfig, parse_layers  # noqa: E402
from msta.method.backbone import load_backbone  # noqa: E402
from msta.method.model import MSTA  # noqa: E402
from msta.train import Optimisation, Targets, Trainer  # noqa: E402
from msta.world.generate import B2N_SHOTS, BASE_CLASSES, CLASSES  # noqa: E402
from pipeline.commands.demo import BACKBONE, PRETRAINED, DemoRecipe  # noqa: E402


def demo_steps(recipe: DemoRecipe) -> int:
    """Optimiser steps of one demo: three few-shot variants, two base-to-novel ones."""
    few_shot = len(CLASSES) * recipe.shots // recipe.batch_size * recipe.epochs
    b2n = len(BASE_CLASSES) * B2N_SHOTS // recipe.batch_size * recipe.b2n_epochs
    return 3 * few_shot + 2 * b2n


def demo_trainer(recipe: DemoRecipe, names: list[str], packed: bool) -> Trainer:
    """The demo's model and optimiser; `packed=False` puts torch's nn.MultiheadAttention back."""
    torch.manual_seed(0)
    backbone = load_backbone(BACKBONE, PRETRAINED, device=torch.device("cpu"))
    model = MSTA(backbone, AdapterConfig(dim=recipe.dim, layers=parse_layers(recipe.layers), scale=recipe.scale))
    d_s, d_t = (torch.nn.functional.normalize(torch.randn(len(names), backbone.embed_dim), dim=-1) for _ in range(2))
    trainer = Trainer(model.train(), Optimisation(epochs=recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size,
                                            temporal_lr_mult=recipe.temporal_lr_mult),
                      Targets(names, d_s, d_t), train_set=list(range(recipe.batch_size)))
    if not packed:
        with_lever(trainer, "torch-attention")
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = DemoRecipe()
    names = list(CLASSES)
    trainers = {packed: demo_trainer(recipe, names, packed) for packed in (True, False)}
    backbone = trainers[True].model.backbone  # type: ignore[union-attr]
    size = backbone.image_size
    frames = torch.randn(recipe.batch_size, 8, 3, size, size)
    labels = torch.randint(0, len(names), (recipe.batch_size,))
    steps_of = {name: (lambda t=trainers[packed]: t.step(frames, labels))
                for name, packed in (("packed", True), ("torch", False))}
    with FlopCounterMode(display=False) as counter:
        steps_of["packed"]()
    flops = counter.get_total_flops()
    # interleaved, so that a noisy neighbour slows both alike
    times = interleaved_medians(steps_of, args.reps, torch.device("cpu"), warmup=3)
    seconds, unpacked = times["packed"], times["torch"]

    # The step's largest products: the MLP of every vision block over B*T*(tokens) rows.
    grid = backbone.model.visual.grid_size
    rows = recipe.batch_size * 8 * (grid[0] * grid[1] + 1)
    width = backbone.vision_width
    a, w_up, w_down = torch.randn(rows, width), torch.randn(width, 4 * width), torch.randn(4 * width, width)
    mm = lambda: a @ w_up @ w_down  # noqa: E731
    mm_seconds = interleaved_medians({"mm": mm}, args.reps * 5, torch.device("cpu"))["mm"]
    mm_rate = 2 * 2 * rows * width * 4 * width / mm_seconds

    steps = demo_steps(recipe)
    print(f"demo step ({BACKBONE}, batch {recipe.batch_size} x 8 frames at {size} px, adapters r={recipe.dim} "
          f"layers {recipe.layers}; {torch.get_num_threads()} threads; medians of {args.reps})")
    print(f"  Trainer.step        : {seconds * 1e3:7.1f} ms, {flops / 1e9:.2f} GFLOP (forward + backward), "
          f"{flops / seconds / 1e9:6.1f} GFLOP/s")
    print(f"  with torch's own nn.MultiheadAttention path instead of the packed one: {unpacked * 1e3:.1f} ms; "
          f"packed / torch = {seconds / unpacked:.3f}")
    print(f"  BLAS on the MLP's   : [{rows}x{width}] @ [{width}x{4 * width}] @ [{4 * width}x{width}]: "
          f"{mm_rate / 1e9:6.1f} GFLOP/s")
    print(f"  step rate / BLAS rate = {flops / seconds / mm_rate:.2f}: better kernels alone could make the step "
          f"at most {mm_rate / (flops / seconds):.2f}x faster")
    print(f"  the demo's {steps} steps: {steps * seconds:.0f} s at this step, {steps * flops / mm_rate:.0f} s "
          f"at the BLAS rate (its floor without changing the experiment)")


if __name__ == "__main__":
    main()
