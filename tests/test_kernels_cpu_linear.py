"""pxcompile.kernels.cpu.linear: the block layout's addressing (the kernels themselves are
tested through PixelflyLinear in tests/test_layers.py)."""

from __future__ import annotations

import pytest
import torch

from pxcompile.kernels.cpu.linear import make_layout, xor_index
from pxcompile.layers import PixelflyLinear
from pxcompile.patterns import PatternSpec


@pytest.mark.parametrize(
    ("fin", "fout", "spec"),
    [
        (64, 128, PatternSpec(4, 2, 8, 0)),  # gather, cells 16 x 8
        (128, 64, PatternSpec(4, 2, 8, 0)),  # scatter, cells 8 x 16
        (96, 96, PatternSpec(4, 1, 8, 0)),  # gather, square cells
        (192, 96, PatternSpec(12, 2, 8, 0)),  # scatter, n not a power of two
    ],
)
def test_cell_strides_address_every_kept_element(fin, fout, spec):
    """``Layout.cell_strides`` (what the Triton kernel reads) finds each kept cell's elements
    in ``blocks``, for the weight and for its transpose, with the same ``xor_index`` table."""
    layer = PixelflyLinear(fin, fout, spec, bias=False, dtype=torch.float64)
    lo = make_layout(spec, fout, fin)
    assert lo == layer.layout
    flat = layer.blocks.detach().reshape(-1)
    w = layer.block_weight().detach()
    idx = xor_index(spec.butterfly, spec.factors)
    o = torch.arange(lo.c_out)[:, None]
    c = torch.arange(lo.c_in)[None, :]
    s_a, s_j, s_k, s_o, s_c = lo.cell_strides(False)
    t_a, t_j, t_k, t_o, t_c = lo.cell_strides(True)
    seen = torch.zeros_like(flat, dtype=torch.bool)
    for a in range(lo.n):
        for k in range(lo.f1):
            j = int(idx[a, k])
            got = flat[a * s_a + j * s_j + k * s_k + o * s_o + c * s_c]  # cell (a, j)
            want = w[a * lo.c_out : (a + 1) * lo.c_out, j * lo.c_in : (j + 1) * lo.c_in]
            assert torch.equal(got, want)
            seen[a * s_a + j * s_j + k * s_k + o * s_o + c * s_c] = True
            # transposed: input cell a, its k-th kept cell (j, a), element (o < c_in, c < c_out)
            got_t = flat[a * t_a + j * t_j + k * t_k + c.t() * t_o + o.t() * t_c]
            want_t = w[j * lo.c_out : (j + 1) * lo.c_out, a * lo.c_in : (a + 1) * lo.c_in].t()
            assert torch.equal(got_t, want_t)
    assert bool(seen.all())  # every stored element is some kept cell's
