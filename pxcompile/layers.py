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
* ``"compiled"``: the same, with the memory-bound steps around each batched matmul (the XOR
  gather, the XOR gather-sum with bias and low-rank column sums) each fused into one loop by
  ``torch.compile`` (inductor), compiled lazily on first use per shape; the matmuls themselves
  are eager ``torch.bmm`` calls either way. Disabled by ``PXCOMPILE_NO_COMPILE=1`` or
  ``pxcompile.layers.COMPILE = False``; any compile failure falls back to eager for good.
* Both split rows into equal tiles of about ``TILE_ROWS`` from ``2 * TILE_ROWS`` rows on, to
  keep the gathered buffers in cache.
* Both keep the buffers that never leave a call (the matmul's cell-major result, the gathered
  input when nothing saves it, the weight with its low-rank factor appended) in per-thread
  workspaces reused from call to call (:func:`clear_workspaces` frees them). In a whole model a
  freshly allocated buffer of tens of MB is page-faulted in 4 KiB at a time on every call,
  which costs about as much as the memory pass that fills it; outputs, saved tensors and
  gradients are always fresh tensors.

Auto dispatch (``PixelflyLinear.choose_path``): compiled from ``COMPILE_MIN_ROWS`` rows on when
compiling is available, eager below (call overhead dominates at a few rows). Without autograd
(``no_grad`` / ``inference_mode`` / nothing requires grad) the body runs directly, no
``autograd.Function`` and nothing saved. Double backward is not supported.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from pxcompile.nn.weight import WeightViews
from pxcompile.patterns import PatternSpec, block_mask

__all__ = [
    "PixelflyLinear",
    "masked_dense_reference",
    "COMPILE",
    "COMPILE_MIN_ROWS",
    "WORKSPACE_MIN_ROWS",
    "TILE_ROWS",
    "compile_available",
    "clear_workspaces",
]

#: Module-wide switch for the compiled path (also off when ``PXCOMPILE_NO_COMPILE=1``).
COMPILE: bool = os.environ.get("PXCOMPILE_NO_COMPILE", "") in ("", "0")

#: Row tiling: from ``2 * TILE_ROWS`` rows on, rows run in ``rows // TILE_ROWS`` equal tiles
#: (keeps the gathered buffers in cache); ``0`` = never tile.
TILE_ROWS: int = 1024

#: Below this many rows the auto dispatch stays eager (compiled-call overhead dominates).
COMPILE_MIN_ROWS: int = 16

#: From this many rows on, scratch buffers come from reused per-thread workspaces (below, the
#: buffers are small, fresh ones cost nothing to fault in, and the bookkeeping costs more).
WORKSPACE_MIN_ROWS: int = 512


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


def _fwd_body(x, blocks, u, v, bias, gidx, idx2, mode, f1, tile, need_saved, comp=False):
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


def compile_available() -> bool:
    """Whether the compiled path may be used now: module switch ``COMPILE`` (env var
    ``PXCOMPILE_NO_COMPILE=1`` clears it), no earlier compile failure, and not under pytest
    (compiling takes seconds per layer shape; tests that cover it force ``path="compiled"``)."""
    return (
        COMPILE
        and not _COMPILE_FAILED
        and hasattr(torch, "compile")
        and "PYTEST_CURRENT_TEST" not in os.environ
    )


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
    if compiled and COMPILE and not _COMPILE_FAILED:
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


class _PixelflyFn(torch.autograd.Function):
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
        y, saved = _fwd_body(
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


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------


class PixelflyLinear(WeightViews, nn.Module):
    """Linear layer ``y = x B^T + (x V^T) U^T + bias`` with ``B`` a flat block butterfly.

    Only the kept blocks of ``B`` are stored (``self.blocks``, layout in the module docstring);
    there is no dense ``[out, in]`` parameter. ``spec`` must fit the weight exactly
    (``spec.misfit(out, in, spec.pattern_block) is None``), else ``ValueError``.

    ``weight`` (read-only) is a :class:`~pxcompile.nn.weight.PixelflyWeight`: code written
    for ``nn.Linear`` that reads ``self.fc.weight.dtype`` or calls ``F.linear(x,
    self.fc.weight, b)`` keeps working, and its GEMMs run this layer's kernel
    (:meth:`linear`).
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
        # derived from the spec: not in the state dict
        self.register_buffer(
            "gather_index", torch.as_tensor(idx.reshape(-1).copy(), device=device), persistent=False
        )
        self.register_buffer(
            "cell_index", torch.as_tensor(idx.copy(), device=device), persistent=False
        )
        #: ``||W - (B + U V^T)||_F / ||W||_F`` after ``from_dense(init="dense")``, else None.
        self.init_error: float | None = None
        #: Force an execution path: None (auto), "eager" or "compiled" (see ``forward``).
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
            # The residual W - B is W on the dropped cells: one elementwise pass, no scatter.
            lo = layer.layout
            dropped = ~torch.as_tensor(_xor_keep(spec.butterfly, spec.factors), device=w.device)
            resid = (w.reshape(lo.n, lo.c_out, lo.n, lo.c_in) * dropped[:, None, :, None]).reshape(
                out_f, in_f
            )
            err2 = float(resid.double().square().sum())
            if spec.rank > 0:
                uu, ss, vv = _truncated_svd(resid, spec.rank)
                sq = ss.sqrt()
                layer.lowrank_u.copy_(uu * sq)
                layer.lowrank_v.copy_(sq[:, None] * vv.t())
                # ||R - U S V^T||^2 = ||R||^2 - sum(s^2) for the top singular triplets of R.
                left = err2 - float(ss.double().square().sum())
                if left <= 1e-3 * err2:  # the subtraction cancels: compute it directly
                    left = float(
                        (resid.double() - (uu * ss).double() @ vv.double().t()).square().sum()
                    )
                err2 = max(left, 0.0)
            wn = float(torch.linalg.norm(w.double()))
            err = err2**0.5
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

    def choose_path(self, rows: int) -> str:
        """Auto dispatch: the compiled bodies from ``COMPILE_MIN_ROWS`` rows on when compiling
        is available, else (few rows: call overhead dominates) the eager bodies."""
        if rows >= COMPILE_MIN_ROWS and compile_available():
            return "compiled"
        return "eager"

    def forward(self, x: Tensor) -> Tensor:
        """``y = x B^T + (x V^T) U^T + bias`` for ``x [..., in]`` (any strides).

        Paths: ``"eager"`` (plain PyTorch ops) or ``"compiled"`` (the same bodies through
        ``torch.compile``, lazily, with eager fallback); ``self.path`` forces one, else
        :meth:`choose_path`. Rows are processed in tiles of ``tile_rows`` (default
        ``TILE_ROWS``) above that count. With autograd, a hand-written
        :class:`torch.autograd.Function` runs the backward; without, the body runs directly.
        """
        return self.linear(x, self.bias)

    def linear(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """:meth:`forward` with ``bias`` (``[out]`` or None) instead of the layer's own: what
        ``F.linear(x, self.weight, bias)`` runs (Swin passes a copy of the bias, edited)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if x2.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features)
        m = x2.shape[0]
        tile = TILE_ROWS if self.tile_rows is None else self.tile_rows
        path = self.path or self.choose_path(m)
        if path not in ("eager", "compiled"):
            raise ValueError(f"unknown path {path!r}")
        args = (x2, self.blocks, self.lowrank_u, self.lowrank_v, bias)
        cfg = (self.gather_index, self.cell_index, self.layout.mode, self.layout.f1, tile)
        if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in args):
            y = _PixelflyFn.apply(*args, *cfg, path == "compiled")
        else:  # inference: no autograd.Function, nothing saved
            y = _fwd_body(*args, *cfg, False, path == "compiled")[0]
        if len(lead) == 1:
            return y
        # Not a view (``_base`` is None): FSDP2 hooks on a view would be dropped by an
        # in-place op on it, and it warns. ``y`` is fresh, so nothing aliases it.
        return torch.ops.aten._unsafe_view(y, (*lead, self.out_features))


def _xor_keep(n: int, factors: int) -> np.ndarray:
    """The n x n cell mask of the flat butterfly (kept cells True)."""
    from pxcompile.patterns import flat_butterfly

    return np.array(flat_butterfly(n, factors))


def _truncated_svd(a: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``r`` singular triplets ``(U [m, r], S [r], V [n, r])``. A full SVD of a
    768 x 3072 residual takes seconds on 2 cores; the randomized one (a few power
    iterations over ``r + 8`` probes) takes milliseconds and is as accurate for the top ``r``."""
    a = a.double() if a.dtype == torch.float64 else a.float()
    q = min(r + 8, min(a.shape))
    if q >= min(a.shape):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :r], s[:r], vh[:r].t()
    threads = torch.get_num_threads()
    # These are many small LAPACK calls (thin QRs, a q x n SVD): one thread is ~3x faster
    # than two on this CPU, where the threads mostly wait for each other.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # same weights in, same factors out
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(a, q=q, niter=2)
    finally:
        torch.set_num_threads(threads)
    return u[:, :r], s[:r], v[:, :r]


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
