"""`msta-pipe`: the command line. Heavy modules (torch, open_clip, duckdb, pyarrow) are imported
inside the commands that need them, so `msta-pipe --help` starts at once."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .errors import UserError

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
PRETRAINED_HELP = ("Weights: a shipped short name (synthetic-world, for --backbone msta-world), a local "
                   ".safetensors/.pt/.bin file, local-dir:PATH, an open_clip tag already in the local cache "
                   "(openai, laion2b_s34b_b88k, ...), or 'random' for random init")


def home_dir(home: Path | None) -> Path:
    return (home or Path(os.environ.get("MSTA_HOME", ".msta"))).resolve()


def load_config(config: Path | None) -> Any:
    from .datasets import Config

    if config is None and Path("msta.toml").exists():
        config = Path("msta.toml")
    return Config(config)


def make_runner(home: Path | None, **options: Any) -> Any:
    from .runner import Runner

    return Runner(home_dir(home), options, echo=lambda s: typer.echo(s, err=False))


def writing(home: Path | None) -> Any:
    """The home's writer lock for commands that change it (see pipeline/lock.py)."""
    from .lock import HomeLock

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
                           "DeepSeek) [env OPENAI_BASE_URL; default OpenAI]. The key comes from OPENAI_API_KEY.",
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
    and the command exits 1. Inspect the result with
    `msta-pipe sql "select * from descriptions where dataset='NAME'"`.
    """
    from prompts import KINDS, PROMPT_DIR

    from .dag import LLMOptions, describe_import_request, describe_llm_request

    if kind not in (*KINDS, "both"):
        raise UserError(f"--kind must be spatial, temporal or both, not {kind!r}", 2)
    kinds = list(KINDS) if kind == "both" else [kind]
    if n is not None and n < 1:
        raise UserError("--n must be at least 1", 2)
    pdir = (prompt_dir or PROMPT_DIR).resolve()
    runner = make_runner(home, progress=not no_progress)
    ds = load_config(config).dataset(dataset, labels)
    if from_file is not None:
        if kind == "both":
            raise UserError("--from-file holds one kind of description: pass --kind spatial or --kind temporal", 2)
        requests = [describe_import_request(runner, ds, kind, from_file, n, pdir)]
    else:
        from stages.llm import normalise_endpoint

        url = base_url or os.environ.get("OPENAI_BASE_URL")
        try:
            endpoint = normalise_endpoint(url)
        except ValueError as exc:
            raise UserError(str(exc), 2) from None
        if not dry_run and not url and not os.environ.get("OPENAI_API_KEY"):
            raise UserError("no LLM endpoint configured: set OPENAI_API_KEY (OpenAI) or pass --base-url / "
                            "OPENAI_BASE_URL for another OpenAI-compatible server; or import descriptions "
                            "with --from-file", 2)
        opts = LLMOptions(model=os.environ.get("MSTA_LLM_MODEL", model) if model == "gpt-4o-mini" else model,
                          endpoint=endpoint, base_url_given=bool(url), n=n or 2, temperature=temperature,
                          max_tokens=max_tokens, seed=seed, max_reasks=max_reasks, concurrency=concurrency,
                          timeout=timeout, prompt_dir=pdir)
        requests = [describe_llm_request(runner, ds, k, opts) for k in kinds]
    _materialise(runner, home, requests, force, dry_run)


def _materialise(runner: Any, home: Path | None, requests: list[Any], force: bool, dry_run: bool) -> list[Any]:
    if dry_run:
        return [runner.materialise(r, force=force, dry_run=True) for r in requests]
    with writing(home):
        return [runner.materialise(r, force=force) for r in requests]


@app.command()
def embed(
    dataset: Dataset,
    backbone: Annotated[str, typer.Option(help="open_clip model name (msta-world, ViT-B-16, ...)")] = "ViT-B-16",
    pretrained: Annotated[str, typer.Option(help=PRETRAINED_HELP)] = "openai",
    batch_size: Annotated[int, typer.Option(help="Descriptions per forward pass")] = 256,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
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
    from .dag import embed_request

    runner = make_runner(home)
    ds = load_config(config).dataset(dataset)
    req = embed_request(runner, ds, backbone, _pretrained(pretrained), batch_size, device)
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
    from .dag import Selection, frames_request

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
    _materialise(runner, home, [req], force, dry_run)


def _pretrained(value: str | None) -> str | None:
    return None if value in (None, "", "random") else value


def _resolve_device(device: str, precision: str) -> tuple[str, str]:
    """'auto' becomes what this machine has, so that the stage key says where a run really ran."""
    if device == "auto" or precision == "auto":
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if precision == "auto":
            precision = "bf16" if device.startswith("cuda") else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise UserError("--precision must be auto, fp32, bf16 or fp16", 2)
    return device, precision


@app.command()
def train(
    stage: Annotated[str, typer.Option(help="adapter (MSTA), full (full fine-tuning baseline) or pretrain "
                                       "(contrastive pre-training of a tiny CLIP on the synthetic world)")] = "adapter",
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Training dataset (source dataset "
                       "for zero-shot; the parent name, e.g. ssv2, for base2novel)", show_default=False)] = None,
    protocol: Annotated[str, typer.Option(help="few-shot, base2novel, zero-shot or fully-supervised")] = "few-shot",
    shots: Annotated[Optional[int], typer.Option(help="K videos per class (few-shot; base2novel draws 16 when "
                     "no train_sN list exists)", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Training seed; for base2novel also the split (1, 2 or 3: list "
                                      "train_sN), for drawn few-shot lists also the draw")] = 2048,
    epochs: Annotated[int, typer.Option(help="Epochs")] = 50,
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 1e-3,
    temporal_lr_mult: Annotated[float, typer.Option(help="Learning rate of the temporal branches as a multiple "
                                "of --lr (ours; 1 is the paper's single rate; the demo uses 30, see README)")] = 1.0,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay")] = 1e-3,
    warmup_epochs: Annotated[int, typer.Option(help="Linear warm-up epochs (per step, from 0) before the cosine")] = 5,
    batch_size: Annotated[Optional[int], typer.Option(help="Clips per optimiser step, over all processes "
                          "[default 32; pretrain: images per step, 128]", show_default=False)] = None,
    micro_batch: Annotated[Optional[int], typer.Option(help="Clips per forward pass; the rest is gradient "
                           "accumulation [default: the whole batch]", show_default=False)] = None,
    frames: Annotated[Optional[int], typer.Option(help="Frames T per clip [default: the dataset's, 8]",
                      show_default=False)] = None,
    adapter_scale: Annotated[float, typer.Option(help="lambda, the adapter scale")] = 0.005,
    adapter_dim: Annotated[int, typer.Option(help="Bottleneck width r")] = 128,
    adapter_layers: Annotated[str, typer.Option(help="Adapted blocks, 1-based inclusive, e.g. 8-12")] = "8-12",
    temporal_branch: Annotated[str, typer.Option(help="paper (depthwise temporal conv on the up-projection) or "
                               "bottleneck (on the down-projected features; ours)")] = "paper",
    alpha: Annotated[float, typer.Option(help="Weight of the consistency loss L_CC")] = 1.0,
    n_descriptions: Annotated[int, typer.Option(help="Descriptions per class and kind the embeddings must hold")] = 2,
    no_consistency: Annotated[bool, typer.Option("--no-consistency", help="Ablation: no L_CC (alpha 0)")] = False,
    no_temporal: Annotated[bool, typer.Option("--no-temporal", help="Ablation: no temporal branch")] = False,
    no_shared: Annotated[bool, typer.Option("--no-shared", help="Ablation: each tower its own r->r projection")] = False,
    only: Annotated[Optional[str], typer.Option(help="Ablation: adapters in the vision or text tower only",
                    show_default=False)] = None,
    backbone: Annotated[str, typer.Option(help="open_clip model name")] = "ViT-B-16",
    pretrained: Annotated[str, typer.Option(help=PRETRAINED_HELP)] = "openai",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (under torchrun: one GPU per process)")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16, fp16")] = "auto",
    hflip: Annotated[Optional[float], typer.Option(help="Horizontal flip probability [default: the dataset's]",
                     show_default=False)] = None,
    heldout_per_class: Annotated[int, typer.Option(help="Held-out videos per class, drawn from the dataset's "
                                 "`train` list outside the training videos, that select the best epoch")] = 2,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="Deterministic kernels (bit-identical "
                             "reruns and resumes on the CPU)")] = False,
    workers: Annotated[int, typer.Option(help="Data-loading worker processes")] = 2,
    steps: Annotated[int, typer.Option(help="pretrain: optimiser steps")] = 1000,
    out: Annotated[Optional[Path], typer.Option(help="pretrain: also copy the weights here", show_default=False)] = None,
    force: Force = False,
    dry_run: DryRun = False,
    no_progress: NoProgress = False,
    home: Home = None,
    config: ConfigPath = None,
) -> None:
    """Train MSTA adapters (or a baseline) against the cached artifacts, running stale upstream stages first.

    Defaults are the authors' recipe (MSTA.md section 3). A checkpoint is written every epoch; rerunning a
    killed training resumes from it. Multi-GPU: `torchrun --nproc_per_node N -m pipeline train ...`
    (rank 0 alone writes the catalog and artifacts).
    """
    from .dag import TrainOptions, train_request

    if stage == "pretrain":
        _pretrain(backbone, steps, batch_size or 128, lr, seed, device, out, force, dry_run, no_progress, home)
        return
    if stage not in ("adapter", "full"):
        raise UserError("--stage must be adapter, full or pretrain", 2)
    if dataset is None:
        raise UserError("--dataset is required for --stage adapter/full", 2)
    if only not in (None, "vision", "text"):
        raise UserError("--only must be vision or text", 2)
    if not (lr > 0 and temporal_lr_mult > 0):
        raise UserError("--lr and --temporal-lr-mult must be positive", 2)
    from msta.adapters import AdapterConfig, parse_layers
    from msta.backbone import BackboneError, check_adapter_fit

    try:
        adapter = AdapterConfig(dim=adapter_dim, layers=parse_layers(adapter_layers), scale=adapter_scale,
                                shared=not no_shared, temporal=not no_temporal, temporal_branch=temporal_branch,
                                towers=only or "both")
        if stage == "adapter":
            check_adapter_fit(backbone, adapter)
    except (ValueError, BackboneError) as exc:
        raise UserError(str(exc), 2) from None
    device, precision = _resolve_device(device, precision)
    opts = TrainOptions(protocol=protocol, method=stage, shots=shots, split_seed=seed, seed=seed, epochs=epochs,
                        lr=lr, temporal_lr_mult=temporal_lr_mult, weight_decay=weight_decay,
                        warmup_epochs=warmup_epochs, batch_size=batch_size or 32,
                        micro_batch=micro_batch, frames=frames,
                        adapter=tuple(sorted(adapter.to_dict().items())) if stage == "adapter" else (),
                        alpha=0.0 if no_consistency else alpha, n_descriptions=n_descriptions, backbone=backbone,
                        pretrained=_pretrained(pretrained), device=device, precision=precision, hflip=hflip,
                        heldout_per_class=heldout_per_class, deterministic=deterministic, workers=workers)
    runner = make_runner(home, progress=not no_progress)
    cfg = load_config(config)
    req = train_request(runner, cfg, cfg.dataset(dataset), opts)
    art = _train_materialise(runner, home, req, force, dry_run)
    if art is not None and int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"adapters: {art.path}" if stage == "adapter" else f"weights: {art.path}")
        if art.meta.get("best_epoch"):
            typer.echo(f"best held-out epoch {art.meta['best_epoch']} (accuracy {art.meta['best_heldout_acc']:.3f})")


def _train_materialise(runner: Any, home: Path | None, req: Any, force: bool, dry_run: bool) -> Any:
    """Single process, or one rank of a torchrun launch: rank 0 runs upstream stages and registers
    the result; the other ranks wait, then train alongside it without touching the catalog."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dry_run:
        return _materialise(runner, home, [req], force, dry_run)[0]
    from msta.runtime import barrier, init_distributed

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
        art = runner.follow(req, force=force)
    barrier()
    return art


def _pretrain(backbone: str, steps: int, batch_size: int, lr: float, seed: int, device: str, out: Path | None,
              force: bool, dry_run: bool, no_progress: bool, home: Path | None) -> None:
    import shutil

    from .stage import Request

    device, _ = _resolve_device(device, "fp32")
    if backbone == "ViT-B-16":
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
    frozen: Annotated[bool, typer.Option("--frozen", help="Evaluate the frozen backbone (frame-mean zero-shot)")] = False,
    selection: Annotated[str, typer.Option(help="last, best-heldout or both")] = "both",
    backbone: Annotated[str, typer.Option(help="--frozen: open_clip model name")] = "ViT-B-16",
    pretrained: Annotated[str, typer.Option(help="--frozen: " + PRETRAINED_HELP)] = "openai",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16")] = "auto",
    workers: Annotated[int, typer.Option(help="Data-loading worker processes")] = 2,
    force: Force = False,
    dry_run: DryRun = False,
    no_progress: NoProgress = False,
    home: Home = None,
    config: ConfigPath = None,
) -> None:
    """Multi-view test of a trained run or the frozen CLIP: top-1, top-5, per-class accuracy, confusion PNG.

    Results go to the `results` table (metrics top1, top5; base, novel and hm for base-to-novel), with the
    run key, views, checkpoint digest and selection rule (`last`, or `best-heldout`: the epoch chosen on
    held-out training videos; the test list never selects anything).
    """
    from .evaluation import run_evaluation

    if selection not in ("last", "best-heldout", "both"):
        raise UserError("--selection must be last, best-heldout or both", 2)
    device, precision = _resolve_device(device, precision)
    runner = make_runner(home, progress=not no_progress)
    with (writing(home) if not dry_run else contextlib.nullcontext()):
        rows = run_evaluation(runner, load_config(config), dataset, list_name, run, frozen, selection, backbone,
                              _pretrained(pretrained), device, precision, workers, force, dry_run)
    if rows:
        _print_rows(["dataset", "split", "selection", "metric", "value"], rows, "table")


@app.command()
def report(
    format: Annotated[str, typer.Option("--format", help="markdown or csv")] = "markdown",
    home: Home = None,
) -> None:
    """All results as Markdown tables shaped like the paper's, with the paper's numbers beside ours."""
    from .report import render

    typer.echo(render(make_runner(home).catalog, format))


@app.command()
def params(
    backbone: Annotated[str, typer.Option(help="open_clip model name (ViT-B-16, msta-world, ...)")] = "ViT-B-16",
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
    from msta.adapters import AdapterConfig, parse_layers
    from msta.backbone import BackboneError
    from msta.params import format_parameter_table, parameter_table

    if only not in (None, "vision", "text"):
        raise UserError("--only must be vision or text", 2)
    try:
        cfg = AdapterConfig(dim=adapter_dim, layers=parse_layers(adapter_layers), shared=not no_shared,
                            temporal=not no_temporal, temporal_branch=temporal_branch, towers=only or "both")
        typer.echo(format_parameter_table(parameter_table(backbone, cfg)))
    except (ValueError, BackboneError) as exc:
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
    from msta.world import write_dataset

    from .demo import world_descriptions

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
    no_progress: NoProgress = False,
    home: Home = None,
) -> None:
    """The whole pipeline on the embedded default: no API key, no download, a CPU, about ten minutes.

    Writes the synthetic world, imports its descriptions, embeds them with the shipped tiny CLIP,
    caches frames, trains MSTA, MSTA without L_CC and MSTA without the temporal branch (few-shot and
    base-to-novel), evaluates them and the frozen CLIP, and prints one table. Reruns reuse every
    cached stage.
    """
    from dataclasses import replace

    from .demo import DemoRecipe, run_demo

    recipe = DemoRecipe()
    recipe = replace(recipe, videos_per_class=videos_per_class or recipe.videos_per_class,
                     epochs=epochs or recipe.epochs)
    if recipe.videos_per_class < recipe.shots + 2:
        raise UserError(f"--videos-per-class must be at least {recipe.shots + 2} (the demo's {recipe.shots} shots "
                        "and 2 held-out clips per class)", 2)
    runner = make_runner(home, progress=not no_progress)
    with writing(home):
        typer.echo(run_demo(runner, out.resolve(), recipe, typer.echo))


@app.command()
def status(home: Home = None, config: ConfigPath = None) -> None:
    """Every stage the home knows: fresh, stale (and why), failed or missing. Exits 1 if anything is stale."""
    from .stage import Request
    import json

    runner = make_runner(home)
    if not runner.catalog.exists():
        typer.echo(f"no catalog at {runner.catalog.path}: nothing has run yet")
        return
    with runner.catalog.reader() as con:
        rows = con.execute("""SELECT target, arg_max(request, started_at) FROM runs
                              GROUP BY target ORDER BY min(started_at)""").fetchall()
        datasets = [r[0] for r in con.execute("SELECT DISTINCT dataset FROM classes ORDER BY 1").fetchall()]
    seen = {t for t, _ in rows}
    lines = []
    any_stale = False
    for target, request in rows:
        ev = runner.evaluate(Request.from_json(json.loads(request)))
        any_stale |= ev.state in ("stale", "failed")
        lines.append((target, ev.state, ev.reason))
    for ds in datasets:
        for kind in ("spatial", "temporal"):
            if f"describe:{ds}:{kind}" not in seen:
                lines.append((f"describe:{ds}:{kind}", "missing", "never run"))
    width = max(len(t) for t, _, _ in lines) if lines else 10
    for target, state, reason in lines:
        typer.echo(f"{target:<{width}}  {state:<8} {reason}".rstrip())
    if any_stale:
        raise typer.Exit(1)


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="A read-only SQL query over the catalog (SELECT, WITH, SHOW, "
                                              "DESCRIBE, SUMMARIZE, EXPLAIN, PRAGMA)")],
    format: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
    home: Home = None,
) -> None:
    """Query the catalog: tables runs, artifacts, classes, llm_requests, descriptions, description_failures,
    frame_clips, frame_failures, epochs, results and views text_embeddings, frames (see README)."""
    import duckdb

    from cache.catalog import Catalog

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
    with Catalog(home_dir(home)).reader() as con:
        try:
            for stmt in statements[:-1]:
                con.execute(stmt)
            cur = con.execute(statements[-1])
            names = [d[0] for d in cur.description] if cur.description else []
            rows = cur.fetchall() if names else []
        except duckdb.Error as exc:
            raise UserError(f"query failed: {exc}", 1) from None
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
    keep_history: Annotated[bool, typer.Option("--keep-history", help="Also keep the artifacts of superseded "
                                               "runs (default: only the latest completed run of each target)")] = False,
    home: Home = None,
) -> None:
    """Delete artifact files that no catalog row reaches, leftover temporary files and stale run folders."""
    from cache.gc import collect

    runner = make_runner(home)
    if not runner.catalog.exists():
        typer.echo("nothing to collect: no catalog yet")
        return
    if dry_run:
        report = collect(runner.catalog, runner.store, keep_history=keep_history, dry_run=True)
    else:
        with writing(home):
            report = collect(runner.catalog, runner.store, keep_history=keep_history, dry_run=False)
    verb = "would delete" if dry_run else "deleted"
    typer.echo(f"{verb} {report.files} files ({report.bytes / 1e6:.1f} MB) and {report.rows} catalog rows")


def main() -> None:
    try:
        app(prog_name="msta-pipe")
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume", err=True)
        sys.exit(130)
