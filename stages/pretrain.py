"""pretrain: contrastive image-text pre-training of a tiny CLIP on the synthetic world's static
captioned images (no video, no motion words). Its artifact is the weights file that the shipped
`synthetic-world` checkpoint was made with (`msta-pipe train --stage pretrain --out ...`)."""
from __future__ import annotations

from collections.abc import Mapping

from stages.engine.stage import Context, Output, Request, Resolved, Stage


class PretrainStage(Stage):
    code_version = "1"

    def target(self, req: Request, upstream: Mapping[str, str]) -> str:
        return f"pretrain:{req.params['config']}"

    def run(self, req: Request, inputs: Mapping[str, Resolved], ctx: Context) -> Output:
        import torch

        from msta.world.pretrain import pretrain, save_checkpoint

        # One thread: the shipped checkpoint was made so, and matmul results depend on the split.
        torch.set_num_threads(1)
        p = req.params
        state, metrics = pretrain(p["config"], steps=p["steps"], batch_size=p["batch_size"], lr=p["lr"],
                                  seed=p["seed"], device=p["device"], progress=ctx.option("progress", True))
        tmp = ctx.store.run_dir(ctx.key) / "weights.safetensors"
        save_checkpoint(state, tmp, {"config": p["config"], "steps": str(p["steps"]), "seed": str(p["seed"])})
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        return Output(kind="weights", file=tmp, ext=".safetensors", meta=shown, summary=shown)

    def plan(self, req: Request, inputs: Mapping[str, Resolved] | None, ctx: Context) -> str:
        p = req.params
        return f"pre-train {p['config']} for {p['steps']} steps of batch {p['batch_size']}"
