"""train: MSTA adapters (or the full fine-tuning baseline) on cached frames and cached description
embeddings. The frozen description branch never runs here: D_s, D_t come from the embed artifact.

This stage reads its inputs into a model, datasets and description means, hands them to the one
training loop (msta/train.py: the same code the benchmarks time), records each epoch in the catalog
and registers the last weights with the best epoch and the snapshots as the artifact.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cache.catalog import Deferred, insert_rows
from cache.errors import UserError
from cache.keys import digest_value
from cache.store import sha256_file
from stages.engine.stage import Context, Output, Request, Resolved, Stage, artifact_of
from stages.formats.plots import plot_curves
from stages.artifacts import clips_checked, prompt_names, read_class_embeddings, read_classes, read_frame_index


# What varies between repeats of one configuration (report aggregates over these and nothing else),
# and where a configuration is trained (the cells of a report's table, not part of the configuration).
REPEATS = ("seed", "split_seed")
PLACE = ("dataset", "protocol", "shots")


def configuration_id(params: Mapping[str, Any]) -> str:
    """8 hex digits naming every keyed parameter but the repeat and the place (few-shot's K is a column
    of the report; a base-to-novel run's drawn shots are part of its configuration)."""
    place = PLACE if params.get("protocol") == "few-shot" else tuple(k for k in PLACE if k != "shots")
    return digest_value({k: v for k, v in params.items() if k not in REPEATS + place})[:8]


def variant(params: Mapping[str, Any]) -> str:
    """A readable name for what a run trained, from its parameters."""
    if params["method"] == "full":
        return "full fine-tuning"
    a = params["adapter"]
    parts = []
    if params["alpha"] == 0:
        parts.append("w/o L_CC")
    if not a["temporal"]:
        parts.append("w/o temporal")
    if not a["shared"]:
        parts.append("w/o shared")
    if a["towers"] != "both":
        parts.append(f"{a['towers']} only")
    if a["temporal"] and a["temporal_branch"] != "paper":
        parts.append(f"{a['temporal_branch']} TConv")
    return "MSTA" + (" " + ", ".join(parts) if parts else "")


def configuration_name(params: Mapping[str, Any]) -> str:
    """The configuration as people read it: its variant and its id, e.g. `MSTA w/o L_CC #1f0c9a2e`."""
    return f"{variant(params)} #{configuration_id(params)}"


class TrainStage(Stage):
    code_version = "2"  # 2: the authors' schedule (cosine over all steps), AdamW betas, dropped partial batch

    def target(self, req: Request, upstream: Mapping[str, str]) -> str:
        """One slot per configuration and repeat: a later run of the same target replaces an earlier
        one (new code or new input contents), never a run of another configuration or seed."""
        p = req.params
        tag = f":k{p['shots']}" if p["protocol"] == "few-shot" else ""
        return (f"train:{p['method']}:{p['dataset']}:{p['protocol']}{tag}:{configuration_id(p)}"
                f":seed{p['seed']}:split{p['split_seed']}")

    def configuration(self, req: Request, upstream: Mapping[str, str]) -> str:
        return configuration_name(req.params)

    def run(self, req: Request, inputs: Mapping[str, Resolved], ctx: Context) -> Output | None:
        from msta.fileio import safetensors_digest
        from msta.method.adapters import AdapterConfig
        from msta.method.backbone import BackboneError, load_backbone
        from msta.method.model import MSTA, full_finetune
        from msta.method.runtime import init_distributed, rank_device, seed_everything, set_deterministic
        from msta.train import Optimisation, OptimisationError, Targets, Trainer, snapshot_epochs
        from msta.video.dataset import ClipDataset

        p = req.params
        rank, world, _ = init_distributed()
        device = rank_device(p["device"])
        seed_everything(p["seed"])
        set_deterministic(p["deterministic"])
        try:
            backbone = load_backbone(p["backbone"], p["pretrained"] or None, device=device)
        except BackboneError as exc:
            raise UserError(str(exc), 2) from None
        model = (MSTA(backbone, AdapterConfig.from_dict(p["adapter"]), p["template"]) if p["method"] == "adapter"
                 else full_finetune(backbone, p["template"]))

        classes = read_classes(artifact_of(inputs["classes"]))
        targets = Targets(prompt_names(classes, p.get("class_names", "display")))
        if p["alpha"] > 0:
            means = read_class_embeddings(artifact_of(inputs["embed"]).path, [cid for cid, _, _ in classes])
            targets.d_spatial, targets.d_temporal = means["spatial"], means["temporal"]
        size, mean, std = backbone.image_size, backbone.mean, backbone.std
        items, digests = read_frame_index(artifact_of(inputs["frames_train"]).path, ctx.home)
        train_set = ClipDataset(items, "train", size, seed=p["seed"], mean=mean, std=std, frames=p["frames"],
                                digests=digests, **p["augment"])
        heldout_set = None
        if "frames_heldout" in inputs:
            items, digests = read_frame_index(artifact_of(inputs["frames_heldout"]).path, ctx.home)
            heldout_set = ClipDataset(items, "test", size, crops=1, mean=mean, std=std, digests=digests)
        recipe = Optimisation(**{k: p[k] for k in Optimisation.__dataclass_fields__})
        try:
            trainer = Trainer(model, recipe, targets, train_set, heldout_set, device, rank, world,
                              workers=int(req.locators.get("workers", 0)))
        except OptimisationError as exc:
            raise UserError(str(exc), 2) from None

        run_dir = ctx.store.run_dir(ctx.key)
        run_dir.mkdir(parents=True, exist_ok=True)

        # A reader holding the catalog must not end the training: the checkpoint holds the epochs too.
        epochs = Deferred(ctx.catalog, lambda con, rows: insert_rows(con, "epochs", rows, "OR REPLACE"))

        def on_epoch(row: dict[str, Any], history: list[dict[str, Any]]) -> None:
            epochs.add([{"run_key": ctx.key, **row}])
            plot_curves(history, run_dir / "curves.png", p)

        with clips_checked():
            fit = trainer.fit(run_dir, ctx.key, {"run_key": ctx.key, "protocol": p["protocol"],
                                                 "dataset": p["dataset"]},
                              resume=not ctx.forced, on_epoch=on_epoch, echo=ctx.echo,
                              progress=ctx.option("progress", True), desc=f"train {p['dataset']}")
        if fit is None:  # a non-zero rank under torchrun: rank 0 writes and registers
            return None
        epochs.flush()

        def described(path: Path) -> dict[str, str]:
            # Relative to the home, so that a copied or moved home reads its own files.
            return {"file": str(path.relative_to(ctx.home)), "sha256": sha256_file(path),
                    "digest": safetensors_digest(path)}

        best = fit.best
        meta: dict[str, Any] = {"method": p["method"], "protocol": p["protocol"], "dataset": p["dataset"],
                                "epochs": p["epochs"], "best_epoch": best["epoch"] if best else None,
                                "best_heldout_acc": best["acc"] if best else None}
        if best is not None:
            best_path = run_dir / "best.safetensors"
            if best.get("digest") and safetensors_digest(best_path) != best["digest"]:
                raise UserError(f"{best_path} is not the file this run saved (altered or replaced): "
                                "retrain with --force", 1)
            info = described(best_path)
            meta["best_file"], meta["best_sha256"], meta["best_digest"] = info["file"], info["sha256"], info["digest"]
        if p["method"] == "adapter":
            meta["snapshots"] = {str(e): described(run_dir / f"epoch_{e}.safetensors")
                                 for e in snapshot_epochs(p["epochs"])}
        final = fit.history[-1] if fit.history else {}
        # the training and held-out videos are apart, so their missing ones add up; repeated lines are the list's
        missing = sum(artifact_of(inputs[f]).meta.get("missing", 0) for f in ("frames_train", "frames_heldout")
                      if f in inputs)
        if missing:
            ctx.echo(f"       trained without {missing} listed videos missing from disk (--skip-missing)")
        summary = {**meta, "videos_missing": missing,
                   "lines_repeated": artifact_of(inputs["frames_train"]).meta.get("repeated", 0),
                   "final_loss": final.get("loss"), "final_train_acc": final.get("train_acc"),
                   "final_heldout_acc": final.get("heldout_acc"), "curves": str(run_dir / "curves.png"),
                   "trainable_parameters": sum(t.numel() for t in model.trainable_parameters())}
        return Output(kind="adapters" if p["method"] == "adapter" else "finetuned", file=fit.last,
                      digest=safetensors_digest(fit.last), ext=".safetensors", meta=meta, summary=summary)

    def plan(self, req: Request, inputs: Mapping[str, Resolved] | None, ctx: Context) -> str:
        p = req.params
        return (f"train {p['method']} on {p['dataset']} ({p['protocol']}) for {p['epochs']} epochs, "
                f"batch {p['batch_size']}, lr {p['lr']}, on {p['device']}")
