"""The protocols' combined figure, kept free of torch so that reports import it cheaply."""
from __future__ import annotations


def harmonic_mean(base: float, novel: float) -> float:
    """Base-to-novel HM = 2 b n / (b + n); 0 when both are 0."""
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)
