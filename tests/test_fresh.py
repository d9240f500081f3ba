"""pxcompile.fresh: the random-matrix test behind sparsify(init="auto")."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pxcompile.fresh import check_weight, choose_init, edge_ratio, largest_singular_value, threshold


def _inits(rows: int, cols: int) -> dict[str, torch.Tensor]:
    e = torch.empty(rows, cols)
    return {
        "nn.Linear": nn.Linear(cols, rows).weight.detach(),
        "normal 0.02": torch.randn(rows, cols) * 0.02,
        "trunc normal": nn.init.trunc_normal_(e.clone(), std=0.02),
        "xavier": nn.init.xavier_uniform_(e.clone()),
        "orthogonal": nn.init.orthogonal_(e.clone()),
    }


@pytest.mark.parametrize("shape", [(16, 32), (64, 64), (256, 1024), (1024, 384)])
def test_fresh_inits_look_fresh(shape):
    torch.manual_seed(0)
    for name, w in _inits(*shape).items():
        c = check_weight(name, w)
        assert c.fresh is True, (shape, name, c)
        assert 0.4 < c.ratio <= c.limit


def test_a_large_fresh_weight_by_power_iteration():
    torch.manual_seed(0)
    w = nn.Linear(768, 3072).weight.detach()  # 2.4M entries: power iteration
    assert check_weight("w", w).fresh is True


def test_no_false_alarm_on_small_random_weights():
    torch.manual_seed(1)
    worst = max(edge_ratio(torch.rand(16, 16) * 2 - 1) for _ in range(300))
    assert worst < threshold(16, 16)


def test_power_iteration_matches_the_exact_value_on_a_gapped_spectrum():
    torch.manual_seed(0)
    w = torch.randn(1024, 512) * 0.02 + 0.05 * torch.randn(1024, 1) @ torch.randn(1, 512) / 22
    exact = float(torch.linalg.svdvals(w)[0])
    assert largest_singular_value(w) == pytest.approx(exact, rel=1e-3)
    assert edge_ratio(w) > 1.5


def _trained_mlp(steps: int) -> nn.Sequential:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 8))
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        x = torch.randn(128, 64)
        with torch.no_grad():
            y = teacher(x).repeat(1, 8)
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_a_trained_model_is_found_and_named():
    model = _trained_mlp(60)
    choice = choose_init((n, p) for n, p in model.named_parameters() if p.dim() == 2)
    assert choice.init == "dense"
    assert "training signal" in choice.reason and "weight '" in choice.reason
    assert choice.checks[-1].fresh is False and choice.checks[-1].ratio > choice.checks[-1].limit


def test_a_fresh_model_gets_scratch_with_its_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    choice = choose_init((n, p) for n, p in model.named_parameters() if p.dim() == 2)
    assert choice.init == "scratch" and "all 2 weights look freshly initialised" in choice.reason
    assert len(choice.checks) == 2


def test_the_check_stops_at_the_first_trained_weight():
    def weights():
        yield "trained", torch.ones(32, 32) + 0.01 * torch.randn(32, 32)  # non-zero mean
        raise AssertionError("read past the first trained weight")

    assert choose_init(weights()).init == "dense"


def test_zero_and_non_finite_weights():
    z = check_weight("z", torch.zeros(32, 32))
    assert z.fresh is None and math.isnan(z.ratio)
    assert choose_init([("z", torch.zeros(32, 32))]).init == "dense"  # no evidence: keep as is
    w = torch.randn(32, 32)
    w[0, 0] = float("nan")
    c = choose_init([("z", torch.zeros(8, 8)), ("w", w)])
    assert c.init == "dense" and "non-finite" in c.reason
    m = check_weight("m", torch.empty(64, 32, device="meta"))
    assert m.fresh is None and math.isnan(m.ratio)
