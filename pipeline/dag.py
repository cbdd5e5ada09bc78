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

from prompts import PROMPT_DIR, template_files

from .datasets import Dataset
from .errors import UserError
from .stage import FileInput, Request


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


@dataclass(frozen=True)
class LLMOptions:
    model: str
    endpoint: str
    base_url_given: bool
    n: int = 2
    temperature: float = 0.7
    max_tokens: int = 400
    seed: int | None = 0
    max_reasks: int = 2
    concurrency: int = 8
    timeout: float = 60.0
    prompt_dir: Path = PROMPT_DIR
    context_length: int = 77


def describe_llm_request(runner: Any, ds: Dataset, kind: str, o: LLMOptions) -> Request:
    params = {"dataset": ds.name, "kind": kind, "source": "llm", "n": o.n, "model": o.model,
              "endpoint": o.endpoint, "temperature": o.temperature, "max_tokens": o.max_tokens,
              "seed": o.seed, "max_reasks": o.max_reasks, "context_length": o.context_length}
    inputs: dict[str, Request | FileInput] = {"classes": labels_request(runner, ds)}
    inputs.update({name: FileInput(path) for name, path in template_files(o.prompt_dir, kind).items()})
    return Request("describe", params, inputs,
                   {"concurrency": o.concurrency, "timeout": o.timeout, "base_url_given": o.base_url_given})


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


def weights_input(pretrained: str | None) -> FileInput | None:
    """The weights file behind --pretrained, so that its content digest enters the keys."""
    from msta.registry import weights_file

    path = weights_file(pretrained)
    return FileInput(path) if path is not None else None


def embed_request(runner: Any, ds: Dataset, backbone: str, pretrained: str | None,
                  batch_size: int = 256, device: str = "auto") -> Request:
    inputs: dict[str, Request | FileInput] = {
        kind: current_describe_request(runner, ds, kind) for kind in ("spatial", "temporal")}
    weights = weights_input(pretrained)
    if weights is not None:
        inputs["weights"] = weights
    params = {"dataset": ds.name, "backbone": backbone, "pretrained": pretrained or ""}
    return Request("embed", params, inputs, {"batch_size": batch_size, "device": device})


@dataclass(frozen=True)
class Selection:
    """A reproducible subset of a list: `per_class` videos of each class (all when None), drawn
    with `seed`, leaving out the videos of `exclude` (another list: e.g. the training shots)."""
    per_class: int | None = None
    seed: int = 0
    exclude: Path | None = None


def default_decoder() -> str:
    import importlib.util

    return "decord" if importlib.util.find_spec("decord") is not None else "pyav"


def frames_request(runner: Any, ds: Dataset, list_name: str, mode: str, selection: Selection = Selection(),
                   decoder: str | None = None, fmt: str = "jpeg", skip_missing: bool = False,
                   strict: bool = False, workers: int = 1, sampling_seed: int = 0) -> Request:
    v = ds.video
    if mode == "train":
        sampling = {"mode": "train", "frames": v.frames, "samplings": v.samplings,
                    "short_side": v.train_short_side, "seed": sampling_seed}
    else:
        sampling = {"mode": "test", "frames": v.frames, "clips": v.test_clips, "short_side": v.test_short_side}
    inputs: dict[str, Request | FileInput] = {"classes": labels_request(runner, ds),
                                              "list": FileInput(ds.list_path(list_name))}
    if selection.exclude is not None:
        inputs["exclude"] = FileInput(selection.exclude)
    params = {"dataset": ds.name, "list": list_name, "mode": mode, "sampling": sampling,
              "decoder": decoder or default_decoder(), "format": fmt, "skip_missing": skip_missing,
              "select": None if selection.per_class is None else {"per_class": selection.per_class,
                                                                   "seed": selection.seed}}
    return Request("frames", params, inputs,
                   {"video_root": str(ds.require_video_root()), "workers": workers, "strict": strict})
