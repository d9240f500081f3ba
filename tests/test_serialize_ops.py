"""pxcompile.serialize_ops: the reviewed list of operators a model file may call.

Saving each model pxcompile supports must emit only listed operators: a new operator shows up
here as a failing test naming it, to be reviewed (see the module doc) before it is listed."""

from __future__ import annotations

import importlib.util
import json
import math
import operator
import zipfile
from pathlib import Path

import pytest
import torch
from models_zoo import BNModel, CausalSDPA, FunctionalLinear, MLPMixer, ViTMHA, ViTSDPA
from torch import nn

import pxcompile
import pxcompile.ops  # noqa: F401  (registers the pxcompile operators)
from pxcompile import serialize_ops as O

ROOT = Path(__file__).resolve().parent.parent


def resolve(name: str):
    if name in O.PYTHON_OPS:
        module, _, fn = name.rpartition(".")
        return getattr({"_operator": operator, "torch": torch, "math": math}[module], fn, None)
    namespace, op, overload = name.split(".")
    try:
        return getattr(getattr(getattr(torch.ops, namespace), op), overload)
    except (AttributeError, RuntimeError):
        return None


def test_the_list_names_real_operators_and_no_forbidden_one():
    assert O.ALLOWED_OPS == O.EXPORTED_OPS | O.REVIEWED_OPS | O.PYTHON_OPS
    assert not O.ALLOWED_OPS & O.NEVER_OPS
    for name in sorted(O.ALLOWED_OPS | O.NEVER_OPS):
        target = resolve(name)
        assert target is not None, f"{name} is not an operator of this torch"
        if name not in O.PYTHON_OPS:
            assert str(target) == name
    # nothing that reads files, storage or raw memory, whatever its overload
    for name in O.ALLOWED_OPS:
        op = name.split(".")[1]
        assert not any(w in op for w in ("file", "storage", "set_", "as_strided", "empty")), name
        assert not op.startswith(("_embedding_bag", "_unsafe_index", "resize")), name
    assert O.serialized_name("aten.view.default") == "torch.ops.aten.view.default"
    assert O.serialized_name("_operator.mul") == "_operator.mul"
    assert O.is_allowed("aten.linear.default") and not O.is_allowed("aten.from_file.default")


def exported_ops(model: nn.Module, inputs, tmp_path: Path, sparse: bool, block: int = 8) -> set:
    """The operators ``pxcompile.save`` writes for ``model`` (compiled first if ``sparse``)."""
    if sparse:
        model = pxcompile.sparsify(model, 0.3, block=block, example_inputs=inputs, init="scratch")
    path = tmp_path / "m.px"
    pxcompile.save(model, path, example_inputs=inputs)  # refuses unlisted operators itself
    with zipfile.ZipFile(path) as zf:
        nodes = json.loads(zf.read("program.json"))["graph_module"]["graph"]["nodes"]
    return {n["target"].removeprefix("torch.ops.") for n in nodes}


def check_listed(ops: set) -> None:
    unlisted = sorted(ops - O.ALLOWED_OPS)
    assert not unlisted, (
        f"exports emit {unlisted}: review them (pxcompile/serialize_ops.py says how) and list "
        "them in EXPORTED_OPS, or keep models that need them from being saved"
    )


FAST = {
    "causal_sdpa": (CausalSDPA, lambda: (torch.randn(2, 16, 64),), True),
    "mixer": (MLPMixer, lambda: (torch.randn(2, 3, 16, 16),), True),
    "vit_sdpa": (ViTSDPA, lambda: (torch.randn(2, 16, 32),), True),
    "batchnorm_buffer_update": (BNModel, lambda: (torch.randn(4, 8),), False),
}


@pytest.mark.parametrize("name", sorted(FAST))
def test_exports_of_small_models_use_listed_operators(name, tmp_path):
    make, inputs, sparse = FAST[name]
    torch.manual_seed(0)
    ops = exported_ops(make().eval(), inputs(), tmp_path, sparse)
    check_listed(ops)
    if sparse:
        assert "pxcompile.pixelfly_linear.default" in ops


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"px_example_{name}", ROOT / "examples" / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.model, mod.example_inputs()


def hf(name: str):
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 16))
    small = dict(vocab_size=128, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if name == "gpt2":
        cfg = T.GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=32, **small)
        return T.GPT2LMHeadModel(cfg), {"input_ids": ids}
    if name == "bert":
        cfg = T.BertConfig(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
            max_position_embeddings=32, vocab_size=128, pad_token_id=0,
        )  # fmt: skip
        return T.BertModel(cfg), {"input_ids": ids}
    if name == "llama":
        cfg = T.LlamaConfig(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=128, max_position_embeddings=32, **small,
        )  # fmt: skip
        return T.LlamaForCausalLM(cfg), {"input_ids": ids}
    if name == "t5":
        cfg = T.T5Config(
            num_layers=2, d_model=64, d_kv=32, num_heads=2, d_ff=128, vocab_size=128,
            decoder_start_token_id=0, pad_token_id=0,
        )  # fmt: skip
        return T.T5Model(cfg), {"input_ids": ids, "decoder_input_ids": ids}
    cfg = T.ViTConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
        image_size=32, patch_size=8,
    )  # fmt: skip
    return T.ViTModel(cfg), {"pixel_values": torch.randn(2, 3, 32, 32)}


def vision(name: str):
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 32, 32),)
    if name.startswith("timm"):
        timm = pytest.importorskip("timm")
        if name == "timm_vit":
            return timm.models.vision_transformer.VisionTransformer(
                img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10
            ), x
        return timm.models.mlp_mixer.MlpMixer(
            img_size=32, patch_size=8, num_blocks=2, embed_dim=64, num_classes=10
        ), x
    tv = pytest.importorskip("torchvision")
    M = tv.models
    if name == "swin_t":
        return M.swin_transformer.SwinTransformer([4, 4], 32, [2, 2], [2, 4], [4, 4], 10), x
    if name == "vit_b_16":
        return M.vision_transformer.VisionTransformer(32, 8, 2, 2, 64, 128, num_classes=10), x
    if name == "resnet18":
        return M.resnet18(num_classes=10), x
    return M.mobilenet_v3_small(num_classes=10), x


SWEEP = {
    **{f"example_{n}": (lambda n=n: example(f"{n}.py"), True, 32) for n in ("mixer", "vit", "gpt")},
    "zoo_vit_mha": (lambda: (ViTMHA(), (torch.randn(2, 16, 48),)), True, 8),
    "zoo_functional": (lambda: (FunctionalLinear(), (torch.randn(2, 16),)), False, 8),
    **{f"hf_{n}": (lambda n=n: hf(n), True, 8) for n in ("gpt2", "bert", "llama", "t5", "vit")},
    **{
        n: (lambda n=n: vision(n), False, 8)
        for n in ("swin_t", "vit_b_16", "timm_vit", "timm_mixer", "resnet18", "mobilenet")
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SWEEP))
def test_exports_of_supported_models_use_listed_operators(name, tmp_path):
    make, sparse, block = SWEEP[name]
    model, inputs = make()
    check_listed(exported_ops(model.eval(), inputs, tmp_path, sparse, block))
