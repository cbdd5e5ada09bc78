"""MSTA video adapters for CLIP. The public API (msta/api.py):

    model, preprocess, tokenizer = msta.load(FOLDER, pretrained=WEIGHTS)
    probs = msta.classify(model, ["a.mp4"], preprocess=preprocess)

Imported lazily, so `import msta` stays light for the command line.
"""
from __future__ import annotations

from typing import Any

__all__ = ["load", "classify", "Preprocess", "VideoModel", "ExportError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from msta import api

        return getattr(api, name)
    raise AttributeError(f"module 'msta' has no attribute {name!r}")
