"""Tests for pxcompile.schema: the Gemm/ModelSchema IR, its YAML format and the shipped schemas."""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pxcompile.errors import PxError, SchemaError
from pxcompile.schema import (
    MAX_COUNT,
    MAX_DIM,
    MAX_GEMMS,
    SCHEMA_VERSION,
    Gemm,
    LayerType,
    ModelSchema,
    compact_entries,
    human,
    total_flops,
)

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "schemas"
SHIPPED = sorted(SCHEMAS.glob("*.yaml"))


def _generator():
    spec = importlib.util.spec_from_file_location("schemas_generate", SCHEMAS / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny() -> ModelSchema:
    return ModelSchema(
        "tiny",
        [
            Gemm("fc1", LayerType.MLP, 256, 1024, rows=64, bias=True),
            Gemm("attn.scores", LayerType.ATTN_SCORES, 64, 16, rows=128, heads=2, seq=16),
            Gemm("fc2", LayerType.MLP, 1024, 256, rows=64, calls=3),
            Gemm("head", LayerType.HEAD, 256, 10, rows=4, shared_with="embed"),
        ],
        description="a tiny model",
        meta={"batch": 4, "seq": 16, "source": "test"},
    )


# -- Gemm and LayerType ---------------------------------------------------------------------


def test_gemm_flops_params_shape():
    g = Gemm("h.0.mlp.c_fc", LayerType.MLP, 768, 3072, rows=1024)
    assert g.flops == 2 * 1024 * 768 * 3072 == 4831838208
    assert g.params == 768 * 3072
    assert g.shape == (3072, 768)  # torch stores (out, in)
    assert g.has_weight


def test_gemm_bias_and_calls():
    g = Gemm("fc", LayerType.MLP, 10, 20, rows=5, calls=3, bias=True)
    assert g.params == 10 * 20 + 20
    assert g.flops == 2 * 5 * 10 * 20 * 3


def test_activation_gemm_has_no_params():
    g = Gemm("a.scores", LayerType.ATTN_SCORES, 64, 197, rows=12 * 197, heads=12, seq=197)
    assert not g.has_weight
    assert g.params == 0
    assert g.flops == 2 * 12 * 197 * 64 * 197


@pytest.mark.parametrize("t", list(LayerType))
def test_layer_type_is_activation(t):
    assert t.is_activation == (t in (LayerType.ATTN_SCORES, LayerType.ATTN_VALUES))
    assert str(t) == t.value
    assert LayerType(t.value) is t


def test_schema_basics():
    s = tiny()
    assert len(s) == 4
    assert [g.name for g in s] == ["fc1", "attn.scores", "fc2", "head"]
    assert s["fc2"].calls == 3
    with pytest.raises(KeyError):
        s["nope"]
    assert s.flops == sum(g.flops for g in s) == total_flops(s.gemms)
    assert [g.name for g in s.weight_gemms] == ["fc1", "fc2", "head"]


def test_with_rows():
    s = tiny().with_rows(0.5)
    assert [g.rows for g in s] == [32, 64, 32, 2]
    assert tiny().with_rows(1e-9)["head"].rows == 1  # never below one row
    assert tiny().with_rows(2.0).flops == 2 * tiny().flops


def test_duplicate_names_in_constructor():
    g = Gemm("fc", LayerType.MLP, 4, 4, rows=1)
    with pytest.raises(SchemaError, match=r"gemms\[1\] \(fc\): duplicate name"):
        ModelSchema("m", [g, g])


def test_human():
    assert human(0) == "0"
    assert human(1234567) == "1.23M"
    assert human(999) == "999"
    assert human(2.5e12) == "2.5T"


# -- YAML round trip --------------------------------------------------------------------


def test_yaml_round_trip():
    s = tiny()
    text = s.to_yaml()
    assert ModelSchema.from_yaml(text) == s
    assert ModelSchema.from_yaml(text).to_yaml() == text


def test_to_dict_omits_defaults():
    d = Gemm("fc", LayerType.MLP, 4, 8, rows=2).to_dict()
    assert d == {"name": "fc", "type": "mlp", "in": 4, "out": 8, "rows": 2}
    d = tiny().to_dict()
    assert list(d) == ["version", "name", "description", "meta", "gemms"]
    assert list(ModelSchema("m", [Gemm("fc", LayerType.MLP, 4, 8, rows=2)]).to_dict()) == [
        "version",
        "name",
        "gemms",
    ]


def test_save_and_load(tmp_path):
    path = tmp_path / "sub" / "tiny.yaml"
    tiny().save(path)
    assert ModelSchema.load(path) == tiny()
    assert path.read_text() == tiny().to_yaml()
    assert not [p for p in path.parent.iterdir() if p.name != "tiny.yaml"]  # no temp files


def test_name_defaults_to_file_stem(tmp_path):
    path = tmp_path / "my-model.yaml"
    path.write_text("version: 1\ngemms:\n- {name: fc, type: mlp, in: 2, out: 3, rows: 4}\n")
    s = ModelSchema.load(path)
    assert s.name == "my-model"
    assert s.meta == {} and s.description == ""


_names = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20)
_pos = st.integers(min_value=1, max_value=2**40)
_dim = st.integers(min_value=1, max_value=MAX_DIM)
_scalars = st.one_of(
    st.integers(-(2**40), 2**40),
    st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=20),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
)


@st.composite
def gemms(draw, name: str) -> Gemm:
    return Gemm(
        name=name,
        type=draw(st.sampled_from(LayerType)),
        in_features=draw(_dim),
        out_features=draw(_dim),
        rows=draw(_pos),
        calls=draw(_pos),
        bias=draw(st.booleans()),
        shared_with=draw(st.none() | _names),
        heads=draw(st.none() | _dim),
        seq=draw(st.none() | _dim),
    )


def _valid_sharing(gemms: list[Gemm]) -> list[Gemm]:
    """Drop the ``shared_with`` a schema file may not have (itself, no weight, another GEMM
    of another shape): the round trip covers every schema a file can hold."""
    by_name = {g.name: g for g in gemms}
    out = []
    for g in gemms:
        other = by_name.get(g.shared_with or "")
        bad = not g.has_weight or g.shared_with == g.name
        bad = bad or (
            other is not None
            and (not other.has_weight or other.shape not in (g.shape, g.shape[::-1]))
        )
        out.append(replace(g, shared_with=None) if g.shared_with and bad else g)
    return out


@st.composite
def schemas(draw) -> ModelSchema:
    names = draw(st.lists(_names, min_size=1, max_size=8, unique=True))
    return ModelSchema(
        name=draw(_names),
        gemms=_valid_sharing([draw(gemms(n)) for n in names]),
        description=draw(
            st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=60)
        ),
        meta=draw(st.dictionaries(_names, _scalars | st.lists(_scalars, max_size=3), max_size=4)),
    )


@settings(max_examples=200, deadline=None)
@given(schemas())
def test_yaml_round_trip_property(s):
    text = s.to_yaml()
    back = ModelSchema.from_yaml(text, "prop.yaml")
    assert back == s
    assert back.to_yaml() == text
    assert back.flops == s.flops


# -- shipped schemas --------------------------------------------------------------------


def test_schemas_are_shipped():
    stems = {p.stem for p in SHIPPED}
    assert {"gpt2-small", "gpt2-medium", "vit-b16", "mixer-b16", "bert-base"} <= stems


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_schema_loads(path):
    s = ModelSchema.load(path)
    assert len(s) > 0
    names = [g.name for g in s]
    assert len(names) == len(set(names))
    assert s.name == path.stem
    assert s.version == SCHEMA_VERSION
    assert {"batch", "seq", "source"} <= set(s.meta)
    assert path.read_text().startswith("# ")
    assert "schemas/generate.py" in path.read_text().splitlines()[0]
    for g in s:
        if g.type.is_activation:  # rows = batch * heads * seq, one (seq x head_dim) per head
            assert g.heads and g.seq
            assert g.rows == s.meta["batch"] * g.heads * g.seq
            assert g.seq in (g.in_features, g.out_features)


def test_generator_reproduces_shipped_files():
    gen = _generator()
    assert {p.stem for p in SHIPPED} == set(gen.MODELS)
    for path in SHIPPED:
        assert gen.render(path.stem) == path.read_text(), f"{path.name}: run schemas/generate.py"
    assert gen.main(["--check"]) == 0


# Known parameter counts (reference implementations, random init), minus the parameters
# that are not GEMM weights (LayerNorms, position/cls/token-type embeddings, look-up tables).
def _ln(layers: int, d: int, per_layer: int = 2) -> int:
    return (layers * per_layer + 1) * 2 * d


KNOWN_GEMM_PARAMS = {
    # GPT-2: the "non-embedding" count excludes the tied lm_head (Kaplan et al. 2020).
    "gpt2-small": (124_439_808 - 50257 * 768 - 1024 * 768 - _ln(12, 768), False),
    "gpt2-medium": (354_823_168 - 50257 * 1024 - 1024 * 1024 - _ln(24, 1024), False),
    "gpt2-large": (774_030_080 - 50257 * 1280 - 1024 * 1280 - _ln(36, 1280), False),
    # timm vit_*_patch16_224: cls token, 197 position embeddings
    "vit-b16": (86_567_656 - 768 - 197 * 768 - _ln(12, 768), True),
    "vit-s16": (22_050_664 - 384 - 197 * 384 - _ln(12, 384), True),
    "vit-l16": (304_326_632 - 1024 - 197 * 1024 - _ln(24, 1024), True),
    # timm mixer_*16_224
    "mixer-b16": (59_880_472 - _ln(12, 768), True),
    "mixer-s16": (18_528_264 - _ln(8, 512), True),
    "mixer-l16": (208_196_168 - _ln(24, 1024), True),
    # HF LlamaForCausalLM / MistralForCausalLM: the embed_tokens look-up and 65 RMSNorms (one
    # weight vector each); lm_head is not tied, so it counts
    "llama2-7b": (6_738_415_616 - 32000 * 4096 - 65 * 4096, True),
    "mistral-7b": (7_241_732_096 - 32000 * 4096 - 65 * 4096, True),
    # HF BertModel(bert-base-uncased): word/position/type embeddings + embedding LayerNorm
    "bert-base": (109_482_240 - (30522 + 512 + 2) * 768 - _ln(12, 768), True),
}


@pytest.mark.parametrize("stem", sorted(KNOWN_GEMM_PARAMS))
def test_shipped_params_match_reference(stem):
    expected, with_head = KNOWN_GEMM_PARAMS[stem]
    s = ModelSchema.load(SCHEMAS / f"{stem}.yaml")
    got = sum(g.params for g in s if with_head or g.type is not LayerType.HEAD)
    assert got == expected


def test_gpt2_small_shape():
    s = ModelSchema.load(SCHEMAS / "gpt2-small.yaml")
    assert len(s) == 12 * 6 + 1
    assert s["transformer.h.0.attn.c_attn"].shape == (2304, 768)
    head = s["lm_head"]
    assert head.type is LayerType.HEAD and not head.bias
    assert head.shared_with == "transformer.wte"
    assert s["transformer.h.5.attn.scores"].rows == 8 * 12 * 1024


# -- malformed input ----------------------------------------------------------------------

GOOD = {"name": "h.0.mlp.fc", "type": "mlp", "in": 768, "out": 3072, "rows": 8}


def _doc(*entries, **top):
    d = {"version": 1, "name": "x", "gemms": [dict(GOOD, name=f"g{i}") for i in range(3)]}
    d["gemms"] += list(entries)
    d.update(top)
    return yaml.safe_dump(d, sort_keys=False)


def _err(text: str, source: str = "x.yaml") -> str:
    with pytest.raises(SchemaError) as info:
        ModelSchema.from_yaml(text, source)
    msg = str(info.value)
    assert "\n" not in msg, "errors are one line"
    assert msg.startswith(f"{source}:")
    assert isinstance(info.value, PxError) and info.value.exit_code == 2
    return msg


@pytest.mark.parametrize("field", ["in", "out", "rows", "calls", "heads", "seq"])
@pytest.mark.parametrize("value", [-5, 0, 1.5, "7", True, None, [3]])
def test_bad_integer_fields(field, value):
    msg = _err(_doc(dict(GOOD, **{field: value})))
    assert msg == (
        f"x.yaml: gemms[3] (h.0.mlp.fc): '{field}' must be a positive integer, got {value!r}"
    )


def test_example_message():
    msg = _err(_doc(dict(GOOD, **{"in": -5})))
    assert msg == "x.yaml: gemms[3] (h.0.mlp.fc): 'in' must be a positive integer, got -5"


@pytest.mark.parametrize("field", ["in", "out", "rows"])
def test_missing_required_field(field):
    entry = {k: v for k, v in GOOD.items() if k != field}
    assert _err(_doc(entry)) == f"x.yaml: gemms[3] (h.0.mlp.fc): '{field}' is missing"


@pytest.mark.parametrize("t", ["conv", "MLP", None, 3])
def test_unknown_type(t):
    msg = _err(_doc(dict(GOOD, type=t)))
    assert msg.startswith("x.yaml: gemms[3] (h.0.mlp.fc): 'type' must be one of mlp, ")
    assert msg.endswith(f"got {t!r}")


def test_unknown_field():
    msg = _err(_doc(dict(GOOD, stride=2)))
    assert msg == "x.yaml: gemms[3] (h.0.mlp.fc): unknown field 'stride'"


@pytest.mark.parametrize("name", [None, "", 5])
def test_bad_or_missing_gemm_name(name):
    entry = {k: v for k, v in GOOD.items() if k != "name"}
    if name is not None:
        entry["name"] = name
    msg = _err(_doc(entry))
    assert msg.startswith("x.yaml: gemms[3]: 'name' must be a non-empty string")


def test_bad_bias_and_shared_with():
    msg = _err(_doc(dict(GOOD, bias="yes please")))
    assert msg == "x.yaml: gemms[3] (h.0.mlp.fc): 'bias' must be true or false, got 'yes please'"
    msg = _err(_doc(dict(GOOD, shared_with=7)))
    assert msg == "x.yaml: gemms[3] (h.0.mlp.fc): 'shared_with' must be a name, got 7"


@pytest.mark.parametrize("field", ["in", "out", "heads", "seq"])
def test_sizes_are_bounded(field):
    """Issue #11.6: a schema with in: 1000000000 never finished planning."""
    assert _err(_doc(dict(GOOD, **{field: 10**9}))) == (
        f"x.yaml: gemms[3] (h.0.mlp.fc): '{field}' must be at most 16777216 (2^24), got 1000000000"
    )
    assert MAX_DIM == 2**24
    ModelSchema.from_yaml(_doc(dict(GOOD, **{field: MAX_DIM})))  # the bound itself is fine


@pytest.mark.parametrize("field", ["rows", "calls"])
def test_counts_are_bounded(field):
    msg = _err(_doc(dict(GOOD, **{field: MAX_COUNT + 1})))
    assert msg.endswith(f"'{field}' must be at most {MAX_COUNT} (2^40), got {MAX_COUNT + 1}")
    ModelSchema.from_yaml(_doc(dict(GOOD, **{field: MAX_COUNT})))


def test_shared_with_must_name_another_weight():
    tied = dict(GOOD, name="head", **{"in": 3072, "out": 768})
    cases = {
        "itself": (dict(GOOD, shared_with="h.0.mlp.fc"), "'shared_with' names the GEMM itself"),
        "no weight": (
            dict(GOOD, type="attn_scores", shared_with="g0"),
            "'shared_with': a attn_scores GEMM has no weight to share",
        ),
        "other shape": (
            dict(tied, **{"in": 512}, shared_with="g0"),
            "'shared_with': g0's weight is 3072x768, not 768x512 or its transpose",
        ),
    }
    for entry, needle in cases.values():
        msg = _err(_doc(entry))
        assert msg.startswith("x.yaml: gemms[3] (") and needle in msg, msg
    # the same weight, its transpose, or a parameter outside the GEMM list (a token embedding)
    for ok in ("g0", "transformer.wte"):
        s = ModelSchema.from_yaml(_doc(dict(GOOD, shared_with=ok)))
        assert s.gemms[3].shared_with == ok
    t = dict(tied, shared_with="g0")  # 768x3072: g0's transpose
    assert ModelSchema.from_yaml(_doc(t)).gemms[3].shared_with == "g0"


def test_entry_not_a_mapping():
    assert _err(_doc([1, 2])) == "x.yaml: gemms[3]: expected a mapping, got list"


def test_duplicate_names():
    msg = _err(_doc(dict(GOOD, name="g1")))
    assert msg == "x.yaml: gemms[3] (g1): duplicate name"


@pytest.mark.parametrize("version", [None, 2, "1", 0])
def test_bad_version(version):
    text = _doc(version=version)
    assert _err(text) == f"x.yaml: 'version' must be 1, got {version!r}"


def test_missing_version():
    text = "name: x\ngemms:\n- {name: a, type: mlp, in: 1, out: 1, rows: 1}\n"
    assert _err(text) == "x.yaml: 'version' must be 1, got None"


@pytest.mark.parametrize("text", ["", "- 1\n- 2\n", "just a string\n", "42\n"])
def test_not_a_mapping(text):
    assert _err(text) == "x.yaml: expected a mapping with 'version' and 'gemms'"


@pytest.mark.parametrize("gemms_value", [None, [], {}, "fc"])
def test_bad_gemms_list(gemms_value):
    assert _err(_doc(gemms=gemms_value)) == "x.yaml: 'gemms' must be a non-empty list"


def test_bad_top_level():
    assert _err(_doc(extra=1)) == "x.yaml: unknown top-level key 'extra'"
    assert _err(_doc(meta=[1])) == "x.yaml: 'meta' must be a mapping"
    assert _err(_doc(name=5)) == "x.yaml: 'name' must be a non-empty string, got 5"


def test_invalid_yaml_names_the_line():
    text = "version: 1\ngemms:\n- {name: a, type: mlp\n  in: [1\n"
    msg = _err(text)
    assert re.fullmatch(r"x\.yaml: line 4: .+", msg), msg
    msg = _err("version: 1\n\tgemms: []\n")
    assert msg.startswith("x.yaml: line 2: ")


def test_load_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(_doc(dict(GOOD, rows=0)))
    with pytest.raises(SchemaError) as info:
        ModelSchema.load(path)
    assert str(info.value) == (
        f"{path}: gemms[3] (h.0.mlp.fc): 'rows' must be a positive integer, got 0"
    )


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(SchemaError, match=r"nope\.yaml: no such file$"):
        ModelSchema.load(path)


def test_directory_is_not_a_schema(tmp_path):
    with pytest.raises(SchemaError, match=r"cannot read \(IsADirectoryError\)$"):
        ModelSchema.load(tmp_path)


def test_not_utf8(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"version: 1\n\xff\xfe\n")
    with pytest.raises(SchemaError, match=r"cannot read \(UnicodeDecodeError\)$"):
        ModelSchema.load(path)


# -- defects found in schema.py, now fixed ---------------------------------------------


def test_unknown_non_string_key():
    _err("version: 1\n1: x\nfoo: y\ngemms:\n- {name: a, type: mlp, in: 1, out: 1, rows: 1}\n")
    _err("version: 1\ngemms:\n- {name: a, type: mlp, in: 1, out: 1, rows: 1, 2: 3, zz: 1}\n")


@pytest.mark.parametrize("version", ["true", "1.0"])
def test_version_must_be_the_integer(version):
    _err(f"version: {version}\ngemms:\n- {{name: a, type: mlp, in: 1, out: 1, rows: 1}}\n")


def test_null_description():
    text = "version: 1\ndescription:\ngemms:\n- {name: a, type: mlp, in: 1, out: 1, rows: 1}\n"
    assert ModelSchema.from_yaml(text).description == ""


# -- the compact form: repeated blocks ------------------------------------------------------

# sha256 of each shipped schema's long form as the files were before the compact form (commit
# 5b40e26, the header comment line left out): the compact files expand to exactly these.
LONG_FORM_SHA256 = {
    "bert-base": "2af0c09e6968ad57aaed53b45d5255455aa5393db84b211be2b10413e7178652",
    "gpt2-large": "fdaeb04eae0ffaba470e2e99dbcc89c387ff80e61490709c36aacb9c99e09513",
    "gpt2-medium": "1ea4841e7ac44e43bfc5a26a3498d71347a95ae4b211c45da72b7ea0fb08f1ba",
    "gpt2-small": "549b4de196072322955b05ba488855a291d567407e02798cc9646c237c325f6d",
    "mixer-b16": "44722387d662b56bcdf0cb4ffeecbe0c24a5a7ddf668bba79ed4807ee956c59d",
    "mixer-s16": "4b4cb90c6aa964b9ff1c55fd25c79f401069d9c1038e43434fa76de123556121",
    "vit-b16": "b6e18f1d3db77092d0102a0994b73eee032357e1becd1acd0ef2b708853c7f2c",
    "vit-s16": "769cfbba1d26c4c750836b5c2e816a8d4432d2be15d31820d042251a96fafd9c",
}


@pytest.mark.parametrize("stem", sorted(LONG_FORM_SHA256))
def test_compact_shipped_schemas_expand_to_the_old_long_files(stem):
    path = SCHEMAS / f"{stem}.yaml"
    assert "- repeat: " in path.read_text()  # shipped in the compact form
    s = ModelSchema.load(path)
    assert hashlib.sha256(s.to_yaml().encode()).hexdigest() == LONG_FORM_SHA256[stem]
    assert ModelSchema.from_yaml(s.to_yaml()) == s  # and the long form still loads


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_schemas_are_the_generators_long_lists(path):
    built = _generator().MODELS[path.stem][1]()
    assert ModelSchema.load(path) == built
    assert ModelSchema.from_yaml(built.to_yaml(compact=True)) == built


def test_new_shipped_schemas():
    llama = ModelSchema.load(SCHEMAS / "llama2-7b.yaml")
    assert len(llama) == 32 * 9 + 1
    assert llama["model.layers.31.mlp.gate_proj"].shape == (11008, 4096)
    assert llama["model.layers.0.self_attn.scores"].rows == 8 * 32 * 4096
    assert llama["lm_head"].shared_with is None and not llama["lm_head"].bias
    mistral = ModelSchema.load(SCHEMAS / "mistral-7b.yaml")
    assert mistral["model.layers.7.self_attn.k_proj"].shape == (1024, 4096)  # 8 kv heads
    assert mistral["model.layers.7.self_attn.scores"].heads == 32
    assert mistral["model.layers.7.mlp.down_proj"].shape == (4096, 14336)
    vit = ModelSchema.load(SCHEMAS / "vit-l16.yaml")
    assert vit["blocks.23.attn.scores"].seq == 197 and vit["blocks.23.mlp.fc1"].out_features == 4096
    mixer = ModelSchema.load(SCHEMAS / "mixer-l16.yaml")
    assert mixer["blocks.23.mlp_tokens.fc1"].shape == (512, 196)
    assert mixer["blocks.0.mlp_channels.fc2"].shape == (1024, 4096)


def _compact(*entries, **top) -> str:
    d = {"version": 1, "name": "x", "gemms": list(entries)}
    d.update(top)
    return yaml.safe_dump(d, sort_keys=False)


def _fc(name: str, **kw) -> dict:
    return dict(GOOD, name=name, **kw)


def test_repeat_expands_in_order():
    text = _compact(
        _fc("embed"),
        {"repeat": 3, "gemms": [_fc("h.{i}.a"), _fc("h.{i}.b", rows=4)]},
        {"repeat": 2, "start": 3, "gemms": [_fc("h.{i}.a")]},
        _fc("head"),
    )
    s = ModelSchema.from_yaml(text)
    names = ["embed", "h.0.a", "h.0.b", "h.1.a", "h.1.b", "h.2.a", "h.2.b", "h.3.a", "h.4.a"]
    assert [g.name for g in s] == names + ["head"]
    assert s["h.2.b"].rows == 4 and s["h.4.a"].in_features == 768
    long = ModelSchema.from_yaml(s.to_yaml())
    assert long == s and "repeat" not in s.to_yaml()  # the long form stays the default


def test_repeat_every_index_and_shared_with():
    tied = _fc("lm.{i}.out", **{"in": 3072, "out": 768}, shared_with="lm.{i}.in")
    text = _compact(
        {"repeat": 2, "gemms": [_fc("lm.{i}.in"), tied, _fc("x{i}.y{i}", shared_with="wte")]}
    )
    s = ModelSchema.from_yaml(text)
    assert s["lm.1.out"].shared_with == "lm.1.in"
    assert s["x1.y1"].shared_with == "wte"  # a name outside the block stays as written
    assert [g.name for g in s] == ["lm.0.in", "lm.0.out", "x0.y0", "lm.1.in", "lm.1.out", "x1.y1"]
    assert ModelSchema.from_yaml(s.to_yaml(compact=True)) == s
    two = ModelSchema("x", s.gemms[:2] + s.gemms[3:5])
    assert two.to_dict(compact=True)["gemms"] == [{"repeat": 2, "gemms": [_fc("lm.{i}.in"), tied]}]


def _repeat_err(entry, *more) -> str:
    return _err(_compact(_fc("g0"), entry, *more))


@pytest.mark.parametrize("count", [0, -1, 1.5, "3", True, None, [2]])
def test_repeat_bad_count(count):
    msg = _repeat_err({"repeat": count, "gemms": [_fc("h.{i}")]})
    assert msg == (
        f"x.yaml: gemms[1] (repeat): 'repeat' must be a positive integer (how many blocks), "
        f"got {count!r}"
    )


def test_repeat_is_bounded():
    """A few hostile lines may not stand for millions of GEMMs."""
    msg = _repeat_err({"repeat": 10**9, "gemms": [_fc("h.{i}")]})
    assert (
        msg == "x.yaml: gemms[1] (repeat): 'repeat' must be at most 131072 (2^17), got 1000000000"
    )
    assert MAX_GEMMS == 2**17
    block = [_fc(f"h.{{i}}.{k}") for k in range(64)]
    msg = _repeat_err({"repeat": 4096, "gemms": block})
    assert msg == (
        "x.yaml: 'gemms' expands to 262145 GEMMs, more than the 131072 (2^17) a schema may hold"
    )
    half = MAX_GEMMS // 2
    msg = _err(
        _compact(
            {"repeat": half, "gemms": [_fc("a{i}")]}, {"repeat": half + 1, "gemms": [_fc("b{i}")]}
        )
    )
    assert msg.endswith(
        f"expands to {MAX_GEMMS + 1} GEMMs, more than the 131072 (2^17) a schema may hold"
    )


def test_repeat_at_the_bound_loads():
    s = ModelSchema.from_yaml(_compact({"repeat": MAX_GEMMS, "gemms": [_fc("h.{i}")]}))
    assert len(s) == MAX_GEMMS and s.gemms[-1].name == f"h.{MAX_GEMMS - 1}"


def test_repeat_needs_the_index_in_every_name():
    msg = _repeat_err({"repeat": 2, "gemms": [_fc("h.{i}.a"), _fc("h.b")]})
    assert msg == (
        "x.yaml: gemms[1].gemms[1] (h.b): 'name' must contain {i} (the block index), or the "
        "repeated GEMMs would have the same name"
    )


def test_repeat_names_that_collide_after_expansion():
    msg = _repeat_err(
        {"repeat": 3, "gemms": [_fc("h.{i}")]}, {"repeat": 2, "start": 2, "gemms": [_fc("h.{i}")]}
    )
    assert (
        msg == "x.yaml: gemms[2].gemms[0], i=2 (h.2): duplicate name, also gemms[1].gemms[0], i=2"
    )
    msg = _repeat_err({"repeat": 2, "gemms": [_fc("g{i}")]})  # g0 is written out before it
    assert msg == "x.yaml: gemms[1].gemms[0], i=0 (g0): duplicate name, also gemms[0]"
    msg = _repeat_err({"repeat": 12, "gemms": [_fc("h{i}"), _fc("h1{i}")]})  # h10 twice
    assert (
        msg == "x.yaml: gemms[1].gemms[0], i=10 (h10): duplicate name, also gemms[1].gemms[1], i=0"
    )


def test_repeat_template_errors_name_the_place():
    msg = _repeat_err({"repeat": 2, "gemms": [_fc("h.{i}"), _fc("h.{i}.b", rows=0)]})
    assert msg == "x.yaml: gemms[1].gemms[1] (h.{i}.b): 'rows' must be a positive integer, got 0"
    msg = _repeat_err({"repeat": 2, "gemms": [5]})
    assert msg == "x.yaml: gemms[1].gemms[0]: expected a mapping, got int"
    msg = _repeat_err({"repeat": 2, "gemms": [{"repeat": 2, "gemms": [_fc("h.{i}")]}]})
    assert msg == "x.yaml: gemms[1].gemms[0]: a repeated block may not hold a repeat"
    tied = _fc("h.{i}.b", **{"in": 5}, shared_with="h.{i}.a")
    msg = _repeat_err({"repeat": 2, "gemms": [_fc("h.{i}.a"), tied]})
    assert msg == (
        "x.yaml: gemms[1].gemms[1], i=0 (h.0.b): 'shared_with': h.0.a's weight is 3072x768, "
        "not 3072x5 or its transpose"
    )


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ({"repeat": 2, "gemms": [_fc("h{i}")], "name": "h"}, "unknown field 'name' (a repeat has"),
        ({"repeat": 2}, "'gemms' must be a non-empty list (the repeated block)"),
        ({"repeat": 2, "gemms": []}, "'gemms' must be a non-empty list (the repeated block)"),
        ({"repeat": 2, "gemms": {"name": "h{i}"}}, "'gemms' must be a non-empty list"),
        ({"repeat": 2, "start": -1, "gemms": [_fc("h{i}")]}, "'start' must be an integer from 0"),
        ({"repeat": 2, "start": "1", "gemms": [_fc("h{i}")]}, "(the first block's index), got '1'"),
        ({"repeat": 2, "start": 2**30, "gemms": [_fc("h{i}")]}, "from 0 to 16777216"),
    ],
)
def test_repeat_bad_fields(entry, needle):
    msg = _repeat_err(entry)
    assert msg.startswith("x.yaml: gemms[1] (repeat): ") and needle in msg, msg


def test_compact_writer_finds_blocks():
    g = []
    g.append(Gemm("embed", LayerType.EMBEDDING, 8, 16, rows=4))
    for i in range(2, 6):  # start 2; the outer index wins over the experts' inner one
        for e in range(3):
            g.append(Gemm(f"layers.{i}.experts.{e}.w", LayerType.MLP, 16, 32, rows=2))
        g.append(Gemm(f"layers.{i}.gate", LayerType.OTHER, 16, 3, rows=4))
    g.append(Gemm("layers.6.gate", LayerType.OTHER, 16, 3, rows=4))  # not the same block
    g.append(Gemm("h.07.fc", LayerType.MLP, 8, 8, rows=1))  # leading zeros: not an index
    g.append(Gemm("h.08.fc", LayerType.MLP, 8, 8, rows=1))
    s = ModelSchema("moe", g)
    d = s.to_dict(compact=True)["gemms"]
    assert [e.get("name", e.get("repeat")) for e in d] == [
        "embed",
        4,
        "layers.6.gate",
        "h.07.fc",
        "h.08.fc",
    ]
    assert d[1]["start"] == 2
    assert [t["name"] for t in d[1]["gemms"]] == [
        "layers.{i}.experts.0.w",
        "layers.{i}.experts.1.w",
        "layers.{i}.experts.2.w",
        "layers.{i}.gate",
    ]
    assert ModelSchema.from_yaml(s.to_yaml(compact=True)) == s


def test_compact_writer_leaves_what_it_cannot_repeat():
    lit = [{"name": f"h.{i}.{{i}}", "type": "mlp", "in": 2, "out": 2, "rows": 1} for i in range(3)]
    assert compact_entries(lit) == lit  # a literal {i} would be read as the index
    odd = [{"name": f"h.{i}", "type": "mlp", "in": 2, "out": 2, "rows": i + 1} for i in range(3)]
    assert compact_entries(odd) == odd  # the blocks differ
    gap = [{"name": f"h.{i}", "type": "mlp", "in": 2, "out": 2, "rows": 1} for i in (0, 2, 4)]
    assert compact_entries(gap) == gap  # the index does not count up by one
    one = [{"name": "h.0", "type": "mlp", "in": 2, "out": 2, "rows": 1}]
    assert compact_entries(one) == one


@st.composite
def repeated_schemas(draw) -> ModelSchema:
    """Schemas made of runs of numbered blocks, some identical and some not."""
    gemms: list[Gemm] = []
    for b in range(draw(st.integers(1, 4))):
        prefix = draw(st.sampled_from(["h", "model.layers", "a.b", f"s{b}"]))
        block = [draw(gemms_(f"x{k}")) for k in range(draw(st.integers(1, 3)))]
        start = draw(st.integers(0, 3))
        for i in range(start, start + draw(st.integers(1, 4))):
            vary = draw(st.booleans()) and draw(st.booleans())
            for g in block:
                gemms.append(
                    replace(
                        g,
                        name=f"{prefix}.{i}.{g.name}",
                        rows=max(1, g.rows - vary),
                        shared_with=None,
                    )
                )
    seen: set[str] = set()
    gemms = [g for g in gemms if not (g.name in seen or seen.add(g.name))]
    return ModelSchema("r", gemms)


gemms_ = gemms


@settings(max_examples=60, deadline=None)
@given(st.one_of(schemas(), repeated_schemas()))
def test_compact_round_trip_property(s):
    text = s.to_yaml(compact=True)
    back = ModelSchema.from_yaml(text, "prop.yaml")
    assert back == s
    assert back.to_yaml(compact=True) == text
    assert back.to_yaml() == s.to_yaml()
