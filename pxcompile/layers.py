"""``PixelflyLinear``: a linear layer whose weight is a flat block butterfly plus a low-rank term.

    y = x @ B^T + (x @ V^T) @ U^T + bias          (a plain sum: no gate)

``B`` is the flat block butterfly of :func:`pxcompile.patterns.pattern_mask`, stored as its kept
``pattern_block x pattern_block`` blocks only; ``U`` (``lowrank_u``, ``[out, rank]``) and ``V``
(``lowrank_v``, ``[rank, in]``) are the low-rank factors (absent when ``rank == 0``).

Layout of the kept blocks
-------------------------
The stretched pattern is ``kron(flat_butterfly(n, f), ones(co, ci))`` over pattern blocks, with
``co = out / (n pb)`` and ``ci = in / (n pb)``: the weight is an ``n x n`` grid of *cells*, cell
``(i, j)`` being an ``(co pb) x (ci pb)`` rectangle that is kept iff ``i XOR j`` is in
``S = {0, 1, 2, ..., 2^(f-1)}``. With ``idx[i, k] = i XOR S[k]`` the cells kept in cell row
``i`` are ``idx[i, :]``, and because XOR is an involution the cells kept in cell column ``j``
are ``idx[j, :]`` too (the pattern is symmetric).

Kept cells are grouped along the *narrow* side of the weight, so that the only data movement
is a gather (or its adjoint, a gather plus a sum) of narrow-side vectors:

* ``"gather"`` mode (``out >= in``): ``blocks[i]`` is ``[co pb, (f+1) ci pb]``, the kept cells of
  cell row ``i`` side by side (``k``-th chunk = cell ``(i, idx[i, k])``). Forward gathers the
  input cells ``x[:, idx[i, :]]`` into ``[M, n, (f+1) ci pb]`` and runs one batched matmul.
* ``"scatter"`` mode (``in > out``): ``blocks[j]`` is ``[(f+1) co pb, ci pb]``, the kept cells of
  cell column ``j`` stacked (``k``-th chunk = cell ``(idx[j, k], j)``). Forward runs one batched
  matmul per input cell and sums the partial outputs: ``y_i = sum_k p[idx[i, k], k]``.

Each mode's backward uses the other's data movement with the same index (the adjoint of a
gather with an XOR index is a gather with the same index followed by a sum), so neither pass
ever needs a serial ``index_put`` with accumulation.

Execution paths (see :func:`PixelflyLinear.forward`):

* ``"eager"``: plain PyTorch ops inside a hand-written :class:`torch.autograd.Function`.
* ``"compiled"``: the same bodies through ``torch.compile`` (inductor), compiled lazily on first
  use, separately for grad / no-grad. Disabled by ``PXCOMPILE_NO_COMPILE=1`` or
  ``pxcompile.layers.COMPILE = False``; any compile failure falls back to eager for good.
* Both tile rows (``tile_rows``) at large row counts, to keep gathered buffers in cache.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pxcompile.patterns import PatternSpec, block_mask

__all__ = [
    "PixelflyLinear",
    "masked_dense_reference",
    "COMPILE",
    "TILE_ROWS",
]

#: Module-wide switch for the compiled path (also off when ``PXCOMPILE_NO_COMPILE=1``).
COMPILE: bool = os.environ.get("PXCOMPILE_NO_COMPILE", "") in ("", "0")

#: Rows per tile at large row counts (``0`` = never tile).
TILE_ROWS: int = 512


# --------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    mode: str  # "gather" (out >= in) or "scatter" (in > out)
    n: int  # butterfly size (cells per side)
    f1: int  # kept cells per cell row / column: factors + 1
    c_out: int  # elements per output cell: co * pb
    c_in: int  # elements per input cell: ci * pb

    @property
    def block_shape(self) -> tuple[int, int, int]:
        if self.mode == "gather":
            return (self.n, self.c_out, self.f1 * self.c_in)
        return (self.n, self.f1 * self.c_out, self.c_in)


def _make_layout(spec: PatternSpec, out_features: int, in_features: int) -> _Layout:
    why = spec.misfit(out_features, in_features, block=spec.pattern_block)
    if why:
        raise ValueError(f"PixelflyLinear({in_features} -> {out_features}), {spec}: {why}")
    n = spec.butterfly
    mode = "gather" if out_features >= in_features else "scatter"
    return _Layout(mode, n, spec.factors + 1, out_features // n, in_features // n)


@lru_cache(maxsize=64)
def _xor_index(n: int, factors: int) -> np.ndarray:
    """``idx[i, k] = i XOR S[k]`` with ``S = [0, 1, 2, ..., 2^(factors-1)]``."""
    s = np.array([0] + [1 << k for k in range(factors)], dtype=np.int64)
    idx = np.arange(n, dtype=np.int64)[:, None] ^ s[None, :]
    idx.setflags(write=False)
    return idx


# --------------------------------------------------------------------------------------------
# kernels: pure functions of tensors (the compiled path runs these through torch.compile)
#
#   gidx [n*f1]: flat idx, gathers cells:       out[:, i*f1 + k] = cells[:, idx[i, k]]
#   sidx [n*f1]: idx*f1 + k, for the sum side:  out[:, i*f1 + k] = parts[:, idx[i, k]*f1 + k]
# --------------------------------------------------------------------------------------------


def _gather_cells(xc: Tensor, gidx: Tensor, f1: int) -> Tensor:
    """``xc [M, n, c]`` (token-major) -> ``[M, n, f1*c]`` with chunk k of cell i = ``xc[:, idx[i,k]]``."""
    m, n, c = xc.shape
    return xc.index_select(1, gidx).view(m, n, f1 * c)


def _gather_sum(p: Tensor, sidx: Tensor, f1: int) -> Tensor:
    """``p [n, M, f1*c]`` (cell-major) -> ``[n, M, c]``: ``out[i] = sum_k p[idx[i,k], :, chunk k]``."""
    n, m, fc = p.shape
    c = fc // f1
    g = p.view(n, m, f1, c).transpose(1, 2).reshape(n * f1, m, c).index_select(0, sidx)
    return g.view(n, f1, m, c).sum(1)


def _fwd_body(
    x: Tensor,
    blocks: Tensor,
    u: Tensor | None,
    v: Tensor | None,
    bias: Tensor | None,
    gidx: Tensor,
    sidx: Tensor,
    mode: str,
    f1: int,
    need_saved: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Forward on a 2-D contiguous ``x [M, in]``. Returns ``(y, saved, t)``: ``saved`` is the
    gathered input (gather mode) for the weight gradient, ``t = x V^T``."""
    m = x.shape[0]
    n = blocks.shape[0]
    saved = None
    if mode == "gather":
        xg = _gather_cells(x.view(m, n, -1), gidx, f1)  # [M, n, K]
        o = torch.bmm(xg.transpose(0, 1), blocks.transpose(1, 2))  # [n, M, c_out]
        if need_saved:
            saved = xg
    else:
        xc = x.view(m, n, -1).transpose(0, 1)  # [n, M, c_in]
        p = torch.bmm(xc, blocks.transpose(1, 2))  # [n, M, f1*c_out]
        o = _gather_sum(p, sidx, f1)  # [n, M, c_out]
    o = o.transpose(0, 1).reshape(m, -1)
    if bias is not None:
        o = o + bias
    t = None
    if u is not None:
        t = x @ v.t()
        o = torch.addmm(o, t, u.t())
    return o, saved, t


def _bwd_body(
    gy: Tensor,
    x: Tensor,
    saved: Tensor | None,
    t: Tensor | None,
    blocks: Tensor,
    u: Tensor | None,
    v: Tensor | None,
    gidx: Tensor,
    sidx: Tensor,
    mode: str,
    f1: int,
    need_x: bool,
    need_w: bool,
    need_uv: bool,
    need_b: bool,
):
    m = gy.shape[0]
    n = blocks.shape[0]
    gx = gw = gu = gv = gb = None
    if mode == "gather":
        gyc = gy.view(m, n, -1).transpose(0, 1)  # [n, M, c_out]
        if need_w:
            xg = saved if saved is not None else _gather_cells(x.view(m, n, -1), gidx, f1)
            gw = torch.bmm(gyc.transpose(1, 2), xg.transpose(0, 1))  # [n, c_out, K]
        if need_x:
            gxg = torch.bmm(gyc, blocks)  # [n, M, f1*c_in]
            gx = _gather_sum(gxg, sidx, f1).transpose(0, 1).reshape(m, -1)
    else:
        gp = _gather_cells(gy.view(m, n, -1), gidx, f1).transpose(0, 1)  # [n, M, f1*c_out]
        if need_w:
            xc = x.view(m, n, -1).transpose(0, 1)  # [n, M, c_in]
            gw = torch.bmm(gp.transpose(1, 2), xc)  # [n, f1*c_out, c_in]
        if need_x:
            gx = torch.bmm(gp, blocks).transpose(0, 1).reshape(m, -1)
    if u is not None:
        if need_x or need_uv:
            gt = gy @ u  # [M, r]
            if need_x:
                gx = torch.addmm(gx, gt, v)
            if need_uv:
                gu = gy.t() @ t
                gv = gt.t() @ x
    if need_b:
        gb = gy.sum(0)
    return gx, gw, gu, gv, gb


class _PixelflyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, blocks, u, v, bias, gidx, sidx, mode, f1, tile):
        need_grad = any(ctx.needs_input_grad[:5])
        need_w = ctx.needs_input_grad[1]
        m = x.shape[0]
        if tile and m > tile:
            ys, ts = [], []
            for s in range(0, m, tile):
                y, _, t = _fwd_body(
                    x[s : s + tile], blocks, u, v, bias, gidx, sidx, mode, f1, False
                )
                ys.append(y)
                ts.append(t)
            y = torch.cat(ys)
            t = torch.cat(ts) if u is not None else None
            saved = None
        else:
            y, saved, t = _fwd_body(x, blocks, u, v, bias, gidx, sidx, mode, f1, need_w)
        if need_grad:
            ctx.save_for_backward(x, saved, t, blocks, u, v, gidx, sidx)
            ctx.cfg = (mode, f1, tile)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, saved, t, blocks, u, v, gidx, sidx = ctx.saved_tensors
        mode, f1, tile = ctx.cfg
        nx, nw, nu, nv, nb = ctx.needs_input_grad[:5]
        gy = gy.contiguous()
        m = gy.shape[0]
        if tile and m > tile:
            gxs = []
            gw = gu = gv = gb = None
            for s in range(0, m, tile):
                sl = slice(s, s + tile)
                r = _bwd_body(
                    gy[sl],
                    x[sl],
                    None,
                    None if t is None else t[sl],
                    blocks,
                    u,
                    v,
                    gidx,
                    sidx,
                    mode,
                    f1,
                    nx,
                    nw,
                    nu or nv,
                    nb,
                )
                gxs.append(r[0])
                gw = _acc(gw, r[1])
                gu = _acc(gu, r[2])
                gv = _acc(gv, r[3])
                gb = _acc(gb, r[4])
            gx = torch.cat(gxs) if nx else None
        else:
            gx, gw, gu, gv, gb = _bwd_body(
                gy, x, saved, t, blocks, u, v, gidx, sidx, mode, f1, nx, nw, nu or nv, nb
            )
        return gx, gw, gu, gv, gb, None, None, None, None, None


def _acc(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if b is None:
        return a
    return b if a is None else a.add_(b)


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------


class PixelflyLinear(nn.Module):
    """Linear layer ``y = x B^T + (x V^T) U^T + bias`` with ``B`` a flat block butterfly.

    Only the kept blocks of ``B`` are stored (``self.blocks``, layout in the module docstring);
    there is no dense ``[out, in]`` parameter. ``spec`` must fit the weight exactly
    (``spec.misfit(out, in, spec.pattern_block) is None``), else ``ValueError``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: PatternSpec,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.spec = spec
        self.layout = _make_layout(spec, self.out_features, self.in_features)
        fk = {"device": device, "dtype": dtype}
        self.blocks = nn.Parameter(torch.empty(self.layout.block_shape, **fk))
        if spec.rank > 0:
            self.lowrank_u = nn.Parameter(torch.empty(self.out_features, spec.rank, **fk))
            self.lowrank_v = nn.Parameter(torch.empty(spec.rank, self.in_features, **fk))
        else:
            self.register_parameter("lowrank_u", None)
            self.register_parameter("lowrank_v", None)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, **fk))
        else:
            self.register_parameter("bias", None)
        idx = _xor_index(spec.butterfly, spec.factors)
        f1 = self.layout.f1
        sidx = idx * f1 + np.arange(f1)[None, :]
        self.register_buffer(
            "gather_index", torch.as_tensor(idx.reshape(-1).copy(), device=device), persistent=False
        )
        self.register_buffer(
            "sum_index", torch.as_tensor(sidx.reshape(-1).copy(), device=device), persistent=False
        )
        #: ``||W - (B + U V^T)||_F / ||W||_F`` after ``from_dense(init="dense")``, else None.
        self.init_error: float | None = None
        #: Force an execution path: None (auto), "eager", "compiled".
        self.path: str | None = None
        #: Rows per tile (None: module default ``TILE_ROWS``; 0: never tile).
        self.tile_rows: int | None = None
        self.reset_parameters()

    # ---------------------------------------------------------------------------- init

    def reset_parameters(self) -> None:
        """Reference (scratch) init: dense Kaiming-uniform (as ``nn.Linear``), each block row
        scaled by ``sqrt(blocks in row / kept blocks in row)``, sparsified; small random
        low-rank factors. Sampling only the kept blocks is the same distribution (i.i.d.)."""
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5))
            scale = math.sqrt(1.0 / self.spec.block_density)  # same in every (stretched) row
            self.blocks.uniform_(-bound * scale, bound * scale)
            if self.lowrank_u is not None:
                r = self.spec.rank
                self.lowrank_v.uniform_(-bound, bound)
                # U V^T entries ~ 1e-2 of the butterfly's scale
                ub = 1e-2 * scale * math.sqrt(3.0 / r)
                self.lowrank_u.uniform_(-ub, ub)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    @classmethod
    def from_dense(
        cls, weight: Tensor, bias: Tensor | None, spec: PatternSpec, init: str = "dense"
    ) -> PixelflyLinear:
        """Build from a dense ``weight [out, in]`` (``nn.Linear`` layout) and ``bias``.

        ``init="dense"``: copy the kept blocks; fit ``U V^T`` to the residual ``W - B`` by
        truncated SVD (singular values split as square roots to both sides); sets
        ``init_error = ||W - (B + U V^T)||_F / ||W||_F``.
        ``init="scratch"``: only the shape, dtype, device (and whether there is a bias) are
        used: reference init as in :meth:`reset_parameters`.
        """
        out_f, in_f = weight.shape
        layer = cls(
            in_f, out_f, spec, bias=bias is not None, device=weight.device, dtype=weight.dtype
        )
        if init == "scratch":
            return layer
        if init != "dense":
            raise ValueError(f"init must be 'dense' or 'scratch', got {init!r}")
        with torch.no_grad():
            w = weight.detach()
            layer.blocks.copy_(layer._pack(w))
            if bias is not None:
                layer.bias.copy_(bias.detach())
            approx = layer.block_weight()
            if spec.rank > 0:
                resid = (w - approx).double()
                uu, ss, vh = torch.linalg.svd(resid, full_matrices=False)
                r = spec.rank
                sq = ss[:r].sqrt()
                layer.lowrank_u.copy_(uu[:, :r] * sq)
                layer.lowrank_v.copy_(sq[:, None] * vh[:r])
                approx = layer.dense_weight()
            wn = torch.linalg.norm(w.double())
            err = torch.linalg.norm((w - approx).double())
            layer.init_error = float(err / wn) if wn > 0 else float(err)
        return layer

    # ---------------------------------------------------------------------------- views

    def _cell_index(self) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(_xor_index(self.spec.butterfly, self.spec.factors).copy()).to(
            self.blocks.device
        )
        ar = torch.arange(self.layout.n, device=self.blocks.device)[:, None].expand_as(idx)
        return ar, idx

    def _pack(self, w: Tensor) -> Tensor:
        """Kept blocks of a dense ``[out, in]`` weight, in this layer's ``blocks`` layout."""
        lo = self.layout
        w4 = w.reshape(lo.n, lo.c_out, lo.n, lo.c_in)
        ar, idx = self._cell_index()
        if lo.mode == "gather":
            vals = w4[ar, :, idx]  # [n(i), f1(k), c_out, c_in]: cell (i, idx[i,k])
            return vals.permute(0, 2, 1, 3).reshape(lo.block_shape)
        vals = w4[idx, :, ar]  # [n(j), f1(k), c_out, c_in]: cell (idx[j,k], j)
        return vals.reshape(lo.block_shape)

    def block_weight(self) -> Tensor:
        """The butterfly part ``B`` as a dense ``[out, in]`` tensor (zeros elsewhere),
        differentiable with respect to ``blocks``."""
        lo = self.layout
        ar, idx = self._cell_index()
        w4 = self.blocks.new_zeros(lo.n, lo.c_out, lo.n, lo.c_in)
        if lo.mode == "gather":
            vals = self.blocks.view(lo.n, lo.c_out, lo.f1, lo.c_in).permute(0, 2, 1, 3)
            w4 = _put(w4, ar, idx, vals)
        else:
            vals = self.blocks.view(lo.n, lo.f1, lo.c_out, lo.c_in)
            w4 = _put(w4, idx, ar, vals)
        return w4.reshape(self.out_features, self.in_features)

    def dense_weight(self) -> Tensor:
        """``B + U V^T`` as a dense ``[out, in]`` tensor, differentiable (for references)."""
        w = self.block_weight()
        if self.lowrank_u is not None:
            w = w + self.lowrank_u @ self.lowrank_v
        return w

    def mask(self) -> Tensor:
        """Boolean ``[out, in]`` element mask of ``B``."""
        pb = self.spec.pattern_block
        m = block_mask(self.spec, self.out_features, self.in_features, block=pb)
        m = np.kron(m, np.ones((pb, pb), dtype=bool))
        return torch.as_tensor(m, device=self.blocks.device)

    @property
    def density(self) -> float:
        return self.spec.density(self.in_features, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, density={self.density:.4f} "
            f"(butterfly {self.spec.block_density:.4f}), spec={self.spec}, "
            f"layout={self.layout.mode}"
        )

    # ---------------------------------------------------------------------------- forward

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if x2.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features)
        tile = TILE_ROWS if self.tile_rows is None else self.tile_rows
        y = _PixelflyFn.apply(
            x2,
            self.blocks,
            self.lowrank_u,
            self.lowrank_v,
            self.bias,
            self.gather_index,
            self.sum_index,
            self.layout.mode,
            self.layout.f1,
            tile,
        )
        return y.view(*lead, self.out_features)


def _put(w4: Tensor, i0: Tensor, i2: Tensor, vals: Tensor) -> Tensor:
    """``w4[i0, :, i2] = vals`` out of place (differentiable)."""
    w4 = w4.clone()
    w4[i0, :, i2] = vals
    return w4


# --------------------------------------------------------------------------------------------
# reference (tests / benchmarks only)
# --------------------------------------------------------------------------------------------


def masked_dense_reference(
    weight: Tensor,
    bias: Tensor | None,
    spec: PatternSpec,
    u: Tensor | None = None,
    v: Tensor | None = None,
):
    """The reference semantics as a function ``x -> F.linear(x, weight * mask, bias) + (x V^T) U^T``.

    For tests and benchmarks only: it does dense work and is never faster than dense.
    """
    out_f, in_f = weight.shape
    pb = spec.pattern_block
    m = block_mask(spec, out_f, in_f, block=pb)
    mask = torch.as_tensor(np.kron(m, np.ones((pb, pb), dtype=bool)), device=weight.device)

    def ref(x: Tensor) -> Tensor:
        y = F.linear(x, weight * mask, bias)
        if u is not None:
            y = y + (x @ v.t()) @ u.t()
        return y

    return ref
