"""The block butterfly as a *product* of sparse factors (the form Pixelfly flattens), for the
flat-versus-product speed comparison (figure 11).

An ``N x N`` block butterfly with ``b x b`` blocks has ``n = N / b`` block rows and ``log2(n)``
factors; factor ``k`` (stride ``s = 2^k`` blocks) keeps block ``(i, j)`` when ``i XOR j`` is
0 or ``s``: block rows pair up as ``(i, i XOR s)``, and each pair is one dense ``2b x 2b``
matrix. :func:`butterfly_factor` applies one factor to ``x [M, N]`` as one batched matmul
over the ``n / 2`` pairs (``[n/2, M, 2b] @ [n/2, 2b, 2b]``), with the permutations that
bring each pair's blocks together and back; :class:`ProductButterfly` applies the
``log2(n)`` factors one after the other (strides 1, 2, ..., n/2). Autograd gives the
backward (``bmm`` and the permutations).

Its flat counterpart is ``PixelflyLinear`` with ``PatternSpec(n, log2(n), b, rank=0)``: the
*sum* of the same factors' supports (``i XOR j`` in ``{0, 1, 2, ..., n/2}``) in one
block-sparse multiply.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def butterfly_factor(x: torch.Tensor, w: torch.Tensor, stride: int, block: int) -> torch.Tensor:
    """``x [M, N] -> [M, N]`` through one block butterfly factor: ``w [n/2, 2b, 2b]`` holds
    the ``(in, out)`` matrix of each pair of block rows ``(i, i XOR stride)``, pairs ordered
    by (group of ``2 * stride`` blocks, position in the group's first half)."""
    m, size = x.shape
    n = size // block
    g = n // (2 * stride)
    xv = x.reshape(m, g, 2, stride, block).permute(1, 3, 0, 2, 4).reshape(n // 2, m, 2 * block)
    y = torch.bmm(xv, w)
    return y.reshape(g, stride, m, 2, block).permute(2, 0, 3, 1, 4).reshape(m, size)


def factor_dense(w: torch.Tensor, stride: int, block: int) -> torch.Tensor:
    """The ``[N, N]`` matrix ``F`` of one factor (``butterfly_factor(x) == x @ F``)."""
    size = w.shape[0] * 2 * block
    return butterfly_factor(torch.eye(size, dtype=w.dtype), w, stride, block)


class ProductButterfly(nn.Module):
    """``y = x F_0 F_1 ... F_{log2(n)-1} + bias``: the block butterfly on ``size`` features
    as a product of its ``log2(size / block)`` factors (see the module docstring).

    Init: each pair matrix uniform with variance ``1 / (2b)`` (its fan-in), so each factor
    keeps the activations' variance.
    """

    def __init__(self, size: int, block: int, bias: bool = True) -> None:
        super().__init__()
        n = size // block
        if size % block or n < 2 or n & (n - 1):
            raise ValueError(f"size {size} / block {block} must be a power of two >= 2")
        self.size, self.block, self.n = size, block, n
        self.nfactors = int(math.log2(n))
        bound = math.sqrt(3.0 / (2 * block))
        self.factors = nn.ParameterList(
            nn.Parameter(torch.empty(n // 2, 2 * block, 2 * block).uniform_(-bound, bound))
            for _ in range(self.nfactors)
        )
        self.bias = nn.Parameter(torch.zeros(size)) if bias else None

    def strides(self) -> list[int]:
        return [1 << k for k in range(self.nfactors)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = x.reshape(-1, self.size)
        for w, s in zip(self.factors, self.strides()):
            y = butterfly_factor(y, w, s, self.block)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.size)

    def dense_weight(self) -> torch.Tensor:
        """``F_0 F_1 ...`` as a dense ``[in, out]`` matrix (``y = x @ W + bias``)."""
        w = torch.eye(self.size, dtype=self.factors[0].dtype)
        for f, s in zip(self.factors, self.strides()):
            w = w @ factor_dense(f.detach(), s, self.block)
        return w

    def flops(self, rows: int) -> int:
        """Forward multiply-add FLOPs (2 per MAC) for ``rows`` rows."""
        return 2 * rows * self.nfactors * (self.n // 2) * (2 * self.block) ** 2
