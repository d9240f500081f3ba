"""Fixed sparsity patterns for the pattern-component experiments (figures 06 and 12), run as
masked dense math: a layer ``y = x (M * W)^T + (x V^T) U^T + b`` with a fixed element mask
``M`` built from a cell mask, and an optional low-rank term.

Cell masks are ``n x n`` boolean grids (a power-of-two ``n`` is not needed except for the
butterfly) stretched onto an ``out x in`` weight: each cell covers ``out/n x in/n`` elements,
as the Pixelfly reference stretches its square pattern onto rectangles.

* :func:`band_cells` -- **local**: a circular band of ``width`` cells per row
  (offsets ``-(width-1)//2 .. width//2``).
* :func:`butterfly_cells` -- the flat block **butterfly** (``pxcompile.patterns``).
* :func:`random_cells` -- ``count`` **random** cells anywhere (fixed seed).
* ``rank`` -- the **global** low-rank term ``U V^T``.

:class:`MaskedLinear` computes the same function as a block-sparse layer with that pattern
(the masked-out weights are zero and get zero gradient), so it measures what a pattern costs in
accuracy, not its speed: its training step is a dense one plus a mask multiply.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pxcompile.patterns import flat_butterfly


def band_cells(n: int, width: int) -> np.ndarray:
    """Circular band: row ``i`` keeps columns ``i + o mod n`` for ``o`` in
    ``-(width-1)//2 .. width//2`` (``width`` cells per row and per column)."""
    if not 1 <= width <= n:
        raise ValueError(f"band width must be in 1..{n}, got {width}")
    m = np.zeros((n, n), dtype=bool)
    for o in range(-((width - 1) // 2), width // 2 + 1):
        m[np.arange(n), (np.arange(n) + o) % n] = True
    return m


def butterfly_cells(n: int, factors: int) -> np.ndarray:
    """The flat block butterfly with ``factors`` factors (``factors + 1`` cells per row)."""
    return np.array(flat_butterfly(n, factors), dtype=bool)


def random_cells(n: int, count: int, seed: int) -> np.ndarray:
    """``count`` cells of the ``n x n`` grid drawn uniformly without replacement."""
    if not 0 <= count <= n * n:
        raise ValueError(f"count must be in 0..{n * n}, got {count}")
    rng = np.random.default_rng(seed)
    m = np.zeros(n * n, dtype=bool)
    m[rng.choice(n * n, size=count, replace=False)] = True
    return m.reshape(n, n)


def stretch(cells: np.ndarray, out_features: int, in_features: int) -> torch.Tensor:
    """The element mask ``[out, in]`` of a cell mask (each cell ``out/n x in/n``)."""
    r, c = cells.shape
    if out_features % r or in_features % c:
        raise ValueError(f"{out_features}x{in_features} is not a multiple of the {r}x{c} grid")
    ones = np.ones((out_features // r, in_features // c), dtype=bool)
    return torch.as_tensor(np.kron(cells, ones))


class MaskedLinear(nn.Module):
    """``nn.Linear`` with a fixed element ``mask`` (None: no sparse part) plus a rank-``rank``
    term ``U V^T``; masked dense math.

    Init (the rule ``PixelflyLinear.reset_parameters`` uses, for any pattern): the output has
    the variance of a fresh ``nn.Linear``'s, split between the parts by their share of the
    parameters; the sparse part is Kaiming-uniform with each row scaled by ``sqrt(in / kept in
    the row)``, times ``sqrt(1 - share)``; ``V`` Kaiming-uniform, ``U`` uniform with variance
    ``share / rank``.
    """

    def __init__(
        self, in_features: int, out_features: int, mask: torch.Tensor | None, rank: int = 0
    ) -> None:
        super().__init__()
        if mask is None and rank <= 0:
            raise ValueError("MaskedLinear needs a mask, a rank, or both")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kept = 0 if mask is None else int(mask.sum())
        lowrank = rank * (in_features + out_features)
        share = lowrank / (kept + lowrank)
        bound = 1.0 / math.sqrt(in_features)
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        if mask is not None:
            if tuple(mask.shape) != (out_features, in_features):
                raise ValueError(
                    f"mask shape {tuple(mask.shape)} != ({out_features}, {in_features})"
                )
            self.register_buffer("mask", mask.to(torch.bool))
            row = mask.sum(1, keepdim=True).clamp(min=1).float()
            scale = (in_features / row).sqrt() * math.sqrt(1.0 - share)
            w = torch.empty(out_features, in_features).uniform_(-bound, bound) * scale
            self.weight = nn.Parameter(w * mask)
        else:
            self.register_buffer("mask", None)
            self.register_parameter("weight", None)
        if rank > 0:
            self.lowrank_v = nn.Parameter(torch.empty(rank, in_features).uniform_(-bound, bound))
            ub = math.sqrt(3.0 * share / rank)
            self.lowrank_u = nn.Parameter(torch.empty(out_features, rank).uniform_(-ub, ub))
        else:
            self.register_parameter("lowrank_u", None)
            self.register_parameter("lowrank_v", None)

    @property
    def kept(self) -> int:
        """Parameters of the weight (kept entries plus the low-rank factors), bias excluded."""
        k = 0 if self.mask is None else int(self.mask.sum())
        return k + self.rank * (self.in_features + self.out_features)

    @property
    def density(self) -> float:
        return self.kept / (self.in_features * self.out_features)

    def dense_weight(self) -> torch.Tensor:
        w = self.weight * self.mask if self.weight is not None else 0.0
        if self.rank > 0:
            w = w + self.lowrank_u @ self.lowrank_v
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, density={self.density:.4f}"
        )


def replace_linear(model: nn.Module, name: str, layer: nn.Module) -> None:
    """Set the submodule at dotted ``name`` to ``layer``."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, layer)
