"""Tests for pxcompile.policy: defaults, name rules, overrides and one-line errors."""

from __future__ import annotations

import pytest

from pxcompile.errors import PolicyError, PxError
from pxcompile.policy import NameRule, Policy, TypeRule
from pxcompile.schema import Gemm, LayerType

MLP = Gemm("blocks.0.mlp.fc1", LayerType.MLP, 768, 3072, rows=64)
QKV = Gemm("blocks.0.attn.qkv", LayerType.ATTN_PROJ, 768, 2304, rows=64)
HEAD = Gemm("head", LayerType.HEAD, 768, 1000, rows=8)


def one_line_policy_error(fn, *args, match: str | None = None) -> str:
    with pytest.raises(PolicyError) as ei:
        fn(*args)
    msg = str(ei.value)
    assert msg and "\n" not in msg
    assert isinstance(ei.value, PxError) and ei.value.exit_code == 2
    if match is not None:
        assert match in msg, msg
    return msg


# -- defaults ---------------------------------------------------------------------------------
def test_default_types():
    p = Policy()
    eligible = {t for t, r in p.types.items() if r.eligible}
    assert eligible == {
        LayerType.MLP,
        LayerType.ATTN_PROJ,
        LayerType.TOKEN_MIX,
        LayerType.OTHER,
        LayerType.ATTN_SCORES,
        LayerType.ATTN_VALUES,
    }
    assert set(p.types) == set(LayerType)
    assert p.min_blocks == 4 and p.rank is None
    assert p.attention_min_seq == 2048 and p.types[LayerType.ATTN_SCORES].ceiling == 0.25


def test_defaults_round_trip_through_plain_data():
    p = Policy()
    assert Policy.from_dict(p.to_dict()) == p
    q = Policy.from_dict(
        {"rules": [{"match": "re:.*attn.*", "dense": True}], "rank": 16, "size_exponent": 0.5}
    )
    assert Policy.from_dict(q.to_dict()) == q
    assert q.to_dict()["rules"] == [{"match": "re:.*attn.*", "dense": True}]


def test_from_dict_none_is_base():
    base = Policy(min_blocks=2)
    assert Policy.from_dict(None, base=base) is base


# -- resolution -------------------------------------------------------------------------------
def test_resolve_eligible_and_type_dense():
    p = Policy()
    r = p.resolve(MLP, 32)
    assert r.dense_reason is None and (r.floor, r.ceiling) == (0.05, 0.9)
    assert r.pinned is None and r.rank is None
    assert p.resolve(HEAD, 32).dense_reason == "type head stays dense (policy)"
    emb = Gemm("wte", LayerType.EMBEDDING, 768, 768, rows=8)
    assert "embedding" in p.resolve(emb, 32).dense_reason


@pytest.mark.parametrize(
    "match,hit",
    [
        ("blocks.0.attn.qkv", True),  # exact
        ("blocks.0.attn", False),  # exact means the whole name
        ("*attn*", True),  # glob
        ("blocks.?.attn.*", True),
        ("*mlp*", False),
        ("re:.*attn.*", True),  # regex, full match
        ("re:attn", False),  # not a search: the whole name must match
        ("re:blocks\\.[0-9]+\\.attn\\.qkv", True),
    ],
)
def test_name_rule_matching(match, hit):
    assert NameRule(match).matches(QKV.name) is hit
    r = Policy().with_dense([match]).resolve(QKV, 32)
    if hit:
        assert r.dense_reason == f"kept dense by rule {match!r}"
    else:
        assert r.dense_reason is None


def test_rule_can_make_a_dense_type_eligible_and_last_rule_wins():
    p = Policy.from_dict({"rules": [{"match": "head", "dense": False}]})
    head = Gemm("head", LayerType.HEAD, 768, 1024, rows=8)
    assert p.resolve(head, 32).dense_reason is None
    p2 = Policy.from_dict(
        {
            "rules": [
                {"match": "*mlp*", "dense": True, "floor": 0.1, "rank": 8},
                {"match": "re:.*fc1", "dense": False, "ceiling": 0.5, "density": 0.25},
            ]
        }
    )
    r = p2.resolve(MLP, 32)
    assert r.dense_reason is None
    assert (r.floor, r.ceiling, r.pinned, r.rank) == (0.1, 0.5, 0.25, 8)
    fc2 = Gemm("blocks.0.mlp.fc2", LayerType.MLP, 3072, 768, rows=64)
    assert p2.resolve(fc2, 32).dense_reason == "kept dense by rule '*mlp*'"


def test_type_settings_and_pins():
    p = Policy.from_dict(
        {
            "types": {"attn_proj": {"eligible": False}, "mlp": {"floor": 0.2, "ceiling": 0.6}},
            "rules": [{"match": "*fc1", "density": 0.3}],
        }
    )
    assert p.resolve(QKV, 32).dense_reason == "type attn_proj stays dense (policy)"
    r = p.resolve(MLP, 32)
    assert (r.floor, r.ceiling, r.pinned) == (0.2, 0.6, 0.3)


def test_shared_weight_stays_dense_with_reason_even_if_a_rule_asks():
    g = Gemm("lm_head", LayerType.MLP, 768, 1024, rows=8, shared_with="wte")
    assert Policy().resolve(g, 32).dense_reason == "weight shared with wte"
    p = Policy.from_dict({"rules": [{"match": "lm_head", "dense": False}]})
    assert p.resolve(g, 32).dense_reason == "weight shared with wte"


def test_attention_gemm_is_eligible_only_from_attention_min_seq():
    short = Gemm("attn.scores", LayerType.ATTN_SCORES, 64, 1024, rows=1024, heads=12, seq=1024)
    p = Policy.from_dict({"rules": [{"match": "attn.scores", "dense": False}]})
    assert "under attention_min_seq 2048" in p.resolve(short, 32).dense_reason
    long = Gemm("attn.scores", LayerType.ATTN_SCORES, 64, 4096, rows=4096, heads=12, seq=4096)
    assert p.resolve(long, 32).dense_reason is None
    # ... and the block rules of weights don't apply: 64-wide heads are fine at block 128
    assert Policy().resolve(long, 128).dense_reason is None
    assert Policy(attention_min_seq=8192).resolve(long, 32).dense_reason is not None
    unknown = Gemm("attn.values", LayerType.ATTN_VALUES, 4096, 64, rows=4096)
    assert "unknown sequence length" in Policy().resolve(unknown, 32).dense_reason
    off = Policy.from_dict({"types": {"attn_scores": {"eligible": False}}})
    assert "stays dense (policy)" in off.resolve(long, 32).dense_reason


def test_attention_fields_round_trip_and_validate():
    p = Policy().with_overrides(["attention_min_seq=4096", "attention_block=32"])
    assert (p.attention_min_seq, p.attention_block, p.attention_globals) == (4096, 32, 1)
    assert Policy.from_dict(p.to_dict()) == p
    for bad in ("attention_min_seq=0", "attention_block=-1", "attention_globals=-2"):
        with pytest.raises(PolicyError, match=bad.split("=")[0]):
            Policy().with_overrides([bad])


def test_small_and_misaligned_layers_stay_dense_with_reason():
    p = Policy()
    small = Gemm("tiny", LayerType.MLP, 96, 1024, rows=8)  # 3 blocks of 32 on a side
    assert p.resolve(small, 32).dense_reason == "under 4 blocks of 32 on a side"
    assert p.resolve(small, 16).dense_reason is None  # 6 blocks of 16
    ok = Gemm("four", LayerType.MLP, 128, 128, rows=8)
    assert p.resolve(ok, 32).dense_reason is None
    assert Policy(min_blocks=8).resolve(ok, 32).dense_reason == "under 8 blocks of 32 on a side"
    odd_in = Gemm("tok", LayerType.TOKEN_MIX, 196, 384, rows=8)
    odd_out = Gemm("tok2", LayerType.TOKEN_MIX, 384, 200, rows=8)
    # pad: auto (the default) leaves misaligned layers to the mapping pass (padded patterns)
    assert p.resolve(odd_in, 32).dense_reason is None and p.resolve(odd_in, 32).pad
    never = Policy(pad="never")
    assert never.resolve(odd_in, 32).dense_reason == "'in'=196 is not a multiple of block 32"
    assert never.resolve(odd_out, 32).dense_reason == "'out'=200 is not a multiple of block 32"
    assert not never.resolve(ok, 32).pad


def test_ceiling_never_below_floor_after_rules():
    p = Policy.from_dict({"rules": [{"match": "*", "floor": 0.7}]})
    r = p.resolve(MLP, 32)
    assert r.floor == 0.7 and r.ceiling == 0.9
    p = Policy.from_dict({"rules": [{"match": "*", "floor": 0.7, "ceiling": 0.5}]})
    r = p.resolve(MLP, 32)
    assert r.ceiling >= r.floor


# -- overrides ----------------------------------------------------------------------------
def test_with_overrides():
    p = Policy().with_overrides(
        [
            "types.attn_proj.eligible=false",
            "size_exponent=0.5",
            "rank=32",
            "min_blocks=2",
            "types.mlp.ceiling=0.5",
            "rules=[{match: 're:.*fc2', density: 0.2}]",
        ]
    )
    assert p.types[LayerType.ATTN_PROJ].eligible is False
    assert p.types[LayerType.MLP] == TypeRule(True, 0.05, 0.5)
    assert (p.size_exponent, p.rank, p.min_blocks) == (0.5, 32, 2)
    assert p.rules == (NameRule("re:.*fc2", density=0.2),)
    assert p.with_overrides(["rank=auto"]).rank is None


def test_with_dense_appends_rules():
    p = Policy().with_dense(["re:.*attn.*", "head"])
    assert p.rules == (NameRule("re:.*attn.*", dense=True), NameRule("head", dense=True))


@pytest.mark.parametrize(
    "assignment,match",
    [
        ("size_exponent", "expected KEY=VALUE"),
        ("nonsense=1", "unknown key 'nonsense'"),
        ("types.mlp.floor=2", "must be in (0, 1]"),
        ("types.mlp.floor=0.95", "floor 0.95 > ceiling 0.9"),
        ("types.bogus.eligible=true", "unknown layer type 'bogus'"),
        ("types.mlp.eligible=maybe", "expected true or false"),
        ("types.mlp.color=red", "expected keys eligible, floor, ceiling"),
        ("types.mlp=3", "expected keys eligible, floor, ceiling"),
        ("types=3", "'types' must be a mapping"),
        ("rank=-1", "'rank' must be >= 0"),
        ("rank=1.5", "expected an integer"),
        ("rank=true", "expected an integer"),
        ("min_blocks=0", "'min_blocks' must be >= 1"),
        ("max_pattern_block=3", "must be a power of two"),
        ("size_exponent=9", "'size_exponent' must be in [0, 4]"),
        ("size_exponent=abc", "expected a number"),
        ("lowrank_share=1", "'lowrank_share' must be in [0, 1)"),
        ("rank_multiple=0", "'rank_multiple' must be >= 1"),
        ("rules=3", "'rules' must be a list"),
        ("rules=[{dense: true}]", "expected a mapping with 'match'"),
        ("rules=[{match: ''}]", "'match' must be a non-empty string"),
        ("rules=[{match: a, colour: red}]", "unknown key 'colour'"),
        ("rules=[{match: 're:(('}]", "bad regular expression"),
        ("rules=[{match: a, density: 0}]", "must be in (0, 1]"),
        ("rules=[{match: a, density: 1.5}]", "must be in (0, 1]"),
        ("rules=[{match: a, rank: -8}]", "rank"),
        ("rules=[{match: a, dense: 1}]", "expected true or false"),
        ("rank=[unclosed", "--set"),
        ("rules=[{match: a", "--set"),
    ],
)
def test_bad_overrides_give_one_line_errors(assignment, match):
    msg = one_line_policy_error(Policy().with_overrides, [assignment], match=match)
    if "=" in assignment:
        assert msg.startswith("--set ")


def test_bad_dense_regex_is_a_one_line_error():
    one_line_policy_error(Policy().with_dense, ["re:(("], match="bad regular expression")


# -- files ------------------------------------------------------------------------------------
def test_load_policy_file_with_rules_and_types(tmp_path):
    f = tmp_path / "policy.yaml"
    f.write_text(
        "types:\n"
        "  attn_proj: {eligible: false}\n"
        "  head: {eligible: true, floor: 0.1}\n"
        "rules:\n"
        "  - {match: 're:.*fc2', density: 0.25, rank: 16}\n"
        "size_exponent: 0.5\n"
        "rank: auto\n"
    )
    p = Policy.load(f)
    assert not p.types[LayerType.ATTN_PROJ].eligible
    assert p.types[LayerType.HEAD] == TypeRule(True, 0.1, 0.9)
    assert p.rules == (NameRule("re:.*fc2", density=0.25, rank=16),)
    assert p.size_exponent == 0.5 and p.rank is None
    # a file's rules come after the base's
    base = Policy().with_dense(["head"])
    assert Policy.load(f, base=base).rules[0] == NameRule("head", dense=True)


def test_empty_policy_file_is_the_default(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("")
    assert Policy.load(f) == Policy()


@pytest.mark.parametrize(
    "text,match",
    [
        ("- a\n- b\n", "expected a mapping"),
        ("bogus: 1\n", "unknown key 'bogus'"),
        ("types: {mlp: {floor: -1}}\n", "must be in (0, 1]"),
        ("rules: [{match: x, density: 2}]\n", "must be in (0, 1]"),
        ("rank: [1, 2]\n", "expected an integer"),
        ("size_exponent: [\n", "invalid YAML"),
        ("a: b: c\n", "invalid YAML"),
    ],
)
def test_bad_policy_files_give_one_line_errors(tmp_path, text, match):
    f = tmp_path / "policy.yaml"
    f.write_text(text)
    msg = one_line_policy_error(Policy.load, f, match=match)
    assert str(f) in msg


def test_unreadable_policy_files(tmp_path):
    one_line_policy_error(Policy.load, tmp_path / "missing.yaml", match="no such file")
    one_line_policy_error(Policy.load, tmp_path, match=str(tmp_path))  # a directory
    b = tmp_path / "binary.yaml"
    b.write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    one_line_policy_error(Policy.load, b, match=str(b))


def test_direct_construction_is_validated():
    with pytest.raises(PolicyError, match="floor"):
        Policy(types={**Policy().types, LayerType.MLP: TypeRule(True, floor=0.0)})
    with pytest.raises(PolicyError, match="rank"):
        Policy(rules=(NameRule("x", rank=-1),))


def test_pad_setting_round_trips_validates_and_rules_override_it():
    """``pad: auto|never`` (issue #12.3): YAML, --set, and per name in rules."""
    assert Policy().pad == "auto" and Policy().to_dict()["pad"] == "auto"
    p = Policy().with_overrides(["pad=never"])
    assert p.pad == "never" and Policy.from_dict(p.to_dict()) == p
    tok = Gemm("blocks.0.mlp_tokens.fc1", LayerType.TOKEN_MIX, 196, 384, rows=8)
    q = Policy.from_dict({"pad": "never", "rules": [{"match": "*mlp_tokens*", "pad": "auto"}]})
    assert q.resolve(tok, 32).pad and q.resolve(tok, 32).dense_reason is None
    assert Policy.from_dict(q.to_dict()) == q
    r = Policy.from_dict({"rules": [{"match": "*mlp_tokens*", "pad": "never"}]})
    assert r.resolve(tok, 32).dense_reason == "'in'=196 is not a multiple of block 32"
    for bad, match in (
        ("pad=always", "expected auto or never, got 'always'"),
        ("pad=true", "expected auto or never, got True"),
        ("rules=[{match: a, pad: sometimes}]", "expected auto or never"),
    ):
        one_line_policy_error(Policy().with_overrides, [bad], match=match)
    with pytest.raises(PolicyError, match="'pad' must be auto or never"):
        Policy(pad="maybe")
    with pytest.raises(PolicyError, match=r"rules\[0\] \(a\).pad must be auto or never"):
        Policy(rules=(NameRule("a", pad="x"),))


# -- cost_model (issue #12.4) -----------------------------------------------------------------
COST = "kind: calibrated\nname: box\nmove: 100\nper_block: 200\nlowrank: 3\n"


def test_cost_model_key(tmp_path):
    assert Policy().cost_model is None and "cost_model" not in Policy().to_dict()
    p = Policy.from_dict({"cost_model": "flops+blocks"})
    assert p.cost_model == "flops+blocks" and p.to_dict()["cost_model"] == "flops+blocks"
    assert Policy.from_dict(p.to_dict()) == p
    assert Policy().with_overrides(["cost_model=flops+blocks"]).cost_model == "flops+blocks"
    # a relative file is found beside the policy file
    (tmp_path / "cost.yaml").write_text(COST)
    (tmp_path / "policy.yaml").write_text("cost_model: cost.yaml\n")
    assert Policy.load(tmp_path / "policy.yaml").cost_model == str(tmp_path / "cost.yaml")


def test_min_speedup_key():
    assert Policy().min_speedup is None and "min_speedup" not in Policy().to_dict()
    p = Policy.from_dict({"min_speedup": 0})
    assert p.min_speedup == 0 and Policy.from_dict(p.to_dict()) == p
    assert Policy().with_overrides(["min_speedup=1.5"]).min_speedup == 1.5
    for bad, msg in ((-1, "must be in \\[0, 100\\]"), ("x", "expected a number")):
        with pytest.raises(PolicyError, match=msg):
            Policy.from_dict({"min_speedup": bad})


@pytest.mark.parametrize("value", [3, ["a"], ""])
def test_bad_cost_model_values(value):
    with pytest.raises(PolicyError, match="cost_model"):
        Policy.from_dict({"cost_model": value})


def test_planning_uses_the_policys_cost_model(tmp_path):
    from pxcompile.cost_file import CostModelError
    from pxcompile.passes.budget import plan_schema
    from pxcompile.passes.mapping import COST_MODELS
    from pxcompile.schema import ModelSchema

    (tmp_path / "cost.yaml").write_text(COST)
    s = ModelSchema("m", [Gemm("fc", LayerType.MLP, 768, 3072, rows=64)])
    plan = plan_schema(s, 0.3, 32, Policy(cost_model=str(tmp_path / "cost.yaml")))
    assert plan.cost_model == "box"
    # an explicit cost model (--cost-model) wins over the policy's
    explicit = plan_schema(s, 0.3, 32, Policy(cost_model="box.yaml"), COST_MODELS["flops+blocks"])
    assert explicit.cost_model == "flops+blocks"
    with pytest.raises(CostModelError, match="^policy cost_model nope.yaml: neither"):
        plan_schema(s, 0.3, 32, Policy(cost_model="nope.yaml"))
