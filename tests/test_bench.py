"""`pxcompile bench` and the timing helpers: they run and report ratios (no timing asserted)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pxcompile.bench import compare, paired
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
