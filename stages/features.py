"""features: the video embeddings of a list, from the frozen CLIP or a trained run, to Parquet.

Each video of the list is embedded exactly as the evaluate stage embeds it (the same cached test
clips, the same crops, the model's `encode_video`): a row per view (`level='view'`: clip x crop)
and a row per video (`level='video'`, the normalised mean of its views). The catalog's
`video_embeddings` view casts `embedding` to FLOAT[D], ready to join with `text_embeddings`.
"""
from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from cache.catalog import insert_rows
from cache.views import VIDEO_EMBEDDINGS, refresh_stored
from stages.engine.stage import Artifact, Context, Output, Request, Resolved, Stage, artifact_of
from stages.artifacts import clips_checked, read_classes, read_frame_index
from stages.models import model_on_device


def model_name(req: Request, upstream: Mapping[str, str]) -> str:
    """Which model a features request embeds with: its training target, or frozen:BACKBONE."""
    return upstream.get("model") or f"frozen:{req.params['backbone']}"


class FeaturesStage(Stage):
    code_version = "1"

    def target(self, req: Request, upstream: Mapping[str, str]) -> str:
        p = req.params
        return f"features:{model_name(req, upstream)}:{p['dataset']}:{p['list']}:{p['selection']}"

    def run(self, req: Request, inputs: Mapping[str, Resolved], ctx: Context) -> Output | None:
        import torch

        from msta.inference import embed_views, video_embedding
        from msta.method.runtime import all_gathered, autocast, init_distributed
        from msta.video.dataset import ClipDataset, make_loader

        p = req.params
        rank, world, _ = init_distributed()  # under torchrun each process embeds every world-th video
        model, backbone, device, run_key, _, _ = model_on_device(p, inputs.get("model"), "{}", ctx.home)
        names = {cid: name for cid, _, name in read_classes(artifact_of(inputs["classes"]))}
        frames = artifact_of(inputs["frames"])
        items, digests = read_frame_index(frames.path, ctx.home)
        videos = pq.read_table(frames.path, columns=["video"])["video"].to_pylist()
        loader = make_loader(ClipDataset(items, "test", backbone.image_size, crops=p["crops"], mean=backbone.mean,
                                         std=backbone.std, digests=digests),
                             batch_size=4, shuffle=False, seed=0, epoch=0, workers=int(req.locators.get("workers", 0)),
                             rank=rank, world_size=world)
        from tqdm import tqdm

        chunks = []
        with torch.no_grad(), autocast(device, p["precision"]), clips_checked():
            for batch, _labels in tqdm(loader, desc=f"features {p['dataset']}:{p['list']}", unit="batch",
                                       disable=rank != 0 or not ctx.option("progress", True)):
                chunks.append(embed_views(model, batch.to(device)).float().cpu())
        views = torch.cat(chunks)  # (N, V, D)
        if world > 1:  # rank 0 alone writes: it gathers the shards back into list order
            views = all_gathered(views, len(items), world, device)
            if rank != 0:
                return None
        per_video = video_embedding(views)
        n, v, dim = views.shape
        owner = model_name(req, ctx.upstream)
        common = {"dataset": p["dataset"], "list": p["list"], "model": owner, "run_key": run_key,
                  "selection": p["selection"], "backbone": p["backbone"]}
        rows = []
        for i, (video, (_, label)) in enumerate(zip(videos, items)):
            base = {**common, "video": video, "label": label, "class_name": names.get(label)}
            rows.append({**base, "level": "video", "view": None, "clip": None, "crop": None,
                         "embedding": per_video[i].tolist()})
            rows += [{**base, "level": "view", "view": j, "clip": j // p["crops"], "crop": j % p["crops"],
                      "embedding": views[i, j].tolist()} for j in range(v)]
        schema = pa.schema([(k, pa.string()) for k in (*common, "video")]
                           + [("label", pa.int32()), ("class_name", pa.string()), ("level", pa.string()),
                              ("view", pa.int32()), ("clip", pa.int32()), ("crop", pa.int32()),
                              ("embedding", pa.list_(pa.float32(), dim))])
        table = pa.Table.from_pylist(rows, schema=schema)
        target = ctx.target

        def publish(con, artifact: Artifact) -> None:
            con.execute("DELETE FROM video_embedding_files WHERE target = ?", [target])
            insert_rows(con, "video_embedding_files", [{
                "target": target, "dataset": p["dataset"], "list": p["list"], "model": owner,
                "selection": p["selection"], "backbone": p["backbone"], "artifact": artifact.digest,
                "path": ctx.store.relative(artifact.path), "dim": dim}])
            refresh_stored(con, VIDEO_EMBEDDINGS, ctx.home)

        ctx.echo(f"       {n} videos of {p['dataset']}:{p['list']} x {v} views -> {dim}-d embeddings ({owner})")
        return Output(kind="video_embeddings", table=table, publish=publish,
                      meta={"run_key": run_key, "dim": dim, "views": v, "backbone": backbone.identity.to_dict()},
                      summary={"videos": n, "views": v, "dim": dim, "model": owner})

    def plan(self, req: Request, inputs: Mapping[str, Resolved] | None, ctx: Context) -> str:
        p = req.params
        return f"embed the videos of {p['dataset']}:{p['list']} with {model_name(req, ctx.upstream)} ({p['selection']})"
