"""The parity study (examples/parity.py): its quick mode runs end to end, and the committed
full results are complete."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "examples" / "results"
VARIANTS = {"dense", "pixelfly", "random", "lowrank"}


def _check_results(d: Path, budgets: list[float], seeds: dict[str, int]) -> dict:
    res = json.loads((d / "results.json").read_text())
    assert set(res["tasks"]) == {"digits", "chars"}
    for name, task in res["tasks"].items():
        metric = "test_acc" if name == "digits" else "val_loss"
        runs = task["runs"]
        assert len(runs) == seeds[name] * (1 + 3 * len(budgets))
        for r in runs:
            assert math.isfinite(r[metric]) and r["train_s"] > 0 and r["params"] > 0
            if r["variant"] != "dense":
                assert math.isfinite(r["ntk_relative"]) and r["ntk_relative"] >= 0
        dense = next(r for r in task["summary"] if r["variant"] == "dense")
        for b in budgets:
            rows = {r["variant"]: r for r in task["summary"] if r["budget"] == b}
            assert set(rows) == VARIANTS - {"dense"}
            for r in rows.values():  # the same parameter count, about the budget's share
                assert r["params"] < dense["params"]
                assert abs(r["params"] - rows["pixelfly"]["params"]) <= 0.02 * dense["params"]
        assert "all" in task["ntk_prediction"]["ntk_relative"]
    md = (d / "results.md").read_text()
    assert "| 0.3 | pixelfly |" in md and "## Goals at budget 0.3" in md
    assert (d / "parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (d / "command.txt").read_text().startswith("python examples/parity.py")
    return res


@pytest.mark.slow
def test_quick_mode_runs(tmp_path):
    env = dict(os.environ, PXCOMPILE_NO_COMPILE="1")
    p = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "parity.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    res = _check_results(tmp_path, [0.3], {"digits": 1, "chars": 1})
    assert res["command"].endswith("--quick --out " + str(tmp_path))
    assert len(res["goals"]) == 4


def test_committed_full_results():
    res = _check_results(RESULTS, [0.5, 0.3, 0.15], {"digits": 3, "chars": 3})
    assert "--quick" not in res["command"]
    assert res["wall_s"] < 15 * 60
