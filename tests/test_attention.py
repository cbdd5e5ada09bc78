"""The packed self-attention fast path against torch's own nn.MultiheadAttention."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from msta.method.attention import PackedSelfAttention, pack_self_attention
from msta.method.backbone import load_backbone


def pair(width: int = 32, heads: int = 4) -> tuple[nn.MultiheadAttention, nn.MultiheadAttention]:
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(width, heads, batch_first=True)
    with torch.no_grad():
        reference.in_proj_bias.normal_()
        reference.out_proj.bias.normal_()
    packed = copy.deepcopy(reference)
    assert pack_self_attention(packed) == 1 and type(packed) is PackedSelfAttention
    return reference, packed


def causal(length: int, kind: str, batch_heads: int) -> torch.Tensor | None:
    upper = torch.ones(length, length, dtype=torch.bool).triu(1)  # True: may not attend
    if kind == "none":
        return None
    if kind == "bool":
        return upper
    if kind == "float3d":
        return torch.zeros(length, length).masked_fill(upper, float("-inf")).expand(batch_heads, -1, -1)
    return torch.zeros(length, length).masked_fill(upper, float("-inf"))  # open_clip's text mask


@pytest.mark.parametrize("mask_kind", ["none", "float", "bool", "float3d"])
def test_outputs_and_gradients_match_nn_multihead_attention(mask_kind: str) -> None:
    reference, packed = pair()
    x = torch.randn(3, 7, 32)
    mask = causal(7, mask_kind, 3 * 4)
    outs, grads = [], []
    for module in (reference, packed):
        xi = x.clone().requires_grad_(True)
        out = module(xi, xi, xi, need_weights=False, attn_mask=mask)[0]
        out.square().sum().backward()
        outs.append(out)
        grads.append([xi.grad, module.in_proj_weight.grad, module.out_proj.weight.grad])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for g_packed, g_ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_packed, g_ref, rtol=1e-4, atol=1e-4)


def test_other_calls_are_the_parents() -> None:
    reference, packed = pair()
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    out_ref, weights_ref = reference(x, x, x, need_weights=True)
    out, weights = packed(x, x, x, need_weights=True)  # attention weights asked for
    assert weights is not None
    torch.testing.assert_close(weights, weights_ref)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(packed(x, memory, memory, need_weights=False)[0],  # cross-attention
                               reference(x, memory, memory, need_weights=False)[0])


def test_state_dict_is_unchanged_and_every_clip_block_is_packed() -> None:
    reference, packed = pair()
    assert list(packed.state_dict()) == list(reference.state_dict())
    backbone = load_backbone("msta-tiny", None)
    attention = [m for m in backbone.model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert attention and all(type(m) is PackedSelfAttention for m in attention)
