"""Sparse-attention baselines for the experiments: BigBird-style block attention and
Reformer-style LSH attention, as drop-ins for ``F.scaled_dot_product_attention`` on
self-attention ``[B, H, L, d]`` tensors (the call :class:`pxcompile.PixelflyAttention` makes).

* :class:`BigBirdAttention` (Zaheer et al. 2020, "block sparse" ITC form): the sequence is cut
  into blocks; query block ``i`` attends a **window** of blocks around it (``i-1, i, i+1`` by
  default), the first ``globals`` blocks (**global** keys; those blocks also attend every key,
  global queries) and ``random`` **random** blocks drawn once per module (fixed, as BigBird's
  random attention is fixed per layer; shared by all heads, like Pixelfly's pattern). It runs on
  the same block-sparse CPU kernel as Pixelfly attention
  (:func:`pxcompile.attention.pixelfly_attention` with this block layout: only the kept key
  blocks are gathered and multiplied, a hand-written backward), so the two differ only in
  *which* blocks they keep and their speeds are directly comparable. When causal, the window
  keeps ``i-1, i`` and random blocks are drawn before the window.
* :class:`LSHAttention` (Kitaev et al. 2020): **shared QK** as in Reformer (the keys are the
  queries normalised to unit length; the ``k`` argument is ignored), ``n_hashes`` rounds of
  angular LSH with fresh random rotations on every call (``argmax([xR, -xR])`` over
  ``L / bucket`` buckets), tokens sorted by (bucket, position), cut into chunks of ``bucket``
  tokens, each chunk attending itself and the previous chunk (wrapping around), a token never
  attending itself unless it has nothing else (score -1e5, as in Reformer); the rounds are
  combined with their log-sum-exp weights. Differences from the reference: keys of other buckets
  that land in the same or previous chunk are attended (no bucket mask), duplicates across
  rounds are not de-counted, and the backward is autograd (Reformer's reversible layers and
  chunked feed-forward are memory savings, not speed, and are left out).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pxcompile.attention import BlockLayout, pixelfly_attention

__all__ = ["bigbird_block_mask", "BigBirdAttention", "LSHAttention", "lsh_attention"]


def bigbird_block_mask(
    n: int, window: int = 3, globals: int = 1, random: int = 2, seed: int = 0
) -> np.ndarray:
    """``[n, n]`` bool block mask (True = query block ``i`` attends key block ``j``), before
    causality: a ``window``-block band (odd, centred on the diagonal), ``globals`` global rows
    and columns, ``random`` random key blocks per other row among the blocks not yet kept.

    Example:
        >>> m = bigbird_block_mask(16, 3, 1, 2, seed=0)
        >>> int(m[5].sum()), bool(m[0].all()), bool(m[:, 0].all())
        (6, True, True)
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd number of blocks, got {window}")
    rng = np.random.default_rng(seed)
    m = np.zeros((n, n), dtype=bool)
    half = window // 2
    for i in range(n):
        m[i, max(0, i - half) : i + half + 1] = True
    m[:globals, :] = True
    m[:, :globals] = True
    for i in range(globals, n):
        free = np.flatnonzero(~m[i])
        if random and len(free):
            m[i, rng.choice(free, size=min(random, len(free)), replace=False)] = True
    return m


def _causal_bigbird_mask(n: int, window: int, globals: int, random: int, seed: int) -> np.ndarray:
    """The causal variant: window ``i - window//2 .. i``, globals, ``random`` random blocks
    drawn among the blocks before the window (lower triangle only, so none is wasted)."""
    rng = np.random.default_rng(seed)
    m = np.zeros((n, n), dtype=bool)
    half = window // 2
    for i in range(n):
        m[i, max(0, i - half) : i + 1] = True
    m[:globals, :] = True
    m[:, :globals] = True
    m = np.tril(m)
    for i in range(globals, n):
        free = np.flatnonzero(~m[i, :i])
        if random and len(free):
            m[i, rng.choice(free, size=min(random, len(free)), replace=False)] = True
    return m


def _pad_keys(q: Tensor, k: Tensor, v: Tensor, P: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pad ``[B, H, L, d]`` inputs to ``P`` tokens; the padding mask (True = padding)."""
    B, _, L, _ = q.shape
    q, k, v = (F.pad(x, (0, 0, 0, P - L)) for x in (q, k, v))
    kpm = torch.zeros(B, P, dtype=torch.bool, device=q.device)
    kpm[:, L:] = True
    return q, k, v, kpm


class BigBirdAttention(nn.Module):
    """BigBird-style block-sparse self-attention (window + global + random blocks) on the
    Pixelfly block-sparse kernel: ``forward(q, k, v, attn_mask=None, dropout_p=0.0,
    is_causal=False, scale=None)`` like ``F.scaled_dot_product_attention``. Lengths that are
    not a multiple of ``block`` are padded (padded keys masked, padded queries dropped)."""

    def __init__(
        self, block: int = 64, window: int = 3, globals: int = 1, random: int = 2, seed: int = 0
    ) -> None:
        super().__init__()
        if globals < 1:
            raise ValueError("BigBirdAttention needs at least one global block")
        self.block, self.window, self.globals, self.random, self.seed = (
            block,
            window,
            globals,
            random,
            seed,
        )
        self._layouts: dict[tuple[int, bool], BlockLayout] = {}

    def extra_repr(self) -> str:
        return (
            f"block={self.block}, window={self.window}, globals={self.globals}, "
            f"random={self.random}"
        )

    def layout(self, seq: int, causal: bool = False) -> BlockLayout:
        """The block layout for ``seq`` tokens (a multiple of ``block``), built once."""
        key = (seq, causal)
        if key not in self._layouts:
            n = seq // self.block
            make = _causal_bigbird_mask if causal else bigbird_block_mask
            mask = make(n, self.window, self.globals, self.random, self.seed)
            self._layouts[key] = BlockLayout(seq, self.block, 0, self.globals, mask)
        return self._layouts[key]

    def density(self, seq: int, causal: bool = False) -> float:
        P = -(-seq // self.block) * self.block
        return self.layout(P, causal).density(causal)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
    ) -> Tensor:
        L = q.shape[-2]
        P = -(-L // self.block) * self.block
        kpm = None
        if P != L:
            q, k, v, kpm = _pad_keys(q, k, v, P)
            if attn_mask is not None:
                raise ValueError("BigBirdAttention: attn_mask with padding is not supported")
        out = pixelfly_attention(
            q,
            k,
            v,
            self.layout(P, is_causal),
            causal=is_causal,
            attn_mask=attn_mask,
            key_padding_mask=kpm,
            scale=scale,
            dropout_p=dropout_p,
        )
        return out[:, :, :L] if P != L else out


def lsh_attention(
    q: Tensor,
    v: Tensor,
    bucket: int = 64,
    n_hashes: int = 2,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Reformer LSH attention with shared QK on ``[B, H, L, d]`` queries (``L`` a multiple of
    ``2 * bucket``); ``key_padding_mask`` ``[B, L]``, True = padding. See the module doc."""
    B, H, L, d = q.shape
    dv = v.shape[-1]
    if L % (2 * bucket):
        raise ValueError(f"sequence length {L} is not a multiple of 2 * bucket ({2 * bucket})")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    nb, nc, c = L // bucket, L // bucket, bucket
    BH = B * H
    q3, v3 = q.reshape(BH, L, d), v.reshape(BH, L, dv)
    # angular LSH: one random rotation per (head, round), fresh on every call
    rot = torch.randn(H, d, n_hashes, nb // 2, generator=generator, dtype=q.dtype)
    rot = rot.to(q.device).repeat(B, 1, 1, 1)  # [BH, d, nh, nb/2]
    with torch.no_grad():
        r = torch.einsum("bld,bdhr->bhlr", q3, rot)
        buckets = torch.cat([r, -r], -1).argmax(-1)  # [BH, nh, L]
        buckets = buckets + (torch.arange(n_hashes, device=q.device) * nb).view(1, -1, 1)
        pos = torch.arange(L, device=q.device)
        key = (buckets * L + pos).reshape(BH, n_hashes * L)
        sticker = key.argsort(-1)  # [BH, nh*L]
        undo = sticker.argsort(-1)
        st = sticker % L  # original positions in sorted order
    sq = q3.gather(1, st.unsqueeze(-1).expand(-1, -1, d))  # [BH, nh*L, d]
    sv = v3.gather(1, st.unsqueeze(-1).expand(-1, -1, dv))
    nchunk = n_hashes * nc
    cq = sq.view(BH, nchunk, c, d)
    ck = F.normalize(cq, dim=-1)  # shared QK: unit-length keys
    cv = sv.view(BH, nchunk, c, dv)
    cpos = st.view(BH, nchunk, c)

    def back(x: Tensor) -> Tensor:  # each chunk with the previous one (wrapping around)
        return torch.cat([x, x.roll(1, dims=1)], dim=2)

    kk, vv, kpos = back(ck), back(cv), back(cpos)
    s = torch.matmul(cq, kk.transpose(-1, -2)) * scale  # [BH, nchunk, c, 2c]
    qp, kp = cpos.unsqueeze(-1), kpos.unsqueeze(-2)
    if causal:
        s = s.masked_fill(kp > qp, -1e9)
    if key_padding_mask is not None:
        pad = key_padding_mask.bool().repeat_interleave(H, 0)  # [BH, L]
        kpad = pad.gather(1, kpos.reshape(BH, -1)).view_as(kpos).unsqueeze(-2)
        s = s.masked_fill(kpad, -1e9)
    s = s.masked_fill(kp == qp, -1e5)  # not itself, unless nothing else
    lse = torch.logsumexp(s, -1, keepdim=True)
    o = torch.matmul(torch.exp(s - lse), vv)  # [BH, nchunk, c, dv]
    o = o.reshape(BH, n_hashes * L, dv).gather(1, undo.unsqueeze(-1).expand(-1, -1, dv))
    lse = lse.reshape(BH, n_hashes * L).gather(1, undo)
    o = o.view(BH, n_hashes, L, dv)
    w = torch.softmax(lse.view(BH, n_hashes, L, 1), dim=1)  # rounds by their total weight
    return (o * w).sum(1).view(B, H, L, dv)


class LSHAttention(nn.Module):
    """Reformer-style LSH self-attention (shared QK: ``k`` is ignored), ``forward(q, k, v,
    attn_mask=None, dropout_p=0.0, is_causal=False, scale=None)``; lengths are padded to a
    multiple of ``2 * bucket`` (padded keys masked). Random rotations come from torch's global
    generator (fresh every call, as in Reformer), so seed torch for reproducible runs."""

    def __init__(self, bucket: int = 64, n_hashes: int = 2) -> None:
        super().__init__()
        self.bucket, self.n_hashes = bucket, n_hashes

    def extra_repr(self) -> str:
        return f"bucket={self.bucket}, n_hashes={self.n_hashes}"

    def keys_per_query(self) -> int:
        return 2 * self.bucket * self.n_hashes

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        **_: Any,
    ) -> Tensor:
        if attn_mask is not None or dropout_p:
            raise ValueError("LSHAttention: attn_mask and dropout are not supported")
        L = q.shape[-2]
        m = 2 * self.bucket
        P = -(-L // m) * m
        kpm = None
        if P != L:
            q, k, v, kpm = _pad_keys(q, k, v, P)
        out = lsh_attention(
            q, v, self.bucket, self.n_hashes, is_causal, key_padding_mask=kpm, scale=scale
        )
        return out[:, :, :L] if P != L else out
