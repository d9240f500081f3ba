"""Cost-model files (pxcompile.cost_file): round trip, validation, resolution by name or path."""

from __future__ import annotations

import json

import pytest

from pxcompile import cost_file
from pxcompile.cost_file import CostModelError
from pxcompile.passes.mapping import COST_MODELS, CalibratedCost


def test_round_trip_yaml_and_json(tmp_path):
    m = CalibratedCost(move=150.5, per_block=320.0, lowrank=1.75, name="calibrated:box")
    fit = {"points": 12, "rms_log_error": 0.07}
    y = tmp_path / "c.yaml"
    y.write_text(cost_file.dumps(m, fit))
    assert cost_file.load(y) == m
    j = tmp_path / "c.json"
    j.write_text(json.dumps(cost_file.to_data(m, fit)))
    assert cost_file.load(j) == m
    assert cost_file.resolve(str(y)) == m


def test_resolve_names_and_default():
    assert cost_file.resolve(None) is COST_MODELS["calibrated-cpu"]
    assert cost_file.resolve("flops+blocks") is COST_MODELS["flops+blocks"]
    with pytest.raises(CostModelError, match="--cost-model nope: neither a cost model"):
        cost_file.resolve("nope")
    with pytest.raises(CostModelError, match="^policy cost_model x.yaml: neither"):
        cost_file.resolve("x.yaml", where="policy cost_model")


GOOD = {"kind": "calibrated", "move": 1.0, "per_block": 2.0, "lowrank": 3.0}


@pytest.mark.parametrize(
    "data,msg",
    [
        ([1, 2], "expected a mapping"),
        ({**GOOD, "extra": 1}, "unknown key 'extra'"),
        ({**GOOD, "kind": "gpu"}, "'kind' must be 'calibrated'"),
        ({k: v for k, v in GOOD.items() if k != "move"}, "missing 'move'"),
        ({**GOOD, "move": "fast"}, "'move' must be a finite number"),
        ({**GOOD, "move": True}, "'move' must be a finite number"),
        ({**GOOD, "per_block": float("nan")}, "'per_block' must be a finite number"),
        ({**GOOD, "move": -1}, r"'move' must be in \[0, 1e9\]"),
        ({**GOOD, "lowrank": 0}, r"'lowrank' must be in \(0, 1e9\]"),
        ({**GOOD, "name": ""}, "'name' must be a short printable string"),
        ({**GOOD, "name": "a\nb"}, "'name' must be a short printable string"),
        ({**GOOD, "fit": 3}, "'fit' must be a mapping"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, data, msg):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(data))
    with pytest.raises(CostModelError, match=msg) as ei:
        cost_file.load(p)
    assert "\n" not in str(ei.value) and str(ei.value).startswith(str(p))


def test_unreadable_files(tmp_path):
    with pytest.raises(CostModelError, match="no such file"):
        cost_file.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [unclosed")
    with pytest.raises(CostModelError, match="invalid YAML"):
        cost_file.load(bad)
    badj = tmp_path / "bad.json"
    badj.write_text("{")
    with pytest.raises(CostModelError, match="invalid JSON"):
        cost_file.load(badj)


def test_default_name_is_the_file():
    m = cost_file.from_data(GOOD, "dir/cost.yaml")
    assert m.name == "file:cost.yaml" and (m.move, m.per_block, m.lowrank) == (1.0, 2.0, 3.0)


@pytest.mark.parametrize(("key", "value"), [("group_move", 55.0), ("fuse_move", 90.0)])
def test_grouped_constants_round_trip_are_optional_and_checked(tmp_path, key, value):
    """The grouped kernel's constants: kept through a file, the shipped value when a file
    written before them lacks them, and a bad value is a one-line error naming the key."""
    m = CalibratedCost(move=150.5, per_block=320.0, lowrank=1.75, name="c", **{key: value})
    p = tmp_path / "c.yaml"
    p.write_text(cost_file.dumps(m))
    assert getattr(cost_file.load(p), key) == value
    assert getattr(cost_file.from_data(GOOD, "old.yaml"), key) == getattr(CalibratedCost(), key)
    for bad in (-1, "fast", True, float("inf"), 1e10):
        with pytest.raises(CostModelError, match=f"^x.yaml: '{key}' must be"):
            cost_file.from_data({**GOOD, key: bad}, "x.yaml")
