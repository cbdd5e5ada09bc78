"""`train` (adapters, the full fine-tuning baseline, the tiny CLIP's pre-training) and `params` (what
the adapters of a configuration hold)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import typer

from cache.errors import UserError
from pipeline.commands import session
from pipeline.commands.configs import ParamsOptions, TrainOptions, resolve_device
from pipeline.commands.flags import COUNT, check_flags
from pipeline.commands.options import check, resolve


def train_command(given: dict[str, Any], recipe: str | None, seeds: str | None, steps: int, out: Path | None,
                  force: bool, dry_run: bool, no_progress: bool, home: Path | None, config: Path | None) -> None:
    from pipeline.commands.dag import train_request
    from pipeline.commands.presets import preset

    cfg = session.load_config(config)
    values = preset(recipe, given, cfg) if recipe else {}
    opts = resolve(TrainOptions, given, values)
    opts.check()
    if opts.method == "pretrain":
        check_flags({"steps": steps}, {"steps": COUNT})
        pretrain(opts.backbone, steps, given.get("batch_size", 128), opts.lr, opts.seed, opts.device, out, force,
                 dry_run, no_progress, home)
        return
    runner = session.make_runner(home, progress=not no_progress)
    for one_seed in session.seed_list(seeds, opts.seed):
        one = replace(opts, seed=one_seed)
        req = train_request(runner, cfg, one)
        if dry_run:
            print_resolved(req, one, {**given, **({"seed": one_seed} if seeds else {})}, values, recipe)
        art = session.launch_materialise(runner, home, req, force, dry_run)
        if art is not None and int(os.environ.get("RANK", "0")) == 0:
            typer.echo(f"{runner.target(req)}: {runner.stage('train').configuration(req, {})}")
            typer.echo(f"adapters: {art.path}" if opts.method == "adapter" else f"weights: {art.path}")
            if art.meta.get("best_epoch"):
                typer.echo(f"best held-out epoch {art.meta['best_epoch']} (accuracy {art.meta['best_heldout_acc']:.3f})")


def print_resolved(req: Any, opts: TrainOptions, given: dict[str, Any], values: dict[str, Any],
                   recipe: str | None) -> None:
    """The fully resolved training config, like the dump at the top of each of the authors' logs, with
    where each option's value came from (flag, recipe or default)."""
    typer.echo("options (where each value came from):")
    for f in fields(opts):
        source = "flag" if f.name in given else f"recipe {recipe}" if f.name in values else "default"
        typer.echo(f"  {f.name}: {json.dumps(getattr(opts, f.name))}  ({source})")
    typer.echo("resolved run params (the key):")
    for key, value in sorted(req.params.items()):
        typer.echo(f"  {key}: {json.dumps(value, sort_keys=True)}")
    train_list = req.inputs["frames_train"].params
    typer.echo(f"  train list: {train_list['dataset']}:{train_list['list']}"
               + (f" (drawn: {json.dumps(train_list['select'])})" if train_list.get("select") else ""))


def pretrain(backbone: str | None, steps: int, batch_size: int, lr: float, seed: int, device: str, out: Path | None,
             force: bool, dry_run: bool, no_progress: bool, home: Path | None) -> None:
    """`train --method pretrain`: the tiny world CLIP, contrastive on captioned still images."""
    import shutil

    from stages.engine.stage import Request

    device, _ = resolve_device(device, "fp32")
    if backbone in (None, "ViT-B-16"):
        backbone = "msta-world"  # the only sensible default: pre-training a real CLIP is out of scope
    req = Request("pretrain", {"config": backbone, "steps": steps, "batch_size": batch_size, "lr": lr,
                               "seed": seed, "device": device})
    runner = session.make_runner(home, progress=not no_progress)
    art = session.materialise(runner, home, [req], force, dry_run)[0]
    if art is not None:
        typer.echo(f"weights: {art.path}")
        for key, value in art.meta.items():
            typer.echo(f"  {key}: {value}")
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(art.path, out)
            typer.echo(f"copied to {out}")


def params_command(given: dict[str, Any]) -> None:
    from msta.method.backbone import BackboneError
    from msta.method.params import format_parameter_table, parameter_table

    o = resolve(ParamsOptions, given)
    check(o)
    adapter = TrainOptions(**asdict(o)).adapter_config()
    try:
        typer.echo(format_parameter_table(parameter_table(o.backbone, adapter)))
    except (ValueError, BackboneError) as exc:
        raise UserError(str(exc), 2) from None
