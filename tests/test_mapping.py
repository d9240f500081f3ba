"""Tests for pxcompile.passes.mapping: pattern enumeration, the cost model and the menu."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pxcompile.passes.cost_cpu import cpu_execution
from pxcompile.passes.mapping import (
    DEFAULT_COST_MODEL,
    NEAR_EQUAL,
    Choice,
    FlopsBlockCost,
    choose,
    max_auto_rank,
    menu,
    min_auto_rank,
    patterns,
    rank_time_share,
)
from pxcompile.patterns import PatternSpec
from pxcompile.policy import Policy
from pxcompile.schema import MAX_DIM, Gemm, LayerType, ModelSchema

COST = FlopsBlockCost()


def mlp(i: int, o: int, rows: int = 1024) -> Gemm:
    return Gemm(f"fc_{i}x{o}", LayerType.MLP, i, o, rows=rows)


def menu_of(g: Gemm, block: int = 32, policy: Policy | None = None) -> list[Choice]:
    policy = policy or Policy()
    return menu(g, block, policy, policy.resolve(g, block), COST)


def all_candidates(g: Gemm, block: int, policy: Policy) -> list[Choice]:
    """Every pattern x rank the menu may pick from, priced, within floor and ceiling."""
    from pxcompile.passes.mapping import _ranks

    res = policy.resolve(g, block)
    out = []
    for base in patterns(g, block, policy.max_pattern_block):
        for r in _ranks(g, base, policy, res):
            spec = PatternSpec(base.butterfly, base.factors, base.pattern_block, r)
            if spec.misfit(g.out_features, g.in_features, block):
                continue
            d = spec.density(g.in_features, g.out_features)
            if d < 1 and res.floor - 1e-12 <= d <= res.ceiling + 1e-12:
                out.append(Choice(spec, d, COST.sparse_cost(g, spec)))
    return out


def test_patterns_of_768x3072():
    g = mlp(768, 3072)
    specs = patterns(g, 32, 4)
    got = {(s.butterfly, s.factors, s.pattern_block) for s in specs}
    # 24 blocks of 32 (n | 24), 12 of 64 (n | 12), 6 of 128 (n | 6)
    assert (24, 3, 32) in got and (12, 2, 64) in got and (6, 1, 128) in got
    assert (16, 2, 32) not in got  # 24 blocks is not a multiple of 16
    for s in specs:
        assert s.rank == 0
        assert s.misfit(g.out_features, g.in_features, 32) is None
        assert s.block_density < 1
        assert s.pattern_block in (32, 64, 128)
    assert {s.pattern_block for s in patterns(g, 32, 1)} == {32}
    assert {s.pattern_block for s in patterns(g, 32, 2)} == {32, 64}


def test_patterns_none_when_nothing_divides():
    assert patterns(mlp(160, 160), 32, 4) == []  # 5 blocks: no 2^f divides 5
    assert menu_of(mlp(160, 160), policy=Policy(pad="never")) == []
    assert all(c.spec.padded for c in menu_of(mlp(160, 160)))  # pad: auto pads it


def test_cost_model():
    g = mlp(768, 3072, rows=100)
    assert COST.dense_cost(g) == g.flops
    s = PatternSpec(12, 2, 64, rank=16)
    kept = s.kept_blocks(3072, 768)
    assert COST.sparse_cost(g, s) == pytest.approx(
        100 * (2 * (kept * 64 * 64 + 16 * (768 + 3072)) + 512 * kept)
    )
    # same density, fewer larger blocks: cheaper
    small = PatternSpec(24, 3, 32)
    big = PatternSpec(12, 1, 64)
    assert small.block_density == big.block_density
    assert COST.sparse_cost(g, big) < COST.sparse_cost(g, small)


def test_the_calibrated_model_prefers_the_faster_of_near_equal_choices():
    """Issue #12.4: with the planning cost model (calibrated-cpu) too, the menu keeps the
    fastest of (nearly) equal densities: fewer factors (less gathering) and bigger blocks."""
    from pxcompile.passes.mapping import DEFAULT_COST_MODEL, predicted_speedup

    g = mlp(768, 3072)
    pol = Policy(rank=0)
    m = {round(c.density, 9): c for c in menu(g, 32, pol, pol.resolve(g, 32), DEFAULT_COST_MODEL)}
    best = m[round(1 / 6, 9)].spec
    # f = 1 (12 cells, 6 groups of 2): the grouped kernel, where the pattern block no longer
    # matters (12/1/32 and 12/1/64 are the same matmuls); f = 3 gathers and is slower
    assert (best.butterfly, best.factors) == (12, 1)
    assert predicted_speedup(g, PatternSpec(24, 3, 32)) < predicted_speedup(g, best)
    assert predicted_speedup(g, PatternSpec(12, 1, 32)) == predicted_speedup(g, best)


def test_equal_densities_prefer_fewer_larger_blocks():
    """768x3072 at block 32: density 1/6 is (24,3,32), (12,1,32) or (12,1,64); 1/3 is
    also (6,1,128). The menu keeps the largest blocks."""
    m = {round(c.density, 9): c for c in menu_of(mlp(768, 3072), policy=Policy(rank=0))}
    assert m[round(1 / 6, 9)].spec == PatternSpec(12, 1, 64)
    assert m[round(1 / 3, 9)].spec == PatternSpec(6, 1, 128)
    assert m[0.25].spec == PatternSpec(12, 2, 64)


def test_near_equal_densities_prefer_fewer_larger_blocks():
    """1536x1536, ranks in steps of 1: (16,2,32) keeps 3/16 = 0.1875 with 9 blocks of 32 per
    row; (12,1,128) + rank 15 keeps 0.1862 (within 2%) with 2 blocks of 128 per row. The
    menu must offer the latter and not the former."""
    g = mlp(1536, 1536)
    pol = Policy(rank_multiple=1)
    fine = PatternSpec(16, 2, 32)
    coarse = PatternSpec(12, 1, 128, rank=15)
    d_fine, d_coarse = fine.density(1536, 1536), coarse.density(1536, 1536)
    assert d_coarse < d_fine and d_fine - d_coarse < NEAR_EQUAL * d_fine
    assert COST.sparse_cost(g, coarse) < COST.sparse_cost(g, fine)
    m = menu_of(g, policy=pol)
    specs = [c.spec for c in m]
    assert fine not in specs
    near = [c for c in m if abs(c.density - d_fine) < NEAR_EQUAL * d_fine]
    # the coarse pattern, at whichever ranks of the grid fall near (rank >= 1: min_auto_rank)
    assert any(replace(c.spec, rank=coarse.rank) == coarse for c in near)
    assert near and all(c.spec.pattern_block == 128 for c in near)
    assert all(c.spec.kept_per_row(1536, 1536) < fine.kept_per_row(1536, 1536) for c in near)


def test_fixed_rank_and_rank_cap():
    g = mlp(768, 3072)
    m = menu_of(g, policy=Policy(rank=32))
    assert m and all(c.spec.rank == 32 for c in m)
    # rank capped at min(in, out) / 2
    g2 = mlp(256, 2048)
    m2 = menu_of(g2, policy=Policy(rank=1000))
    assert m2 and all(c.spec.rank == 128 for c in m2)


def test_auto_rank_respects_lowrank_share():
    g = mlp(768, 3072)
    for share in (0.0, 0.15, 0.5):
        pol = Policy(lowrank_share=share)
        for c in menu_of(g, policy=pol):
            lr = c.spec.lowrank_density(768, 3072)
            assert lr <= share * c.density + 1e-12
            assert c.spec.rank % pol.rank_multiple == 0
        if share == 0.0:
            assert all(c.spec.rank == 0 for c in menu_of(g, policy=pol))


def test_floor_and_ceiling_bound_the_menu():
    g = mlp(768, 3072)
    pol = Policy.from_dict({"types": {"mlp": {"floor": 0.2, "ceiling": 0.4}}})
    m = menu_of(g, policy=pol)
    assert m and all(0.2 - 1e-12 <= c.density <= 0.4 + 1e-12 for c in m)


@st.composite
def gemm_case(draw):
    block = draw(st.sampled_from([8, 16, 32, 64]))
    i = block * draw(st.integers(4, 96))
    o = block * draw(st.integers(4, 96))
    pol = Policy(
        rank=draw(st.sampled_from([None, None, 0, 8])),
        rank_multiple=draw(st.sampled_from([1, 8])),
        max_pattern_block=draw(st.sampled_from([1, 2, 4])),
        pad=draw(st.sampled_from(["auto", "never"])),
    )
    return mlp(i, o, rows=draw(st.integers(1, 4096))), block, pol


@settings(max_examples=60, deadline=None)
@given(gemm_case())
def test_menu_invariants(case):
    g, block, pol = case
    m = menu_of(g, block, pol)
    cands = all_candidates(g, block, pol)
    # pad: auto adds padded choices where no pattern fits the sides as they are
    assert bool(m) == bool(cands) or (pol.pad == "auto" and all(c.spec.padded for c in m))
    for a, b in zip(m, m[1:]):
        assert a.density < b.density  # rising density
        assert b.density - a.density >= NEAR_EQUAL * b.density  # no near-equal pair
    for c in m:
        assert c.density < 1
        assert c.spec.misfit(g.out_features, g.in_features, block) is None
        assert c.density == c.spec.density(g.in_features, g.out_features)
        assert c.cost == COST.sparse_cost(g, c.spec)
    for x in cands:
        # every candidate left off has a menu entry of nearly the same density that is no
        # dearer (near-equal groups chain, hence the factor 2)
        near = [c for c in m if abs(c.density - x.density) < 2 * NEAR_EQUAL * x.density + 1e-12]
        assert near and min(c.cost for c in near) <= x.cost
    if cands:
        # the sparse end of the menu is kept: a budget never loses more than NEAR_EQUAL of
        # its reach to the cost model
        lo = min(x.density for x in cands)
        assert m[0].density < lo * (1 + NEAR_EQUAL) + 1e-12


def test_sparser_but_dearer_choices_stay_on_the_menu():
    """64x64 at block 8: (8,1,8) keeps 1/4 in 16 small blocks and costs more than (4,1,16),
    which keeps 1/2 in 8 bigger ones. The menu must still offer 1/4: the budget is in FLOPs."""
    g = mlp(64, 64, rows=1)
    assert COST.sparse_cost(g, PatternSpec(8, 1, 8)) > COST.sparse_cost(g, PatternSpec(4, 1, 16))
    m = menu_of(g, block=8)
    # rank 1: the least auto rank of a block-diagonal butterfly (min_auto_rank)
    assert m[0].spec == PatternSpec(8, 1, 8, rank=1) and m[0].density == 0.25 + 128 / 4096


def test_choose():
    opts = [Choice(PatternSpec(8, 1, 32), d, d) for d in (0.1, 0.2, 0.3)]
    assert choose(opts, 0.25).density == 0.2
    assert choose(opts, 0.2).density == 0.2
    assert choose(opts, 1.0).density == 0.3
    assert choose(opts, 0.05).density == 0.1  # sparsest if nothing is at or below


def test_calibrated_cost_and_predicted_speedup():
    from pxcompile.passes.mapping import COST_MODELS, CalibratedCost, predicted_speedup
    from pxcompile.patterns import PatternSpec
    from pxcompile.schema import Gemm, LayerType

    g = Gemm("fc", LayerType.MLP, 768, 3072, rows=1568)
    sparse = PatternSpec(24, 3, 32)
    assert predicted_speedup(g, None) == 1.0
    # Slower than FLOPs alone predict (data movement), but still a speedup at density 1/6.
    assert 1.5 < predicted_speedup(g, sparse) < 1 / sparse.block_density
    cm = CalibratedCost()
    assert cm.sparse_cost(g, PatternSpec(24, 2, 32)) < cm.sparse_cost(g, sparse)
    assert set(COST_MODELS) == {"flops+blocks", "calibrated-cpu", "gpu"}


def test_calibrated_cost_reproduces_the_layer_benchmark():
    """The fit's inputs (benchmarks/RESULTS.md, "Layer", px fwd): predictions within 25%."""
    from pxcompile.passes.mapping import DEFAULT_COST_MODEL, predicted_speedup
    from pxcompile.patterns import PatternSpec

    measured = [
        (768, 3072, 1568, PatternSpec(24, 3, 32), 3.61),
        (3072, 768, 1568, PatternSpec(24, 3, 32), 3.05),
        (768, 3072, 1568, PatternSpec(24, 3, 32, 32), 2.19),
        (3072, 768, 1568, PatternSpec(24, 3, 32, 32), 2.18),
        (768, 3072, 1568, PatternSpec(12, 2, 64), 2.64),
        (3072, 768, 1568, PatternSpec(12, 2, 64), 2.83),
        (768, 3072, 1568, PatternSpec(24, 2, 32), 3.72),
        (1024, 4096, 4096, PatternSpec(32, 4, 32), 2.80),
        (4096, 1024, 4096, PatternSpec(32, 4, 32), 2.95),
    ]
    assert DEFAULT_COST_MODEL.name == "calibrated-cpu"
    for i, o, _rows, spec, x in measured:  # measured on the gather kernel (per row)
        pred = 2.0 * i * o / DEFAULT_COST_MODEL.gather_row_cost(o, i, spec)
        assert 0.75 < pred / x < 1.25, (i, o, spec, pred, x)
    # the grouped kernel (RESULTS.md, "Grouped kernel", px fwd)
    grouped = [
        (768, 3072, 1568, PatternSpec(8, 1, 32), 3.12),
        (3072, 768, 1568, PatternSpec(8, 1, 32), 3.25),
        (196, 384, 6144, PatternSpec(4, 1, 32, padded_in=256), 1.33),
        (384, 196, 6144, PatternSpec(4, 1, 32, padded_out=256), 1.44),
    ]
    for i, o, rows, spec, x in grouped:
        assert cpu_execution(o, i, spec) == "grouped"
        pred = predicted_speedup(Gemm("fc", LayerType.MLP, i, o, rows=rows), spec)
        assert 0.75 < pred / x < 1.25, (i, o, spec, pred, x)


def test_attention_menu():
    from pxcompile.passes.mapping import attention_menu
    from pxcompile.patterns import AttentionSpec

    pol = Policy()
    g = Gemm("a.scores", LayerType.ATTN_SCORES, 64, 4096, rows=12 * 4096, heads=12, seq=4096)
    res = pol.resolve(g, 32)
    m = attention_menu(g, pol, res)
    assert m and all(isinstance(c.spec, AttentionSpec) for c in m)
    assert [c.density for c in m] == sorted(c.density for c in m)
    assert all(c.spec.block == 64 and c.spec.globals == 1 for c in m)
    assert all(res.floor <= c.density <= 0.25 for c in m)  # the attention ceiling
    assert menu_of(g) == m  # menu() dispatches on activation GEMMs
    assert attention_menu(Gemm("x", LayerType.ATTN_SCORES, 64, 64, rows=64), pol, res) == []
    # padding to a multiple of block * 2^f is counted
    odd = Gemm("o.scores", LayerType.ATTN_SCORES, 64, 3000, rows=3000, seq=3000)
    for c in attention_menu(odd, pol, pol.resolve(odd, 32)):
        assert c.density >= c.spec.density(3000) * (c.spec.padded_seq(3000) / 3000) ** 2 - 1e-12


# -- bounded work (issue #11.6: in: 2^26 took 66 s and 1.1 GB) ---------------------------------
def test_even_divisors():
    from pxcompile.passes.mapping import _even_divisors

    for n in [*range(1, 300), 720720, 2**19, 3 * 2**18, 969969]:
        want = [d for d in range(2, n + 1, 2) if n % d == 0]
        assert _even_divisors(n) == want
        for limit in (1, 2, 10, 100, 10**6):
            assert _even_divisors(n, limit) == [d for d in want if d <= limit]


@pytest.mark.parametrize("shape", [(MAX_DIM, MAX_DIM), (MAX_DIM, 3 * 2**20)])
def test_work_for_the_largest_layers_is_bounded(shape):
    """A schema may give sides up to 2^24: the menu tries a bounded number of patterns and
    ranks (O(log size) patterns; ranks at most RANK_RESOLUTION x NEAR_EQUAL apart)."""
    from pxcompile.passes.mapping import MAX_RANKS, _min_block_density, _ranks

    g = mlp(*shape, rows=1)
    for pol in (Policy(), Policy(rank_multiple=1), Policy(lowrank_share=0.9)):
        res = pol.resolve(g, 32)
        bases = patterns(g, 32, pol.max_pattern_block, _min_block_density(g, pol, res))
        tried = [len(_ranks(g, b, pol, res)) for b in bases]
        assert 0 < len(bases) < 300 and max(tried) <= MAX_RANKS + 1, (len(bases), max(tried))
        if pol.lowrank_share == 0.15:  # 32 x 0.15 / 0.85 / NEAR_EQUAL = 282 (x2: rounding)
            assert max(tried) <= 600
    m = menu_of(g)
    assert m and all(0.05 - 1e-12 <= c.density <= 0.9 + 1e-12 for c in m)
    for a, b in zip(m, m[1:]):
        assert b.density - a.density >= NEAR_EQUAL * b.density


def test_min_block_density_loses_no_choice():
    """Patterns left out for their block density could not reach the floor with any rank."""
    from pxcompile.passes.mapping import _min_block_density, _ranks

    g = mlp(2048, 8192)
    for pol in (
        Policy.from_dict({"types": {"mlp": {"floor": 0.2}}}),
        Policy.from_dict({"types": {"mlp": {"floor": 0.2}}, "rank": 64}),
    ):
        res = pol.resolve(g, 16)
        kept = set(patterns(g, 16, 4, _min_block_density(g, pol, res)))
        assert kept
        for base in set(patterns(g, 16, 4)) - kept:
            for r in _ranks(g, base, pol, res) or [0]:
                spec = PatternSpec(base.butterfly, base.factors, base.pattern_block, r)
                assert spec.density(2048, 8192) < res.floor


def test_planning_a_schema_at_the_size_bound():
    from pxcompile.passes.budget import plan_schema

    s = ModelSchema.from_yaml(
        f"version: 1\nname: big\ngemms:\n- {{name: fc, type: mlp, in: {MAX_DIM}, "
        f"out: {MAX_DIM}, rows: 1}}\n"
    )
    p = plan_schema(s, 0.3, 32)
    assert p["fc"].sparse and 0.28 <= p.summary.eligible_fraction <= 0.3


def test_attention_menu_at_the_longest_sequence():
    from pxcompile.passes.mapping import attention_menu

    g = Gemm("a.scores", LayerType.ATTN_SCORES, 64, MAX_DIM, rows=MAX_DIM, heads=1, seq=MAX_DIM)
    pol = Policy()
    assert attention_menu(g, pol, pol.resolve(g, 32)) == []  # every pattern under the floor
    pol = Policy.from_dict({"types": {"attn_scores": {"floor": 1e-5}}})
    m = attention_menu(g, pol, pol.resolve(g, 32))
    assert m and all(1e-5 <= c.density <= 0.25 for c in m)


# -- padding (issue #12.3) --------------------------------------------------------------------
def test_padded_sizes():
    from pxcompile.passes.mapping import PAD_CANDIDATES, padded_sizes

    assert padded_sizes(196, 32) == [224, 256, 288, 320, 384]
    assert padded_sizes(384, 32)[0] == 384  # a side the block divides may stay as it is
    for size in (1, 31, 33, 100, 197, 1000, 3072, MAX_DIM - 1, MAX_DIM):
        for block in (8, 32, 128):
            got = padded_sizes(size, block)
            assert got == sorted(set(got)) and len(got) <= PAD_CANDIDATES
            assert all(size <= s <= 2 * size and s % block == 0 for s in got)


def test_needs_padding():
    from pxcompile.passes.mapping import needs_padding

    assert needs_padding(mlp(196, 384), 32, 4) and needs_padding(mlp(384, 196), 32, 4)
    assert needs_padding(mlp(160, 160), 32, 4)  # aligned, but 5 blocks fit no butterfly
    assert not needs_padding(mlp(768, 3072), 32, 4)


@pytest.mark.parametrize("shape", [(196, 384), (384, 196), (197, 768), (1000, 4096)])
def test_padded_choices_count_the_padding_against_the_real_weight(shape):
    from pxcompile.passes.mapping import CalibratedCost

    g = Gemm("tok", LayerType.TOKEN_MIX, *shape, rows=6144)
    i, o = shape
    m = menu_of(g)
    assert m and all(c.spec.padded for c in m)
    for c in m:
        assert c.spec.misfit(o, i, 32) is None
        assert c.density == pytest.approx(c.spec.density(i, o)) and c.density < 1
        po, pi = c.spec.sides(o, i)
        assert (po * pi) / (o * i) * c.spec.block_density <= c.density + 1e-12
        assert c.cost == COST.sparse_cost(g, c.spec)
        # priced as the padded GEMM's pattern (the layer runs at the padded sides)
        padded = Gemm("p", LayerType.TOKEN_MIX, pi, po, rows=6144)
        assert c.cost == pytest.approx(COST.sparse_cost(padded, c.spec.unpadded()))
    for a, b in zip(m, m[1:]):
        assert b.density - a.density >= NEAR_EQUAL * b.density
    pol = Policy()
    fast = menu(g, 32, pol, pol.resolve(g, 32), COST, faster_only=True)
    assert all(c.cost < COST.dense_cost(g) for c in fast)
    # pad: never keeps them dense; the calibrated CPU model finds padded token-mixing
    # patterns of Mixer-B/16 faster than dense (on the grouped kernel: no padding copy)
    never = Policy(pad="never")
    assert menu(g, 32, never, never.resolve(g, 32), COST) == []
    if shape in ((196, 384), (384, 196)):
        cal = CalibratedCost()
        fast = menu(g, 32, pol, pol.resolve(g, 32), cal, faster_only=True)
        assert fast and all(cpu_execution(o, i, c.spec) == "grouped" for c in fast)
        assert all(not c.spec.unreached(o, i) for c in fast)


def test_aligned_layers_get_no_padding():
    for g in (mlp(768, 3072), mlp(1024, 1024), mlp(384, 1536)):
        assert menu_of(g) and not any(c.spec.padded for c in menu_of(g))


def test_padding_the_largest_awkward_layers_is_bounded():
    """Sides up to 2^24 that no pattern fits: a bounded number of padded shapes and patterns."""
    import time

    g = mlp(MAX_DIM - 1, MAX_DIM - 3, rows=1)
    t = time.perf_counter()
    m = menu_of(g)
    assert m and all(c.spec.padded for c in m) and time.perf_counter() - t < 20


def test_the_rank_time_cap_is_exact_with_a_fixed_cost_and_counts_only_the_rank_above_least():
    """The grouped kernel pays a fixed cost for having a low-rank term at all (``fuse_move``):
    the time cap solves for it exactly, and the rank that connects a block-diagonal
    pattern's groups (``least``) is not counted against the cap, so a cheap base does not
    get a smaller rank than a slow one of the same density."""
    g = Gemm("fc2", LayerType.MLP, 3072, 768, rows=1568)
    spec = PatternSpec(12, 1, 32)  # grouped: 6 groups
    assert cpu_execution(768, 3072, replace(spec, rank=8)) == "grouped"
    r = max_auto_rank(g, spec, 0.15, DEFAULT_COST_MODEL)
    share = [rank_time_share(g, replace(spec, rank=k), DEFAULT_COST_MODEL) for k in (r, r + 1)]
    assert 1 <= r < max_auto_rank(g, spec, 0.15, None)  # the time binds, not the density
    assert share[0] <= 0.15 < share[1]
    least = min_auto_rank(g, spec, Policy())
    assert least == 8
    above = max_auto_rank(g, spec, 0.15, DEFAULT_COST_MODEL, least)
    assert above == max_auto_rank(g, spec, 0.15, None) >= 16
    # the gather pattern of the same density keeps its own cap (no fixed cost there)
    slow = PatternSpec(24, 3, 32)
    assert cpu_execution(768, 3072, replace(slow, rank=16)) == "gather"
    assert max_auto_rank(g, slow, 0.15, DEFAULT_COST_MODEL, 8) <= above


@pytest.mark.parametrize(("out_f", "in_f"), [(3072, 768), (768, 3072), (4096, 1024), (384, 196)])
def test_the_rank_time_cap_is_the_largest_rank_within_the_share(out_f, in_f):
    """Brute force over every pattern: the cap is the largest rank (up to the density cap)
    whose time above ``least`` is within the share, also where the cheaper of the two CPU
    kernels changes as the rank grows (4/2/32 on 3072x768: gather at low ranks, grouped with
    its fixed low-rank cost above; an affine fit from ranks 1 and 2 stopped at 49 of 81)."""
    g = Gemm("x", LayerType.MLP, in_f, out_f, rows=1024)
    for spec in patterns(g, 32, 4):
        for least in sorted({0, min_auto_rank(g, spec, Policy())}):
            top = max_auto_rank(g, spec, 0.15, None)
            exact = least
            while exact < top and (
                rank_time_share(g, replace(spec, rank=exact + 1), DEFAULT_COST_MODEL, least) <= 0.15
            ):
                exact += 1
            got = max_auto_rank(g, spec, 0.15, DEFAULT_COST_MODEL, least)
            assert max(least, got) == max(least, min(exact, top)), (spec, least)
