"""Pixelfly attention in Triton: block-sparse flash attention over the layout's kept blocks.

The sequence is cut into tiles of ``T = min(block, 64)`` tokens (``block`` a power of two >= 16,
so a pattern block is ``block / T`` whole tiles). From :class:`~pxcompile.attention_layout.
BlockLayout` (the one source of truth for the pattern) come two index tables in CSR form:

* per query tile, its kept key tiles (butterfly partners, diagonal, global keys; a global
  query block keeps every key tile: a dense row in the same kernel; causal: only key tiles
  that start at or before the query tile's last row);
* per key tile, the query tiles that keep it (the same mask transposed), for the dK/dV pass.

Forward (one program per query tile and head): an online softmax over the kept key tiles only,
fp32 accumulation, the causal triangle and the model's additive mask applied element-wise,
dropout from Philox (``tl.rand`` on a seed and the element's ``(head, row, col)`` offset, so the
backward regenerates the same mask); it stores the output and the row log-sum-exp.
Backward (FlashAttention-2): ``delta = rowsum(dO * O)``; one kernel per key tile recomputes
``P = exp(S - lse)`` for its query tiles and accumulates dK, dV; one per query tile
accumulates dQ. The grid runs heads fastest, so the longest programs (the global blocks' dense
rows and columns, tile 0) start first instead of trailing. Rows that see no key give zeros
(their log-sum-exp is stored as +inf, so their probabilities and gradients are zero), as on the
CPU path.

Inputs fp32 (``tl.dot`` in TF32 unless ``torch.get_float32_matmul_precision() == "highest"``, as
for cuBLAS), fp16, bf16 (fp32 accumulation), fp64 (fp64 accumulation); head dims up to 128 (loads
masked up to the next power of two >= 16). Kernels are built per call for Triton's compiler or
its interpreter (:func:`pxcompile.kernels.triton.kernel`); in the interpreter bf16 operands are
widened to fp32 before each ``tl.dot`` (it multiplies bf16 as raw bits, Triton 3.8).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import triton.language as tl
from torch import Tensor

from pxcompile.attention_layout import BlockLayout
from pxcompile.kernels import interpreting
from pxcompile.kernels.triton import kernel

__all__ = ["MAX_HEAD_DIM", "sparse_attention", "tile_size", "tile_tables", "unsupported"]

#: Largest head dim the kernel takes (q/k and v).
MAX_HEAD_DIM: int = 128
_MAX_TILE = 64


def tile_size(block: int) -> int:
    """Tokens per tile (query and key tiles alike) for a pattern block: ``min(block, 64)``."""
    return min(block, _MAX_TILE)


def unsupported(layout: BlockLayout, d: int, dv: int) -> str | None:
    """Why the Triton kernel can't run this layout / head dims (None if it can)."""
    b = layout.block
    if b < 16 or b & (b - 1):
        return f"pattern block {b} is not a power of two >= 16"
    if max(d, dv) > MAX_HEAD_DIM:
        return f"head dim {max(d, dv)} exceeds {MAX_HEAD_DIM}"
    return None


@lru_cache(maxsize=64)
def _tables_np(layout: BlockLayout, causal: bool) -> tuple[np.ndarray, ...]:
    sub = layout.block // tile_size(layout.block)
    m = np.kron(layout.block_mask(causal), np.ones((sub, sub), dtype=bool))
    if causal:  # at tile level too: a key tile after the query tile's last row is all masked
        m = np.tril(m)
    out = []
    for mm in (m, m.T):
        ptr = np.zeros(mm.shape[0] + 1, dtype=np.int32)
        ptr[1:] = np.cumsum(mm.sum(1))
        out += [ptr, np.nonzero(mm)[1].astype(np.int32)]
    return tuple(out)


def tile_tables(
    layout: BlockLayout, causal: bool, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(row_ptr, key_tiles, col_ptr, query_tiles)``: per query tile its kept key tiles and
    per key tile the query tiles keeping it (CSR, int32, ascending), tiles of
    ``min(block, 64)`` tokens."""
    return _tables(layout, causal, torch.device(device))


@lru_cache(maxsize=64)
def _tables(layout: BlockLayout, causal: bool, device: torch.device) -> tuple[Tensor, ...]:
    arrays = _tables_np(layout, causal)
    return tuple(torch.from_numpy(a).to(device) for a in arrays)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# kernels (helpers inlined: every jit-function call costs a re-patch under the interpreter)
# --------------------------------------------------------------------------------------------


@kernel
def _fwd_kernel(
    Q, K, V, Out, LSE, Bias, row_ptr, key_tiles, seed, sm_scale, p_drop,
    L, H, s_bb, s_bh, s_bm, s_bn,
    D: tl.constexpr, DV: tl.constexpr, T: tl.constexpr, BD: tl.constexpr,
    BDV: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    qt = tl.program_id(1)
    bh = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, T)
    rows = qt * T + t
    cd = tl.arange(0, BD)[None, :]
    cv = tl.arange(0, BDV)[None, :]
    base = bh * L
    q = tl.load(Q + (base + rows[:, None]) * D + cd, mask=cd < D, other=0.0)
    k0 = K + (base + t[:, None]) * D + cd  # key tile 0; tile kt is + kt * T * D
    v0 = V + (base + t[:, None]) * DV + cv
    b0 = Bias + (bh // H) * s_bb + (bh % H) * s_bh + rows[:, None] * s_bm + t[None, :] * s_bn
    below = rows[:, None] - t[None, :]  # causal: keep where below >= kt * T
    r0 = (base + rows[:, None]) * L + t[None, :]  # dropout's Philox offsets
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([T], float("-inf"), ACC)
    l_i = tl.zeros([T], ACC)
    acc = tl.zeros([T, BDV], ACC)
    for e in range(tl.load(row_ptr + qt), tl.load(row_ptr + qt + 1)):
        n0 = tl.load(key_tiles + e) * T
        k = tl.load(k0 + n0 * D, mask=cd < D, other=0.0)
        v = tl.load(v0 + n0 * DV, mask=cv < DV, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * sm_scale
        if HAS_BIAS:
            s += tl.load(b0 + n0 * s_bn).to(ACC)
        if CAUSAL:
            s = tl.where(below >= n0, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(tl.rand(seed, r0 + n0) >= p_drop, p / (1.0 - p_drop), 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    seen = l_i > 0
    l_i = tl.where(seen, l_i, 1.0)
    out = (acc / l_i[:, None]).to(Out.dtype.element_ty)
    tl.store(Out + (base + rows[:, None]) * DV + cv, out, mask=cv < DV)
    tl.store(LSE + base + rows, tl.where(seen, m_i + tl.log(l_i), float("inf")))


@kernel
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, Delta, DK, DVt, Bias, col_ptr, query_tiles, seed, sm_scale, p_drop,
    L, H, s_bb, s_bh, s_bm, s_bn,
    D: tl.constexpr, DV: tl.constexpr, T: tl.constexpr, BD: tl.constexpr,
    BDV: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    kt = tl.program_id(1)
    bh = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, T)
    cols = kt * T + t
    cd = tl.arange(0, BD)[None, :]
    cv = tl.arange(0, BDV)[None, :]
    base = bh * L
    k = tl.load(K + (base + cols[:, None]) * D + cd, mask=cd < D, other=0.0)
    v = tl.load(V + (base + cols[:, None]) * DV + cv, mask=cv < DV, other=0.0)
    q0 = Q + (base + t[:, None]) * D + cd  # query tile 0; tile qt is + qt * T * D
    do0 = DO + (base + t[:, None]) * DV + cv
    b0 = Bias + (bh // H) * s_bb + (bh % H) * s_bh + t[:, None] * s_bm + cols[None, :] * s_bn
    above = t[:, None] - cols[None, :]  # causal: keep where above + qt * T >= 0
    r0 = (base + t[:, None]) * L + cols[None, :]
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([T, BD], ACC)
    dv = tl.zeros([T, BDV], ACC)
    for e in range(tl.load(col_ptr + kt), tl.load(col_ptr + kt + 1)):
        m0 = tl.load(query_tiles + e) * T
        q = tl.load(q0 + m0 * D, mask=cd < D, other=0.0)
        do = tl.load(do0 + m0 * DV, mask=cv < DV, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + base + m0 + t)
        delta = tl.load(Delta + base + m0 + t)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * sm_scale
        if HAS_BIAS:
            s += tl.load(b0 + m0 * s_bm).to(ACC)
        if CAUSAL:
            s = tl.where(above + m0 >= 0, s, float("-inf"))
        p = tl.exp(s - lse[:, None])  # lse = +inf on rows that see nothing: p = 0
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        pd = p
        if DROPOUT:
            keep = tl.rand(seed, r0 + m0 * L) >= p_drop
            pd = tl.where(keep, p / (1.0 - p_drop), 0.0)
            dp = tl.where(keep, dp / (1.0 - p_drop), 0.0)
        dv += tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    dk = (dk * sm_scale).to(DK.dtype.element_ty)
    tl.store(DK + (base + cols[:, None]) * D + cd, dk, mask=cd < D)
    tl.store(DVt + (base + cols[:, None]) * DV + cv, dv.to(DVt.dtype.element_ty), mask=cv < DV)


@kernel
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, Delta, DQ, Bias, row_ptr, key_tiles, seed, sm_scale, p_drop,
    L, H, s_bb, s_bh, s_bm, s_bn,
    D: tl.constexpr, DV: tl.constexpr, T: tl.constexpr, BD: tl.constexpr,
    BDV: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    qt = tl.program_id(1)
    bh = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, T)
    rows = qt * T + t
    cd = tl.arange(0, BD)[None, :]
    cv = tl.arange(0, BDV)[None, :]
    base = bh * L
    q = tl.load(Q + (base + rows[:, None]) * D + cd, mask=cd < D, other=0.0)
    do = tl.load(DO + (base + rows[:, None]) * DV + cv, mask=cv < DV, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + base + rows)
    delta = tl.load(Delta + base + rows)
    k0 = K + (base + t[:, None]) * D + cd
    v0 = V + (base + t[:, None]) * DV + cv
    b0 = Bias + (bh // H) * s_bb + (bh % H) * s_bh + rows[:, None] * s_bm + t[None, :] * s_bn
    below = rows[:, None] - t[None, :]
    r0 = (base + rows[:, None]) * L + t[None, :]
    dq = tl.zeros([T, BD], ACC)
    for e in range(tl.load(row_ptr + qt), tl.load(row_ptr + qt + 1)):
        n0 = tl.load(key_tiles + e) * T
        k = tl.load(k0 + n0 * D, mask=cd < D, other=0.0)
        v = tl.load(v0 + n0 * DV, mask=cv < DV, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * sm_scale
        if HAS_BIAS:
            s += tl.load(b0 + n0 * s_bn).to(ACC)
        if CAUSAL:
            s = tl.where(below >= n0, s, float("-inf"))
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        if DROPOUT:
            dp = tl.where(tl.rand(seed, r0 + n0) >= p_drop, dp / (1.0 - p_drop), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    dq = (dq * sm_scale).to(DQ.dtype.element_ty)
    tl.store(DQ + (base + rows[:, None]) * D + cd, dq, mask=cd < D)


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------


def _stages(tile: int, width: int, elem: int) -> int:
    """Pipeline stages: as many K/V tiles in flight as fit ~96 KiB of shared memory (1-3)."""
    return max(1, min(3, (96 << 10) // (tile * width * elem)))


def _pow2(x: int) -> int:
    return max(16, 1 << (x - 1).bit_length())


def _modes(q: Tensor) -> dict[str, object]:
    """dtype-dependent constants: TF32 for fp32 unless ``torch.get_float32_matmul_precision()
    == "highest"`` (as for cuBLAS); fp64 accumulation for fp64; bf16 widened to fp32 before
    ``tl.dot`` in the interpreter (which multiplies bf16 as raw bits, Triton 3.8)."""
    ieee = q.dtype == torch.float64 or torch.get_float32_matmul_precision() == "highest"
    return {
        "PREC": "ieee" if ieee else "tf32",
        "UPCAST": q.dtype == torch.bfloat16 and interpreting(),
        "ACC": tl.float64 if q.dtype == torch.float64 else tl.float32,
    }


def _bias(attn_mask: Tensor | None, B: int, H: int, L: int, like: Tensor):
    """The model's mask as an additive tensor (fp32, fp64 for fp64 inputs) and its
    ``[B, H, L, S]`` strides (0 on broadcast dims); a dummy and None without one."""
    dt = torch.float64 if like.dtype == torch.float64 else torch.float32
    if attn_mask is None:
        return like.new_empty(1, dtype=dt), None
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.dtype == torch.bool:  # at the mask's own size: broadcast dims stay unmaterialised
        b = torch.zeros(m.shape, dtype=dt, device=m.device).masked_fill_(~m, -math.inf)
    else:
        b = m.to(dt)
    try:
        b = b.expand(B, H, L, L)
    except RuntimeError:
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not fit [{B}, {H}, {L}, {L}]"
        ) from None
    return b, b.stride()


class _TritonFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, causal, bias, strides, scale, dropout_p):  # type: ignore[override]
        has_bias = strides is not None
        strides = strides or (0, 0, 0, 0)
        B, H, L, d = q.shape
        dv_ = v.shape[-1]
        T = tile_size(layout.block)
        row_ptr, key_tiles, col_ptr, query_tiles = _tables(layout, causal, q.device)
        out = torch.empty(B, H, L, dv_, dtype=q.dtype, device=q.device)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        lse = torch.empty(B * H, L, dtype=acc, device=q.device)
        seed = int(torch.randint(0, 2**31 - 1, ()).item()) if dropout_p > 0 else 0
        meta = dict(
            D=d, DV=dv_, T=T, BD=_pow2(d), BDV=_pow2(dv_), CAUSAL=bool(causal),
            HAS_BIAS=has_bias, DROPOUT=dropout_p > 0, **_modes(q),
            num_warps=4, num_stages=_stages(T, _pow2(d) + _pow2(dv_), q.element_size()),
        )  # fmt: skip
        _fwd_kernel[(B * H, L // T)](
            q, k, v, out, lse, bias, row_ptr, key_tiles, seed, scale, dropout_p,
            L, H, *strides, **meta,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, bias)
        ctx.cfg = (layout, causal, strides, scale, dropout_p, seed, meta)
        return out

    @staticmethod
    def backward(ctx, go):  # type: ignore[override]
        q, k, v, out, lse, bias = ctx.saved_tensors
        layout, causal, strides, scale, dropout_p, seed, meta = ctx.cfg
        B, H, L, _ = q.shape
        T = meta["T"]
        row_ptr, key_tiles, col_ptr, query_tiles = _tables(layout, causal, q.device)
        go = go.contiguous()
        delta = (go.to(lse.dtype) * out.to(lse.dtype)).sum(-1).view(B * H, L)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = (seed, scale, dropout_p, L, H, *strides)
        _bwd_dkdv_kernel[(B * H, L // T)](
            q, k, v, go, lse, delta, dk, dv, bias, col_ptr, query_tiles, *common, **meta
        )
        _bwd_dq_kernel[(B * H, L // T)](
            q, k, v, go, lse, delta, dq, bias, row_ptr, key_tiles, *common, **meta
        )
        return dq, dk, dv, None, None, None, None, None, None


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: BlockLayout,
    causal: bool,
    attn_mask: Tensor | None,
    scale: float,
    dropout_p: float,
) -> Tensor:
    """Pixelfly attention over the kept blocks of ``layout`` on ``[B, H, L, d]`` tensors
    (same contract as :func:`pxcompile.kernels.cpu.attention.sparse_attention`); check
    :func:`unsupported` first."""
    B, H, L, d = q.shape
    why = unsupported(layout, d, v.shape[-1])
    if why:
        raise ValueError(f"triton pixelfly attention: {why}")
    bias, strides = _bias(attn_mask, B, H, L, q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _TritonFn.apply(q, k, v, layout, causal, bias, strides, float(scale), float(dropout_p))
