"""Weights shipped inside the package, and the one spelling of a (backbone, weights) pair that keys,
loading and the CLI share; light to import (no torch)."""
from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
LOCAL_DIR = "local-dir:"
DEFAULT_BACKBONE = "ViT-B-16"
DEFAULT_TAG = "openai"  # the default weights of an open_clip model name
VICLIP_PREFIX = "ViCLIP-"  # InternVid's video CLIP (msta/method/viclip.py): its own module and checkpoint layout

# short name -> (open_clip model config, file under msta/weights)
SHIPPED: dict[str, tuple[str, str]] = {
    "synthetic-world": ("msta-world", "synthetic-world.safetensors"),
}


class BackboneError(Exception):
    """A user-facing problem with a backbone or its weights; the message is shown as is."""


def _folder(value: str) -> Path | None:
    """The folder `value` names: `local-dir:PATH`, or a plain path to an open_clip folder."""
    if value.startswith(LOCAL_DIR):
        return Path(value[len(LOCAL_DIR):]).expanduser()
    path = Path(value).expanduser()
    return path if value and (path / "open_clip_config.json").is_file() else None


def canonical_backbone(backbone: str | None, pretrained: str | None) -> tuple[str, str]:
    """(model, weights) as stage keys and `load_backbone` take them, from what a user typed.

    An open_clip folder (`local-dir:PATH` or just its path, relative or absolute, given as either
    flag) carries its own architecture and weights: it becomes `local-dir:/abs/path` and no weights
    string. Without --pretrained an open_clip name gets its `openai` tag (a ViCLIP name: random init);
    a weights file becomes an absolute path, and for ViCLIP so does the one checkpoint of a folder
    given as --pretrained; '' or 'random' mean random init.
    """
    pretrained_value = "" if pretrained in ("", "random") else pretrained
    folder = _folder(backbone) if backbone else None
    weights_folder = _folder(pretrained_value) if pretrained_value else None
    if weights_folder is not None:
        if backbone and (folder is None or folder.resolve() != weights_folder.resolve()):
            raise BackboneError(
                f"--pretrained {pretrained} is an open_clip folder with its own architecture; "
                f"drop --backbone {backbone} (or pass the folder once, as --backbone)")
        folder = weights_folder
    elif folder is not None and pretrained_value:
        raise BackboneError(
            f"--backbone {backbone} is an open_clip folder with its own weights; drop --pretrained {pretrained}")
    if folder is not None:
        if not folder.is_dir():
            raise BackboneError(f"{LOCAL_DIR}{folder}: folder not found")
        return f"{LOCAL_DIR}{folder.resolve()}", ""
    name = (backbone or DEFAULT_BACKBONE).replace("/", "-")  # open_clip's spelling: ViT-B/16 -> ViT-B-16
    if pretrained_value is None:
        pretrained_value = DEFAULT_TAG if not name.startswith(VICLIP_PREFIX) else ""
    if pretrained_value and pretrained_value not in SHIPPED and Path(pretrained_value).expanduser().exists():
        pretrained_value = str(Path(pretrained_value).expanduser().resolve())
        if name.startswith(VICLIP_PREFIX) and Path(pretrained_value).is_dir():  # a folder holding the checkpoint
            pretrained_value = str(_one_weights_file(Path(pretrained_value), pretrained_value))
    return name, pretrained_value


def local_dir_weights(folder: Path) -> Path:
    """The one weights file of an open_clip folder."""
    if not (folder / "open_clip_config.json").is_file():
        raise BackboneError(f"{LOCAL_DIR}{folder}: no open_clip_config.json in that folder")
    return _one_weights_file(folder, f"{LOCAL_DIR}{folder}")


def _one_weights_file(folder: Path, label: str) -> Path:
    found = [p for suffix in CHECKPOINT_SUFFIXES for p in sorted(folder.glob(f"*{suffix}"))]
    if not found:
        raise BackboneError(f"{label}: no weights file ({', '.join(CHECKPOINT_SUFFIXES)}) in that folder")
    if len(found) > 1:
        raise BackboneError(f"{label}: several weights files ({[p.name for p in found]}); keep one")
    return found[0]


def weights_file(backbone: str, pretrained: str | None) -> Path | None:
    """The local file behind a canonical (backbone, pretrained), or None for random init and open_clip
    tags (a tag's file is identified by the tag itself)."""
    if backbone.startswith(LOCAL_DIR):
        return local_dir_weights(Path(backbone[len(LOCAL_DIR):]))
    if not pretrained:
        return None
    if pretrained in SHIPPED:
        return WEIGHTS_DIR / SHIPPED[pretrained][1]
    path = Path(pretrained)
    return path.resolve() if path.is_file() else None
