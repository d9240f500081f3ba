"""The grouped CPU kernel of :class:`~pxcompile.layers.PixelflyLinear`: a flat butterfly with
``f`` factors never mixes cells across groups of ``2^f`` consecutive cells (``i XOR j`` stays
below ``2^f``), so the layer is block-diagonal in those groups. This kernel runs it as one
plain matmul per group on column slices of the input and output (BLAS reads and writes the
slices in place: no gather, no padding copy, no cell-major untranspose), with the group's
weight assembled from the kept blocks at each call (a few hundred KB) and the cells the
pattern drops inside a group filled with zeros.

That wastes ``2^f / (f + 1)`` of the kept FLOPs (nothing at ``f = 1``, a third at ``f = 2``)
but skips the memory-bound passes of the gather kernel (:mod:`.linear`), which cost as much as
the matmul itself on narrow layers (Mixer's 196 <-> 384 token mixing) and about a third of a
wide layer's time. Which kernel a layer runs is decided once per layer by the CPU cost model
(:func:`pxcompile.passes.cost_cpu.cpu_execution`), which the planner uses too.

A padded pattern needs no padding here: the groups are laid on the padded sides and then cut
to the real ones (a group may end up with fewer input or output columns, or none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from pxcompile.kernels.cpu.linear import Layout
from pxcompile.passes.cost_cpu import group_pieces
from pxcompile.patterns import PatternSpec

__all__ = ["GroupLayout", "GroupedLinearFn", "group_layout", "group_weight", "grouped_linear"]


@dataclass(frozen=True)
class GroupLayout:
    """Where a layer's groups lie: group ``g`` maps input columns ``pieces[g][0:2]`` to output
    columns ``pieces[g][2:4]`` (real sides; empty ranges where a group is all padding), with
    the group weight ``[groups, g_out, g_in]`` laid on the padded sides."""

    layout: Layout
    in_features: int
    out_features: int
    pieces: tuple[tuple[int, int, int, int], ...]

    @property
    def cells(self) -> int:  # cells per group side: 2^f
        return 1 << (self.layout.f1 - 1)

    @property
    def groups(self) -> int:
        return self.layout.n // self.cells

    @property
    def g_out(self) -> int:
        return self.cells * self.layout.c_out

    @property
    def g_in(self) -> int:
        return self.cells * self.layout.c_in

    @property
    def cut(self) -> bool:
        """Whether some group is cut short by the real sides (a padded pattern)."""
        return any(b - a < self.g_in or d - c < self.g_out for a, b, c, d in self.pieces)


def group_layout(
    layout: Layout, spec: PatternSpec, in_features: int, out_features: int
) -> GroupLayout:
    """The groups of a layer with ``layout`` (laid on ``spec``'s padded sides) and real sides."""
    pieces = tuple(group_pieces(out_features, in_features, spec))
    return GroupLayout(layout, int(in_features), int(out_features), pieces)


def _kept_cells(blocks: Tensor, gl: GroupLayout) -> dict[tuple[int, int], Tensor]:
    """``{(a_local, j_local): view}``: each kept cell position inside a group as a strided
    view ``[groups, c_out, c_in]`` of ``blocks``: cell ``(a, j)`` with ``a = g 2^f + a_local``
    and ``j = g 2^f + j_local`` (see :meth:`Layout.cell_strides`). No index tensors, and the
    views are differentiable."""
    lo = gl.layout
    s_a, s_j, s_k, s_o, s_c = lo.cell_strides()
    step = gl.cells * (s_a + s_j)  # from one group to the next
    flat = blocks.reshape(-1)
    out = {}
    for a in range(gl.cells):
        for k in range(lo.f1):
            j = a ^ (0 if k == 0 else 1 << (k - 1))
            base = a * s_a + j * s_j + k * s_k
            out[a, j] = flat.as_strided((gl.groups, lo.c_out, lo.c_in), (step, s_o, s_c), base)
    return out


def _group_cells(w: Tensor, gl: GroupLayout) -> Tensor:
    """``w [groups, g_out, g_in]`` viewed as ``[groups, a_local, c_out, j_local, c_in]``."""
    return w.view(gl.groups, gl.cells, gl.layout.c_out, gl.cells, gl.layout.c_in)


def _build_weight(blocks: Tensor, gl: GroupLayout) -> Tensor:
    """:func:`group_weight` by strided copies into a fresh tensor (no autograd)."""
    kept_all = gl.layout.f1 == gl.cells
    w = (blocks.new_empty if kept_all else blocks.new_zeros)((gl.groups, gl.g_out, gl.g_in))
    w5 = _group_cells(w, gl)
    for (a, j), cell in _kept_cells(blocks, gl).items():
        w5[:, a, :, j, :].copy_(cell)
    return w


def group_weight(blocks: Tensor, gl: GroupLayout) -> Tensor:
    """The group weights ``[groups, g_out, g_in]`` (padded sides) from the kept ``blocks``,
    the cells the pattern drops inside a group zero; differentiable (the strided views of
    :func:`_kept_cells`, concatenated: what autograd, autocast and ``torch.compile`` run)."""
    cell = _kept_cells(blocks, gl)
    lo = gl.layout
    zero = None
    if len(cell) < gl.cells * gl.cells:
        zero = blocks.new_zeros(gl.groups, lo.c_out, lo.c_in)
    rows = [
        torch.cat([cell.get((a, j), zero) for j in range(gl.cells)], 2)  # [groups, co, g_in]
        for a in range(gl.cells)
    ]
    return torch.cat(rows, 1)  # [groups, g_out, g_in]


def _blocks_grad(gw: Tensor, shape: torch.Size, gl: GroupLayout) -> Tensor:
    """The kept cells of the group weights' gradient, in the layout of ``blocks`` (``shape``)."""
    g = gw.new_empty(shape)
    gw5 = _group_cells(gw, gl)
    for (a, j), cell in _kept_cells(g, gl).items():
        cell.copy_(gw5[:, a, :, j, :])
    return g


def _forward(x: Tensor, w: Tensor, u, v, bias, gl: GroupLayout) -> tuple[Tensor, Tensor | None]:
    """``(y [M, out], t = x V^T or None)``, ``y`` written group by group into slices (no
    autocast: one dtype)."""
    m = x.shape[0]
    y = torch.empty((m, gl.out_features), dtype=x.dtype, device=x.device)
    for g, (a, b, c, d) in enumerate(gl.pieces):
        if d <= c:
            continue
        if b <= a:  # all its inputs are padding
            y[:, c:d] = 0 if bias is None else bias[c:d]
        elif bias is None:
            torch.mm(x[:, a:b], w[g, : d - c, : b - a].t(), out=y[:, c:d])
        else:
            torch.addmm(bias[c:d], x[:, a:b], w[g, : d - c, : b - a].t(), out=y[:, c:d])
    t = None
    if u is not None:
        t = F.linear(x, v[:, : gl.in_features])
        y.addmm_(t, u[: gl.out_features].t())
    return y, t


def _functional(x: Tensor, blocks: Tensor, u, v, bias, gl: GroupLayout) -> Tensor:
    """The same with functional ops only (autograd, autocast and ``torch.compile`` traces)."""
    w = group_weight(blocks, gl)
    parts = []
    for g, (a, b, c, d) in enumerate(gl.pieces):
        if d <= c:
            continue
        bg = None if bias is None else bias[c:d]
        if b <= a:
            z = x.new_zeros(x.shape[0], d - c)
            parts.append(z if bg is None else z + bg)
        else:
            parts.append(F.linear(x[:, a:b], w[g, : d - c, : b - a], bg))
    y = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    if u is not None:
        y = y + (x @ v[:, : gl.in_features].t()) @ u[: gl.out_features].t()
    return y


class GroupedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, blocks, u, v, bias, gl):
        w = _build_weight(blocks, gl)
        y, t = _forward(x, w, u, v, bias, gl)
        ctx.save_for_backward(x, w, t, u, v)
        ctx.gl = gl
        ctx.blocks_shape = blocks.shape
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, w, t, u, v = ctx.saved_tensors
        gl = ctx.gl
        nx, nw, nu, nv, nb = ctx.needs_input_grad[:5]
        gy = gy.contiguous()
        gx = torch.empty_like(x) if nx else None
        gw = (torch.zeros_like if gl.cut else torch.empty_like)(w) if nw else None
        for g, (a, b, c, d) in enumerate(gl.pieces):
            if b <= a:
                continue
            if d <= c:  # no output reads these inputs
                if gx is not None:
                    gx[:, a:b] = 0
                continue
            if gx is not None:
                torch.mm(gy[:, c:d], w[g, : d - c, : b - a], out=gx[:, a:b])
            if gw is not None:
                torch.mm(gy[:, c:d].t(), x[:, a:b], out=gw[g, : d - c, : b - a])
        gblocks = None
        if gw is not None:
            gblocks = _blocks_grad(gw, ctx.blocks_shape, gl)
        gu = gv = None
        if u is not None:
            # The low-rank products are skinny (r columns): BLAS runs them several times
            # faster in these orientations than as gy @ U and gy^T @ t (measured, MKL).
            i, o = gl.in_features, gl.out_features
            vr = v[:, :i]
            gt = F.linear(gy, u[:o].t().contiguous())  # gy U: [M, r]
            if gx is not None:
                gx.addmm_(gt, vr)
            if nu:
                gu = torch.zeros_like(u)
                gu[:o] = (t.t() @ gy).t()
            if nv:
                gv = torch.zeros_like(v)
                torch.mm(gt.t(), x, out=gv[:, :i])
        gb = gy.sum(0) if nb and ctx.has_bias else None
        return gx, gblocks, gu, gv, gb, None


def grouped_linear(x: Tensor, blocks: Tensor, u, v, bias, gl: GroupLayout) -> Tensor:
    """``x [M, in]`` (contiguous, real width) -> ``y [M, out]`` (real width)."""
    one_dtype = all(t is None or t.dtype == x.dtype for t in (blocks, u, v, bias))
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type) or not one_dtype:
        return _functional(x, blocks, u, v, bias, gl)
    args = (x, blocks, u, v, bias)
    if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in args):
        return GroupedLinearFn.apply(*args, gl)
    return _forward(x, _build_weight(blocks, gl), u, v, bias, gl)[0]
