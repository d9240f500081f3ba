"""`pxcompile MODEL.py`: compile, verify, report; user mistakes are one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pxcompile.cli import main

ROOT = Path(__file__).resolve().parents[1]

MLP = """
import torch
from torch import nn
model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
example_inputs = (torch.randn(16, 256),)
"""


def write(tmp_path, text: str, name: str = "m.py") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("pxcompile: error: ")
    return err[0]


def test_compile_model_file_json(tmp_path, capsys):
    p = write(tmp_path, MLP)
    assert main([str(p), "--budget", "0.3", "--json", "--plan-out", str(tmp_path / "p.yaml")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0.28 <= out["summary"]["eligible_fraction"] <= 0.30
    assert (tmp_path / "p.yaml").exists()
    # re-apply the plan
    assert main([str(p), "--plan", str(tmp_path / "p.yaml"), "--json"]) == 0


def test_table_and_verification_line(tmp_path, capsys):
    p = write(tmp_path, MLP)
    assert main([str(p), "--budget", "0.3", "--init", "dense"]) == 0
    cap = capsys.readouterr()
    assert "init err" in cap.out and "achieved budget" in cap.out
    assert "verified: max relative output difference" in cap.err
    assert "init: dense (asked for)" in cap.err
    # the default on this freshly initialised model: the scratch init, no init errors to show
    assert main([str(p), "--budget", "0.3"]) == 0
    cap = capsys.readouterr()
    assert "init err" not in cap.out and "achieved budget" in cap.out
    assert "init: scratch (all " in cap.err and "look freshly initialised" in cap.err


def test_untraceable_model(tmp_path, capsys):
    p = write(
        tmp_path,
        """
        import torch
        from torch import nn
        class DataDependent(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(256, 256)
            def forward(self, x):
                n = int(x.abs().sum().item()) % 3 + 1
                for _ in range(n):
                    x = self.fc(x)
                return x[: int(x.sum().item() > 0) + 1]
        model = DataDependent()
        example_inputs = (torch.randn(4, 256),)
        """,
    )
    assert main([str(p), "--budget", "0.3"]) == 2
    line = err_line(capsys)
    assert "YAML schema" in line


def test_model_file_that_raises(tmp_path, capsys):
    p = write(tmp_path, "raise RuntimeError('boom')\n")
    assert main([str(p), "--budget", "0.3"]) == 2
    assert "raised RuntimeError: boom" in err_line(capsys)


def test_missing_model(tmp_path, capsys):
    p = write(tmp_path, "example_inputs = ()\n")
    assert main([str(p), "--budget", "0.3"]) == 2
    assert "defines no 'model'" in err_line(capsys)


def test_inputs_that_do_not_fit(tmp_path, capsys):
    p = write(tmp_path, MLP.replace("randn(16, 256)", "randn(16, 100)"))
    assert main([str(p), "--budget", "0.3"]) == 2
    assert "fails on its example inputs" in err_line(capsys)


def test_plan_for_another_model(tmp_path, capsys):
    a = write(tmp_path, MLP)
    b = write(tmp_path, MLP.replace("1024", "512"), "b.py")
    assert main([str(a), "--budget", "0.3", "--plan-out", str(tmp_path / "a.yaml")]) == 0
    capsys.readouterr()
    out = tmp_path / "b.px"
    assert main([str(b), "--plan", str(tmp_path / "a.yaml"), "-o", str(out)]) == 2
    assert "in the plan but" in err_line(capsys)
    assert not out.exists()


def test_trace_subcommand(tmp_path, capsys):
    p = write(tmp_path, MLP)
    out = tmp_path / "s.yaml"
    assert main(["trace", str(p), "-o", str(out)]) == 0
    assert "2 GEMMs" in capsys.readouterr().out
    assert main([str(out), "--budget", "0.3", "--json"]) == 0


@pytest.mark.slow
def test_real_exit_code_and_no_traceback(tmp_path):
    p = write(tmp_path, "example_inputs = ()\n")
    r = subprocess.run(
        [sys.executable, "-m", "pxcompile", str(p), "--budget", "0.3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


@pytest.mark.slow
def test_compile_save_and_load_example(tmp_path, capsys):
    import runpy

    import torch

    import pxcompile

    out = tmp_path / "out.px"
    ex = ROOT / "examples" / "mixer.py"
    assert main([str(ex), "--budget", "0.3", "--block", "32", "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().err
    loaded = pxcompile.load(out)
    ns = runpy.run_path(str(ex))
    (x,) = ns["example_inputs"]()
    gm = pxcompile.sparsify(ns["model"], 0.3, block=32, example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(loaded(x), gm.eval()(x))


@pytest.mark.slow
def test_shipped_long_gpt_sparsifies_attention_and_saves(tmp_path, capsys):
    out = tmp_path / "gpt-long.px"
    plan = tmp_path / "plan.yaml"
    args = [str(ROOT / "examples" / "gpt.py"), "--model", "long_model", "--inputs", "long_inputs"]
    assert main([*args, "--budget", "0.3", "-o", str(out), "--plan-out", str(plan)]) == 0
    cap = capsys.readouterr()
    text = cap.out + cap.err
    assert "attn 64/" in text and "attention (scores and values):" in text
    assert "verified" in text
    assert out.exists()
    assert "block: 64" in plan.read_text()  # the attention pattern is in the plan file


SWIN_AS_BUILT = """
import torch
from torchvision.models.swin_transformer import SwinTransformer
torch.manual_seed(0)
# As the library builds it: train mode, stochastic depth 0.2 (swin_t's own setting), small.
model = SwinTransformer(patch_size=[4, 4], embed_dim=64, depths=[2, 2], num_heads=[2, 4],
                        window_size=[4, 4], stochastic_depth_prob=0.2, num_classes=10)
example_inputs = (torch.randn(2, 3, 32, 32),)
"""


@pytest.mark.slow
def test_a_train_mode_library_model_verifies_and_keeps_its_mode(tmp_path, capsys):
    """torchvision's Swin in train mode (stochastic depth, dropout paths): verification
    compares like with like instead of blaming the model's randomness on the rewrite."""
    pytest.importorskip("torchvision")
    p = write(tmp_path, SWIN_AS_BUILT)
    assert main([str(p), "--budget", "0.3", "--block", "16"]) == 0
    assert "verified" in capsys.readouterr().err


# -- outputs are checked before the work, and a failure leaves old files alone (issue #11) ---
def test_a_bad_output_path_fails_first_and_keeps_the_existing_model(tmp_path, capsys):
    p = write(tmp_path, MLP)
    keep = tmp_path / "keep.px"
    keep.write_bytes(b"the model from yesterday")
    keep.chmod(0o600)
    argv = [str(p), "--budget", "0.3", "-o", str(keep), "--plan-out", "/proc/x/plan.yaml"]
    assert main(argv) == 2
    assert "--plan-out /proc/x/plan.yaml: cannot write in /proc" in err_line(capsys)
    assert keep.read_bytes() == b"the model from yesterday"
    assert keep.stat().st_mode & 0o777 == 0o600
    assert sorted(x.name for x in tmp_path.iterdir()) == ["keep.px", "m.py"]


@pytest.mark.parametrize("where", ["a directory", "/sys", "under a file", "the input"])
def test_trace_output_errors_are_one_line(tmp_path, capsys, where):
    p = write(tmp_path, MLP)
    if where == "/sys" and not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    target = {
        "a directory": tmp_path,
        "/sys": Path("/sys/x"),
        "under a file": p / "x.yaml",
        "the input": p,
    }[where]
    assert main(["trace", str(p), "-o", str(target)]) == 2
    assert str(target) in err_line(capsys)
    assert p.read_text() == textwrap.dedent(MLP)
