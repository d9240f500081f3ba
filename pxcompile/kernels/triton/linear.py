"""The Triton kernel of :class:`~pxcompile.layers.PixelflyLinear`.

    y = x B^T + (x V^T) U^T + bias

with ``B`` stored as its kept cells only, in the layer's own ``blocks`` layout
(:class:`pxcompile.kernels.cpu.linear.Layout`; :meth:`~pxcompile.kernels.cpu.linear.Layout.
cell_strides` says where each kept element lives and the layer's ``cell_index`` buffer, from
:func:`~pxcompile.kernels.cpu.linear.xor_index`, which cells are kept: the CPU kernel's layout
is the one source of truth, nothing is re-packed).

Two kernels:

* ``_bsmm``, a block-sparse times dense product: the forward ``y = x B^T + t U^T + bias``
  (``t = x V^T``) and the input gradient ``dx = dy B + (dy U) V`` are the same kernel, over the
  weight and its transpose. A program computes a ``BM x BN`` tile of one output cell: it reads
  only the ``f + 1`` kept cells of that cell's row (column), each as a loop over its width in
  ``BK`` steps, then the low-rank term (rank in chunks of 16-64) and the bias, accumulating in
  fp32 (fp64 for fp64 inputs).
* ``_sddmm``, the weight gradient on the kept cells only (a sampled dense-dense product): per
  kept cell ``(i, j)``, ``dB = dy[:, cell i]^T x[:, cell j]``, written straight into the
  ``blocks`` layout; a program owns a tile of one cell and loops over the rows.

The low-rank gradients (``dU = dy^T t``, ``dV = (dy U)^T x``) and the bias gradient are dense
and small: plain PyTorch ops. Tile sizes follow the cell widths (multiples of the pattern
block): 16 to 128 wide, powers of two, masked at the edges (any row count, any cell width).
Inputs: fp32 (TF32 unless ``torch.get_float32_matmul_precision() == "highest"``, as for
cuBLAS), fp16, bf16, fp64.

Entry point: :func:`pixelfly_linear`, which calls the custom op
``pxcompile::pixelfly_linear_triton`` (autograd through ``pxcompile::
pixelfly_linear_triton_backward``), so ``torch.compile`` sees one opaque node per layer call.
In Triton's interpreter (CPU tensors, ``TRITON_INTERPRET=1``) bf16 operands are widened to fp32
before each ``tl.dot``: the interpreter multiplies bf16 as raw bits (Triton 3.8).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from pxcompile.kernels import interpreting
from pxcompile.kernels.cpu.linear import Layout
from pxcompile.kernels.triton import kernel

__all__ = ["OP_NAME", "pixelfly_linear", "tiles"]

OP_NAME = "pxcompile::pixelfly_linear_triton"


@kernel
def _bsmm(
    X, W, IDX, T, L, BIAS, Y,
    M, sx, st, sy, s_lc, s_lr,
    CO, CI, RANK, TILES_N,
    s_a, s_j, s_k, s_o, s_c,
    F1: tl.constexpr, HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """``Y[:, cell a] = sum_k X[:, cell j_k] W(a, k)^T (+ T L[cell a]^T) (+ BIAS[cell a])``
    with ``j_k = IDX[a, k]`` and ``W(a, k)[o, c]`` at ``a s_a + j_k s_j + k s_k + o s_o + c s_c``
    (``o < CO``, ``c < CI``). Grid: ``(cdiv(M, BM), n * TILES_N)``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    a = (pid_n // TILES_N).to(tl.int64)
    o0 = (pid_n % TILES_N) * BN
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    ro = o0 + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mask_m = rm < M
    mask_o = ro < CO
    acc = tl.full((BM, BN), 0.0, ACC)
    for k in tl.static_range(F1):
        j = tl.load(IDX + a * F1 + k)
        wb = W + a * s_a + j * s_j + k * s_k
        xb = X + rm[:, None] * sx + j * CI
        for c0 in range(0, CI, BK):
            rc = c0 + rk
            mask_c = rc < CI
            x = tl.load(xb + rc[None, :], mask=mask_m[:, None] & mask_c[None, :], other=0.0)
            w = tl.load(
                wb + rc[:, None] * s_c + ro[None, :] * s_o,
                mask=mask_c[:, None] & mask_o[None, :],
                other=0.0,
            )
            if UPCAST:
                x = x.to(ACC)
                w = w.to(ACC)
            acc += tl.dot(x, w, input_precision=PREC, out_dtype=ACC)
    if HAS_LR:
        rr = tl.arange(0, BR)
        cols = a * CO + ro
        for r0 in range(0, RANK, BR):
            r = r0 + rr
            mask_r = r < RANK
            t = tl.load(
                T + rm[:, None] * st + r[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0
            )
            lw = tl.load(
                L + cols[None, :] * s_lc + r[:, None] * s_lr,
                mask=mask_r[:, None] & mask_o[None, :],
                other=0.0,
            )
            if UPCAST:
                t = t.to(ACC)
                lw = lw.to(ACC)
            acc += tl.dot(t, lw, input_precision=PREC, out_dtype=ACC)
    if HAS_BIAS:
        b = tl.load(BIAS + a * CO + ro, mask=mask_o, other=0.0)
        acc += b[None, :].to(ACC)
    out = Y + rm[:, None] * sy + (a * CO + ro)[None, :]
    tl.store(out, acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_o[None, :])


@kernel
def _sddmm(
    DY, X, IDX, G,
    M, sdy, sx,
    CO, CI, TILES_C,
    s_a, s_j, s_k, s_o, s_c,
    F1: tl.constexpr, BM: tl.constexpr, BO: tl.constexpr, BC: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """``G(a, k)[o, c] = sum_m DY[m, a CO + o] X[m, j_k CI + c]`` for every kept cell
    (``j_k = IDX[a, k]``), stored at the forward's ``cell_strides``. Grid: ``(n F1,
    cdiv(CO, BO) * TILES_C)``, ``TILES_C = cdiv(CI, BC)``."""
    pid = tl.program_id(0)
    pid_t = tl.program_id(1)
    a = (pid // F1).to(tl.int64)
    k = pid % F1
    j = tl.load(IDX + pid)
    ro = (pid_t // TILES_C) * BO + tl.arange(0, BO)
    rc = (pid_t % TILES_C) * BC + tl.arange(0, BC)
    mask_o = ro < CO
    mask_c = rc < CI
    rm0 = tl.arange(0, BM)
    acc = tl.full((BO, BC), 0.0, ACC)
    for m0 in range(0, M, BM):
        rm = (m0 + rm0).to(tl.int64)
        mask_m = rm < M
        dy = tl.load(
            DY + rm[None, :] * sdy + (a * CO + ro)[:, None],
            mask=mask_o[:, None] & mask_m[None, :],
            other=0.0,
        )
        x = tl.load(
            X + rm[:, None] * sx + (j * CI + rc)[None, :],
            mask=mask_m[:, None] & mask_c[None, :],
            other=0.0,
        )
        if UPCAST:
            dy = dy.to(ACC)
            x = x.to(ACC)
        acc += tl.dot(dy, x, input_precision=PREC, out_dtype=ACC)
    out = G + a * s_a + j * s_j + k * s_k + ro[:, None] * s_o + rc[None, :] * s_c
    tl.store(out, acc.to(G.dtype.element_ty), mask=mask_o[:, None] & mask_c[None, :])


# --------------------------------------------------------------------------------------------
# launches
# --------------------------------------------------------------------------------------------


def _p2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def tiles(rows: int, out_cell: int, red_cell: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes and launch options of ``_bsmm`` for ``rows`` rows, output cells
    ``out_cell`` wide and reduced cells ``red_cell`` wide (cell width = a multiple of the
    pattern block, so a 32/64/128 pattern block gives tiles of 32/64/128): ``BM, BN, BK``
    powers of two in ``[16, 128]`` (``BK <= 64``, 32 in fp32 to bound shared memory)."""
    wide = dtype in (torch.float16, torch.bfloat16)
    bm = _p2(rows, 16, 128 if wide else 64)
    bn = _p2(out_cell, 16, 128)
    bk = _p2(red_cell, 16, 64 if wide else 32)
    warps = 8 if bm * bn >= 128 * 128 else 4
    return {"BM": bm, "BN": bn, "BK": bk, "num_warps": warps, "num_stages": 3}


def _modes(dtype: torch.dtype) -> dict[str, object]:
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"PixelflyLinear's Triton kernel takes fp32/fp16/bf16/fp64, not {dtype}")
    ieee = dtype == torch.float64 or torch.get_float32_matmul_precision() == "highest"
    return {
        "UPCAST": dtype == torch.bfloat16 and interpreting(),
        "PREC": "ieee" if ieee else "tf32",
        "ACC": tl.float64 if dtype == torch.float64 else tl.float32,
    }


def _layout(blocks: Tensor, cell_index: Tensor, gather: bool) -> Layout:
    n, f1 = cell_index.shape
    if gather:
        return Layout("gather", n, f1, blocks.shape[1], blocks.shape[2] // f1)
    return Layout("scatter", n, f1, blocks.shape[1] // f1, blocks.shape[2])


def _bsmm_launch(x, blocks, idx, lo: Layout, transposed: bool, t, lw, l_strides, bias) -> Tensor:
    """``x [M, *]`` times ``B^T`` (or ``B`` when ``transposed``) plus ``t lw^T`` and bias."""
    m = x.shape[0]
    co, ci = (lo.c_in, lo.c_out) if transposed else (lo.c_out, lo.c_in)
    y = torch.empty((m, lo.n * co), dtype=x.dtype, device=x.device)
    ti = tiles(m, co, ci, x.dtype)
    has_lr = t is not None
    rank = t.shape[1] if has_lr else 0
    tiles_n = triton.cdiv(co, ti["BN"])
    grid = (triton.cdiv(m, ti["BM"]), lo.n * tiles_n)
    _bsmm[grid](
        x, blocks, idx, t if has_lr else x, lw if has_lr else x, x if bias is None else bias, y,
        m, x.stride(0), t.stride(0) if has_lr else 0, y.stride(0), *l_strides,
        co, ci, rank, tiles_n,
        *lo.cell_strides(transposed),
        F1=lo.f1, HAS_LR=has_lr, HAS_BIAS=bias is not None,
        BR=_p2(rank, 16, 64), **ti, **_modes(x.dtype),
    )  # fmt: skip
    return y


def _sddmm_launch(gy, x, idx, lo: Layout, like: Tensor) -> Tensor:
    m = gy.shape[0]
    g = torch.empty(lo.block_shape, dtype=like.dtype, device=like.device)
    wide = gy.dtype in (torch.float16, torch.bfloat16)
    bo, bc = _p2(lo.c_out, 16, 64), _p2(lo.c_in, 16, 64)
    bm = _p2(m, 16, 64 if wide else 32)
    tiles_c = triton.cdiv(lo.c_in, bc)
    grid = (lo.n * lo.f1, triton.cdiv(lo.c_out, bo) * tiles_c)
    _sddmm[grid](
        gy, x, idx, g,
        m, gy.stride(0), x.stride(0),
        lo.c_out, lo.c_in, tiles_c,
        *lo.cell_strides(False),
        F1=lo.f1, BM=bm, BO=bo, BC=bc, num_warps=4, num_stages=3, **_modes(gy.dtype),
    )  # fmt: skip
    return g


# --------------------------------------------------------------------------------------------
# the ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op(OP_NAME, mutates_args=())
def linear_op(
    x: Tensor,
    blocks: Tensor,
    lowrank_u: Tensor | None,
    lowrank_v: Tensor | None,
    bias: Tensor | None,
    cell_index: Tensor,
    gather: bool,
) -> Tensor:
    """``y = x B^T + (x V^T) U^T + bias`` for ``x [M, in]``, ``B`` in the ``blocks`` layout of a
    PixelflyLinear whose ``cell_index`` is given."""
    lo = _layout(blocks, cell_index, gather)
    x, blocks = x.contiguous(), blocks.contiguous()
    bias = None if bias is None else bias.contiguous()
    t = lw = None
    l_strides = (0, 0)
    if lowrank_u is not None:
        t = (x @ lowrank_v.t()).contiguous()
        lw, l_strides = lowrank_u, (lowrank_u.stride(0), lowrank_u.stride(1))
    return _bsmm_launch(x, blocks, cell_index, lo, False, t, lw, l_strides, bias)


@linear_op.register_fake
def _(x, blocks, lowrank_u, lowrank_v, bias, cell_index, gather):
    lo = _layout(blocks, cell_index, gather)
    return x.new_empty(x.shape[0], lo.n * lo.c_out)


@torch.library.custom_op(OP_NAME + "_backward", mutates_args=())
def linear_backward_op(
    grad: Tensor,
    x: Tensor,
    blocks: Tensor,
    lowrank_u: Tensor | None,
    lowrank_v: Tensor | None,
    bias: Tensor | None,
    cell_index: Tensor,
    gather: bool,
    wanted: int,
) -> list[Tensor]:
    """Gradients with respect to ``x, blocks, lowrank_u, lowrank_v, bias`` whose bit is set in
    ``wanted``, in that order."""
    lo = _layout(blocks, cell_index, gather)
    gy, x, blocks = grad.contiguous(), x.contiguous(), blocks.contiguous()
    u, v = lowrank_u, lowrank_v
    out = []
    gt = gy @ u if u is not None and wanted & 0b1001 else None  # dy U [M, r]
    if wanted & 1:
        l_strides = (0, 0) if v is None else (v.stride(1), v.stride(0))
        gt_c = None if gt is None else gt.contiguous()
        out.append(_bsmm_launch(gy, blocks, cell_index, lo, True, gt_c, v, l_strides, None))
    if wanted & 2:
        out.append(_sddmm_launch(gy, x, cell_index, lo, blocks))
    if wanted & 4:
        out.append(gy.t() @ (x @ v.t()))
    if wanted & 8:
        out.append(gt.t() @ x)
    if wanted & 16:
        out.append(gy.sum(0).to(bias.dtype))
    return out


@linear_backward_op.register_fake
def _(grad, x, blocks, lowrank_u, lowrank_v, bias, cell_index, gather, wanted):
    tensors = (x, blocks, lowrank_u, lowrank_v, bias)
    return [torch.empty_like(t) for i, t in enumerate(tensors) if wanted >> i & 1]


def _setup_context(ctx, inputs, output) -> None:
    x, blocks, u, v, bias, cell_index, gather = inputs
    ctx.save_for_backward(x, blocks, u, v, bias, cell_index)
    ctx.gather = gather


def _backward(ctx, grad):
    x, blocks, u, v, bias, cell_index = ctx.saved_tensors
    wanted = 0
    for i, (t, need) in enumerate(zip((x, blocks, u, v, bias), ctx.needs_input_grad[:5])):
        if t is not None and need:
            wanted |= 1 << i
    got = iter(
        torch.ops.pxcompile.pixelfly_linear_triton_backward(
            grad, x, blocks, u, v, bias, cell_index, ctx.gather, wanted
        )
        if wanted
        else ()
    )
    grads = [next(got) if wanted >> i & 1 else None for i in range(5)]
    return (*grads, None, None)


linear_op.register_autograd(_backward, setup_context=_setup_context)


def pixelfly_linear(
    x: Tensor,
    blocks: Tensor,
    lowrank_u: Tensor | None,
    lowrank_v: Tensor | None,
    bias: Tensor | None,
    cell_index: Tensor,
    gather: bool,
) -> Tensor:
    """The Triton PixelflyLinear on ``x [M, in]`` (contiguous), differentiable in every tensor.
    Under autocast every operand is cast to the autocast dtype first (as ``F.linear``)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, blocks = x.to(dt), blocks.to(dt)
        lowrank_u = None if lowrank_u is None else lowrank_u.to(dt)
        lowrank_v = None if lowrank_v is None else lowrank_v.to(dt)
        bias = None if bias is None else bias.to(dt)
        with torch.autocast(dev, enabled=False):
            return linear_op(x, blocks, lowrank_u, lowrank_v, bias, cell_index, gather)
    return linear_op(x, blocks, lowrank_u, lowrank_v, bias, cell_index, gather)
