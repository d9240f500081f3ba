"""Tests for pxcompile.schema: the Gemm/ModelSchema IR, its YAML format and the shipped schemas."""

from __future__ import annotations

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
    SCHEMA_VERSION,
    Gemm,
    LayerType,
    ModelSchema,
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
    # timm mixer_*16_224
    "mixer-b16": (59_880_472 - _ln(12, 768), True),
    "mixer-s16": (18_528_264 - _ln(8, 512), True),
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
