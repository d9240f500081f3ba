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

Two CPU kernels run this layout (``PixelflyLinear.execution``, chosen per layer by the CPU
cost model, :func:`pxcompile.passes.cost_cpu.cpu_execution`):

* ``"grouped"`` (:mod:`pxcompile.kernels.cpu.grouped`): the pattern never links two groups
  of ``2^f`` cells, so the layer is block-diagonal in those groups; one plain matmul per group
  on column slices of ``x`` and ``y`` (the cells a group drops multiplied as zeros, the
  weight assembled from ``blocks`` at each call). It needs no padding copy: its groups are cut
  to the real sides. The paths and tiles below do not apply to it.
* ``"gather"`` (:mod:`pxcompile.kernels.cpu.linear`): the gather / scatter modes above.

Execution paths of the gather kernel (see :func:`PixelflyLinear.forward`):

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
  workspaces reused from call to call, from ``WORKSPACE_MIN_ROWS`` rows on
  (:func:`clear_workspaces` frees them). In a whole model a
  freshly allocated buffer of tens of MB is page-faulted in 4 KiB at a time on every call,
  which costs about as much as the memory pass that fills it; outputs, saved tensors and
  gradients are always fresh tensors.

The kernel bodies (layout, gathers, batched matmuls, the ``autograd.Function``, workspaces with
``WORKSPACE_MIN_ROWS``) live in :mod:`pxcompile.kernels.cpu.linear`; this module holds the layer.

Auto dispatch (``PixelflyLinear.choose_path``): compiled from ``COMPILE_MIN_ROWS`` rows on when
compiling is available, eager below (call overhead dominates at a few rows). Without autograd
(``no_grad`` / ``inference_mode`` / nothing requires grad) the body runs directly, no
``autograd.Function`` and nothing saved. Double backward is not supported.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pxcompile.kernels import select
from pxcompile.kernels.cpu.grouped import group_layout, grouped_linear
from pxcompile.kernels.cpu.linear import (
    PixelflyLinearFn,
    clear_workspaces,
    compile_failed,
    forward_body,
    make_layout,
    xor_index,
)
from pxcompile.nn.weight import WeightViews
from pxcompile.passes.cost_cpu import cpu_execution
from pxcompile.patterns import PatternSpec, block_mask

__all__ = [
    "PixelflyLinear",
    "masked_dense_reference",
    "COMPILE",
    "COMPILE_MIN_ROWS",
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


# --------------------------------------------------------------------------------------------
# the kernels live in pxcompile.kernels.cpu.linear; what decides whether they compile lives here
# --------------------------------------------------------------------------------------------


def compile_available() -> bool:
    """Whether the compiled path may be used now: module switch ``COMPILE`` (env var
    ``PXCOMPILE_NO_COMPILE=1`` clears it), no earlier compile failure, and not under pytest
    (compiling takes seconds per layer shape; tests that cover it force ``path="compiled"``)."""
    return (
        COMPILE
        and not compile_failed()
        and hasattr(torch, "compile")
        and "PYTEST_CURRENT_TEST" not in os.environ
    )


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------


class PixelflyLinear(WeightViews, nn.Module):
    """Linear layer ``y = x B^T + (x V^T) U^T + bias`` with ``B`` a flat block butterfly.

    Only the kept blocks of ``B`` are stored (``self.blocks``, layout in the module docstring);
    there is no dense ``[out, in]`` parameter. ``spec`` must fit the weight exactly
    (``spec.misfit(out, in, spec.pattern_block) is None``), else ``ValueError``.

    A padded ``spec`` (``padded_out`` / ``padded_in``) lays the pattern on a zero-padded
    ``[padded out, padded in]`` weight: ``blocks``, ``lowrank_u`` and ``lowrank_v`` have the
    padded sizes, the input is padded with zeros and the output sliced to ``out_features``
    inside the layer, so its shapes are those of the real weight; ``dense_weight()``,
    ``mask()`` and ``weight`` are the real ``[out, in]`` ones (the padding stays zero: the
    padded input is zero and the padded outputs are dropped, so it gets no gradient).

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
        why = spec.misfit(self.out_features, self.in_features, block=spec.pattern_block)
        if why:
            raise ValueError(f"PixelflyLinear({in_features} -> {out_features}), {spec}: {why}")
        #: The sides the pattern is laid on (the real ones unless ``spec`` is padded).
        self.padded_out, self.padded_in = spec.sides(self.out_features, self.in_features)
        self.layout = make_layout(spec.unpadded(), self.padded_out, self.padded_in)
        fk = {"device": device, "dtype": dtype}
        self.blocks = nn.Parameter(torch.empty(self.layout.block_shape, **fk))
        if spec.rank > 0:
            self.lowrank_u = nn.Parameter(torch.empty(self.padded_out, spec.rank, **fk))
            self.lowrank_v = nn.Parameter(torch.empty(spec.rank, self.padded_in, **fk))
        else:
            self.register_parameter("lowrank_u", None)
            self.register_parameter("lowrank_v", None)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, **fk))
        else:
            self.register_parameter("bias", None)
        idx = xor_index(spec.butterfly, spec.factors)
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
        #: The CPU kernel: ``"grouped"`` (a matmul per group of ``2^f`` cells) or ``"gather"``
        #: (gathered cells, a batched matmul), whichever the CPU cost model predicts faster
        #: (:func:`~pxcompile.passes.cost_cpu.cpu_execution`); may be set to force one.
        self.execution: str = cpu_execution(self.out_features, self.in_features, spec)
        self.groups = group_layout(self.layout, spec, self.in_features, self.out_features)
        self.reset_parameters()

    # ---------------------------------------------------------------------------- init

    def reset_parameters(self) -> None:
        """Scratch init: the layer's output has the variance of a fresh ``nn.Linear``'s
        (Kaiming-uniform, entry variance ``1 / (3 fan_in)``), split between the two parts by
        their share of the layer's parameters (``share = lowrank density / density``).

        The butterfly part is the reference's init: Kaiming-uniform, each block row scaled by
        ``sqrt(blocks in row / kept blocks in row)`` (so kept fan-in times entry variance is
        the dense layer's), times ``sqrt(1 - share)``; sampling only the kept blocks is the
        same distribution (i.i.d.). The low-rank part: ``V`` Kaiming-uniform, ``U`` uniform
        with variance ``share / rank``, so ``U V^T``'s entries have variance
        ``share / (3 fan_in)`` (about 20-50x the std of the previous ``1e-2`` init; the
        reference code starts its gated low-rank term at a similar scale)."""
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5))
            share = self.lowrank_share
            # same in every (stretched) row
            scale = math.sqrt((1.0 - share) / self.spec.block_density)
            self.blocks.uniform_(-bound * scale, bound * scale)
            if self.lowrank_u is not None:
                self.lowrank_v.uniform_(-bound, bound)
                ub = math.sqrt(3.0 * share / self.spec.rank)
                self.lowrank_u.uniform_(-ub, ub)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)
        self._zero_padding()

    @property
    def lowrank_share(self) -> float:
        """The low-rank term's share of the layer's parameters (0 without one): the share of
        the output variance the scratch init gives it."""
        if self.spec.rank == 0:
            return 0.0
        lr = self.spec.lowrank_density(self.in_features, self.out_features)
        return lr / self.spec.density(self.in_features, self.out_features)

    def _zero_padding(self) -> None:
        """Zero the parameters' entries in a padded pattern's padding (they never touch the
        output, so they only need to start, and then stay, at zero)."""
        if not self.spec.padded:
            return
        with torch.no_grad():
            real = self.blocks.new_zeros(self.padded_out, self.padded_in)
            real[: self.out_features, : self.in_features] = 1
            self.blocks.mul_(self._pack(real))
            if self.lowrank_u is not None:
                self.lowrank_u[self.out_features :].zero_()
                self.lowrank_v[:, self.in_features :].zero_()

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
            w = layer._pad_weight(weight.detach())
            layer.blocks.copy_(layer._pack(w))
            if bias is not None:
                layer.bias.copy_(bias.detach())
            # The residual W - B is W on the dropped cells: one elementwise pass, no scatter.
            lo = layer.layout
            dropped = ~torch.as_tensor(_xor_keep(spec.butterfly, spec.factors), device=w.device)
            resid = (w.reshape(lo.n, lo.c_out, lo.n, lo.c_in) * dropped[:, None, :, None]).reshape(
                w.shape
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
        idx = torch.as_tensor(xor_index(self.spec.butterfly, self.spec.factors).copy()).to(
            self.blocks.device
        )
        ar = torch.arange(self.layout.n, device=self.blocks.device)[:, None].expand_as(idx)
        return ar, idx

    def _pad_weight(self, w: Tensor) -> Tensor:
        """A real ``[out, in]`` weight zero-padded to the pattern's sides (as is if none)."""
        if not self.spec.padded:
            return w
        pad = (0, self.padded_in - self.in_features, 0, self.padded_out - self.out_features)
        return F.pad(w, pad)

    def _pack(self, w: Tensor) -> Tensor:
        """Kept blocks of a dense (padded) ``[out, in]`` weight, in this layer's ``blocks``
        layout."""
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
        w = w4.reshape(self.padded_out, self.padded_in)
        if self.spec.padded:
            w = w[: self.out_features, : self.in_features].contiguous()
        return w

    def dense_weight(self) -> Tensor:
        """``B + U V^T`` as a dense ``[out, in]`` tensor, differentiable (for references)."""
        w = self.block_weight()
        if self.lowrank_u is not None:
            w = w + self.lowrank_u[: self.out_features] @ self.lowrank_v[:, : self.in_features]
        return w

    def mask(self) -> Tensor:
        """Boolean ``[out, in]`` element mask of ``B``."""
        pb = self.spec.pattern_block
        m = block_mask(self.spec, self.out_features, self.in_features, block=pb)
        m = np.kron(m, np.ones((pb, pb), dtype=bool))[: self.out_features, : self.in_features]
        return torch.as_tensor(np.ascontiguousarray(m), device=self.blocks.device)

    @property
    def density(self) -> float:
        return self.spec.density(self.in_features, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, density={self.density:.4f} "
            f"(butterfly {self.spec.block_density:.4f}), spec={self.spec}, "
            f"layout={self.layout.mode}, execution={self.execution}"
        ) + "".join(
            f", {t}" for t in [self.spec.padding_text(self.out_features, self.in_features)] if t
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
        out = self.out_features
        if self.execution not in ("grouped", "gather"):
            raise ValueError(f"unknown execution {self.execution!r}")
        if self.execution == "grouped" and select("linear", x2) != "triton":
            # real sides: the grouped kernel cuts its groups to them (no padding copy)
            y = grouped_linear(x2, self.blocks, self.lowrank_u, self.lowrank_v, bias, self.groups)
            if len(lead) == 1:
                return y
            return torch.ops.aten._unsafe_view(y, (*lead, self.out_features))
        if self.spec.padded:  # zeros in, padding out (the kernel runs at the padded sides)
            x2 = F.pad(x2, (0, self.padded_in - self.in_features))
            if bias is not None:
                bias = F.pad(bias, (0, self.padded_out - out))
        tile = TILE_ROWS if self.tile_rows is None else self.tile_rows
        path = self.path or self.choose_path(m)
        if path not in ("eager", "compiled"):
            raise ValueError(f"unknown path {path!r}")
        args = (x2, self.blocks, self.lowrank_u, self.lowrank_v, bias)
        cfg = (self.gather_index, self.cell_index, self.layout.mode, self.layout.f1, tile)
        comp = path == "compiled" and COMPILE
        if select("linear", x2) == "triton":  # pxcompile.kernels: PXCOMPILE_KERNELS, device
            from pxcompile.kernels.triton.linear import pixelfly_linear as triton_linear

            y = triton_linear(*args, self.cell_index, self.layout.mode == "gather")
        elif torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in args):
            y = PixelflyLinearFn.apply(*args, *cfg, comp)
        else:  # inference: no autograd.Function, nothing saved
            y = forward_body(*args, *cfg, False, comp)[0]
        if self.spec.padded:
            y = y[:, :out].clone(memory_format=torch.contiguous_format)  # fresh, not a view
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
    """The reference semantics as a function ``x -> F.linear(x, weight * mask, bias) + (x V^T) U^T``
    (for a padded ``spec``: the real ``[out, in]`` part of the padded mask and factors).

    For tests and benchmarks only: it does dense work and is never faster than dense.
    """
    out_f, in_f = weight.shape
    pb = spec.pattern_block
    m = block_mask(spec, out_f, in_f, block=pb)
    m = np.kron(m, np.ones((pb, pb), dtype=bool))[:out_f, :in_f]  # a padded mask: real part
    mask = torch.as_tensor(np.ascontiguousarray(m), device=weight.device)
    if u is not None:  # a padded layer's factors: their real part
        u, v = u[:out_f], v[:, :in_f]

    def ref(x: Tensor) -> Tensor:
        y = F.linear(x, weight * mask, bias)
        if u is not None:
            y = y + (x @ v.t()) @ u.t()
        return y

    return ref
