"""MSTA's training objective (msta/METHOD.md §2): cross-entropy + alpha · description consistency."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def class_means(emb: torch.Tensor) -> torch.Tensor:
    """(C, N, E) description embeddings -> (C, E): normalise(mean_i normalise(e_i))."""
    return F.normalize(F.normalize(emb.float(), dim=-1).mean(dim=1), dim=-1)


def consistency_loss(class_emb: torch.Tensor, d_spatial: torch.Tensor, d_temporal: torch.Tensor) -> torch.Tensor:
    """L_CC = mean over classes c of [2 - cos(w_c, D_c^s) - cos(w_c, D_c^t)]."""
    w = class_emb.float()  # under autocast the class embeddings may be bf16; the cache is float32
    cos_s = F.cosine_similarity(w, d_spatial.to(w), dim=-1)
    cos_t = F.cosine_similarity(w, d_temporal.to(w), dim=-1)
    return (2.0 - cos_s - cos_t).mean()


def msta_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_emb: torch.Tensor,
    d_spatial: torch.Tensor | None,
    d_temporal: torch.Tensor | None,
    alpha: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(total, ce, cc). cc is None when the constraint is off (alpha 0 or no descriptions)."""
    if (d_spatial is None) != (d_temporal is None):
        raise ValueError("pass both spatial and temporal description embeddings, or neither")
    ce = F.cross_entropy(logits.float(), labels)
    if alpha == 0 or d_spatial is None:
        return ce, ce, None
    cc = consistency_loss(class_emb, d_spatial, d_temporal)
    return ce + alpha * cc, ce, cc
