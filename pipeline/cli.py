"""`msta-pipe`: the command line. Heavy modules (torch, open_clip, duckdb, pyarrow) are imported
inside the commands that need them, so `msta-pipe --help` starts at once."""
from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cache.errors import UserError, error_line, one_line, scrub
from pipeline.commands.configs import TrainOptions
from pipeline.commands.options import with_options

app = typer.Typer(
    name="msta-pipe",
    help="MSTA video adapters for CLIP as a cached, content-addressed pipeline: LLM class descriptions, "
         "frozen text embeddings, cached video frames, adapter training and evaluation. Every stage is "
         "keyed by its parameters, input contents and code version in a DuckDB catalog under --home.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

Home = Annotated[Optional[Path], typer.Option(
    "--home", help="Pipeline home holding catalog.duckdb and artifacts/ [env MSTA_HOME; default ./.msta]",
    show_default=False)]
ConfigPath = Annotated[Optional[Path], typer.Option(
    "--config", help="Dataset config (TOML) [default ./msta.toml when it exists]", show_default=False)]
Dataset = Annotated[str, typer.Option("--dataset", "-d", help="Dataset name: built-in (ssv2, k400, k600, "
                                      "hmdb51, ucf101, NAME-base, NAME-novel, k600-zs1..3) or declared in the config")]
Labels = Annotated[Optional[Path], typer.Option(
    "--labels", help="Class list file for the dataset (overrides the config): `id,name` CSV, SSv2 labels.json, "
                     "UCF-101 classInd.txt or one name per line", show_default=False)]
Force = Annotated[bool, typer.Option("--force", help="Run the stage even if its result is cached "
                                     "(item caches such as LLM answers are still used)")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Say what would run and why; change nothing")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="Hide progress bars")]
BACKBONE_HELP = ("open_clip model name (ViT-B-16, ViT-B-16-quickgelu, msta-world, ...), ViCLIP-B-16, or an "
                 "open_clip folder (open_clip_config.json + one weights file) as local-dir:PATH or just PATH "
                 "[default: ViT-B-16]")
PRETRAINED_HELP = ("Weights: a shipped short name (synthetic-world, for --backbone msta-world), a local "
                   ".safetensors/.pt/.bin file (OpenAI's converted weights are detected and built with "
                   "QuickGELU), an open_clip folder, an open_clip tag already in the local cache "
                   "(openai, laion2b_s34b_b88k, ...), or 'random' for random init "
                   "[default: openai for open_clip names; a folder's own weights]")
Backbone = Annotated[Optional[str], typer.Option("--backbone", help=BACKBONE_HELP, show_default=False)]
Pretrained = Annotated[Optional[str], typer.Option("--pretrained", help=PRETRAINED_HELP, show_default=False)]
FrozenBackbone = Annotated[Optional[str], typer.Option("--backbone", help="--frozen: " + BACKBONE_HELP,
                                                       show_default=False)]
FrozenPretrained = Annotated[Optional[str], typer.Option("--pretrained", help="--frozen: " + PRETRAINED_HELP,
                                                         show_default=False)]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N")]
Precision = Annotated[str, typer.Option("--precision", help="auto, fp32, bf16 or fp16")]
Workers = Annotated[int, typer.Option("--workers", help="Data-loading worker processes")]


def home_dir(home: Path | None) -> Path:
    path = (home or Path(os.environ.get("MSTA_HOME", ".msta"))).resolve()
    if path.exists() and not path.is_dir():
        raise UserError(f"the home {path} (--home / MSTA_HOME) is a file, not a folder", 2)
    return path


def load_config(config: Path | None) -> Any:
    from pipeline.formats.datasets import Config

    if config is None and Path("msta.toml").exists():
        config = Path("msta.toml")
    return Config(config)


def make_runner(home: Path | None, **options: Any) -> Any:
    from pipeline.commands.dag import stage_for
    from pipeline.engine.runner import Runner

    return Runner(home_dir(home), stage_for, options, echo=lambda s: typer.echo(scrub(s), err=False))


def writing(home: Path | None) -> Any:
    """The home's writer lock for commands that change it (see cache/lock.py)."""
    from cache.lock import HomeLock

    return HomeLock(home_dir(home))


@app.command()
def describe(
    dataset: Dataset,
    labels: Labels = None,
    kind: Annotated[str, typer.Option(help="spatial, temporal or both")] = "both",
    n: Annotated[Optional[int], typer.Option("--n", help="Descriptions per class and kind "
                 "[default 2; for --from-file: the count most classes have]", show_default=False)] = None,
    model: Annotated[str, typer.Option(help="Model name at the endpoint [env MSTA_LLM_MODEL]")] = "gpt-4o-mini",
    base_url: Annotated[Optional[str], typer.Option(
        "--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (vLLM, llama.cpp, Ollama, "
                           "DeepSeek) [env OPENAI_BASE_URL; default OpenAI]; a query string (?api-version=...) is "
                           "sent with every request. The key comes from OPENAI_API_KEY, never from the URL.",
        show_default=False)] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature")] = 0.7,
    max_tokens: Annotated[int, typer.Option(help="Answer length limit per request")] = 400,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed sent to the endpoint")] = 0,
    max_reasks: Annotated[int, typer.Option(help="How often an invalid answer is answered back per class")] = 2,
    concurrency: Annotated[int, typer.Option(help="Requests in flight")] = 8,
    timeout: Annotated[float, typer.Option(help="Seconds per request before it counts as failed")] = 60.0,
    prompt_dir: Annotated[Optional[Path], typer.Option(
        help="Folder with your own system.j2, spatial.j2, temporal.j2, reask.j2, frames.toml "
             "[default: the packaged prompts/]", show_default=False)] = None,
    from_file: Annotated[Optional[Path], typer.Option(
        "--from-file", help="Import descriptions instead of asking an LLM: the MSTA authors' "
                            '{"<class id>": [sentences]} or CuPL/DCLIP {"<class name>": [sentences]} JSON; '
                            "needs --kind spatial or temporal", show_default=False)] = None,
    force: Force = False,
    dry_run: DryRun = False,
    no_progress: NoProgress = False,
    home: Home = None,
    config: ConfigPath = None,
) -> None:
    """LLM-written spatial and temporal descriptions of every class, cached per request.

    A rerun sends no request whose answer is stored; an interrupted run resumes where it stopped.
    Answers that are not JSON, have the wrong count, empty or repeated phrases, or sentences over
    CLIP's 77-token context are answered back (--max-reasks); classes that still fail are listed
    and the command exits 1 (with --kind both, after the other kind has run). --force also forgets
    whether the endpoint takes response_format json_schema. Inspect the result with
    `msta-pipe sql "select * from descriptions where dataset='NAME'"`.
    """
    from pipeline.commands.dag import LLMOptions, describe_import_request, describe_llm_request
    from prompts import KINDS, PROMPT_DIR

    if kind not in (*KINDS, "both"):
        raise UserError(f"--kind must be spatial, temporal or both, not {kind!r}", 2)
    kinds = list(KINDS) if kind == "both" else [kind]
    if n is not None and n < 1:
        raise UserError("--n must be at least 1", 2)
    if not (math.isfinite(temperature) and 0 <= temperature <= 2):
        raise UserError(f"--temperature must be a number from 0 to 2, not {temperature}", 2)
    if not (math.isfinite(timeout) and timeout > 0):
        raise UserError(f"--timeout must be a positive number of seconds, not {timeout}", 2)
    if max_tokens < 1 or concurrency < 1 or max_reasks < 0:
        raise UserError("--max-tokens and --concurrency must be at least 1, --max-reasks at least 0", 2)
    pdir = (prompt_dir or PROMPT_DIR).resolve()
    runner = make_runner(home, progress=not no_progress)
    ds = load_config(config).dataset(dataset, labels)
    if from_file is not None:
        if kind == "both":
            raise UserError("--from-file holds one kind of description: pass --kind spatial or --kind temporal", 2)
        requests = [describe_import_request(runner, ds, kind, from_file, n, pdir)]
    else:
        from prompts.llm import normalise_endpoint, resolve_api_key

        url = base_url or os.environ.get("OPENAI_BASE_URL")
        try:
            endpoint = normalise_endpoint(url)
        except ValueError as exc:
            raise UserError(str(exc), 2) from None
        if not dry_run:
            resolve_api_key(bool(url))  # fails before anything runs when no endpoint can be reached
        opts = LLMOptions(model=os.environ.get("MSTA_LLM_MODEL", model) if model == "gpt-4o-mini" else model,
                          endpoint=endpoint, base_url_given=bool(url), n=n or 2, temperature=temperature,
                          max_tokens=max_tokens, seed=seed, max_reasks=max_reasks, concurrency=concurrency,
                          timeout=timeout, prompt_dir=pdir)
        requests = [describe_llm_request(runner, ds, k, opts) for k in kinds]
    if dry_run or len(requests) == 1:
        _materialise(runner, home, requests, force, dry_run)
        return
    failed = []
    with writing(home):
        for req in requests:  # the kinds are independent: a failed one must not stop the other
            try:
                runner.materialise(req, force=force)
            except UserError as exc:
                if exc.exit_code != 1:
                    raise
                failed.append(str(exc))
    if failed:
        raise UserError("; ".join(failed), 1)


def _materialise(runner: Any, home: Path | None, requests: list[Any], force: bool, dry_run: bool) -> list[Any]:
    if dry_run:
        return [runner.materialise(r, force=force, dry_run=True) for r in requests]
    with writing(home):
        return [runner.materialise(r, force=force) for r in requests]


@app.command()
def embed(
    dataset: Dataset,
    backbone: Backbone = None,
    pretrained: Pretrained = None,
    batch_size: Annotated[int, typer.Option(help="Descriptions per forward pass")] = 256,
    device: Device = "auto",
    force: Force = False,
    dry_run: DryRun = False,
    home: Home = None,
    config: ConfigPath = None,
) -> None:
    """Embed every stored description of a dataset with the frozen text tower (no adapters) into Parquet.

    Also stores the per-class normalised means D_c (spatial and temporal) that the consistency loss
    uses; `text_embeddings` in SQL shows them with `embedding` cast to FLOAT[D], ready for
    array_cosine_similarity. Runs describe first if its result is stale.
    """
    from pipeline.commands.dag import embed_request

    runner = make_runner(home)
    ds = load_config(config).dataset(dataset)
    req = embed_request(runner, ds, *_backbone(backbone, pretrained), batch_size, device)
    _materialise(runner, home, [req], force, dry_run)


@app.command()
def frames(
    dataset: Dataset,
    list_name: Annotated[str, typer.Option("--list", help="Video list name of the dataset (train, test, "
                                           "few_shot_2, train_s1, val, ...)")],
    mode: Annotated[Optional[str], typer.Option(help="train (TSN draws, short side for random crops) or test "
                    "(clips for multi-view testing) [default: train for lists named train*/few_shot*, else test]",
                    show_default=False)] = None,
    shots: Annotated[Optional[int], typer.Option(help="Draw this many videos per class from the list "
                     "(stratified, reproducible with --seed)", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --shots draw")] = 0,
    labels: Labels = None,
    workers: Annotated[int, typer.Option(help="Decoding processes")] = max(1, min(8, (os.cpu_count() or 2))),
    decoder: Annotated[Optional[str], typer.Option(help="decord or pyav [default: decord where installed]",
                       show_default=False)] = None,
    fmt: Annotated[str, typer.Option("--format", help="Cache format: jpeg (compact) or raw (uint8 npy)")] = "jpeg",
    skip_missing: Annotated[bool, typer.Option("--skip-missing", help="Leave out videos missing from disk "
                                               "instead of failing")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail when any video cannot be decoded")] = False,
    force: Force = False,
    dry_run: DryRun = False,
    no_progress: NoProgress = False,
    home: Home = None,
    config: ConfigPath = None,
) -> None:
    """Decode and sample the videos of a list once, caching uint8 frames that training reads.

    A rerun decodes nothing; after an interruption only the missing clips are decoded. Videos that
    cannot be decoded (corrupt, truncated, empty, not a video) are listed, recorded in the
    frame_failures table and left out; the command still succeeds unless --strict.
    """
    from pipeline.commands.dag import Selection, frames_request
    from pipeline.commands.flags import COUNT, check_flags

    check_flags({"shots": shots, "workers": workers}, {"shots": COUNT, "workers": COUNT})
    if decoder not in (None, "decord", "pyav"):
        raise UserError("--decoder must be decord or pyav", 2)
    if fmt not in ("jpeg", "raw"):
        raise UserError("--format must be jpeg or raw", 2)
    mode = mode or ("train" if list_name.startswith(("train", "few_shot")) else "test")
    if mode not in ("train", "test"):
        raise UserError("--mode must be train or test", 2)
    runner = make_runner(home, progress=not no_progress)
    ds = load_config(config).dataset(dataset, labels)
    req = frames_request(runner, ds, list_name, mode, Selection(shots, seed), decoder, fmt, skip_missing,
                         strict, workers)
    art = _materialise(runner, home, [req], force, dry_run)[0]
    if strict and art is not None and art.meta.get("failed"):  # a cached result is judged too
        raise UserError(f"{art.meta['failed']} videos of list {list_name!r} could not be decoded (--strict), e.g. "
                        f"{', '.join(art.meta['failed_videos'])}; see `msta-pipe sql \"select * from frame_failures\"`", 1)


def _backbone(backbone: str | None, pretrained: str | None) -> tuple[str, str | None]:
    """The one spelling of --backbone/--pretrained that keys and loading use."""
    from pipeline.commands.configs import canonical_backbone

    name, weights = canonical_backbone(backbone, pretrained)
    return name, weights or None


def _resolve_device(device: str, precision: str) -> tuple[str, str]:
    from pipeline.commands.configs import resolve_device

    return resolve_device(device, precision)


@app.command()
@with_options(TrainOptions)
def train(
    given: dict[str, Any],
    recipe: Annotated[Optional[str], typer.Option(help="A preset of flags: authors (every flag the MSTA authors' "
                      "logs fix for this protocol and dataset: backbone ViCLIP-B-16, DES_N, L_CC on/off, lr, schedule, "
                      "batch, adapters, seed, template, precision) or demo (the tiny world's recipe, see README). "
                      "Flags given explicitly always win; --dry-run prints where each value came from",
                      show_default=False)] = None,
    seeds: Annotated[Optional[str], typer.Option(help="Several training seeds, e.g. 2048,1,2: one cached run each "
                     "(instead of --seed); `report` shows mean ± std over them", show_default=False)] = None,
    steps: Annotated[int, typer.Option(help="pretrain: optimiser steps")] = 1000,
    out: Annotated[Optional[Path], typer.Option(help="pretrain: also copy the weights here", show_default=False)] = None,
    force: Force = False,
    dry_run: DryRun = False,
    no_progress: NoProgress = False,
    home: Home = None,
    config: ConfigPath = None,
) -> None:
    """Train MSTA adapters (or a baseline) against the cached artifacts, running stale upstream stages first.

    Defaults follow the authors' recipe; `--recipe authors` also sets what their logs fix per protocol and
    dataset. A run is one configuration (every option but the seed and split) and one repeat (seed, split):
    `report` aggregates repeats of a configuration and never two configurations. A checkpoint is written
    every epoch; rerunning a killed training resumes from it. Multi-GPU:
    `torchrun --nproc_per_node N -m pipeline train ...` (rank 0 alone writes the catalog and artifacts).
    """
    from dataclasses import replace

    from pipeline.commands.dag import train_request
    from pipeline.commands.options import resolve
    from pipeline.commands.presets import preset

    cfg = load_config(config)
    values = preset(recipe, given, cfg) if recipe else {}
    opts = resolve(TrainOptions, given, values)
    opts.check()
    if opts.method == "pretrain":
        _pretrain(opts.backbone, steps, given.get("batch_size", 128), opts.lr, opts.seed, opts.device, out, force,
                  dry_run, no_progress, home)
        return
    runner = make_runner(home, progress=not no_progress)
    for one_seed in _seed_list(seeds, opts.seed):
        req = train_request(runner, cfg, replace(opts, seed=one_seed))
        if dry_run:
            _print_resolved(req, opts, given, values, recipe)
        art = _launch_materialise(runner, home, req, force, dry_run)
        if art is not None and int(os.environ.get("RANK", "0")) == 0:
            stage = runner.stage("train")
            typer.echo(f"{runner.target(req)}: {stage.configuration(req, {})}")
            typer.echo(f"adapters: {art.path}" if opts.method == "adapter" else f"weights: {art.path}")
            if art.meta.get("best_epoch"):
                typer.echo(f"best held-out epoch {art.meta['best_epoch']} (accuracy {art.meta['best_heldout_acc']:.3f})")


def _seed_list(seeds: str | None, seed: int) -> list[int]:
    if seeds is None:
        return [seed]
    try:
        values = [int(v) for v in seeds.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--seeds {seeds!r}: expected comma-separated integers, e.g. 2048,1,2", 2) from None
    if not values or len(set(values)) != len(values) or min(values) < 0:
        raise UserError(f"--seeds {seeds!r}: give distinct non-negative integers", 2)
    return values


def _print_resolved(req: Any, opts: Any, given: dict[str, Any], values: dict[str, Any], recipe: str | None) -> None:
    """The fully resolved training config, like the dump at the top of each of the authors' logs, with
    where each option's value came from (flag, recipe or default)."""
    import json
    from dataclasses import fields

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


def _launched() -> bool:
    """Whether this process is one rank of a torchrun launch of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _launch_materialise(runner: Any, home: Path | None, req: Any, force: bool, dry_run: bool) -> Any:
    """Single process, or one rank of a torchrun launch: rank 0 runs upstream stages and registers
    the result; the other ranks wait, then work alongside it without touching the catalog, and
    get None (rank 0 alone reports)."""
    if not _launched() or dry_run:
        return _materialise(runner, home, [req], force, dry_run)[0]
    from msta.method.runtime import barrier, init_distributed

    rank, _, _ = init_distributed()
    if rank == 0:
        with writing(home):
            for inp in req.inputs.values():
                if hasattr(inp, "stage"):
                    runner.materialise(inp)
    barrier()
    if rank == 0:
        with writing(home):
            art = runner.materialise(req, force=force)
    else:
        runner.follow(req, force=force)
        art = None
    barrier()
    return art


def _pretrain(backbone: str | None, steps: int, batch_size: int, lr: float, seed: int, device: str, out: Path | None,
              force: bool, dry_run: bool, no_progress: bool, home: Path | None) -> None:
    import shutil

    from pipeline.engine.stage import Request

    device, _ = _resolve_device(device, "fp32")
    if backbone in (None, "ViT-B-16"):
        backbone = "msta-world"  # the only sensible default: pre-training a real CLIP is out of scope
    req = Request("pretrain", {"config": backbone, "steps": steps, "batch_size": batch_size, "lr": lr,
                               "seed": seed, "device": device})
    runner = make_runner(home, progress=not no_progress)
    art = _materialise(runner, home, [req], force, dry_run)[0]
    if art is not None:
        typer.echo(f"weights: {art.path}")
        for key, value in art.meta.items():
            typer.echo(f"  {key}: {value}")
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(art.path, out)
            typer.echo(f"copied to {out}")


@app.command()
def evaluate(
    dataset: Dataset,
    list_name: Annotated[Optional[str], typer.Option("--list", help="Video list to test on [default: what the "
                         "run's protocol tests on: test; base2novel: NAME-base val and NAME-novel val]",
                         show_default=False)] = None,
    run: Annotated[Optional[str], typer.Option(help="Key (or a unique prefix) of the training run "
                   "[default: the latest adapter run on the dataset]", show_default=False)] = None,
    seeds: Annotated[Optional[str], typer.Option(help="Evaluate the latest run of each of these training seeds "
                     "(as given to train --seeds), e.g. 2048,1,2", show_default=False)] = None,
    frozen: Annotated[bool, typer.Option("--frozen", help="Evaluate the frozen backbone (frame-mean zero-shot)")] = False,
    selection: Annotated[str, typer.Option(help="last, best-heldout, both, or test-max: the epoch snapshot "
                         "(epochs 1, 6, ..., last) with the best test top-1, as the authors report (labelled "
                         "test-max in results: the test list selects it, so it is optimistic)")] = "both",
    backbone: FrozenBackbone = None,
    pretrained: FrozenPretrained = None,
    device: Device = "auto",
    precision: Precision = "auto",
    workers: Workers = 2,
    force: Force = False,
    dry_run: DryRun = False,
    no_progress: NoProgress = False,
    home: Home = None,
    config: ConfigPath = None,
) -> None:
    """Multi-view test of a trained run or the frozen CLIP: top-1, top-5, per-class accuracy, confusion PNG.

    Results go to the `results` table (metrics top1, top5; base, novel and hm for base-to-novel), with the
    run key, views, checkpoint digest and selection rule (`last`, or `best-heldout`: the epoch chosen on
    held-out training videos; the test list never selects anything). Over GPUs:
    `torchrun --nproc_per_node N -m pipeline evaluate ...` gives each process every N-th video of a list;
    rank 0 gathers the scores and writes the same rows one process would.
    """
    from pipeline.commands.evaluation import run_evaluation

    if selection not in ("last", "best-heldout", "both", "test-max"):
        raise UserError("--selection must be last, best-heldout, both or test-max", 2)
    launched = _launched() and not dry_run
    if launched and selection == "test-max":
        raise UserError("--selection test-max picks an epoch between evaluations: run it in one process, "
                        "without torchrun", 2)
    device, precision = _resolve_device(device, precision)
    runner = make_runner(home, progress=not no_progress)
    if seeds is not None and (run is not None or frozen):
        raise UserError("--seeds picks runs by their seed: do not combine it with --run or --frozen", 2)
    rows: list[Any] = []
    # Under torchrun every rank scores its share of each list; rank 0 takes the writer lock per stage.
    materialise = (lambda req, force, dry_run: _launch_materialise(runner, home, req, force, dry_run)) \
        if launched else runner.materialise
    with (writing(home) if not dry_run and not launched else contextlib.nullcontext()):
        for seed in (_seed_list(seeds, 0) if seeds is not None else [None]):
            rows += run_evaluation(runner, load_config(config), dataset, list_name, run, frozen, selection,
                                   *_backbone(backbone, pretrained), device, precision, workers, force, dry_run,
                                   seed, materialise)
    if rows:
        _print_rows(["dataset", "split", "run", "selection", "metric", "value"], rows, "table")


@app.command()
def report(
    format: Annotated[str, typer.Option("--format", help="markdown or csv")] = "markdown",
    authors_logs: Annotated[Optional[Path], typer.Option(help="Folder of the MSTA authors' training logs: print "
                            "their logged accuracies (test-selected and last epoch) beside ours",
                            show_default=False)] = None,
    home: Home = None,
) -> None:
    """All results as Markdown tables shaped like the paper's, with the paper's numbers beside ours."""
    from pipeline.commands.report import render

    logs = None
    if authors_logs is not None:
        from pipeline.commands.authors import read_logs

        logs = read_logs(authors_logs)
    typer.echo(render(make_runner(home).catalog, format, logs))


@app.command()
def params(
    backbone: Backbone = None,
    adapter_dim: Annotated[int, typer.Option(help="Bottleneck width r")] = 128,
    adapter_layers: Annotated[str, typer.Option(help="Adapted blocks, 1-based inclusive")] = "8-12",
    temporal_branch: Annotated[str, typer.Option(help="paper or bottleneck")] = "paper",
    no_temporal: Annotated[bool, typer.Option("--no-temporal", help="Ablation: no temporal branch")] = False,
    no_shared: Annotated[bool, typer.Option("--no-shared", help="Ablation: a r->r projection per tower")] = False,
    only: Annotated[Optional[str], typer.Option(help="Ablation: vision or text tower only", show_default=False)] = None,
) -> None:
    """Trainable parameters of MSTA per part and per layer, the total, and the share of the backbone.

    Built with random weights (no download): `--backbone ViT-B-16 --adapter-dim 128 --adapter-layers 8-12`
    gives the authors' logged 1,744,000; `--adapter-dim 256 --adapter-layers 1-12` the paper's 8.7 M.
    """
    from msta.method.backbone import BackboneError
    from msta.method.params import format_parameter_table, parameter_table

    cfg = _adapter_config(adapter_dim, adapter_layers, temporal_branch, no_temporal, no_shared, only)
    try:
        typer.echo(format_parameter_table(parameter_table(backbone, cfg)))
    except (ValueError, BackboneError) as exc:
        raise UserError(str(exc), 2) from None


def _adapter_config(dim: int, layers: str, temporal_branch: str, no_temporal: bool, no_shared: bool,
                    only: str | None, scale: float | None = None) -> Any:
    """The adapter flags of `train` and `params` as one checked AdapterConfig."""
    from msta.method.adapters import AdapterConfig, parse_layers

    if only not in (None, "vision", "text"):
        raise UserError("--only must be vision or text", 2)
    try:
        return AdapterConfig(dim=dim, layers=parse_layers(layers), shared=not no_shared, temporal=not no_temporal,
                             temporal_branch=temporal_branch, towers=only or "both",
                             **({} if scale is None else {"scale": scale}))
    except ValueError as exc:
        raise UserError(str(exc), 2) from None


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Folder to write the dataset into")],
    videos_per_class: Annotated[int, typer.Option(help="Training videos per class")] = 24,
    test_per_class: Annotated[int, typer.Option(help="Test videos per class")] = 12,
    seed: Annotated[int, typer.Option(help="World seed: the same seed gives byte-identical files")] = 0,
) -> None:
    """Write the procedural video world as an ordinary dataset: mp4 videos, an id,name label CSV, ViFi-CLIP
    style lists (train, test, few-shot, base/novel halves) and an msta.toml declaring datasets `world`,
    `world-base` and `world-novel`. Five of its twelve classes are time-reversals of five others."""
    from msta.world.generate import write_dataset
    from pipeline.commands.demo import world_descriptions

    if videos_per_class < 16:
        raise UserError("--videos-per-class must be at least 16 (the few-shot and base-to-novel lists draw 16)", 2)
    folder = write_dataset(out, videos_per_class, test_per_class, seed)
    files = world_descriptions(folder)
    typer.echo(f"wrote the synthetic world to {folder}; use it with --config {folder / 'msta.toml'}")
    typer.echo("its descriptions: " + ", ".join(f"--from-file {p} --kind {k}" for k, p in files.items()))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the synthetic world's videos and lists")] = Path("demo"),
    videos_per_class: Annotated[Optional[int], typer.Option(help="Training videos per class of the world (at "
                                "least the recipe's 32 shots + 2 held out) [default: 36]", show_default=False)] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Few-shot epochs; base-to-novel trains twice as many on its "
                      "smaller list [default: 12]", show_default=False)] = None,
    seeds: Annotated[int, typer.Option(help="Train every variant with this many seeds (training seed and shot "
                     "draw 1, 2, ...; base-to-novel splits 1-3) and print mean ± std; each seed is about the "
                     "time of one demo", min=1)] = 1,
    no_progress: NoProgress = False,
    home: Home = None,
) -> None:
    """The whole pipeline on the embedded default: no API key, no download, a CPU, about eleven minutes.

    Writes the synthetic world, imports its descriptions, embeds them with the shipped tiny CLIP,
    caches frames, trains MSTA, MSTA without L_CC and MSTA without the temporal branch (few-shot and
    base-to-novel), evaluates them and the frozen CLIP, and prints one table. Reruns reuse every
    cached stage.
    """
    from dataclasses import replace

    from pipeline.commands.demo import DemoRecipe, run_demo

    recipe = DemoRecipe()
    recipe = replace(recipe, videos_per_class=videos_per_class or recipe.videos_per_class,
                     epochs=epochs or recipe.epochs)
    if recipe.videos_per_class < recipe.shots + 2:
        raise UserError(f"--videos-per-class must be at least {recipe.shots + 2} (the demo's {recipe.shots} shots "
                        "and 2 held-out clips per class)", 2)
    runner = make_runner(home, progress=not no_progress)
    with writing(home):
        typer.echo(run_demo(runner, out.resolve(), recipe, typer.echo, seeds))


STALE_EXIT = 3  # `status`: something is stale or interrupted, nothing failed


@app.command()
def status(home: Home = None, config: ConfigPath = None) -> None:
    """Every stage the home knows: fresh, stale (and why), failed or missing.

    Exit code: 0 when everything is fresh (or missing), 3 when something is stale and nothing failed,
    1 when a target's last run failed. A failed target is cleared by its next successful run, or by
    `msta-pipe gc --failed` (which forgets failed runs you will not rerun).
    """
    import json

    from pipeline.engine.stage import Request

    runner = make_runner(home)
    if not runner.catalog.exists():
        typer.echo(f"no catalog at {runner.catalog.path}: nothing has run yet")
        return
    with runner.catalog.reader() as con:
        rows = con.execute("""SELECT target, arg_max(request, started_at) FROM runs
                              GROUP BY target HAVING arg_max(status, started_at) <> 'cleared'
                                  OR bool_or(status = 'done')
                              ORDER BY min(started_at)""").fetchall()
        datasets = [r[0] for r in con.execute("SELECT DISTINCT dataset FROM classes ORDER BY 1").fetchall()]
    seen = {t for t, _ in rows}
    lines = []
    states: set[str] = set()
    for target, request in _progress(rows, "status", unit="target"):
        ev = runner.freshness(Request.from_json(json.loads(request)))
        states.add(ev.state)
        lines.append((target, ev.state, ev.reason))
    for ds in datasets:
        for kind in ("spatial", "temporal"):
            if f"describe:{ds}:{kind}" not in seen:
                lines.append((f"describe:{ds}:{kind}", "missing", "never run"))
    width = max(len(t) for t, _, _ in lines) if lines else 10
    for target, state, reason in lines:
        typer.echo(f"{target:<{width}}  {state:<8} {reason}".rstrip())
    if "failed" in states:
        raise typer.Exit(1)
    if "stale" in states:
        raise typer.Exit(STALE_EXIT)


def _progress(items: list[Any], desc: str, unit: str) -> Any:
    """A bar on a terminal for work over many items (nothing when output is piped)."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, leave=False, disable=not sys.stderr.isatty() or len(items) < 50)


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="A read-only SQL query over the catalog (SELECT, WITH, SHOW, "
                                              "DESCRIBE, SUMMARIZE, EXPLAIN, PRAGMA); no file, network or "
                                              "extension access, no settings")],
    format: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
    home: Home = None,
) -> None:
    """Query the catalog: tables runs, artifacts, classes, llm_requests, descriptions, description_failures,
    frame_clips, frame_failures, epochs, results, class_accuracy, predictions and views text_embeddings,
    video_embeddings, frames (see README)."""
    import duckdb

    from cache.catalog import Catalog
    from cache.views import FILE_VIEWS

    if format not in ("table", "csv", "json"):
        raise UserError("--format must be table, csv or json", 2)
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise UserError(f"cannot parse the query: {exc}", 2) from None
    allowed = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN, duckdb.StatementType.PRAGMA}
    refused = [s.type.name for s in statements if s.type not in allowed]
    if refused:
        raise UserError(f"`msta-pipe sql` is read-only: {', '.join(refused)} statements are refused", 2)
    if not statements:
        raise UserError("the query is empty", 2)
    views = [v for v in FILE_VIEWS if v in query.lower()]
    try:
        with Catalog(home_dir(home)).sandboxed_reader(views) as con:
            for stmt in statements[:-1]:
                con.execute(stmt)
            cur = con.execute(statements[-1])
            names = [d[0] for d in cur.description] if cur.description else []
            rows = cur.fetchall() if names else []
    except duckdb.Error as exc:
        msg = one_line(str(exc))
        # What the sandbox refuses (files, network, extensions, settings) is bad input, not failed work.
        if (isinstance(exc, duckdb.PermissionException) or "configuration has been locked" in msg
                or (isinstance(exc, duckdb.CatalogException) and " extension" in msg)):
            raise UserError(f"`msta-pipe sql` reads the catalog only (no files, extensions or settings): {msg}",
                            2) from None
        raise UserError(f"query failed: {msg}", 1) from None
    _print_rows(names, rows, format)


def _print_rows(names: list[str], rows: list[tuple[Any, ...]], fmt: str) -> None:
    import json

    if fmt == "json":
        typer.echo(json.dumps([dict(zip(names, r)) for r in rows], default=str, indent=1))
    elif fmt == "csv":
        import csv

        w = csv.writer(sys.stdout)
        w.writerow(names)
        w.writerows(rows)
    else:
        cells = [[_cell(v) for v in r] for r in rows]
        widths = [min(60, max([len(n)] + [len(c[i]) for c in cells])) for i, n in enumerate(names)]
        typer.echo("  ".join(n.ljust(w) for n, w in zip(names, widths)).rstrip())
        typer.echo("  ".join("-" * w for w in widths))
        for c in cells:
            typer.echo("  ".join(v[:w].ljust(w) for v, w in zip(c, widths)).rstrip())
        typer.echo(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "NULL" if v is None else str(v).replace("\n", " ")


@app.command()
def gc(
    dry_run: DryRun = False,
    superseded: Annotated[bool, typer.Option("--superseded", help="Also delete the artifacts and run folders of "
                          "completed runs that a later completed run of the same target (configuration, seed and "
                          "split) replaced with new code or new input contents; each is listed. A run of another "
                          "configuration or seed is never superseded")] = False,
    failed: Annotated[bool, typer.Option("--failed", help="Also forget failed runs you will not rerun: they are "
                      "marked `cleared` and `status` stops reporting them (each is listed)")] = False,
    home: Home = None,
) -> None:
    """Delete artifact files that no catalog row reaches, leftover temporary files and stale run folders.

    Every run's artifact is reached by its row, whatever its parameters; --superseded is the explicit
    scope that also deletes replaced runs."""
    from cache.gc import collect

    runner = make_runner(home)
    if not runner.catalog.exists():
        typer.echo("nothing to collect: no catalog yet")
        return
    if dry_run:
        report = collect(runner.catalog, runner.store, superseded=superseded, dry_run=True, failed=failed)
    else:
        with writing(home):
            report = collect(runner.catalog, runner.store, superseded=superseded, dry_run=False, failed=failed)
    verb = "would delete" if dry_run else "deleted"
    for target, key in report.superseded:
        typer.echo(f"{verb} superseded run {key[:16]} of {target}")
    for target, key in report.cleared:
        typer.echo(f"{'would clear' if dry_run else 'cleared'} failed run {key[:16]} of {target}")
    typer.echo(f"{verb} {report.files} files ({report.bytes / 1e6:.1f} MB) and {report.rows} catalog rows")


def _torch_device(device: str) -> Any:
    from msta.method.runtime import resolve_device

    try:
        return resolve_device(device)
    except ValueError as exc:  # an unknown name, or CUDA asked for where there is none
        raise UserError(str(exc), 2) from None


@app.command()
def predict(
    videos: Annotated[list[Path], typer.Argument(help="Video files, or folders searched recursively for video "
                                                      "files (.mp4, .avi, .mkv, .webm, .mov, ...)",
                                                 show_default=False)],
    run: Annotated[Optional[str], typer.Option(help="Key (or a unique prefix) of a training run",
                                               show_default=False)] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Use the latest training run on this "
                       "dataset; with --frozen: its class names and test views", show_default=False)] = None,
    model: Annotated[Optional[Path], typer.Option("--model", help="A model folder written by `msta-pipe export`",
                     show_default=False)] = None,
    frozen: Annotated[bool, typer.Option("--frozen", help="The frozen CLIP of --backbone/--pretrained (frame-mean "
                                         "zero-shot); class names from --labels or --dataset")] = False,
    labels: Annotated[Optional[Path], typer.Option("--labels", help="Class names to score instead of the model's "
                      "(open vocabulary: the adapted text branch encodes them now), in any class list format: "
                      "`id,name` CSV, labels.json, classInd.txt or one name per line", show_default=False)] = None,
    selection: Annotated[str, typer.Option(help="--run/--dataset: the run's last or best-heldout weights")] = "last",
    clips: Annotated[Optional[int], typer.Option(help="Temporal clips per video [default: the dataset's test "
                     "views]", show_default=False)] = None,
    crops: Annotated[Optional[int], typer.Option(help="Spatial crops per clip [default: the dataset's test views]",
                     show_default=False)] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Classes shown per video")] = 5,
    fmt: Annotated[str, typer.Option("--format", help="table, jsonl or csv")] = "table",
    backbone: Annotated[Optional[str], typer.Option(help="--frozen, or --model on another copy of its backbone: "
                        + BACKBONE_HELP, show_default=False)] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="--frozen: " + PRETRAINED_HELP + ". --model: the "
                          "backbone weights, refused unless their sha256 is the exported one [default: the path "
                          "recorded at export]", show_default=False)] = None,
    decoder: Annotated[Optional[str], typer.Option(help="decord or pyav [default: decord where installed, as "
                       "`frames` decodes]", show_default=False)] = None,
    device: Device = "auto",
    precision: Precision = "auto",
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 when any video could not be read")] = False,
    save: Annotated[bool, typer.Option("--save", help="Also store the predictions in the catalog's "
                                       "`predictions` table")] = False,
    no_progress: NoProgress = False,
    home: Home = None,
    config: ConfigPath = None,
) -> None:
    """Classify your own videos with a trained run, an exported model folder or the frozen CLIP.

    Every video is seen as the dataset's test views (clips x crops, as `evaluate` sees a test list)
    and gets its top-k classes with probabilities (the per-view softmax averaged over the views). A
    video that cannot be read is a row with its error (exit 1 with --strict). Nothing is written
    anywhere, unless --save stores the predictions in the catalog.
    """
    from pipeline.commands import predict as p
    from pipeline.commands.dag import default_decoder
    from pipeline.commands.export import read_export
    from pipeline.commands.flags import COUNT, check_flags
    from pipeline.commands.runs import trained_run

    check_flags({"clips": clips, "crops": crops, "top_k": top_k}, {"clips": COUNT, "crops": COUNT, "top_k": COUNT})
    if fmt not in ("table", "jsonl", "csv"):
        raise UserError("--format must be table, jsonl or csv", 2)
    if selection not in ("last", "best-heldout"):
        raise UserError("--selection must be last or best-heldout", 2)
    if decoder not in (None, "decord", "pyav"):
        raise UserError("--decoder must be decord or pyav", 2)
    sources = [name for name, given in (("--run", run), ("--model", model), ("--frozen", frozen)) if given]
    if len(sources) > 1 or (model is not None and dataset is not None):
        raise UserError(f"give one model: {' and '.join(sources or ['--model', '--dataset'])} exclude each other", 2)
    if not sources and dataset is None:
        raise UserError("which model? give --run KEY, --dataset D (its latest run), --model DIR (an export) or "
                        "--frozen", 2)
    if (backbone or pretrained) and not (frozen or model is not None):
        raise UserError("--backbone/--pretrained go with --frozen or --model; a run knows its backbone", 2)
    if labels is not None and not labels.is_file():
        raise UserError(f"--labels {labels}: no such file", 2)
    # the model's files first: a wrong folder or key is told before torch loads
    exported = read_export(model) if model is not None else None
    tr = trained_run(make_runner(home), dataset, run) if not (frozen or model) else None
    device, precision = _resolve_device(device, precision)
    torch_device = _torch_device(device)
    if model is not None:
        clf = p.from_export(model, exported, backbone, pretrained, torch_device)
    elif tr is None:
        clf = p.frozen(*_backbone(backbone, pretrained), load_config(config), dataset, torch_device)
    else:
        clf = p.from_run(home_dir(home), load_config(config), tr, selection, torch_device)
    if labels is not None:
        clf = clf.with_labels(labels)
    clf = clf.with_views(clips, crops)
    predictions = p.predict(clf, p.find_videos(videos), top_k, decoder or default_decoder(), torch_device,
                            precision, not no_progress)
    if fmt == "jsonl":
        for line in p.jsonl(clf, predictions):
            typer.echo(line)
    else:
        if fmt == "table":
            typer.echo(f"model: {clf.name} ({clf.configuration})")
        _print_rows(*p.rows(clf, predictions, fmt), fmt)
    if save:
        with writing(home):
            p.save(make_runner(home).catalog, clf, predictions, lambda s: typer.echo(s, err=True))
    failed = [x for x in predictions if x.error]
    if failed:
        typer.echo(f"{len(failed)} of {len(predictions)} videos could not be read, e.g. {failed[0].error}", err=True)
        if strict:
            raise typer.Exit(1)


@app.command()
def export(
    out: Annotated[Path, typer.Option(help="Folder to write (new, or empty)")],
    run: Annotated[Optional[str], typer.Option(help="Key (or a unique prefix) of the training run "
                   "[default: the latest adapter run on --dataset]", show_default=False)] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Export the latest training run on this "
                       "dataset", show_default=False)] = None,
    selection: Annotated[str, typer.Option(help="last or best-heldout: which of the run's weights")] = "last",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (to encode the class names)")] = "auto",
    home: Home = None,
    config: ConfigPath = None,
) -> None:
    """A trained run as a self-contained folder that needs no catalog: adapters.safetensors, config.json
    (adapter config, backbone identity and weights sha256, template, T, test views, input size, mean/std,
    class names), class_embeddings.safetensors, recipe.json, results.json and a model card README.md.
    `msta-pipe predict --model DIR` uses it."""
    from pipeline.commands.export import export_run
    from pipeline.commands.runs import trained_run

    if selection not in ("last", "best-heldout"):
        raise UserError("--selection must be last or best-heldout", 2)
    if run is None and dataset is None:
        raise UserError("which run? give --run KEY or --dataset D (its latest run)", 2)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; choose a new one", 2)
    runner = make_runner(home)
    tr = trained_run(runner, dataset, run)
    cfg = export_run(runner, load_config(config), tr, selection, out.resolve(),
                     _torch_device(_resolve_device(device, "fp32")[0]))
    typer.echo(f"exported {tr.describe(selection)} on {cfg['dataset']} ({cfg['protocol']}, "
               f"{len(cfg['classes'])} classes) to {out}")


@app.command()
def features(
    dataset: Dataset,
    list_name: Annotated[str, typer.Option("--list", help="Video list to embed (test, val, few_shot_2, ...)")],
    run: Annotated[Optional[str], typer.Option(help="Key (or a unique prefix) of the training run "
                   "[default: the latest adapter run on the dataset]", show_default=False)] = None,
    frozen: Annotated[bool, typer.Option("--frozen", help="Embed with the frozen backbone")] = False,
    selection: Annotated[str, typer.Option(help="last or best-heldout: which of the run's weights")] = "last",
    backbone: FrozenBackbone = None,
    pretrained: FrozenPretrained = None,
    device: Device = "auto",
    precision: Precision = "auto",
    workers: Workers = 2,
    force: Force = False,
    dry_run: DryRun = False,
    no_progress: NoProgress = False,
    home: Home = None,
    config: ConfigPath = None,
) -> None:
    """Video embeddings of a list (frozen or adapted) to Parquet, one row per view and one per video.

    The views and embeddings are the ones `evaluate` scores (the same cached test clips and crops).
    Query them as the `video_embeddings` view, `embedding` cast to FLOAT[D], e.g. joined with
    `text_embeddings` (see README). Cached like every stage: a rerun computes nothing. Over GPUs:
    `torchrun --nproc_per_node N -m pipeline features ...` gives each process every N-th video;
    rank 0 gathers them and writes what one process would.
    """
    from pipeline.commands.dag import features_request
    from pipeline.commands.evaluation import find_run
    from pipeline.commands.flags import NON_NEGATIVE, check_flags

    check_flags({"workers": workers}, {"workers": NON_NEGATIVE})
    if selection not in ("last", "best-heldout"):
        raise UserError("--selection must be last or best-heldout", 2)
    if frozen and run is not None:
        raise UserError("--frozen and --run exclude each other", 2)
    if (backbone or pretrained) and not frozen:
        raise UserError("--backbone/--pretrained go with --frozen; a run knows its backbone", 2)
    device, precision = _resolve_device(device, precision)
    runner = make_runner(home, progress=not no_progress)
    model = None if frozen else find_run(runner, dataset, run)
    if model is not None:
        if selection == "best-heldout" and "frames_heldout" not in model.inputs:
            raise UserError("this run had no held-out videos, so no epoch was selected: use --selection last", 2)
        backbone, pretrained = model.params["backbone"], model.params["pretrained"] or None
    else:
        backbone, pretrained = _backbone(backbone, pretrained)
    req = features_request(runner, load_config(config).dataset(dataset), list_name, model,
                           "none" if frozen else selection, backbone, pretrained, device, precision, workers)
    art = _launch_materialise(runner, home, req, force, dry_run)  # rank 0 of a torchrun launch, or the one process
    if art is not None:
        typer.echo(f"video embeddings: {art.path} ({art.meta['dim']}-d, {art.meta['views']} views a video); "
                   "query them as the view video_embeddings")


def _one_line_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    typer.echo(f"warning: {one_line(str(message), limit=4000)}", err=True)


def main() -> None:
    import warnings

    warnings.showwarning = _one_line_warning  # a warning is a line for the user, not a source location
    try:
        # not standalone: click's usage errors become one line here, and Ctrl-C (which typer turns
        # into a silent exit code 130) gets its message
        code = app(prog_name="msta-pipe", standalone_mode=False)
    except typer.TyperException as exc:  # click's usage errors, as vendored by typer
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help text itself
            typer.echo(exc.format_message(), err=True)
        else:
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            typer.echo(f"error: {one_line(exc.format_message())}{hint}", err=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except UserError as exc:
        typer.echo(f"error: {one_line(str(exc), limit=4000)}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume", err=True)
        sys.exit(130)
    except OSError as exc:  # the environment (a full disk, a read-only home): the file and the reason
        where = f": {exc.filename}" if exc.filename else ""
        typer.echo(f"error: {exc.strerror or one_line(str(exc))}{where}", err=True)
        sys.exit(1)
    except Exception as exc:  # a bug or the environment (disk full, ...): one line, the place, no traceback
        if os.environ.get("MSTA_TRACEBACK"):
            raise
        typer.echo(f"error: {error_line(exc)}; set MSTA_TRACEBACK=1 to see the traceback", err=True)
        sys.exit(1)
    if code == 130:
        typer.echo("interrupted; rerun the same command to resume", err=True)
    sys.exit(code if isinstance(code, int) else 0)
