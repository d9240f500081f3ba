"""Tests for pxcompile.passes.cost_gpu: the GPU tile-roofline cost model (a prediction)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pxcompile.passes.cost_gpu import GpuCost, pixelfly_tiles
from pxcompile.patterns import AttentionSpec, PatternSpec
from pxcompile.schema import Gemm, LayerType

ROOT = Path(__file__).resolve().parents[1]

GPU = GpuCost()


def fc(i: int, o: int, rows: int = 8192, **kw) -> Gemm:
    return Gemm("fc", LayerType.MLP, i, o, rows=rows, **kw)


def speedup(g: Gemm, spec: PatternSpec, model: GpuCost = GPU) -> float:
    return model.dense_cost(g) / model.sparse_cost(g, spec)


# the shapes of benchmarks/bench_gpu.py, at their two densities
BENCH = [
    (768, 3072, PatternSpec(12, 1, 64)),
    (3072, 768, PatternSpec(12, 1, 64)),
    (768, 3072, PatternSpec(12, 2, 64, 32)),
    (3072, 768, PatternSpec(12, 2, 64, 32)),
    (4096, 1024, PatternSpec(32, 4, 32)),
    (1024, 4096, PatternSpec(32, 4, 32)),
    (4096, 1024, PatternSpec(16, 4, 64)),
    (1024, 4096, PatternSpec(16, 4, 64)),
]


@pytest.mark.parametrize("spec", [PatternSpec(32, 4, 32), PatternSpec(16, 2, 64)])
def test_sane_speedup_at_017_on_4096x1024(spec):
    """About 0.17 of 4096 -> 1024 at 8192 rows: faster than dense, not beyond the FLOPs."""
    g = fc(4096, 1024)
    assert 0.15 < spec.density(4096, 1024) < 0.19
    s = speedup(g, spec)
    assert 1.0 < s < 6.0
    assert 1.0 < GPU.train_speedup(g, spec) < 6.0


@pytest.mark.parametrize(("i", "o", "spec"), BENCH)
@pytest.mark.parametrize("rows", [64, 1568, 8192])
def test_never_beats_the_flops(i, o, spec, rows):
    """Narrow tiles and extra reads only cost: sparse runs at most 1 / density faster."""
    g = fc(i, o, rows)
    ideal = 1.0 / spec.density(i, o)
    assert 0 < speedup(g, spec) <= ideal
    assert 0 < GPU.train_speedup(g, spec) <= ideal


@pytest.mark.parametrize(("i", "o"), [(768, 3072), (3072, 768), (1024, 4096), (4096, 1024)])
def test_monotone_in_density(i, o):
    g = fc(i, o)
    n, factors = (16, (1, 2, 3, 4)) if i % 1024 == 0 else (12, (1, 2))
    by_factors = [PatternSpec(n, f, 64) for f in factors]
    by_rank = [PatternSpec(n, 1, 64, r) for r in (0, 16, 32, 64, 128)]
    for specs in (by_factors, by_rank):
        specs = sorted(specs, key=lambda s: s.density(i, o))
        costs = [GPU.sparse_cost(g, s) for s in specs]
        train = [GPU.sparse_train_cost(g, s) for s in specs]
        assert costs == sorted(costs) and costs[0] < costs[-1]
        assert train == sorted(train) and train[0] < train[-1]


def test_more_rows_cost_more_and_calls_multiply():
    spec = PatternSpec(12, 1, 64)
    costs = [GPU.sparse_cost(fc(768, 3072, r), spec) for r in (1, 64, 1024, 8192, 65536)]
    assert costs == sorted(costs)
    g = fc(768, 3072)
    g3 = replace(g, calls=3)
    assert GPU.dense_cost(g3) == pytest.approx(3 * GPU.dense_cost(g))
    assert GPU.sparse_cost(g3, spec) == pytest.approx(3 * GPU.sparse_cost(g, spec))
    assert GPU.sparse_train_cost(g3, spec) == pytest.approx(3 * GPU.sparse_train_cost(g, spec))


def test_one_row_is_launch_bound():
    """A single row is no faster sparse: both sides are a launch and a weight read."""
    g = fc(768, 3072, rows=1)
    assert speedup(g, PatternSpec(12, 1, 64)) < 2.0
    assert GPU.dense_cost(g) >= GPU.launch


def test_padding_costs_its_copies():
    """196 tokens padded to 256: the copies and the larger pattern count against it."""
    real = Gemm("t", LayerType.TOKEN_MIX, 196, 384, rows=6144)
    spec = PatternSpec(4, 1, 64, padded_in=256)
    same = Gemm("t", LayerType.TOKEN_MIX, 256, 384, rows=6144)
    unpadded = spec.unpadded()
    assert GPU.sparse_cost(real, spec) > GPU.sparse_cost(same, unpadded)
    assert GPU.sparse_train_cost(real, spec) > GPU.sparse_train_cost(same, unpadded)


def test_roofline_parameters_matter():
    g, spec = fc(4096, 1024), PatternSpec(32, 4, 32)
    slow_l2 = GpuCost(l2_bandwidth=3e12)
    assert slow_l2.sparse_cost(g, spec) > GPU.sparse_cost(g, spec)
    assert slow_l2.dense_cost(g) > GPU.dense_cost(g)
    fast_l2 = GpuCost(l2_bandwidth=30e12)  # dense compute-bound, narrow tiles still fed better
    assert speedup(g, spec, fast_l2) > speedup(g, spec)
    fast = GpuCost(peak_flops=2 * GPU.peak_flops, l2_bandwidth=2 * GPU.l2_bandwidth)
    assert fast.dense_cost(g) < GPU.dense_cost(g)
    assert GpuCost(launch=1e-3).sparse_cost(g, spec) > 1e-3


def test_tiles_follow_the_cells():
    assert pixelfly_tiles(8192, 256, 64) == (128, 128)
    assert pixelfly_tiles(8192, 32, 128) == (128, 32)
    assert pixelfly_tiles(8192, 48, 128) == (128, 64)
    assert pixelfly_tiles(5, 8, 8) == (16, 16)
    assert pixelfly_tiles(8192, 256, 64, wide=False) == (64, 128)


def test_tiles_match_the_triton_kernel():
    pytest.importorskip("triton")
    torch = pytest.importorskip("torch")
    from pxcompile.kernels.triton.linear import tiles

    for rows in (1, 17, 64, 1000, 8192):
        for out_cell in (8, 32, 48, 64, 128, 256, 512):
            for dtype, wide in ((torch.bfloat16, True), (torch.float32, False)):
                t = tiles(rows, out_cell, 64, dtype)
                assert pixelfly_tiles(rows, out_cell, 64, wide) == (t["BM"], t["BN"])


def test_attention_prediction():
    spec = AttentionSpec(block=64, factors=4, globals=1)
    by_seq = [GPU.attention_speedup(s, spec) for s in (2048, 4096, 8192, 16384)]
    assert by_seq == sorted(by_seq)  # fewer kept blocks as the sequence grows
    assert all(0 < s <= 1 / spec.density(n) for s, n in zip(by_seq, (2048, 4096, 8192, 16384)))
    assert 1.0 < GPU.attention_speedup(8192, spec, causal=True) < 1 / spec.density(8192, True)


# -- the registry and the command line ------------------------------------------------------


def test_registered_beside_the_other_models():
    from pxcompile.passes.mapping import COST_MODELS, predicted_speedup

    assert isinstance(COST_MODELS["gpu"], GpuCost)
    g, spec = fc(4096, 1024), PatternSpec(32, 4, 32)
    assert predicted_speedup(g, spec, COST_MODELS["gpu"]) == pytest.approx(speedup(g, spec))


def test_cli_cost_model_gpu(tmp_path, capsys):
    import json

    from pxcompile.cli import main

    schema = str(ROOT / "schemas" / "gpt2-small.yaml")
    plan = tmp_path / "p.yaml"
    assert main([schema, "--budget", "0.3", "--cost-model", "gpu", "--plan-out", str(plan)]) == 0
    capsys.readouterr()
    assert "cost_model: gpu" in plan.read_text()
    assert main([schema, "--budget", "0.3", "--cost-model", "gpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cost_model"] == "gpu"
    assert report["summary"]["eligible_fraction"] <= 0.3 + 0.02
    sparse = [lp for lp in report["layers"] if lp["action"] == "sparse"]
    assert len(sparse) >= 48  # every MLP and projection of the 12 layers
    assert all(lp["predicted_speedup"] > 1 for lp in sparse)  # never slower than dense
