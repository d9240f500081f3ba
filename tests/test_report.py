"""Tests for pxcompile.report: the table, the JSON report, mask files, pictures, outputs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from pxcompile import report
from pxcompile.passes.budget import plan_schema
from pxcompile.plans import Plan
from pxcompile.policy import Policy
from pxcompile.schema import Gemm, LayerType, ModelSchema

ROOT = Path(__file__).resolve().parents[1]


def toy() -> ModelSchema:
    return ModelSchema(
        "toy",
        [
            Gemm("emb", LayerType.EMBEDDING, 512, 512, rows=128),
            Gemm("l0.fc1", LayerType.MLP, 512, 2048, rows=128, bias=True),
            Gemm("l0.fc2", LayerType.MLP, 2048, 512, rows=128, bias=True),
            Gemm("tiny", LayerType.MLP, 64, 512, rows=128),
        ],
    )


def render(plan: Plan, **kw) -> str:
    c = Console(file=io.StringIO(), width=250, color_system=None)
    report.print_plan(plan, c, **kw)
    return c.file.getvalue()


def test_table_lists_every_gemm_and_the_total():
    p = plan_schema(toy(), 0.3, 32)
    out = render(p)
    assert out.splitlines()[0].startswith("toy: block 32, budget 0.3")
    for g in toy():
        assert g.name in out
    assert "under 4 blocks of 32 on a side" in out
    assert "type embedding stays dense (policy)" in out
    assert "2 of 4 GEMMs sparse" in out
    fc1 = p["l0.fc1"]
    row = next(line for line in out.splitlines() if "l0.fc1" in line)
    spec = fc1.pattern
    assert f"{spec.butterfly}/{spec.factors}/{spec.pattern_block}" in row
    assert f"{fc1.density:.4f}" in row and f"{fc1.block_density:.4f}" in row
    s = p.summary
    assert f"achieved budget: {s.eligible_fraction:.4f} of the eligible GEMMs' compute" in out
    assert "not attainable" not in out


def test_extra_columns():
    p = plan_schema(toy(), 0.3, 32)
    out = render(p, extra_columns={"speedup": {"l0.fc1": "2.5x"}})
    assert "speedup" in out
    assert "2.5x" in next(line for line in out.splitlines() if "l0.fc1" in line)


def test_not_attainable_line_has_the_figure():
    pol = Policy.from_dict({"types": {"mlp": {"floor": 0.5}}})
    p = plan_schema(toy(), 0.1, 32, pol)
    lines = report.summary_lines(p)
    assert len(lines) == 2
    assert lines[1] == f"not attainable: {p.note}"
    assert f"{p.summary.eligible_fraction:.3f}" in lines[1]
    assert "not attainable:" in render(p)


def test_plan_without_a_budget_is_reported():
    p = plan_schema(toy(), 0.3, 32)
    q = Plan.from_dict({**p.to_dict(), "budget": None}).check_against(toy())
    out = render(q)
    assert "budget -" in out
    line = report.summary_lines(q)[0]
    assert "of dense;" in line and line.endswith("x") and "predicted GEMM speedup" in line


def test_make_console_is_wide_when_piped():
    c = report.make_console()
    assert c.is_terminal or c.width == 200


def test_plan_json_fields():
    p = plan_schema(toy(), 0.3, 32)
    d = json.loads(json.dumps(report.plan_json(p)))
    assert d["model"] == "toy" and d["block"] == 32 and d["budget"] == 0.3
    s = d["summary"]
    assert s["eligible_flops"] == p.summary.eligible_flops
    assert s["model_flops"] == toy().flops
    assert s["attainable"] is True
    assert [row["name"] for row in d["layers"]] == [g.name for g in toy()]
    for row in d["layers"]:
        for k in (
            "params",
            "sparse_params",
            "flops",
            "sparse_flops",
            "mask_density",
            "density",
            "kept_per_row",
            "action",
            "reason",
            "in",
            "out",
            "type",
        ):
            assert k in row, k
        if row["action"] == "sparse":
            r = row["pattern"]["rank"]
            lr = r * (row["in"] + row["out"]) / (row["in"] * row["out"])
            assert row["density"] == row["mask_density"] + lr
            assert (
                row["mask_density"] == (row["pattern"]["factors"] + 1) / row["pattern"]["butterfly"]
            )
            assert row["sparse_flops"] == pytest.approx(row["flops"] * row["density"])
        else:
            assert row["density"] == row["mask_density"] == 1.0
            assert row["kept_per_row"] is None and "pattern" not in row


def test_masks_npz():
    p = plan_schema(toy(), 0.3, 32)
    data = report.masks_npz_bytes(p)
    assert data == report.masks_npz_bytes(p)  # same plan, same bytes
    with np.load(io.BytesIO(data)) as z:
        assert sorted(z.files) == sorted(lp.name for lp in p.sparse_layers)
        for name, m in p.masks().items():
            assert z[name].dtype == bool
            np.testing.assert_array_equal(z[name], m)


def test_masks_npz_with_awkward_layer_names():
    names = ["file", "allow_pickle", "a/b.c", "arr_0"]
    # 1024 wide: a 256x256 layer is predicted slower than dense at every density
    s = ModelSchema("m", [Gemm(n, LayerType.MLP, 1024, 1024, rows=4) for n in names])
    p = plan_schema(s, 0.5, 32)
    with np.load(io.BytesIO(report.masks_npz_bytes(p))) as z:
        assert sorted(z.files) == sorted(names)
        for n in names:
            np.testing.assert_array_equal(z[n], p[n].mask(32))


def test_draw_png():
    pytest.importorskip("matplotlib")
    p = plan_schema(toy(), 0.3, 32)
    png = report.draw_png_bytes(p)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    none = plan_schema(ModelSchema("d", [Gemm("h", LayerType.HEAD, 256, 256, rows=1)]), 0.3, 32)
    assert report.draw_png_bytes(none)[:8] == b"\x89PNG\r\n\x1a\n"


def test_attention_rows_share_and_pictures():
    seq = 4096
    s = ModelSchema(
        "long",
        [
            Gemm("l0.fc1", LayerType.MLP, 512, 2048, rows=seq),
            Gemm("l0.attn.scores", LayerType.ATTN_SCORES, 64, seq, rows=8 * seq, heads=8, seq=seq),
            Gemm("l0.attn.values", LayerType.ATTN_VALUES, seq, 64, rows=8 * seq, heads=8, seq=seq),
        ],
    )
    p = plan_schema(s, 0.3, 32)
    a = p["l0.attn.scores"].attention
    out = render(p)
    assert f"attn {a.block}/{a.factors}/g{a.globals}" in out
    assert "attention (scores and values):" in out and "sparse from 2048 tokens" in out
    j = report.plan_json(p)
    row = j["layers"][1]
    assert row["predicted_speedup"] > 1 and row["kept_per_row"] is None
    assert j["summary"]["attention_share"] == pytest.approx(p.summary.attention_share, abs=1e-6)
    assert report.model_predicted_speedup(p) > 1
    masks = np.load(io.BytesIO(report.masks_npz_bytes(p)))
    assert masks["l0.attn.scores"].shape == (seq // a.block, seq // a.block)
    assert report.draw_png_bytes(p).startswith(b"\x89PNG")
    dense = plan_schema(s, 0.3, 32, Policy(attention_min_seq=8192))
    assert "keeps 1.0000 of it (dense)" in render(dense)


def test_padded_layers_say_how_they_are_padded():
    """Issue #12.3: the table's why column and the JSON say 'padded ...'; the masks (file and
    picture) are those of the padded weight."""
    from pxcompile.passes.mapping import FlopsBlockCost

    s = ModelSchema("mix", [Gemm("tok", LayerType.TOKEN_MIX, 196, 384, rows=6144, bias=True)])
    p = plan_schema(s, 0.4, 32, cost_model=FlopsBlockCost())
    lp = p["tok"]
    assert lp.pattern.padded and lp.padding.startswith("padded ")
    lines = render(p).splitlines()
    at = next(k for k, line in enumerate(lines) if line.startswith("│ tok"))
    row = lines[at]
    assert f"{lp.density:.4f}" in row
    # the why column, which wraps onto the row's next lines
    why_col = [c.strip() for c in lines[at - 2].split("┃")].index("why")
    cells = []
    for line in lines[at:]:
        parts = line.split("│")
        if len(parts) <= why_col or (line is not row and parts[1].strip()):
            break
        cells.append(parts[why_col].strip())
    assert lp.padding in " ".join(cells)
    d = report.plan_json(p)["layers"][0]
    assert d["padding"] == lp.padding and d["density"] == lp.density
    assert d["pattern"] == lp.pattern.to_dict() and d["sparse_flops"] == lp.flops
    po, pi = lp.pattern.sides(384, 196)
    with np.load(io.BytesIO(report.masks_npz_bytes(p))) as z:
        assert z["tok"].shape == (po // 32, pi // 32)
    dense = report.plan_json(plan_schema(toy(), 0.3, 32))["layers"]
    assert not any("padding" in r for r in dense)
    pytest.importorskip("matplotlib")  # last: the picture of a padded mask draws
    assert report.draw_png_bytes(p)[:8] == b"\x89PNG\r\n\x1a\n"
