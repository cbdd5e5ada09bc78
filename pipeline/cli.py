"""`msta-pipe`: the command line, a table of thin commands. Each command declares its options (or
takes them from its typed configuration in pipeline/commands/configs.py) and hands them to its body
in pipeline/commands/. Heavy modules are imported only inside those bodies, so `msta-pipe --help`
starts at once."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cache.errors import UserError, error_line, one_line, printable
from pipeline.commands.configs import DescribeOptions, FramesOptions, ParamsOptions, TrainOptions
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
SkipMissing = Annotated[bool, typer.Option("--skip-missing", help="Leave out listed videos missing from disk "
                                           "(counted, printed and kept in the summary) instead of failing")]
Dedupe = Annotated[bool, typer.Option("--dedupe", help="Keep a video listed twice once (its first line) instead "
                                      "of refusing the list")]


@app.command()
@with_options(DescribeOptions)
def describe(given: dict[str, Any], force: Force = False, dry_run: DryRun = False, no_progress: NoProgress = False,
             home: Home = None, config: ConfigPath = None) -> None:
    """LLM-written spatial and temporal descriptions of every class, cached per request.

    A rerun sends no request whose answer is stored; an interrupted run resumes where it stopped.
    Answers that are not JSON, have the wrong count, empty or repeated phrases, or sentences over
    CLIP's 77-token context are answered back (--max-reasks); classes that still fail are listed
    and the command exits 1 (with --kind both, after the other kind has run). --force also forgets
    whether the endpoint takes response_format json_schema. Inspect the result with
    `msta-pipe sql "select * from descriptions where dataset='NAME'"`.
    """
    from pipeline.commands.prepare import describe_command

    describe_command(given, force, dry_run, no_progress, home, config)


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
    from pipeline.commands.prepare import embed_command

    embed_command(dataset, backbone, pretrained, batch_size, device, force, dry_run, home, config)


@app.command()
@with_options(FramesOptions)
def frames(given: dict[str, Any], force: Force = False, dry_run: DryRun = False, no_progress: NoProgress = False,
           home: Home = None, config: ConfigPath = None) -> None:
    """Decode and sample the videos of a list once, caching uint8 frames that training reads.

    A rerun decodes nothing; after an interruption only the missing clips are decoded. Videos that
    cannot be decoded (corrupt, truncated, empty, not a video) are listed, recorded in the
    frame_failures table and left out; the command still succeeds unless --strict.
    """
    from pipeline.commands.prepare import frames_command

    frames_command(given, force, dry_run, no_progress, home, config)


@app.command()
@with_options(TrainOptions)
def train(
    given: dict[str, Any],
    recipe: Annotated[Optional[str], typer.Option(help="A preset of options: authors (every option the MSTA authors' "
                      "logs fix for this protocol and dataset: backbone ViCLIP-B-16, DES_N, L_CC on/off, lr, schedule, "
                      "batch, adapters, seed, template, class names, test views, jitter, precision) or demo (the "
                      "tiny world's recipe). Flags given explicitly always win; --dry-run prints where each value "
                      "came from", show_default=False)] = None,
    seeds: Annotated[Optional[str], typer.Option(help="Several training seeds, e.g. 2048,1,2: one cached run each "
                     "(instead of --seed); `report` shows mean ± std over them", show_default=False)] = None,
    steps: Annotated[int, typer.Option(help="--method pretrain: optimiser steps")] = 1000,
    out: Annotated[Optional[Path], typer.Option(help="--method pretrain: also copy the weights here",
                                                show_default=False)] = None,
    force: Force = False,
    dry_run: DryRun = False,
    no_progress: NoProgress = False,
    home: Home = None,
    config: ConfigPath = None,
) -> None:
    """Train MSTA adapters (or a baseline) against the cached artifacts, running stale upstream stages first.

    A run is one configuration (every option but the seed and split) and one repeat (seed, split):
    `report` aggregates the repeats of a configuration and never two configurations. A checkpoint is
    written every epoch; rerunning a killed training resumes from it. Multi-GPU:
    `torchrun --nproc_per_node N -m pipeline train ...` (rank 0 alone writes the catalog and artifacts).
    """
    from pipeline.commands.training import train_command

    train_command(given, recipe, seeds, steps, out, force, dry_run, no_progress, home, config)


@app.command()
def evaluate(
    dataset: Dataset,
    list_name: Annotated[Optional[str], typer.Option("--list", help="Video list to test on [default: what the "
                         "run's protocol tests on: test; base2novel: NAME-base val and NAME-novel val]",
                         show_default=False)] = None,
    run: Annotated[Optional[str], typer.Option(help="Key (or a unique prefix) of the training run "
                   "[default: the latest run of every configuration, seed and split on the dataset]",
                   show_default=False)] = None,
    seeds: Annotated[Optional[str], typer.Option(help="Evaluate the latest run of each of these training seeds "
                     "(as given to train --seeds), e.g. 2048,1,2", show_default=False)] = None,
    frozen: Annotated[bool, typer.Option("--frozen", help="Evaluate the frozen backbone (frame-mean zero-shot)")
                      ] = False,
    selection: Annotated[str, typer.Option(help="last, best-heldout, both, or test-max: the epoch snapshot "
                         "(epochs 1, 6, ..., last) with the best test top-1, as the authors report (labelled "
                         "test-max in results: the test list selects it, so it is optimistic)")] = "both",
    backbone: FrozenBackbone = None,
    pretrained: FrozenPretrained = None,
    device: Device = "auto",
    precision: Precision = "auto",
    workers: Workers = 2,
    skip_missing: SkipMissing = False,
    dedupe: Dedupe = False,
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
    from pipeline.commands.evaluation import evaluate_command

    evaluate_command(dataset, list_name, run, seeds, frozen, selection, backbone, pretrained, device, precision,
                     workers, skip_missing, dedupe, force, dry_run, no_progress, home, config)


@app.command()
def report(
    format: Annotated[str, typer.Option("--format", help="markdown or csv")] = "markdown",
    authors_logs: Annotated[Optional[Path], typer.Option(help="Folder of the MSTA authors' training logs: print "
                            "their logged accuracies (test-selected and last epoch) beside ours",
                            show_default=False)] = None,
    home: Home = None,
) -> None:
    """All results as Markdown tables shaped like the paper's, with the paper's numbers beside ours."""
    from pipeline.commands.report import report_command

    report_command(format, authors_logs, home)


@app.command()
@with_options(ParamsOptions)
def params(given: dict[str, Any]) -> None:
    """Trainable parameters of MSTA per part and per layer, the total, and the share of the backbone.

    Built with random weights (no download): `--backbone ViT-B-16 --adapter-dim 128 --adapter-layers 8-12`
    gives the authors' logged 1,744,000; `--adapter-dim 256 --adapter-layers 1-12` the paper's 8.7 M.
    """
    from pipeline.commands.training import params_command

    params_command(given)


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Folder to write the dataset into")],
    videos_per_class: Annotated[int, typer.Option(help="Training videos per class")] = 24,
    test_per_class: Annotated[int, typer.Option(help="Test videos per class")] = 12,
    world_seed: Annotated[int, typer.Option(help="World seed: the same seed gives byte-identical files")] = 0,
    seed: Annotated[Optional[int], typer.Option("--seed", hidden=True)] = None,  # the old spelling
) -> None:
    """Write the procedural video world as an ordinary dataset: mp4 videos, an id,name label CSV, ViFi-CLIP
    style lists (train, test, few-shot, base/novel halves) and an msta.toml declaring datasets `world`,
    `world-base` and `world-novel`. Five of its twelve classes are time-reversals of five others."""
    from pipeline.commands.demo import synth_command

    synth_command(out, videos_per_class, test_per_class, world_seed if seed is None else seed)


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
    from pipeline.commands.demo import demo_command

    demo_command(out, videos_per_class, epochs, seeds, no_progress, home)


@app.command()
def status(home: Home = None) -> None:
    """Every stage the home knows: fresh, stale (and why), failed or missing.

    Exit code: 0 when everything is fresh (or missing), 3 when something is stale and nothing failed,
    1 when a target's last run failed. A failed target is cleared by its next successful run, or by
    `msta-pipe gc --failed` (which forgets failed runs you will not rerun).
    """
    from pipeline.commands.home import status_command

    status_command(home)


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="A read-only SQL query over the catalog (SELECT, WITH, SHOW, "
                                              "DESCRIBE, SUMMARIZE, EXPLAIN, PRAGMA); no file, network or "
                                              "extension access, no settings")],
    format: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds the query may run before it is "
                                                            "stopped (exit 1); Ctrl-C stops it at once")] = 60.0,
    home: Home = None,
) -> None:
    """Query the catalog: tables runs, artifacts, classes, llm_requests, descriptions, description_failures,
    frame_clips, frame_failures, epochs, results, class_accuracy, predictions and views text_embeddings,
    video_embeddings, frames (see README)."""
    from pipeline.commands.home import sql_command

    sql_command(query, format, timeout, home)


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
    from pipeline.commands.home import gc_command

    gc_command(dry_run, superseded, failed, home)


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
    from pipeline.commands.predict import predict_command

    predict_command(videos, run, dataset, model, frozen, labels, selection, clips, crops, top_k, fmt, backbone,
                    pretrained, decoder, device, precision, strict, save, no_progress, home, config)


@app.command()
def export(
    out: Annotated[Path, typer.Option(help="Folder to write (new, or empty)")],
    run: Annotated[Optional[str], typer.Option(help="Key (or a unique prefix) of the training run "
                   "[default: the latest run on --dataset, when all its runs are of one configuration]",
                   show_default=False)] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Export the latest training run on this "
                       "dataset", show_default=False)] = None,
    selection: Annotated[str, typer.Option(help="last or best-heldout: which of the run's weights")] = "last",
    include_backbone: Annotated[bool, typer.Option("--include-backbone", help="Copy the backbone's weights file "
                                "into the folder too, so that it needs no other file (its size is printed)")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (to encode the class names)")] = "auto",
    home: Home = None,
    config: ConfigPath = None,
) -> None:
    """A trained run as a self-contained folder that needs no catalog, in the conventions of a model hub:
    adapters.safetensors, config.json (adapter config, backbone identity and weights sha256, template, T,
    test views, input size, mean/std, class names), open_clip_config.json (an open_clip backbone),
    class_embeddings.safetensors, recipe.json, results.json and a model card README.md with YAML front
    matter. `msta-pipe predict --model DIR` and `msta.load(DIR)` in Python use it."""
    from pipeline.commands.export import export_command

    export_command(out, run, dataset, selection, include_backbone, device, home, config)


@app.command()
def features(
    dataset: Dataset,
    list_name: Annotated[str, typer.Option("--list", help="Video list to embed (test, val, few_shot_2, ...)")],
    run: Annotated[Optional[str], typer.Option(help="Key (or a unique prefix) of the training run "
                   "[default: the latest run on the dataset, when all its runs are of one configuration]",
                   show_default=False)] = None,
    frozen: Annotated[bool, typer.Option("--frozen", help="Embed with the frozen backbone")] = False,
    selection: Annotated[str, typer.Option(help="last or best-heldout: which of the run's weights")] = "last",
    backbone: FrozenBackbone = None,
    pretrained: FrozenPretrained = None,
    device: Device = "auto",
    precision: Precision = "auto",
    workers: Workers = 2,
    skip_missing: SkipMissing = False,
    dedupe: Dedupe = False,
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
    from pipeline.commands.evaluation import features_command

    features_command(dataset, list_name, run, frozen, selection, backbone, pretrained, device, precision, workers,
                     skip_missing, dedupe, force, dry_run, no_progress, home, config)


def _one_line_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    # printable: a warning may quote a received catalog's rows
    typer.echo(f"warning: {printable(one_line(str(message), limit=4000))}", err=True)


def main() -> None:
    import warnings

    # Arrow's default mimalloc pool keeps what a command freed: +60 MB resident after writing one
    # 16k-video index, +15 MB with the C allocator. A user's own setting wins.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
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
