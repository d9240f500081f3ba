"""``pxcompile.ntk``: the empirical NTK and its distance from the dense model's."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import pxcompile
from pxcompile.ntk import empirical_ntk, kernel_distance, ntk_distance


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 3)
    )


def test_kernel_matches_torch_func_jacobian():
    m = _mlp()
    x = torch.randn(5, 128)
    params = {k: v.detach() for k, v in m.named_parameters()}
    jac = jacrev(lambda p: functional_call(m, p, (x,)))(params)  # each [5, 3, *shape]
    j = torch.cat([v.reshape(5, 3, -1) for v in jac.values()], 2).double()
    want = torch.einsum("icp,jcp->ij", j, j)
    got = empirical_ntk(m, x, outputs=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_projection_keeps_the_kernel_for_many_outputs():
    m = _mlp()
    x = torch.randn(4, 128)
    k = empirical_ntk(m, x, outputs=2)  # 3 outputs > 2: projected
    assert k.shape == (4, 4)
    torch.testing.assert_close(k, k.t())
    assert torch.linalg.eigvalsh(k).min() > -1e-6 * k.abs().max()
    assert torch.equal(k, empirical_ntk(m, x, outputs=2))  # same seed, same projection


def test_same_model_distance_zero_and_scaling():
    m = _mlp()
    x = torch.randn(6, 128)
    assert ntk_distance(m, m, x) == pytest.approx(0.0, abs=1e-12)
    assert ntk_distance(m, m, x, metric="alignment") == pytest.approx(0.0, abs=1e-12)

    class Scaled(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 2.0 * self.inner(x)

    s = Scaled(m)  # NTK scales by 4: relative distance 3, alignment unchanged
    assert ntk_distance(m, s, x) == pytest.approx(3.0, rel=1e-9)
    assert ntk_distance(m, s, x, metric="alignment") == pytest.approx(0.0, abs=1e-12)


def test_compiled_models_closer_to_dense_with_more_budget():
    dense = _mlp()
    x = torch.randn(8, 128)
    d = {}
    for budget in (0.9, 0.5, 0.2):
        gm = pxcompile.sparsify(dense, budget, block=16, example_inputs=(x,))
        assert gm.pxcompile_layers
        d[budget] = ntk_distance(dense, gm, x)
    assert 0 < d[0.9] < d[0.5] < d[0.2]


def test_works_on_sequence_models_with_dict_inputs():
    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 64)
            self.fc = nn.Linear(64, 50)

        def forward(self, ids):
            return self.fc(self.emb(ids))

    torch.manual_seed(0)
    m = Tok()
    ids = torch.randint(0, 50, (3, 7))
    k = empirical_ntk(m, {"ids": ids}, outputs=4)
    assert k.shape == (3, 3) and torch.isfinite(k).all()


def test_errors():
    m = _mlp()
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="metric"):
        ntk_distance(m, m, x, metric="cosine")
    with pytest.raises(ValueError, match="shapes"):
        kernel_distance(torch.eye(2), torch.eye(3))
    frozen = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        empirical_ntk(frozen, x)
