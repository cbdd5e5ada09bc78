"""MSTA's loss: class means of descriptions, the consistency constraint, CE + alpha · L_CC."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from msta.method.losses import class_means, consistency_loss, msta_loss


def test_class_means_normalise_each_then_the_mean() -> None:
    emb = torch.tensor([[[3.0, 0.0], [0.0, 0.5]]])  # one class, two descriptions of different norms
    expected = torch.tensor([[1.0, 1.0]]) / math.sqrt(2)  # not pulled towards the longer vector
    assert torch.allclose(class_means(emb), expected)


def test_consistency_loss_by_hand() -> None:
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d_s = torch.tensor([[1.0, 0.0], [1.0, 0.0]])    # cos 1 and 0
    d_t = torch.tensor([[0.0, 2.0], [0.0, -1.0]])   # cos 0 and -1 (norms do not matter)
    # class 0: 2 - 1 - 0 = 1; class 1: 2 - 0 + 1 = 3; mean 2
    assert consistency_loss(w, d_s, d_t).item() == pytest.approx(2.0)
    assert consistency_loss(w, w, w).item() == pytest.approx(0.0)


def test_msta_loss_combines_ce_and_consistency() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    ce_by_hand = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(1 / (1 + math.e))) / 2
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d_s = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    d_t = torch.tensor([[0.0, 2.0], [0.0, -1.0]])
    total, ce, cc = msta_loss(logits, labels, w, d_s, d_t, alpha=0.5)
    assert ce.item() == pytest.approx(ce_by_hand)
    assert cc.item() == pytest.approx(2.0)
    assert total.item() == pytest.approx(ce_by_hand + 0.5 * 2.0)


def test_constraint_off_reports_ce_only() -> None:
    logits, labels = torch.randn(3, 4), torch.tensor([0, 1, 3])
    w = F.normalize(torch.randn(4, 8), dim=-1)
    for total, ce, cc in (msta_loss(logits, labels, w, None, None), msta_loss(logits, labels, w, w, w, alpha=0.0)):
        assert cc is None and torch.equal(total, ce)
        assert ce.item() == pytest.approx(F.cross_entropy(logits, labels).item())
    with pytest.raises(ValueError, match="both"):
        msta_loss(logits, labels, w, w, None)


def test_gradient_reaches_the_class_embeddings_only() -> None:
    w = F.normalize(torch.randn(3, 8), dim=-1).requires_grad_(True)
    d = F.normalize(torch.randn(3, 8), dim=-1)
    consistency_loss(w, d, d).backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_mixed_precision_inputs() -> None:
    w = F.normalize(torch.randn(3, 8), dim=-1)
    d_s, d_t = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(3, 8), dim=-1)
    full = consistency_loss(w, d_s, d_t)
    half = consistency_loss(w.bfloat16(), d_s, d_t)  # bf16 class embeddings from autocast, float32 cache
    assert half.dtype == torch.float32 and half.item() == pytest.approx(full.item(), abs=2e-2)
