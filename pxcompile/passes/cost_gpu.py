"""A GPU cost model for the mapping pass (``--cost-model gpu``): a tile roofline.

**A prediction, not a measurement.** Nothing here has been checked against a GPU yet; the
defaults are an H100-class (SXM) GPU's published figures and reasonable achievable shares of
them. ``benchmarks/bench_gpu.py`` measures the same shapes; once it has run on a GPU, fit the
parameters to its numbers (as :class:`~pxcompile.passes.mapping.CalibratedCost` was fitted to
the CPU ones).

Every kernel is a grid of programs, each computing a ``bm x bn`` output tile by reducing over
``k``. A program is bound by the tensor cores (``2 bm bn k`` FLOPs at its SM's share of the
achievable FLOP rate) or by loading its operands from L2 (``(bm + bn) k`` elements at its SM's
share of the L2 bandwidth): the tile's arithmetic intensity ``bm bn / (bm + bn)`` FLOP per
element is what makes narrow tiles slow. Programs run in waves (one large tile or up to four
small ones per SM; the last wave partly idle), and the whole kernel takes at least its HBM traffic (inputs read once, output
written once) over the achievable HBM bandwidth, plus a launch overhead.

* **dense** (``F.linear`` = cuBLAS): ``128 x 256`` tiles (smaller for small sides), the work
  spread evenly over the SMs (split-K / stream-K: no idle waves).
* **Pixelfly** (the Triton kernel, ``pxcompile/kernels/triton/linear.py``, whose ``tiles()`` this
  mirrors): a program owns a ``bm x bn`` tile of one output *cell* (``out / n`` wide, a multiple
  of the pattern block) and reduces over that cell row's ``f + 1`` kept input cells (``in / n``
  wide each) and the low-rank term's ``r`` columns: ``bm`` up to 128 rows, ``bn`` the cell width
  up to 128. ``t = x V^T`` is one more (cuBLAS) GEMM; a padded pattern adds a copy to pad the
  input and one to slice the output.
* **training** (:meth:`GpuCost.dense_train_cost` / :meth:`GpuCost.sparse_train_cost`):
  forward, input gradient (the same block-sparse kernel over the transpose: tiles follow the
  input cells), weight gradient on the kept cells only (the sampled dense-dense kernel: ``64 x
  64`` tiles of one kept cell reducing over the rows) and the low-rank gradients (cuBLAS).
* **attention** (:meth:`GpuCost.attention_speedup`): block-sparse flash attention against SDPA's
  flash kernel: the kept blocks' work, at the rate a ``block``-row query tile reaches relative
  to flash's 128-row tile, times ``attention_efficiency`` (index loads, irregular key blocks).

Costs are seconds per forward (times ``calls``); only their ratios matter to the mapping pass.
Torch-free, like the rest of the planner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..patterns import AttentionSpec, PatternSpec
from ..schema import Gemm

__all__ = ["GpuCost", "pixelfly_tiles"]


def _p2(n: int, lo: int, hi: int) -> int:
    """``n`` rounded up to a power of two, clamped to ``[lo, hi]``."""
    return max(lo, min(hi, 1 << max(int(n) - 1, 0).bit_length()))


def pixelfly_tiles(rows: int, out_cell: int, red_cell: int, wide: bool = True) -> tuple[int, int]:
    """``(bm, bn)`` of the Triton kernel's block-sparse product for ``rows`` rows and output
    cells ``out_cell`` wide (as ``pxcompile.kernels.triton.linear.tiles``; ``wide``: fp16/bf16).

    Example:
        >>> pixelfly_tiles(8192, 256, 64), pixelfly_tiles(8192, 32, 128)
        ((128, 128), (128, 32))
    """
    return _p2(rows, 16, 128 if wide else 64), _p2(out_cell, 16, 128)


@dataclass(frozen=True)
class GpuCost:
    """Tile-roofline cost of a GEMM on a GPU, dense (cuBLAS) or Pixelfly (Triton); see the
    module docstring. Defaults: an H100 SXM in bf16."""

    peak_flops: float = 989e12  # dense bf16/fp16 tensor-core peak (H100 SXM)
    compute_fraction: float = 0.7  # share of the peak a well-fed GEMM tile reaches
    hbm_bandwidth: float = 3.35e12  # bytes/s (H100 SXM HBM3)
    memory_fraction: float = 0.8  # share of the HBM bandwidth a streaming kernel reaches
    l2_bandwidth: float = 7e12  # bytes/s from L2 to the SMs, all SMs together
    sms: int = 132  # streaming multiprocessors (programs in flight: one per SM)
    launch: float = 4e-6  # seconds per kernel launch
    element_bytes: int = 2  # bf16 / fp16
    dense_tile: tuple[int, int] = (128, 256)  # cuBLAS's output tile on large GEMMs
    grad_tile: int = 64  # the weight-gradient kernel's tile side (and row step)
    attention_fraction: float = 0.35  # share of the peak SDPA's flash kernel reaches
    attention_efficiency: float = 0.7  # Pixelfly attention's rate per kept block vs flash's
    name: str = "gpu"

    # -- building blocks -------------------------------------------------------------------
    def grid_time(
        self, programs: int, bm: int, bn: int, k: int, hbm_bytes: float, balanced: bool = False
    ) -> float:
        """Seconds for ``programs`` programs, each a ``bm x bn`` tile reducing over ``k``,
        moving ``hbm_bytes`` to and from HBM in all (launch not included). ``balanced``: the
        work is spread evenly over the SMs whatever the tile count (cuBLAS's split-K and
        stream-K), so no wave is partly idle."""
        memory = hbm_bytes / (self.hbm_bandwidth * self.memory_fraction)
        if programs <= 0 or k <= 0:
            return memory
        if balanced:
            flops = 2.0 * bm * bn * k * programs
            loads = (bm + bn) * k * self.element_bytes * programs
            compute = flops / (self.peak_flops * self.compute_fraction)
            return max(compute, loads / self.l2_bandwidth, memory)
        # programs an SM holds at once: one 128 x 256 tile, up to 4 smaller ones; those on one
        # SM share its tensor cores and its share of the L2 bandwidth
        per_sm = max(1, min(4, 128 * 256 // (bm * bn)))
        waves = math.ceil(programs / (self.sms * per_sm))
        resident = min(per_sm, math.ceil(programs / self.sms))
        flop_rate = self.peak_flops * self.compute_fraction / self.sms / resident
        load_rate = self.l2_bandwidth / self.sms / resident
        per_program = max(
            2.0 * bm * bn * k / flop_rate, (bm + bn) * k * self.element_bytes / load_rate
        )
        return max(waves * per_program, memory)

    def gemm_time(self, m: int, k: int, n: int) -> float:
        """One cuBLAS GEMM ``[m, k] x [k, n]``, launch included."""
        bm = _p2(m, 16, self.dense_tile[0])
        bn = _p2(n, 16, self.dense_tile[1])
        programs = math.ceil(m / bm) * math.ceil(n / bn)
        hbm = self.element_bytes * (m * k + k * n + m * n)
        return self.grid_time(programs, bm, bn, k, hbm, balanced=True) + self.launch

    def copy_time(self, elements_in: int, elements_out: int) -> float:
        """An elementwise kernel (pad, slice, reduction), launch included."""
        hbm = self.element_bytes * (elements_in + elements_out)
        return hbm / (self.hbm_bandwidth * self.memory_fraction) + self.launch

    def _bsmm_time(self, rows: int, n: int, f1: int, c_out: int, c_in: int, rank: int) -> float:
        """The block-sparse product: ``n`` output cells ``c_out`` wide, each reducing over
        ``f1`` kept input cells ``c_in`` wide plus ``rank`` low-rank columns."""
        bm, bn = pixelfly_tiles(rows, c_out, c_in)
        programs = math.ceil(rows / bm) * n * math.ceil(c_out / bn)
        nnz = n * f1 * c_out * c_in
        hbm = self.element_bytes * (
            rows * n * c_in + nnz + rows * n * c_out + rank * (rows + n * c_out)
        )
        return self.grid_time(programs, bm, bn, f1 * c_in + rank, hbm) + self.launch

    def _cells(self, gemm: Gemm, spec: PatternSpec) -> tuple[int, int, int, int, int]:
        po, pi = spec.sides(gemm.out_features, gemm.in_features)
        n = spec.butterfly
        return po, pi, n, po // n, pi // n

    def _pad_time(self, gemm: Gemm, spec: PatternSpec, rows: int) -> float:
        po, pi = spec.sides(gemm.out_features, gemm.in_features)
        t = 0.0
        if pi != gemm.in_features:
            t += self.copy_time(rows * gemm.in_features, rows * pi)
        if po != gemm.out_features:
            t += self.copy_time(rows * po, rows * gemm.out_features)
        return t

    # -- the CostModel protocol ------------------------------------------------------------
    def dense_cost(self, gemm: Gemm) -> float:
        return self.gemm_time(gemm.rows, gemm.in_features, gemm.out_features) * gemm.calls

    def sparse_cost(self, gemm: Gemm, spec: PatternSpec) -> float:
        """A padded ``spec`` is priced at its padded sides, plus the pad and slice copies."""
        rows, r = gemm.rows, spec.rank
        po, pi, n, c_out, c_in = self._cells(gemm, spec)
        t = self._bsmm_time(rows, n, spec.factors + 1, c_out, c_in, r)
        if r:
            t += self.gemm_time(rows, pi, r)  # t = x V^T
        return (t + self._pad_time(gemm, spec, rows)) * gemm.calls

    # -- training step (forward + backward) --------------------------------------------------
    def dense_train_cost(self, gemm: Gemm) -> float:
        """Forward, input gradient and weight gradient (three cuBLAS GEMMs), bias gradient."""
        m, k, n = gemm.rows, gemm.in_features, gemm.out_features
        t = self.gemm_time(m, k, n) + self.gemm_time(m, n, k) + self.gemm_time(n, m, k)
        if gemm.bias:
            t += self.copy_time(m * n, n)
        return t * gemm.calls

    def sparse_train_cost(self, gemm: Gemm, spec: PatternSpec) -> float:
        """Forward, input gradient (block-sparse over the transpose), weight gradient on the
        kept cells, low-rank and bias gradients."""
        rows, r, f1 = gemm.rows, spec.rank, spec.factors + 1
        po, pi, n, c_out, c_in = self._cells(gemm, spec)
        t = self.sparse_cost(gemm, spec) / gemm.calls
        t += self._bsmm_time(rows, n, f1, c_in, c_out, r)  # dx = dy B + (dy U) V
        g = self.grad_tile
        bo, bc = _p2(c_out, 16, g), _p2(c_in, 16, g)
        programs = n * f1 * math.ceil(c_out / bo) * math.ceil(c_in / bc)
        hbm = self.element_bytes * (rows * (po + pi) + n * f1 * c_out * c_in)
        t += self.grid_time(programs, bo, bc, rows, hbm) + self.launch  # dB on kept cells
        if r:
            t += self.gemm_time(rows, po, r)  # dy U
            t += self.gemm_time(rows, pi, r) + self.gemm_time(po, rows, r)  # dU = dy^T (x V^T)
            t += self.gemm_time(r, rows, pi)  # dV = (dy U)^T x
        if gemm.bias:
            t += self.copy_time(rows * gemm.out_features, gemm.out_features)
        return (t + 2 * self._pad_time(gemm, spec, rows)) * gemm.calls

    def train_speedup(self, gemm: Gemm, spec: PatternSpec) -> float:
        """Predicted dense / Pixelfly time of a forward + backward."""
        return self.dense_train_cost(gemm) / self.sparse_train_cost(gemm, spec)

    # -- attention ---------------------------------------------------------------------------
    def attention_speedup(self, seq: int, spec: AttentionSpec, causal: bool = False) -> float:
        """Predicted SDPA flash time / Pixelfly attention time over ``seq`` tokens (both skip
        the upper triangle when ``causal``; Pixelfly works on the padded sequence)."""
        p = spec.padded_seq(seq)
        work = spec.density(seq, causal) * (p / seq) ** 2  # kept work / flash's work

        def rate(bm: int) -> float:  # a bm-row query tile: Q K^T and P V per key block
            intensity = 2.0 * bm / self.element_bytes  # FLOPs per byte of K and V loaded
            return min(self.attention_fraction * self.peak_flops, intensity * self.l2_bandwidth)

        tile = rate(min(spec.block, 128)) / rate(128)
        return self.attention_efficiency * tile / work
