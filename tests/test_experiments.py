"""The figure experiments built on experiments/common.py (fig05, fig13, the init study): the
narrower-dense solver and the results writer do what they say, and each script's ``--quick``
runs end to end into a temporary folder (a table and a png)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import common as C  # noqa: E402


@pytest.mark.parametrize(("kind", "cfg"), [("mixer", {}), ("vit", {"heads": 4}), ("gpt", {})])
def test_narrower_matches_a_parameter_count(kind, cfg):
    full = C.n_params(C.build(kind, 0, width=128, **cfg))
    width, n = C.narrower(kind, full // 3, width=128, **cfg)
    assert width < 128 and width % (8 if kind == "mixer" else 8) == 0
    assert n == C.n_params(C.build(kind, 0, width=width, **cfg))
    nxt = C.n_params(C.build(kind, 0, width=width + 8, **cfg))
    assert abs(n - full // 3) <= abs(nxt - full // 3)  # the closest width


def test_compare_says_no_difference_within_one_std():
    assert C.compare([1.0, 2.0, 3.0], [1.5, 2.5, 3.5], True) == "no difference measured"
    assert C.compare([10.0, 10.1], [5.0, 5.1], True, ("px", "dense")).startswith("px better")
    assert C.compare([10.0, 10.1], [5.0, 5.1], False, ("px", "dense")).startswith("dense better")


def test_train_records_a_curve_and_step_times():
    torch.manual_seed(0)
    task = C.Task("digits", C.digits(), 16)
    r = C.train(task, C.build("mixer", 0, width=32, depth=1), steps=4, lr=1e-3, seed=0, evals=2)
    assert [s for s, _ in r["curve"]] == [0, 2, 4] and r["metric"] == r["curve"][-1][1]
    assert r["step_ms"] > 0 and r["train_s"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("script", ["fig05_vision", "fig13_budget_sweep", "init_default"])
def test_quick_runs(script, tmp_path, monkeypatch):
    monkeypatch.setenv("PXCOMPILE_NO_COMPILE", "1")
    threads = torch.get_num_threads()
    try:
        mod = importlib.import_module(script)
        assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    md = (tmp_path / f"{script}.md").read_text()
    assert "Command: `python" in md and "--quick" in md and "| " in md
    assert (tmp_path / f"{script}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / f"{script}.json").exists()
