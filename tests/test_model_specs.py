"""Models named by spec (hf:PATH, timm:NAME, torchvision:NAME), built on the meta device:
their schema equals the schema of the same model built with weights, nothing is downloaded,
and every mistake is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pxcompile import api
from pxcompile.errors import PxError
from pxcompile.model_specs import (
    build_model,
    is_model_spec,
    load_model,
    parse_spec,
    require_weights,
    source_files,
    source_name,
)
from pxcompile.passes.trace import is_meta_model

ROOT = Path(__file__).resolve().parents[1]
transformers = pytest.importorskip("transformers")

TINY = {
    "gpt2": {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_layer": 3,
        "n_embd": 64,
        "n_head": 4,
        "vocab_size": 100,
        "n_positions": 32,
    },
    "llama": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        "max_position_embeddings": 64,
    },
    "bert": {
        "architectures": ["BertForMaskedLM"],
        "model_type": "bert",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "vocab_size": 100,
        "max_position_embeddings": 32,
    },
}


def write_config(d: Path, data: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(data))
    return d


def to_cpu(inputs):
    if isinstance(inputs, dict):
        return {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in inputs.items()}
    return tuple(torch.zeros(v.shape, dtype=v.dtype) for v in inputs)


def assert_same_trace(real, meta) -> None:
    assert real.schema == meta.schema
    assert real.schema.to_yaml() == meta.schema.to_yaml()
    assert real.bindings == meta.bindings
    assert {k: (a.via, a.unsupported) for k, a in real.attention.items()} == {
        k: (a.via, a.unsupported) for k, a in meta.attention.items()
    }


@pytest.mark.parametrize("arch", sorted(TINY))
def test_hf_config_on_meta_traces_like_the_model_with_weights(tmp_path, arch):
    d = write_config(tmp_path / f"tiny-{arch}", TINY[arch])
    spec = f"hf:{d},seq=12,batch=2"
    model, inputs = build_model(spec)
    assert is_meta_model(model) and not model.training
    assert tuple(inputs["input_ids"].shape) == (2, 12)
    meta = api.trace(model, inputs, name=source_name(spec))
    assert meta.schema.name == f"tiny-{arch}" and meta.graph_module is None
    cfg = transformers.AutoConfig.for_model(**TINY[arch])
    cls = getattr(transformers, TINY[arch]["architectures"][0])
    torch.manual_seed(0)
    real = api.trace(cls(cfg).eval(), to_cpu(inputs), name=f"tiny-{arch}")
    assert_same_trace(real, meta)


def test_hf_vision_config_gets_an_image(tmp_path):
    cfg = {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "image_size": 32,
        "patch_size": 8,
    }
    model, inputs = build_model(f"hf:{write_config(tmp_path / 'vit', cfg)},batch=2")
    assert tuple(inputs["pixel_values"].shape) == (2, 3, 32, 32)
    meta = api.trace(model, inputs)
    torch.manual_seed(0)
    real = transformers.ViTForImageClassification(transformers.AutoConfig.for_model(**cfg))
    assert_same_trace(api.trace(real.eval(), to_cpu(inputs)), meta)


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec, build",
    [
        ("timm:test_vit", lambda: __import__("timm").create_model("test_vit")),
        (
            "torchvision:mobilenet_v3_small",
            lambda: __import__("torchvision").models.get_model("mobilenet_v3_small"),
        ),
    ],
)
def test_timm_and_torchvision_on_meta_trace_like_the_model_with_weights(spec, build):
    pytest.importorskip(spec.split(":")[0])
    model, inputs = build_model(spec)
    assert is_meta_model(model)
    meta = api.trace(model, inputs, name=source_name(spec))
    torch.manual_seed(0)
    real = api.trace(build().eval(), to_cpu(inputs), name=source_name(spec))
    assert_same_trace(real, meta)


def test_example_7b_configs_build_with_their_context():
    model, inputs = build_model(f"hf:{ROOT / 'examples/hf/mistral-7b'}")
    assert type(model).__name__ == "MistralForCausalLM"
    assert tuple(inputs["input_ids"].shape) == (1, 4096)  # 32768 positions, capped
    assert sum(p.numel() for p in model.parameters()) > 7_000_000_000  # and no memory
    model, inputs = build_model(f"hf:{ROOT / 'examples/hf/llama-2-7b/config.json'}")
    assert model.config.intermediate_size == 11008 and inputs["input_ids"].shape[1] == 4096


def test_vision_inputs_take_the_models_size():
    pytest.importorskip("torchvision")
    _, (x,) = build_model("torchvision:vit_b_16,batch=3")
    assert tuple(x.shape) == (3, 3, 224, 224) and x.device.type == "meta"
    _, (x,) = build_model("torchvision:r3d_18")  # video: frames
    assert tuple(x.shape) == (1, 3, 16, 112, 112)


def test_parse_and_names(tmp_path):
    s = parse_spec("hf:some/dir,seq=128,batch=4")
    assert (s.kind, s.name, s.options) == ("hf", "some/dir", {"seq": 128, "batch": 4})
    assert parse_spec("timm:vit_base_patch16_224.augreg_in21k").name.endswith("augreg_in21k")
    assert is_model_spec("timm:x") and not is_model_spec("model.py")
    assert not is_model_spec("schemas/gpt2-small.yaml")
    d = write_config(tmp_path / "my-model", TINY["gpt2"])
    assert source_name(f"hf:{d}") == "my-model" == source_name(f"hf:{d}/config.json")
    assert source_name("timm:resnet50") == "resnet50" and source_name("x/gpt.py") == "gpt"
    assert source_files(f"hf:{d}") == [str(d / "config.json")]
    assert source_files("timm:resnet50") == [] and source_files("m.py") == ["m.py"]


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("hf:{tmp}/nope", "no such file or directory"),
        ("hf:{tmp}", "no config.json in"),
        ("hf:{tmp}/notjson/config.json", "is not JSON"),
        ("hf:{tmp}/nottype", "not a Hugging Face config (no model_type)"),
        ("hf:{tmp}/unknown", "model_type 'lama' is not one transformers"),
        ("hf:{tmp}/dunder", "config key '__class__'"),
        ("hf:{tmp}/deep", "num_hidden_layers = 100,000 layers is more than 1,024"),
        ("hf:{tmp}/deepnested", "text_config.num_layers = 5,000 layers is more than"),
        ("hf:", "give a path after hf:"),
        ("hf:{tmp}/nottype,seq=0", "seq must be a positive integer"),
        ("timm:resnet5", "did you mean resnet50"),
        ("timm:resnet50,seq=128", "seq applies to hf: text models"),
        ("torchvision:resnt50", "did you mean resnet50"),
        ("torchvision:fasterrcnn_resnet50_fpn", "write a model file"),
        ("onnx:x", "not a model spec"),
    ],
)
def test_mistakes_are_one_line(tmp_path, spec, needle):
    (tmp_path / "notjson").mkdir()
    (tmp_path / "notjson" / "config.json").write_text("{nope")
    write_config(tmp_path / "nottype", {"hidden_size": 8})
    write_config(tmp_path / "unknown", {"model_type": "lama"})
    write_config(tmp_path / "dunder", {"model_type": "gpt2", "__class__": 1})
    write_config(tmp_path / "deep", {"model_type": "llama", "num_hidden_layers": 100_000})
    write_config(tmp_path / "deepnested", {"model_type": "x", "text_config": {"num_layers": 5000}})
    with pytest.raises(PxError) as e:
        build_model(spec.format(tmp=tmp_path))
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_weights_are_needed_to_run_it(tmp_path):
    model, inputs = load_model(f"hf:{write_config(tmp_path / 'g', TINY['gpt2'])},seq=8")
    with pytest.raises(PxError, match=r"^bench needs the model's weights.*--plan-out.*--plan"):
        require_weights(model, "hf:g", "bench")
    for call in (
        lambda: api.sparsify(model, 0.3, example_inputs=inputs),
        lambda: api.apply(model, api.plan(model, 0.3, example_inputs=inputs), inputs),
    ):
        with pytest.raises(PxError, match="needs the model's weights") as e:
            call()
        assert "\n" not in str(e.value)
    require_weights(torch.nn.Linear(2, 2), "m.py", "bench")  # real weights: fine
