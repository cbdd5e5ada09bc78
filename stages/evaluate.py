"""evaluate: multi-view testing of a trained run (or of the frozen CLIP) on one list.

Each video is seen as clips x crops views; per-view softmax probabilities are summed and the
class with the largest sum wins (MSTA.md section 3). Writes top-1/top-5 rows to `results`,
per-class accuracy to `class_accuracy`, the predictions as Parquet, and a confusion-matrix PNG.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from cache.catalog import insert_rows, utcnow
from pipeline.errors import UserError
from pipeline.keys import sha256_file
from pipeline.runner import Context
from pipeline.stage import Artifact, Output, Request, Resolved, Stage, artifact_of

from .frames import read_frame_index
from .labels import read_classes
from .plots import plot_confusion


class EvaluateStage(Stage):
    name = "evaluate"
    code_version = "1"

    def target(self, req: Request) -> str:
        p = req.params
        model = req.inputs.get("model")
        owner = (get_target(model) if isinstance(model, Request) else f"frozen:{p['backbone']}")
        return f"evaluate:{owner}:{p['dataset']}:{p['list']}:{p['selection']}"

    def run(self, req: Request, inputs: Mapping[str, Resolved], ctx: Context) -> Output:
        import torch

        from msta.backbone import BackboneError, load_backbone
        from msta.data import ClipDataset, make_loader
        from msta.runtime import autocast, resolve_device

        p = req.params
        device = resolve_device(p["device"])
        try:
            backbone = load_backbone(p["backbone"], p["pretrained"] or None, device=device)
        except BackboneError as exc:
            raise UserError(str(exc), 2) from None
        model, run_key, checkpoint, protocol = self._model(backbone, inputs.get("model"), p, ctx.home)
        model.to(device).eval()
        classes = read_classes(artifact_of(inputs["classes"]))
        names = [name for _, _, name in classes]
        items = read_frame_index(artifact_of(inputs["frames"]).path, ctx.home)
        dataset = ClipDataset(items, "test", backbone.image_size, crops=p["crops"], mean=backbone.mean, std=backbone.std)
        loader = make_loader(dataset, batch_size=4, shuffle=False, seed=0, epoch=0,
                             workers=int(req.locators.get("workers", 0)))
        from tqdm import tqdm

        scores = []
        with torch.no_grad(), autocast(device, p["precision"]):
            class_emb = model.encode_classes(names)
            for batch, _labels in tqdm(loader, desc=f"evaluate {p['dataset']}:{p['list']}", unit="batch",
                                       disable=not ctx.option("progress", True)):
                b, v = batch.shape[:2]
                probs = model.logits(model.encode_video(batch.to(device).flatten(0, 1)), class_emb).float().softmax(-1)
                scores.append(probs.view(b, v, -1).sum(1).cpu())
        score = torch.cat(scores)
        labels = torch.tensor([label for _, label in items])
        top5 = score.topk(min(5, len(names)), dim=-1).indices
        pred = top5[:, 0]
        metrics = {"top1": (pred == labels).float().mean().item(),
                   "top5": (top5 == labels[:, None]).any(-1).float().mean().item()}
        per_class = [(cid, name, int((labels == cid).sum()), float((pred[labels == cid] == cid).float().mean())
                      if (labels == cid).any() else float("nan")) for cid, _, name in classes]
        view_text = f"{artifact_of(inputs['frames']).meta['sampling']['clips']}x{p['crops']}"
        run_dir = ctx.store.run_dir(ctx.key)
        run_dir.mkdir(parents=True, exist_ok=True)
        plot_confusion(labels, pred, names, run_dir / "confusion.png", f"{p['dataset']}:{p['list']} ({run_key[:24]})")
        table = pa.table({"video": [Path(path).name for path, _ in items], "label": labels.tolist(),
                          "pred": pred.tolist(), "top5": top5.tolist(),
                          "true_score": score.gather(1, labels[:, None]).squeeze(1).tolist()})
        values = {**metrics, **({p["role"]: metrics["top1"]} if p["role"] in ("base", "novel") else {})}
        rows = [{"run_key": run_key, "protocol": protocol, "dataset": p["dataset"], "split": p["list"], "metric": name,
                 "value": value, "views": view_text, "checkpoint_digest": checkpoint, "selection": p["selection"],
                 "eval_key": ctx.key, "created_at": utcnow()}
                for name, value in values.items()]

        def publish(con, artifact: Artifact) -> None:
            insert_rows(con, "results", rows, "OR REPLACE")
            con.execute("DELETE FROM class_accuracy WHERE eval_key = ?", [ctx.key])
            insert_rows(con, "class_accuracy",
                        [{"eval_key": ctx.key, "run_key": run_key, "dataset": p["dataset"], "split": p["list"],
                          "selection": p["selection"], "class_id": cid, "class_name": name, "videos": n,
                          "accuracy": acc} for cid, name, n, acc in per_class])

        ctx.echo(f"       {p['dataset']}:{p['list']} ({len(items)} videos, {view_text} views, {p['selection']}): "
                 f"top-1 {metrics['top1']:.3f}, top-5 {metrics['top5']:.3f}; confusion matrix {run_dir / 'confusion.png'}")
        return Output(kind="predictions", table=table, publish=publish,
                      meta={"run_key": run_key, "checkpoint": checkpoint, "views": view_text, **metrics},
                      summary={"run_key": run_key, **metrics, "videos": len(items), "views": view_text,
                               "confusion": str(run_dir / "confusion.png")})

    def _model(self, backbone: Any, model_art: Resolved | None, p: Mapping[str, Any],
               home: Path) -> tuple[Any, str, str, str]:
        """(model, run key, checkpoint digest, protocol) for the frozen CLIP or a trained run: its last
        weights, its best-heldout epoch, or the snapshot of one epoch (`epoch:N`)."""
        from msta.model import MSTA, VideoCLIP, read_adapter_info

        if model_art is None:
            return VideoCLIP(backbone, p["template"]), f"frozen:{p['backbone']}", backbone.identity.weights_digest, "zero-shot"
        art = artifact_of(model_art)
        path, checkpoint = art.path, art.digest
        if p["selection"] == "best-heldout":
            if not art.meta.get("best_file"):
                raise UserError("this run had no held-out videos, so it has no best-heldout checkpoint; "
                                "evaluate --selection last", 2)
            path, checkpoint = _checked(home, art.meta["best_file"], art.meta["best_sha256"], art.meta["best_digest"])
        elif p["selection"].startswith("epoch:"):
            snapshot = art.meta.get("snapshots", {}).get(p["selection"].removeprefix("epoch:"))
            if snapshot is None:
                raise UserError(f"this run kept no snapshot of {p['selection']} (snapshots: "
                                f"{', '.join(art.meta.get('snapshots', {})) or 'none'})", 2)
            path, checkpoint = _checked(home, snapshot["file"], snapshot["sha256"], snapshot["digest"])
        if art.kind == "adapters":
            info = read_adapter_info(path)
            model = MSTA(backbone, info.config, p["template"])
            extra = model.load_adapters(path)
            return model, extra.get("run_key", art.digest), checkpoint, extra.get("protocol", "")
        from safetensors import safe_open
        from safetensors.torch import load_file

        model = VideoCLIP(backbone, p["template"])
        model.clip.load_state_dict(load_file(str(path)))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return model, meta.get("run_key", art.digest), checkpoint, meta.get("protocol", "")

    def plan(self, req: Request, inputs: Mapping[str, Resolved] | None, ctx: Context) -> str:
        p = req.params
        return f"evaluate on {p['dataset']}:{p['list']} ({p['selection']})"


def _checked(home: Path, file: str, sha256: str, digest: str) -> tuple[Path, str]:
    path = home / file  # relative to the home (an absolute path, from older runs, stays as it is)
    if not path.exists() or sha256_file(path) != sha256:
        raise UserError(f"the checkpoint {path} is missing or altered; retrain with `train ... --force`", 1)
    return path, digest


def get_target(req: Request) -> str:
    from pipeline.stage import get_stage

    return get_stage(req.stage).target(req)
