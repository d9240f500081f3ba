"""The pattern baselines of the experiments (figures 06, 11, 12): RigL does what Evci et al.
describe, the fixed patterns are the ones named, the product butterfly is the product of its
factors, and each script's ``--quick`` runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from experiments.baselines.butterfly import ProductButterfly, butterfly_factor, factor_dense
from experiments.baselines.rigl import RigL, erk_densities, update_fraction
from experiments.baselines.static_masks import (
    MaskedLinear,
    band_cells,
    butterfly_cells,
    random_cells,
    stretch,
)
from pxcompile.patterns import flat_butterfly

# ------------------------------------------------------------------------------ RigL


def test_erk_keeps_the_total_and_favours_small_layers():
    shapes = [(64, 64), (512, 64), (1024, 1024)]
    d = erk_densities(shapes, 0.05)
    kept = sum(di * o * i for di, (o, i) in zip(d, shapes))
    assert kept == pytest.approx(0.05 * sum(o * i for o, i in shapes))
    assert d[0] > d[1] > d[2]
    for di, (o, i) in zip(d, shapes):  # proportional to (in + out) / (in * out) below 1
        if di < 1:
            assert di / ((o + i) / (o * i)) == pytest.approx(d[2] / (2048 / 1024**2))
    capped = erk_densities([(4, 4), (1024, 1024)], 0.1)
    assert capped[0] == 1.0 and 0 < capped[1] < 0.1
    assert erk_densities([(128, 512), (512, 128)], 0.25) == pytest.approx([0.25, 0.25])


def test_update_fraction_is_cosine_decayed():
    assert update_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert update_fraction(50, 0.3, 100) == pytest.approx(0.15)
    assert update_fraction(100, 0.3, 100) == 0.0
    assert update_fraction(25, 0.3, 100) > update_fraction(75, 0.3, 100)


def test_rigl_drops_by_magnitude_grows_by_gradient_new_at_zero():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    rigl = RigL([lin], density=0.25, delta_t=2, t_end=100, alpha=0.5, seed=1)
    mask0 = rigl.masks[0].clone()
    assert int(mask0.sum()) == 32 and bool((lin.weight[~mask0] == 0).all())
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2)
    x = torch.randn(32, 16)
    with rigl.attached():
        for step in range(2):
            loss = lin(x).square().mean()
            loss.backward()
            if step == 0:  # not an update step: gradient masked
                assert bool((lin.weight.grad[~mask0] == 0).all())
                opt.step()
                opt.zero_grad()
                assert bool((lin.weight[~mask0] == 0).all())
                continue
            # step 2 updates: the hook kept the dense gradient
            dense = rigl._dense_grads[0].clone()
            w_before = lin.weight.detach().clone()
            opt.step()
            opt.zero_grad()
    mask1 = rigl.masks[0]
    assert int(mask1.sum()) == 32  # density kept
    k = int(update_fraction(2, 0.5, 100) * 32)
    dropped = mask0 & ~mask1
    grown = mask1 & ~mask0
    assert int(grown.sum()) == int(dropped.sum()) and 0 < int(grown.sum()) <= k
    assert bool((lin.weight[grown] == 0).all())  # new connections start at zero
    st = opt.state[lin.weight]
    assert bool((st["exp_avg"][grown] == 0).all()) and bool((st["exp_avg_sq"][grown] == 0).all())
    # grown: the largest |dense grad| among what was inactive (or just dropped)
    cand = dense.abs().masked_fill(mask0 & mask1, -1)
    assert dense.abs()[grown].min() >= torch.topk(cand.view(-1), k).values.min() - 1e-12
    # dropped were among the smallest magnitudes of the post-step active weights
    w_after_step = w_before  # magnitudes differ only by one AdamW step; check ordering loosely
    assert w_after_step.abs()[dropped].max() <= w_after_step.abs()[mask0].median() + 1e-2
    assert rigl.updates and rigl.updates[0]["step"] == 2
    assert not rigl._handles  # detached


def test_rigl_ignores_other_optimizers_and_validates():
    lin, other = nn.Linear(8, 8), nn.Linear(8, 8)
    rigl = RigL([lin], 0.5, delta_t=1, t_end=10)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with rigl.attached():
        other(torch.randn(2, 8)).sum().backward()
        opt.step()
    assert rigl.step == 0
    with pytest.raises(ValueError, match="distribution"):
        RigL([lin], 0.5, 1, 10, distribution="gaussian")
    with pytest.raises(ValueError, match="at least one"):
        RigL([], 0.5, 1, 10)


# ------------------------------------------------------------------------------ fixed patterns


def test_cell_patterns():
    b = band_cells(8, 3)
    assert (b.sum(0) == 3).all() and (b.sum(1) == 3).all() and b[0, 7] and b[0, 1]
    assert (butterfly_cells(16, 3) == np.array(flat_butterfly(16, 3))).all()
    r = random_cells(16, 48, seed=2)
    assert r.sum() == 48 and (r == random_cells(16, 48, seed=2)).all()
    assert not (r == random_cells(16, 48, seed=3)).all()
    m = stretch(b, 32, 16)
    assert m.shape == (32, 16) and bool(m[:4, :2].all()) and not bool(m[:4, 4:6].any())
    with pytest.raises(ValueError, match="multiple"):
        stretch(b, 30, 16)


def test_masked_linear_is_masked_and_keeps_the_output_scale():
    torch.manual_seed(0)
    mask = stretch(butterfly_cells(16, 2), 512, 128)
    layer = MaskedLinear(128, 512, mask, rank=6)
    assert layer.density == pytest.approx(3 / 16 + 6 * 640 / (512 * 128))
    x = torch.randn(256, 128)
    layer(x).sum().backward()
    assert bool((layer.weight.grad[~mask] == 0).all())
    w = layer.dense_weight().detach()
    ref = nn.Linear(128, 512).weight.detach()
    ratio = (x @ w.t()).var() / (x @ ref.t()).var()
    assert 0.7 < float(ratio) < 1.4
    lowrank = MaskedLinear(128, 512, None, rank=26)
    assert lowrank.weight is None and lowrank.density == pytest.approx(26 * 640 / 65536)


# ------------------------------------------------------------------------------ product butterfly


def test_butterfly_factor_is_the_pairwise_block_product():
    torch.manual_seed(0)
    b, n, s, m = 2, 8, 2, 3
    w = torch.randn(n // 2, 2 * b, 2 * b, dtype=torch.float64)
    x = torch.randn(m, n * b, dtype=torch.float64)
    y = butterfly_factor(x, w, s, b)
    ref = torch.zeros_like(y)
    p = 0
    for g in range(n // (2 * s)):
        for t in range(s):
            i0, i1 = g * 2 * s + t, g * 2 * s + t + s
            xi = torch.cat([x[:, i0 * b : (i0 + 1) * b], x[:, i1 * b : (i1 + 1) * b]], 1)
            yi = xi @ w[p]
            ref[:, i0 * b : (i0 + 1) * b] = yi[:, :b]
            ref[:, i1 * b : (i1 + 1) * b] = yi[:, b:]
            p += 1
    torch.testing.assert_close(y, ref)
    f = factor_dense(w, s, b).abs().reshape(n, b, n, b).sum((1, 3)) > 0
    i, j = np.indices((n, n))
    assert (f.numpy() <= (((i ^ j) == 0) | ((i ^ j) == s))).all()


def test_product_butterfly_is_the_product_of_its_factors():
    torch.manual_seed(0)
    pb = ProductButterfly(64, 8).double()
    assert pb.nfactors == 3 and pb.strides() == [1, 2, 4]
    x = torch.randn(5, 64, dtype=torch.float64, requires_grad=True)
    y = pb(x)
    torch.testing.assert_close(y, x @ pb.dense_weight() + pb.bias)
    assert torch.autograd.gradcheck(lambda a: pb(a), (x[:2].detach().requires_grad_(),))
    assert pb.flops(5) == 2 * 5 * 3 * 4 * 16**2
    assert (pb.dense_weight().abs() > 0).all()  # the full product is dense
    with pytest.raises(ValueError, match="power of two"):
        ProductButterfly(48, 8)


def test_product_butterfly_keeps_the_scale():
    torch.manual_seed(0)
    pb = ProductButterfly(256, 16, bias=False)
    x = torch.randn(512, 256)
    with torch.no_grad():
        y = pb(x)
    assert 0.5 < float(y.var() / x.var()) < 2.0 and math.isfinite(float(y.sum()))


# ------------------------------------------------------------------------------ scripts


@pytest.mark.slow
@pytest.mark.parametrize("module", ["fig06_rigl", "fig11_flat_vs_product", "fig12_components"])
def test_quick_runs(module, tmp_path):
    import importlib

    mod = importlib.import_module(f"experiments.{module}")
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    md = (tmp_path / f"{module}.md").read_text()
    assert "dense" in md
    assert (tmp_path / f"{module}.png").exists()
    if module == "fig06_rigl":
        assert "rigl" in md and "random blocks" in md and "unstructured" in md
    if module == "fig12_components":
        assert "butterfly + low rank (Pixelfly)" in md and "local + global" in md


@pytest.mark.slow
def test_fig12_low_density_quick(tmp_path):
    from experiments import fig12_components as f12

    assert f12.main(["--quick", "--low", "--seeds", "1", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "fig12_components_low.md").read_text()
    assert "32x32 cell grid" in md and "| random | random 128 | 0.1250 |" in md
