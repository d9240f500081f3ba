"""Tests for pxcompile.patterns: the flat block butterfly rule and its stretched block masks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pxcompile.patterns import (
    PatternSpec,
    block_mask,
    check_butterfly,
    flat_butterfly,
    mask_density,
    pattern_mask,
)


def reference_keep(n: int, f: int) -> np.ndarray:
    """keep(i, j) <=> i == j or (i XOR j) in {1, 2, ..., 2^(f-1)}, cell by cell."""
    strides = {1 << k for k in range(f)}
    return np.array([[i == j or (i ^ j) in strides for j in range(n)] for i in range(n)])


@st.composite
def grid(draw):
    """A butterfly size n (any multiple of 2^f, not only powers of two) and factors f."""
    f = draw(st.integers(1, 5))
    n = (1 << f) * draw(st.integers(1, 6))
    if n < 2:
        n = 2
    return n, f


@settings(max_examples=60, deadline=None)
@given(grid())
def test_flat_butterfly_matches_the_formula(nf):
    n, f = nf
    m = flat_butterfly(n, f)
    assert m.dtype == bool and m.shape == (n, n)
    np.testing.assert_array_equal(m, reference_keep(n, f))
    # f + 1 cells per row and per column, symmetric, density (f + 1) / n
    assert (m.sum(axis=0) == f + 1).all() and (m.sum(axis=1) == f + 1).all()
    np.testing.assert_array_equal(m, m.T)
    assert mask_density(m) == (f + 1) / n


@settings(max_examples=40, deadline=None)
@given(grid())
def test_flat_butterfly_is_block_diagonal_in_groups_of_2_to_the_f(nf):
    n, f = nf
    m = flat_butterfly(n, f)
    g = 1 << f
    i, j = np.nonzero(m)
    assert (i // g == j // g).all()


@pytest.mark.parametrize(
    "n,f,density",
    [(8, 2, 0.375), (8, 3, 0.5), (16, 2, 0.1875), (16, 3, 0.25), (16, 4, 0.3125), (32, 3, 0.125)],
)
def test_reference_densities(n, f, density):
    assert mask_density(flat_butterfly(n, f)) == density
    assert PatternSpec(n, f, 32).block_density == density


def test_flat_butterfly_small_example_and_read_only():
    assert flat_butterfly(4, 1).astype(int).tolist() == [
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 1],
        [0, 0, 1, 1],
    ]
    with pytest.raises(ValueError):
        flat_butterfly(4, 1)[0, 0] = False  # the cached mask can't be corrupted by a caller


@pytest.mark.parametrize(
    "n,f", [(8, 0), (8, -1), (1, 1), (6, 2), (12, 3), (24, 4), (0, 1), (16, 5), (2, 10**18)]
)
def test_bad_butterfly_rejected(n, f):
    with pytest.raises(ValueError):
        check_butterfly(n, f)
    with pytest.raises(ValueError):
        PatternSpec(n, f, 32)


def test_spec_validation():
    with pytest.raises(ValueError, match="pattern_block"):
        PatternSpec(8, 2, 0)
    with pytest.raises(ValueError, match="rank"):
        PatternSpec(8, 2, 32, rank=-1)


def test_spec_densities():
    s = PatternSpec(butterfly=24, factors=3, pattern_block=32, rank=32)
    assert s.block_density == 4 / 24
    assert s.lowrank_density(768, 3072) == 32 * (768 + 3072) / (768 * 3072)
    assert s.density(768, 3072) == s.block_density + s.lowrank_density(768, 3072)
    assert s.to_dict() == {"butterfly": 24, "factors": 3, "pattern_block": 32, "rank": 32}


def test_misfit_reasons():
    s = PatternSpec(16, 2, 32)
    assert s.misfit(512, 512, 32) is None
    assert "not a multiple of butterfly 16" in s.misfit(768, 512, 32)  # 768 = 24 blocks
    assert "'in'=768" in s.misfit(512, 768, 32)
    assert "power-of-two multiple" in PatternSpec(4, 1, 96).misfit(384, 384, 32)
    assert "power-of-two multiple" in PatternSpec(4, 1, 48).misfit(384, 384, 32)
    assert PatternSpec(4, 1, 64).misfit(512, 512, 32) is None
    assert "rank 600 exceeds" in PatternSpec(4, 1, 32, 600).misfit(512, 512, 32)
    with pytest.raises(ValueError, match="multiple of butterfly"):
        block_mask(s, 768, 512, 32)


def test_rectangular_weight_stretches_the_pattern():
    """768 -> 3072 (out x in = 3072 x 768): each cell is a (out/n) x (in/n) rectangle, so
    every block row keeps the same number of blocks (a Kronecker product with ones)."""
    s = PatternSpec(12, 2, 64)
    m = block_mask(s, 3072, 768, 32)
    assert m.shape == (96, 24)
    cell = np.ones((96 // 12, 24 // 12), dtype=bool)
    np.testing.assert_array_equal(m, np.kron(flat_butterfly(12, 2), cell))
    assert (m.sum(axis=1) == 3 * 24 // 12).all()
    assert mask_density(m) == 3 / 12
    assert s.kept_blocks(3072, 768) == pattern_mask(s, 3072, 768).sum()
    assert s.kept_per_row(3072, 768) == 3 * (768 // 64) // 12


@st.composite
def fitting_spec(draw):
    f = draw(st.integers(1, 3))
    n = (1 << f) * draw(st.integers(1, 3))
    block = draw(st.sampled_from([2, 4, 8]))
    pb = block * draw(st.sampled_from([1, 2, 4]))
    out = n * pb * draw(st.integers(1, 3))
    inn = n * pb * draw(st.integers(1, 3))
    return PatternSpec(n, f, pb), out, inn, block


@settings(max_examples=60, deadline=None)
@given(fitting_spec())
def test_block_mask_is_exact_at_hardware_blocks(case):
    spec, out, inn, block = case
    assert spec.misfit(out, inn, block) is None
    bm = block_mask(spec, out, inn, block)
    assert bm.shape == (out // block, inn // block)
    # Element-level mask: every b x b block is all kept or all dropped, and it is the
    # butterfly rule evaluated on cells of (out/n) x (in/n) elements.
    elem = np.kron(bm, np.ones((block, block), dtype=bool))
    tiles = elem.reshape(out // block, block, inn // block, block)
    assert (tiles.all(axis=(1, 3)) | ~tiles.any(axis=(1, 3))).all()
    n, f = spec.butterfly, spec.factors
    ci = np.arange(out)[:, None] // (out // n)
    cj = np.arange(inn)[None, :] // (inn // n)
    np.testing.assert_array_equal(elem, reference_keep(n, f)[ci, cj])
    # density of the mask actually built is exactly the block density
    assert mask_density(bm) == spec.block_density
    assert spec.kept_blocks(out, inn) * (spec.pattern_block // block) ** 2 == bm.sum()


# -- attention densities are counted, not read off a mask (issue #11.6) ----------------------
@settings(max_examples=80, deadline=None)
@given(grid(), st.integers(0, 64), st.booleans())
def test_attention_kept_blocks_matches_the_mask(nf, globals_, causal):
    from pxcompile.patterns import attention_block_mask, attention_kept_blocks

    n, f = nf
    g = min(globals_, n)
    m = attention_block_mask(n, f, g)
    assert attention_kept_blocks(n, f, g, causal) == int((np.tril(m) if causal else m).sum())


def test_attention_density_of_the_longest_sequence_builds_no_mask(monkeypatch):
    """A schema may give seq up to 2^24: its 262144 x 262144 block mask would not fit."""
    import pxcompile.patterns as P

    def no_mask(*a):
        raise AssertionError("density must not build the mask")

    monkeypatch.setattr(P, "attention_block_mask", no_mask)
    spec = P.AttentionSpec(64, 8, 1)
    d = spec.density(2**24)
    assert 0 < d < 0.001 and spec.density(2**24, causal=True) > d
    assert spec.compute_fraction(2**24) == d


def test_padded_pattern_counts_the_padding_against_the_real_weight():
    """384 x 196 laid on a zero-padded 384 x 384: kept blocks, FLOPs and params are the padded
    layer's, densities are relative to the real weight, the mask covers the padded grid."""
    s = PatternSpec(12, 1, 32, rank=8, padded_in=384)
    assert s.padded and s.sides(384, 196) == (384, 384)
    assert s.misfit(384, 196, 32) is None
    assert s.kept_blocks(384, 196) == 2 * 12 * 12 // 12
    assert s.density(196, 384) == pytest.approx((2 * 32 * 32 * 12 + 8 * 768) / (384 * 196))
    assert block_mask(s, 384, 196, 32).shape == (12, 12)
    assert s.padding_text(384, 196) == "padded in 196->384"
    assert PatternSpec(8, 1, 32, padded_out=256, padded_in=512).padding_text(196, 384) == (
        "padded out 196->256, in 384->512"
    )
    assert s.to_dict() == {
        "butterfly": 12, "factors": 1, "pattern_block": 32, "rank": 8, "padded_in": 384
    }  # fmt: skip
    assert "padded_out" not in s.to_dict() and s.unpadded() == PatternSpec(12, 1, 32, 8)
    assert PatternSpec(12, 1, 32).to_dict().keys() == {
        "butterfly",
        "factors",
        "pattern_block",
        "rank",
    }


@pytest.mark.parametrize(
    "spec, why",
    [
        (PatternSpec(12, 1, 32, padded_in=160), "padded 'in'=160 is smaller than the weight's 196"),
        (PatternSpec(12, 1, 32, padded_in=768), "padded 'in'=768 is more than 2x the weight's 196"),
        (PatternSpec(12, 1, 32, padded_in=256), "'in'=196 padded to 256 is not a multiple of"),
        (PatternSpec(12, 1, 32), "'in'=196 is not a multiple of butterfly 12"),
    ],
)
def test_padded_misfit_reasons(spec, why):
    assert why in spec.misfit(384, 196, 32)


def test_padding_must_not_be_negative():
    with pytest.raises(ValueError, match="padded_in must be >= 0"):
        PatternSpec(12, 1, 32, padded_in=-1)
