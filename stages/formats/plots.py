"""The PNGs written next to runs: training curves and confusion matrices (matplotlib, no display)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _figure(rows: int, cols: int, size: tuple[float, float]) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=size)


def _save(fig: Any, path: Path) -> None:
    """Written whole or not at all: a reader never sees half a PNG."""
    import matplotlib.pyplot as plt

    from msta.fileio import atomic_write

    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80))
    finally:
        plt.close(fig)


def plot_curves(history: list[dict[str, Any]], path: Path, p: Mapping[str, Any]) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = _figure(1, 2, (10, 3.6))
    ax1.plot(epochs, [h["loss"] for h in history], label="loss")
    ax1.plot(epochs, [h["ce"] for h in history], label="cross-entropy")
    if p["alpha"] > 0:
        ax1.plot(epochs, [h["cc"] for h in history], label="L_CC")
    ax1.set_xlabel("epoch")
    ax1.legend()
    ax2.plot(epochs, [h["train_acc"] for h in history], label="train")
    if any(h["heldout_acc"] is not None for h in history):
        ax2.plot(epochs, [h["heldout_acc"] for h in history], label="held-out")
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.legend()
    fig.suptitle(f"{p['method']} on {p['dataset']} ({p['protocol']})")
    _save(fig, path)


def plot_confusion(labels: Any, pred: Any, names: list[str], path: Path, title: str) -> None:
    import numpy as np

    c = len(names)
    matrix = np.zeros((c, c))
    np.add.at(matrix, (labels.numpy(), pred.numpy()), 1)
    matrix /= np.maximum(matrix.sum(1, keepdims=True), 1)
    size = min(16, 3 + c * 0.25)
    fig, ax = _figure(1, 1, (size, size))
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    if c <= 40:
        ax.set_xticks(range(c), names, rotation=90, fontsize=7)
        ax.set_yticks(range(c), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    _save(fig, path)
