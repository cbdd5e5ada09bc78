"""embed: the FROZEN text tower (no adapters) embeds every stored description once.

Output: one Parquet artifact with a row per description and a row per (class, kind) holding
the normalised mean D_c = normalise(mean_i normalise(f(text_i))) that L_CC pulls w_c towards.
Training reads these rows; it never runs the frozen description branch itself.
"""
from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from cache.catalog import insert_rows
from cache.errors import UserError
from cache.keys import sha256_text
from cache.views import TEXT_EMBEDDINGS, refresh_stored
from stages.engine.stage import Artifact, Context, Output, Request, Resolved, Stage, artifact_of
from prompts import KINDS


class EmbedStage(Stage):
    code_version = "1"

    def target(self, req: Request, upstream: Mapping[str, str]) -> str:
        return f"embed:{req.params['dataset']}:{req.params['backbone']}"

    def run(self, req: Request, inputs: Mapping[str, Resolved], ctx: Context) -> Output:
        import torch

        from msta.method.backbone import BackboneError, load_backbone
        from msta.method.losses import class_means
        from msta.method.runtime import resolve_device

        p = req.params
        tables = {k: pq.read_table(artifact_of(inputs[k]).path) for k in KINDS}
        device = resolve_device(req.locators.get("device", "auto"))
        try:
            backbone = load_backbone(p["backbone"], p["pretrained"] or None, device=device)
        except BackboneError as exc:
            raise UserError(str(exc), 2) from None
        rows = {k: tables[k].to_pylist() for k in KINDS}
        class_ids = sorted({r["class_id"] for k in KINDS for r in rows[k]})
        for k in KINDS:
            have = {r["class_id"] for r in rows[k]}
            if have != set(class_ids):
                raise UserError(f"dataset {p['dataset']!r}: classes {sorted(set(class_ids) - have)[:5]} have no "
                                f"{k} descriptions; describe them first", 2)
        texts = [r["text"] for k in KINDS for r in rows[k]]
        lengths = backbone.count_tokens(texts)
        too_long = [(t, n) for t, n in zip(texts, lengths) if n > backbone.context_length]
        if too_long:
            ctx.echo(f"       {len(too_long)} of {len(texts)} descriptions exceed the {backbone.context_length}-token "
                     f"context of {p['backbone']} and are truncated when embedded, e.g.:")
            for t, n in too_long[:3]:
                ctx.echo(f"         ({n} tokens) {t[:110]}")
        emb = backbone.encode_text_frozen(texts, batch_size=int(req.locators.get("batch_size", 256)), device=device,
                                          progress=ctx.option("progress", True))
        emb = emb.float().cpu()
        dim = emb.shape[1]
        out_rows = []
        offset = 0
        means: dict[str, torch.Tensor] = {}
        for k in KINDS:
            start = offset
            block = emb[offset: offset + len(rows[k])]
            offset += len(rows[k])
            n_per = len(rows[k]) // len(class_ids)
            order = sorted(range(len(rows[k])), key=lambda i: (rows[k][i]["class_id"], rows[k][i]["idx"]))
            grouped = block[order].view(len(class_ids), n_per, dim)
            means[k] = class_means(grouped)
            for i, r in enumerate(rows[k]):
                out_rows.append({"level": "description", "class_id": r["class_id"], "class_name": r["class_name"],
                                 "kind": k, "idx": r["idx"], "text": r["text"], "text_sha256": sha256_text(r["text"]),
                                 "n_tokens": lengths[start + i],
                                 "embedding": block[i].tolist()})
        names = {r["class_id"]: r["class_name"] for k in KINDS for r in rows[k]}
        for k in KINDS:
            for j, cid in enumerate(class_ids):
                out_rows.append({"level": "class", "class_id": cid, "class_name": names[cid], "kind": k,
                                 "idx": None, "text": None, "text_sha256": None, "n_tokens": None,
                                 "embedding": means[k][j].tolist()})
        schema = pa.schema([("dataset", pa.string()), ("backbone", pa.string()), ("level", pa.string()),
                            ("class_id", pa.int32()), ("class_name", pa.string()), ("kind", pa.string()),
                            ("idx", pa.int32()), ("text", pa.string()), ("text_sha256", pa.string()),
                            ("n_tokens", pa.int32()), ("embedding", pa.list_(pa.float32(), dim))])
        table = pa.Table.from_pylist([{"dataset": p["dataset"], "backbone": p["backbone"], **r} for r in out_rows],
                                     schema=schema)
        identity = backbone.identity.to_dict()

        def publish(con, artifact: Artifact) -> None:
            con.execute("DELETE FROM text_embedding_files WHERE dataset = ? AND backbone = ?",
                        [p["dataset"], p["backbone"]])
            insert_rows(con, "text_embedding_files", [{"dataset": p["dataset"], "backbone": p["backbone"],
                                                       "artifact": artifact.digest,
                                                       "path": ctx.store.relative(artifact.path), "dim": dim}])
            refresh_stored(con, TEXT_EMBEDDINGS, ctx.home)

        ctx.echo(f"       {len(texts)} descriptions of {len(class_ids)} classes -> {dim}-d embeddings")
        return Output(kind="text_embeddings", table=table, publish=publish,
                      meta={"backbone": identity, "dim": dim, "context_length": backbone.context_length,
                            "truncated": len(too_long)},
                      summary={"descriptions": len(texts), "classes": len(class_ids), "dim": dim,
                               "truncated": len(too_long)})

    def plan(self, req: Request, inputs: Mapping[str, Resolved] | None, ctx: Context) -> str:
        return f"embed the descriptions with the frozen {req.params['backbone']} text tower"


