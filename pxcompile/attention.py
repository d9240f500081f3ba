"""Pixelfly attention: block-sparse attention whose score matrix keeps a flat block butterfly.

The sequence is cut into ``n = seq / block`` blocks; query block ``i`` attends key block ``j``
iff one of

* **butterfly**: ``i XOR j`` is in ``{0, 1, 2, ..., 2^(f-1)}`` (the flat block butterfly of
  :func:`pxcompile.patterns.flat_butterfly` over sequence blocks, diagonal included);
* **global keys**: ``j < g`` (the first ``g`` blocks are attended by every query);
* **global queries**: ``i < g`` (the first ``g`` blocks attend every key);

and, for causal attention, ``j <= i`` (inside the diagonal block the element-wise lower
triangle applies, so no query ever sees a later key). All heads share the pattern. Masks from
the model (a boolean/additive ``attn_mask`` broadcastable to ``[B, H, L, S]`` or a
``key_padding_mask``) apply on top, element by element.

Execution (:func:`pixelfly_attention`):

* the ``g`` global query blocks are dense rows: one :func:`F.scaled_dot_product_attention` call
  (fused kernel, native autograd);
* every other query block ``i`` attends a fixed number ``kmax`` of key blocks (its kept blocks,
  padded with masked slots): their K/V blocks are gathered into ``[..., kmax * block, d]``, one
  batched matmul gives the kept scores, a complete softmax over them, one batched matmul with
  the gathered V. Work is tiled over heads and query blocks so the gathered buffers stay in
  cache. A hand-written :class:`torch.autograd.Function` gives the backward (it keeps the
  probabilities; the K/V gradients are gathered back with ``index_add_``);
* a layout that keeps every block (every block of the lower triangle when causal) runs
  :func:`F.scaled_dot_product_attention` itself, so it equals dense attention exactly.

Sequence lengths that are not a multiple of ``block * 2^f`` are padded up inside
:class:`PixelflyAttention` (padded keys are masked, padded queries dropped).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pxcompile.patterns import AttentionSpec, attention_block_mask
from pxcompile.policy import DEFAULT_ATTENTION_MIN_SEQ

__all__ = [
    "AttentionSpec",
    "BlockLayout",
    "attention_layout",
    "pixelfly_attention",
    "masked_dense_attention",
    "PixelflyAttention",
    "TILE_ELEMS",
    "release_workspace",
]

#: Largest score buffer per tile, in elements (tiles split heads only).
TILE_ELEMS: int = 1 << 25


# --------------------------------------------------------------------------------------------
# spec and layout
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Which key blocks each query block keeps: ``mask[i, j]`` over ``n x n`` blocks."""

    seq: int
    block: int
    factors: int
    globals: int
    mask: np.ndarray  # [n, n] bool, before causality

    @property
    def n(self) -> int:
        return self.seq // self.block

    def block_mask(self, causal: bool = False) -> np.ndarray:
        m = self.mask
        return np.tril(m) if causal else m

    def density(self, causal: bool = False) -> float:
        """Kept blocks / all blocks (/ lower-triangle blocks when causal)."""
        n = self.n
        total = n * (n + 1) // 2 if causal else n * n
        return float(self.block_mask(causal).sum()) / total

    def is_full(self, causal: bool = False) -> bool:
        n = self.n
        return bool(self.block_mask(causal).sum() == (n * (n + 1) // 2 if causal else n * n))

    def element_mask(self, causal: bool = False) -> Tensor:
        """``[seq, seq]`` boolean mask (True = attend) equal to what the kernel computes."""
        b = self.block
        m = torch.from_numpy(np.kron(self.block_mask(causal), np.ones((b, b), dtype=bool)))
        if causal:
            m &= torch.ones(self.seq, self.seq, dtype=torch.bool).tril()
        return m

    def key_blocks(self, causal: bool = False) -> list[list[int]]:
        """Per query block, its kept key blocks (ascending)."""
        m = self.block_mask(causal)
        return [np.flatnonzero(r).tolist() for r in m]


@lru_cache(maxsize=64)
def attention_layout(seq: int, block: int, factors: int, globals: int = 1) -> BlockLayout:
    """The Pixelfly attention layout for ``seq`` tokens (``seq / block`` must be a multiple
    of ``2^factors``).

    Example:
        >>> lay = attention_layout(512, 64, 2, 1)
        >>> lay.key_blocks()[5]
        [0, 4, 5, 7]
    """
    if seq % block:
        raise ValueError(f"sequence length {seq} is not a multiple of block {block}")
    return BlockLayout(
        seq, block, factors, globals, attention_block_mask(seq // block, factors, globals)
    )


# --------------------------------------------------------------------------------------------
# execution plan (index tensors) for the sparse rows
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Plan:
    """Slots of query block ``i < m = n``: slot ``t < g`` is global key block ``t``; slot
    ``g + u`` is the butterfly partner ``i XOR S[u]`` (``S = 0, 1, 2, ..., 2^(f-1)``). Slots
    that repeat a global block or, when causal, lie after the query block are masked. The
    rows of the ``g`` global query blocks are computed too (so every buffer is a plain view)
    but their probabilities are zeroed and their outputs replaced by the dense global rows."""

    g: int  # global blocks (dense query rows / shared key columns)
    nb: int  # butterfly slots per query block: f + 1
    idx: Tensor  # [m, kmax] long: key block per (local query block, slot)
    bias: Tensor | None  # [m, block, kmax*block] additive (0 / -inf), None if all valid
    cols: Tensor  # [m, kmax*block] long: key element index per column
    src: np.ndarray  # [n, nb]: flat (r * kmax + slot) feeding key block j per slot, -1: none


@lru_cache(maxsize=64)
def _plan(layout: BlockLayout, causal: bool) -> _Plan:
    b, n, g, f = layout.block, layout.n, layout.globals, layout.factors
    S = np.array([0] + [1 << k for k in range(f)])
    nb = f + 1
    m, kmax = n, g + nb
    i = np.arange(n)[:, None]
    part = i ^ S[None, :]  # [m, nb]
    idx = np.concatenate([np.broadcast_to(np.arange(g), (m, g)), part], axis=1)
    valid = np.ones((m, kmax), dtype=bool)
    valid[:, g:] = part >= g
    if causal:
        valid[:, g:] &= part <= i
    el = np.broadcast_to(valid[:, None, :, None], (m, b, kmax, b)).copy()
    if causal:  # the diagonal slot (u = 0) keeps the element-wise lower triangle
        el[:, :, g, :] &= np.tril(np.ones((b, b), dtype=bool))[None]
    el = el.reshape(m, b, kmax * b)
    bias = None
    if not el.all():
        bias = torch.zeros(el.shape)
        bias.masked_fill_(torch.from_numpy(~el), float("-inf"))
    cols = (idx[:, :, None] * b + np.arange(b)).reshape(m, kmax * b)
    j = np.arange(n)[:, None]
    qi = j ^ S[None, :]  # query block reaching key block j through slot g + u
    src = np.where(qi >= g, qi * kmax + g + np.arange(nb)[None, :], -1)
    return _Plan(g, nb, torch.from_numpy(idx), bias, torch.from_numpy(cols), src)


@lru_cache(maxsize=64)
def _src_index(plan: _Plan, h: int) -> Tensor:
    """Rows of a flat ``[h * m * kmax + 1, ...]`` buffer (last row zero) to sum per key block
    and butterfly slot: ``[h * n * nb]``."""
    m, kmax = plan.idx.shape
    src = torch.from_numpy(plan.src)  # [n, nb]
    off = (torch.arange(h) * (m * kmax))[:, None, None]
    out = torch.where(src[None] >= 0, src[None] + off, torch.tensor(h * m * kmax))
    return out.reshape(-1)


def _mask_bias(
    attn_mask: Tensor | None, dtype: torch.dtype, B: int, H: int, L: int, S: int
) -> Tensor | None:
    """An SDPA-style mask as an additive float tensor ``[Bm, Hm, Lm, S]`` (Lm in {1, L})."""
    if attn_mask is None:
        return None
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.shape[-1] != S or m.shape[-2] not in (1, L) or m.shape[0] not in (1, B):
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not fit [{B}, {H}, {L}, {S}]"
        )
    if m.shape[1] not in (1, H):
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not fit [{B}, {H}, {L}, {S}]"
        )
    if m.dtype == torch.bool:
        out = torch.zeros(m.shape, dtype=dtype, device=m.device)
        return out.masked_fill_(~m, float("-inf"))
    return m.to(dtype)


def _gather_mask(mb: Tensor, plan: _Plan, r0: int, r1: int, block: int) -> Tensor:
    """Rows of local query blocks ``r0:r1`` of an additive mask, at the kept columns:
    ``[Bm, Hm, r1-r0, block or 1, kmax*block]``."""
    Bm, Hm, Lm, _ = mb.shape
    cols = plan.cols[r0:r1].to(mb.device)  # [m, C]
    m, C = cols.shape
    if Lm == 1:
        out = mb[:, :, 0, :][:, :, cols]  # [Bm, Hm, m, C]
        return out.unsqueeze(3)
    q0 = r0 * block
    rows = mb[:, :, q0 : q0 + m * block, :].reshape(Bm, Hm, m, block, -1)
    ix = cols[None, None, :, None, :].expand(Bm, Hm, m, block, C)
    return torch.gather(rows, 4, ix)


# --------------------------------------------------------------------------------------------
# the sparse rows: forward / backward
# --------------------------------------------------------------------------------------------
#
# Few, large ops: on a shared 2-core machine every parallel op pays a scheduling latency, so the
# kernel runs whole-tensor ops (tiled over heads only when the score buffer would exceed
# TILE_ELEMS elements).


def _head_tiles(BH: int, per_head: int) -> list[tuple[int, int]]:
    hc = max(1, min(BH, TILE_ELEMS // max(per_head, 1)))
    return [(h0, min(BH, h0 + hc)) for h0 in range(0, BH, hc)]


_WS = threading.local()


def _ws(slot: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A reusable scratch buffer (per thread, per slot): big fresh allocations page-fault on
    every call, reused ones don't. Never saved for backward nor returned."""
    cache = getattr(_WS, "bufs", None)
    if cache is None:
        cache = _WS.bufs = {}
    # inference tensors (made under torch.inference_mode) can't be written outside it
    key = (slot, like.dtype, like.device, torch.is_inference_mode_enabled())
    n = math.prod(shape)
    buf = cache.get(key)
    if buf is None or buf.numel() < n:
        buf = cache[key] = torch.empty(n, dtype=like.dtype, device=like.device)
    return buf[:n].view(shape)


def release_workspace() -> None:
    """Free this thread's scratch buffers (they are kept between calls to avoid page faults)."""
    _WS.bufs = {}


def _gather_kv(x: Tensor, idx: Tensor, block: int, slot: str) -> Tensor:
    """``x`` ``[h, n*block, d]`` -> ``[h * m, kmax*block, d]`` (key blocks ``idx[m, kmax]``)."""
    h, _, d = x.shape
    m, kmax = idx.shape
    out = _ws(slot, (h, m * kmax, block * d), x)
    torch.index_select(x.reshape(h, -1, block * d), 1, idx.reshape(-1), out=out)
    return out.view(h * m, kmax * block, d)


def _add_user_bias(s: Tensor, ubias: Tensor, h0: int, h1: int, H: int) -> None:
    """s: [h, m, block, C] scores of flat heads h0:h1; ubias: [Bm, Hm, m, block|1, C]."""
    Bm, Hm = ubias.shape[:2]
    if Bm == 1 and Hm == 1:
        s.add_(ubias[0, 0])
    elif h0 % H == 0 and h1 % H == 0:
        ub = ubias[h0 // H : h1 // H] if Bm > 1 else ubias
        s.view(-1, H, *s.shape[1:]).add_(ub)
    else:
        for j in range(h0, h1):
            bi, hi = divmod(j, H)
            s[j - h0].add_(ubias[bi if Bm > 1 else 0, hi if Hm > 1 else 0])


def _global_bias(
    mbias: Tensor | None, gl: int, Sg: int, causal: bool, like: Tensor
) -> Tensor | None:
    """Additive mask of the dense global query rows: ``[Bm, Hm, gl|1, Sg]`` or None."""
    bias = None
    if mbias is not None:
        bias = mbias[:, :, :gl, :Sg]
    if causal:
        tri = _causal_bias(gl, Sg, like.dtype, like.device)
        bias = tri if bias is None else bias + tri
    return bias


@lru_cache(maxsize=16)
def _causal_bias(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    tri = torch.zeros(rows, cols, dtype=dtype, device=device)
    upper = torch.ones(rows, cols, dtype=torch.bool, device=device).triu(1)
    return tri.masked_fill_(upper, -math.inf)


def _add_bias4(s: Tensor, bias: Tensor, B: int, H: int) -> None:
    """s: [B*H, r, c] += bias broadcastable to [B, H, r, c]."""
    s.view(B, H, *s.shape[1:]).add_(bias)


class _PixelflyFn(torch.autograd.Function):
    """Pixelfly attention on q, k, v ``[B, H, L, d]`` (contiguous): the ``g * block`` global
    query rows densely, the others over their kept key blocks (see :class:`_Plan`)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, block, scale, causal, mbias, dropout_p):  # type: ignore[override]
        B, H, L, d = q.shape
        dv_ = v.shape[-1]
        BH = B * H
        g = plan.g
        gl = g * block
        idx = plan.idx.to(q.device)
        m, kmax = idx.shape
        C = kmax * block
        q3, k3, v3 = q.view(BH, L, d), k.view(BH, L, d), v.view(BH, L, dv_)
        out = q.new_empty(BH, L, dv_)
        saved: list[Tensor] = []
        # dense global rows
        pg = dg = None
        if g:
            Sg = gl if causal else L
            sg = torch.baddbmm(
                q3.new_empty(()), q3[:, :gl], k3[:, :Sg].transpose(1, 2), beta=0, alpha=scale
            )
            gb = _global_bias(mbias, gl, Sg, causal, q)
            if gb is not None:
                _add_bias4(sg, gb, B, H)
            pg = torch.softmax(sg, -1)
            if mbias is not None:
                pg = pg.nan_to_num_(0.0)
            pgd = pg
            if dropout_p > 0:
                dg = torch.rand(pg.shape, device=pg.device, dtype=pg.dtype) >= dropout_p
                pgd = pg * dg / (1 - dropout_p)
            outg = torch.bmm(pgd, v3[:, :Sg])
        # sparse rows (all query blocks; the global ones are overwritten below)
        sbias = plan.bias.to(device=q.device, dtype=q.dtype) if plan.bias is not None else None
        ubias = None
        if mbias is not None:
            ubias = _gather_mask(mbias, plan, 0, m, block)  # [Bm, Hm, m, b|1, C]
        grad = any(ctx.needs_input_grad[:3])
        probs, drops = [], []
        for h0, h1 in _head_tiles(BH, m * block * C):
            h = h1 - h0
            qt = q3[h0:h1].view(h * m, block, d)
            kg = _gather_kv(k3[h0:h1], idx, block, "k")
            vg = _gather_kv(v3[h0:h1], idx, block, "v")
            s = _ws("s", (h * m, block, C), q)
            torch.baddbmm(s, qt, kg.transpose(1, 2), beta=0, alpha=scale, out=s)
            if sbias is not None:
                s.view(h, m, block, C).add_(sbias)
            if ubias is not None:
                _add_user_bias(s.view(h, m, block, C), ubias, h0, h1, H)
            if grad:
                p = torch.softmax(s, -1)
            else:  # no backward: the probabilities can live in scratch too
                p = torch.ops.aten._softmax.out(s, -1, False, out=_ws("p", s.shape, q))
            if ubias is not None:
                p = p.nan_to_num_(0.0)  # rows the model's mask hides entirely
            if g:
                p.view(h, m, block, C)[:, :g].zero_()
            pd = p
            if dropout_p > 0:
                keep = torch.rand(p.shape, device=p.device, dtype=p.dtype) >= dropout_p
                drops.append(keep)
                pd = p * keep / (1 - dropout_p)
            torch.bmm(pd, vg, out=out[h0:h1].view(h * m, block, dv_))
            if grad:
                probs.append(p)
        if g:
            out[:, :gl] = outg
        saved = [q, k, v, out, *probs, *drops]
        if g:
            saved += [pg] + ([dg] if dg is not None else [])
        ctx.save_for_backward(*saved)
        ctx.meta = (plan, block, scale, causal, dropout_p, len(probs))
        return out.view(B, H, L, dv_)

    @staticmethod
    def backward(ctx, go):  # type: ignore[override]
        plan, block, scale, causal, dropout_p, nt = ctx.meta
        q, k, v, out, *rest = ctx.saved_tensors
        probs, rest = rest[:nt], rest[nt:]
        drops, rest = (rest[:nt], rest[nt:]) if dropout_p > 0 else ([], rest)
        B, H, L, d = q.shape
        dv_ = v.shape[-1]
        BH = B * H
        g = plan.g
        gl = g * block
        idx = plan.idx.to(q.device)
        m, kmax = idx.shape
        C = kmax * block
        nk = L // block
        nb = plan.nb
        q3, k3, v3 = q.view(BH, L, d), k.view(BH, L, d), v.view(BH, L, dv_)
        go3 = go.contiguous().view(BH, L, dv_)
        dq = torch.empty_like(q3)
        dk = torch.empty(BH, nk, block * d, dtype=k.dtype, device=k.device)
        dv = torch.empty(BH, nk, block * dv_, dtype=v.dtype, device=v.device)
        if dropout_p == 0:
            delta_all = (go3 * out).sum(-1, keepdim=True)  # [BH, L, 1]
        for t, (h0, h1) in enumerate(_head_tiles(BH, m * block * C)):
            h = h1 - h0
            p = probs[t].view(h * m, block, C)
            qt = q3[h0:h1].view(h * m, block, d)
            gt = go3[h0:h1].view(h * m, block, dv_)
            vg = _gather_kv(v3[h0:h1], idx, block, "v")
            dp = _ws("s", (h * m, block, C), q)
            torch.bmm(gt, vg.transpose(1, 2), out=dp)
            if dropout_p > 0:
                keep = drops[t].view(h * m, block, C)
                dp.mul_(keep).div_(1 - dropout_p)
                pd = p * keep / (1 - dropout_p)
                delta = (dp * p).sum(-1, keepdim=True)
            else:
                pd = p
                delta = delta_all[h0:h1].view(h * m, block, 1)
            ds = dp.sub_(delta).mul_(p)
            kg = _gather_kv(k3[h0:h1], idx, block, "k")
            torch.baddbmm(
                qt.new_empty(()), ds, kg, beta=0, alpha=scale, out=dq[h0:h1].view(h * m, block, d)
            )
            src = _src_index(plan, h).to(q.device)
            for grad, a, bmat, w, alpha in ((dk, ds, qt, d, scale), (dv, pd, gt, dv_, 1.0)):
                # per (query block, slot) gradients, then summed per key block
                buf = _ws("k", (h * m * kmax + 1, block * w), q)
                buf[-1].zero_()
                bv = buf[:-1].view(h * m, C, w)
                torch.baddbmm(bv, a.transpose(1, 2), bmat, beta=0, alpha=alpha, out=bv)
                gsum = torch.index_select(buf, 0, src, out=_ws("v", (h * nk * nb, block * w), q))
                torch.sum(gsum.view(h, nk, nb, block * w), 2, out=grad[h0:h1])
                if g:
                    grad[h0:h1, :g] += buf[:-1].view(h, m, kmax, block * w)[:, :, :g].sum(1)
        dk3, dv3 = dk.view(BH, L, d), dv.view(BH, L, dv_)
        if g:
            pg = rest[0]
            Sg = pg.shape[-1]
            gog = go3[:, :gl]
            dpg = torch.bmm(gog, v3[:, :Sg].transpose(1, 2))
            if dropout_p > 0:
                keep = rest[1]
                dpg.mul_(keep).div_(1 - dropout_p)
                pgd = pg * keep / (1 - dropout_p)
                dlt = (dpg * pg).sum(-1, keepdim=True)
            else:
                pgd = pg
                dlt = delta_all[:, :gl]
            dsg = dpg.sub_(dlt).mul_(pg)
            dq[:, :gl] = torch.baddbmm(dq.new_empty(()), dsg, k3[:, :Sg], beta=0, alpha=scale)
            # (an in-place baddbmm_ on these strided views would run one addmm per head)
            dk3[:, :Sg] += torch.baddbmm(
                dsg.new_empty(()), dsg.transpose(1, 2), q3[:, :gl], beta=0, alpha=scale
            )
            dv3[:, :Sg] += torch.bmm(pgd.transpose(1, 2), gog)
        return (
            dq.view(B, H, L, d),
            dk3.view(B, H, L, d),
            dv3.view(B, H, L, dv_),
            None,
            None,
            None,
            None,
            None,
            None,
        )


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------


def pixelfly_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: BlockLayout,
    causal: bool = False,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Attention over the kept blocks of ``layout`` only.

    ``q``, ``k``, ``v``: ``[B, H, L, d]`` with ``L == layout.seq`` (self-attention).
    ``attn_mask``: as for :func:`F.scaled_dot_product_attention` (bool: True = attend, or
    additive float), broadcastable to ``[B, H, L, L]`` with a query dim of 1 or L.
    ``key_padding_mask``: ``[B, L]`` bool, True = padding (ignored key), as in
    :class:`nn.MultiheadAttention`. ``causal``: intersect with the lower triangle.
    Equals ``masked_dense_attention`` with ``layout.element_mask(causal)`` combined with the
    masks; rows with no visible key give zeros.
    """
    if q.dim() != 4 or k.shape != q.shape[:3] + k.shape[3:] or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"expected q, k, v as [B, H, L, d] with equal B, H, L; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, L, d = q.shape
    if L != layout.seq:
        raise ValueError(f"sequence length {L} != layout's {layout.seq}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if key_padding_mask is not None:
        kp = ~key_padding_mask.bool().view(B, 1, 1, L)
        if attn_mask is None:
            attn_mask = kp
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & kp
        else:
            attn_mask = attn_mask.masked_fill(~kp, float("-inf"))
    if layout.is_full(causal):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal, scale=scale
        )
    plan = _plan(layout, causal)
    mbias = _mask_bias(attn_mask, q.dtype, B, H, L, L)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _PixelflyFn.apply(q, k, v, plan, layout.block, scale, causal, mbias, float(dropout_p))


def masked_dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Reference: dense ``softmax(q k^T * scale + masks) v`` with the element mask ``mask``
    (``[L, S]`` bool, True = attend) and the same optional masks as
    :func:`pixelfly_attention`; rows with no visible key give zeros."""
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask.to(s.device), float("-inf"))
    if attn_mask is not None:
        s = (
            s.masked_fill(~attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else s + attn_mask
        )
    if key_padding_mask is not None:
        B, L = key_padding_mask.shape
        s = s.masked_fill(key_padding_mask.bool().view(B, 1, 1, L), float("-inf"))
    mx = s.amax(-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp(s - mx)
    den = e.sum(-1, keepdim=True)
    p = e / torch.where(den > 0, den, torch.ones_like(den))
    return torch.matmul(p, v)


class PixelflyAttention(nn.Module):
    """Drop-in for ``F.scaled_dot_product_attention`` on self-attention with Pixelfly
    block sparsity: ``forward(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
    scale=None, key_padding_mask=None)`` on ``[B, H, L, d]`` tensors.

    Inputs shorter than ``min_seq``, cross-attention (``q`` and ``k`` of different lengths)
    and layouts that keep every block run dense SDPA. Other lengths are padded up to a
    multiple of ``block * 2^factors`` (padded keys masked, padded queries dropped).
    """

    def __init__(self, spec: AttentionSpec | None = None, min_seq: int = 0) -> None:
        super().__init__()
        self.spec = spec or AttentionSpec()
        self.min_seq = min_seq

    def extra_repr(self) -> str:
        s = self.spec
        return f"block={s.block}, factors={s.factors}, globals={s.globals}, min_seq={self.min_seq}"

    def layout(self, seq: int) -> BlockLayout:
        return self.spec.layout(seq)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        key_padding_mask: Tensor | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        if torch.compiler.is_compiling() and not (dropout_p and self.training):
            # torch.compile / export see one opaque operator (its fake kernel gives shapes)
            # instead of tracing the layout's numpy code
            from pxcompile.ops import PixelflyAttentionOp

            return PixelflyAttentionOp(self)(
                q, k, v, attn_mask, 0.0, is_causal, scale, key_padding_mask, enable_gqa
            )
        if torch.compiler.is_compiling():
            return _eager_attention(
                self, q, k, v, attn_mask, dropout_p, is_causal, scale, key_padding_mask, enable_gqa
            )
        L, S = q.shape[-2], k.shape[-2]
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            rep = q.shape[-3] // k.shape[-3]
            k = k.repeat_interleave(rep, dim=-3)
            v = v.repeat_interleave(rep, dim=-3)
        if q.dim() != 4 or L != S or L < max(self.min_seq, 1):
            if key_padding_mask is not None:
                kp = ~key_padding_mask.bool()[:, None, None, :]
                if attn_mask is None:
                    attn_mask = kp
                elif attn_mask.dtype == torch.bool:
                    attn_mask = attn_mask & kp
                else:
                    attn_mask = attn_mask.masked_fill(~kp, float("-inf"))
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
            )
        layout = self.spec.layout(L)
        P = layout.seq
        if P != L:
            pad = P - L
            q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
            B = q.shape[0]
            kpm = torch.zeros(B, P, dtype=torch.bool, device=q.device)
            kpm[:, L:] = True
            if key_padding_mask is not None:
                kpm[:, :L] |= key_padding_mask.bool()
            key_padding_mask = kpm
            if attn_mask is not None:
                am = attn_mask
                while am.dim() < 4:
                    am = am.unsqueeze(0)
                padq = pad if am.shape[-2] == L else 0
                fill: Any = True if am.dtype == torch.bool else 0.0
                attn_mask = F.pad(am, (0, pad, 0, padq), value=fill)
        out = pixelfly_attention(
            q,
            k,
            v,
            layout,
            causal=is_causal,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            scale=scale,
            dropout_p=dropout_p,
        )
        return out[:, :, :L] if P != L else out


@torch.compiler.disable
def _eager_attention(att: PixelflyAttention, *args: Any) -> Tensor:
    """Pixelfly attention with dropout under torch.compile: run eagerly (a graph break), since
    the operator form cannot record dropout's randomness."""
    return att(*args)


# --------------------------------------------------------------------------------------------
# putting it in models
# --------------------------------------------------------------------------------------------

#: Sequence length from which Pixelfly attention (default spec) beats dense SDPA on CPU:
#: measured with benchmarks/bench_attention.py (see benchmarks/RESULTS.md, "## Attention").
DEFAULT_MIN_SEQ: int = DEFAULT_ATTENTION_MIN_SEQ

#: Set on a Hugging Face attention module that runs Pixelfly attention when
#: :func:`sparsify_attention` was given a selection of modules.
SPARSE_FLAG = "pxcompile_sparse_attention"


def _module_reference(att: PixelflyAttention):
    """Masked dense attention with exactly the element mask ``att`` applies (dense SDPA where
    ``att`` falls back to it): the reference a sparsified model is checked against."""

    def ref(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        L, S = q.shape[-2], k.shape[-2]
        if q.dim() != 4 or L != S or L < max(att.min_seq, 1):
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale
            )
        em = att.layout(L).element_mask(is_causal)[:L, :L].to(q.device)
        am = attn_mask
        if am is not None and am.dtype != torch.bool:
            am = am.to(q.dtype)
        return masked_dense_attention(q, k, v, em, attn_mask=am, scale=scale)

    return ref


def _hf_attention(att: Any, selective: bool = False):
    """A transformers ``AttentionInterface`` function running ``att`` (SDPA-like callable);
    ``selective``: only in modules flagged with ``SPARSE_FLAG``, dense SDPA in the others."""

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                is_causal=None, **kwargs):  # fmt: skip
        run = att if not selective or getattr(module, SPARSE_FLAG, False) else _sdpa
        if run is att and isinstance(att, PixelflyAttention) and torch.compiler.is_exporting():
            from pxcompile.ops import PixelflyAttentionOp  # one op node in the exported graph

            run = PixelflyAttentionOp(att)
        if kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
            raise NotImplementedError("pixelfly attention: position_bias / softcap unsupported")
        rep = getattr(module, "num_key_value_groups", 1)
        if rep > 1:
            key = key.repeat_interleave(rep, dim=1)
            value = value.repeat_interleave(rep, dim=1)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
        out = run(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=causal,
            scale=scaling,
        )  # fmt: skip
        return out.transpose(1, 2).contiguous(), None

    return forward


def _is_sdpa(node: Any) -> bool:
    return node.op == "call_function" and (
        node.target is F.scaled_dot_product_attention
        or getattr(node.target, "__name__", "") == "scaled_dot_product_attention"
    )


def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )


def sparsify_attention(
    model: nn.Module,
    spec: AttentionSpec | None = None,
    min_seq: int = DEFAULT_MIN_SEQ,
    *,
    reference: bool = False,
    nodes: Collection[str] | None = None,
    modules: Collection[nn.Module] | None = None,
) -> nn.Module:
    """Make ``model``'s attention cores Pixelfly attention (in place; returns ``model``).

    * Hugging Face models (also inside a pxcompile GraphModule): a ``pixelfly_*`` attention
      implementation is registered with transformers' ``AttentionInterface`` (masks built as
      for SDPA) and set on the model;
    * ``torch.fx`` GraphModules: ``F.scaled_dot_product_attention`` calls become calls of a
      :class:`PixelflyAttention` submodule ``pixelfly_attention``.

    Self-attention at ``min_seq`` tokens or more runs sparse, anything else (short inputs,
    cross-attention, cached decoding) dense SDPA. ``reference=True`` installs the masked-dense
    equivalent instead (same element mask, dense math): the reference for checks.

    ``nodes`` (fx SDPA node names) and ``modules`` (Hugging Face attention modules) restrict
    the change to those attention calls (the rewrite pass passes the plan's sparse ones);
    ``None`` means every one.
    """
    from torch import fx

    att = PixelflyAttention(spec, min_seq)
    impl: Any = _module_reference(att) if reference else att
    done = 0
    if isinstance(model, fx.GraphModule):
        graph = model.graph
        chosen = [n for n in graph.nodes if _is_sdpa(n) and (nodes is None or n.name in nodes)]
        if chosen:
            if reference:
                model.pixelfly_attention = _RefModule(impl)
            else:
                model.pixelfly_attention = att
            for node in chosen:
                with graph.inserting_before(node):
                    new = graph.call_module("pixelfly_attention", node.args, dict(node.kwargs))
                node.replace_all_uses_with(new)
                graph.erase_node(node)
            graph.lint()
            model.recompile()
            done += len(chosen)
    try:
        from transformers import AttentionInterface, PreTrainedModel
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # pragma: no cover - transformers is optional
        PreTrainedModel = None  # type: ignore[assignment]  # noqa: N806
    if PreTrainedModel is not None:
        s = att.spec
        selective = modules is not None
        name = f"pixelfly_b{s.block}_f{s.factors}_g{s.globals}_s{min_seq}" + (
            ("_ref" if reference else "") + ("_sel" if selective else "")
        )
        if selective:
            for m in modules or ():
                setattr(m, SPARSE_FLAG, True)
        if not selective or modules:
            AttentionInterface.register(name, _hf_attention(impl, selective))
            AttentionMaskInterface.register(name, sdpa_mask)
            for m in model.modules():
                if isinstance(m, PreTrainedModel) and m.config._attn_implementation != name:
                    m.set_attn_implementation(name)
                    done += 1
    if not done:
        raise ValueError(
            f"{type(model).__name__}: no attention core found (F.scaled_dot_product_attention in "
            "an fx graph, or a Hugging Face model)"
        )
    model.pxcompile_attention = att
    return model


class _RefModule(nn.Module):
    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.fn(*args, **kwargs)
