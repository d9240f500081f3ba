"""``pxcompile check MODEL.py``: per-layer rewrite error at initialization, and warnings."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

import pxcompile
from pxcompile.check import check_compiled
from pxcompile.cli import main
from pxcompile.modelfile import load_model_file

# fc1's weight is exactly a flat block butterfly (n=8, f=2, 16-blocks): the rewrite at the
# matching pattern reproduces it; fc2 and fc3 are random (incompressible).
MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn
    from pxcompile.patterns import PatternSpec, block_mask

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 256), nn.GELU(),
                          nn.Linear(256, 128))
    spec = PatternSpec(butterfly=8, factors=2, pattern_block=16, rank=4)
    m = torch.as_tensor(block_mask(spec, 128, 128, block=16)).repeat_interleave(16, 0)
    m = m.repeat_interleave(16, 1)
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(128, 128) * m)

    def example_inputs():
        return (torch.randn(8, 128),)
    """
)

PLAN_RULES = "rules:\n  - {match: '0', density: 0.5, rank: 4}\n"


def run(capsys, *argv):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def model_file(tmp_path):
    p = tmp_path / "model.py"
    p.write_text(MODEL)
    return p


def test_check_prints_every_rewritten_layer_with_its_error(capsys, model_file):
    rc, out, err = run(capsys, "check", model_file, "--budget", "0.4", "--block", "16")
    assert rc == 0, err
    model, inputs = load_model_file(model_file)
    gm = pxcompile.sparsify(model, 0.4, block=16, example_inputs=inputs, init="dense")
    assert set(gm.pxcompile_layers) == {"0", "2", "4"}
    for name, e in gm.pxcompile_init_errors.items():
        row = next(line for line in out.splitlines() if line.strip("│┃ ").startswith(name + " "))
        assert f"{e:.3f}" in row, row
    assert "model output relative error" in out


def test_json_matches_the_api_and_flags_poor_layers(capsys, model_file):
    rc, out, err = run(capsys, "check", model_file, "--budget", "0.4", "--block", "16", "--json")
    assert rc == 0, err
    res = json.loads(out)
    model, inputs = load_model_file(model_file)
    gm = pxcompile.sparsify(model, 0.4, block=16, example_inputs=inputs, init="dense")
    by_name = {lc["name"]: lc for lc in res["layers"]}
    assert set(by_name) == set(gm.pxcompile_init_errors)
    for name, e in gm.pxcompile_init_errors.items():
        assert by_name[name]["error"] == pytest.approx(e, rel=1e-6)
        assert by_name[name]["poor"] == (e > 0.5)
        assert by_name[name]["random_level"] == pytest.approx((1 - by_name[name]["density"]) ** 0.5)
    # the random layers are poor (about the random-matrix level); the warning names them
    assert set(res["poor"]) >= {"2", "4"}
    assert "warning:" in err and "'2'" not in err and "2 (" in err and "budget" in err
    assert 0 < res["output_error"] < 2


def test_a_well_fitting_layer_is_not_flagged(capsys, model_file, tmp_path):
    pol = tmp_path / "policy.yaml"
    pol.write_text(
        "rules:\n  - {match: '0', density: 0.44, rank: 4}\n  - {match: '2', dense: true}\n"
        "  - {match: '4', dense: true}\n"
    )
    rc, out, err = run(
        capsys, "check", model_file, "--budget", "0.5", "--block", "16", "--policy", pol, "--json"
    )
    assert rc == 0, err
    res = json.loads(out)
    (layer,) = res["layers"]
    assert layer["name"] == "0" and layer["pattern"] == "8/2/16 r4"
    assert layer["error"] < 1e-3 and not layer["poor"]
    assert res["poor"] == [] and "warning" not in err


def test_warn_above_threshold(capsys, model_file):
    rc, out, err = run(
        capsys,
        "check",
        model_file,
        "--budget",
        "0.4",
        "--block",
        "16",
        "--warn-above",
        "10",
        "--json",
    )
    assert rc == 0
    assert json.loads(out)["poor"] == [] and "warning" not in err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--warn-above", "-1"], "--warn-above"),
        ([], "--budget is required"),
    ],
)
def test_errors_are_one_line(capsys, model_file, args, needle):
    rc, out, err = run(capsys, "check", model_file, *args)
    assert rc == 2
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err


def test_schema_input_is_refused(capsys, tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("version: 1\n")
    rc, out, err = run(capsys, "check", p, "--budget", "0.3")
    assert rc == 2 and "model file (.py)" in err


def test_check_compiled_api():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    x = torch.randn(4, 64)
    gm = pxcompile.sparsify(model, 0.5, block=16, example_inputs=(x,), init="dense")
    res = check_compiled(model, gm, (x,), warn_above=0.9)
    assert [lc.name for lc in res.layers] == list(gm.pxcompile_layers)
    assert res.poor == []
    full = pxcompile.sparsify(model, 1.0, block=16, example_inputs=(x,), init="dense")
    assert check_compiled(model, full, (x,)).output_error < 0.9
