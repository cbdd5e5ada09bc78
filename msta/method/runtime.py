"""Device, precision, distributed and seeding helpers for training and inference."""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    """'auto' -> cuda if available else cpu; otherwise 'cpu', 'cuda', 'cuda:1', ..."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ValueError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} asked for, but CUDA is not available on this machine")
    return device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[object]:
    """bf16/fp16 autocast on CUDA; fp32 (and anything on the CPU) runs without autocast."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a torchrun launch (RANK / WORLD_SIZE / LOCAL_RANK; absent = single process)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> DistributedContext:
        env = os.environ
        return cls(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); joins the process group only when launched with WORLD_SIZE > 1."""
    ctx = DistributedContext.from_env()
    if ctx.is_distributed and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(ctx.local_rank)
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return ctx.rank, ctx.world_size, ctx.local_rank


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank_device(spec: str) -> torch.device:
    """`resolve_device`, moved to this process's own GPU (LOCAL_RANK) under a torchrun launch."""
    device = resolve_device(spec)
    ctx = DistributedContext.from_env()
    return torch.device("cuda", ctx.local_rank) if device.type == "cuda" and ctx.is_distributed else device


def all_gathered(x: torch.Tensor, n: int, world: int, device: torch.device) -> torch.Tensor:
    """The rows of every rank's shard of an unshuffled `ShardSampler` order, back in item order:
    rank r held items r, r + world, ...; each shard has the same length (the order was padded
    with its own first items), so the shards interleave and the first n rows are items 0..n-1."""
    parts = [torch.empty_like(x, device=device) for _ in range(world)]
    dist.all_gather(parts, x.to(device))
    return torch.stack([p.cpu() for p in parts], dim=1).reshape(-1, *x.shape[1:])[:n]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels (slower); cuBLAS needs its workspace setting before the first matmul."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False  # autotuning picks kernels by timing, i.e. by chance
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
