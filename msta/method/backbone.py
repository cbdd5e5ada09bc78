"""The frozen CLIP backbone: loading open_clip models from names, local files and folders, offline.

Weights come from (in the order `load_backbone` tries them):
- nothing (random init: parameter counting, benchmarks);
- `local-dir:PATH`, open_clip's folder form (open_clip_config.json + one weights file);
- a short name of weights shipped in this package (`SHIPPED`);
- a local checkpoint file (.safetensors, or .pt/.pth/.bin readable with torch.load(weights_only=True));
- an open_clip pretrained tag, only when its file is already in the local HF or open_clip cache:
  nothing is ever downloaded (the machines this project is built on have no internet, and a
  network wait that ends in an error is worse than an immediate, actionable message).

A `ViCLIP-*` name (InternVid's video CLIP, msta/method/viclip.py) is built by that module and takes its
released checkpoint file (or a folder holding it), or random init.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import pickle
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from msta.fileio import sha256_file
from msta.method import viclip
from msta.method.attention import pack_self_attention
from msta.method.adapters import AdapterConfig, adapters_disabled, text_transformer, vision_transformer
from msta.method.registry import (
    CHECKPOINT_SUFFIXES,
    LOCAL_DIR,
    SHIPPED,
    WEIGHTS_DIR,
    BackboneError,
    canonical_backbone,
    local_dir_weights,
)

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # msta/: configs/ and weights/ ship there
CONFIG_DIR = PACKAGE_DIR / "configs"
RANDOM_INIT_SEED = 0
RANDOM_INIT = f"random-init:seed{RANDOM_INIT_SEED}"
# Entries in OpenAI's TorchScript checkpoints that are not parameters (open_clip drops them too).
# They survive `torch.jit.load(f).state_dict()`, so they also mark OpenAI weights converted to
# safetensors: those were trained with QuickGELU, which open_clip enables only through its
# `openai` tag or a `-quickgelu` model name.
_NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")
QUICK_GELU_SUFFIX = "-quickgelu"

open_clip.add_model_config(CONFIG_DIR)


@dataclass(frozen=True)
class BackboneIdentity:
    name: str
    pretrained: str
    weights_digest: str   # sha256 of the weights file bytes, or RANDOM_INIT
    tokenizer: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def known_models() -> list[str]:
    return open_clip.list_models() + list(viclip.CONFIGS)


class Backbone:
    """A frozen open_clip CLIP (eval mode, no parameter requires grad) with its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer: Any, identity: BackboneIdentity, embed_dim: int):
        self.model = model.eval()
        pack_self_attention(self.model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.identity = identity
        self.embed_dim = embed_dim
        vis, txt = vision_transformer(model), text_transformer(model)
        self.vision_width: int = vis.width
        self.text_width: int = txt.width
        self.vision_layers: int = len(vis.resblocks)
        self.text_layers: int = len(txt.resblocks)
        self.context_length: int = int(model.context_length)
        size = model.visual.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        if size[0] != size[1]:
            raise BackboneError(f"{identity.name}: non-square input {size} is not supported (frames are square crops)")
        self.image_size: int = int(size[0])
        preprocess = getattr(model.visual, "preprocess_cfg", {})
        self.mean: tuple[float, ...] = tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std: tuple[float, ...] = tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> Backbone:
        self.model.to(device)
        return self

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Real token counts including start/end tokens, not truncated to the context length."""
        if isinstance(self.tokenizer, open_clip.SimpleTokenizer):
            return [len(self.tokenizer.encode(t)) + 2 for t in texts]
        hf = getattr(self.tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers one
        if hf is not None:
            return [len(hf(t)["input_ids"]) for t in texts]
        raise BackboneError(f"cannot count tokens for tokenizer {type(self.tokenizer).__name__}")

    def encode_text_frozen(
        self,
        texts: list[str],
        batch_size: int = 256,
        device: str | torch.device | None = None,
        out_device: str | torch.device = "cpu",
        progress: bool = False,
    ) -> torch.Tensor:
        """L2-normalised embeddings (N, E) float32 of the frozen text tower (adapters, if any, bypassed).

        `device` moves the backbone there first; results land on `out_device`; `progress` shows a bar
        over the texts (6,400 descriptions on ViT-B-16 on a CPU take minutes).
        """
        from tqdm import tqdm

        if device is not None:
            self.to(device)
        chunks = []
        bar = tqdm(total=len(texts), desc="embed", unit="text", disable=not progress)
        with torch.inference_mode(), adapters_disabled(self.model), bar:
            for i in range(0, len(texts), batch_size):
                tokens = self.tokenize(texts[i:i + batch_size]).to(self.device)
                chunks.append(self.model.encode_text(tokens).float())
                bar.update(len(tokens))
        if not chunks:
            return torch.empty(0, self.embed_dim, device=out_device)
        # Outside inference_mode: the result is an ordinary tensor that autograd may save.
        return F.normalize(torch.cat(chunks), dim=-1).to(out_device)


# ---------------------------------------------------------------- loading


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Hide open_clip's "no pretrained weights loaded" warning: we build first, then load ourselves."""
    def drop(record: logging.LogRecord) -> bool:
        return "pretrained weights" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch file that needs no pickle."""
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise BackboneError(f"{path}: unsupported checkpoint type; use one of {', '.join(CHECKPOINT_SUFFIXES)}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise BackboneError(f"{path}: not a readable safetensors file ({e})") from e
    convert = (
        "Convert it to safetensors on a machine where you trust the file, e.g.\n"
        "  python -c \"import torch, safetensors.torch as st; m = torch.load('IN', weights_only=False); "
        "sd = m.state_dict() if hasattr(m, 'state_dict') else m.get('state_dict', m); "
        "st.save_file({k: v.contiguous() for k, v in sd.items()}, 'OUT.safetensors')\"\n"
        "(for OpenAI's TorchScript files use torch.jit.load('IN', map_location='cpu') instead of torch.load)."
    )
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise BackboneError(
            f"{path}: refusing to load, the checkpoint needs pickle to run arbitrary code "
            f"(torch.load(weights_only=True) failed). {convert}"
        ) from e
    except RuntimeError as e:
        if "TorchScript" in str(e):
            raise BackboneError(f"{path}: a TorchScript archive cannot be loaded safely. {convert}") from e
        raise BackboneError(f"{path}: not a readable torch checkpoint ({e})") from e
    for nesting in ("state_dict", "model"):  # training checkpoints nest the weights (InternVid's under 'model')
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(nesting), dict):
            checkpoint = checkpoint[nesting]
            break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise BackboneError(f"{path}: expected a state dict of tensors")
    return checkpoint


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path, label: str) -> None:
    state = {k.removeprefix("module."): v for k, v in state.items() if k not in _NON_PARAMETER_KEYS}
    if "logit_scale" in state:  # some checkpoints store it as shape (1,), others as a scalar
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        if any(k.startswith("vision_encoder.") for k in state):
            raise BackboneError(f"{path}: a ViCLIP checkpoint (vision_encoder.*, text_encoder.*), not an open_clip "
                                "model's: use --backbone ViCLIP-B-16 (or ViCLIP-L-14)") from e
        raise BackboneError(f"{path}: these weights do not fit model {label!r}:\n{e}") from e


def _hf_cache_dirs() -> list[Path]:
    dirs = [os.environ.get("HF_HUB_CACHE", "")]
    if os.environ.get("HF_HOME"):
        dirs.append(os.path.join(os.environ["HF_HOME"], "hub"))
    dirs.append(os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub"))
    return [Path(d) for d in dirs if d]


def _find_in_hf_cache(repo_id: str, filenames: list[str]) -> Path | None:
    """A file of a HF repo already in the local hub cache (models--org--name/snapshots/REV/FILE)."""
    for cache in _hf_cache_dirs():
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        ref = repo / "refs" / "main"
        revisions = [ref.read_text().strip()] if ref.is_file() else []
        snapshots = repo / "snapshots"
        revisions += sorted(p.name for p in snapshots.iterdir()) if snapshots.is_dir() else []
        for rev in revisions:
            for name in filenames:
                if (snapshots / rev / name).is_file():
                    return snapshots / rev / name
    return None


def _cached_tag_file(tag_cfg: dict[str, Any]) -> Path | None:
    hf_hub = tag_cfg.get("hf_hub", "")
    if hf_hub:
        # open_clip's form: 'org/repo/filename', or 'org/repo/' for the default file names.
        repo_id, filename = os.path.split(hf_hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        found = _find_in_hf_cache(repo_id, names)
        if found:
            return found
    url = tag_cfg.get("url", "")
    if url:
        candidate = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if candidate.is_file():
            return candidate
    return None


def _tokenizer_id(tokenizer: Any, context_length: int, text_cfg: dict[str, Any]) -> str:
    parts = ["open_clip", type(tokenizer).__name__]
    if text_cfg.get("hf_tokenizer_name"):
        parts.append(text_cfg["hf_tokenizer_name"])
    if text_cfg.get("tokenizer_kwargs"):
        parts.append(json.dumps(text_cfg["tokenizer_kwargs"], sort_keys=True, separators=(",", ":")))
    parts.append(f"ctx{context_length}")
    return ":".join(parts)


def _build(name: str, device: torch.device, **create_kwargs: Any) -> nn.Module:
    # On the meta device nothing is allocated or initialised: counting parameters is instant.
    context = torch.device("meta") if device.type == "meta" else contextlib.nullcontext()
    # A fixed seed makes "random-init" one model, not a new one per process: keys stay meaningful
    # and the caller's random stream is left untouched.
    with _quiet_open_clip(), context, torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        if name.startswith("local-dir:"):
            return open_clip.create_model(name, load_weights=False, device=device, **create_kwargs)
        return open_clip.create_model(name, pretrained=None, device=device, **create_kwargs)


def _unknown_model(name: str) -> BackboneError:
    close = difflib.get_close_matches(name, known_models(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return BackboneError(
        f"unknown model {name!r}.{hint} To see the known names run:\n"
        "  python -c \"import msta.method.backbone as b; print('\\n'.join(b.known_models()))\""
    )


@dataclass
class _Plan:
    """What to build and which file to load into it."""
    model_name: str          # what open_clip builds
    identity_name: str
    pretrained: str
    checkpoint: Path | None
    create_kwargs: dict[str, Any]


def _plan(name: str, pretrained: str) -> _Plan:
    if not name and pretrained in SHIPPED:
        name = SHIPPED[pretrained][0]  # shipped weights name their architecture
    name, pretrained = canonical_backbone(name, pretrained)
    if name.startswith(LOCAL_DIR):
        folder = Path(name.removeprefix(LOCAL_DIR))
        # The folder name, not its path, so that moving the folder keeps the identity.
        return _Plan(name, f"{LOCAL_DIR}{folder.name}", "", local_dir_weights(folder), {})
    if open_clip.get_model_config(name) is None:
        raise _unknown_model(name)
    if not pretrained:
        return _Plan(name, name, "", None, {})
    if pretrained in SHIPPED:
        config, filename = SHIPPED[pretrained]
        if name != config:
            raise BackboneError(f"pretrained {pretrained!r} is for model {config!r}, not {name!r}")
        path = WEIGHTS_DIR / filename
        if not path.is_file():
            raise BackboneError(
                f"the shipped weights {pretrained!r} are not in this installation: {path} is missing "
                "(`python -m msta.world.pretrain` produces them; see its docstring for the recipe)"
            )
        return _Plan(name, name, pretrained, path, {})
    path = Path(pretrained).expanduser()
    if path.is_file():
        return _Plan(name, name, str(path), path, {})
    if path.suffix in CHECKPOINT_SUFFIXES or os.sep in pretrained:
        raise BackboneError(f"checkpoint file not found: {pretrained}")
    return _plan_tag(name, pretrained)


def _plan_tag(name: str, tag: str) -> _Plan:
    tag_cfg = open_clip.get_pretrained_cfg(name, tag)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise BackboneError(
            f"{tag!r} is neither a file nor a pretrained tag of {name!r}. "
            f"Tags of {name!r}: {', '.join(tags) or 'none'}; shipped weights: {', '.join(SHIPPED)}."
        )
    cached = _cached_tag_file(tag_cfg)
    if cached is None:
        hf_hub, url = tag_cfg.get("hf_hub", ""), tag_cfg.get("url", "")
        source = (f"the Hugging Face repository {hf_hub.rstrip('/')}" if hf_hub else url or "open_clip's release")
        raise BackboneError(
            f"the weights of {name} / {tag} are not on this machine, and nothing is downloaded here. They come "
            f"from {source}: download them where there is internet, then pass the file with --pretrained "
            "/path/to/weights (.safetensors, .bin or .pt: OpenAI's converted weights are detected), or an "
            "open_clip folder (open_clip_config.json + weights) with --backbone local-dir:/path/to/folder."
        )
    create_kwargs: dict[str, Any] = {"force_quick_gelu": bool(tag_cfg.get("quick_gelu", False))}
    preprocess = {k: tag_cfg[k] for k in ("mean", "std") if k in tag_cfg}
    if preprocess:
        create_kwargs["force_preprocess_cfg"] = preprocess
    return _Plan(name, name, tag, cached, create_kwargs)


def _model_config(model_name: str) -> dict[str, Any]:
    if model_name.startswith(LOCAL_DIR):
        path = Path(model_name.removeprefix(LOCAL_DIR)) / "open_clip_config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BackboneError(f"{path}: not a readable open_clip config ({e})") from e
        if not isinstance(config, dict) or not isinstance(config.get("model_cfg", config), dict):
            raise BackboneError(f"{path}: expected a JSON object (open_clip's model_cfg)")
        return config.get("model_cfg", config)
    return open_clip.get_model_config(model_name)


def check_adapter_fit(name: str, cfg: AdapterConfig) -> None:
    """Refuse an adapter layer range the backbone's towers cannot hold, before any work starts."""
    from msta.method.adapters import _check_depth

    name, _ = canonical_backbone(name, "")
    if viclip.is_viclip(name):
        vc = viclip.viclip_config(name)
        depth = {"vision": vc.vision_layers, "text": vc.text_layers}
    else:
        model_cfg = _model_config(name)
        if model_cfg is None:
            raise _unknown_model(name)
        depth = {"vision": model_cfg["vision_cfg"]["layers"], "text": model_cfg["text_cfg"]["layers"]}
    for tower in ("vision", "text"):
        if tower == "vision" and cfg.adapts_vision or tower == "text" and cfg.adapts_text:
            _check_depth(cfg, tower, depth[tower])


class ActivationWarning(UserWarning):
    """Weights that may have been trained with another activation than the model is built with."""


def _choose_activation(plan: _Plan, state: dict[str, torch.Tensor]) -> str | None:
    """QuickGELU for OpenAI's weights, whatever name they were given under.

    open_clip builds `ViT-B-16` with GELU and turns QuickGELU on only for its `openai` tag or a
    `-quickgelu` name; OpenAI's weights loaded into GELU load strictly and silently give wrong
    embeddings. Their checkpoints carry marker entries (see _NON_PARAMETER_KEYS): with those we
    switch to QuickGELU, and the identity says so, so the stage keys change with it. Without them
    we cannot tell, and return a warning where the architecture also exists as an OpenAI release.
    """
    if plan.create_kwargs.get("force_quick_gelu") is not None:
        return None  # a pretrained tag says which activation its weights need
    if (_model_config(plan.model_name) or {}).get("quick_gelu", False):
        return None
    if any(k in state for k in _NON_PARAMETER_KEYS):
        sibling = plan.model_name + QUICK_GELU_SUFFIX
        if not plan.model_name.startswith(LOCAL_DIR) and open_clip.get_model_config(sibling) is not None:
            plan.model_name = plan.identity_name = sibling
        else:
            plan.create_kwargs["force_quick_gelu"] = True
            plan.identity_name += "+quickgelu"
        return None
    if not plan.model_name.startswith(LOCAL_DIR) and "openai" in open_clip.list_pretrained_tags_by_model(plan.model_name):
        return (f"{plan.checkpoint}: loaded into {plan.model_name} with GELU, which is right for LAION/DataComp "
                f"weights. If these are OpenAI's CLIP weights (trained with QuickGELU) use --backbone "
                f"{plan.model_name}{QUICK_GELU_SUFFIX}, or convert the original .pt with its state_dict() "
                "so that its markers are kept")
    return None


def _load_viclip(name: str, pretrained: str, device: torch.device) -> Backbone:
    """InternVid's ViCLIP (msta/method/viclip.py) from a released checkpoint (`['model']`, strict names), or random."""
    cfg = viclip.viclip_config(name)
    path = Path(pretrained) if pretrained else None  # canonical: an absolute file path, or '' for random init
    if path is not None and device.type == "meta":
        raise BackboneError("the meta device holds no weights; load pretrained weights on a real device")
    if path is not None and not path.is_file():
        raise BackboneError(f"checkpoint file not found: {pretrained}")
    state = viclip.released_state(_read_checkpoint(path)) if path is not None else None
    context = torch.device("meta") if device.type == "meta" else contextlib.nullcontext()
    with context, torch.random.fork_rng(devices=[]):  # one random-init model, the caller's RNG untouched
        torch.manual_seed(RANDOM_INIT_SEED)
        model = viclip.ViCLIP(viclip.fit_frames(cfg, state))
    digest = RANDOM_INIT
    if path is not None:
        viclip.load_released(model, state, str(path), name)
        digest = sha256_file(path)
    model.to(device)
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg.context_length)  # OpenAI's BPE, as InternVid's
    identity = BackboneIdentity(name=name, pretrained=pretrained, weights_digest=digest,
                                tokenizer=_tokenizer_id(tokenizer, cfg.context_length, {}))
    return Backbone(model, tokenizer, identity, embed_dim=cfg.embed_dim)


def load_backbone(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
) -> Backbone:
    """Build `name` (an open_clip model name, `local-dir:PATH` or a ViCLIP name) and load `pretrained` into it."""
    device = torch.device(device)
    if viclip.is_viclip(name or ""):
        return _load_viclip(*canonical_backbone(name, pretrained or ""), device)
    plan = _plan(name or "", pretrained or "")
    if plan.checkpoint is not None and device.type == "meta":
        if plan.pretrained:
            raise BackboneError("the meta device holds no weights; load pretrained weights on a real device")
        plan.checkpoint = None  # an open_clip folder on the meta device: its architecture alone
    state = _read_checkpoint(plan.checkpoint) if plan.checkpoint is not None else None
    activation_warning = _choose_activation(plan, state) if state is not None else None
    model_cfg = _model_config(plan.model_name)
    try:
        # Weights are loaded on the CPU first, then the model moves to `device`.
        build_device = device if plan.checkpoint is None else torch.device("cpu")
        model = _build(plan.model_name, build_device, **plan.create_kwargs)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        raise BackboneError(f"cannot build model {plan.identity_name!r}: {e}") from e
    digest = RANDOM_INIT
    if plan.checkpoint is not None:
        _load_weights(model, state, plan.checkpoint, plan.identity_name)
        if activation_warning:
            warnings.warn(activation_warning, ActivationWarning, stacklevel=2)
        digest = sha256_file(plan.checkpoint)
        model.to(device)
    tokenizer = open_clip.get_tokenizer(plan.model_name)
    identity = BackboneIdentity(
        name=plan.identity_name,
        pretrained=plan.pretrained,
        weights_digest=digest,
        tokenizer=_tokenizer_id(tokenizer, int(model.context_length), model_cfg.get("text_cfg", {})),
    )
    try:
        return Backbone(model, tokenizer, identity, embed_dim=int(model_cfg["embed_dim"]))
    except ValueError as e:  # a tower MSTA cannot adapt (ResNet, timm, HF text)
        raise BackboneError(f"{plan.identity_name}: {e}") from e
