"""PixelflyLinear against the masked-dense reference: outputs, every gradient, every path.

No test here is timed (see benchmarks/bench_layer.py for speed). The compiled path is only
exercised by the tests that name it. Layers here run the gather kernel unless a test asks for
the grouped one (the ``path`` fixture's "grouped" entry; tests/test_kernels_cpu_grouped.py
checks it on its own): the cost model would pick grouped for most of these tiny layers.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from pxcompile import layers as L
from pxcompile.kernels.cpu import linear as K
from pxcompile.layers import PixelflyLinear, masked_dense_reference
from pxcompile.patterns import PatternSpec, block_mask

# (in, out, spec): square, wide-out (gather mode), wide-in (scatter mode), cells of several
# blocks on both sides, rank 0 and rank > 0.
CASES = [
    (64, 128, PatternSpec(4, 2, 8, 4)),
    (128, 64, PatternSpec(4, 2, 8, 4)),
    (64, 64, PatternSpec(8, 3, 8, 0)),
    (96, 384, PatternSpec(4, 1, 8, 3)),
    (384, 96, PatternSpec(4, 1, 8, 0)),
    (192, 96, PatternSpec(12, 2, 8, 5)),
    (128, 256, PatternSpec(8, 2, 16, 8)),
]
CASE_IDS = [f"{i}x{o}-n{s.butterfly}f{s.factors}pb{s.pattern_block}r{s.rank}" for i, o, s in CASES]

# Every path the dispatch can take, forced (name, path, tile_rows, WORKSPACE_MIN_ROWS): the
# test sizes are small, so workspaces are forced on (0) or off (huge) explicitly.
PATHS = [
    ("eager", "eager", 0, 0),
    ("eager-tiled", "eager", 16, 0),
    ("eager-fresh", "eager", 0, 10**9),
    ("eager-tiled-fresh", "eager", 16, 10**9),
    ("grouped", "eager", 0, 0),
]


def _reference(layer: PixelflyLinear):
    w = layer.block_weight().detach().clone().requires_grad_(True)
    b = None if layer.bias is None else layer.bias.detach().clone().requires_grad_(True)
    u = v = None
    if layer.lowrank_u is not None:
        u = layer.lowrank_u.detach().clone().requires_grad_(True)
        v = layer.lowrank_v.detach().clone().requires_grad_(True)
    return masked_dense_reference(w, b, layer.spec, u, v), w, b, u, v


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


def _check_against_reference(layer, x, tol=1e-4):
    ref, w, b, u, v = _reference(layer)
    x1 = x.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y = layer(x1)
    yr = ref(x2)
    assert y.shape == yr.shape
    assert _rel(y, yr) < tol
    gy = torch.randn_like(yr)
    y.backward(gy)
    yr.backward(gy)
    assert _rel(x1.grad, x2.grad) < tol
    # blocks' gradient, seen through the dense weight, is the masked dense gradient
    mask = layer.mask()
    g_blocks_dense = _grad_of_blocks_as_dense(layer)
    assert _rel(g_blocks_dense, w.grad * mask) < tol
    if layer.bias is not None:
        assert _rel(layer.bias.grad, b.grad) < tol
    if u is not None:
        assert _rel(layer.lowrank_u.grad, u.grad) < tol
        assert _rel(layer.lowrank_v.grad, v.grad) < tol


def _grad_of_blocks_as_dense(layer: PixelflyLinear) -> torch.Tensor:
    """Scatter ``blocks.grad`` into an ``[out, in]`` matrix with the layer's own layout."""
    probe = PixelflyLinear(
        layer.in_features, layer.out_features, layer.spec, bias=False, dtype=layer.blocks.dtype
    )
    with torch.no_grad():
        probe.blocks.copy_(layer.blocks.grad)
    return probe.block_weight()


@pytest.fixture(autouse=True)
def _gather_kernel(monkeypatch):
    monkeypatch.setattr(L, "cpu_execution", lambda *a, **k: "gather")


@pytest.fixture(params=PATHS, ids=[p[0] for p in PATHS])
def path(request, monkeypatch, _gather_kernel):
    name, p, tile, ws_rows = request.param
    monkeypatch.setattr(K, "WORKSPACE_MIN_ROWS", ws_rows)
    kernel = "grouped" if name == "grouped" else "gather"
    monkeypatch.setattr(L, "cpu_execution", lambda *a, **k: kernel)
    return name, p, tile


@pytest.mark.parametrize(("fin", "fout", "spec"), CASES, ids=CASE_IDS)
def test_matches_masked_dense(fin, fout, spec, path):
    torch.manual_seed(0)
    _, p, tile = path
    layer = PixelflyLinear(fin, fout, spec)
    layer.path, layer.tile_rows = p, tile
    x = torch.randn(37, fin)
    _check_against_reference(layer, x)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("fin", "fout"), [(64, 128), (128, 64)])
def test_gradcheck_float64(fin, fout, bias, path):
    torch.manual_seed(0)
    _, p, tile = path
    layer = PixelflyLinear(fin, fout, PatternSpec(4, 2, 8, 3), bias=bias, dtype=torch.float64)
    layer.path, layer.tile_rows = p, (tile and 2)
    x = torch.randn(5, fin, dtype=torch.float64, requires_grad=True)
    params = tuple(pp for pp in layer.parameters())

    def fn(x, *ps):
        return layer(x)

    # fast mode checks random projections of the Jacobian (the full one is slow here)
    assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=True)


@pytest.mark.parametrize(("fin", "fout", "rank"), [(16, 32, 2), (32, 16, 0)])
def test_gradcheck_full_jacobian_float64(fin, fout, rank):
    torch.manual_seed(0)
    layer = PixelflyLinear(fin, fout, PatternSpec(4, 1, 4, rank), dtype=torch.float64)
    layer.tile_rows = 0
    x = torch.randn(3, fin, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *ps: layer(x), (x, *layer.parameters()))


def test_3d_and_noncontiguous_inputs(path):
    torch.manual_seed(0)
    _, p, tile = path
    layer = PixelflyLinear(128, 64, PatternSpec(4, 2, 8, 4))
    layer.path, layer.tile_rows = p, tile
    ref, *_ = _reference(layer)
    x3 = torch.randn(3, 11, 128)
    assert torch.allclose(layer(x3), ref(x3), rtol=1e-4, atol=1e-5)
    xt = torch.randn(128, 20).t()  # non-contiguous 2-D
    assert not xt.is_contiguous()
    assert torch.allclose(layer(xt), ref(xt), rtol=1e-4, atol=1e-5)
    xs = torch.randn(4, 9, 256)[:, :, ::2]  # strided last dim, 3-D
    assert torch.allclose(layer(xs), ref(xs), rtol=1e-4, atol=1e-5)
    _check_against_reference(layer, torch.randn(64, 6, 128).transpose(0, 1))


@pytest.mark.parametrize(("fin", "fout"), [(64, 128), (128, 64)])
def test_one_row_and_1d(fin, fout, path):
    torch.manual_seed(0)
    _, p, tile = path
    layer = PixelflyLinear(fin, fout, PatternSpec(4, 2, 8, 4))
    layer.path, layer.tile_rows = p, tile
    _check_against_reference(layer, torch.randn(1, fin))
    ref, *_ = _reference(layer)
    x = torch.randn(fin)
    assert layer(x).shape == (fout,)
    assert torch.allclose(layer(x), ref(x), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(layer(x[None]), ref(x[None]), rtol=1e-4, atol=1e-5)


def test_no_grad_inference_matches(path):
    torch.manual_seed(0)
    _, p, tile = path
    layer = PixelflyLinear(64, 128, PatternSpec(4, 2, 8, 4))
    layer.path, layer.tile_rows = p, tile
    ref, *_ = _reference(layer)
    for m in (1, 3, 64, 100):
        x = torch.randn(m, 64)
        with torch.no_grad():
            assert torch.allclose(layer(x), ref(x), rtol=1e-4, atol=1e-5)
        with torch.inference_mode():
            assert torch.allclose(layer(x), ref(x), rtol=1e-4, atol=1e-5)


def test_empty_input():
    layer = PixelflyLinear(64, 128, PatternSpec(4, 2, 8, 4))
    assert layer(torch.randn(0, 64)).shape == (0, 128)
    assert layer(torch.randn(2, 0, 64)).shape == (2, 0, 128)


def test_frozen_parts_and_input_without_grad(path):
    """Gradients for only some inputs (e.g. the first layer, frozen blocks)."""
    torch.manual_seed(0)
    _, p, tile = path
    layer = PixelflyLinear(64, 128, PatternSpec(4, 2, 8, 4))
    layer.path, layer.tile_rows = p, tile
    ref, w, b, u, v = _reference(layer)
    layer.blocks.requires_grad_(False)
    x = torch.randn(20, 64)
    layer(x).sum().backward()
    ref(x).sum().backward()
    assert layer.blocks.grad is None
    assert _rel(layer.lowrank_u.grad, u.grad) < 1e-4
    assert _rel(layer.bias.grad, b.grad) < 1e-4


@pytest.mark.parametrize(("fin", "fout"), [(64, 128), (128, 64)])
def test_input_gradient_only(fin, fout, path):
    """Every parameter frozen: only the input's gradient (nothing saved for the weights)."""
    torch.manual_seed(0)
    _, p, tile = path
    layer = PixelflyLinear(fin, fout, PatternSpec(4, 2, 8, 4))
    layer.path, layer.tile_rows = p, tile
    layer.requires_grad_(False)
    ref, *_ = _reference(layer)
    x1 = torch.randn(50, fin, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    gy = torch.randn(50, fout)
    layer(x1).backward(gy)
    ref(x2).backward(gy)
    assert _rel(x1.grad, x2.grad) < 1e-4


@pytest.mark.parametrize(("fin", "fout"), [(64, 128), (128, 64)])
def test_bfloat16(fin, fout):
    torch.manual_seed(0)
    layer = PixelflyLinear(fin, fout, PatternSpec(4, 2, 8, 4))
    layer.tile_rows = 0
    ref, *_ = _reference(layer)
    x = torch.randn(10, fin)
    lb = layer.to(torch.bfloat16)
    xb = x.to(torch.bfloat16).requires_grad_(True)
    y = lb(xb)
    assert y.dtype == torch.bfloat16
    assert _rel(y.float(), ref(x)) < 3e-2
    y.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16
    assert lb.blocks.grad.dtype == torch.bfloat16


def test_from_dense_copies_blocks_exactly():
    torch.manual_seed(0)
    for fin, fout, spec in CASES:
        w = torch.randn(fout, fin)
        b = torch.randn(fout)
        layer = PixelflyLinear.from_dense(w, b, spec)
        mask = layer.mask()
        assert torch.equal(layer.block_weight(), w * mask)
        assert torch.equal(layer.bias, b)
        assert layer.init_error is not None and 0 <= layer.init_error < 1


def test_from_dense_rank0_error_is_masked_residual():
    torch.manual_seed(0)
    w = torch.randn(128, 64)
    spec = PatternSpec(4, 2, 8, 0)
    layer = PixelflyLinear.from_dense(w, None, spec)
    expect = float((w * ~layer.mask()).norm() / w.norm())
    assert layer.init_error == pytest.approx(expect, rel=1e-5)
    assert layer.lowrank_u is None and layer.lowrank_v is None and layer.bias is None


def test_from_dense_full_rank_residual_is_fitted():
    torch.manual_seed(0)
    w = torch.randn(128, 64)
    full = PixelflyLinear.from_dense(w, None, PatternSpec(4, 2, 8, 64))
    assert full.init_error < 1e-5
    assert torch.allclose(full.dense_weight(), w, atol=1e-4)
    some = PixelflyLinear.from_dense(w, None, PatternSpec(4, 2, 8, 16))
    none = PixelflyLinear.from_dense(w, None, PatternSpec(4, 2, 8, 0))
    assert full.init_error < some.init_error < none.init_error
    # square-root split: U and V carry the same singular values
    assert torch.allclose(some.lowrank_u.norm(dim=0), some.lowrank_v.norm(dim=1), rtol=1e-4)


def test_from_dense_scratch_init():
    torch.manual_seed(0)
    fin, fout, spec = 96, 384, PatternSpec(4, 1, 8, 3)
    w = torch.zeros(fout, fin)
    layer = PixelflyLinear.from_dense(w, torch.zeros(fout), spec, init="scratch")
    assert layer.init_error is None
    share = layer.lowrank_share
    assert share == pytest.approx(3 * (fin + fout) / (3 * (fin + fout) + 0.5 * fin * fout))
    bound = math.sqrt((1 - share) / spec.block_density) / math.sqrt(fin)
    assert float(layer.blocks.detach().abs().max()) <= bound
    assert float(layer.blocks.detach().abs().max()) > 0.9 * bound
    assert float(layer.blocks.detach().std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    # the low-rank term's entries carry its share of a dense entry's variance 1 / (3 fin)
    uv = (layer.lowrank_u @ layer.lowrank_v).detach()
    assert float(uv.var()) == pytest.approx(share / (3 * fin), rel=0.25)
    with pytest.raises(ValueError):
        PixelflyLinear.from_dense(w, None, spec, init="nope")


@pytest.mark.parametrize(("fin", "fout", "spec"), CASES, ids=CASE_IDS)
def test_scratch_init_keeps_a_dense_layers_output_scale(fin, fout, spec):
    """A freshly initialised layer's output has the std of a fresh nn.Linear's (issue #14)."""
    torch.manual_seed(0)
    x = torch.randn(2048, fin)
    with torch.no_grad():
        ratios = [
            float(PixelflyLinear(fin, fout, spec, bias=False)(x).std())
            / float(nn.Linear(fin, fout, bias=False)(x).std())
            for _ in range(3)
        ]
    assert 0.9 < sum(ratios) / 3 < 1.1, ratios


@pytest.mark.parametrize(("fin", "fout", "spec"), CASES, ids=CASE_IDS)
def test_parameters_and_masks(fin, fout, spec):
    layer = PixelflyLinear(fin, fout, spec)
    pb = spec.pattern_block
    n_params = sum(p.numel() for p in layer.parameters())
    expect = spec.kept_blocks(fout, fin) * pb * pb + spec.rank * (fin + fout) + fout
    assert n_params == expect
    assert layer.blocks.numel() == spec.kept_blocks(fout, fin) * pb * pb
    assert all(p.shape != (fout, fin) for p in layer.parameters())
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"blocks", "bias"} | ({"lowrank_u", "lowrank_v"} if spec.rank else set())
    if spec.rank:
        assert layer.lowrank_u.shape == (fout, spec.rank)
        assert layer.lowrank_v.shape == (spec.rank, fin)
    # element mask = block mask expanded; block_weight is zero exactly off the mask
    m = layer.mask()
    assert m.dtype == torch.bool and m.shape == (fout, fin)
    bm = block_mask(spec, fout, fin, block=pb)
    assert np.array_equal(m.numpy(), np.kron(bm, np.ones((pb, pb), dtype=bool)))
    assert torch.equal(layer.block_weight() != 0, m)
    assert float(m.float().mean()) == pytest.approx(spec.block_density)
    # state dict holds parameters only (index buffers are derived from the spec)
    assert set(layer.state_dict()) == names
    r = repr(layer)
    assert "density=" in r and "PatternSpec" in r


def test_state_dict_roundtrip():
    torch.manual_seed(0)
    spec = PatternSpec(4, 2, 8, 4)
    a = PixelflyLinear(64, 128, spec)
    b = PixelflyLinear(64, 128, spec)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 64)
    assert torch.equal(a(x), b(x))


def test_misfit_raises():
    with pytest.raises(ValueError):
        PixelflyLinear(100, 128, PatternSpec(4, 2, 8, 0))
    with pytest.raises(ValueError):
        PixelflyLinear(64, 128, PatternSpec(4, 2, 8, 65))
    layer = PixelflyLinear(64, 128, PatternSpec(4, 2, 8, 0))
    with pytest.raises(ValueError):
        layer(torch.randn(3, 32))


def test_dense_weight_is_differentiable():
    torch.manual_seed(0)
    layer = PixelflyLinear(64, 128, PatternSpec(4, 2, 8, 4))
    layer.dense_weight().sum().backward()
    assert layer.blocks.grad is not None and torch.all(layer.blocks.grad == 1)
    assert layer.lowrank_u.grad is not None and layer.lowrank_v.grad is not None


def test_inside_a_model_trains():
    torch.manual_seed(0)
    model = nn.Sequential(
        PixelflyLinear(64, 128, PatternSpec(4, 2, 8, 4)),
        nn.GELU(),
        PixelflyLinear(128, 64, PatternSpec(4, 2, 8, 4)),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(32, 64)
    target = torch.randn(32, 64)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def _workspace_ptrs() -> set[int]:
    bufs = getattr(K._WS, "bufs", None) or {}
    return {b.untyped_storage().data_ptr() for b in bufs.values()}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("fin", "fout", "rank"), [(64, 128, 4), (128, 64, 4), (128, 64, 0)])
def test_results_never_alias_workspaces(fin, fout, rank, bias, path):
    """Scratch buffers are reused from call to call (and shared by layers): no output, saved
    tensor or gradient may live in one. A later call must leave earlier results unchanged,
    in every grad mode, at 1 row (where a reshape would be a view) and at many."""
    torch.manual_seed(0)
    _, p, tile = path
    a = PixelflyLinear(fin, fout, PatternSpec(4, 2, 8, rank), bias=bias)
    b = PixelflyLinear(fin, fout, PatternSpec(4, 2, 8, rank), bias=bias)
    for layer in (a, b):
        layer.path, layer.tile_rows = p, tile
    ref, *_ = _reference(a)
    for m in (1, 40):
        x = torch.randn(m, fin)
        with torch.inference_mode():
            y_inf = a(x)
        with torch.no_grad():
            y_ng = a(x)
        xg = x.clone().requires_grad_(True)
        y = a(xg)
        y_keep = y.detach().clone()
        b(torch.randn(m, fin)).sum().backward()  # reuses every workspace in between
        y.backward(torch.ones_like(y))
        gx = xg.grad.clone()
        b(torch.randn(m, fin)).sum().backward()
        a.zero_grad()
        for t in (y_inf, y_ng, y, xg.grad):
            assert t.untyped_storage().data_ptr() not in _workspace_ptrs()
        want = ref(x)
        for t in (y_inf, y_ng, y):
            assert torch.allclose(t, want, rtol=1e-4, atol=1e-5)
        assert torch.equal(y.detach(), y_keep)
        assert torch.equal(xg.grad, gx)


def test_workspaces_are_per_thread():
    import threading

    assert K.WORKSPACE_MIN_ROWS <= 600
    torch.manual_seed(0)
    layer = PixelflyLinear(128, 64, PatternSpec(4, 2, 8, 4))
    layer.tile_rows = 0
    xs = [torch.randn(600, 128) for _ in range(4)]
    with torch.no_grad():
        want = [layer(x) for x in xs]
    got: dict[int, list] = {}

    def work(i):
        with torch.no_grad():
            got[i] = [layer(xs[i]) for _ in range(20)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert all(torch.equal(y, want[i]) for y in got[i])


def test_clear_workspaces(monkeypatch):
    monkeypatch.setattr(K, "WORKSPACE_MIN_ROWS", 0)
    layer = PixelflyLinear(64, 128, PatternSpec(4, 2, 8, 4))
    with torch.no_grad():
        y1 = layer(torch.ones(8, 64))
    assert getattr(K._WS, "bufs", None)
    K.clear_workspaces()
    assert not K._WS.bufs
    with torch.no_grad():
        assert torch.equal(layer(torch.ones(8, 64)), y1)


@pytest.mark.parametrize(("fin", "fout"), [(64, 128), (128, 64)])
def test_autocast_bf16_layer(fin, fout, path):
    """Under autocast the matmuls run in bf16 (no fp32 workspaces), forward and backward."""
    torch.manual_seed(0)
    _, p, tile = path
    layer = PixelflyLinear(fin, fout, PatternSpec(4, 2, 8, 4))
    layer.path, layer.tile_rows = p, tile
    ref, w, b, u, v = _reference(layer)
    x = torch.randn(40, fin)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert _rel(y.float(), ref(x)) < 3e-2
    y.float().sum().backward()
    ref(x).sum().backward()
    assert layer.blocks.grad.dtype == torch.float32
    assert _rel(layer.bias.grad, b.grad) < 3e-2
    assert _rel(layer.lowrank_u.grad, u.grad) < 5e-2


def test_module_defaults_exist():
    assert isinstance(L.TILE_ROWS, int)
    assert isinstance(L.COMPILE, bool)
    assert isinstance(K.WORKSPACE_MIN_ROWS, int)


def test_auto_dispatch_never_compiles_under_pytest():
    layer = PixelflyLinear(64, 128, PatternSpec(4, 2, 8, 4))
    assert not L.compile_available()
    assert layer.choose_path(1) == "eager"
    assert layer.choose_path(10_000) == "eager"
    layer.path = "bogus"
    with pytest.raises(ValueError):
        layer(torch.randn(2, 64))


@pytest.mark.slow
def test_compiled_path(monkeypatch):
    """The one test that compiles (seconds per graph): both modes, untiled and tiled (tiles
    written in place into the result), with grad, no-grad and inference mode, against the
    masked-dense reference."""
    if not L.COMPILE:
        pytest.skip("compilation disabled (PXCOMPILE_NO_COMPILE)")
    monkeypatch.setattr(K, "_COMPILE_FAILED", False)
    torch.manual_seed(0)
    cases = (
        (64, 128, 0, 0),
        (128, 64, 16, 0),
        (64, 128, 16, 0),
        (128, 64, 0, 0),
        (128, 64, 0, 10**9),
    )
    for fin, fout, tile, ws_rows in cases:
        monkeypatch.setattr(K, "WORKSPACE_MIN_ROWS", ws_rows)
        layer = PixelflyLinear(fin, fout, PatternSpec(4, 2, 8, 4))
        layer.path, layer.tile_rows = "compiled", tile
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a compile failure must not hide
            _check_against_reference(layer, torch.randn(40, fin))
            ref, *_ = _reference(layer)
            x = torch.randn(40, fin)
            with torch.no_grad():
                assert torch.allclose(layer(x), ref(x), rtol=1e-4, atol=1e-5)
            with torch.inference_mode():
                assert torch.allclose(layer(x), ref(x), rtol=1e-4, atol=1e-5)
    assert not K._COMPILE_FAILED


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(K, "_COMPILE_FAILED", False)
    monkeypatch.setattr(L, "COMPILE", True)
    monkeypatch.setattr(K, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken)
    torch.manual_seed(0)
    layer = PixelflyLinear(64, 128, PatternSpec(4, 2, 8, 4))
    layer.path = "compiled"
    with pytest.warns(RuntimeWarning, match="eager"):
        _check_against_reference(layer, torch.randn(20, 64))
    assert K._COMPILE_FAILED


# -- padded patterns (issue #12.3): the pattern is laid on a zero-padded weight; the layer pads
# its input and slices its output, so its shapes and semantics are the real weight's.
PADDED = [
    (50, 64, PatternSpec(4, 1, 8, 2, padded_in=64)),  # gather mode, input padded
    (64, 50, PatternSpec(4, 1, 8, 3, padded_out=64)),  # scatter mode, output padded
    (50, 100, PatternSpec(4, 2, 8, 0, padded_out=128, padded_in=64)),  # both sides
    (60, 24, PatternSpec(4, 1, 8, 4, padded_out=32, padded_in=64)),  # scatter, both
]
PADDED_IDS = [f"{i}x{o}-pad{s.padded_out}x{s.padded_in}r{s.rank}" for i, o, s in PADDED]


@pytest.mark.parametrize(("fin", "fout", "spec"), PADDED, ids=PADDED_IDS)
def test_padded_matches_masked_dense(fin, fout, spec, path):
    """Outputs and every gradient (input, blocks, bias, low-rank) against the masked-dense
    reference of the real weight, on every forced path."""
    torch.manual_seed(0)
    _, p, tile = path
    layer = PixelflyLinear(fin, fout, spec)
    layer.path, layer.tile_rows = p, tile
    _check_against_reference(layer, torch.randn(37, fin))
    x = torch.randn(2, 3, fin)
    y = layer(x)
    assert y.shape == (2, 3, fout) and y._base is None
    y1 = layer(torch.randn(fin))
    assert y1.shape == (fout,) and y1._base is None
    with torch.no_grad():
        assert torch.allclose(layer(x), y, atol=1e-6)


@pytest.mark.parametrize(("fin", "fout", "spec"), PADDED[:2], ids=PADDED_IDS[:2])
def test_padded_gradcheck_float64(fin, fout, spec):
    torch.manual_seed(0)
    layer = PixelflyLinear(fin, fout, spec, dtype=torch.float64)
    x = torch.randn(4, fin, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, *ps: layer(x), (x, *layer.parameters()), fast_mode=True
    )


@pytest.mark.parametrize(("fin", "fout", "spec"), PADDED, ids=PADDED_IDS)
def test_padded_parameters_masks_and_from_dense(fin, fout, spec):
    torch.manual_seed(0)
    po, pi = spec.sides(fout, fin)
    layer = PixelflyLinear(fin, fout, spec)
    assert (layer.padded_out, layer.padded_in) == (po, pi)
    pb = spec.pattern_block
    assert layer.blocks.numel() == spec.kept_blocks(fout, fin) * pb * pb
    if spec.rank:
        assert layer.lowrank_u.shape == (po, spec.rank)
        assert layer.lowrank_v.shape == (spec.rank, pi)
        assert not layer.lowrank_u[fout:].any() and not layer.lowrank_v[:, fin:].any()
    full = PixelflyLinear(pi, po, spec.unpadded())  # the same blocks on the padded weight
    full.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "bias"}, strict=False)
    assert not full.block_weight()[fout:].any() and not full.block_weight()[:, fin:].any()
    m = layer.mask()
    assert m.shape == (fout, fin) and torch.equal(m, full.mask()[:fout, :fin])
    assert layer.dense_weight().shape == (fout, fin) and layer.weight.shape == (fout, fin)
    assert "padded" in repr(layer)
    w, b = torch.randn(fout, fin), torch.randn(fout)
    d = PixelflyLinear.from_dense(w, b, spec)
    assert torch.equal(d.block_weight(), w * m)
    assert 0 <= d.init_error < 1
    if not spec.rank:
        assert d.init_error == pytest.approx(float((w * ~m).norm() / w.norm()), rel=1e-5)
    x = torch.randn(7, fin)
    with torch.no_grad():
        ref = masked_dense_reference(w, b, spec, d.lowrank_u, d.lowrank_v)
        assert torch.allclose(d(x), ref(x), atol=1e-5)
        assert torch.allclose(d(x), torch.nn.functional.linear(x, d.dense_weight(), b), atol=1e-5)


def test_padded_layer_trains_and_its_padding_stays_zero():
    torch.manual_seed(0)
    spec = PatternSpec(4, 1, 8, 2, padded_out=64, padded_in=64)
    layer = PixelflyLinear(50, 60, spec)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    x, t = torch.randn(32, 50), torch.randn(32, 60)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = (layer(x) - t).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    full = PixelflyLinear(64, 64, spec.unpadded(), bias=False)
    with torch.no_grad():
        full.blocks.copy_(layer.blocks)
    assert not full.block_weight()[60:].any() and not full.block_weight()[:, 50:].any()
    assert not layer.lowrank_u[60:].any() and not layer.lowrank_v[:, 50:].any()


def test_padded_misfit_raises():
    with pytest.raises(ValueError, match="padded 'in'=40 is smaller"):
        PixelflyLinear(50, 64, PatternSpec(4, 1, 8, padded_in=40))
    with pytest.raises(ValueError, match="more than 2x"):
        PixelflyLinear(20, 64, PatternSpec(4, 1, 8, padded_in=64))
