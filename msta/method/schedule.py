"""The learning-rate schedule of the authors' runs, step by step.

ViFi-CLIP's training code (which MSTA's logs come from) uses timm's CosineLRScheduler, stepped
once per optimiser step with `t_in_epochs=False`:

    lr(t) = lr0 * t / W                                          t < W   (warm-up from 0)
    lr(t) = lr_min + (lr0 - lr_min) * (1 + cos(pi * t / T)) / 2  W <= t < T
    lr(t) = lr_min                                               t >= T

with T all steps of the run (the cosine spans the warm-up too: it does not restart after it) and
lr_min = lr0 / 100. Their loop calls `step_update(t)` after optimiser step t and logs the rate it
just set, so the rate logged at step t is lr(t) and optimiser step t runs with lr(t - 1) (step 0
with the scheduler's initial lr(0) = 0). `applied_factor` reproduces that one-step lag, so a run
here sees the same rates the authors' runs did.
"""
from __future__ import annotations

import math
from collections.abc import Callable


def cosine_lr(step: int, base_lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.01) -> float:
    """lr(step) as timm's CosineLRScheduler gives it (and the authors' logs print it)."""
    min_lr = base_lr * min_lr_ratio
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * step / total_steps))


def applied_factor(total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.01) -> Callable[[int], float]:
    """For torch's LambdaLR: the multiple of the base rate that optimiser step `step` runs with."""
    def factor(step: int) -> float:
        return cosine_lr(max(step - 1, 0), 1.0, total_steps, warmup_steps, min_lr_ratio)
    return factor
