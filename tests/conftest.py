"""Test-suite settings shared by every module."""

from __future__ import annotations

import pytest

# Modules that test planning itself keep the real rule that the budget pass never chooses a
# pattern predicted slower than dense. Elsewhere the suite's tiny models (64-256 wide, a few
# rows), which the calibrated cost model rightly predicts slower than dense at every density,
# must still be sparsified to test the rewrite, kernels, save/load and training.
PLANNER_MODULES = {
    "test_bench_gpu",
    "test_budget",
    "test_cli",
    "test_cost_gpu",
    "test_mapping",
    "test_plans",
    "test_policy",
    "test_report",
    "test_schema",
}


def pytest_configure(config):
    # Session-wide, so that module-scoped fixtures see it too; planner modules put the real
    # rule back per test below. Spawned worker processes start without it: their tests pass
    # ``min_speedup: 0`` in the policy.
    from pxcompile.passes import mapping

    mapping.MIN_SPEEDUP = 0.0


@pytest.fixture(autouse=True)
def _planner_keeps_the_real_rule(request, monkeypatch):
    if request.module.__name__.rsplit(".", 1)[-1] in PLANNER_MODULES:
        from pxcompile.passes import mapping

        monkeypatch.setattr(mapping, "MIN_SPEEDUP", 1.0)
