"""What `msta-pipe evaluate` evaluates: which run, which lists, which checkpoints, and the
base-to-novel harmonic mean that combines two evaluations."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cache.errors import UserError
from msta.method.metrics import harmonic_mean
from pipeline.commands.dag import EvalTarget, evaluate_request
from stages.engine.stage import Request


def find_run(runner: Any, dataset: str, run: str | None, seed: int | None = None) -> Request:
    """One training run: by key prefix, else the latest completed one on `dataset` (with training seed
    `seed`, when given), refused when the dataset's runs are of several configurations."""
    from pipeline.commands.runs import run_row

    if not runner.catalog.exists():
        raise UserError("no catalog yet: train a run first (msta-pipe train ...)", 2)
    with runner.catalog.reader() as con:
        return Request.from_json(json.loads(run_row(con, dataset, run, seed)["request"]))


def runs_to_evaluate(runner: Any, dataset: str, run: str | None, seed: int | None) -> list[Request]:
    """The runs `evaluate` tests: the one with key `run`, else the latest completed run of every
    configuration, seed and split trained on `dataset`, so that no configuration's run is left out."""
    from pipeline.commands.runs import latest_per_target

    if run is not None:
        return [find_run(runner, dataset, run)]
    if not runner.catalog.exists():
        raise UserError("no catalog yet: train a run first (msta-pipe train ...)", 2)
    with runner.catalog.reader() as con:
        rows = latest_per_target(con, dataset, seed)
    if not rows:
        raise UserError(f"no completed training run on dataset {dataset!r}"
                        + ("" if seed is None else f" with seed {seed}") + ": train one, pass --run KEY, or use --frozen", 2)
    return [Request.from_json(json.loads(r["request"])) for r in rows]


def targets_for(config: Any, dataset: str, list_name: str | None, protocol: str | None) -> list[EvalTarget]:
    if list_name is not None:
        return [EvalTarget(config.dataset(dataset), list_name, "top1")]
    if protocol == "base2novel":
        parent = dataset[: -len("-base")] if dataset.endswith("-base") else dataset
        return [EvalTarget(config.dataset(f"{parent}-base"), "val", "base"),
                EvalTarget(config.dataset(f"{parent}-novel"), "val", "novel")]
    ds = config.dataset(dataset)
    if protocol not in (None, "zero-shot"):
        return [EvalTarget(ds, "test", "top1")]  # few-shot and supervised: split 1 (msta/METHOD.md §3)
    # zero-shot targets are reported as mean and std over their test splits (HMDB-51, UCF-101: three)
    splits = [name for name in ("test", "test_2", "test_3") if name in ds.lists] or ["test"]
    return [EvalTarget(ds, name, "top1") for name in splits]


def run_evaluation(runner: Any, config: Any, dataset: str, list_name: str | None, run: str | None, frozen: bool,
                   selection: str, backbone: str, pretrained: str | None, device: str, precision: str,
                   workers: int, force: bool, dry_run: bool, seed: int | None = None,
                   materialise: Callable[..., Any] | None = None, skip_missing: bool = False,
                   dedupe: bool = False) -> list[tuple[Any, ...]]:
    """The evaluations a command asks for, run through `materialise` (the runner's, or one rank's
    share of a torchrun launch, which gives None on the other ranks); rows to print, each naming the
    run (key and configuration) it measures."""
    models: list[Request | None] = [None] if frozen else runs_to_evaluate(runner, dataset, run, seed)
    out: list[tuple[Any, ...]] = []
    for model in models:
        label = _run_label(runner, model)
        if model is not None:
            runner.echo(f"evaluate {label}")
        for row in _evaluate_one(runner, config, dataset, list_name, model, selection, backbone, pretrained, device,
                                 precision, workers, force, dry_run, materialise or runner.materialise,
                                 {"skip_missing": skip_missing, "dedupe": dedupe}):
            out.append((row[0], row[1], label, *row[2:]))
    return out


def _run_label(runner: Any, model: Request | None) -> str:
    if model is None:
        return "frozen"
    p = model.params
    return f"{runner.stage('train').configuration(model, {})} seed {p['seed']} split {p['split_seed']}"


def _evaluate_one(runner: Any, config: Any, dataset: str, list_name: str | None, model: Request | None,
                  selection: str, backbone: str, pretrained: str | None, device: str, precision: str, workers: int,
                  force: bool, dry_run: bool, materialise: Callable[..., Any],
                  data: dict[str, bool]) -> list[tuple[Any, ...]]:
    protocol = None if model is None else model.params["protocol"]
    if model is not None:
        backbone, pretrained = model.params["backbone"], model.params["pretrained"] or None
    template = model.params["template"] if model is not None else "a video of {}."
    if model is None:
        selections = ["none"]
    elif selection == "both":
        selections = ["last"] + (["best-heldout"] if "frames_heldout" in model.inputs else [])
    else:
        if selection == TEST_SELECTED and (model is None or model.params.get("method") != "adapter"):
            raise UserError("--selection test-max needs a trained adapter run (its epoch snapshots)", 2)
        if selection == "best-heldout" and "frames_heldout" not in model.inputs:
            raise UserError("this run had no held-out videos, so no epoch was selected: use --selection last", 2)
        selections = [selection]
    out: list[tuple[Any, ...]] = []
    if selections == [TEST_SELECTED]:
        return _test_selected(runner, model, targets_for(config, dataset, list_name, protocol), dataset, backbone,
                              pretrained, template, device, precision, workers, force, dry_run, data)
    for sel in selections:
        metrics: dict[str, tuple[float, Any]] = {}
        for target in targets_for(config, dataset, list_name, protocol):
            req = evaluate_request(runner, target, model, sel, backbone, pretrained, template, device, precision,
                                   workers, **data)
            art = materialise(req, force=force, dry_run=dry_run)
            if art is None:
                continue
            for name in ("top1", "top5"):
                out.append((target.dataset.name, target.list_name, sel, name, round(art.meta[name], 4)))
            if target.role in ("base", "novel"):
                metrics[target.role] = (art.meta["top1"], art)
        if len(metrics) == 2:
            out.append(_record_harmonic_mean(runner, dataset, sel, metrics))
    return out


TEST_SELECTED = "test-max"  # the epoch with the best test accuracy, as the authors report: labelled so


def _test_selected(runner: Any, model: Request, targets: list[Any], dataset: str, backbone: str,
                   pretrained: str | None, template: str, device: str, precision: str, workers: int,
                   force: bool, dry_run: bool, data: dict[str, bool]) -> list[tuple[Any, ...]]:
    """The authors' selection, for a like-for-like comparison: every epoch snapshot is tested on the
    first target (the test list; base classes for base-to-novel), the best one is kept, and every
    target is reported at that epoch under selection `test-max`. The test list chooses the
    checkpoint here, so these figures are optimistic by construction."""
    from cache.catalog import insert_rows, rows_as_dicts, utcnow

    trained = runner.materialise(model, dry_run=dry_run)
    if trained is None:
        return []
    epochs = sorted(trained.meta.get("snapshots", {}), key=int)
    if not epochs:
        raise UserError("this run kept no epoch snapshots (trained before they existed): retrain it with --force", 2)

    def evaluated(target: Any, epoch: str) -> Any:
        req = evaluate_request(runner, target, model, f"epoch:{epoch}", backbone, pretrained, template, device,
                               precision, workers, **data)
        return runner.materialise(req, force=force, dry_run=dry_run)

    first = {e: evaluated(targets[0], e) for e in epochs}
    if any(a is None for a in first.values()):
        return []
    best = max(epochs, key=lambda e: (first[e].meta["top1"], -int(e)))  # the earliest of equal maxima
    runner.echo(f"       test-selected epoch {best} of {', '.join(epochs)} "
                f"(top-1 on {targets[0].dataset.name}:{targets[0].list_name} {first[best].meta['top1']:.3f})")
    out: list[tuple[Any, ...]] = []
    metrics: dict[str, tuple[float, Any]] = {}
    for target in targets:
        art = first[best] if target is targets[0] else evaluated(target, best)
        with runner.catalog.transaction() as con:
            rows = rows_as_dicts(con, "SELECT * FROM results WHERE run_key = ? AND dataset = ? AND split = ? "
                                      "AND selection = ?", [art.meta["run_key"], target.dataset.name,
                                                            target.list_name, f"epoch:{best}"])
            insert_rows(con, "results", [{**r, "selection": TEST_SELECTED, "created_at": utcnow()} for r in rows],
                        "OR REPLACE")
        for name in ("top1", "top5"):
            out.append((target.dataset.name, target.list_name, f"{TEST_SELECTED} (epoch {best})", name,
                        round(art.meta[name], 4)))
        if target.role in ("base", "novel"):
            metrics[target.role] = (art.meta["top1"], art)
    if len(metrics) == 2:
        out.append(_record_harmonic_mean(runner, dataset, TEST_SELECTED, metrics))
    return out


def _record_harmonic_mean(runner: Any, dataset: str, sel: str, metrics: dict[str, tuple[float, Any]]) -> tuple[Any, ...]:
    from cache.catalog import insert_rows, utcnow

    base, art = metrics["base"]
    novel = metrics["novel"][0]
    hm = harmonic_mean(base, novel)
    parent = dataset[: -len("-base")] if dataset.endswith("-base") else dataset
    meta = art.meta
    with runner.catalog.transaction() as con:
        con.execute("DELETE FROM results WHERE run_key=? AND dataset=? AND split='val' AND metric='hm' AND selection=?",
                    [meta["run_key"], parent, sel])
        insert_rows(con, "results", [{
            "run_key": meta["run_key"], "protocol": "base2novel", "dataset": parent, "split": "val", "metric": "hm",
            "value": hm, "views": meta["views"], "checkpoint_digest": meta["checkpoint"], "selection": sel,
            "created_at": utcnow()}])
    return (parent, "base+novel", sel, "hm", round(hm, 4))


def evaluate_command(dataset: str, list_name: str | None, run: str | None, seeds: str | None, frozen: bool,
                     selection: str, backbone: str | None, pretrained: str | None, device: str, precision: str,
                     workers: int, skip_missing: bool, dedupe: bool, force: bool, dry_run: bool, no_progress: bool,
                     home: Path | None, config: Path | None) -> None:
    """`msta-pipe evaluate`: every run it picks, on the lists its protocol tests on; one row per metric,
    each naming the run."""
    import contextlib

    from pipeline.commands import session
    from pipeline.commands.configs import resolve_device

    if selection not in ("last", "best-heldout", "both", "test-max"):
        raise UserError("--selection must be last, best-heldout, both or test-max", 2)
    launched = session.launched() and not dry_run
    if launched and selection == "test-max":
        raise UserError("--selection test-max picks an epoch between evaluations: run it in one process, "
                        "without torchrun", 2)
    if seeds is not None and (run is not None or frozen):
        raise UserError("--seeds picks runs by their seed: do not combine it with --run or --frozen", 2)
    device, precision = resolve_device(device, precision)
    runner = session.make_runner(home, progress=not no_progress)
    rows: list[Any] = []
    # Under torchrun every rank scores its share of each list; rank 0 takes the writer lock per stage.
    materialise = (lambda req, force, dry_run: session.launch_materialise(runner, home, req, force, dry_run)) \
        if launched else runner.materialise
    with (session.writing(home) if not dry_run and not launched else contextlib.nullcontext()):
        for seed in (session.seed_list(seeds, 0) if seeds is not None else [None]):
            rows += run_evaluation(runner, session.load_config(config), dataset, list_name, run, frozen, selection,
                                   *session.backbone_pair(backbone, pretrained), device, precision, workers, force,
                                   dry_run, seed, materialise, skip_missing, dedupe)
    if rows:
        session.print_rows(["dataset", "split", "run", "selection", "metric", "value"], rows, "table")


def features_command(dataset: str, list_name: str, run: str | None, frozen: bool, selection: str,
                     backbone: str | None, pretrained: str | None, device: str, precision: str, workers: int,
                     skip_missing: bool, dedupe: bool, force: bool, dry_run: bool, no_progress: bool,
                     home: Path | None, config: Path | None) -> None:
    """`msta-pipe features`: the video embeddings of a list, one artifact per run."""
    import typer

    from pipeline.commands import session
    from pipeline.commands.configs import resolve_device
    from pipeline.commands.dag import features_request
    from pipeline.commands.flags import NON_NEGATIVE, check_flags

    check_flags({"workers": workers}, {"workers": NON_NEGATIVE})
    if selection not in ("last", "best-heldout"):
        raise UserError("--selection must be last or best-heldout", 2)
    if frozen and run is not None:
        raise UserError("--frozen and --run exclude each other", 2)
    if (backbone or pretrained) and not frozen:
        raise UserError("--backbone/--pretrained go with --frozen; a run knows its backbone", 2)
    device, precision = resolve_device(device, precision)
    runner = session.make_runner(home, progress=not no_progress)
    model = None if frozen else find_run(runner, dataset, run)
    if model is not None:
        if selection == "best-heldout" and "frames_heldout" not in model.inputs:
            raise UserError("this run had no held-out videos, so no epoch was selected: use --selection last", 2)
        backbone, pretrained = model.params["backbone"], model.params["pretrained"] or None
        typer.echo(f"features of {runner.stage('train').configuration(model, {})}, seed {model.params['seed']}, "
                   f"split {model.params['split_seed']} ({selection} weights)")
    else:
        backbone, pretrained = session.backbone_pair(backbone, pretrained)
    req = features_request(runner, session.load_config(config).dataset(dataset), list_name, model,
                           "none" if frozen else selection, backbone, pretrained, device, precision, workers,
                           skip_missing=skip_missing, dedupe=dedupe)
    art = session.launch_materialise(runner, home, req, force, dry_run)  # rank 0 of a torchrun launch, or the one process
    if art is not None:
        typer.echo(f"video embeddings: {art.path} ({art.meta['dim']}-d, {art.meta['views']} views a video); "
                   "query them as the view video_embeddings")
