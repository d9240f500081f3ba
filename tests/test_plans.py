"""Tests for pxcompile.plans: the Plan as plain data, hand edits, loading and fitting."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import yaml

from pxcompile.errors import PlanError, PxError
from pxcompile.passes.budget import plan_schema
from pxcompile.passes.cost_cpu import CalibratedCost, FlopsBlockCost, cpu_execution
from pxcompile.patterns import PatternSpec, block_mask
from pxcompile.plans import PLAN_VERSION, LayerPlan, Plan
from pxcompile.schema import Gemm, LayerType, ModelSchema

ROOT = Path(__file__).resolve().parents[1]


def schema() -> ModelSchema:
    return ModelSchema(
        "toy",
        [
            Gemm("emb", LayerType.EMBEDDING, 512, 512, rows=128),
            Gemm("l0.fc1", LayerType.MLP, 512, 2048, rows=128, bias=True),
            Gemm("l0.fc2", LayerType.MLP, 2048, 512, rows=128, bias=True),
            Gemm("l0.attn.scores", LayerType.ATTN_SCORES, 128, 128, rows=1024, heads=8, seq=128),
            Gemm("head", LayerType.HEAD, 512, 1024, rows=1, shared_with="emb"),
        ],
    )


def plan_dict(budget: float = 0.3) -> dict:
    return yaml.safe_load(plan_schema(schema(), budget, 32).to_yaml())


def load_text(tmp_path: Path, data) -> Plan:
    f = tmp_path / "plan.yaml"
    f.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return Plan.load(f)


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    assert isinstance(exc.value, PxError) and exc.value.exit_code == 2
    return msg


# -- plain data -----------------------------------------------------------------------------
def test_to_dict_layout():
    d = plan_dict()
    assert d["version"] == PLAN_VERSION and d["model"] == "toy" and d["block"] == 32
    assert d["budget"] == 0.3 and d["cost_model"] == "calibrated-cpu"
    assert set(d["summary"]) >= {"eligible_fraction", "model_fraction", "params", "attainable"}
    layers = {lp["name"]: lp for lp in d["layers"]}
    assert list(layers) == [g.name for g in schema()]
    assert layers["emb"]["action"] == "dense" and "reason" in layers["emb"]
    fc1 = layers["l0.fc1"]
    assert fc1["action"] == "sparse"
    assert set(fc1["pattern"]) == {"butterfly", "factors", "pattern_block", "rank"}
    spec = PatternSpec(**fc1["pattern"])
    assert fc1["density"] == round(spec.density(512, 2048), 6)


def test_round_trip_is_byte_identical_and_keeps_masks(tmp_path):
    p = plan_schema(schema(), 0.3, 32)
    f = tmp_path / "p.yaml"
    p.save(f)
    assert f.read_text() == p.to_yaml()
    q = Plan.load(f).check_against(schema())
    assert q.to_yaml() == p.to_yaml()
    assert q.masks().keys() == p.masks().keys()
    for k, m in p.masks().items():
        np.testing.assert_array_equal(q.masks()[k], m)
    assert q.summary == p.summary


@pytest.mark.parametrize("name", ["gpt2-small", "vit-b16", "bert-base", "mixer-b16"])
def test_shipped_plans_round_trip(name):
    s = ModelSchema.load(ROOT / "schemas" / f"{name}.yaml")
    p = plan_schema(s, 0.3, 32)
    assert plan_schema(s, 0.3, 32).to_yaml() == p.to_yaml()  # deterministic
    q = Plan.from_dict(yaml.safe_load(p.to_yaml())).check_against(s)
    assert q.to_yaml() == p.to_yaml()


def test_layer_plan_figures():
    g = Gemm("fc", LayerType.MLP, 768, 3072, rows=10, bias=True)
    spec = PatternSpec(12, 2, 64, rank=16)
    lp = LayerPlan(g, spec, "x")
    assert lp.sparse and lp.eligible
    assert lp.density == spec.density(768, 3072)
    assert lp.block_density == 3 / 12
    assert lp.flops == g.flops * lp.density
    assert lp.params == spec.kept_blocks(3072, 768) * 64 * 64 + 16 * (768 + 3072) + 3072
    assert lp.kept_per_row == 3 * 12 // 12
    np.testing.assert_array_equal(lp.mask(32), block_mask(spec, 3072, 768, 32))
    dense = LayerPlan(g, None, "dense")
    assert dense.density == 1.0 and dense.params == g.params and dense.mask(32) is None
    assert dense.kept_per_row is None and not dense.eligible


def test_summary():
    p = plan_schema(schema(), 0.3, 32)
    s = p.summary
    sparse = p.sparse_layers
    assert [lp.name for lp in sparse] == ["l0.fc1", "l0.fc2"]
    assert s.eligible_flops == sum(lp.gemm.flops for lp in sparse)
    assert s.eligible_fraction == pytest.approx(sum(lp.flops for lp in sparse) / s.eligible_flops)
    assert s.model_flops == schema().flops
    assert s.dense_params == sum(g.params for g in schema())
    assert s.attainable and s.note == ""


# -- hand edits -------------------------------------------------------------------------------
def test_hand_edited_pattern_gives_the_new_mask(tmp_path):
    d = plan_dict()
    fc1 = next(lp for lp in d["layers"] if lp["name"] == "l0.fc1")
    fc1["pattern"] = {"butterfly": 16, "factors": 2, "pattern_block": 32, "rank": 8}
    fc1["density"] = 0.01  # stale figures are ignored and recomputed
    d["summary"]["eligible_fraction"] = 0.0
    p = load_text(tmp_path, d).check_against(schema())
    lp = p["l0.fc1"]
    want = PatternSpec(16, 2, 32, 8)
    assert lp.pattern == want
    np.testing.assert_array_equal(p.masks()["l0.fc1"], block_mask(want, 2048, 512, 32))
    assert lp.density == want.density(512, 2048)
    assert p.to_dict()["layers"][1]["density"] == round(want.density(512, 2048), 6)
    assert p.summary.eligible_fraction > 0


def test_hand_edit_dense_and_sparse(tmp_path):
    d = plan_dict()
    for lp in d["layers"]:
        if lp["name"] == "l0.fc2":
            lp["action"] = "dense"
            del lp["pattern"]
        if lp["name"] == "emb":  # sparsify a layer the policy kept dense
            lp["action"] = "sparse"
            lp["pattern"] = {"butterfly": 4, "factors": 1, "pattern_block": 128}
            lp.pop("reason")
    p = load_text(tmp_path, d).check_against(schema())
    assert p["l0.fc2"].pattern is None
    assert p["emb"].pattern == PatternSpec(4, 1, 128, 0)
    assert p["emb"].reason == "pattern from plan"
    assert set(p.masks()) == {"emb", "l0.fc1"}


@pytest.mark.parametrize(
    "pattern,match",
    [
        ({"butterfly": 12, "factors": 2, "pattern_block": 32}, "not a multiple of butterfly 12"),
        ({"butterfly": 16, "factors": 2, "pattern_block": 48}, "power-of-two multiple"),
        ({"butterfly": 16, "factors": 3, "pattern_block": 64}, "not a multiple of butterfly"),
        ({"butterfly": 6, "factors": 2, "pattern_block": 32}, "multiple of 2^factors"),
        ({"butterfly": 16, "factors": 0, "pattern_block": 32}, "factors"),
        ({"butterfly": 2, "factors": 10**18, "pattern_block": 32}, "multiple of 2^factors"),
        ({"butterfly": 4, "factors": 1, "pattern_block": 32, "rank": 600}, "rank 600"),
        ({"butterfly": 4, "factors": 2, "pattern_block": 32, "rank": 200}, "density >= 1"),
        ({"butterfly": 16, "factors": 2, "pattern_block": 32, "rank": -1}, "pattern.rank"),
        ({"butterfly": 16, "factors": 2}, "pattern.pattern_block"),
        ({"butterfly": "16", "factors": 2, "pattern_block": 32}, "pattern.butterfly"),
        ({"butterfly": 16, "factors": 2, "pattern_block": 32, "colour": 1}, "unknown field"),
        ("16/2/32", "needs a 'pattern' mapping"),
    ],
)
def test_a_pattern_that_does_not_fit_names_the_layer(tmp_path, pattern, match):
    d = plan_dict()
    fc1 = next(lp for lp in d["layers"] if lp["name"] == "l0.fc1")
    fc1["pattern"] = pattern
    with pytest.raises(PlanError) as ei:
        load_text(tmp_path, d)
    msg = one_line(ei)
    assert "layers[1] (l0.fc1)" in msg and match in msg, msg


def _mutate(path: str, value):
    def f(d):
        if path == "<root>":
            return value
        keys = path.split(".")
        tgt = d
        for k in keys[:-1]:
            tgt = tgt[int(k)] if isinstance(tgt, list) else tgt[k]
        last = keys[-1]
        if value is KeyError:
            del tgt[last]
        elif isinstance(tgt, list):
            tgt[int(last)] = value
        else:
            tgt[last] = value
        return d

    return f


@pytest.mark.parametrize(
    "mutate,match",
    [
        (_mutate("<root>", ["a"]), "expected a mapping"),
        (_mutate("<root>", None), "expected a mapping"),
        (_mutate("version", 2), "'version' must be 1"),
        (_mutate("version", KeyError), "'version' must be 1"),
        (_mutate("block", 48), "'block' must be a power of two"),
        (_mutate("block", True), "'block' must be a power of two"),
        (_mutate("block", "32"), "'block' must be a power of two"),
        (_mutate("layers", []), "'layers' must be a non-empty list"),
        (_mutate("layers", {"a": 1}), "'layers' must be a non-empty list"),
        (_mutate("budget", "0.3"), "'budget' must be a number"),
        (_mutate("layers.0", "emb"), "layers[0]: expected a mapping"),
        (_mutate("layers.0.name", KeyError), "'name' must be a non-empty string"),
        (_mutate("layers.0.name", 7), "'name' must be a non-empty string"),
        (_mutate("layers.0.type", "conv"), "unknown 'type'"),
        (_mutate("layers.0.type", [1]), "unknown 'type'"),
        (_mutate("layers.0.in", 0), "'in' must be a positive integer"),
        (_mutate("layers.0.out", "512"), "'out' must be a positive integer"),
        (_mutate("layers.0.rows", KeyError), "'rows' must be a positive integer"),
        (_mutate("layers.0.calls", 1.5), "'calls' must be a positive integer"),
        (_mutate("layers.0.action", "prune"), "'action' must be 'sparse' or 'dense'"),
        (_mutate("layers.1.pattern", KeyError), "needs a 'pattern' mapping"),
        (_mutate("layers.1.name", "emb"), "layer 'emb' appears twice"),
    ],
)
def test_malformed_plans_give_one_line_errors(tmp_path, mutate, match):
    d = mutate(copy.deepcopy(plan_dict()))
    with pytest.raises(PlanError) as ei:
        load_text(tmp_path, d)
    msg = one_line(ei)
    assert match in msg and str(tmp_path / "plan.yaml") in msg, msg


@pytest.mark.parametrize(
    "mutate,match",
    [
        (_mutate("budget", 7), "'budget' must be a number in (0, 1] or null, got 7"),
        (_mutate("budget", 0), "'budget' must be a number in (0, 1] or null, got 0"),
        (_mutate("budget", -0.3), "got -0.3"),
        (_mutate("budget", float("nan")), "got nan"),
        (_mutate("policy", "garbage"), "policy: expected a mapping"),
        (_mutate("policy", [1, 2]), "policy: expected a mapping"),
        (_mutate("policy", {"bogus": 1}), "policy: unknown key 'bogus'"),
        (_mutate("policy", {"size_exponent": 99}), "'size_exponent' must be in [0, 4]"),
        (_mutate("policy", {"types": {"mlp": {"floor": 2}}}), "types.mlp.floor"),
    ],
)
def test_budget_and_policy_of_a_plan_are_checked(tmp_path, mutate, match):
    """Issue #11.6: they were accepted and copied into every plan written from this one."""
    d = mutate(copy.deepcopy(plan_dict()))
    with pytest.raises(PlanError) as ei:
        load_text(tmp_path, d)
    msg = one_line(ei)
    assert match in msg and str(tmp_path / "plan.yaml") in msg, msg


def test_a_plans_policy_may_be_partial_or_missing(tmp_path):
    for policy in (None, {}, {"attention_min_seq": 4096}):
        d = copy.deepcopy(plan_dict())
        d["policy"] = policy
        assert load_text(tmp_path, d).policy == (policy or {})


@pytest.mark.parametrize(
    "text,match",
    [
        ("version: [1\n", "line"),
        ("a: b: c\n", "line 1"),
        ("\tversion: 1\n", "plan.yaml"),
        ("", "expected a mapping"),
    ],
)
def test_invalid_yaml(tmp_path, text, match):
    with pytest.raises(PlanError) as ei:
        load_text(tmp_path, text)
    assert match in one_line(ei)


def test_unreadable_plan_files(tmp_path):
    with pytest.raises(PlanError, match="no such file") as ei:
        Plan.load(tmp_path / "missing.yaml")
    one_line(ei)
    with pytest.raises(PlanError) as ei:
        Plan.load(tmp_path)  # a directory
    one_line(ei)
    b = tmp_path / "bin.yaml"
    b.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(PlanError) as ei:
        Plan.load(b)
    assert str(b) in one_line(ei)


# -- fitting a plan to a model ----------------------------------------------------------------
def test_check_against_takes_rows_from_the_schema():
    p = plan_schema(schema(), 0.3, 32)
    bigger = schema().with_rows(4)
    q = Plan.from_dict(p.to_dict()).check_against(bigger)
    assert q["l0.fc1"].gemm.rows == 512 and q["l0.fc1"].pattern == p["l0.fc1"].pattern
    assert q["l0.fc1"].gemm.bias  # the schema's GEMM, not the plan's summary of it


def test_check_against_another_model():
    p = Plan.from_dict(plan_dict())
    other = ModelSchema("other", [Gemm("x", LayerType.MLP, 512, 512, rows=1)])
    with pytest.raises(PlanError, match="is not in model 'other'") as ei:
        p.check_against(other, "p.yaml")
    msg = one_line(ei)
    assert msg.startswith("p.yaml: ") and "(5 such layers)" in msg
    fewer = ModelSchema("toy", [g for g in schema() if g.name != "emb"])
    with pytest.raises(PlanError, match="layer 'emb' is not in model"):
        p.check_against(fewer)
    more = ModelSchema("toy", [*schema(), Gemm("extra", LayerType.MLP, 512, 512, rows=1)])
    with pytest.raises(PlanError, match="has GEMM 'extra' that the plan lacks"):
        p.check_against(more)
    reshaped = ModelSchema(
        "toy", [Gemm(g.name, g.type, g.in_features * 2, g.out_features, g.rows) for g in schema()]
    )
    with pytest.raises(PlanError, match="is 512x512 in the plan but 512x1024 in the model"):
        p.check_against(reshaped)


@pytest.mark.parametrize(
    "other_name",
    ["vit-s16", "gpt2-medium", "mixer-b16"],
)
def test_check_against_another_shipped_model(other_name):
    p = plan_schema(ModelSchema.load(ROOT / "schemas" / "vit-b16.yaml"), 0.3, 32)
    other = ModelSchema.load(ROOT / "schemas" / f"{other_name}.yaml")
    with pytest.raises(PlanError) as ei:
        Plan.from_dict(p.to_dict()).check_against(other)
    one_line(ei)


def test_shared_and_activation_gemms_cannot_be_sparsified_by_a_plan(tmp_path):
    d = plan_dict()
    for lp in d["layers"]:
        if lp["name"] in ("head", "l0.attn.scores"):
            lp["action"] = "sparse"
    d["layers"][4]["pattern"] = {"butterfly": 4, "factors": 1, "pattern_block": 128}
    d["layers"][3]["action"] = "dense"
    p = load_text(tmp_path, d)
    with pytest.raises(PlanError, match="'head' shares its weight with emb") as ei:
        p.check_against(schema())
    one_line(ei)
    d = plan_dict()
    d["layers"][3]["action"] = "sparse"
    d["layers"][3]["pattern"] = {"butterfly": 4, "factors": 1, "pattern_block": 32}
    p = load_text(tmp_path, d)
    with pytest.raises(PlanError, match="'l0.attn.scores' is an activation GEMM") as ei:
        p.check_against(schema())
    one_line(ei)


def test_plan_without_budget_is_accepted(tmp_path):
    d = plan_dict()
    del d["budget"]
    del d["summary"]
    p = load_text(tmp_path, d).check_against(schema())
    assert p.budget is None and p.note == ""


# -- attention patterns ----------------------------------------------------------------------
def long_schema(seq: int = 4096) -> ModelSchema:
    return ModelSchema(
        "long",
        [
            Gemm("l0.mlp", LayerType.MLP, 768, 3072, rows=seq),
            Gemm(
                "l0.attn.scores", LayerType.ATTN_SCORES, 64, seq, rows=12 * seq, heads=12, seq=seq
            ),
            Gemm(
                "l0.attn.values", LayerType.ATTN_VALUES, seq, 64, rows=12 * seq, heads=12, seq=seq
            ),
        ],
    )


def test_attention_pattern_round_trips_and_counts(tmp_path):
    from pxcompile.patterns import AttentionSpec

    p = plan_schema(long_schema(), 0.3, 32)
    lp = p["l0.attn.scores"]
    assert isinstance(lp.pattern, AttentionSpec) and lp.attention == p["l0.attn.values"].attention
    assert lp.params == 0 and lp.kept_per_row is None
    assert lp.density == pytest.approx(lp.attention.compute_fraction(4096))
    assert lp.mask(32).shape == (64, 64)  # over 64-token sequence blocks
    assert [x.name for x in p.sparse_attention_layers] == ["l0.attn.scores", "l0.attn.values"]
    assert [x.name for x in p.sparse_weight_layers] == ["l0.mlp"]
    s = p.summary
    assert 0 < s.attention_share < 1 and s.attention_kept == pytest.approx(2 * lp.flops, rel=1e-9)
    d = p.to_dict()
    row = d["layers"][1]
    assert row["pattern"] == lp.attention.to_dict() and row["seq"] == 4096 and row["heads"] == 12
    assert "attention_share" in d["summary"]
    path = tmp_path / "p.yaml"
    p.save(path)
    again = Plan.load(path)
    assert again.to_yaml() == p.to_yaml()
    assert again.check_against(long_schema()).to_yaml() == p.to_yaml()


@pytest.mark.parametrize(
    "pattern, match",
    [
        ({"block": 64, "factors": 4}, r"pattern.globals must be a non-negative integer"),
        ({"block": 64, "factors": 4, "globals": 1, "rank": 2}, "unknown field 'rank'"),
        ({"block": 0, "factors": 4, "globals": 1}, "pattern.block must be a positive"),
        ({"block": 64, "factors": 99, "globals": 1}, r"factors must be in \[1, 30\]"),
        ({"block": 4096, "factors": 1, "globals": 3}, "does not fit: 3 global blocks exceed"),
    ],
)
def test_bad_attention_patterns_name_the_layer(tmp_path, pattern, match):
    d = plan_schema(long_schema(), 0.3, 32).to_dict()
    d["layers"][1]["pattern"] = pattern
    with pytest.raises(PlanError, match=match) as ei:
        load_text(tmp_path, d)
    assert "l0.attn.scores" in one_line(ei)


def test_attention_pattern_on_a_weight_and_missing_seq(tmp_path):
    d = plan_schema(long_schema(), 0.3, 32).to_dict()
    d["layers"][0]["type"] = "attn_scores"  # a weight GEMM's row, typed as attention
    d["layers"][0]["pattern"] = {"block": 64, "factors": 2, "globals": 1}
    with pytest.raises(PlanError, match="needs its sequence length 'seq'"):
        load_text(tmp_path, d)
    d = plan_schema(long_schema(), 0.3, 32).to_dict()
    d["layers"][0]["pattern"] = {"block": 64, "factors": 2, "globals": 1}
    with pytest.raises(PlanError, match="unknown field 'block'"):
        load_text(tmp_path, d)  # an mlp layer takes a butterfly pattern


# -- padded patterns (issue #12.3) ------------------------------------------------------------
def padded_plan() -> Plan:
    g = Gemm("tok.fc1", LayerType.TOKEN_MIX, 196, 384, rows=6144, bias=True)
    spec = PatternSpec(12, 1, 32, 8, padded_in=384)
    dense = Gemm("ch.fc1", LayerType.MLP, 768, 3072, rows=1568)
    return Plan(
        "padded", 32, 0.3, [LayerPlan(g, spec, "allocated 0.350"), LayerPlan(dense, None, "x")]
    )


def test_padded_pattern_round_trips_and_counts_its_padding(tmp_path):
    p = padded_plan()
    lp = p["tok.fc1"]
    assert lp.padding == "padded in 196->384"
    assert lp.density == pytest.approx((2 * 12 * 32 * 32 + 8 * 768) / (196 * 384))
    assert lp.flops == pytest.approx(lp.gemm.flops * lp.density)
    assert lp.params == 24 * 32 * 32 + 8 * (384 + 384) + 384  # padded blocks and factors
    assert lp.mask(32).shape == (12, 12) and p.masks()["tok.fc1"].shape == (12, 12)
    d = p.to_dict()
    assert d["layers"][0]["pattern"]["padded_in"] == 384
    assert "padded_out" not in d["layers"][0]["pattern"]
    f = tmp_path / "p.yaml"
    p.save(f)
    back = Plan.load(f)
    assert back["tok.fc1"].pattern == lp.pattern and back.to_yaml() == p.to_yaml()


def test_old_plans_without_padding_still_load():
    d = plan_dict()
    assert all("padded_in" not in lp.get("pattern", {}) for lp in d["layers"])
    p = Plan.from_dict(d)
    assert not any(lp.pattern.padded for lp in p.sparse_weight_layers)


@pytest.mark.parametrize(
    "padding,match",
    [
        ({"padded_in": 160}, "padded 'in'=160 is smaller than the weight's 196"),
        ({"padded_in": 768}, "padded 'in'=768 is more than 2x the weight's 196"),
        ({"padded_in": 256}, "'in'=196 padded to 256 is not a multiple of butterfly 12"),
        ({"padded_out": 768}, "'in'=196 is not a multiple"),  # padding the wrong side
        ({"padded_in": "384"}, "pattern.padded_in must be a non-negative integer"),
        ({"padded_in": -384}, "pattern.padded_in must be a non-negative integer"),
        ({"padded_in": True}, "pattern.padded_in must be a non-negative integer"),
    ],
)
def test_bad_padding_in_a_plan_names_the_layer(tmp_path, padding, match):
    d = padded_plan().to_dict()
    pat = d["layers"][0]["pattern"]
    pat.pop("padded_in")
    pat.update(padding)
    with pytest.raises(PlanError) as ei:
        load_text(tmp_path, d)
    msg = one_line(ei)
    assert "layers[0] (tok.fc1)" in msg and match in msg, msg


def test_padding_that_keeps_more_than_the_weight_is_refused(tmp_path):
    d = padded_plan().to_dict()
    d["layers"][0]["pattern"].update(butterfly=4, factors=1, rank=0, padded_out=768)  # 1.96
    with pytest.raises(PlanError) as ei:
        load_text(tmp_path, d)
    assert "keeps the whole weight (padding included)" in one_line(ei)


def test_a_plan_records_the_cpu_kernel_its_cost_model_priced(tmp_path):
    """The layer runs the kernel the plan's cost model priced (a calibrated cost file too),
    not the one the shipped constants would pick; an edited kernel is applied as written."""
    d = plan_dict()
    fc1 = next(lp for lp in d["layers"] if lp["name"] == "l0.fc1")
    assert fc1["kernel"] == cpu_execution(2048, 512, PatternSpec(**fc1["pattern"]))
    assert "kernel" not in next(lp for lp in d["layers"] if lp["name"] == "emb")
    priced_out = plan_schema(schema(), 0.3, 32, cost_model=CalibratedCost(group_move=1e9))
    assert priced_out.sparse_weight_layers
    assert {lp.kernel for lp in priced_out.sparse_weight_layers} == {"gather"}
    flops = plan_schema(schema(), 0.3, 32, cost_model=FlopsBlockCost())  # prices no kernel
    assert all(lp.kernel is None for lp in flops.sparse_weight_layers)
    other = "gather" if fc1["kernel"] == "grouped" else "grouped"
    fc1["kernel"] = other
    p = load_text(tmp_path, d)
    assert p["l0.fc1"].kernel == other
    assert yaml.safe_load(p.to_yaml())["layers"][1]["kernel"] == other
    del fc1["kernel"]  # plans written before kernels were recorded: the layer chooses
    assert load_text(tmp_path, d)["l0.fc1"].kernel is None


@pytest.mark.parametrize(
    ("value", "match"),
    [("fast", "'kernel' must be one of grouped, gather, got 'fast'"), (1, "got 1")],
)
def test_a_bad_kernel_names_the_layer(tmp_path, value, match):
    d = plan_dict()
    d["layers"][1]["kernel"] = value
    with pytest.raises(PlanError) as ei:
        load_text(tmp_path, d)
    msg = one_line(ei)
    assert match in msg and "l0.fc1" in msg, msg
