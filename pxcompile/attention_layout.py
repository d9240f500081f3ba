"""The Pixelfly attention layout: which key blocks each query block keeps.

The one source of truth for the pattern (see :mod:`pxcompile.attention` for its definition):
:func:`attention_layout` gives a :class:`BlockLayout`, from which every kernel (CPU:
:mod:`pxcompile.kernels.cpu.attention`, Triton: :mod:`pxcompile.kernels.triton.attention`)
and the masked-dense reference derive their index tables and masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from pxcompile.patterns import AttentionSpec, attention_block_mask

__all__ = ["BlockLayout", "attention_layout"]


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Which key blocks each query block keeps: ``mask[i, j]`` over ``n x n`` blocks."""

    seq: int
    block: int
    factors: int
    globals: int
    mask: np.ndarray  # [n, n] bool, before causality

    @property
    def n(self) -> int:
        return self.seq // self.block

    def block_mask(self, causal: bool = False) -> np.ndarray:
        m = self.mask
        return np.tril(m) if causal else m

    def density(self, causal: bool = False) -> float:
        """Kept blocks / all blocks (/ lower-triangle blocks when causal)."""
        n = self.n
        total = n * (n + 1) // 2 if causal else n * n
        return float(self.block_mask(causal).sum()) / total

    def is_full(self, causal: bool = False) -> bool:
        n = self.n
        return bool(self.block_mask(causal).sum() == (n * (n + 1) // 2 if causal else n * n))

    def element_mask(self, causal: bool = False) -> Tensor:
        """``[seq, seq]`` boolean mask (True = attend) equal to what the kernel computes."""
        b = self.block
        m = torch.from_numpy(np.kron(self.block_mask(causal), np.ones((b, b), dtype=bool)))
        if causal:
            m &= torch.ones(self.seq, self.seq, dtype=torch.bool).tril()
        return m

    def key_blocks(self, causal: bool = False) -> list[list[int]]:
        """Per query block, its kept key blocks (ascending)."""
        m = self.block_mask(causal)
        return [np.flatnonzero(r).tolist() for r in m]


@lru_cache(maxsize=64)
def attention_layout(seq: int, block: int, factors: int, globals: int = 1) -> BlockLayout:
    """The Pixelfly attention layout for ``seq`` tokens (``seq / block`` must be a multiple
    of ``2^factors``).

    Example:
        >>> lay = attention_layout(512, 64, 2, 1)
        >>> lay.key_blocks()[5]
        [0, 4, 5, 7]
    """
    if seq % block:
        raise ValueError(f"sequence length {seq} is not a multiple of block {block}")
    return BlockLayout(
        seq, block, factors, globals, attention_block_mask(seq // block, factors, globals)
    )


def spec_layout(spec: AttentionSpec, seq: int) -> BlockLayout:
    """The layout ``spec`` runs over ``seq`` tokens (padded up to its block grid)."""
    return attention_layout(spec.padded_seq(seq), spec.block, spec.factors, spec.globals)
