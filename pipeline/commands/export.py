"""`msta-pipe export`: a trained run as a self-contained folder that needs no catalog, and the
reader `predict --model` uses.

    adapters.safetensors          the run's chosen weights, byte for byte (--selection last|best-heldout)
    config.json                   adapter config, backbone identity and weights sha256, template, T,
                                  test views, input size, mean/std, class names
    class_embeddings.safetensors  the class prompts through the adapted text branch, (C, D)
    recipe.json                   the run's parameters; results.json its rows of `results`
    open_clip_config.json         open_clip's own config of an open_clip backbone
    open_clip_model.safetensors   with --include-backbone: the backbone's weights, byte for byte
    README.md                     the model card (Hugging Face front matter)
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cache.errors import UserError
from pipeline.commands.runs import TrainedRun



def run_views(config: Any, tr: TrainedRun) -> dict[str, int]:
    """The test views of the run's dataset (msta/METHOD.md §3) with the run's T: as recorded with the
    run, so that its key alone is enough; a run from before that record reads its dataset's config."""
    from pipeline.commands.dag import views_of

    views = tr.views if tr.views is not None else views_of(config.dataset(tr.params["dataset"]).video)
    return {"frames": tr.params["frames"], **views}


def export_run(runner: Any, config: Any, tr: TrainedRun, selection: str, out: Path, device: Any,
               include_backbone: bool = False) -> dict[str, Any]:
    """Write the folder (atomically: built beside `out`, then renamed, readable by the group); returns its
    config. With `include_backbone` the backbone's weights file is copied in, byte for byte, so the
    folder needs nothing else."""
    import torch
    from safetensors.torch import save_file

    from cache.catalog import rows_as_dicts
    from msta.method.backbone import BackboneError, load_backbone
    from stages.artifacts import prompt_names
    from stages.models import adapted_model, selected_weights

    p = tr.params
    if tr.artifact.kind != "adapters":
        raise UserError(f"run {tr.key[:16]} is a {p['method']} fine-tune: its weights are a whole CLIP "
                        f"({tr.artifact.path}), not adapters; export packs adapter runs", 2)
    weights, checkpoint = selected_weights(tr.artifact, selection, runner.home)
    views = run_views(config, tr)
    try:
        backbone = load_backbone(p["backbone"], p["pretrained"] or None, device=device)
    except BackboneError as exc:
        raise UserError(str(exc), 2) from None
    model, extra = adapted_model(backbone, weights, p["template"])
    names = prompt_names(tr.classes, p.get("class_names", "display"))
    with torch.no_grad():
        class_emb = model.to(device).eval().encode_classes(names).float().cpu().contiguous()
    with runner.catalog.reader() as con:
        results = rows_as_dicts(con, "SELECT dataset, split, metric, value, views, selection, checkpoint_digest "
                                     "FROM results WHERE run_key = ? ORDER BY dataset, split, selection, metric",
                                [tr.key])
    identity = backbone.identity
    from msta.api import EXPORT_FORMAT

    cfg = {"format": EXPORT_FORMAT, "run_key": tr.key, "configuration": tr.configuration,
           "seed": p["seed"], "split": p["split_seed"], "dataset": p["dataset"], "protocol": p["protocol"],
           "selection": selection, "epoch": extra.get("epoch"), "checkpoint_digest": checkpoint,
           "backbone": {"model": p["backbone"], "pretrained": p["pretrained"], "identity": identity.name,
                        "weights_sha256": identity.weights_digest, "tokenizer": identity.tokenizer},
           "adapter": model.cfg.to_dict(), "template": p["template"], **views,
           "input_size": backbone.image_size, "mean": list(backbone.mean), "std": list(backbone.std),
           "classes": [{"id": cid, "name": name, "prompt": prompt}
                       for (cid, _, name), prompt in zip(tr.classes, names)]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copyfile(weights, tmp / "adapters.safetensors")
        save_file({"embeddings": class_emb}, str(tmp / "class_embeddings.safetensors"),
                  metadata={"classes": json.dumps(names), "template": p["template"]})
        (tmp / "recipe.json").write_text(json.dumps({"params": p, "inputs": tr.inputs}, indent=1) + "\n")
        (tmp / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        if include_backbone:
            cfg["backbone"]["file"] = _include_backbone(p["backbone"], p["pretrained"], tmp)
        clip_cfg = open_clip_config(identity.name, backbone)
        if clip_cfg is not None:
            (tmp / "open_clip_config.json").write_text(json.dumps(clip_cfg, indent=1) + "\n")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
        (tmp / "README.md").write_text(model_card(cfg, p, results, sum(t.numel() for t in
                                                                       model.adapter_state_dict().values()),
                                                  sum(f.stat().st_size for f in tmp.iterdir())))
        tmp.chmod(0o755)  # mkdtemp made it private; an export is meant to be shared
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            out.rmdir()  # fails unless empty: an export never replaces files
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cfg


def _include_backbone(name: str, pretrained: str, folder: Path) -> str:
    """Copy the backbone's weights file into the folder (open_clip's file name for an open_clip model, so
    that `open_clip.create_model("local-dir:FOLDER")` finds it); its name."""
    from msta.method.registry import VICLIP_PREFIX, BackboneError, weights_file

    try:
        path = weights_file(name, pretrained or None)
    except BackboneError as exc:
        raise UserError(str(exc), 2) from None
    if not pretrained:
        raise UserError("--include-backbone: this run's backbone has random weights, there is no file to include "
                        "(its seed recreates them)", 2)
    if path is None:
        raise UserError(f"--include-backbone: the weights {pretrained!r} are an open_clip tag, not a file; train with "
                        "--pretrained FILE to export them", 2)
    target = "open_clip_model.safetensors" if path.suffix == ".safetensors" and not name.startswith(VICLIP_PREFIX) \
        else "backbone" + path.suffix
    shutil.copyfile(path, folder / target)
    return target


def open_clip_config(name: str, backbone: Any) -> dict[str, Any] | None:
    """open_clip's own config of an open_clip backbone (model_cfg and preprocess_cfg, as its hub folders
    carry), so that open_clip itself can rebuild the frozen tower; None for other backbones."""
    import open_clip

    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        return None
    return {"model_cfg": model_cfg, "preprocess_cfg": {"size": backbone.image_size, "mean": list(backbone.mean),
                                                        "std": list(backbone.std)}}


def read_export(folder: Path) -> dict[str, Any]:
    """config.json of an exported folder (msta.api.read_config), its faults as usage errors."""
    from msta.api import ExportError, read_config

    try:
        return read_config(folder)
    except ExportError as exc:
        raise UserError(f"--model {exc}", 2) from None


def front_matter(cfg: dict[str, Any], results: list[dict[str, Any]]) -> list[str]:
    """The YAML header of a Hugging Face model card: license, library, tags, base model, datasets and the
    run's results as model-index metrics (JSON is YAML, so every value is written as JSON)."""
    b = cfg["backbone"]
    base = b["identity"] if not b["pretrained"] or "/" in str(b["pretrained"]) else f"{b['identity']}/{b['pretrained']}"
    metrics = [{"type": "accuracy", "name": f"{r['metric']} {r['dataset']}:{r['split']} ({r['selection']})",
                "value": round(100 * r["value"], 2)} for r in results]
    index = [{"name": cfg["configuration"], "results": [{"task": {"type": "video-classification"},
                                                          "dataset": {"name": cfg["dataset"], "type": cfg["dataset"]},
                                                          "metrics": metrics}]}] if metrics else []
    fields = {"license": "mit", "library_name": "msta-pipe", "pipeline_tag": "video-classification",
              "tags": ["video-classification", "clip", "adapter", "msta", "open_clip"],
              "base_model": base, "datasets": [cfg["dataset"]], "model-index": index}
    return ["---", *[f"{k}: {json.dumps(v)}" for k, v in fields.items()], "---", ""]


def model_card(cfg: dict[str, Any], p: dict[str, Any], results: list[dict[str, Any]], parameters: int,
               size: int) -> str:
    from stages.train import configuration_name

    b = cfg["backbone"]
    names = ", ".join(c["name"] for c in cfg["classes"][:12]) + (", ..." if len(cfg["classes"]) > 12 else "")
    recipe = ["protocol", "shots", "split_seed", "seed", "epochs", "lr", "temporal_lr_mult", "weight_decay",
              "warmup_epochs", "batch_size", "frames", "frame_pool", "alpha", "n_descriptions", "template",
              "precision", "device"]
    rows = [f"| {r['dataset']} | {r['split']} | {r['metric']} | {r['selection']} | {r['views']} | "
            f"{100 * r['value']:.1f} |" for r in results]
    included = (f"The backbone's weights are in this folder (`{b['file']}`): it needs no other file. "
                if b.get("file") else "The backbone's weights are not in this folder (`export --include-backbone` "
                                      "puts them in): pass them as `pretrained`. ")
    return "\n".join([
        *front_matter(cfg, results),
        f"# {configuration_name(p)} on {cfg['dataset']} ({cfg['protocol']})", "",
        f"MSTA adapters ({parameters:,} trainable parameters, adapter config `{json.dumps(cfg['adapter'])}`) for "
        f"the frozen CLIP `{b['identity']}` (weights `{b['pretrained'] or 'random init'}`, sha256 "
        f"`{b['weights_sha256']}`). They classify a video into the {len(cfg['classes'])} classes of "
        f"{cfg['dataset']} ({names}), or into any class names you give: the adapted text branch encodes them.",
        "", f"Exported by msta-pipe from training run `{cfg['run_key']}`, selection `{cfg['selection']}` "
        f"(epoch {cfg['epoch']}, checkpoint digest `{cfg['checkpoint_digest']}`).", "",
        "## How it was trained", "",
        "| parameter | value |", "|---|---|",
        *[f"| {k} | {json.dumps(p.get(k))} |" for k in recipe if k in p],
        "", "Every parameter and the digests of the training inputs are in `recipe.json`.", "",
        "## Results (top-1 / top-5 as %, multi-view test)", "",
        *(["| dataset | split | metric | selection | views | value |", "|---|---|---|---|---|---|", *rows]
          if rows else ["No evaluation of this run was recorded before the export (`msta-pipe evaluate`)."]),
        "", "## Test views", "",
        f"T = {cfg['frames']} frames per clip, {cfg['test_clips']} clips x {cfg['test_crops']} crops, short side "
        f"{cfg['test_short_side']} px, input {cfg['input_size']} px; per-view softmax summed over the views.", "",
        "## How to use it", "", "```bash",
        "msta-pipe predict --model THIS_FOLDER --pretrained /path/to/backbone-weights videos/",
        "msta-pipe predict --model THIS_FOLDER --pretrained /path/to/backbone-weights --labels my_classes.txt clip.mp4",
        "```", "",
        f"`predict` refuses backbone weights whose sha256 differs from the one above. {included}The folder is "
        f"{size / 1e6:.1f} MB. In Python (`pip install msta-pipe`), with the probabilities `predict` prints:", "",
        "```python", "import msta", "",
        "model, preprocess, tokenizer = msta.load(\"THIS_FOLDER\"" + ("" if b.get("file") else
                                                                     ", pretrained=\"/path/to/backbone-weights\"") + ")",
        "probs = msta.classify(model, [\"clip.mp4\"], preprocess=preprocess)  # (videos, classes)",
        "print(model.class_names[int(probs[0].argmax())])",
        "```", "",
        "`model.encode_video(preprocess(path)[None])` and `model.encode_text([...names])` give normalised "
        "embeddings; `open_clip_config.json` (for an open_clip backbone) lets open_clip rebuild the frozen tower.", "",
        "## Files", "",
        "| file | holds |", "|---|---|",
        "| adapters.safetensors | the adapter weights (their config and backbone identity in its metadata) |",
        "| config.json | adapter config, backbone identity and weights sha256, template, T, test views, input "
        "size, mean/std, class names |",
        "| class_embeddings.safetensors | `embeddings` (C, D): the class prompts through the adapted text branch |",
        "| recipe.json | the training run's parameters and input digests |",
        "| open_clip_config.json | open_clip's model and preprocess config of the backbone (open_clip backbones) |",
        *([f"| {b['file']} | the backbone's weights, byte for byte |"] if b.get("file") else []),
        "| results.json | the run's rows of the `results` table |", ""])


def export_command(out: Path, run: str | None, dataset: str | None, selection: str, include_backbone: bool,
                   device: str, home: Path | None, config: Path | None) -> None:
    import typer

    from pipeline.commands import session
    from pipeline.commands.configs import resolve_device
    from pipeline.commands.runs import trained_run

    if selection not in ("last", "best-heldout"):
        raise UserError("--selection must be last or best-heldout", 2)
    if run is None and dataset is None:
        raise UserError("which run? give --run KEY or --dataset D (its latest run)", 2)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; choose a new one", 2)
    runner = session.make_runner(home)
    if runner.store.manages(out):
        raise UserError(f"--out {out} lies in the home's artifacts/ or runs/, whose files `gc` collects; "
                        "choose a folder outside them", 2)
    tr = trained_run(runner, dataset, run)
    cfg = export_run(runner, session.load_config(config), tr, selection, out.resolve(),
                     session.torch_device(resolve_device(device, "fp32")[0]), include_backbone)
    size = sum(f.stat().st_size for f in out.iterdir())
    typer.echo(f"exported {tr.describe(selection)} on {cfg['dataset']} ({cfg['protocol']}, "
               f"{len(cfg['classes'])} classes) to {out}: {size / 1e6:.1f} MB"
               + (f", backbone weights included ({cfg['backbone']['file']})" if cfg["backbone"].get("file") else ""))
