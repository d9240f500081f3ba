"""weight_use: what one torch function call does with a weight (the classification shared by
PixelflyWeight and the trace pass)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pxcompile.layers import PixelflyLinear
from pxcompile.nn.weight_use import weight_use
from pxcompile.patterns import PatternSpec

IN, OUT = 64, 128


def test_weight_use_classifies_plain_tensors_for_the_trace():
    W = torch.randn(OUT, IN)

    def orient(t):
        if t is W:
            return False
        return True if t is WT else None

    WT = W.t()
    x = torch.randn(2, IN)

    def use(func, *args, **kwargs):
        return weight_use(func, args, kwargs, orient)

    assert use(F.linear, x, W).kind == "gemm" and not use(F.linear, x, W).needs_t
    assert use(torch.Tensor.__matmul__, x, WT).needs_t
    assert use(torch.einsum, "bi,io->bo", x, WT).needs_t
    assert use(torch.Tensor.norm, W).kind == "dense"
    assert use(torch.Tensor.__getitem__, W, 0).kind == "dense"
    assert use(torch.Tensor.t, W).kind == "view" and use(torch.Tensor.t, W).run is None
    assert use(torch.Tensor.shape.__get__, W).kind == "meta"
    assert use(torch.Tensor.add_, W, 1).kind == "write"
    assert use(torch.relu, x).kind == "none"
    assert use(torch.einsum, "bi,bi->b", x, W).kind == "dense"  # not a linear map


def test_runs_only_for_a_pixelfly_weight_in_the_layer_orientation():
    lay = PixelflyLinear(IN, OUT, PatternSpec(4, 2, 16, 0))
    W = lay.weight

    def orient(t):
        return getattr(t, "transposed", None)

    x = torch.randn(2, IN)
    use = weight_use(F.linear, (x, W), {}, orient)
    assert use.kind == "gemm" and use.run is not None and use.weight is W
    torch.testing.assert_close(use.run(), F.linear(x, lay.dense_weight()))
    wrong = weight_use(torch.Tensor.__matmul__, (torch.randn(2, OUT), W), {}, orient)
    assert wrong.kind == "gemm" and wrong.needs_t and wrong.run is None  # runs dense
    assert weight_use(torch.Tensor.t, (W,), {}, orient).run().transposed
