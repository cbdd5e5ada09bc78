"""The training loop of MSTA (and of the full fine-tuning baseline), top to bottom.

    for each epoch:
        for each batch of cached clips (augmented), in micro-batches:
            w   = adapted text tower on "a video of {class}." for all C classes
            v   = adapted vision tower on the B*T frames, mean over T
            L   = CE(exp(s) cos(v, w), y) + alpha * mean_c [2 - cos(w_c, D_s) - cos(w_c, D_t)]
            gradients summed over the micro-batches (and averaged over processes by DDP); AdamW; lr step
        held-out top-1 -> "best" epoch; after epochs 1, 6, 11, ... and the last: adapter snapshots;
        a checkpoint (optimiser, schedule, RNG) written atomically -> a killed run resumes here

Every random choice is a function of (seed, epoch, index), so a resumed run ends with the same
numbers as an uninterrupted one. The loop knows files, not the catalog: the caller hands it the
model, the datasets and the description means, and learns of each epoch through `on_epoch`.
The recipe is the authors' (msta/METHOD.md §3): AdamW betas (0.9, 0.98), cosine over all
steps with linear warm-up, each process dropping its last partial batch.
"""
from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from msta.fileio import atomic_write_bytes, safetensors_digest
from msta.inference import embed_views, view_scores
from msta.method.losses import msta_loss
from msta.method.model import MSTA, VideoCLIP
from msta.method.runtime import autocast
from msta.method.schedule import applied_factor
from msta.video.dataset import epoch_steps, make_loader, set_loader_epoch

SNAPSHOT_EVERY = 5  # the authors' SAVE_FREQ: they tested after epochs 1, 6, ..., 46 and the last


def snapshot_epochs(epochs: int) -> list[int]:
    """1-based epochs after which the authors evaluated (and a run keeps adapter snapshots)."""
    return sorted({e + 1 for e in range(0, epochs, SNAPSHOT_EVERY)} | {epochs})


class OptimisationError(ValueError):
    """A recipe that cannot run on this data (batch does not divide, too few clips)."""


@dataclass(frozen=True)
class Optimisation:
    """How to optimise: the flags of `train` that are not about data or model."""
    epochs: int = 50
    lr: float = 1e-3
    temporal_lr_mult: float = 1.0
    weight_decay: float = 1e-3
    warmup_epochs: int = 5
    min_lr_ratio: float = 0.01
    batch_size: int = 32          # the global batch: micro-batches x accumulation x processes
    micro_batch: int | None = None
    alpha: float = 1.0            # weight of L_CC; 0 trains with CE alone
    precision: str = "fp32"
    seed: int = 2048


@dataclass
class Targets:
    """What the loss compares against: the class names the text tower encodes every step and the
    frozen branch's per-class description means D_s, D_t (None when alpha = 0)."""
    class_names: list[str]
    d_spatial: torch.Tensor | None = None
    d_temporal: torch.Tensor | None = None


@dataclass
class Fit:
    """What a finished run leaves in its folder: the last weights, the best epoch, the history."""
    last: Path
    best: dict[str, Any] | None
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    def __init__(self, model: VideoCLIP, recipe: Optimisation, targets: Targets, train_set: Dataset,
                 heldout_set: Dataset | None = None, device: torch.device = torch.device("cpu"),
                 rank: int = 0, world: int = 1, workers: int = 0) -> None:
        self.model, self.recipe, self.device = model.to(device), recipe, device
        self.class_names = targets.class_names
        self.d_spatial = targets.d_spatial.to(device) if targets.d_spatial is not None else None
        self.d_temporal = targets.d_temporal.to(device) if targets.d_temporal is not None else None
        self.train_set, self.heldout_set = train_set, heldout_set
        self.rank, self.world, self.workers = rank, world, workers
        self._train_loader: DataLoader | None = None
        self._heldout_loader: DataLoader | None = None

        # Batch geometry: each process's share of the batch, accumulated over micro-batches.
        self.micro = recipe.micro_batch or recipe.batch_size // world
        if self.micro < 1 or recipe.batch_size % (self.micro * world):
            raise OptimisationError(f"--batch-size {recipe.batch_size} must be a multiple of --micro-batch ({self.micro}) "
                              f"x processes ({world})")
        self.accum = recipe.batch_size // (self.micro * world)
        n_clips = len(train_set)  # type: ignore[arg-type]
        self.steps_per_epoch = epoch_steps(n_clips, recipe.batch_size, world)
        if self.steps_per_epoch == 0:
            raise OptimisationError(f"{n_clips} training clips do not fill one batch of --batch-size "
                              f"{recipe.batch_size}: lower --batch-size or add videos")

        # ViFi-CLIP's optimiser, which the authors' runs use, and their per-step cosine schedule.
        groups = model.parameter_groups(recipe.lr, recipe.temporal_lr_mult)
        self.optimizer = torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay,
                                           betas=(0.9, 0.98), eps=1e-8)
        total = self.steps_per_epoch * recipe.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, applied_factor(total, self.steps_per_epoch * recipe.warmup_epochs, recipe.min_lr_ratio))

        self.step_module: torch.nn.Module = _StepModule(model, self.class_names)
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.step_module = DistributedDataParallel(
                self.step_module, device_ids=[device.index] if device.type == "cuda" else None)

    # -- one step ------------------------------------------------------------------------------
    def step(self, frames: torch.Tensor, labels: torch.Tensor, last_micro: bool = True) -> torch.Tensor:
        """Forward and backward of one micro-batch; the optimiser steps after the last micro-batch of
        a batch. Returns (loss, ce, cc) summed over the clips and the count correct, as one tensor on
        the device: reading it would wait for the device, so the caller reads once per epoch."""
        sync = (self.step_module.no_sync() if self.world > 1 and not last_micro  # type: ignore[operator]
                else contextlib.nullcontext())
        with sync:
            with autocast(self.device, self.recipe.precision):
                logits, class_emb = self.step_module(frames)
                loss, ce, cc = msta_loss(logits, labels, class_emb, self.d_spatial, self.d_temporal,
                                         self.recipe.alpha)
            (loss / self.accum).backward()
        if last_micro:
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        b = labels.shape[0]
        with torch.no_grad():
            return torch.stack([loss.double() * b, ce.double() * b,
                                (cc.double() if cc is not None else torch.zeros((), device=loss.device)) * b,
                                (logits.argmax(-1) == labels).sum().double()])

    # -- one epoch -----------------------------------------------------------------------------
    def train_epoch(self, epoch: int, on_step: Callable[[int], object] = lambda n: None) -> dict[str, float | None]:
        """One epoch; `on_step(1)` after every optimiser step (a progress bar's update: no host sync)."""
        self.model.train()
        if self._train_loader is None:  # one loader for the run: its workers start once, not every epoch
            self._train_loader = make_loader(
                self.train_set, self.micro, shuffle=True, seed=self.recipe.seed, epoch=epoch, workers=self.workers,
                rank=self.rank, world_size=self.world, steps=self.steps_per_epoch * self.accum, persistent=True,
                pin_memory=self.device.type == "cuda")
        loader = self._train_loader
        set_loader_epoch(loader, epoch)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        seen = 0
        self.optimizer.zero_grad(set_to_none=True)
        n_batches = len(loader)
        for i, (frames, labels) in enumerate(loader):
            frames, labels = frames.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            last_micro = (i + 1) % self.accum == 0 or i + 1 == n_batches
            sums += self.step(frames, labels, last_micro=last_micro)
            seen += labels.shape[0]
            if last_micro:
                on_step(1)
        totals = torch.cat([sums, torch.tensor([float(seen)], dtype=torch.float64, device=self.device)])
        loss, ce, cc, correct, n = _all_reduced(totals, self.world).tolist()
        n = max(n, 1.0)
        return {"loss": loss / n, "ce": ce / n, "cc": cc / n if self.recipe.alpha > 0 else None,
                "train_acc": correct / n}

    def accuracy(self, dataset: Dataset) -> float:
        """Top-1 on a held-out set (the views of each clip scored as the evaluate stage scores them);
        every process scores its shard."""
        self.model.eval()
        loader = self._heldout_loader
        if loader is None or loader.dataset is not dataset:
            loader = self._heldout_loader = make_loader(
                dataset, self.micro, shuffle=False, seed=0, epoch=0, workers=self.workers, rank=self.rank,
                world_size=self.world, persistent=True, pin_memory=self.device.type == "cuda")
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.no_grad(), autocast(self.device, self.recipe.precision):
            class_emb = self.model.encode_classes(self.class_names)
            for views, labels in loader:
                views, labels = views.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
                pred = view_scores(self.model, embed_views(self.model, views), class_emb).argmax(-1)
                totals += torch.stack([(pred == labels).sum().double(), torch.tensor(float(labels.shape[0]),
                                                                                     dtype=torch.float64,
                                                                                     device=self.device)])
        correct, seen = _all_reduced(totals, self.world).tolist()
        return correct / max(seen, 1.0)

    # -- the run -------------------------------------------------------------------------------
    def fit(self, run_dir: Path, identity: str, metadata: dict[str, str], resume: bool = True,
            on_epoch: Callable[[dict[str, Any], list[dict[str, Any]]], None] = lambda row, history: None,
            echo: Callable[[str], None] = print, progress: bool = True, desc: str = "train") -> Fit | None:
        """Train all epochs into `run_dir` (resuming from its checkpoint when it belongs to
        `identity`); `metadata` goes into every weights file. Rank 0 writes the files and calls
        `on_epoch(row, history)` after each epoch; other ranks return None."""
        from tqdm import tqdm

        epochs = self.recipe.epochs
        start, best, history = self._resume(run_dir, identity, echo) if resume else (0, None, [])
        if not resume:
            self._set_aside(run_dir / "checkpoint.pt", "a forced run trains from scratch", echo)
        if start > 0:
            echo(f"       resuming from the checkpoint of epoch {start} of {epochs}")
        # Steps, not epochs: a Kinetics epoch is thousands of steps, each one shown with its rate.
        bar = tqdm(total=epochs * self.steps_per_epoch, initial=start * self.steps_per_epoch, desc=desc, unit="step",
                   disable=self.rank != 0 or not progress)
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            bar.set_description(f"{desc} epoch {epoch + 1}/{epochs}")
            stats = self.train_epoch(epoch, bar.update)
            heldout = self.accuracy(self.heldout_set) if self.heldout_set is not None else None
            row = {"epoch": epoch + 1, "lr": self.scheduler.get_last_lr()[0], **stats, "heldout_acc": heldout,
                   "seconds": time.perf_counter() - t0}
            history.append(row)
            if heldout is not None and (best is None or heldout > best["acc"]):
                best = {"epoch": epoch + 1, "acc": heldout}
                if self.rank == 0:
                    self.save_weights(run_dir / "best.safetensors", {**metadata, "epoch": str(epoch + 1)})
                    best["digest"] = safetensors_digest(run_dir / "best.safetensors")
            if self.rank == 0:
                if isinstance(self.model, MSTA) and epoch + 1 in snapshot_epochs(epochs):
                    self.save_weights(run_dir / f"epoch_{epoch + 1}.safetensors", {**metadata, "epoch": str(epoch + 1)})
                self._checkpoint(run_dir / "checkpoint.pt", identity, epoch + 1, best, history)
                on_epoch(row, history)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['train_acc']:.2f}",
                            heldout="-" if heldout is None else f"{heldout:.2f}")
        bar.close()
        self._train_loader = self._heldout_loader = None  # their worker processes end with the run
        if self.rank != 0:
            return None
        last = run_dir / "last.safetensors"
        self.save_weights(last, {**metadata, "epoch": str(epochs)})
        return Fit(last, best, history)

    # -- files ---------------------------------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        """What trains: the adapters of MSTA, every CLIP weight of the full fine-tuning baseline."""
        state = self.model.adapter_state_dict() if isinstance(self.model, MSTA) else self.model.clip.state_dict()
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    def save_weights(self, path: Path, metadata: dict[str, str]) -> None:
        if isinstance(self.model, MSTA):
            self.model.save_adapters(path, metadata)
        else:
            from safetensors.torch import save

            atomic_write_bytes(path, save({k: v.contiguous() for k, v in self.weights().items()}, metadata=metadata))

    def _checkpoint(self, path: Path, identity: str, epoch: int, best: dict[str, Any] | None,
                    history: list[dict[str, Any]]) -> None:
        state = {"key": identity, "epoch": epoch, "weights": self.weights(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng_cpu": torch.get_rng_state(),
                 "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                 "best": json.dumps(best), "history": json.dumps(history)}
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(path, buf.getvalue())

    def _resume(self, run_dir: Path, identity: str,
                echo: Callable[[str], None]) -> tuple[int, dict[str, Any] | None, list[dict[str, Any]]]:
        """(epochs done, best, history) of an earlier run of `identity` in this folder, its state restored."""
        path = run_dir / "checkpoint.pt"
        if not path.exists():
            return 0, None, []
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or state.get("key") != identity:
                raise ValueError("it belongs to another run")
        except Exception as exc:  # any damage: the run must not be blocked by its own checkpoint
            self._set_aside(path, f"it does not load ({type(exc).__name__}: {str(exc)[:200]})", echo)
            return 0, None, []
        if isinstance(self.model, MSTA):
            own = self.model.adapter_state_dict()
            with torch.no_grad():
                for name, tensor in state["weights"].items():
                    own[name].copy_(tensor)
        else:
            self.model.clip.load_state_dict(state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        return int(state["epoch"]), json.loads(state["best"]), json.loads(state["history"])

    def _set_aside(self, path: Path, why: str, echo: Callable[[str], None]) -> None:
        if self.rank == 0 and path.exists():
            aside = path.with_name(f"{path.name}.set-aside-{int(time.time())}")
            path.replace(aside)
            echo(f"       checkpoint {path} set aside as {aside.name}: {why}; training from epoch 0")


class _StepModule(torch.nn.Module):
    """forward = one step's model work, so that DDP's hooks see every trainable parameter used."""

    def __init__(self, model: VideoCLIP, class_names: list[str]) -> None:
        super().__init__()
        self.model, self.class_names = model, class_names

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        class_emb = self.model.encode_classes(self.class_names)
        return self.model.logits(self.model.encode_video(frames), class_emb), class_emb


def _all_reduced(totals: torch.Tensor, world: int) -> torch.Tensor:
    """Sums over the processes of a launch, on the CPU."""
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(totals)
    return totals.cpu()
