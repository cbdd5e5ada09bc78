"""The typed configuration of `train`, declared once: every field is a flag with its help, limit and
choices, and enters the train stage's key as itself unless its spec says otherwise (an input
chooses it, a resolved value stands for it, or it is a locator). A new option is one field here
plus its use; the CLI, the checks, presets, the key and the catalog's `params` follow."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from cache.errors import UserError
from pipeline.commands.flags import COUNT, NON_NEGATIVE, POSITIVE, PROBABILITY, Limit
from pipeline.commands.options import INPUTS, LOCATOR, RESOLVED, check, group, opt

PROTOCOLS = ("few-shot", "base2novel", "zero-shot", "fully-supervised")
METHODS = ("adapter", "full", "pretrain")


@dataclass(frozen=True)
class TrainOptions:
    """Every option of `train` (and of the training runs the demo makes)."""
    protocol: str = opt("few-shot", "Protocol", choices=PROTOCOLS)
    dataset: str | None = opt(None, "Training dataset (source dataset for zero-shot; the parent name, e.g. ssv2, "
                              "for base2novel)", flags=("--dataset", "-d"), key=RESOLVED)
    method: str = opt("adapter", "What to train: adapter (MSTA), full (the full fine-tuning baseline) or pretrain "
                      "(contrastive pre-training of a tiny CLIP on the synthetic world)", choices=METHODS,
                      hidden_flags=("--stage",))
    shots: int | None = opt(None, "K videos per class (few-shot; base2novel with --draw-shots: per base class, "
                            "default 16)", limit=COUNT)
    split_seed: int = opt(1, "base2novel: the official split N (list train_sN, N = 1, 2, 3); with --draw-shots: "
                          "the draw", flags=("--split",), limit=NON_NEGATIVE)
    draw: bool = opt(False, "Draw --shots videos per class from the `train` list when the protocol's official "
                     "list is missing (never done silently)", flags=("--draw-shots/--no-draw-shots",), key=INPUTS)
    seed: int = opt(2048, "Training seed (initialisation, order, augmentation); the authors' 2048. Independent "
                    "of --split", limit=NON_NEGATIVE)
    epochs: int = opt(50, "Epochs", limit=COUNT)
    lr: float = opt(1e-3, "AdamW learning rate", limit=POSITIVE)
    temporal_lr_mult: float = opt(1.0, "Learning rate of the temporal branches as a multiple of --lr (ours; 1 is "
                                  "the paper's single rate)", limit=POSITIVE)
    weight_decay: float = opt(1e-3, "AdamW weight decay", limit=NON_NEGATIVE)
    warmup_epochs: int = opt(5, "Linear warm-up epochs (per step, from 0) before the cosine", limit=NON_NEGATIVE)
    min_lr_ratio: float = opt(0.01, "Floor of the cosine as a fraction of --lr (timm's lr_min 1e-5 at lr 1e-3)",
                              limit=Limit(0, 1))
    batch_size: int = opt(32, "Clips per optimiser step, over all processes (pretrain: images per step, 128 "
                          "unless given)", limit=COUNT)
    micro_batch: int | None = opt(None, "Clips per forward pass; the rest is gradient accumulation",
                                  limit=COUNT, default_text="the whole batch")
    frames: int | None = opt(None, "Frames T per clip", limit=COUNT, default_text="the dataset's, 8")
    frame_pool: int | None = opt(None, "Cache up to N evenly spaced frames of each training video (all of a "
                                 "shorter one) and draw new TSN offsets from them every epoch, as the authors did; "
                                 "0: the dataset's `samplings` fixed TSN draws", limit=NON_NEGATIVE,
                                 default_text="the dataset's `pool`, 0")
    adapter_dim: int = opt(128, "Bottleneck width r", limit=COUNT, group="adapter", key=RESOLVED)
    adapter_layers: str = opt("8-12", "Adapted blocks, 1-based inclusive", group="adapter", key=RESOLVED)
    adapter_scale: float = opt(0.005, "lambda, the adapter scale", limit=NON_NEGATIVE, group="adapter",
                               key=RESOLVED)
    temporal_branch: str = opt("paper", "Where the temporal conv sits: paper (on the up-projection) or bottleneck "
                               "(on the down-projected features; ours)", choices=("paper", "bottleneck"),
                               group="adapter", key=RESOLVED)
    temporal: bool = opt(True, "Ablation --no-temporal: no temporal branch", group="adapter", key=RESOLVED)
    shared: bool = opt(True, "Ablation --no-shared: each tower its own r->r projection", group="adapter",
                       key=RESOLVED)
    only: str | None = opt(None, "Ablation: adapters in the vision or text tower only", choices=("vision", "text"),
                           group="adapter", key=RESOLVED)
    alpha: float = opt(1.0, "Weight of the consistency loss L_CC", limit=NON_NEGATIVE)
    consistency: bool = opt(True, "Ablation --no-consistency: no L_CC (alpha 0)", key=RESOLVED)
    n_descriptions: int = opt(2, "Descriptions per class and kind the embeddings must hold", limit=COUNT)
    template: str = opt("a video of {}.", "Class prompt, {} = class name (the authors' logs: 'a photo of a {}.')")
    class_names: str = opt("display", "Class names in the prompt: display (`apply eye makeup`) or raw, as the class "
                           "list spells them (`ApplyEyeMakeup`, as ViFi-CLIP and the authors)",
                           choices=("display", "raw"))
    test_offsets: str = opt("even", "Several test clips of a video: even (evenly spaced, deterministic) or random "
                            "(each with the training sampler's offsets, seeded, as ViFi-CLIP draws them)",
                            choices=("even", "random"))
    jitter: str = opt("clip", "Colour jitter: one draw per clip, or per frame (new brightness, contrast, saturation "
                      "and hue every frame, as ViFi-CLIP's ColorJitter)", choices=("clip", "frame"), key=RESOLVED)
    backbone: str | None = opt(None, "open_clip model name (ViT-B-16, msta-world, ...), ViCLIP-B-16, or an "
                               "open_clip folder as local-dir:PATH", default_text="ViT-B-16")
    pretrained: str | None = opt(None, "Weights: a shipped short name, a local .safetensors/.pt/.bin file, an "
                                 "open_clip folder, an open_clip tag in the local cache, or 'random'",
                                 default_text="openai for open_clip names")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N (under torchrun: one GPU per process)")
    precision: str = opt("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16 or fp16",
                         choices=("auto", "fp32", "bf16", "fp16"))
    hflip: float | None = opt(None, "Horizontal flip probability", limit=PROBABILITY,
                              default_text="the dataset's", key=RESOLVED)
    heldout_per_class: int = opt(2, "Held-out videos per class, drawn from the dataset's `train` list outside "
                                 "the training videos, that select the best epoch", limit=NON_NEGATIVE, key=INPUTS)
    deterministic: bool = opt(False, "Deterministic kernels (bit-identical reruns and resumes on the CPU)")
    skip_missing: bool = opt(False, "Leave out listed videos missing from disk (counted, printed and kept in the "
                             "run's summary and the report) instead of failing", key=INPUTS)
    dedupe: bool = opt(False, "Keep a video listed twice once (its first line) instead of refusing the list",
                       key=INPUTS)
    workers: int = opt(2, "Data-loading worker processes", limit=NON_NEGATIVE, key=LOCATOR)
    frame_workers: int = opt(2, "Decoding processes of the frames stages it runs first", limit=COUNT,
                             key=LOCATOR)

    def check(self) -> None:
        """Limits and choices of every field, then what one field alone cannot say (exit 2)."""
        check(self)
        if "{}" not in self.template:
            raise UserError(f"--template {self.template!r} needs a {{}} where the class name goes", 2)
        if self.method in ("adapter", "full") and not self.dataset:
            raise UserError(f"--dataset is required for --method {self.method}", 2)
        self.adapter_config()

    def adapter_config(self) -> Any:
        """The adapter fields as one checked AdapterConfig (imports torch)."""
        from msta.method.adapters import AdapterConfig, parse_layers

        a = group(self, "adapter")
        try:
            return AdapterConfig(dim=a["adapter_dim"], layers=parse_layers(a["adapter_layers"]),
                                 scale=a["adapter_scale"], shared=a["shared"], temporal=a["temporal"],
                                 temporal_branch=a["temporal_branch"], towers=a["only"] or "both")
        except ValueError as exc:
            raise UserError(f"adapter flags: {exc}", 2) from None

    def resolved(self) -> "TrainOptions":
        """The one spelling keys use: a canonical backbone and weights, and the device and precision
        this machine will really run (auto resolved; a half precision on the CPU refused)."""
        backbone, pretrained = canonical_backbone(self.backbone, self.pretrained)
        if self.method == "adapter":
            from msta.method.backbone import BackboneError, check_adapter_fit

            try:
                check_adapter_fit(backbone, self.adapter_config())
            except (ValueError, BackboneError) as exc:
                raise UserError(str(exc), 2) from None
        device, precision = resolve_device(self.device, self.precision)
        return replace(self, backbone=backbone, pretrained=pretrained or None, device=device, precision=precision)

    @property
    def effective_alpha(self) -> float:
        return self.alpha if self.consistency else 0.0


def canonical_backbone(backbone: str | None, pretrained: str | None) -> tuple[str, str]:
    """The one spelling of --backbone/--pretrained that keys and loading use (msta.method.registry)."""
    from msta.method.registry import BackboneError, canonical_backbone as canonical

    try:
        return canonical(backbone, pretrained)
    except BackboneError as exc:
        raise UserError(str(exc), 2) from None


def resolve_device(device: str, precision: str) -> tuple[str, str]:
    """'auto' becomes what this machine has, so that a key says where a run really ran; a half
    precision on the CPU is refused, since the CPU runs it in fp32 and the key would say otherwise."""
    if device == "auto" or precision == "auto":
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if precision == "auto":
            precision = "bf16" if device.startswith("cuda") else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"--precision must be auto, fp32, bf16 or fp16, not {precision!r}", 2)
    if precision != "fp32" and not device.startswith("cuda"):
        raise UserError(f"--precision {precision} runs only on CUDA; on {device} the model runs in fp32: "
                        "pass --precision fp32 (or auto)", 2)
    return device, precision


DEFAULT_LLM = "gpt-4o-mini"


@dataclass(frozen=True)
class DescribeOptions:
    """Every option of `describe`. The keyed ones enter each kind's request as themselves; the
    endpoint enters normalised; concurrency and timeout are locators."""
    dataset: str | None = opt(None, "Dataset name: built-in (ssv2, k400, k600, hmdb51, ucf101, NAME-base, "
                              "NAME-novel, k600-zs1..3) or declared in the config", flags=("--dataset", "-d"),
                              key=RESOLVED)
    labels: str | None = opt(None, "Class list file for the dataset (overrides the config): `id,name` CSV, SSv2 "
                             "labels.json, UCF-101 classInd.txt or one name per line", key=INPUTS)
    kind: str = opt("both", "Which descriptions", choices=("spatial", "temporal", "both"), key=RESOLVED)
    n: int | None = opt(None, "Descriptions per class and kind", limit=COUNT,
                        default_text="2; for --from-file: the count most classes have", key=RESOLVED)
    model: str = opt(DEFAULT_LLM, "Model name at the endpoint [env MSTA_LLM_MODEL]")
    base_url: str | None = opt(None, "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (vLLM, llama.cpp, "
                               "Ollama, DeepSeek) [env OPENAI_BASE_URL]; a query string (?api-version=...) is sent "
                               "with every request. The key comes from OPENAI_API_KEY, never from the URL",
                               default_text="OpenAI", key=RESOLVED)
    temperature: float = opt(0.7, "Sampling temperature", limit=Limit(0, 2))
    max_tokens: int = opt(400, "Answer length limit per request", limit=COUNT)
    seed: int = opt(0, "Sampling seed sent to the endpoint", flags=("--llm-seed",), hidden_flags=("--seed",),
                    limit=NON_NEGATIVE)
    max_reasks: int = opt(2, "How often an invalid answer is answered back per class", limit=NON_NEGATIVE)
    concurrency: int = opt(8, "Requests in flight", limit=COUNT, key=LOCATOR)
    timeout: float = opt(60.0, "Seconds (wall clock) an attempt may take, answer included, before it counts "
                               "as failed and is retried", limit=POSITIVE, key=LOCATOR)
    prompt_dir: str | None = opt(None, "Folder with your own system.j2, spatial.j2, temporal.j2, reask.j2, "
                                 "frames.toml", default_text="the packaged prompts/", key=INPUTS)
    from_file: str | None = opt(None, "Import descriptions instead of asking an LLM: the MSTA authors' "
                                '{"<class id>": [sentences]} or CuPL/DCLIP {"<class name>": [sentences]} JSON; '
                                "needs --kind spatial or temporal", key=INPUTS)
    context_length: int = opt(77, "CLIP's token context the sentences must fit", cli=False)

    def check(self) -> None:
        check(self)
        if not self.dataset:
            raise UserError("--dataset is required", 2)
        if self.from_file is not None and self.kind == "both":
            raise UserError("--from-file holds one kind of description: pass --kind spatial or --kind temporal", 2)

    @property
    def prompt_folder(self) -> Any:
        """The folder of the prompt templates: --prompt-dir, else the packaged prompts/."""
        from pathlib import Path

        from prompts import PROMPT_DIR

        return Path(self.prompt_dir).resolve() if self.prompt_dir else PROMPT_DIR

    @property
    def kinds(self) -> list[str]:
        return ["spatial", "temporal"] if self.kind == "both" else [self.kind]


def environment_defaults() -> dict[str, Any]:
    """`describe`'s options that the environment sets where no flag does (a layer below the flags)."""
    import os

    env = {"model": os.environ.get("MSTA_LLM_MODEL"), "base_url": os.environ.get("OPENAI_BASE_URL")}
    return {k: v for k, v in env.items() if v}


@dataclass(frozen=True)
class FramesOptions:
    """Every option of `frames`."""
    dataset: str | None = opt(None, "Dataset name", flags=("--dataset", "-d"))
    list_name: str | None = opt(None, "Video list name of the dataset (train, test, few_shot_2, train_s1, val, ...)",
                                flags=("--list",))
    mode: str | None = opt(None, "train (TSN draws, short side for random crops) or test (clips for multi-view "
                           "testing)", choices=("train", "test"),
                           default_text="train for lists named train*/few_shot*, else test")
    shots: int | None = opt(None, "Draw this many videos per class from the list (stratified, reproducible with "
                            "--split)", limit=COUNT)
    split: int = opt(0, "The draw of --shots (train calls it --split too)", limit=NON_NEGATIVE,
                     hidden_flags=("--seed",))
    labels: str | None = opt(None, "Class list file for the dataset (overrides the config)")
    workers: int | None = opt(None, "Decoding processes", limit=COUNT, default_text="the CPU count, at most 8")
    decoder: str | None = opt(None, "Video decoder", choices=("decord", "pyav"), default_text="decord where installed")
    fmt: str = opt("jpeg", "Cache format: jpeg (compact) or raw (uint8 npy)", flags=("--format",),
                   choices=("jpeg", "raw"))
    skip_missing: bool = opt(False, "Leave out videos missing from disk instead of failing")
    dedupe: bool = opt(False, "Keep a video listed twice once (its first line) instead of refusing the list")
    strict: bool = opt(False, "Fail when any video cannot be decoded")

    def check(self) -> None:
        check(self)
        if not self.dataset or not self.list_name:
            raise UserError("--dataset and --list are required", 2)

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("train" if self.list_name and self.list_name.startswith(("train", "few_shot")) else "test")


def subset(name: str, source: type, names: tuple[str, ...]) -> type:
    """A configuration made of some fields of another, their declarations shared, not copied."""
    from dataclasses import field, fields, make_dataclass

    by_name = {f.name: f for f in fields(source)}
    return make_dataclass(name, [(n, by_name[n].type, field(default=by_name[n].default, metadata=by_name[n].metadata))
                                 for n in names], frozen=True)


# `params`: the adapter options of `train` and its backbone
ParamsOptions = subset("ParamsOptions", TrainOptions, ("backbone", "adapter_dim", "adapter_layers", "adapter_scale",
                                                       "temporal_branch", "temporal", "shared", "only"))
