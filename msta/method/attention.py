"""Self-attention of CLIP's blocks as one packed projection, scaled_dot_product_attention and the
output projection, on the batch-first activations as they come.

torch's nn.MultiheadAttention first turns batch-first input into a (tokens, batch, width) view and
projects that: its backward then runs the input projection as a batched product with the weight
repeated once per token position (a third of the products of a small model's step, measured by
benchmarks/demo_step.py) plus copies to make the views contiguous. The parameters stay those of
nn.MultiheadAttention (same names, same state dict); only the order of the arithmetic differs
(results agree to float rounding: tests/test_attention.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PackedSelfAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention with a fast path for batch-first self-attention without weights
    returned; every other call (cross-attention, key padding masks, attention weights) is the
    parent's."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,  # type: ignore[override]
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if (need_weights or key_padding_mask is not None or not (query is key is value) or query.dim() != 3
                or not self.batch_first or not self._qkv_same_embed_dim or self.bias_k is not None
                or self.add_zero_attn):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        n, length, width = query.shape
        heads = self.num_heads
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
        mask = attn_mask
        if mask is not None:
            if mask.dtype == torch.bool:
                mask = ~mask  # nn.MultiheadAttention: True = may not attend; SDPA: True = may attend
            if mask.dim() == 3:  # (batch * heads, L, L)
                mask = mask.view(n, heads, length, length)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                             is_causal=is_causal and mask is None)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width)), None


def pack_self_attention(model: nn.Module) -> int:
    """Give every nn.MultiheadAttention of `model` the packed fast path, in place (the module keeps
    its parameters and buffers; only its class changes). Returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module) is nn.MultiheadAttention:
            module.__class__ = PackedSelfAttention
            changed += 1
    return changed
