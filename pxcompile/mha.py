"""A drop-in for ``nn.MultiheadAttention`` whose projections are modules.

``nn.MultiheadAttention`` keeps Q/K/V packed in one ``in_proj_weight`` and reads
``out_proj.weight`` directly, so neither can be swapped for a sparse layer in place. The
rewrite pass replaces such a module by :class:`ProjectedMultiheadAttention`, which calls
``in_proj`` (a :class:`~pxcompile.layers.PixelflyLinear` over the packed ``3E x E`` weight, or a
plain Linear) and ``out_proj`` as modules, and computes attention with
``F.scaled_dot_product_attention``. It accepts the same call signature and returns the same
``(output, weights)`` pair. It reports ``_qkv_same_embed_dim = False`` so that torch's fused
Transformer fast path (which reads the dense weights) is never taken.

Cross-attention (query, key, value not the same tensor) runs the packed projection on each
input and keeps its third: correct, and three times the projection work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def unsupported_reason(mha: nn.MultiheadAttention) -> str | None:
    """Why this MultiheadAttention can't be rewritten (None if it can)."""
    if not mha._qkv_same_embed_dim:
        return "MultiheadAttention with separate kdim/vdim"
    if mha.bias_k is not None or mha.add_zero_attn:
        return "MultiheadAttention with add_bias_kv/add_zero_attn"
    return None


class ProjectedMultiheadAttention(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention, in_proj: nn.Module, out_proj: nn.Module):
        super().__init__()
        self.embed_dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.head_dim = mha.head_dim
        self.dropout = mha.dropout
        self.batch_first = mha.batch_first
        self.in_proj = in_proj
        self.out_proj = out_proj
        # Read by nn.TransformerEncoderLayer's fast-path checks: this turns the fast path off.
        self._qkv_same_embed_dim = False
        self.in_proj_weight = None
        self.in_proj_bias = None

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # now [L, N, E]
        e = self.embed_dim
        if query is key and key is value:
            q, k, v = self.in_proj(query).split(e, dim=-1)
        else:
            q = self.in_proj(query)[..., :e]
            k = self.in_proj(key)[..., e : 2 * e]
            v = self.in_proj(value)[..., 2 * e :]
        L, N, _ = q.shape
        S = k.shape[0]
        h, d = self.num_heads, self.head_dim

        def heads(t: Tensor, n: int) -> Tensor:  # [n, N, E] -> [N, h, n, d]
            return t.reshape(n, N, h, d).permute(1, 2, 0, 3)

        q, k, v = heads(q, L), heads(k, S), heads(v, S)
        mask = _merge_masks(attn_mask, key_padding_mask, N, h, L, S, q.dtype)
        causal = is_causal and mask is None
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / d**0.5
            if causal:
                tri = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
                scores = scores.masked_fill(~tri, float("-inf"))
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(-1)
            attn = F.dropout(weights, p) @ v
        else:
            weights = None
            attn = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal
            )
        out = self.out_proj(attn.permute(2, 0, 1, 3).reshape(L, N, e))
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(1)
            if unbatched:
                weights = weights.squeeze(0)
        return out, weights


def _merge_masks(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    N: int,
    h: int,
    L: int,
    S: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """Additive float mask of shape broadcastable to ``[N, h, L, S]`` (MHA's conventions:
    a True in a boolean mask means *not allowed*)."""

    def additive(m: Tensor) -> Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = None
    if attn_mask is not None:
        m = additive(attn_mask)
        m = m.view(1, 1, L, S) if m.dim() == 2 else m.view(N, h, L, S)
        mask = m
    if key_padding_mask is not None:
        kp = additive(key_padding_mask).view(N, 1, 1, S)
        mask = kp if mask is None else mask + kp
    return mask
