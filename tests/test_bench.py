"""`pxcompile bench` and the timing helpers: they run and report ratios (no timing asserted)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pxcompile.bench import compare, layer_speedups, paired
from pxcompile.cli import main
from pxcompile.errors import PxError

MLP = """
import torch
from torch import nn
model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
example_inputs = (torch.randn(16, 256),)
"""


def test_paired_alternates():
    calls = []
    r, ta, tb = paired(lambda: calls.append("a"), lambda: calls.append("b"), repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert ta >= 0 and tb >= 0 and r > 0


def test_compare_reports_ratios():
    import pxcompile

    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
    x = torch.randn(16, 256)
    gm = pxcompile.sparsify(model, 0.3, example_inputs=(x,))
    c = compare(model, gm, (x,), repeats=1)
    assert c.forward_speedup > 0 and c.train_speedup > 0
    assert 0 < c.params_ratio < 0.5


def test_bench_command_json(tmp_path, capsys):
    p = tmp_path / "m.py"
    p.write_text(MLP)
    assert main(["bench", str(p), "--budget", "0.3", "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"forward_speedup", "train_step_speedup", "params_ratio"} <= set(out)
    # predicted vs measured per distinct sparse layer (issue #12.4)
    assert [row["gemms"] for row in out["layers"]] == [["0"], ["2"]]
    for row in out["layers"]:
        assert row["predicted_speedup"] > 0 and row["measured_speedup"] > 0
        assert row["rows"] == 16 and row["pattern"]["butterfly"] >= 2


def test_bench_command_prints_predicted_vs_measured_per_layer(tmp_path, capsys):
    p = tmp_path / "m.py"
    p.write_text(MLP)
    assert main(["bench", str(p), "--budget", "0.3", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "predicted (calibrated-cpu) vs measured" in out and "RMS log error" in out
    assert "pred x" in out and "meas x" in out and "1024x256" in out
    assert main(["bench", str(p), "--budget", "0.3", "--repeats", "1", "--no-layers"]) == 0
    assert "meas x" not in capsys.readouterr().out


def test_layer_speedups_group_layers_of_one_shape_and_pattern():
    from pxcompile.passes.budget import plan_schema
    from pxcompile.passes.mapping import COST_MODELS, predicted_speedup
    from pxcompile.schema import Gemm, LayerType, ModelSchema

    s = ModelSchema("m", [Gemm(f"l{k}.fc", LayerType.MLP, 128, 512, rows=8) for k in range(3)])
    plan = plan_schema(s, 0.5, 32, cost_model=COST_MODELS["flops+blocks"])
    got = layer_speedups(plan, repeats=1)
    assert len(got) == 1 and got[0].names == ["l0.fc", "l1.fc", "l2.fc"]
    g, spec = got[0].gemm, got[0].spec
    # the report's predictor: calibrated-cpu, not the flops+blocks the plan was made with
    assert got[0].predicted == predicted_speedup(g, spec, COST_MODELS["calibrated-cpu"])
    assert got[0].measured > 0 and got[0].error == got[0].predicted / got[0].measured - 1


def test_bench_command_errors(tmp_path, capsys):
    p = tmp_path / "m.py"
    p.write_text(MLP)
    assert main(["bench", str(p)]) == 2
    assert "--budget is required" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag,value", [("--repeats", "0"), ("--repeats", "-1"), ("--threads", "-2"), ("--threads", "0")]
)
def test_bench_counts_must_be_positive(tmp_path, capsys, flag, value):
    """Issue #11.5: --repeats 0 ended in a StatisticsError, --threads -2 in a RuntimeError."""
    p = tmp_path / "m.py"
    p.write_text(MLP)
    with pytest.raises(SystemExit) as ei:
        main(["bench", str(p), "--budget", "0.3", flag, value])
    assert ei.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pxcompile: error: argument {flag}: must be a positive integer, got {value}"]


def test_paired_needs_a_repeat():
    for bad in (0, -3, 1.5, True):
        with pytest.raises(PxError, match="repeats must be a positive integer"):
            paired(lambda: None, lambda: None, repeats=bad)
