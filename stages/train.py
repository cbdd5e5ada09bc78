"""train: MSTA adapters (or the full fine-tuning baseline) on cached frames and cached description
embeddings. The frozen description branch never runs here: D_s, D_t come from the embed artifact.

    for each epoch:
        for each batch of cached clips (augmented):
            w   = adapted text tower on "a video of {class}." for all C classes
            v   = adapted vision tower on the B*T frames, mean over T
            L   = CE(exp(s) cos(v, w), y) + alpha * mean_c [2 - cos(w_c, D_s) - cos(w_c, D_t)]
        held-out accuracy -> "best" epoch; checkpoint (atomic) -> a killed run resumes here
        after epochs 1, 6, 11, ... and the last: adapter snapshots, the epochs the authors tested

Every random choice is a function of (seed, epoch, index), and the checkpoint holds the optimiser,
scheduler and RNG states, so a resumed run ends with the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cache.store import atomic_write
from cache.errors import UserError
from pipeline.engine.runner import Context
from pipeline.engine.stage import Output, Request, Resolved, Stage, artifact_of

from stages.embed import read_class_embeddings
from stages.frames import read_frame_index
from stages.labels import read_classes
from pipeline.formats.plots import plot_curves


SNAPSHOT_EVERY = 5  # the authors' SAVE_FREQ: they tested after epochs 1, 6, ..., 46 and the last


def snapshot_epochs(epochs: int) -> list[int]:
    """1-based epochs after which the authors evaluated (and this stage keeps adapter snapshots)."""
    return sorted({e + 1 for e in range(0, epochs, SNAPSHOT_EVERY)} | {epochs})


class TrainStage(Stage):
    code_version = "2"  # 2: the authors' schedule (cosine over all steps), AdamW betas, dropped partial batch

    def target(self, req: Request, upstream: Mapping[str, str]) -> str:
        p = req.params
        tag = {"few-shot": f"k{p['shots']}", "base2novel": f"s{p['split_seed']}"}.get(p["protocol"], "")
        return f"train:{p['method']}:{p['dataset']}:{p['protocol']}{':' + tag if tag else ''}"

    def run(self, req: Request, inputs: Mapping[str, Resolved], ctx: Context) -> Output:
        import torch

        from msta.method.fileio import safetensors_digest
        from msta.method.runtime import init_distributed, resolve_device

        p = req.params
        rank, world, local_rank = init_distributed()
        device = resolve_device(p["device"])
        if device.type == "cuda" and world > 1:
            device = torch.device("cuda", local_rank)
        run_dir = ctx.store.run_dir(ctx.key)
        run_dir.mkdir(parents=True, exist_ok=True)
        trainer = Trainer(p, inputs, device, rank, world, run_dir, ctx, req.locators)
        result = trainer.fit()
        if result is None:  # a non-zero rank under torchrun: rank 0 writes and registers
            return None  # type: ignore[return-value]
        return Output(kind="adapters" if p["method"] == "adapter" else "finetuned", file=result["last"],
                      digest=safetensors_digest(result["last"]), ext=".safetensors", meta=result["meta"],
                      summary=result["summary"])

    def plan(self, req: Request, inputs: Mapping[str, Resolved] | None, ctx: Context) -> str:
        p = req.params
        return (f"train {p['method']} on {p['dataset']} ({p['protocol']}) for {p['epochs']} epochs, "
                f"batch {p['batch_size']}, lr {p['lr']}, on {p['device']}")


class Trainer:
    """One training run: model, data, optimiser and schedule built from the stage's parameters."""

    def __init__(self, p: Mapping[str, Any], inputs: Mapping[str, Resolved], device: Any, rank: int, world: int,
                 run_dir: Path, ctx: Context, locators: Mapping[str, Any]) -> None:
        import torch

        from msta.method.adapters import AdapterConfig
        from msta.method.backbone import BackboneError, load_backbone
        from msta.video.dataset import ClipDataset, epoch_steps
        from msta.method.model import MSTA, full_finetune
        from msta.method.runtime import seed_everything, set_deterministic
        from msta.method.schedule import applied_factor

        self.p, self.device, self.rank, self.world = p, device, rank, world
        self.run_dir, self.ctx, self.key = run_dir, ctx, ctx.key
        self.workers = int(locators.get("workers", 0))
        seed_everything(p["seed"])
        set_deterministic(p["deterministic"])
        try:
            backbone = load_backbone(p["backbone"], p["pretrained"] or None, device=device)
        except BackboneError as exc:
            raise UserError(str(exc), 2) from None
        if p["method"] == "adapter":
            self.cfg = AdapterConfig.from_dict(p["adapter"])
            self.model = MSTA(backbone, self.cfg, p["template"])
        else:
            self.cfg = None
            self.model = full_finetune(backbone, p["template"])
        self.model.to(device)
        classes = read_classes(artifact_of(inputs["classes"]))
        self.class_names = [name for _, _, name in classes]
        self.d_spatial = self.d_temporal = None
        if p["alpha"] > 0:
            means = read_class_embeddings(artifact_of(inputs["embed"]).path, [cid for cid, _, _ in classes])
            self.d_spatial, self.d_temporal = means["spatial"].to(device), means["temporal"].to(device)
        size, mean, std = backbone.image_size, backbone.mean, backbone.std
        train_items = read_frame_index(artifact_of(inputs["frames_train"]).path, ctx.home)
        self.train_set = ClipDataset(train_items, "train", size, seed=p["seed"], mean=mean, std=std,
                                     frames=p["frames"], **p["augment"])
        self.heldout_set = None
        if "frames_heldout" in inputs:
            items = read_frame_index(artifact_of(inputs["frames_heldout"]).path, ctx.home)
            self.heldout_set = ClipDataset(items, "test", size, crops=1, mean=mean, std=std)
        micro = p["micro_batch"] or p["batch_size"] // world  # each process's share of the batch
        if micro < 1 or p["batch_size"] % (micro * world):
            raise UserError(f"--batch-size {p['batch_size']} must be a multiple of --micro-batch ({micro}) x "
                            f"processes ({world})", 2)
        self.micro, self.accum = micro, p["batch_size"] // (micro * world)
        # Each process drops its last partial batch, as in the authors' runs (UCF-101 K=2: 6 steps).
        self.steps_per_epoch = epoch_steps(len(self.train_set), p["batch_size"], world)
        if self.steps_per_epoch == 0:
            raise UserError(f"{len(self.train_set)} training clips do not fill one batch of --batch-size "
                            f"{p['batch_size']}: lower --batch-size or add videos", 2)
        groups = self.model.parameter_groups(p["lr"], p["temporal_lr_mult"])
        # ViFi-CLIP's optimiser, which the authors' runs use: betas (0.9, 0.98), eps 1e-8.
        self.optimizer = torch.optim.AdamW(groups, lr=p["lr"], weight_decay=p["weight_decay"], betas=(0.9, 0.98),
                                           eps=1e-8)
        total = self.steps_per_epoch * p["epochs"]
        warmup = self.steps_per_epoch * p["warmup_epochs"]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           applied_factor(total, warmup, p["min_lr_ratio"]))
        self.step_module = _step_module(self.model, self.class_names)
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.step_module = DistributedDataParallel(
                self.step_module, device_ids=[device.index] if device.type == "cuda" else None)

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any] | None:
        from tqdm import tqdm

        p = self.p
        start, best, history = self._resume()
        if start > 0:
            self.ctx.echo(f"       resuming from the checkpoint of epoch {start} of {p['epochs']}")
        bar = tqdm(total=p["epochs"], initial=start, desc=f"train {p['dataset']}", unit="epoch",
                   disable=self.rank != 0 or not self.ctx.option("progress", True))
        for epoch in range(start, p["epochs"]):
            t0 = time.perf_counter()
            stats = self._train_epoch(epoch)
            heldout = self.accuracy(self.heldout_set) if self.heldout_set is not None else None
            row = {"epoch": epoch + 1, "lr": self.scheduler.get_last_lr()[0], **stats, "heldout_acc": heldout,
                   "seconds": time.perf_counter() - t0}
            history.append(row)
            if heldout is not None and (best is None or heldout > best["acc"]):
                best = {"epoch": epoch + 1, "acc": heldout}
                if self.rank == 0:
                    from msta.method.fileio import safetensors_digest

                    self._save_weights(self.run_dir / "best.safetensors", {"epoch": str(epoch + 1)})
                    best["digest"] = safetensors_digest(self.run_dir / "best.safetensors")
            if self.rank == 0:
                if self.cfg is not None and epoch + 1 in snapshot_epochs(p["epochs"]):
                    self._save_weights(self.run_dir / f"epoch_{epoch + 1}.safetensors", {"epoch": str(epoch + 1)})
                self._record(row)
                self._checkpoint(epoch + 1, best, history)
                plot_curves(history, self.run_dir / "curves.png", p)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['train_acc']:.2f}",
                            heldout="-" if heldout is None else f"{heldout:.2f}")
            bar.update(1)
        bar.close()
        if self.rank != 0:
            return None
        last = self.run_dir / "last.safetensors"
        self._save_weights(last, {"epoch": str(p["epochs"])})
        meta: dict[str, Any] = {"method": p["method"], "protocol": p["protocol"], "dataset": p["dataset"],
                                "epochs": p["epochs"], "best_epoch": best["epoch"] if best else None,
                                "best_heldout_acc": best["acc"] if best else None}
        from msta.method.fileio import safetensors_digest
        from cache.keys import sha256_file

        def described(path: Path) -> dict[str, str]:
            # Relative to the home, so that a copied or moved home reads its own files.
            return {"file": str(path.relative_to(self.ctx.home)), "sha256": sha256_file(path),
                    "digest": safetensors_digest(path)}

        if best is not None:
            best_path = self.run_dir / "best.safetensors"
            if best.get("digest") and safetensors_digest(best_path) != best["digest"]:
                raise UserError(f"{best_path} is not the file this run saved (altered or replaced): "
                                "retrain with --force", 1)
            info = described(best_path)
            meta["best_file"], meta["best_sha256"], meta["best_digest"] = info["file"], info["sha256"], info["digest"]
        if self.cfg is not None:
            meta["snapshots"] = {str(e): described(self.run_dir / f"epoch_{e}.safetensors")
                                 for e in snapshot_epochs(p["epochs"])}
        final = history[-1] if history else {}
        summary = {**meta, "final_loss": final.get("loss"), "final_train_acc": final.get("train_acc"),
                   "final_heldout_acc": final.get("heldout_acc"), "curves": str(self.run_dir / "curves.png"),
                   "trainable_parameters": sum(t.numel() for t in self.model.trainable_parameters())}
        return {"last": last, "meta": meta, "summary": summary}

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        import torch

        from msta.video.dataset import make_loader
        from msta.method.losses import msta_loss
        from msta.method.runtime import autocast

        p = self.p
        self.model.train()
        loader = make_loader(self.train_set, self.micro, shuffle=True, seed=p["seed"], epoch=epoch,
                             workers=self.workers, rank=self.rank, world_size=self.world,
                             steps=self.steps_per_epoch * self.accum)
        sums = {"loss": 0.0, "ce": 0.0, "cc": 0.0, "correct": 0.0, "seen": 0.0}
        self.optimizer.zero_grad(set_to_none=True)
        n_batches = len(loader)
        for i, (frames, labels) in enumerate(loader):
            frames, labels = frames.to(self.device, non_blocking=True), labels.to(self.device)
            last_micro = (i + 1) % self.accum == 0 or i + 1 == n_batches
            sync = self.step_module.no_sync() if self.world > 1 and not last_micro else contextlib.nullcontext()
            with sync:
                with autocast(self.device, p["precision"]):
                    logits, class_emb = self.step_module(frames)
                    loss, ce, cc = msta_loss(logits, labels, class_emb, self.d_spatial, self.d_temporal, p["alpha"])
                (loss / self.accum).backward()
            if last_micro:
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            b = labels.shape[0]
            sums["loss"] += loss.item() * b
            sums["ce"] += ce.item() * b
            sums["cc"] += (cc.item() if cc is not None else 0.0) * b
            sums["correct"] += (logits.argmax(-1) == labels).sum().item()
            sums["seen"] += b
        totals = torch.tensor([sums[k] for k in ("loss", "ce", "cc", "correct", "seen")], dtype=torch.float64)
        if self.world > 1:
            import torch.distributed as dist

            totals = totals.to(self.device)
            dist.all_reduce(totals)
            totals = totals.cpu()
        loss, ce, cc, correct, seen = totals.tolist()
        seen = max(seen, 1.0)
        return {"loss": loss / seen, "ce": ce / seen, "cc": cc / seen if p["alpha"] > 0 else None,
                "train_acc": correct / seen}

    def accuracy(self, dataset: Any) -> float:
        """Top-1 on a held-out set (one view per clip); every rank computes it on its shard."""
        import torch

        from msta.video.dataset import make_loader
        from msta.inference import embed_views, view_scores
        from msta.method.runtime import autocast

        self.model.eval()
        loader = make_loader(dataset, self.micro, shuffle=False, seed=0, epoch=0, workers=self.workers,
                             rank=self.rank, world_size=self.world)
        correct = seen = 0
        with torch.no_grad(), autocast(self.device, self.p["precision"]):
            class_emb = self.model.encode_classes(self.class_names)
            for views, labels in loader:
                views, labels = views.to(self.device), labels.to(self.device)
                pred = view_scores(self.model, embed_views(self.model, views), class_emb).argmax(-1)
                correct += (pred == labels).sum().item()
                seen += labels.shape[0]
        totals = torch.tensor([correct, seen], dtype=torch.float64)
        if self.world > 1:
            import torch.distributed as dist

            totals = totals.to(self.device)
            dist.all_reduce(totals)
        return float(totals[0] / max(totals[1].item(), 1))

    # -- persistence ---------------------------------------------------------------------------
    def _weights(self) -> dict[str, Any]:
        if self.cfg is not None:
            return {k: v.detach().cpu().clone() for k, v in self.model.adapter_state_dict().items()}
        return {k: v.detach().cpu().clone() for k, v in self.model.clip.state_dict().items()}

    def _save_weights(self, path: Path, extra: dict[str, str]) -> None:
        extra = {**extra, "run_key": self.key, "protocol": self.p["protocol"], "dataset": self.p["dataset"]}
        if self.cfg is not None:
            self.model.save_adapters(path, extra)
        else:
            from safetensors.torch import save

            data = save({k: v.contiguous() for k, v in self._weights().items()}, metadata=extra)
            atomic_write(path, lambda f: f.write(data))

    def _checkpoint(self, epoch: int, best: dict[str, Any] | None, history: list[dict[str, Any]]) -> None:
        import io

        import torch

        state = {"key": self.key, "epoch": epoch, "weights": self._weights(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng_cpu": torch.get_rng_state(),
                 "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                 "best": json.dumps(best), "history": json.dumps(history)}
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write(self.run_dir / "checkpoint.pt", lambda f: f.write(buf.getvalue()))

    def _resume(self) -> tuple[int, dict[str, Any] | None, list[dict[str, Any]]]:
        """Where an earlier run of this key stopped; nothing with --force, which trains from scratch."""
        import torch

        path = self.run_dir / "checkpoint.pt"
        if not path.exists():
            return 0, None, []
        if self.ctx.forced:
            self._set_aside(path, "--force trains from scratch")
            return 0, None, []
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or state.get("key") != self.key:
                raise ValueError("it belongs to another run")
        except Exception as exc:  # any damage: the run must not be blocked by its own checkpoint
            self._set_aside(path, f"it does not load ({type(exc).__name__}: {str(exc)[:200]})")
            return 0, None, []
        if self.cfg is not None:
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

    def _set_aside(self, path: Path, why: str) -> None:
        if self.rank == 0:
            aside = path.with_name(f"{path.name}.set-aside-{int(time.time())}")
            path.replace(aside)
            self.ctx.echo(f"       checkpoint {path} set aside as {aside.name}: {why}; training from epoch 0")

    def _record(self, row: dict[str, Any]) -> None:
        with self.ctx.catalog.transaction() as con:
            con.execute("INSERT OR REPLACE INTO epochs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [self.key, row["epoch"], row["lr"], row["loss"], row["ce"], row["cc"], row["train_acc"],
                         row["heldout_acc"], row["seconds"]])


def _step_module(model: Any, class_names: list[str]) -> Any:
    import torch

    class Step(torch.nn.Module):
        """forward = one step's model work, so that DDP's hooks see every adapter parameter used."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, frames: Any) -> tuple[Any, Any]:
            class_emb = self.model.encode_classes(class_names)
            return self.model.logits(self.model.encode_video(frames), class_emb), class_emb

    return Step()

