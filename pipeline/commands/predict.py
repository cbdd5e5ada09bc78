"""`msta-pipe predict`: classify video files with a trained run, an exported model folder or the
frozen CLIP. A read-only consumer of artifacts: nothing is written unless `--save` asks.

Each video is decoded and sampled as the `frames` stage samples a test list, cropped and scored as
the evaluate stage scores it (msta/inference.py); the probabilities shown are the per-view softmax
averaged over the views. A video that cannot be read is a row with its error, never a crash; one that
is no regular file (a FIFO would block for ever) is such a row without being opened. Views and names
are encoded a batch at a time, so memory does not grow with --clips x --crops or with --labels.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cache.errors import UserError
from pipeline.commands.export import run_views
from pipeline.commands.runs import TrainedRun, run_description

if TYPE_CHECKING:
    from stages.formats.classlists import ClassName

NOT_REGULAR = "not a regular file (a pipe, socket or device)"
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".wmv", ".3gp", ".ogv")


@dataclass(frozen=True)
class Classifier:
    """A video model ready to predict, the classes it scores and the views it looks at."""
    model: Any
    backbone: Any
    class_ids: list[int]
    class_names: list[str]
    prompts: list[str]  # what fills the model's template for each class (the run's raw or display names)
    views: dict[str, int]  # frames, test_clips, test_crops, test_short_side
    name: str  # the model's identity in the output and in `predictions`: run key, folder or frozen:BACKBONE
    configuration: str  # what the model is, e.g. `MSTA w/o L_CC #1f0c9a2e (seed 1, split 1, last weights)`

    def with_labels(self, classes: list[ClassName]) -> Classifier:
        """Open vocabulary: the class names of a label file (read_labels), encoded by this model's text branch."""
        names = [c.name for c in classes]
        return replace(self, class_ids=[c.class_id for c in classes], class_names=names, prompts=names)

    def with_views(self, clips: int | None, crops: int | None) -> Classifier:
        views = {**self.views, **({"test_clips": clips} if clips else {}), **({"test_crops": crops} if crops else {})}
        return replace(self, views=views)


@dataclass(frozen=True)
class Prediction:
    video: str
    top: list[tuple[int, str, float]]  # (class id, class name, probability), best first
    error: str = ""


def _backbone(name: str, pretrained: str | None, device: Any) -> Any:
    from msta.method.backbone import BackboneError, load_backbone

    try:
        return load_backbone(name, pretrained or None, device=device)
    except BackboneError as exc:
        raise UserError(str(exc), 2) from None


def from_run(home: Path, config: Any, tr: TrainedRun, selection: str, device: Any) -> Classifier:
    """A training run with the class list and T it trained with, and its dataset's test views."""
    from stages.artifacts import prompt_names
    from stages.models import load_model

    p = tr.params
    views = run_views(config, tr)
    backbone = _backbone(p["backbone"], p["pretrained"], device)
    model, _, _, _ = load_model(backbone, tr.artifact, selection, p["template"], home, p["backbone"])
    return Classifier(model.to(device).eval(), backbone, [c for c, _, _ in tr.classes],
                      [name for _, _, name in tr.classes], prompt_names(tr.classes, p.get("class_names", "display")),
                      views, f"{tr.key}:{selection}", tr.describe(selection))


def from_export(folder: Path, backbone: str | None, pretrained: str | None, device: Any) -> Classifier:
    """An exported folder, loaded through the public API (msta.load) on backbone weights whose sha256
    must be the one it was trained on."""
    from msta.api import ExportError, load
    from msta.method.registry import BackboneError

    try:
        video, _, _ = load(folder, pretrained, device, backbone)
    except (ExportError, BackboneError) as exc:  # other weights, a damaged adapter file, a wrong architecture
        raise UserError(str(exc).replace("pretrained=", "--pretrained "), 2) from None
    cfg = video.config
    views = {k: cfg[k] for k in ("frames", "test_clips", "test_crops", "test_short_side")}  # checked by read_config
    what = run_description(str(cfg.get("run_key", "?")), cfg.get("configuration", "exported run"), cfg.get("seed", "?"),
                           cfg.get("split", "?"), cfg.get("selection", "?"))
    return Classifier(video.model, video.model.backbone, [c["id"] for c in cfg["classes"]], video.class_names,
                      video.prompts, views, str(folder), what)


def frozen_clip(backbone: str, pretrained: str | None, config: Any, dataset: str | None, device: Any) -> Classifier:
    """The frozen CLIP (frame-mean zero-shot); `dataset` gives the class names and test views."""
    from msta.method.model import DEFAULT_TEMPLATE, VideoCLIP
    from stages.formats.classlists import read_class_list
    from pipeline.commands.dag import views_of
    from stages.formats.datasets import VideoSettings

    loaded = _backbone(backbone, pretrained, device)
    ds = config.dataset(dataset) if dataset else None
    video = ds.video if ds else VideoSettings()
    classes = read_class_list(ds.require_labels()) if ds else []
    views = {"frames": video.frames, **views_of(video)}
    return Classifier(VideoCLIP(loaded, DEFAULT_TEMPLATE).to(device).eval(), loaded, [c.class_id for c in classes],
                      [c.name for c in classes], [c.name for c in classes], views, f"frozen:{backbone}", f"frozen CLIP (frame mean) {backbone}")


def read_labels(path: Path) -> list[ClassName]:
    """--labels: a class list in any format; refused (exit 2, naming the file) when it is no regular file,
    holds more names than predict encodes, or names that describe would refuse as one (`moving up`,
    `Moving Up`, `moving_up`: the same text to CLIP, so the same scores)."""
    from msta.api import MAX_CLASSES
    from stages.describe import refuse_shared_names
    from stages.formats.classlists import read_class_list

    if not path.is_file():
        raise UserError(f"--labels {path}: {NOT_REGULAR if path.exists() else 'no such file'}", 2)
    classes = read_class_list(path)
    if len(classes) > MAX_CLASSES:
        raise UserError(f"--labels {path}: {len(classes):,} class names, more than the {MAX_CLASSES:,} predict "
                        "scores at once; split the file", 2)
    try:
        refuse_shared_names([(c.class_id, c.raw_name, c.name) for c in classes])
    except UserError as exc:
        raise UserError(f"--labels {path}: {exc}", 2) from None
    return classes


def find_videos(paths: Iterable[Path]) -> list[Path]:
    """Files as given (a non-video file becomes an error row), folders searched recursively for video files."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
            found += inside or [path]  # an empty folder stays, to be reported as such
        else:
            found.append(path)
    return found


def predict(clf: Classifier, videos: list[Path], top_k: int, decoder: str, device: Any, precision: str,
            progress: bool) -> list[Prediction]:
    import torch
    from tqdm import tqdm

    from msta.api import Preprocess
    from msta.inference import encode_names, video_probs
    from msta.method.runtime import autocast

    if not clf.class_names:
        raise UserError("no class names to score: give --labels FILE (or --dataset D with --frozen)", 2)
    v, b = clf.views, clf.backbone
    preprocess = Preprocess(v["frames"], v["test_clips"], v["test_crops"], v["test_short_side"], b.image_size,
                            tuple(b.mean), tuple(b.std), decoder)  # as msta.classify sees a video
    out = []
    with torch.no_grad(), autocast(device, precision):
        class_emb = encode_names(clf.model, clf.prompts)
        for video in tqdm(videos, desc="predict", unit="video", disable=not progress):
            error = _unreadable(video)
            if not error:
                try:
                    batches = preprocess.batches(video)
                except Exception as exc:  # a broken file is a row of the output, whatever the decoder raised
                    error = _message(video, exc)
            if not error:
                probs = video_probs(clf.model, batches, class_emb)
                if not torch.isfinite(probs).all():  # NaN weights (a diverged run, a frozen backbone): never NaN out
                    error = f"{video}: the model's scores are not finite (NaN or inf); its weights are damaged"
            if error:
                out.append(Prediction(str(video), [], error))
                continue
            top = probs.topk(min(top_k, len(clf.class_names)))
            out.append(Prediction(str(video), [(clf.class_ids[i], clf.class_names[i], float(p))
                                               for p, i in zip(top.values.tolist(), top.indices.tolist())]))
    return out


def _unreadable(path: Path) -> str:
    if not path.exists():
        return f"{path}: no such file or folder"
    if path.is_dir():
        return f"{path}: no video files ({' '.join(VIDEO_SUFFIXES)}) in this folder"
    if not path.is_file():
        return f"{path}: {NOT_REGULAR}, not read"
    return ""


def _message(path: Path, exc: Exception) -> str:
    from msta.video.decode import VideoError

    if isinstance(exc, VideoError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{path}: {exc.strerror or exc}"
    return f"{path}: {type(exc).__name__}: {exc}"


def rows(clf: Classifier, predictions: list[Prediction], fmt: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Column names and rows for `table` (one row per video; the model is said above it) or `csv` (one
    row per video and rank, each naming the model)."""
    if fmt == "csv":
        out: list[tuple[Any, ...]] = []
        for p in predictions:
            out += [(p.video, r + 1, cid, name, round(prob, 6), "", clf.name, clf.configuration)
                    for r, (cid, name, prob) in enumerate(p.top)]
            out += [(p.video, None, None, None, None, p.error, clf.name, clf.configuration)] if p.error else []
        return ["video", "rank", "class_id", "class", "prob", "error", "model", "configuration"], out
    return (["video", "class", "prob", "next", "error"],
            [("..." + p.video[-57:] if len(p.video) > 60 else p.video,  # the table cuts cells at 60: keep the name
              p.top[0][1] if p.top else "", f"{p.top[0][2]:.4f}" if p.top else "",
              ", ".join(f"{name} {prob:.3f}" for _, name, prob in p.top[1:]), p.error) for p in predictions])


def jsonl(clf: Classifier, predictions: list[Prediction]) -> Iterable[str]:
    model = {"model": clf.name, "configuration": clf.configuration}
    for p in predictions:
        yield json.dumps({"video": p.video, "error": p.error, **model} if p.error else
                         {"video": p.video, "top": [{"class_id": cid, "class": name, "prob": round(prob, 6)}
                                                    for cid, name, prob in p.top], **model},
                         allow_nan=False)  # strict JSON: predict() turns non-finite scores into error rows


def save_predictions(catalog: Any, clf: Classifier, predictions: list[Prediction], echo: Callable[[str], None]) -> None:
    """`--save`: the predictions into the catalog's `predictions` table."""
    from cache.catalog import insert_rows, utcnow

    now, views = utcnow(), f"{clf.views['test_clips']}x{clf.views['test_crops']}"
    records = [{"created_at": now, "model": clf.name, "video": p.video, "rank": r + 1, "class_id": cid,
                "class_name": name, "prob": prob, "views": views, "error": None}
               for p in predictions for r, (cid, name, prob) in enumerate(p.top)]
    records += [{"created_at": now, "model": clf.name, "video": p.video, "rank": None, "class_id": None,
                 "class_name": None, "prob": None, "views": views, "error": p.error} for p in predictions if p.error]
    with catalog.transaction() as con:
        insert_rows(con, "predictions", records)
    echo(f"saved {len(records)} rows to the predictions table of {catalog.path}")


def predict_command(videos: list[Path], run: str | None, dataset: str | None, model: Path | None, frozen: bool,
                    labels: Path | None, selection: str, clips: int | None, crops: int | None, top_k: int, fmt: str,
                    backbone: str | None, pretrained: str | None, decoder: str | None, device: str, precision: str,
                    strict: bool, save: bool, no_progress: bool, home: Path | None, config: Path | None) -> None:
    import typer

    from msta.api import VIEW_LIMITS
    from pipeline.commands import session
    from pipeline.commands.configs import resolve_device
    from pipeline.commands.dag import default_decoder
    from pipeline.commands.export import read_export
    from pipeline.commands.flags import COUNT, Limit, check_flags
    from pipeline.commands.runs import trained_run

    # the bounds of an export's own views: 20000 clips were killed at 23.5 GB
    check_flags({"clips": clips, "crops": crops, "top_k": top_k},
                {"clips": Limit(1, VIEW_LIMITS["test_clips"]), "crops": Limit(1, VIEW_LIMITS["test_crops"]),
                 "top_k": COUNT})
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
    # the model's files and the labels first: a wrong folder, key or label file is told before a model loads
    if model is not None:
        read_export(model)
    label_classes = read_labels(labels) if labels is not None else None
    tr = trained_run(session.make_runner(home), dataset, run) if not (frozen or model) else None
    device, precision = resolve_device(device, precision)
    torch_device = session.torch_device(device)
    if model is not None:
        clf = from_export(model, backbone, pretrained, torch_device)
    elif tr is None:
        clf = frozen_clip(*session.backbone_pair(backbone, pretrained), session.load_config(config), dataset, torch_device)
    else:
        clf = from_run(session.home_dir(home), session.load_config(config), tr, selection, torch_device)
    if label_classes is not None:
        clf = clf.with_labels(label_classes)
    clf = clf.with_views(clips, crops)
    predictions = predict(clf, find_videos(videos), top_k, decoder or default_decoder(), torch_device,
                            precision, not no_progress)
    if fmt == "jsonl":
        for line in jsonl(clf, predictions):
            typer.echo(line)
    else:
        if fmt == "table":
            typer.echo(f"model: {clf.name} ({clf.configuration})")
        session.print_rows(*rows(clf, predictions, fmt), fmt)
    if save:
        with session.writing(home):
            save_predictions(session.make_runner(home).catalog, clf, predictions, lambda s: typer.echo(s, err=True))
    failed = [x for x in predictions if x.error]
    if failed:
        typer.echo(f"{len(failed)} of {len(predictions)} videos could not be read, e.g. {failed[0].error}", err=True)
        if strict:
            raise typer.Exit(1)
