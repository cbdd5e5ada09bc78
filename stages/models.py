"""The trained model a train artifact holds: the weights a selection names (last, best-heldout, an
epoch snapshot), checked by digest, and the video model built from them on a loaded backbone (or
the frozen CLIP). `evaluate`, `features`, `predict` and `export` load models here, one way."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cache.errors import UserError
from cache.store import sha256_file
from stages.engine.stage import Artifact, Resolved, artifact_of


def selected_weights(art: Artifact, selection: str, home: Path) -> tuple[Path, str]:
    """(file, checkpoint digest) of a training run for `selection`: its last weights (`last`), its
    best-heldout epoch, or the snapshot of one epoch (`epoch:N`)."""
    if selection == "best-heldout":
        if not art.meta.get("best_file"):
            raise UserError("this run had no held-out videos, so it has no best-heldout checkpoint; "
                            "use --selection last", 2)
        return _checked(home, art.meta["best_file"], art.meta["best_sha256"], art.meta["best_digest"])
    if selection.startswith("epoch:"):
        snapshot = art.meta.get("snapshots", {}).get(selection.removeprefix("epoch:"))
        if snapshot is None:
            raise UserError(f"this run kept no snapshot of {selection} (snapshots: "
                            f"{', '.join(art.meta.get('snapshots', {})) or 'none'})", 2)
        return _checked(home, snapshot["file"], snapshot["sha256"], snapshot["digest"])
    return art.path, art.digest


def _checked(home: Path, file: str, sha256: str, digest: str) -> tuple[Path, str]:
    path = home / file  # relative to the home (an absolute path, from older runs, stays as it is)
    if not path.exists() or sha256_file(path) != sha256:
        raise UserError(f"the checkpoint {path} is missing or altered; retrain with `train ... --force`", 1)
    return path, digest


def model_on_device(p: Mapping[str, Any], model_input: Resolved | None, template: str,
                    home: Path) -> tuple[Any, Any, Any, str, str, str]:
    """What a stage request names (params backbone, pretrained, device, selection; its `model`
    input, if any) loaded and in eval mode: (model, backbone, device, run key, checkpoint, protocol)."""
    from msta.method.backbone import BackboneError, load_backbone
    from msta.method.runtime import rank_device

    device = rank_device(p["device"])
    try:
        backbone = load_backbone(p["backbone"], p["pretrained"] or None, device=device)
    except BackboneError as exc:
        raise UserError(str(exc), 2) from None
    model, run_key, checkpoint, protocol = load_model(
        backbone, artifact_of(model_input) if model_input is not None else None, p["selection"], template, home,
        p["backbone"])
    return model.to(device).eval(), backbone, device, run_key, checkpoint, protocol


def load_model(backbone: Any, art: Artifact | None, selection: str, template: str, home: Path,
               backbone_name: str) -> tuple[Any, str, str, str]:
    """(model, run key, checkpoint digest, protocol) for the frozen CLIP (`art` None) or a training run."""
    from msta.method.model import VideoCLIP

    if art is None:
        return VideoCLIP(backbone, template), f"frozen:{backbone_name}", backbone.identity.weights_digest, "zero-shot"
    path, checkpoint = selected_weights(art, selection, home)
    if art.kind == "adapters":
        model, extra = adapted_model(backbone, path, template)
        return model, extra.get("run_key", art.digest), checkpoint, extra.get("protocol", "")
    from safetensors import safe_open
    from safetensors.torch import load_file

    model = VideoCLIP(backbone, template)
    model.clip.load_state_dict(load_file(str(path)))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return model, meta.get("run_key", art.digest), checkpoint, meta.get("protocol", "")


def adapted_model(backbone: Any, path: Path, template: str) -> tuple[Any, dict[str, str]]:
    """MSTA on `backbone` with the adapters of a file (its config read from the file); the file's
    extra metadata. The adapters must have been trained on this very backbone (name and weights)."""
    from msta.method.model import MSTA, read_adapter_info

    model = MSTA(backbone, read_adapter_info(path).config, template)
    return model, model.load_adapters(path)
