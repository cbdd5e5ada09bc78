"""evaluate: multi-view testing of a trained run (or of the frozen CLIP) on one list.

Each video is seen as clips x crops views; per-view softmax probabilities are summed and the
class with the largest sum wins (msta/METHOD.md §3). Writes top-1/top-5 rows to `results`,
per-class accuracy to `class_accuracy`, the predictions as Parquet (with each video's embedding,
which `report` matches against the class descriptions), and a confusion-matrix PNG.
"""
from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from cache.catalog import insert_rows, utcnow
from stages.engine.stage import Artifact, Context, Output, Request, Resolved, Stage, artifact_of
from stages.formats.plots import plot_confusion
from stages.artifacts import clips_checked, prompt_names, read_classes, read_frame_index
from stages.models import model_on_device


class EvaluateStage(Stage):
    code_version = "2"  # 2: predictions hold the video's path in its list and its embedding

    def target(self, req: Request, upstream: Mapping[str, str]) -> str:
        p = req.params
        owner = upstream.get("model") or f"frozen:{p['backbone']}"
        return f"evaluate:{owner}:{p['dataset']}:{p['list']}:{p['selection']}"

    def run(self, req: Request, inputs: Mapping[str, Resolved], ctx: Context) -> Output | None:
        import torch

        from msta.inference import embed_views, video_embedding, view_scores
        from msta.method.runtime import all_gathered, autocast, init_distributed
        from msta.video.dataset import ClipDataset, make_loader

        p = req.params
        rank, world, _ = init_distributed()  # under torchrun each process scores every world-th video
        model, backbone, device, run_key, checkpoint, protocol = model_on_device(p, inputs.get("model"),
                                                                                 p["template"], ctx.home)
        classes = read_classes(artifact_of(inputs["classes"]))
        names = prompt_names(classes, p.get("class_names", "display"))
        items, digests = read_frame_index(artifact_of(inputs["frames"]).path, ctx.home)
        dataset = ClipDataset(items, "test", backbone.image_size, crops=p["crops"], mean=backbone.mean, std=backbone.std,
                              digests=digests)
        loader = make_loader(dataset, batch_size=4, shuffle=False, seed=0, epoch=0,
                             workers=int(req.locators.get("workers", 0)), rank=rank, world_size=world)
        from tqdm import tqdm

        scores, embeddings = [], []
        with torch.no_grad(), autocast(device, p["precision"]), clips_checked():
            class_emb = model.encode_classes(names)
            for batch, _labels in tqdm(loader, desc=f"evaluate {p['dataset']}:{p['list']}", unit="batch",
                                       disable=rank != 0 or not ctx.option("progress", True)):
                view_emb = embed_views(model, batch.to(device))
                scores.append(view_scores(model, view_emb, class_emb).float().cpu())
                embeddings.append(video_embedding(view_emb).float().cpu())
        score, embedding = torch.cat(scores), torch.cat(embeddings)
        if world > 1:  # rank 0 alone writes: it gathers the shards back into list order
            score, embedding = (all_gathered(t, len(items), world, device) for t in (score, embedding))
            if rank != 0:
                return None
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
        videos = pq.read_table(artifact_of(inputs["frames"]).path, columns=["video"])["video"]  # in list order
        table = pa.table({"video": videos, "label": labels.tolist(),
                          "pred": pred.tolist(), "top5": top5.tolist(),
                          "true_score": score.gather(1, labels[:, None]).squeeze(1).tolist(),
                          "embedding": pa.array(embedding.tolist(), pa.list_(pa.float32(), embedding.shape[1]))})
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
                               "videos_missing": artifact_of(inputs["frames"]).meta.get("missing", 0),
                               "confusion": str(run_dir / "confusion.png")})

    def plan(self, req: Request, inputs: Mapping[str, Resolved] | None, ctx: Context) -> str:
        p = req.params
        return f"evaluate on {p['dataset']}:{p['list']} ({p['selection']})"

