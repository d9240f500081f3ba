"""The CPU kernel of :class:`~pxcompile.layers.PixelflyLinear` (plain PyTorch ops, optionally
fused by ``torch.compile``): the layout of the kept blocks, the forward and backward bodies and
the :class:`torch.autograd.Function` that ties them together.

Layout and execution paths are described in :mod:`pxcompile.layers`; this module is the
``"torch"`` kernel of :mod:`pxcompile.kernels` (it also runs on CUDA tensors, as plain
``torch.bmm`` calls). :class:`Layout` / :func:`xor_index` are the one source of truth for where
each kept block lives; the Triton kernel derives its index tables from them.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from pxcompile.patterns import PatternSpec

__all__ = [
    "Layout",
    "PixelflyLinearFn",
    "WORKSPACE_MIN_ROWS",
    "clear_workspaces",
    "compile_failed",
    "forward_body",
    "make_layout",
    "xor_index",
]

#: From this many rows on, scratch buffers come from reused per-thread workspaces (below, the
#: buffers are small, fresh ones cost nothing to fault in, and the bookkeeping costs more).
WORKSPACE_MIN_ROWS: int = 512

# --------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
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

    def cell_strides(self, transposed: bool = False) -> tuple[int, int, int, int, int]:
        """Where the kept cells' elements live in the flat ``blocks``, as strides
        ``(s_a, s_j, s_k, s_o, s_c)``.

        ``transposed=False`` (the weight ``[out, in]``): for output cell ``a``, its ``k``-th kept
        cell is ``(a, j)`` with ``j = idx[a, k]``, and its element ``(o, c)`` (row ``o < c_out``,
        column ``c < c_in``), weight entry ``[a c_out + o, j c_in + c]``, is at
        ``a s_a + j s_j + k s_k + o s_o + c s_c``.
        ``transposed=True`` (the weight ``[in, out]``): the same for input cell ``a``, its
        ``k``-th kept cell ``(j, a)`` with ``j = idx[a, k]``, element ``(o < c_in, c < c_out)``
        being weight entry ``[j c_out + c, a c_in + o]``. Both follow from the pattern's
        symmetry: cell ``(i, j)`` is chunk ``k`` of row ``i`` and of column ``j`` alike,
        where ``i XOR j = S[k]``."""
        f1, co, ci = self.f1, self.c_out, self.c_in
        if self.mode == "gather":  # blocks[i, o, k ci + c] = cell (i, idx[i, k])
            if transposed:
                return (0, co * f1 * ci, ci, 1, f1 * ci)
            return (co * f1 * ci, 0, ci, f1 * ci, 1)
        # scatter: blocks[j, k co + o, c] = cell (idx[j, k], j)
        if transposed:
            return (f1 * co * ci, 0, co * ci, 1, ci)
        return (0, f1 * co * ci, co * ci, ci, 1)


def make_layout(spec: PatternSpec, out_features: int, in_features: int) -> Layout:
    why = spec.misfit(out_features, in_features, block=spec.pattern_block)
    if why:
        raise ValueError(f"PixelflyLinear({in_features} -> {out_features}), {spec}: {why}")
    n = spec.butterfly
    mode = "gather" if out_features >= in_features else "scatter"
    return Layout(mode, n, spec.factors + 1, out_features // n, in_features // n)


@lru_cache(maxsize=64)
def xor_index(n: int, factors: int) -> np.ndarray:
    """``idx[i, k] = i XOR S[k]`` with ``S = [0, 1, 2, ..., 2^(factors-1)]``."""
    s = np.array([0] + [1 << k for k in range(factors)], dtype=np.int64)
    idx = np.arange(n, dtype=np.int64)[:, None] ^ s[None, :]
    idx.setflags(write=False)
    return idx


# --------------------------------------------------------------------------------------------
# kernels. ``gidx`` [n*f1] is the flat XOR index: gathered chunk ``i*f1 + k`` is cell
# ``idx[i, k]``; ``idx2`` [n, f1] the same as a matrix. The low-rank term rides along inside
# the batched matmul: in gather mode ``t = x V^T`` is appended to every cell's gathered input
# (and ``U``'s rows of the cell to its weight); in scatter mode ``V``'s columns of the cell are
# appended to its weight, so ``t`` is the sum over cells of the extra outputs.
#
# Each pass is: a memory-bound step before the batched matmul (a gather), the matmul itself
# (eager, ``torch.bmm``), and a memory-bound step after it (an XOR gather-sum, or an untranspose
# of the cell-major result). The memory-bound steps are pure functions (``_gather_cells``,
# ``_sum_cells``) that the compiled path runs through ``torch.compile`` (one fused loop each).
# Buffers that never leave a call (the matmul's cell-major output, the gathered input when it
# is not saved for the backward, the concatenated weight) live in per-thread workspaces that
# are reused from call to call: fresh tens-of-MB buffers cost a page fault every 4 KiB, which
# at these sizes is as much time as the memory pass itself, and more under load.
# --------------------------------------------------------------------------------------------

_WS = threading.local()


def _workspace(tag: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A reusable per-thread scratch tensor of ``shape`` (``like``'s dtype and device), one
    per ``tag``; its contents are undefined. Never hand one out of a call."""
    bufs = getattr(_WS, "bufs", None)
    if bufs is None:
        bufs = _WS.bufs = {}
    key = (tag, like.device, like.dtype)
    numel = math.prod(shape)
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        bufs.pop(key, None)
        with torch.inference_mode(False):  # usable inside and outside inference mode
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
        bufs[key] = buf
    return buf[:numel].view(shape)


def clear_workspaces() -> None:
    """Free this thread's PixelflyLinear scratch buffers (they are reused, not freed, between
    calls; at most a few per dtype and device, each the size of one layer's largest pass)."""
    _WS.bufs = {}


def _use_ws(x: Tensor, blocks: Tensor) -> bool:
    """Workspaces (``out=`` matmuls) from ``WORKSPACE_MIN_ROWS`` rows on, and only where the
    matmul's dtype is the operands' own (under autocast the plain ops pick the dtype)."""
    return (
        x.shape[0] >= WORKSPACE_MIN_ROWS
        and x.dtype == blocks.dtype
        and not torch.is_autocast_enabled(x.device.type)
        and not _tracing()
    )


def _tracing() -> bool:
    """Inside a ``torch.compile`` / export trace of the model: functional ops only."""
    return torch.compiler.is_compiling()


def _bmm(ws: bool, a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` batched, into the ``"out"`` workspace when ``ws`` (a scratch result)."""
    if not ws:
        return torch.bmm(a, b)
    return torch.bmm(a, b, out=_workspace("out", (a.shape[0], a.shape[1], b.shape[2]), a))


def _cat_w(ws: bool, parts: list[Tensor], dim: int) -> Tensor:
    """The weight with the low-rank factor appended, into the ``"w"`` workspace when ``ws``."""
    if not ws:
        return torch.cat(parts, dim)
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    return torch.cat(parts, dim, out=_workspace("w", tuple(shape), parts[0]))


def _untranspose(o: Tensor, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """Cell-major ``o [n, M, c]`` (+ ``bias [n*c]``) -> ``[M, n*c]`` in one pass, into ``out``
    (contiguous rows, e.g. a row tile of the whole result) or a fresh tensor, never a view of
    ``o``."""
    n, m, c = o.shape
    if out is None and (_tracing() or o.shape[1] < WORKSPACE_MIN_ROWS):  # o is fresh: functional
        y = o.transpose(0, 1) if bias is None else o.transpose(0, 1) + bias.to(o.dtype).view(n, c)
        return y.reshape(m, n * c)
    y = torch.empty((m, n * c), dtype=o.dtype, device=o.device) if out is None else out
    if bias is None:
        y.view(m, n, c).copy_(o.transpose(0, 1))
    else:  # under autocast the bias follows the matmul's dtype (as baddbmm would)
        torch.add(o.transpose(0, 1), bias.to(o.dtype).view(n, c), out=y.view(m, n, c))
    return y


def _addmm_(y: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``y + a @ b``, in place when the dtypes agree (not under autocast)."""
    if y.dtype == a.dtype == b.dtype and not torch.is_autocast_enabled(y.device.type):
        return torch.addmm(y, a, b) if _tracing() else y.addmm_(a, b)
    return torch.addmm(y, a, b)


def _gather_sum(p: Tensor, idx2: Tensor, f1: int) -> Tensor:
    """``p [n, M, f1*c]`` (cell-major, any strides) -> ``[n, M, c]``:
    ``out[i] = sum_k p[idx[i, k], :, chunk k]`` (the adjoint of the XOR gather)."""
    n, m, fc = p.shape
    g = p.unflatten(2, (f1, fc // f1))  # [n, M, f1, c]
    kk = torch.arange(f1, device=p.device).expand(n, f1)
    return g[idx2, :, kk].sum(1)  # [n, f1, M, c] -> [n, M, c]


def _gather_cells(x: Tensor, t: Tensor | None, gidx: Tensor, n: int, out: Tensor | None):
    """``x [M, n*c]`` -> ``[M, n, f1*c (+ r)]``: row block ``i`` holds x's cells ``idx[i, :]``
    side by side, then ``t [M, r]`` when given. Written into ``out`` when given."""
    m = x.shape[0]
    kk = (gidx.shape[0] // n) * (x.shape[1] // n)
    xg = x.view(m, n, -1).index_select(1, gidx).view(m, n, kk)
    if t is not None:
        xg = torch.cat([xg, t.unsqueeze(1).expand(m, n, t.shape[1])], 2)
    if out is None:
        return xg
    out.copy_(xg)
    return out


def _sum_cells(p: Tensor, idx2: Tensor, f1: int, width: int, bias: Tensor | None, out=None):
    """``p [n, M, width (+ r)]`` (a matmul's cell-major result) -> ``(y [M, n*c], t)``:
    ``y[:, cell i] = sum_k p[idx[i, k], :, chunk k]`` (+ bias) and ``t [M, r]`` the sum over
    cells of the last ``r`` columns (None when ``r == 0``). ``y`` is written into ``out`` when
    given, else fresh; ``t`` is fresh."""
    n, m, _ = p.shape
    y = _gather_sum(p[..., :width], idx2, f1).transpose(0, 1).reshape(m, -1)
    if bias is not None:
        y = y + bias
    t = p[..., width:].sum(0) if p.shape[2] > width else None
    if out is not None:
        out.copy_(y)
        y = out
    return y, t


def _fwd_one(x, blocks, u, v, bias, gidx, idx2, mode, f1, need_saved, comp, dest=None):
    """One row tile: ``x [M, in]`` contiguous -> ``(y [M, out], saved)``; ``y`` is written into
    ``dest`` when given (only with workspaces: no autocast, no tracing)."""
    m = x.shape[0]
    n = blocks.shape[0]
    ws = _use_ws(x, blocks)
    if mode == "gather":
        c_out = blocks.shape[1]
        t, w = None, blocks
        if u is not None:
            t = x @ v.t()
            w = _cat_w(ws, [blocks, u.view(n, c_out, -1)], 2)
        scratch = _workspace("in", (m, n, w.shape[2]), x) if ws and not need_saved else None
        xg = _call(comp, "gather", _gather_cells, x, t, gidx, n, scratch)
        y = _untranspose(_bmm(ws, xg.transpose(0, 1), w.transpose(1, 2)), bias, dest)
        return y, (xg if need_saved else None)
    c_in = blocks.shape[2]
    ff = blocks.shape[1]
    xc = x.view(m, n, c_in).transpose(0, 1)  # [n, M, c_in]
    w = blocks
    if u is not None:
        w = _cat_w(ws, [blocks, v.view(-1, n, c_in).transpose(0, 1)], 1)
    p = _bmm(ws, xc, w.transpose(1, 2))  # [n, M, ff (+ r)]
    y, t = _call(comp, "sum_cells", _sum_cells, p, idx2, f1, ff, bias, dest)
    if u is not None:
        y = _addmm_(y, t, u.t())  # in place (into dest) with workspaces
    return y, (t if need_saved else None)


def _bwd_one(gy, x, saved, blocks, u, v, gidx, idx2, mode, f1, need_x, need_w, comp, dest=None):
    """One row tile of the backward. ``need_w`` covers blocks, U and V together. Returns
    ``(gx, gblocks, gu, gv)`` (weight grads for this tile, to be summed over tiles); ``gx`` is
    written into ``dest`` when given (only with workspaces)."""
    m = gy.shape[0]
    n = blocks.shape[0]
    ws = _use_ws(gy, blocks)
    gx = gw = gu = gv = None
    if mode == "gather":
        c_out, kk = blocks.shape[1], blocks.shape[2]
        w = blocks if u is None else _cat_w(ws, [blocks, u.view(n, c_out, -1)], 2)
        gyc = gy.view(m, n, c_out).transpose(0, 1)  # [n, M, c_out]
        if need_w:
            xg = saved
            if xg is None:
                t = None if u is None else x @ v.t()
                scratch = _workspace("in", (m, n, w.shape[2]), x) if ws else None
                xg = _call(comp, "gather", _gather_cells, x, t, gidx, n, scratch)
            gwe = torch.bmm(gyc.transpose(1, 2), xg.transpose(0, 1))  # [n, c_out, K (+ r)]
            gw = gwe[..., :kk]
            if u is not None:
                gu = gwe[..., kk:].reshape(-1, u.shape[1])
        if need_x or (need_w and u is not None):
            gxe = _bmm(ws, gyc, w)  # [n, M, K (+ r)]
            if need_x:
                gx, gt = _call(comp, "sum_cells", _sum_cells, gxe, idx2, f1, kk, None, dest)
            else:
                gt = gxe[..., kk:].sum(0)
            if u is not None:  # gt [M, r] = gy U
                if need_x:
                    gx = _addmm_(gx, gt, v)
                if need_w:
                    gv = gt.t() @ x
        return gx, gw, gu, gv
    c_in = blocks.shape[2]
    ff = blocks.shape[1]
    w, gt = blocks, None
    if u is not None:
        gt = gy @ u  # [M, r]
        w = _cat_w(ws, [blocks, v.view(-1, n, c_in).transpose(0, 1)], 1)
        if need_w:
            t = saved if saved is not None else x @ v.t()
            gu = gy.t() @ t
    scratch = _workspace("in", (m, n, w.shape[1]), gy) if ws else None
    gpc = _call(comp, "gather", _gather_cells, gy, gt, gidx, n, scratch).transpose(0, 1)
    if need_x:
        gx = _untranspose(_bmm(ws, gpc, w), None, dest)  # [n, M, c_in] -> [M, in]
    if need_w:
        xc = x.view(m, n, c_in).transpose(0, 1)
        gwe = torch.bmm(gpc.transpose(1, 2), xc)  # [n, ff (+ r), c_in]
        gw = gwe[:, :ff]
        if u is not None:
            gv = gwe[:, ff:].transpose(0, 1).reshape(u.shape[1], -1)
    return gx, gw, gu, gv


def forward_body(x, blocks, u, v, bias, gidx, idx2, mode, f1, tile, need_saved, comp=False):
    """Forward of ``x [M, in]`` (contiguous) with rows in tiles of ``tile`` (0: one tile).
    Returns ``(y, saved)``; ``saved`` is the untiled tile's gathered input (gather mode) or
    ``t = x V^T`` (scatter mode), None when tiled (recomputed in the backward)."""
    m = x.shape[0]
    size = _tile_size(m, tile)
    if size >= m:
        return _fwd_one(x, blocks, u, v, bias, gidx, idx2, mode, f1, need_saved, comp)
    if _use_ws(x, blocks):  # tiles write their rows of the result in place
        n = blocks.shape[0]
        out_f = n * (blocks.shape[1] if mode == "gather" else blocks.shape[1] // f1)
        y = torch.empty((m, out_f), dtype=x.dtype, device=x.device)
        for s in range(0, m, size):
            sl = slice(s, s + size)
            _fwd_one(x[sl], blocks, u, v, bias, gidx, idx2, mode, f1, False, comp, y[sl])
        return y, None
    ys = [
        _fwd_one(x[s : s + size], blocks, u, v, bias, gidx, idx2, mode, f1, False, comp)[0]
        for s in range(0, m, size)
    ]
    return torch.cat(ys), None


def _tile_size(m: int, tile: int) -> int:
    """Rows per tile: ``m // tile`` tiles of equal size (no tiling below ``2 * tile`` rows)."""
    if not tile or m < 2 * tile:
        return m
    k = m // tile
    return -(-m // k)


def _bwd_body(gy, x, saved, blocks, u, v, gidx, idx2, mode, f1, tile, nx, nw, nb, comp=False):
    m = gy.shape[0]
    size = _tile_size(m, tile)
    if size >= m:
        gx, gw, gu, gv = _bwd_one(gy, x, saved, blocks, u, v, gidx, idx2, mode, f1, nx, nw, comp)
    else:
        gxs = []
        gw = gu = gv = None
        gx = None
        if nx and _use_ws(gy, blocks):  # tiles write their rows of gx in place
            n, c_in = blocks.shape[0], blocks.shape[2]
            in_f = n * (c_in // f1 if mode == "gather" else c_in)
            gx = torch.empty((m, in_f), dtype=gy.dtype, device=gy.device)
        for s in range(0, m, size):
            sl = slice(s, s + size)
            dest = None if gx is None else gx[sl]
            xs = None if x is None else x[sl]
            r = _bwd_one(gy[sl], xs, None, blocks, u, v, gidx, idx2, mode, f1, nx, nw, comp, dest)
            gxs.append(r[0])
            gw, gu, gv = _add(gw, r[1]), _add(gu, r[2]), _add(gv, r[3])
        if nx and gx is None:
            gx = torch.cat(gxs)
    gb = gy.sum(0) if nb else None
    return gx, gw, gu, gv, gb


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if b is None:
        return a
    return b if a is None else a + b


# --------------------------------------------------------------------------------------------
# compiled steps (optional, lazy, with an eager fallback)
# --------------------------------------------------------------------------------------------

_COMPILED: dict[str, object] = {}
_COMPILE_FAILED = False


def _compiled(name: str, fn):
    c = _COMPILED.get(name)
    if c is None:
        import torch._dynamo

        cfg = torch._dynamo.config
        for key in ("cache_size_limit", "recompile_limit"):
            if hasattr(cfg, key):
                setattr(cfg, key, max(getattr(cfg, key), 256))
        if hasattr(cfg, "accumulated_cache_size_limit"):
            cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 4096)
        c = torch.compile(fn, dynamic=False)
        _COMPILED[name] = c
    return c


def _call(compiled: bool, name: str, fn, *args):
    """``fn(*args)``, through ``torch.compile`` when ``compiled`` (and compiling works)."""
    global _COMPILE_FAILED
    if compiled and not _COMPILE_FAILED:
        try:
            return _compiled(name, fn)(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: eager from now on
            _COMPILE_FAILED = True
            warnings.warn(
                f"pxcompile: compiling PixelflyLinear failed ({type(e).__name__}: {e}); "
                "using the eager path from now on",
                RuntimeWarning,
                stacklevel=3,
            )
    return fn(*args)


class PixelflyLinearFn(torch.autograd.Function):
    # custom_fwd/custom_bwd: the backward runs under the forward's autocast state, so a bf16
    # output gradient meets bf16-cast weights instead of fp32 ones.
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, blocks, u, v, bias, gidx, idx2, mode, f1, tile, compiled):
        nx, nw, nu, nv, nb = ctx.needs_input_grad[:5]
        need_w = nw or nu or nv
        need_saved = need_w and _tile_size(x.shape[0], tile) >= x.shape[0]
        if mode == "scatter":
            need_saved = need_saved and u is not None
        y, saved = forward_body(
            x, blocks, u, v, bias, gidx, idx2, mode, f1, tile, need_saved, compiled
        )
        ctx.save_for_backward(x if need_w else None, saved, blocks, u, v, gidx, idx2)
        ctx.cfg = (mode, f1, tile, compiled, nx, need_w, nb)
        return y

    @staticmethod
    @once_differentiable
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, gy):
        x, saved, blocks, u, v, gidx, idx2 = ctx.saved_tensors
        mode, f1, tile, compiled, nx, need_w, nb = ctx.cfg
        gx, gw, gu, gv, gb = _bwd_body(
            gy.contiguous(), x, saved, blocks, u, v, gidx, idx2, mode, f1, tile, nx, need_w, nb,
            compiled,
        )  # fmt: skip
        return gx, gw, gu, gv, gb, None, None, None, None, None, None


def compile_failed() -> bool:
    """Whether compiling a step failed in this process (the compiled path is eager for good)."""
    return _COMPILE_FAILED
