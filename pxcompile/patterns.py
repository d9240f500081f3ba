"""Flat block butterfly patterns, at block granularity.

The rule (Pixelfly, ICLR 2022): on an ``n x n`` grid of cells, the flat butterfly with ``f``
factors keeps cell ``(i, j)`` iff ``i == j`` or ``i XOR j`` is one of ``1, 2, ..., 2^(f-1)``.
Every row and column keeps ``f + 1`` cells, so the cell density is ``(f + 1) / n``; the
pattern is symmetric and block-diagonal in groups of ``2^f`` cells.

The reference takes ``n`` a power of two. The same formula is exact for any ``n`` that is a
multiple of ``2^f`` (flipping one of the low ``f`` bits of ``i < n`` stays below ``n``), which
is what lets a 768-wide layer (24 blocks of 32) use the pattern at all: we allow those ``n``.

A rectangular ``out x in`` weight stretches the pattern: each cell covers ``(out/n) x (in/n)``
elements (a Kronecker product with a block of ones), which must be a whole number of
*pattern blocks* (``pattern_block``, a power-of-two multiple of the hardware block ``b``), so
the mask is exact at hardware-block granularity: each ``b x b`` block is fully kept or fully
dropped. A side that no pattern fits (196 tokens, say) may be *padded*: the pattern is laid on
a larger zero-padded weight (``PatternSpec.padded_out`` / ``padded_in``), whose mask is exact at
block granularity; the layer pads its input and slices its output, so its shapes do not change,
and densities stay relative to the real (unpadded) weight.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np


@lru_cache(maxsize=256)
def _flat_butterfly_cached(n: int, f: int) -> np.ndarray:
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    x = i ^ j
    keep = x == 0
    for k in range(f):
        keep |= x == (1 << k)
    keep.setflags(write=False)
    return keep


def flat_butterfly(n: int, f: int) -> np.ndarray:
    """The ``n x n`` boolean cell mask of the flat butterfly with ``f`` factors.

    Example:
        >>> flat_butterfly(4, 1).astype(int).tolist()
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    """
    check_butterfly(n, f)
    return _flat_butterfly_cached(n, f)


def check_butterfly(n: int, f: int) -> None:
    if f < 1:
        raise ValueError(f"factors must be >= 1, got {f}")
    # 2^f > n when f >= bit_length(n), so it cannot divide n; checking that first keeps
    # 1 << f small (a plan file with factors: 10**18 must not build a huge integer)
    if n < 2 or f >= n.bit_length() or n % (1 << f):
        power = f"2^{f}" + (f" = {1 << f}" if f < 64 else "")
        raise ValueError(f"butterfly size {n} must be a multiple of 2^factors = {power}")


#: A padded side is at most this many times the real one (a plan asking for more is refused:
#: the layer would do more work than dense at any density the mapping pass offers).
MAX_PAD_RATIO: int = 2


@dataclass(frozen=True, order=True)
class PatternSpec:
    """Hyperparameters of one layer's Pixelfly pattern: ``W ~ B + U V^T``.

    ``butterfly`` (n) and ``factors`` (f) fix the block butterfly ``B``; ``pattern_block`` is
    the side, in elements, of the square blocks the layer stores (a power-of-two multiple of
    the hardware block); ``rank`` is the rank of the low-rank term ``U V^T`` (0 = none).

    ``padded_out`` / ``padded_in`` (0 = not padded): the pattern is laid on a zero-padded
    ``padded_out x padded_in`` weight (the layer pads its input with zeros and slices its
    output); kept blocks, FLOPs and parameters are those of the padded layer, and densities
    stay relative to the real ``out x in`` weight (padding counts against the layer).

    Example:
        >>> s = PatternSpec(butterfly=24, factors=3, pattern_block=32, rank=32)
        >>> round(s.block_density, 4), round(s.density(768, 3072), 4)
        (0.1667, 0.2188)
        >>> p = PatternSpec(12, 1, 32, padded_in=384)  # 384 x 196 laid on 384 x 384
        >>> p.sides(384, 196), round(p.density(196, 384), 4), p.padding_text(384, 196)
        ((384, 384), 0.3265, 'padded in 196->384')
    """

    butterfly: int
    factors: int
    pattern_block: int
    rank: int = 0
    padded_out: int = 0
    padded_in: int = 0

    def __post_init__(self) -> None:
        check_butterfly(self.butterfly, self.factors)
        if self.pattern_block < 1:
            raise ValueError(f"pattern_block must be positive, got {self.pattern_block}")
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")
        for k in ("padded_out", "padded_in"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)}")

    @property
    def padded(self) -> bool:
        """Whether the pattern asks for padding on either side."""
        return bool(self.padded_out or self.padded_in)

    def sides(self, out_features: int, in_features: int) -> tuple[int, int]:
        """The ``(out, in)`` sides the pattern is laid on: the padded ones where set."""
        return (self.padded_out or out_features, self.padded_in or in_features)

    def unpadded(self) -> PatternSpec:
        """The same pattern without padding (as laid on the padded weight)."""
        return replace(self, padded_out=0, padded_in=0)

    def padding_text(self, out_features: int, in_features: int) -> str:
        """How the weight is padded, for reports (``'padded in 196->224'``; '' if not)."""
        po, pi = self.sides(out_features, in_features)
        parts = [
            f"{side} {real}->{pad}"
            for side, real, pad in (("out", out_features, po), ("in", in_features, pi))
            if pad != real
        ]
        return "padded " + ", ".join(parts) if parts else ""

    @property
    def block_density(self) -> float:
        """Fraction of the (padded) weight the butterfly part keeps: ``(f + 1) / n``."""
        return (self.factors + 1) / self.butterfly

    def lowrank_density(self, in_features: int, out_features: int) -> float:
        po, pi = self.sides(out_features, in_features)
        return self.rank * (pi + po) / (in_features * out_features)

    def density(self, in_features: int, out_features: int) -> float:
        """Parameters (= FLOPs) kept relative to the dense (real, unpadded) weight, low-rank
        and padding included."""
        po, pi = self.sides(out_features, in_features)
        pad = po * pi / (out_features * in_features)
        return self.block_density * pad + self.lowrank_density(in_features, out_features)

    def unreached(self, out_features: int, in_features: int) -> str:
        """Why a padded pattern is not worth laying ('' if it is): a whole group of ``2^f``
        cells of padding on a side (the groups never mix, so it only adds density), a real
        output cell whose kept cells all lie in the input's padding (its outputs would see no
        input), or a real input cell read only by padded outputs.

        Example:
            >>> PatternSpec(12, 2, 32, padded_in=384).unreached(384, 196)
            "'in' padded 196->384: a whole group of 128 is padding"
            >>> PatternSpec(4, 2, 32, padded_in=256).unreached(256, 60)
            'output rows 192-255 read only padding'
            >>> PatternSpec(4, 1, 32, padded_in=256).unreached(384, 196)
            ''
        """
        po, pi = self.sides(out_features, in_features)
        n = self.butterfly
        groups = n >> self.factors
        for side, real, pad in (("out", out_features, po), ("in", in_features, pi)):
            if pad - real >= pad // groups:  # a smaller padding lays the same pattern
                return f"'{side}' padded {real}->{pad}: a whole group of {pad // groups} is padding"
        co, ci = po // n, pi // n
        steps = [0] + [1 << k for k in range(self.factors)]
        real_out = -(-out_features // co)  # cells holding a real row
        real_in = -(-in_features // ci)
        for a in range(real_out):
            if all((a ^ s) >= real_in for s in steps):
                return (
                    f"output rows {a * co}-{min((a + 1) * co, out_features) - 1} read only padding"
                )
        for j in range(real_in):
            if all((j ^ s) >= real_out for s in steps):
                return (
                    f"input columns {j * ci}-{min((j + 1) * ci, in_features) - 1} feed only padding"
                )
        return ""

    def misfit(self, out_features: int, in_features: int, block: int) -> str | None:
        """Why this pattern can't be laid on an ``out x in`` weight with hardware block
        ``block`` (None if it can)."""
        pb = self.pattern_block
        if pb % block or (pb // block) & (pb // block - 1):
            return f"pattern block {pb} is not a power-of-two multiple of block {block}"
        po, pi = self.sides(out_features, in_features)
        for side, size, pad in (("out", out_features, po), ("in", in_features, pi)):
            if pad < size:
                return f"padded '{side}'={pad} is smaller than the weight's {size}"
            if pad > MAX_PAD_RATIO * size:
                return f"padded '{side}'={pad} is more than {MAX_PAD_RATIO}x the weight's {size}"
            if pad % (self.butterfly * pb):
                what = f"'{side}'={size}" + (f" padded to {pad}" if pad != size else "")
                return (
                    f"{what} is not a multiple of butterfly {self.butterfly} x pattern block {pb}"
                )
        if self.rank > min(in_features, out_features):
            return f"rank {self.rank} exceeds min(in, out) = {min(in_features, out_features)}"
        return None

    def kept_blocks(self, out_features: int, in_features: int) -> int:
        """Number of stored ``pattern_block``-sized blocks (of the padded weight)."""
        po, pi = self.sides(out_features, in_features)
        ro, ci = po // self.pattern_block, pi // self.pattern_block
        return (self.factors + 1) * ro * ci // self.butterfly

    def kept_per_row(self, out_features: int, in_features: int) -> int:
        """Kept blocks along the narrow side for each block of the wide side: the inner
        length of the layer's batched matmul, which sets its cost more than density does."""
        narrow = min(self.sides(out_features, in_features)) // self.pattern_block
        return (self.factors + 1) * narrow // self.butterfly

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "butterfly": self.butterfly,
            "factors": self.factors,
            "pattern_block": self.pattern_block,
            "rank": self.rank,
        }
        if self.padded_out:
            d["padded_out"] = self.padded_out
        if self.padded_in:
            d["padded_in"] = self.padded_in
        return d


def pattern_mask(spec: PatternSpec, out_features: int, in_features: int) -> np.ndarray:
    """Boolean mask over ``pattern_block`` blocks of the (padded) weight, shape
    ``(padded out/pb, padded in/pb)``."""
    n, pb = spec.butterfly, spec.pattern_block
    po, pi = spec.sides(out_features, in_features)
    cell = np.ones(((po // n) // pb, (pi // n) // pb), dtype=bool)
    return np.kron(flat_butterfly(n, spec.factors), cell).astype(bool)


def block_mask(spec: PatternSpec, out_features: int, in_features: int, block: int) -> np.ndarray:
    """Boolean mask over hardware blocks, shape ``(out/block, in/block)`` (of the padded
    weight for a padded pattern: the mask is exact at block granularity there).

    Raises ValueError if the pattern does not fit the weight exactly.
    """
    why = spec.misfit(out_features, in_features, block)
    if why:
        raise ValueError(why)
    r = spec.pattern_block // block
    return np.kron(pattern_mask(spec, out_features, in_features), np.ones((r, r), dtype=bool))


def mask_density(mask: np.ndarray) -> float:
    return float(mask.sum()) / mask.size


# --------------------------------------------------------------------------------------------
# attention patterns (over sequence blocks)
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def attention_block_mask(n: int, factors: int, globals: int = 1) -> np.ndarray:
    """``n x n`` block mask of Pixelfly attention: the flat butterfly over sequence blocks
    plus ``globals`` global blocks (first rows attend everything, first columns are attended
    by everything), before causality.

    Example:
        >>> attention_block_mask(8, 2, 1)[5].astype(int).tolist()
        [1, 0, 0, 0, 1, 1, 0, 1]
    """
    check_butterfly(n, factors)
    if not 0 <= globals <= n:
        raise ValueError(f"globals must be in [0, {n}], got {globals}")
    m = flat_butterfly(n, factors).copy()
    m[:, :globals] = True
    m[:globals, :] = True
    m.setflags(write=False)
    return m


def attention_kept_blocks(n: int, factors: int, globals: int = 1, causal: bool = False) -> int:
    """``attention_block_mask(n, factors, globals)``'s kept blocks (in its lower triangle
    when ``causal``), counted in O(globals x factors) steps without building the mask.

    Example:
        >>> attention_kept_blocks(8, 2, 1) == int(attention_block_mask(8, 2, 1).sum())
        True
    """
    check_butterfly(n, factors)
    if not 0 <= globals <= n:
        raise ValueError(f"globals must be in [0, {n}], got {globals}")
    g = globals
    offsets = [0] + [1 << k for k in range(factors)]  # butterfly: j = i XOR offset
    if causal:
        # Butterfly cells with j <= i: the diagonal, and half of each offset's pairs. Global
        # rows add nothing below the diagonal that global columns do not; global columns
        # keep (i, j) for all i >= j. Butterfly cells in global columns are counted once.
        butterfly = n + factors * n // 2
        in_globals = sum(1 for j in range(g) for s in offsets if (j ^ s) >= j)
        return butterfly - in_globals + g * n - g * (g - 1) // 2
    # Global rows and columns: 2 g n - g^2 cells; butterfly cells outside them.
    butterfly = n * (factors + 1)
    in_rows = g * (factors + 1)  # rows i < g: f + 1 each (and by symmetry columns j < g)
    in_both = sum(1 for i in range(g) for s in offsets if (i ^ s) < g)
    return butterfly - (2 * in_rows - in_both) + 2 * g * n - g * g


@dataclass(frozen=True, order=True)
class AttentionSpec:
    """Hyperparameters of a Pixelfly attention pattern (sequence-independent).

    ``block``: tokens per sequence block; ``factors``: butterfly factors ``f`` over sequence
    blocks; ``globals``: number of global blocks ``g`` (first tokens attend everywhere and are
    attended by all).

    Example:
        >>> s = AttentionSpec(block=64, factors=4, globals=1)
        >>> round(s.density(4096), 4), round(s.density(4096, causal=True), 4)
        (0.1069, 0.1207)
    """

    block: int = 64
    factors: int = 4
    globals: int = 1

    def __post_init__(self) -> None:
        if self.block < 1:
            raise ValueError(f"attention block must be positive, got {self.block}")
        if not 1 <= self.factors <= 30:  # 2^30 sequence blocks is already absurd
            raise ValueError(f"attention factors must be in [1, 30], got {self.factors}")
        if self.globals < 0:
            raise ValueError(f"attention globals must be >= 0, got {self.globals}")

    def padded_seq(self, seq: int) -> int:
        """The sequence length the layout is built for: ``seq`` rounded up to a multiple
        of ``block * 2^factors``."""
        q = self.block << self.factors
        return -(-seq // q) * q

    def misfit(self, seq: int) -> str | None:
        """Why this pattern can't be laid on ``seq`` tokens (None if it can)."""
        n = self.padded_seq(seq) // self.block
        try:
            check_butterfly(n, self.factors)
        except ValueError as e:
            return str(e)
        if self.globals > n:
            return f"{self.globals} global blocks exceed the {n} blocks of {seq} tokens"
        return None

    def block_mask(self, seq: int, causal: bool = False) -> np.ndarray:
        """Kept blocks of the (padded) score matrix, ``[n, n]`` over sequence blocks."""
        m = attention_block_mask(self.padded_seq(seq) // self.block, self.factors, self.globals)
        return np.tril(m) if causal else m

    def density(self, seq: int, causal: bool = False) -> float:
        """Kept fraction of the score matrix's blocks (of the lower triangle's when causal).

        Counted, not read off the mask: planning asks this of sequences up to 2^24 tokens,
        whose ``n x n`` block mask would not fit in memory."""
        n = self.padded_seq(seq) // self.block
        kept = attention_kept_blocks(n, self.factors, self.globals, causal)
        return kept / (n * (n + 1) // 2 if causal else n * n)

    def compute_fraction(self, seq: int) -> float:
        """Work relative to dense attention over ``seq`` tokens (padding included, capped
        at 1): the density a plan counts for the scores and values GEMMs."""
        p = self.padded_seq(seq)
        return min(1.0, self.density(seq) * (p / seq) ** 2)

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.block, "factors": self.factors, "globals": self.globals}
