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

The low-rank term ``(x V^T) U^T`` is fused into the group matmuls on the layer's wide side
(:attr:`GroupLayout.fuse_out`): its factor there becomes ``r`` more columns of each group's
weight, so the products that would each read and write a whole ``[M, wide]`` tensor with only
``r`` columns of work (BLAS runs those far below peak: 5-9 ms each at 1568 x 3072, rank 8,
against 4.7 ms for a whole group matmul) are a few percent more of the group matmuls. Only the
narrow side keeps a skinny product and a copy.
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

# The fused low rank runs with its rank rounded up to a multiple of this (zero columns): a
# group matmul whose output is 69 wide (64 + rank 5) ran at half the speed of one 72 or 80
# wide, and writing into a [M, groups, 69] buffer 2.5x slower than into [M, groups, 80].
RANK_ALIGN = 8


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
    def fuse_out(self) -> bool:
        """Where the low-rank term is fused into the group matmuls: on the out side (``U``)
        when it is the wider, else on the in side (``V``). The skinny products on the wide
        side are what cost (a ``[M, wide]`` pass each); fused, they are a few more columns
        of the group matmuls."""
        return self.out_features >= self.in_features

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


def _fill_weight(w: Tensor, blocks: Tensor, gl: GroupLayout) -> None:
    """Copy the kept cells of ``blocks`` into ``w [groups, g_out, g_in]`` (a view; the cells
    the pattern drops are left as they are)."""
    w5 = _group_cells(w, gl)
    for (a, j), cell in _kept_cells(blocks, gl).items():
        w5[:, a, :, j, :].copy_(cell)


def _build_weight(blocks: Tensor, gl: GroupLayout, u=None, v=None) -> Tensor:
    """:func:`group_weight` by strided copies into a fresh tensor (no autograd); with a
    low-rank term, the *fused* weight: the group weights with the low-rank factor of the
    layer's wide side laid beside them, first (:attr:`GroupLayout.fuse_out`):

    * out side (``U``): ``[groups, g_out, r + g_in]``, row ``o`` of group ``g`` starting with
      ``U[o]``: the group's matmul reads ``[t | x_g]`` (``t = x V^T``) and adds ``t U^T`` on
      the way;
    * in side (``V``): ``[groups, r + g_out, g_in]``, the first ``r`` rows ``V[:, g]``: the
      group's matmul writes ``[t_g | y_g]``, and ``t`` is the sum of the ``t_g``.

    The low-rank columns come first so that a group cut short by the real sides still reads
    one contiguous run (``[: r + width]``)."""
    r = 0 if u is None else u.shape[1]
    kept_all = gl.layout.f1 == gl.cells
    alloc = blocks.new_empty if kept_all else blocks.new_zeros
    if r == 0:
        w = alloc((gl.groups, gl.g_out, gl.g_in))
        _fill_weight(w, blocks, gl)
        return w
    if gl.fuse_out:
        w = alloc((gl.groups, gl.g_out, r + gl.g_in))
        _fill_weight(w[:, :, r:], blocks, gl)
        for g, (_, _, c, d) in enumerate(gl.pieces):
            w[g, : d - c, :r] = u[c:d]
    else:
        w = alloc((gl.groups, r + gl.g_out, gl.g_in))
        _fill_weight(w[:, r:, :], blocks, gl)
        for g, (a, b, _, _) in enumerate(gl.pieces):
            w[g, :r, : b - a] = v[:, a:b]
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
    """The kept cells of the group weights' gradient ``gw [groups, g_out, g_in]`` (a view), in
    the layout of ``blocks`` (``shape``)."""
    g = gw.new_empty(shape)
    gw5 = _group_cells(gw, gl)
    for (a, j), cell in _kept_cells(g, gl).items():
        cell.copy_(gw5[:, a, :, j, :])
    return g


def _forward(x: Tensor, w: Tensor, u, v, bias, gl: GroupLayout) -> tuple[Tensor, Tensor | None]:
    """``(y [M, out], t)`` from the weight :func:`_build_weight` made; ``t`` is what the
    backward needs of the low-rank term (``[t | x_g]`` per group on the out side, ``t = x
    V^T`` on the in side; None without one). ``y`` is written group by group into slices (no
    autocast: one dtype)."""
    if u is not None:
        return (_forward_fused_out if gl.fuse_out else _forward_fused_in)(x, w, u, v, bias, gl)
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
    return y, None


def _forward_fused_out(x: Tensor, w: Tensor, u, v, bias, gl: GroupLayout):
    """Low rank fused on the out side: group ``g`` computes ``[t | x_g] [U_g | W_g]^T``."""
    m, r = x.shape[0], u.shape[1]
    t = F.linear(x, v[:, : gl.in_features])  # [M, r]: the narrow side's skinny product
    xt = x.new_empty((m, gl.groups, r + gl.g_in))
    xt[:, :, :r] = t.unsqueeze(1)
    if not gl.cut:
        xt[:, :, r:] = x.view(m, gl.groups, gl.g_in)
    y = torch.empty((m, gl.out_features), dtype=x.dtype, device=x.device)
    for g, (a, b, c, d) in enumerate(gl.pieces):
        if gl.cut:
            xt[:, g, r : r + b - a] = x[:, a:b]
        if d <= c:
            continue
        k = r + b - a
        if bias is None:
            torch.mm(xt[:, g, :k], w[g, : d - c, :k].t(), out=y[:, c:d])
        else:
            torch.addmm(bias[c:d], xt[:, g, :k], w[g, : d - c, :k].t(), out=y[:, c:d])
    return y, xt


def _forward_fused_in(x: Tensor, w: Tensor, u, v, bias, gl: GroupLayout):
    """Low rank fused on the in side: group ``g`` computes ``x_g [V_g ; W_g]^T = [t_g | y_g]``,
    then ``y += (sum_g t_g) U^T + bias``."""
    m, r = x.shape[0], u.shape[1]
    ty = x.new_empty((m, gl.groups, r + gl.g_out))
    for g, (a, b, c, d) in enumerate(gl.pieces):
        k = r + d - c  # what is read back of this group
        if b > a:
            torch.mm(x[:, a:b], w[g, :k, : b - a].t(), out=ty[:, g, :k])
        else:  # all its inputs are padding
            ty[:, g, :k] = 0
    t = ty[:, :, :r].sum(1)  # [M, r]
    ut = u[: gl.out_features].t()
    y = torch.mm(t, ut) if bias is None else torch.addmm(bias, t, ut)
    if not gl.cut:
        y.view(m, gl.groups, gl.g_out).add_(ty[:, :, r:])
    else:
        for g, (_, _, c, d) in enumerate(gl.pieces):
            y[:, c:d] += ty[:, g, r : r + d - c]
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
        w = _build_weight(blocks, gl, u, v)
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
        gb = gy.sum(0) if nb and ctx.has_bias else None
        # the fused weight's gradient: its W part, and the low-rank factor fused beside it
        fused_grad = nu if gl.fuse_out else nv
        need_gw = nw or (u is not None and fused_grad)
        gw = (torch.zeros_like if gl.cut else torch.empty_like)(w) if need_gw else None
        if u is None:
            gx = _backward_plain(gy, x, w, gw, gl, nx, nw)
            gu = gv = None
        elif gl.fuse_out:
            gx, gu, gv = _backward_fused_out(gy, x, w, t, u, v, gw, gl, nx, nw or nu, nv)
        else:
            gx, gu, gv = _backward_fused_in(gy, x, w, t, u, v, gw, gl, nx, nw or nv, nu)
        r = 0 if u is None else u.shape[1]
        gblocks = None
        if nw:
            wpart = gw[:, :, r:] if u is not None and gl.fuse_out else gw[:, r:, :]
            gblocks = _blocks_grad(wpart, ctx.blocks_shape, gl)
        return gx, gblocks, gu if nu else None, gv if nv else None, gb, None


def _backward_plain(gy, x, w, gw, gl: GroupLayout, nx: bool, nw: bool) -> Tensor | None:
    """Without a low-rank term: ``gx`` (or None); the group weights' gradient into ``gw``."""
    gx = torch.empty_like(x) if nx else None
    for g, (a, b, c, d) in enumerate(gl.pieces):
        if b <= a:
            continue
        if d <= c:  # no output reads these inputs
            if gx is not None:
                gx[:, a:b] = 0
            continue
        if gx is not None:
            torch.mm(gy[:, c:d], w[g, : d - c, : b - a], out=gx[:, a:b])
        if nw:
            torch.mm(gy[:, c:d].t(), x[:, a:b], out=gw[g, : d - c, : b - a])
    return gx


def _backward_fused_out(gy, x, w, xt, u, v, gw, gl: GroupLayout, nx, nwu, nv):
    """The out-side fused backward: per group ``[gt | gx_g] = gy_g [U_g | W_g]`` and
    ``[gU_g | gW_g] = gy_g^T [t | x_g]``; then ``gx += gt V``, ``gV = gt^T x``."""
    m, r, i = x.shape[0], u.shape[1], gl.in_features
    gxt = None  # the gradient of [t | x_g]
    if nx or nv:
        gxt = gy.new_empty((m, gl.groups, r + gl.g_in))
    for g, (a, b, c, d) in enumerate(gl.pieces):
        k = r + b - a  # what is read back of this group
        if d <= c:  # no output reads these inputs
            if gxt is not None:
                gxt[:, g, :k] = 0
            continue
        if gxt is not None:
            torch.mm(gy[:, c:d], w[g, : d - c, :k], out=gxt[:, g, :k])
        if nwu:
            torch.mm(gy[:, c:d].t(), xt[:, g, :k], out=gw[g, : d - c, :k])
    gx = gu = gv = None
    if gxt is not None:
        gt = gxt[:, :, :r].sum(1)  # [M, r]
        if nx:
            if not gl.cut:
                gx = gxt[:, :, r:].reshape(m, i)
            else:
                gx = torch.empty_like(x)
                for g, (a, b, _, _) in enumerate(gl.pieces):
                    gx[:, a:b] = gxt[:, g, r : r + b - a]
            gx.addmm_(gt, v[:, :i])
        if nv:
            gv = torch.zeros_like(v)
            torch.mm(gt.t(), x, out=gv[:, :i])
    if nwu:
        gu = torch.zeros_like(u)
        for g, (_, _, c, d) in enumerate(gl.pieces):
            gu[c:d] = gw[g, : d - c, :r]
    return gx, gu, gv


def _backward_fused_in(gy, x, w, t, u, v, gw, gl: GroupLayout, nx, nwv, nu):
    """The in-side fused backward: ``gt = gy U``, ``gU = gy^T t``; per group
    ``gx_g = [gt | gy_g] [V_g ; W_g]`` and ``[gV_g ; gW_g] = [gt | gy_g]^T x_g``."""
    m, r = x.shape[0], u.shape[1]
    o = gl.out_features
    gt = F.linear(gy, u[:o].t().contiguous())  # gy U: [M, r] (the narrow side)
    gu = None
    if nu:
        gu = torch.zeros_like(u)
        gu[:o] = (t.t() @ gy).t()  # the orientation BLAS runs fast for a skinny product
    gty = gy.new_empty((m, gl.groups, r + gl.g_out))  # read back [: r + d - c] per group
    if not gl.cut:
        gty[:, :, r:] = gy.view(m, gl.groups, gl.g_out)
    else:
        for g, (_, _, c, d) in enumerate(gl.pieces):
            gty[:, g, r : r + d - c] = gy[:, c:d]
    gty[:, :, :r] = gt.unsqueeze(1)
    gx = torch.empty_like(x) if nx else None
    for g, (a, b, c, d) in enumerate(gl.pieces):
        if b <= a:
            continue
        k = r + d - c
        if gx is not None:
            torch.mm(gty[:, g, :k], w[g, :k, : b - a], out=gx[:, a:b])
        if nwv:
            torch.mm(gty[:, g, :k].t(), x[:, a:b], out=gw[g, :k, : b - a])
    gv = None
    if nwv:
        gv = torch.zeros_like(v)
        for g, (a, b, _, _) in enumerate(gl.pieces):
            gv[:, a:b] = gw[g, :r, : b - a]
    return gx, gu, gv


def grouped_linear(x: Tensor, blocks: Tensor, u, v, bias, gl: GroupLayout) -> Tensor:
    """``x [M, in]`` (contiguous, real width) -> ``y [M, out]`` (real width)."""
    one_dtype = all(t is None or t.dtype == x.dtype for t in (blocks, u, v, bias))
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type) or not one_dtype:
        return _functional(x, blocks, u, v, bias, gl)
    if u is not None and u.shape[1] % RANK_ALIGN:
        # zero columns of U and rows of V up to the alignment (autograd slices their grads)
        pad = -u.shape[1] % RANK_ALIGN
        u, v = F.pad(u, (0, pad)), F.pad(v, (0, 0, 0, pad))
    args = (x, blocks, u, v, bias)
    if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in args):
        return GroupedLinearFn.apply(*args, gl)
    return _forward(x, _build_weight(blocks, gl, u, v), u, v, bias, gl)[0]
