"""Weights shipped inside the package, by short name; light to import (no torch)."""
from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"

# short name -> (open_clip model config, file under msta/weights)
SHIPPED: dict[str, tuple[str, str]] = {
    "synthetic-world": ("msta-world", "synthetic-world.safetensors"),
}


def weights_file(pretrained: str | None) -> Path | None:
    """The local file a --pretrained value names, or None for random init and open_clip tags."""
    if not pretrained:
        return None
    if pretrained in SHIPPED:
        return WEIGHTS_DIR / SHIPPED[pretrained][1]
    if pretrained.startswith("local-dir:"):
        folder = Path(pretrained[len("local-dir:"):])
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if (folder / name).exists():
                return folder / name
        return None
    path = Path(pretrained)
    return path.resolve() if path.exists() else None
