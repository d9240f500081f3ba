"""Tests for benchmarks/bench_gpu.py: its logic on the CPU (--dry-run), and the one-line exit
where there is no CUDA. No speed is asserted here (the numbers of a dry run mean nothing)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules["bench_gpu"]


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # a dry run uses one thread


def test_no_cuda_is_one_line_and_exit_2(bench, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--only", "layer"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "bench_gpu.py: no CUDA device (torch.cuda.is_available() is False); run it on a machine "
        "with an NVIDIA GPU, or pass --dry-run to check the script on the CPU\n"
    )


def test_bad_section_is_a_usage_error(bench, capsys):
    with pytest.raises(SystemExit) as info:
        bench.main(["--dry-run", "--only", "layers"])
    assert info.value.code == 2
    assert "'layers' is not one of layer, attention, model" in capsys.readouterr().err


def test_cases_are_the_issues_shapes(bench):
    """768 <-> 3072 and 4096 <-> 1024, each at about 0.17 and 0.3, every pattern fitting."""
    shapes = {(i, o) for _, i, o, _, _ in bench.LAYER_CASES}
    assert shapes == {(768, 3072), (3072, 768), (4096, 1024), (1024, 4096)}
    for _, i, o, target, spec in bench.LAYER_CASES:
        assert spec.misfit(o, i, block=spec.pattern_block) is None
        assert abs(spec.density(i, o) - target) < 0.02, (i, o, spec)
        assert (i, o, 0.17 if target == 0.3 else 0.3) in {
            (a, b, t) for _, a, b, t, _ in bench.LAYER_CASES
        }
    for seq in (2048, 4096, 8192, 16384):
        assert all(a.misfit(seq) is None for a in bench.ATTENTION_SPECS)


def test_dry_run_layer_and_attention(bench, tmp_path, capsys, threads):
    out = tmp_path / "r.json"
    assert bench.main(["--dry-run", "--only", "layer,attention", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "### Layer" in text and "### Attention" in text and "### Models" not in text
    rows = json.loads(out.read_text())
    assert [r["case"] for r in rows["layer"]] == ["128->256", "256->128"]
    for r in rows["layer"]:
        for key in ("fwd", "fwd_bwd", "pred_fwd", "pred_fwd_bwd", "dense_ms"):
            assert r[key] > 0
        assert r["path"] == "torch"
    assert [(r["seq"], r["causal"]) for r in rows["attention"]] == [(256, False), (256, True)]
    assert all(r["fwd"] > 0 and r["fwd_bwd"] > 0 and r["pred"] > 0 for r in rows["attention"])


def test_dry_run_models(bench, tmp_path, capsys, threads):
    out = tmp_path / "r.json"
    args = ["--dry-run", "--only", "model", "--models", "mixer-b16", "--json", str(out)]
    assert bench.main(args) == 0
    assert "### Models at budget 0.3" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())["model"]
    assert row["model"] == "mixer-b16" and row["cost_model"] == "flops+blocks"
    assert row["sparse_gemms"] > 0 and row["eligible_kept"] < 0.5
    assert row["train"] > 0 and row["fwd"] > 0


def test_predict_needs_no_gpu(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "p.json"
    assert bench.main(["--predict", "--json", str(out)]) == 0
    assert "### Predicted by the GPU cost model" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert len(rows["layer"]) == len(bench.LAYER_CASES)
    assert all(0 < r["fwd"] <= 1 / r["density"] for r in rows["layer"])
    assert [r["model"] for r in rows["model"]] == ["mixer-b16", "gpt2-small"]
    assert all(r["sparse_gemms"] > 0 and r["pred_fwd"] > 1 for r in rows["model"])
    assert {r["seq"] for r in rows["attention"]} == {2048, 4096, 8192, 16384}
