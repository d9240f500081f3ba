"""The CPU cost models of the mapping pass (torch-free): what one forward of a GEMM costs on a
CPU, dense and with a given pattern, in dense-FLOP equivalents.

PixelflyLinear has two CPU kernels (:mod:`pxcompile.kernels.cpu`): *gather* (kept cells
gathered side by side, one batched matmul, a memory-bound pass on each side) and *grouped*
(one plain matmul per group of ``2^f`` cells, the cells the pattern drops inside a group
multiplied as zeros). :func:`cpu_execution` says which one a layer runs; the layer and the
planner both ask it, so the plan prices the kernel that will run.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..patterns import PatternSpec
from ..schema import Gemm

__all__ = ["CalibratedCost", "FlopsBlockCost", "cpu_execution", "group_pieces"]


@dataclass(frozen=True)
class FlopsBlockCost:
    """FLOPs plus a fixed overhead per kept block and row (the cost of touching a block:
    gathering it and a short inner loop), which favours fewer, larger blocks per row."""

    block_overhead: float = 512.0  # in FLOP-equivalents per kept block per row
    name: str = "flops+blocks"

    def dense_cost(self, gemm: Gemm) -> float:
        return float(gemm.flops)

    def sparse_cost(self, gemm: Gemm, spec: PatternSpec) -> float:
        o, i = spec.sides(gemm.out_features, gemm.in_features)  # padded, if it is
        pb = spec.pattern_block
        kept = spec.kept_blocks(o, i)
        per_row = 2.0 * (kept * pb * pb + spec.rank * (i + o)) + self.block_overhead * kept
        return per_row * gemm.rows * gemm.calls


@dataclass(frozen=True)
class CalibratedCost:
    """FLOPs plus the data movement, per-block and low-rank costs that PixelflyLinear pays on a
    CPU, in dense-FLOP equivalents per row, for whichever of its two kernels is cheaper
    (:func:`cpu_execution`):

    gather:   2 (nnz + lowrank r (in + out))  +  move * narrow * (f + 1)  +  per_block * kept
    grouped:  2 (group nnz + r (in + out))  +  group_move * (in + out)  [+ fuse_move * narrow]

    ``narrow * (f + 1)`` is what the gather kernel gathers (or scatter-sums) per row along the
    weight's narrow side; ``group nnz`` is the grouped kernel's work: every group of ``2^f``
    cells multiplied whole (``2^f / (f + 1)`` of the kept cells, nothing wasted at ``f = 1``),
    cut to the real sides of a padded weight; ``group_move`` is what a matmul on a slice costs
    per element read and written beyond its FLOPs (small matmuls run below peak). ``lowrank``
    says the low-rank term costs the gather kernel that many times its FLOPs. The grouped
    kernel fuses its low-rank factor on the wide side into the group matmuls (a few more
    columns there, at their FLOPs); what that costs beyond them, the narrow side's skinny
    product and a copy of the narrow side, is ``fuse_move`` per narrow element (only with a
    rank).

    ``move``, ``per_block`` and ``lowrank`` were fitted (least squares on log ratios, 8.5% RMS
    error) to the forward column of ``benchmarks/bench_layer.py`` in benchmarks/RESULTS.md:
    768 <-> 3072 at 1568 rows and 1024 <-> 4096 at 4096 rows, 2 threads, fp32, densities
    0.125-0.25, blocks 32 and 64, rank 0 and 32, on the project's 2-core CPU near idle.
    ``group_move`` was fitted to the grouped kernel on Mixer-B/16's shapes (bench_layer.py's
    f1 and "pad 256x384" rows: 768 <-> 3072 at 1568 rows, 196 <-> 384 at 6144 rows, rank 0;
    50-87 per element, 70 taken). ``fuse_move`` was fitted to the same shapes at ranks 8-32 with
    the fused kernel (least squares on log ratios over 15 forward timings: 100; the wide
    channel layers alone give 145, the narrow token mixing alone 95).
    """

    move: float = 200.0
    per_block: float = 500.0
    lowrank: float = 2.25
    group_move: float = 70.0
    fuse_move: float = 100.0
    name: str = "calibrated-cpu"

    def dense_cost(self, gemm: Gemm) -> float:
        return float(gemm.flops)

    def gather_row_cost(self, out_features: int, in_features: int, spec: PatternSpec) -> float:
        o, i = spec.sides(out_features, in_features)  # padded, if it is
        pb = spec.pattern_block
        kept = spec.kept_blocks(o, i)
        return (
            2.0 * (kept * pb * pb + self.lowrank * spec.rank * (i + o))
            + self.move * min(o, i) * (spec.factors + 1)
            + self.per_block * kept
        )

    def grouped_row_cost(self, out_features: int, in_features: int, spec: PatternSpec) -> float:
        work = sum(
            (b - a) * (d - c) for a, b, c, d in group_pieces(out_features, in_features, spec)
        )
        lowrank = 0.0
        if spec.rank:
            lowrank = 2.0 * spec.rank * (in_features + out_features)
            lowrank += self.fuse_move * min(in_features, out_features)
        return 2.0 * work + lowrank + self.group_move * (in_features + out_features)

    def sparse_cost(self, gemm: Gemm, spec: PatternSpec) -> float:
        o, i = gemm.out_features, gemm.in_features
        per_row = min(self.gather_row_cost(o, i, spec), self.grouped_row_cost(o, i, spec))
        return per_row * gemm.rows * gemm.calls


def group_pieces(
    out_features: int, in_features: int, spec: PatternSpec
) -> list[tuple[int, int, int, int]]:
    """The grouped kernel's matmuls: ``(in_start, in_end, out_start, out_end)`` per group of
    ``2^f`` cells, laid on the (padded) sides and cut to the real ones."""
    o, i = spec.sides(out_features, in_features)
    groups = spec.butterfly >> spec.factors
    go, gi = o // groups, i // groups
    return [
        (
            min(g * gi, in_features),
            min((g + 1) * gi, in_features),
            min(g * go, out_features),
            min((g + 1) * go, out_features),
        )
        for g in range(groups)
    ]


def cpu_execution(
    out_features: int, in_features: int, spec: PatternSpec, model: CalibratedCost | None = None
) -> str:
    """``"grouped"`` or ``"gather"``: the CPU kernel predicted faster for this layer (the
    shipped calibrated model unless ``model`` is given)."""
    m = model or CalibratedCost()
    gather = m.gather_row_cost(out_features, in_features, spec)
    grouped = m.grouped_row_cost(out_features, in_features, spec)
    return "grouped" if grouped < gather else "gather"
