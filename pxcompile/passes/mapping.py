"""The mapping pass: which flat block butterfly + low-rank pattern realises a density.

For one GEMM it enumerates every pattern that fits the weight exactly at the hardware block
(butterfly size ``n``, factors ``f``, pattern block, rank), prices each with a swappable
:class:`CostModel`, and keeps a *menu*: the achievable densities, each with its cheapest
pattern. Among choices of nearly equal density the cheaper one wins, which with the default
cost model means fewer, larger blocks per row. The budget pass picks from the menu.

Attention's scores and values GEMMs get an :class:`AttentionSpec` menu instead: the policy
fixes the sequence block and the global blocks, the menu offers the butterfly factors, priced
by the FLOPs of the blocks they keep (padding to a multiple of ``block * 2^f`` included).

A weight GEMM no pattern fits as it is (a side the block does not divide, or block counts that
share no butterfly) gets padded choices too under the policy's ``pad: auto``
(:func:`padded_choices`): patterns on a zero-padded weight, a few padded sizes per side, the
padding counted in their density and cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Protocol

from ..patterns import MAX_PAD_RATIO, AttentionSpec, PatternSpec
from ..policy import Policy, Resolved
from ..schema import Gemm
from .cost_cpu import CalibratedCost, FlopsBlockCost
from .cost_gpu import GpuCost

# Choices whose densities differ by less than this (relative) count as "nearly equal".
NEAR_EQUAL = 0.02
# The budget pass never chooses a pattern its cost model predicts at this speedup over dense
# or below (``menu(faster_only=True)``): 1.0 = never slower than dense. The policy's
# ``min_speedup`` overrides it; the test suite sets 0 for its tiny models (tests/conftest.py),
# which no real cost model predicts faster.
MIN_SPEEDUP: float = 1.0


def min_speedup(policy: Policy) -> float:
    """The speedup over dense a chosen pattern must beat: the policy's, else MIN_SPEEDUP."""
    return MIN_SPEEDUP if policy.min_speedup is None else policy.min_speedup


class CostModel(Protocol):
    """Estimated time of one forward of a GEMM, in arbitrary but consistent units."""

    name: str

    def dense_cost(self, gemm: Gemm) -> float: ...

    def sparse_cost(self, gemm: Gemm, spec: PatternSpec) -> float:
        """A padded ``spec`` is priced at its padded sides (``spec.sides``)."""
        ...


# Pixelfly attention runs at about 1 / (2.2 x kept work) of dense SDPA's time on the project's
# CPU (benchmarks/RESULTS.md, "Attention": 2.2x at 2048 tokens and kept 0.21, 4.0x at 4096 and
# 0.11, 9x at 8192 and 0.054, non-causal): gathers and a non-fused softmax cost the rest.
ATTENTION_OVERHEAD: float = 2.2

# Planning and the reports' predicted speedups use the calibrated CPU model (fitted to this
# project's measurements); ``--cost-model flops+blocks`` plans by FLOPs and blocks alone.
DEFAULT_COST_MODEL: CostModel = CalibratedCost()
# ``--cost-model gpu``: a tile roofline of the Triton kernel vs cuBLAS (cost_gpu.py; H100-class
# defaults, a prediction until measured on a GPU).
COST_MODELS: dict[str, CostModel] = {
    m.name: m for m in (FlopsBlockCost(), CalibratedCost(), GpuCost())
}


def predicted_speedup(
    gemm: Gemm, spec: PatternSpec | AttentionSpec | None, model: CostModel | None = None
) -> float:
    """Dense time / sparse time of one GEMM under the calibrated CPU cost model (attention:
    the kept work's inverse over ``ATTENTION_OVERHEAD``)."""
    model = model or COST_MODELS["calibrated-cpu"]
    if spec is None:
        return 1.0
    if isinstance(spec, AttentionSpec):
        return 1.0 / (ATTENTION_OVERHEAD * spec.compute_fraction(gemm.seq or 1))
    return model.dense_cost(gemm) / model.sparse_cost(gemm, spec)


@dataclass(frozen=True)
class Choice:
    """One achievable pattern for a GEMM and what it costs."""

    spec: PatternSpec | AttentionSpec
    density: float  # butterfly + low-rank, relative to the dense weight (attention: work)
    cost: float


# Ranks tried with one butterfly pattern are at least this fraction of NEAR_EQUAL x its block
# density apart in density: every rank_multiple for real layers, a coarser step for layers
# tens of thousands wide, so a pattern never has more than about 32 x lowrank_share /
# (1 - lowrank_share) / NEAR_EQUAL ranks (the menu keeps one choice per NEAR_EQUAL anyway).
RANK_RESOLUTION = 1 / 32
MAX_RANKS = 512  # and never more than this many (a lowrank_share near 1 would allow 10^4)


def _even_divisors(n: int, limit: int | None = None) -> list[int]:
    """The even divisors of ``n`` up to ``limit``, rising, in O(min(limit, sqrt n)) steps
    (a butterfly size must be even: 2^f divides it with f >= 1)."""
    top = n if limit is None else min(n, limit)
    if top * top <= n:
        return [d for d in range(2, top + 1, 2) if n % d == 0]
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    both = sorted({*small, *(n // d for d in small)})
    return [d for d in both if d % 2 == 0 and d <= top]


def patterns(
    gemm: Gemm, block: int, max_pattern_block: int, min_block_density: float = 0.0
) -> list[PatternSpec]:
    """Every rank-0 butterfly pattern that lays exactly on the weight (density < 1), with a
    block density of at least ``min_block_density``.

    A butterfly of size ``n`` keeps ``(f + 1) / n <= bit_length(n) / n`` of the weight, so
    a positive ``min_block_density`` bounds ``n`` by ``bit_length / min_block_density``:
    the enumeration is O(log(size) / min_block_density), else O(sqrt(size)), not O(size).
    """
    out: list[PatternSpec] = []
    o, i = gemm.out_features, gemm.in_features
    pb = block
    while pb <= block * max_pattern_block and o % pb == 0 and i % pb == 0:
        g = math.gcd(o // pb, i // pb)
        limit = int(g.bit_length() / min_block_density) + 1 if min_block_density > 0 else None
        for n in _even_divisors(g, limit):
            f = 1
            while n % (1 << f) == 0 and f + 1 < n:
                if (f + 1) / n >= min_block_density:
                    out.append(PatternSpec(n, f, pb))
                f += 1
        pb *= 2
    return out


def rank_time_share(gemm: Gemm, spec: PatternSpec, cost_model: CostModel, least: int = 0) -> float:
    """The share of the layer's predicted time that its low-rank term takes (0 at rank 0);
    with ``least``, only the rank above it (what :func:`max_auto_rank` caps)."""
    if spec.rank <= least:
        return 0.0
    total = cost_model.sparse_cost(gemm, spec)
    base = cost_model.sparse_cost(gemm, replace(spec, rank=least))
    return max(0.0, (total - base) / total) if total > 0 else 0.0


def max_auto_rank(
    gemm: Gemm, spec: PatternSpec, share: float, cost_model: CostModel | None, least: int = 0
) -> int:
    """The largest rank ``rank: auto`` may give ``spec``: its low-rank term takes at most
    ``share`` of the layer's density and, with a ``cost_model``, the rank above ``least``
    (what the pattern needs anyway, :func:`min_auto_rank`) at most ``share`` of its predicted
    time (rank by benefit: where the low-rank term costs more than its FLOPs, as in the gather
    kernel at about 2.25x, it gets less than its density share)."""
    o, i = gemm.out_features, gemm.in_features
    cap = min(o, i) // 2
    if share <= 0:
        return 0
    per_rank = (i + o) / (i * o)
    by_density = share / (1 - share) * spec.block_density / per_rank
    if cost_model is None:
        return max(0, min(cap, int(by_density)))

    # The time share of the rank above ``least``, 1 - c(least) / c(r), rises with r for any
    # cost model whose cost rises with the rank, so the largest rank within ``share`` is found
    # by bisection: exact where the cost is not affine in the rank (a kernel's fixed cost for
    # having a low-rank term at all, or the cheaper of two kernels switching as r grows).
    hi = max(0, min(cap, int(by_density)))
    if hi <= least:
        return hi
    lo = least  # within share (0 of the time above least)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if rank_time_share(gemm, replace(spec, rank=mid), cost_model, least) <= share:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _ranks(
    gemm: Gemm,
    spec: PatternSpec,
    policy: Policy,
    resolved: Resolved,
    cost_model: CostModel | None = None,
) -> list[int]:
    """The ranks to try with ``spec``: those whose total density can be within the floor and
    ceiling, at most ``RANK_RESOLUTION x NEAR_EQUAL x block density`` apart; with a
    ``cost_model``, only those within its time cap too (a subset: the same steps)."""
    o, i = gemm.out_features, gemm.in_features
    cap = min(o, i) // 2
    if resolved.rank is not None:
        return [min(resolved.rank, cap)]
    # Auto: ranks up to max_auto_rank (lowrank_share of the density and of the time), and
    # at least min_auto_rank.
    step = policy.rank_multiple
    per_rank = (i + o) / (i * o)
    least = min_auto_rank(gemm, spec, policy)
    top = max(least, max_auto_rank(gemm, spec, policy.lowrank_share, None))
    # Ranks outside [floor, ceiling] are never chosen: skip them (a step of slack each side,
    # the menu checks the bounds exactly).
    bd = spec.block_density
    lo = max(0, (math.ceil((resolved.floor - bd) / per_rank / step) - 1) * step)
    hi = min(top, (math.floor((resolved.ceiling - bd) / per_rank / step) + 1) * step)
    if hi < lo:
        return [least] if lo <= least <= hi + step else []
    finest = RANK_RESOLUTION * NEAR_EQUAL * bd  # the density step that still matters
    stride = step * max(
        1, math.floor(finest / (per_rank * step)), -(-(hi - lo) // (step * MAX_RANKS))
    )
    ranks = sorted({max(least, r) for r in range(lo, hi + 1, stride)})
    if cost_model is None:
        return ranks
    by_time = max(least, max_auto_rank(gemm, spec, policy.lowrank_share, cost_model, least))
    return [r for r in ranks if r <= by_time]


def min_auto_rank(gemm: Gemm, spec: PatternSpec, policy: Policy) -> int:
    """The least rank ``rank: auto`` gives ``spec``: where its butterfly is block-diagonal
    (``2^f < n``: no kept cell links two groups of ``2^f`` cells, so without a low-rank term
    the layer splits into separate narrow layers), ``rank_multiple``, or less where that is
    more than ``lowrank_share`` of the density allows (at least 1); else 0. Also 0 when the
    policy gives the low-rank term no share."""
    if policy.lowrank_share <= 0 or spec.butterfly >> spec.factors <= 1:
        return 0
    by_density = max_auto_rank(gemm, spec, policy.lowrank_share, None)
    return max(1, min(policy.rank_multiple, by_density))


def attention_menu(gemm: Gemm, policy: Policy, resolved: Resolved) -> list[Choice]:
    """Attention patterns for a scores/values GEMM of ``gemm.seq`` tokens, by rising density:
    one per butterfly factor count that fits, within the floor and ceiling."""
    seq = gemm.seq
    if not seq:
        return []
    out: list[Choice] = []
    f = 1
    while (policy.attention_block << f) <= 2 * seq and f <= 30:
        spec = AttentionSpec(policy.attention_block, f, policy.attention_globals)
        if spec.misfit(seq) is None:
            d = spec.compute_fraction(seq)
            if d < 1.0 and resolved.floor - 1e-12 <= d <= resolved.ceiling + 1e-12:
                out.append(Choice(spec, d, gemm.flops * d))
        f += 1
    kept: list[Choice] = []
    for c in sorted(out, key=lambda c: (c.density, c.spec)):
        if kept and c.density - kept[-1].density < NEAR_EQUAL * c.density:
            continue
        kept.append(c)
    return kept


def menu(
    gemm: Gemm,
    block: int,
    policy: Policy,
    resolved: Resolved,
    cost_model: CostModel,
    faster_only: bool = False,
    benefit: bool = False,
) -> list[Choice]:
    """The GEMM's achievable choices within its floor and ceiling, by rising density.

    The budget pass asks with ``faster_only``: a choice ``cost_model`` predicts no faster
    than dense is not offered (:func:`slower_than_dense` says why a GEMM is left with none);
    and with ``benefit``: auto ranks are capped by time as well as density
    (:func:`max_auto_rank`; the pass drops that cap only when the budget can't be met with
    it). Of choices whose densities are nearly equal (within ``NEAR_EQUAL``) only the
    cheapest is kept, so consecutive entries differ by at least ``NEAR_EQUAL`` in density.
    """
    if not gemm.has_weight:
        opts = attention_menu(gemm, policy, resolved)
        if faster_only:
            least = min_speedup(policy)
            opts = [c for c in opts if predicted_speedup(gemm, c.spec, cost_model) > least]
        return opts
    dense_cost = cost_model.dense_cost(gemm)
    least = min_speedup(policy)
    o, i = gemm.out_features, gemm.in_features
    choices: dict[float, Choice] = {}
    for base in patterns(
        gemm, block, policy.max_pattern_block, _min_block_density(gemm, policy, resolved)
    ):
        if base.block_density > resolved.ceiling + 1e-12:
            continue  # the low-rank term only adds density
        for r in _ranks(gemm, base, policy, resolved, cost_model if benefit else None):
            spec = PatternSpec(base.butterfly, base.factors, base.pattern_block, r)
            if spec.misfit(o, i, block):
                continue
            d = spec.density(o, i)
            if d >= 1.0 or not resolved.floor - 1e-12 <= d <= resolved.ceiling + 1e-12:
                continue
            c = Choice(spec, d, cost_model.sparse_cost(gemm, spec))
            if faster_only and not dense_cost > least * c.cost:
                continue  # predicted slower than dense: never chosen
            key = round(d, 12)
            old = choices.get(key)
            if old is None or (c.cost, c.spec) < (old.cost, old.spec):
                choices[key] = c
    if resolved.pad and needs_padding(gemm, block, policy.max_pattern_block):
        for c in padded_choices(gemm, block, policy, resolved, cost_model, faster_only, benefit):
            key = round(c.density, 12)
            old = choices.get(key)
            if old is None or (c.cost, c.spec) < (old.cost, old.spec):
                choices[key] = c
    # Nearly equal densities: keep the cheaper. A sparser choice is never dropped just
    # because a much denser one is cheaper: the budget is in FLOPs, and the allocator needs
    # the sparse end of the menu to meet low budgets (and to keep density monotone in size).
    kept: list[Choice] = []
    for c in sorted(choices.values(), key=lambda c: (c.density, c.cost, c.spec)):
        if kept and c.density - kept[-1].density < NEAR_EQUAL * c.density:
            if (c.cost, c.spec) < (kept[-1].cost, kept[-1].spec):
                kept[-1] = c
            continue
        kept.append(c)
    return kept


def slower_than_dense(
    gemm: Gemm, block: int, policy: Policy, resolved: Resolved, cost_model: CostModel
) -> str | None:
    """Why a GEMM with no choice faster than dense stays dense ("predicted 0.71x at best,
    slower than dense"), or None when it has no pattern at all (or has a faster one)."""
    if menu(gemm, block, policy, resolved, cost_model, faster_only=True):
        return None
    opts = menu(gemm, block, policy, resolved, cost_model)
    if not opts:
        return None
    best = max(opts, key=lambda c: predicted_speedup(gemm, c.spec, cost_model))
    x = predicted_speedup(gemm, best.spec, cost_model)
    pad = ""
    if isinstance(best.spec, PatternSpec):
        pad = best.spec.padding_text(gemm.out_features, gemm.in_features)
    return f"dense: predicted {x:.2f}x at best ({cost_model.name}" + (f", {pad})" if pad else ")")


def _min_block_density(gemm: Gemm, policy: Policy, resolved: Resolved) -> float:
    """The block density under which no rank lifts a pattern to the floor: with auto ranks
    the low-rank term is at most ``share / (1 - share)`` of the block density, with a fixed
    rank it is that rank's density (a little slack for rounding)."""
    if resolved.rank is not None:
        o, i = gemm.out_features, gemm.in_features
        lowrank = min(resolved.rank, min(o, i) // 2) * (i + o) / (i * o)
        need = resolved.floor - lowrank
    else:
        need = resolved.floor * (1 - policy.lowrank_share)
    return max(0.0, need * (1 - 1e-9) - 1e-12)


# --------------------------------------------------------------------------------------------
# padding (policy ``pad: auto``): a GEMM no pattern fits as it is gets patterns laid on a
# zero-padded weight, priced at the padded sides, densities relative to the real weight
# --------------------------------------------------------------------------------------------

#: Padded sizes tried per side (the smallest candidates of :func:`padded_sizes`).
PAD_CANDIDATES: int = 6


def padded_sizes(size: int, block: int, limit: int = PAD_CANDIDATES) -> list[int]:
    """The sizes a side of ``size`` may be laid on, rising: ``size`` itself if ``block``
    divides it, and the next multiple of ``block x m x 2^k`` (``m`` in 1, 3, 5) at or above
    it, up to ``MAX_PAD_RATIO x size``; the ``limit`` smallest. Sizes with many factors of two
    (and a 3 or 5) are those whose block counts share a butterfly with the other side: the
    least padding is not always the best (196 -> 224 = 7 blocks of 32 fits no butterfly,
    196 -> 384 = 12 blocks does). O(log size) candidates.

    Example:
        >>> padded_sizes(196, 32), padded_sizes(384, 32)
        ([224, 256, 288, 320, 384], [384, 480, 512, 640, 768])
    """
    top = MAX_PAD_RATIO * size
    out: set[int] = {size} if size % block == 0 else set()
    for m in (1, 3, 5):
        q = block * m
        while q <= top:
            out.add(-(-size // q) * q)
            q *= 2
    return sorted(s for s in out if s <= top)[:limit]


def needs_padding(gemm: Gemm, block: int, max_pattern_block: int) -> bool:
    """Whether padding may help ``gemm``: a side is not a multiple of ``block``, or no
    butterfly fits its sides as they are (their block counts share no butterfly size)."""
    o, i = gemm.out_features, gemm.in_features
    return bool(o % block or i % block) or not patterns(gemm, block, max_pattern_block)


def padded_choices(
    gemm: Gemm,
    block: int,
    policy: Policy,
    resolved: Resolved,
    cost_model: CostModel,
    faster_only: bool = False,
    benefit: bool = False,
) -> list[Choice]:
    """Choices on zero-padded weights: for each pair of :func:`padded_sizes` (one side may
    stay as it is), the padded GEMM's :func:`menu` (its floor and ceiling scaled by the
    padding), with the padding recorded in the pattern (``padded_out`` / ``padded_in``),
    densities relative to the real weight (the padding counts against the layer) and costs at
    the padded sides. With ``faster_only``, only choices the cost model predicts faster than
    the real dense GEMM (``pad: auto``)."""
    o, i = gemm.out_features, gemm.in_features
    dense = cost_model.dense_cost(gemm)
    out: list[Choice] = []
    for po in padded_sizes(o, block):
        for pi in padded_sizes(i, block):
            ratio = po * pi / (o * i)
            if (po, pi) == (o, i) or resolved.floor / ratio > 1:
                continue
            padded = replace(gemm, out_features=po, in_features=pi)
            inner = replace(
                resolved,
                floor=resolved.floor / ratio,
                ceiling=min(1.0, resolved.ceiling / ratio),
                pad=False,
            )
            for c in menu(padded, block, policy, inner, cost_model, benefit=benefit):
                spec = replace(
                    c.spec,  # type: ignore[arg-type]
                    padded_out=po if po != o else 0,
                    padded_in=pi if pi != i else 0,
                )
                if spec.misfit(o, i, block) or spec.unreached(o, i):
                    continue  # a rank above the real narrow side, or dead rows or columns
                d = spec.density(i, o)
                cost = cost_model.sparse_cost(gemm, spec)
                if d >= 1.0 or (faster_only and not dense > min_speedup(policy) * cost):
                    continue
                out.append(Choice(spec, d, cost))
    return out


def choose(options: list[Choice], target: float) -> Choice:
    """The densest choice at or below ``target`` (the sparsest one if none is)."""
    best = options[0]
    for c in options:
        if c.density <= target + 1e-12:
            best = c
        else:
            break
    return best
