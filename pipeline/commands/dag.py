"""The pipeline's DAG, visible in one place: how each stage's request is built from options.

    labels -> describe(spatial), describe(temporal) -> embed ---------.
    videos -> frames(train list), frames(test list) ------------------+-> train -> evaluate

Where a command needs an upstream stage the user ran earlier with options it does not
repeat (descriptions imported from a file, a class list given with --labels), the request
is taken from the latest run of that target in the catalog, so `status` and reruns see the
very same request the user made.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache.errors import UserError
from pipeline.commands.configs import PROTOCOLS, DescribeOptions, TrainOptions
from pipeline.commands.options import keyed
from stages.engine.stage import FileInput, Request, Stage
from stages.formats.datasets import Dataset
from prompts import PROMPT_DIR, template_files


def latest_request(runner: Any, target: str) -> Request | None:
    if not runner.catalog.exists():
        return None
    with runner.catalog.reader() as con:
        row = con.execute("SELECT request FROM runs WHERE target = ? ORDER BY started_at DESC LIMIT 1",
                          [target]).fetchone()
    return Request.from_json(json.loads(row[0])) if row else None


def labels_request(runner: Any, ds: Dataset) -> Request:
    if ds.labels is None:
        previous = latest_request(runner, f"labels:{ds.name}")
        if previous is not None:
            return previous
    return Request("labels", {"dataset": ds.name}, {"file": FileInput(ds.require_labels())})


def describe_llm_request(runner: Any, ds: Dataset, kind: str, o: DescribeOptions) -> Request:
    """One kind's request: the keyed options as themselves, the endpoint normalised (a URL with
    credentials is refused), the prompt templates as inputs."""
    from prompts.llm import normalise_endpoint

    try:
        endpoint = normalise_endpoint(o.base_url)
    except ValueError as exc:
        raise UserError(str(exc), 2) from None
    params = {**keyed(o), "dataset": ds.name, "kind": kind, "source": "llm", "n": o.n or 2, "endpoint": endpoint}
    inputs: dict[str, Request | FileInput] = {"classes": labels_request(runner, ds)}
    inputs.update({name: FileInput(path) for name, path in template_files(o.prompt_folder, kind).items()})
    return Request("describe", params, inputs,
                   {"concurrency": o.concurrency, "timeout": o.timeout, "base_url_given": o.base_url is not None})


def describe_import_request(runner: Any, ds: Dataset, kind: str, path: Path, n: int | None,
                            prompt_dir: Path = PROMPT_DIR, context_length: int = 77) -> Request:
    params = {"dataset": ds.name, "kind": kind, "source": "file", "n": n, "context_length": context_length}
    inputs = {"classes": labels_request(runner, ds), "file": FileInput(path.resolve()),
              "template:frames": FileInput(prompt_dir / "frames.toml")}
    return Request("describe", params, inputs)


def current_describe_request(runner: Any, ds: Dataset, kind: str) -> Request:
    req = latest_request(runner, f"describe:{ds.name}:{kind}")
    if req is None:
        raise UserError(f"dataset {ds.name!r} has no {kind} descriptions yet: run "
                        f"`msta-pipe describe --dataset {ds.name}` (or import them with --from-file)", 2)
    return req


def weights_input(backbone: str, pretrained: str | None) -> FileInput | None:
    """The weights file behind a (canonical) backbone and --pretrained, so that its content digest
    enters the keys: a file, a shipped short name, or the one file of an open_clip folder."""
    from msta.method.registry import BackboneError, weights_file

    try:
        path = weights_file(backbone, pretrained)
    except BackboneError as exc:
        raise UserError(str(exc), 2) from None
    return FileInput(path) if path is not None else None


def embed_request(runner: Any, ds: Dataset, backbone: str, pretrained: str | None,
                  batch_size: int = 256, device: str = "auto") -> Request:
    inputs: dict[str, Request | FileInput] = {
        kind: current_describe_request(runner, ds, kind) for kind in ("spatial", "temporal")}
    weights = weights_input(backbone, pretrained)
    if weights is not None:
        inputs["weights"] = weights
    params = {"dataset": ds.name, "backbone": backbone, "pretrained": pretrained or ""}
    return Request("embed", params, inputs, {"batch_size": batch_size, "device": device})


@dataclass(frozen=True)
class Selection:
    """A reproducible subset of a list: `per_class` videos of each class (all when None) drawn with
    `seed`, after leaving out the videos of another list file (`exclude_list`) or of another draw
    from the same list (`exclude_draw` = (per_class, seed)): e.g. held-out videos next to the shots."""
    per_class: int | None = None
    seed: int = 0
    exclude_list: Path | None = None
    exclude_draw: tuple[int, int] | None = None


def default_decoder() -> str:
    import importlib.util

    return "decord" if importlib.util.find_spec("decord") is not None else "pyav"


def frames_request(runner: Any, ds: Dataset, list_name: str, mode: str, selection: Selection = Selection(),
                   decoder: str | None = None, fmt: str = "jpeg", skip_missing: bool = False,
                   strict: bool = False, workers: int = 1, sampling_seed: int = 0, frames: int | None = None,
                   clips: int | None = None, pool: int | None = None, test_offsets: str = "even",
                   dedupe: bool = False) -> Request:
    v = ds.video
    if mode == "train":
        pool = v.pool if pool is None else pool
        sampling = {"mode": "train", "frames": frames or v.frames, "short_side": v.train_short_side}
        # A pool is deterministic; without one the keys of fixed draws stay as they were.
        sampling.update({"pool": pool} if pool else {"samplings": v.samplings, "seed": sampling_seed})
    else:
        sampling = {"mode": "test", "frames": frames or v.frames, "clips": clips or v.test_clips,
                    "short_side": v.test_short_side}
        if test_offsets != "even":  # the keys of evenly spaced views stay as they were
            sampling.update(offsets=test_offsets, seed=sampling_seed)
    inputs: dict[str, Request | FileInput] = {"classes": labels_request(runner, ds),
                                              "list": FileInput(ds.list_path(list_name))}
    if selection.exclude_list is not None:
        inputs["exclude"] = FileInput(selection.exclude_list)
    select = None
    if selection != Selection():
        select = {"per_class": selection.per_class, "seed": selection.seed,
                  "exclude_draw": list(selection.exclude_draw) if selection.exclude_draw else None}
    params = {"dataset": ds.name, "list": list_name, "mode": mode, "sampling": sampling,
              "decoder": decoder or default_decoder(), "format": fmt, "skip_missing": skip_missing,
              "select": select, **({"dedupe": True} if dedupe else {})}  # without it the keys stay as they were
    return Request("frames", params, inputs,
                   {"video_root": str(ds.require_video_root()), "workers": workers, "strict": strict})


@dataclass(frozen=True)
class TrainData:
    """Where a protocol's training videos and held-out videos come from."""
    dataset: Dataset
    list_name: str
    selection: Selection
    heldout: Selection | None


def train_data(config: Any, ds: Dataset, o: TrainOptions) -> TrainData:
    def heldout_from_train(d: Dataset, exclude_list: Path | None, exclude_draw: tuple[int, int] | None) -> Selection | None:
        if "train" not in d.lists or o.heldout_per_class <= 0:
            return None  # no pool beside the training videos: only the last epoch can be reported
        return Selection(o.heldout_per_class, o.seed, exclude_list, exclude_draw)

    if o.protocol == "few-shot":
        if o.shots is None:
            raise UserError("--protocol few-shot needs --shots K", 2)
        name = f"few_shot_{o.shots}"
        if name in ds.lists:
            return TrainData(ds, name, Selection(), heldout_from_train(ds, ds.lists[name], None))
        if not o.draw:
            raise UserError(f"dataset {ds.name!r} has no list {name!r} (the official {o.shots}-shot videos): declare "
                            f"it under [datasets.{ds.name}.lists], or pass --draw-shots to draw {o.shots} videos "
                            f"per class from its `train` list (the draw is seeded by --split)", 2)
        if "train" not in ds.lists:
            raise UserError(f"dataset {ds.name!r} has neither a list {name!r} nor a `train` list to draw "
                            f"{o.shots} shots per class from; declare one under [datasets.{ds.name}.lists]", 2)
        return TrainData(ds, "train", Selection(o.shots, o.split_seed),
                         heldout_from_train(ds, None, (o.shots, o.split_seed)))
    if o.protocol == "base2novel":
        base = config.dataset(f"{ds.name}-base")
        name = f"train_s{o.split_seed}"
        if name in base.lists:
            return TrainData(base, name, Selection(), heldout_from_train(base, base.lists[name], None))
        shots = o.shots or 16
        if not o.draw:
            raise UserError(f"dataset {base.name!r} has no list {name!r} (official split {o.split_seed} of the "
                            f"base-class training videos): declare it, use --split 1, 2 or 3 where those exist, "
                            f"or pass --draw-shots to draw {shots} videos per base class from its `train` list", 2)
        if "train" not in base.lists:
            raise UserError(f"dataset {base.name!r} has neither a list {name!r} nor a `train` list to draw the "
                            "base-class shots from", 2)
        return TrainData(base, "train", Selection(shots, o.split_seed),
                         heldout_from_train(base, None, (shots, o.split_seed)))
    if o.protocol in ("zero-shot", "fully-supervised"):
        ds.list_path("train")
        heldout = Selection(o.heldout_per_class, o.seed) if "heldout" in ds.lists else None
        return TrainData(ds, "train", Selection(), heldout)
    raise UserError(f"--protocol must be one of {', '.join(PROTOCOLS)}", 2)


def train_request(runner: Any, config: Any, o: TrainOptions) -> Request:
    """The train stage's request: the keyed fields of `o` as themselves, the resolved ones by value
    (dataset, adapter config, alpha, augmentation, T, frame pool), the rest through its inputs."""
    o = o.resolved()
    if not o.dataset:
        raise UserError("--dataset is required to train", 2)
    data = train_data(config, config.dataset(o.dataset), o)
    d = data.dataset
    params = keyed(o)
    params.update(dataset=d.name, pretrained=o.pretrained or "", alpha=o.effective_alpha,
                  adapter=o.adapter_config().to_dict() if o.method == "adapter" else {},
                  augment={"hflip": d.video.hflip if o.hflip is None else o.hflip,
                           "color_jitter": d.video.color_jitter, "grayscale": d.video.grayscale,
                           "jitter_per_frame": o.jitter == "frame"},
                  frames=o.frames or d.video.frames, frame_pool=d.video.pool if o.frame_pool is None else o.frame_pool)
    inputs: dict[str, Request | FileInput] = {
        "classes": labels_request(runner, d),
        "frames_train": frames_request(runner, d, data.list_name, "train", data.selection,
                                       skip_missing=o.skip_missing, workers=o.frame_workers, frames=o.frames,
                                       pool=o.frame_pool, dedupe=o.dedupe)}
    if data.heldout is not None:
        inputs["frames_heldout"] = frames_request(runner, d, "train" if "heldout" not in d.lists else "heldout",
                                                  "test", data.heldout, skip_missing=o.skip_missing,
                                                  workers=o.frame_workers, frames=o.frames, clips=1, dedupe=o.dedupe)
    if o.effective_alpha > 0:
        inputs["embed"] = embed_request(runner, d, o.backbone, o.pretrained)
        for kind in ("spatial", "temporal"):
            n = inputs["embed"].inputs[kind].params.get("n")  # type: ignore[union-attr]
            if n is not None and n != o.n_descriptions:
                raise UserError(f"the {kind} descriptions of {d.name!r} have N={n}, but --n-descriptions is "
                                f"{o.n_descriptions}: describe again with --n {o.n_descriptions} or change the flag", 2)
    weights = weights_input(o.backbone, o.pretrained)
    if weights is not None:
        inputs["weights"] = weights
    return Request("train", params, inputs, {"workers": o.workers, "test_views": views_of(d.video)})


def views_of(video: Any) -> dict[str, int]:
    """A dataset's test views (its VideoSettings), kept in a training run's request so that the run
    alone says how to test it (`predict --run KEY` and `export` need no config)."""
    return {"test_clips": video.test_clips, "test_crops": video.test_crops, "test_short_side": video.test_short_side}


@dataclass(frozen=True)
class EvalTarget:
    dataset: Dataset
    list_name: str
    role: str  # the metric this evaluation feeds: top1 (with top5), base or novel


def evaluate_request(runner: Any, target: EvalTarget, model: Request | None, selection: str, backbone: str,
                     pretrained: str | None, template: str, device: str, precision: str,
                     workers: int = 2, frame_workers: int = 2, skip_missing: bool = False,
                     dedupe: bool = False) -> Request:
    d = target.dataset
    inputs: dict[str, Request | FileInput] = {
        "classes": labels_request(runner, d),
        "frames": frames_request(runner, d, target.list_name, "test", skip_missing=skip_missing, dedupe=dedupe,
                                 workers=frame_workers,
                                 frames=model.params.get("frames") if model else None,
                                 test_offsets=model.params.get("test_offsets", "even") if model else "even")}
    if model is not None:
        inputs["model"] = model
    weights = weights_input(backbone, pretrained)
    if weights is not None:
        inputs["weights"] = weights
    params = {"dataset": d.name, "list": target.list_name, "role": target.role, "selection": selection,
              "backbone": backbone, "pretrained": pretrained or "", "template": template,
              "class_names": model.params.get("class_names", "display") if model else "display",
              "crops": d.video.test_crops, "device": device, "precision": precision}
    return Request("evaluate", params, inputs, {"workers": workers})


def features_request(runner: Any, ds: Dataset, list_name: str, model: Request | None, selection: str,
                     backbone: str, pretrained: str | None, device: str, precision: str,
                     workers: int = 2, frame_workers: int = 2, skip_missing: bool = False,
                     dedupe: bool = False) -> Request:
    """The video embeddings of a list, on the very clips and crops `evaluate_request` tests on."""
    evaluation = evaluate_request(runner, EvalTarget(ds, list_name, "top1"), model, selection, backbone, pretrained,
                                  "a video of {}.", device, precision, workers, frame_workers, skip_missing, dedupe)
    params = {k: v for k, v in evaluation.params.items() if k not in ("role", "template")}
    return Request("features", params, evaluation.inputs, evaluation.locators)


def stage_for(name: str) -> Stage:
    """The DAG's vocabulary: a stage by name, imported only when used so that the CLI starts
    without torch, open_clip or decord."""
    if name == "labels":
        from stages.labels import LabelsStage
        return LabelsStage()
    if name == "describe":
        from stages.describe import DescribeStage
        return DescribeStage()
    if name == "embed":
        from stages.embed import EmbedStage
        return EmbedStage()
    if name == "frames":
        from stages.frames import FramesStage
        return FramesStage()
    if name == "pretrain":
        from stages.pretrain import PretrainStage
        return PretrainStage()
    if name == "train":
        from stages.train import TrainStage
        return TrainStage()
    if name == "evaluate":
        from stages.evaluate import EvaluateStage
        return EvaluateStage()
    if name == "features":
        from stages.features import FeaturesStage
        return FeaturesStage()
    raise UserError(f"unknown stage {name!r} in a stored request", 2)
