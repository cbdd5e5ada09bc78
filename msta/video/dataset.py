"""Dataset and loader over cached clips (files written by `msta.video.clipstore.save_clip`).

Every random choice (which stored sampling, every augmentation parameter, the order of the
epoch) is a function of (seed, epoch, index) alone: an item comes out the same whatever the
number of workers, whichever rank loads it, and wherever a killed run is resumed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from msta.video import augment
from msta.video.clipstore import clip_shape, load_clip
from msta.video.decode import train_indices
from msta.video.transforms import CLIP_MEAN, CLIP_STD, multi_views, train_transform

MODES = ("train", "test")


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from small integers (seed, epoch, index)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> np.uint64(1))


class ClipDataset(Dataset):
    """(path of a cached clip, label) items.

    train: one of the S stored samplings, or (a stored frame pool, S = 1, whose length is not T)
           T frames drawn TSN-style from the pool afresh every epoch; augmented ->
           (float (T, 3, size, size), label);
    test: every stored clip x `crops` spatial crops -> (float (V, T, 3, size, size), label),
    V = S * crops.
    """

    def __init__(
        self,
        items: Sequence[tuple[str, int]],
        mode: str,
        size: int,
        seed: int = 0,
        hflip: float = augment.HFLIP,
        crops: int = 3,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        color_jitter: float = augment.COLOR_JITTER,
        grayscale: float = augment.GRAYSCALE,
        frames: int | None = None,
        jitter_per_frame: bool = False,
        digests: Sequence[str | None] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.items = list(items)
        # the registered sha256 of each clip, checked where the loader reads it (ClipAltered)
        self.digests = list(digests) if digests is not None else [None] * len(self.items)
        self.mode, self.size, self.seed = mode, size, seed
        self.hflip, self.crops = hflip, crops
        self.color_jitter, self.grayscale = color_jitter, grayscale
        self.mean, self.std = tuple(mean), tuple(std)
        self.frames = frames  # T; needed only to draw from frame pools
        self.jitter_per_frame = jitter_per_frame
        # In shared memory: a loader's persistent workers see the epoch the training process sets.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        digest = self.digests[i]
        if self.mode == "test":
            return multi_views(load_clip(path, sha256=digest), self.size, self.crops, self.mean, self.std), label
        epoch = self.epoch
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, i))
        stored, length = clip_shape(path)[:2]
        if self.frames is not None and length != self.frames:  # a frame pool: new TSN offsets
            if stored != 1:
                raise ValueError(f"{path}: {stored} clips of {length} frames, neither T={self.frames} nor one pool")
            rng = np.random.default_rng(derive_seed(self.seed, epoch, i, 1))
            clip = load_clip(path, 0, train_indices(length, self.frames, rng), sha256=digest)  # only those T decoded
        else:
            pick = int(torch.randint(stored, (), generator=generator))
            clip = load_clip(path, pick, sha256=digest)  # only the picked sampling is decoded
        return train_transform(clip, self.size, generator, self.hflip, color_jitter_p=self.color_jitter,
                               grayscale_p=self.grayscale, mean=self.mean, std=self.std,
                               jitter_per_frame=self.jitter_per_frame), label


class ShardSampler(Sampler[int]):
    """This rank's share of one epoch's order.

    The order is a permutation drawn from (seed, epoch) (or 0..n-1 unshuffled), cut into
    world_size interleaved shards of equal length, so every rank runs the same number of steps
    (DDP deadlocks otherwise). To make the lengths equal the order is padded with its own first
    items (each then seen twice in the epoch, as torch's DistributedSampler does) or, with
    drop_last, its tail is dropped.
    """

    def __init__(
        self, n: int, shuffle: bool, seed: int, epoch: int, rank: int = 0, world_size: int = 1, drop_last: bool = False
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.limit: int | None = None  # keep only the first `limit` items of every epoch's shard
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """This rank's order of `epoch`. A loader's sampler lives in the training process, so this
        reorders a loader whose workers persist."""
        n, world_size = self.n, self.world_size
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch)))
        else:
            order = torch.arange(n)
        if self.drop_last:
            total = n - n % world_size
            order = order[:total]
        else:
            total = math.ceil(n / world_size) * world_size
            if n:  # repeat() also covers world_size > n
                order = order.repeat(math.ceil(total / n))[:total]
        self.indices: list[int] = order[self.rank:total:world_size].tolist()[:self.limit]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def epoch_steps(n: int, batch_size: int, world_size: int = 1) -> int:
    """Optimiser steps per epoch as the authors' DDP runs take them: the epoch's order is padded to
    a multiple of the process count with its own first items (torch's DistributedSampler), then
    each process drops its last partial batch. 8 processes x 4 clips: UCF-101 K=2 (202 clips)
    gives 6 steps and SSv2 K=2 (348) gives 11; one process with batch 32 gives 6 and 10."""
    return math.ceil(n / world_size) // (batch_size // world_size)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    steps: int | None = None,
    persistent: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over this rank's shard of epoch `epoch`; batches (B, T, 3, H, W) in train
    mode, (B, V, T, 3, H, W) in test mode, labels (B,) int64. `steps` cuts every rank's shard to
    that many full batches (see `epoch_steps`). `persistent` keeps the worker processes between
    epochs (move the loader on with `set_loader_epoch`); `pin_memory` for copies to a GPU that
    overlap the step."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    sampler = ShardSampler(len(dataset), shuffle, seed, epoch, rank, world_size, drop_last)  # type: ignore[arg-type]
    if steps is not None:
        if len(sampler.indices) < steps * batch_size:
            raise ValueError(f"cannot cut a shard of {len(sampler.indices)} items to {steps} batches of {batch_size}")
        sampler.limit = steps * batch_size
        sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        persistent_workers=persistent and workers > 0,
        pin_memory=pin_memory,
        # Worker seeds are drawn from this generator, not from torch's global RNG, so building a
        # loader does not advance the training process's random state.
        generator=torch.Generator().manual_seed(derive_seed(seed, epoch)),
    )


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Move a loader from `make_loader` on to `epoch`, between two passes over it: its order, and
    its dataset's augmentations (the epoch is in shared memory, so persistent workers see it)."""
    loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
