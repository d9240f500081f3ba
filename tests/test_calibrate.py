"""pxcompile calibrate: the points it times, the fit, the command (tiny shapes: fast)."""

from __future__ import annotations

import math

import pytest

from pxcompile import calibrate
from pxcompile.calibrate import Point, fit, plan_points, predict, specs_for
from pxcompile.errors import PxError
from pxcompile.passes.mapping import CalibratedCost


def test_specs_and_points_cover_blocks_factors_and_ranks():
    specs = specs_for(3072, 768, 32)
    assert {s.pattern_block for s in specs} == {32, 64}
    assert {s.rank for s in specs} == {0, 32}
    assert len({(s.butterfly, s.factors) for s in specs}) >= 3
    for s in specs:
        assert s.misfit(3072, 768, 32) is None
    todo = plan_points([(3072, 768), (768, 3072)], [256, 1024])
    # every pattern on the gather kernel, and those with f <= 2 on the grouped one too
    grouped = [s for s in specs if s.factors <= 2]
    assert grouped and len(todo) == 4 * (len(specs) + len(grouped))
    assert {ex for _, _, ex in todo} == {"gather", "grouped"}
    # interleaved: the first four cover every shape and row count
    assert {(g.out_features, g.rows) for g, _, _ in todo[:4]} == {
        (3072, 256),
        (3072, 1024),
        (768, 256),
        (768, 1024),
    }
    with pytest.raises(PxError, match="no butterfly pattern fits 160x160"):
        plan_points([(160, 160)], [8])


def test_fit_recovers_the_constants_of_exact_data():
    truth = CalibratedCost(
        move=150.0, per_block=300.0, lowrank=3.0, group_move=55.0, fuse_move=90.0, name="t"
    )
    todo = plan_points([(3072, 768), (1024, 1024)], [512])
    pts = [Point(g, s, 1.0, ex) for g, s, ex in todo]
    pts = [Point(p.gemm, p.spec, predict(truth, p), p.execution) for p in pts]
    model, rms = fit(pts, "x")
    assert rms < 1e-6 and model.name == "x"
    for k in ("move", "per_block", "lowrank"):
        assert getattr(model, k) == pytest.approx(getattr(truth, k), rel=1e-4)
    assert model.group_move == pytest.approx(truth.group_move, rel=1e-4)
    assert model.fuse_move == pytest.approx(truth.fuse_move, rel=1e-4)


def test_fit_is_on_log_ratios_and_non_negative():
    truth = CalibratedCost(move=0.0, per_block=800.0, lowrank=2.0)
    pts = [Point(g, s, 1.0, ex) for g, s, ex in plan_points([(2048, 512)], [256])]
    noisy = [
        Point(p.gemm, p.spec, predict(truth, p) * math.exp(0.05 * (-1) ** k), p.execution)
        for k, p in enumerate(pts)
    ]
    model, rms = fit(noisy)
    assert model.move >= 0 and model.per_block >= 0 and model.lowrank > 0
    assert model.group_move >= 0 and model.fuse_move >= 0
    assert rms <= 0.05 + 1e-9  # no worse than the truth itself
    with pytest.raises(PxError, match="at least 3 measurements"):
        fit(noisy[:2])


def test_without_ranks_the_lowrank_factor_stays_the_shipped_one():
    pts = [Point(g, s, 0.5) for g, s, _ in plan_points([(1024, 256)], [64], 32) if s.rank == 0]
    assert len(pts) >= 3
    assert fit(pts)[0].lowrank == CalibratedCost().lowrank


def test_run_measures_tiny_layers_quickly():
    model, points, record = calibrate.run(
        [(128, 64)], [16], block=8, repeats=1, show_progress=False
    )
    assert len(points) == len(plan_points([(128, 64)], [16], 8)) and all(
        p.ratio > 0 for p in points
    )
    assert record["points"] == len(points) and record["shapes"] == ["128x64"]
    assert model.lowrank > 0


def test_time_limit_stops_measuring_after_three_points():
    todo = plan_points([(128, 64)], [16], 8)
    assert len(calibrate.measure(todo, 1, time_limit=0.0)) == 3


@pytest.mark.parametrize(
    "text,msg",
    [("12x", "expected OUTxIN"), ("0x5", "sides must be in"), ("axb", "expected OUTxIN")],
)
def test_parse_shapes_errors(text, msg):
    with pytest.raises(PxError, match=msg):
        calibrate.parse_shapes(text)


def test_parse_rows():
    assert calibrate.parse_rows("8,16") == [8, 16]
    for bad in ("0", "x", "1,-2"):
        with pytest.raises(PxError, match="--rows"):
            calibrate.parse_rows(bad)
