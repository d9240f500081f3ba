"""PixelflyWeight: a sparse layer's dense weight that runs GEMMs through the layer's kernel
wherever it is used, answers metadata reads without computing anything, and materialises
(differentiably) only for real dense uses."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pxcompile.layers import PixelflyLinear
from pxcompile.nn import PixelflyWeight
from pxcompile.ops import PixelflyOp
from pxcompile.patterns import PatternSpec

IN, OUT = 64, 128


def layer(seed: int = 0) -> PixelflyLinear:
    torch.manual_seed(seed)
    lay = PixelflyLinear(IN, OUT, PatternSpec(4, 2, 16, 8))
    with torch.no_grad():  # a non-zero low-rank term, so that it shows in every check
        lay.lowrank_u.normal_(0, 0.1)
    return lay


def no_dense(monkeypatch) -> None:
    """Fail any materialisation of a PixelflyLinear's dense weight from now on."""

    def boom(self):
        raise AssertionError("the dense weight was materialised")

    monkeypatch.setattr(PixelflyLinear, "dense_weight", boom)


x3 = torch.randn(3, 5, IN)

# name -> (sparse use of W = layer.weight, same with the dense D); each returns [..., OUT]
FORMS = {
    "linear": (lambda W, b, x: F.linear(x, W, b), lambda D, b, x: F.linear(x, D, b)),
    "linear_other_bias": (
        lambda W, b, x: F.linear(x, W, b * 2),
        lambda D, b, x: F.linear(x, D, b * 2),
    ),
    "matmul_t": (lambda W, b, x: x @ W.t(), lambda D, b, x: x @ D.t()),
    "torch_matmul_T": (lambda W, b, x: torch.matmul(x, W.T), lambda D, b, x: x @ D.T),
    "mT": (lambda W, b, x: x.matmul(W.mT), lambda D, b, x: x @ D.T),
    "transpose": (lambda W, b, x: x @ W.transpose(-2, -1), lambda D, b, x: x @ D.T),
    "transpose_10": (lambda W, b, x: x @ W.transpose(1, 0), lambda D, b, x: x @ D.T),
    "permute": (lambda W, b, x: x @ W.permute(1, 0), lambda D, b, x: x @ D.T),
    "mm": (lambda W, b, x: torch.mm(x[0], W.t()), lambda D, b, x: x[0] @ D.T),
    "addmm": (
        lambda W, b, x: torch.addmm(b, x[0], W.t()),
        lambda D, b, x: torch.addmm(b, x[0], D.t()),
    ),
    "addmm_scaled": (
        lambda W, b, x: torch.addmm(b, x[0], W.t(), beta=0.5, alpha=2.0),
        lambda D, b, x: torch.addmm(b, x[0], D.t(), beta=0.5, alpha=2.0),
    ),
    "einsum_oi": (
        lambda W, b, x: torch.einsum("...i,oi->...o", x, W),
        lambda D, b, x: x @ D.T,
    ),
    "einsum_io": (
        lambda W, b, x: torch.einsum("bsi,io->bso", x, W.t()),
        lambda D, b, x: x @ D.T,
    ),
    "einsum_weight_first": (
        lambda W, b, x: torch.einsum("oi,bsi->bso", W, x),
        lambda D, b, x: x @ D.T,
    ),
    "w_first": (lambda W, b, x: (W @ x.mT).mT, lambda D, b, x: x @ D.T),
    "mv": (lambda W, b, x: torch.mv(W, x[0, 0]), lambda D, b, x: D @ x[0, 0]),
    "no_op_views": (
        lambda W, b, x: F.linear(x, W.contiguous().float().to(torch.float32).view(OUT, IN)),
        lambda D, b, x: x @ D.T,
    ),
}


def _grads(y, tensors):
    return torch.autograd.grad(y.square().sum(), tensors, allow_unused=True)


@pytest.mark.parametrize("form", list(FORMS))
def test_gemms_run_the_sparse_kernel(form, monkeypatch):
    sparse, dense = FORMS[form]
    lay = layer()
    x = x3.clone().requires_grad_(True)
    b = lay.bias
    want = dense(lay.dense_weight(), b, x)
    params = [x, lay.blocks, lay.lowrank_u, lay.lowrank_v, lay.bias]
    gw = _grads(want, params)
    no_dense(monkeypatch)
    got = sparse(lay.weight, b, x)
    gg = _grads(got, params)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for a, c in zip(gg, gw):
        if c is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


def test_metadata_reads_stay_sparse(monkeypatch):
    lay = layer()
    no_dense(monkeypatch)
    w = lay.weight
    assert isinstance(w, torch.Tensor) and isinstance(w, PixelflyWeight)
    assert w.shape == (OUT, IN) and w.size() == (OUT, IN) and w.size(1) == IN
    assert w.dim() == w.ndim == 2 and len(w) == OUT and w.numel() == OUT * IN
    assert w.dtype == torch.float32 and w.device == torch.device("cpu") and w.requires_grad
    assert w.is_floating_point() and not w.is_cuda and w.is_contiguous()
    assert w.t().shape == w.T.shape == w.mT.shape == (IN, OUT) and w.t().t().shape == (OUT, IN)
    assert w.t().layer is lay and w.t().t().transposed is False
    assert w.float() is w and w.to(torch.float32) is w and w.type_as(x3) is w
    assert w.reshape(OUT, -1) is w and w.view_as(torch.empty(OUT, IN)) is w
    assert w.grad is None and w.is_leaf
    assert lay.weight is w  # made once
    assert "PixelflyWeight(out=128, in=64" in repr(w) and f"{w}" == repr(w)
    # metadata follows the layer: dtype / requires_grad changed after the weight was made
    lay.double().requires_grad_(False)
    assert w.dtype == torch.float64 and not w.requires_grad
    assert x3.to(w.dtype).dtype == torch.float64  # Hugging Face T5's cast
    assert hash(w) == id(w) and {w: 1}[w] == 1


def test_other_uses_materialise_differentiably():
    lay = layer()
    params = [lay.blocks, lay.lowrank_u, lay.lowrank_v]
    y = torch.randn(2, OUT)
    for f in (
        lambda W: (W * 2).sum(),
        lambda W: W.norm(),
        lambda W: W[:4].sum(),
        lambda W: W.to(torch.float64).sum(),
        lambda W: (y @ W).square().sum(),  # GEMMs that take it the other way round
        lambda W: F.linear(y, W.t()).square().sum(),
    ):
        got, want = f(lay.weight), f(lay.dense_weight())
        torch.testing.assert_close(got, want.to(got.dtype))
        for a, c in zip(_grads(got, params), _grads(want, params)):
            torch.testing.assert_close(a, c)


def test_in_place_writes_raise():
    w = layer().weight
    for f in (lambda: w.add_(1), lambda: w.zero_(), lambda: w.__setitem__(0, 1.0)):
        with pytest.raises(RuntimeError, match="no dense storage"):
            f()
    with pytest.raises(RuntimeError, match="no dense storage"):
        torch.mm(torch.randn(2, OUT), torch.randn(OUT, IN), out=w)


def test_data_is_a_detached_weight_that_refuses_writes():
    """``weight.data`` (what Hugging Face's ``_init_weights`` writes into): reads give the
    dense values without gradient; writes raise like writes into the weight itself, where a
    plain materialised copy would take them and lose them silently."""
    lay = layer()
    d = lay.weight.data
    assert isinstance(d, PixelflyWeight) and not d.requires_grad and d.shape == (OUT, IN)
    torch.testing.assert_close(d.clone(), lay.dense_weight().detach())
    assert not d.clone().requires_grad and not d.t().requires_grad
    x = torch.randn(3, IN)
    y = F.linear(x, d)
    assert not y.requires_grad
    torch.testing.assert_close(y, F.linear(x, lay.weight).detach())
    before = {k: v.clone() for k, v in lay.state_dict().items()}
    for f in (
        lambda: lay.weight.data.normal_(0.0, 0.02),
        lambda: lay.weight.data.zero_(),
        lambda: lay.weight.data.t().fill_(1.0),
        lambda: lay.weight.data.copy_(torch.zeros(OUT, IN)),
    ):
        with pytest.raises(RuntimeError, match="no dense storage; change its blocks"):
            f()
    for k, v in lay.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert copy.deepcopy(d).detached


class Owner(nn.Module):
    """What the rewrite makes of a module with a bare parameter ``w`` used as ``x @ w``."""

    def __init__(self):
        super().__init__()
        self.w_pixelfly = layer()
        self.w = self.w_pixelfly.weight_view(True)  # a plain attribute, not a parameter

    def forward(self, x):
        return x @ self.w


def test_module_copy_pickle_and_state_dict():
    m = Owner()
    assert set(m.state_dict()) == {
        "w_pixelfly.blocks",
        "w_pixelfly.lowrank_u",
        "w_pixelfly.lowrank_v",
        "w_pixelfly.bias",
    }
    assert [n for n, _ in m.named_parameters()] == list(m.state_dict())
    c = copy.deepcopy(m)
    assert c.w.layer is c.w_pixelfly and c.w_pixelfly is not m.w_pixelfly and c.w.transposed
    assert c.w_pixelfly.weight.layer is c.w_pixelfly
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert back.w.layer is back.w_pixelfly and back.w.shape == (IN, OUT)
    x = torch.randn(2, IN)
    torch.testing.assert_close(back(x), m(x))
    torch.testing.assert_close(c(x), m(x))


def test_under_inference_mode_and_no_grad():
    lay = layer()
    x = torch.randn(4, IN)
    want = lay(x)
    with torch.inference_mode():
        torch.testing.assert_close(F.linear(x, lay.weight, lay.bias), want)
        w = layer(1).weight  # made inside inference mode
        assert w.shape == (OUT, IN)
    with torch.no_grad():
        torch.testing.assert_close(x @ lay.weight.T + lay.bias, want)


def test_op_stand_in_has_the_same_weight():
    lay = layer()
    op = PixelflyOp(lay)
    x = torch.randn(4, IN)
    torch.testing.assert_close(F.linear(x, op.weight, op.bias), lay(x))
    torch.testing.assert_close(op.dense_weight(), lay.dense_weight(), rtol=1e-5, atol=1e-6)
    assert op.weight.shape == (OUT, IN) and op.in_features == IN and op.out_features == OUT


def test_export_of_functional_uses_calls_the_custom_op():
    """What pxcompile.save exports: the layers stood in for by PixelflyOp, whose weight's
    GEMMs call the op (the rewrite tests save and load whole models)."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = PixelflyOp(layer())
            self.proj_pixelfly = PixelflyOp(PixelflyLinear(OUT, IN, PatternSpec(4, 2, 16, 0)))
            self.proj = self.proj_pixelfly.weight_view(True)  # a replaced bare parameter

        def forward(self, x):
            return F.linear(x, self.qkv.weight, self.qkv.bias) @ self.proj

    m = M().eval()
    x = torch.randn(2, 4, IN)
    ep = torch.export.export(m, (x,), strict=False)
    ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert ops == ["pxcompile.pixelfly_linear.default"] * 2, ops
    torch.testing.assert_close(ep.module()(x), m(x))


@pytest.mark.slow
def test_torch_compile_traces_functional_uses():
    """Dynamo inlines the weight's __torch_function__: under torch.compile its GEMMs run the
    layer's code as the module call does, with no graph break."""
    import torch._dynamo

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = layer()

        def forward(self, x):
            return F.linear(x, self.qkv.weight, self.qkv.bias) + x.sum(-1, keepdim=True)

    m = M()
    x = torch.randn(2, 4, IN, requires_grad=True)
    want = m(x)
    gw = torch.autograd.grad(want.square().sum(), [x, *m.parameters()])
    torch._dynamo.reset()
    explain = torch._dynamo.explain(m)(x)
    assert explain.graph_break_count == 0
    got = torch.compile(m)(x)
    gg = torch.autograd.grad(got.square().sum(), [x, *m.parameters()])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for a, b in zip(gg, gw):  # float32 sums in another order
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
