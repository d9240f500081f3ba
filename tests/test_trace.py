"""Tests of the trace pass (pxcompile.passes.trace): fx, the coverage check, torch.export."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from models_zoo import (
    BNModel,
    CatWeights,
    DataDependent,
    DenseUse,
    EinsumModel,
    FunctionalForms,
    FunctionalLinear,
    LiftedConstant,
    MLPMixer,
    Reused,
    StochasticDepthMLP,
    TensordotModel,
    ViTMHA,
    ViTSDPA,
)

from pxcompile.errors import TraceError
from pxcompile.passes.trace import GemmBinding, TraceResult, classify, is_linear_like, trace
from pxcompile.schema import LayerType, ModelSchema

warnings.filterwarnings("ignore", category=UserWarning)
L = LayerType


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def expected_weight_gemms(model: nn.Module) -> set[str]:
    """Every Linear-like of the model, named as the trace names them."""
    names = set()
    for n, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            names.add(f"{n}.in_proj")
        elif is_linear_like(m):
            names.add(n)
    return names


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "training": [m.training for m in model.modules()],
        "attrs": [sorted(vars(m)) for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["ids"] == before["ids"]
    assert after["training"] == before["training"]
    assert after["attrs"] == before["attrs"]
    assert after["requires_grad"] == before["requires_grad"]
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k


def traced(model: nn.Module, inputs, **kw) -> TraceResult:
    before = snapshot(model)
    rng = torch.get_rng_state()
    r = trace(model, inputs, **kw)
    assert_unchanged(model, before)
    assert torch.equal(rng, torch.get_rng_state())
    # every schema round-trips through YAML, and each weight GEMM has a binding
    assert ModelSchema.from_yaml(r.schema.to_yaml()) == r.schema
    assert set(r.bindings) == {g.name for g in r.schema.weight_gemms}
    for b in r.bindings.values():
        assert isinstance(b, GemmBinding)
        p = model.get_parameter(b.weight)
        g = r.schema[b.gemm]
        if b.kind in ("linear", "functional", "mha_in_proj"):
            assert tuple(p.shape) == g.shape
        elif b.kind == "conv1d":
            assert tuple(p.shape) == (g.in_features, g.out_features)
        if b.bias is not None:
            assert g.bias and model.get_parameter(b.bias).dim() == 1
    return r


def weight_names(r: TraceResult) -> set[str]:
    return {g.name for g in r.schema.weight_gemms}


def check_attention(r: TraceResult, scope: str, *, batch: int, heads: int, seq: int, hd: int):
    s, v = r.schema[f"{scope}.scores"], r.schema[f"{scope}.values"]
    assert (s.type, v.type) == (L.ATTN_SCORES, L.ATTN_VALUES)
    assert (s.in_features, s.out_features, s.rows) == (hd, seq, batch * heads * seq)
    assert (v.in_features, v.out_features, v.rows) == (seq, hd, batch * heads * seq)
    assert s.heads == v.heads == heads and s.seq == v.seq == seq
    # QK^T: 2*B*H*L*S*D flops
    assert s.flops == 2 * batch * heads * seq * seq * hd == v.flops


# ---------------------------------------------------------------------------------------
# plain PyTorch models (fx)
# ---------------------------------------------------------------------------------------
def test_mlp_mixer():
    model = MLPMixer()  # 16x16 images, 4x4 patches -> 16 tokens, dim 32
    r = traced(model, torch.randn(2, 3, 16, 16))
    assert r.method == "fx" and isinstance(r.graph_module, torch.fx.GraphModule)
    assert weight_names(r) == expected_weight_gemms(model)
    s = r.schema
    assert s["patch_embed"].type == L.EMBEDDING
    assert (s["patch_embed"].in_features, s["patch_embed"].rows) == (48, 2 * 16)
    tok = s["blocks.0.token_mixing.0"]
    assert tok.type == L.TOKEN_MIX and (tok.in_features, tok.out_features) == (16, 24)
    assert tok.rows == 2 * 32  # batch x channels: the sequence is the last dim
    ch = s["blocks.1.channel_mixing.2"]
    assert ch.type == L.MLP and (ch.in_features, ch.out_features, ch.rows) == (64, 32, 32)
    # names say nothing here: token mixing is found from the transpose, and the layer
    # after the transpose back is not token mixing
    assert s["neutral.a1"].type == s["neutral.a2"].type == L.TOKEN_MIX
    assert s["neutral.b1"].type != L.TOKEN_MIX
    assert s["head"].type == L.HEAD and s["head"].rows == 2
    assert not [g for g in s if g.type.is_activation]
    # Linear-likes stay module calls in the returned graph
    called = {n.target for n in r.graph_module.graph.nodes if n.op == "call_module"}
    assert expected_weight_gemms(model) <= called


def test_vit_with_multihead_attention():
    model = ViTMHA()  # seq 16, dim 32, 4 heads
    r = traced(model, torch.randn(3, 16, 48))
    assert r.method == "fx"
    assert weight_names(r) == expected_weight_gemms(model)
    s = r.schema
    inp, out = s["blocks.0.attn.in_proj"], s["blocks.0.attn.out_proj"]
    assert (inp.type, inp.in_features, inp.out_features, inp.rows) == (L.ATTN_PROJ, 32, 96, 48)
    assert (out.type, out.in_features, out.out_features, out.rows) == (L.ATTN_PROJ, 32, 32, 48)
    assert r.bindings["blocks.0.attn.in_proj"] == GemmBinding(
        "blocks.0.attn.in_proj",
        "blocks.0.attn",
        "mha_in_proj",
        "blocks.0.attn.in_proj_weight",
        "blocks.0.attn.in_proj_bias",
    )
    assert r.bindings["blocks.0.attn.out_proj"].kind == "linear"
    assert r.bindings["blocks.0.attn.out_proj"].module == "blocks.0.attn.out_proj"
    for i in range(2):
        check_attention(r, f"blocks.{i}.attn", batch=3, heads=4, seq=16, hd=8)
    assert s["blocks.1.mlp.0"].type == L.MLP and s["blocks.1.mlp.0"].out_features == 128
    names = [g.name for g in s]
    assert names.index("blocks.0.attn.in_proj") < names.index("blocks.0.attn.scores")
    assert names.index("blocks.0.attn.values") < names.index("blocks.0.attn.out_proj")


def test_mha_cross_attention_rows_keep_flops():
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2)  # (L, B, E)

        def forward(self, q, kv):
            return self.attn(q, kv, kv)[0]

    q, kv = torch.randn(4, 2, 16), torch.randn(7, 2, 16)
    for method in ("fx", "export"):
        r = traced(Cross(), (q, kv), method=method)
        inp = r.schema["attn.in_proj"]
        assert inp.flops == 2 * 16 * 16 * (2 * 4 + 2 * 2 * 7), method
        s = r.schema["attn.scores"]
        assert (s.in_features, s.out_features, s.rows, s.seq, s.heads) == (8, 7, 2 * 2 * 4, 7, 2)
        if method == "fx":  # export decomposes the MHA into aten ops
            assert r.attention["attn.scores"].via == "mha"


def test_manual_qkv_with_sdpa_and_written_out_attention():
    model = ViTSDPA()
    r = traced(model, torch.randn(2, 8, 32))
    assert r.method == "fx"
    assert weight_names(r) == expected_weight_gemms(model)
    s = r.schema
    for n in ("attn.q", "attn.k", "attn.v", "attn.proj", "attn2.qkv", "attn2.proj"):
        assert s[n].type == L.ATTN_PROJ and s[n].rows == 16, n
    assert s["attn2.qkv"].out_features == 96 and not s["attn2.qkv"].bias
    assert s["fc1"].type == s["fc2"].type == L.MLP
    check_attention(r, "attn", batch=2, heads=4, seq=8, hd=8)  # F.scaled_dot_product_attention
    check_attention(r, "attn2", batch=2, heads=4, seq=8, hd=8)  # q @ k^T, softmax, @ v
    # how the rewrite can reach each attention core
    assert r.attention["attn.scores"].via == r.attention["attn.values"].via == "sdpa"
    assert r.attention["attn.scores"].nodes and all(
        any(n.name == node for n in r.graph_module.graph.nodes)
        for node in r.attention["attn.scores"].nodes
    )
    assert r.attention["attn2.scores"].via == "chain" and not r.attention["attn2.scores"].nodes
    assert set(r.attention) == {g.name for g in s.gemms if not g.has_weight}


def test_functional_weights_and_repeated_calls():
    model = FunctionalLinear()  # F.linear(x, qkv.weight), relu(y) @ w, out called twice
    r = traced(model, torch.randn(2, 5, 16))
    assert r.method == "fx"
    s = r.schema
    assert weight_names(r) == {"qkv", "w", "out"}
    assert r.bindings["qkv"] == GemmBinding("qkv", "qkv", "functional", "qkv.weight", "qkv.bias")
    assert s["qkv"].type == L.ATTN_PROJ and s["qkv"].bias
    w = s["w"]  # stored [in, out] and used as x @ w
    assert (w.in_features, w.out_features, w.rows, w.bias) == (48, 16, 10, False)
    assert r.bindings["w"].kind == "functional_op" and r.bindings["w"].module == ""
    out = s["out"]
    assert (out.rows, out.calls, out.type) == (10, 2, L.HEAD)  # top-level last GEMM


def test_reused_module_with_different_rows_sums_rows():
    r = traced(Reused(), torch.randn(2, 5, 8))
    g = r.schema["fc"]
    assert (g.rows, g.calls) == (2 * 5 + 2 * 3, 1)


def test_einsum_weight():
    r = traced(EinsumModel(), torch.randn(2, 5, 8))
    assert r.method == "fx" and weight_names(r) == {"fc", "w"}
    w = r.schema["w"]
    assert (w.in_features, w.out_features, w.rows) == (8, 6, 10)


@pytest.mark.parametrize("method", ["fx", "export"])
def test_weight_orientation_and_dense_uses(method):
    x = torch.randn(2, 8, 64)
    for form in FunctionalForms.FORMS:
        r = trace(FunctionalForms(form), x, method=method)
        w = r.bindings["w"]
        assert w.transposed == (form in FunctionalForms.STORED_IN_OUT), form
        assert w.unsupported is None and r.bindings["lin"].unsupported is None, form
        assert (r.schema["w"].in_features, r.schema["w"].out_features) == (64, 128), form
    r = trace(DenseUse(), x, method=method)
    assert r.bindings["block.w"].unsupported == "weight used densely by norm in block"
    assert r.bindings["block.v"].unsupported is None  # .dtype and .shape reads


def test_owner_reading_a_linear_weight_is_not_a_dense_use():
    class Block(nn.Module):  # Hugging Face T5's T5DenseActDense does this
        def __init__(self):
            super().__init__()
            self.wo = nn.Linear(16, 16)

        def forward(self, x):
            if isinstance(self.wo.weight, torch.Tensor) and x.dtype != self.wo.weight.dtype:
                x = x.to(self.wo.weight.dtype)
            return self.wo(x)

    r = traced(nn.Sequential(Block()), torch.randn(2, 16))
    assert r.bindings["0.wo"].unsupported is None and not r.bindings["0.wo"].transposed


def test_a_linear_weight_used_transposed_stays_dense():
    class Flipped(nn.Module):  # the Linear is never called: only x @ lin.weight
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 64)

        def forward(self, x):
            return x @ self.lin.weight

    r = traced(Flipped(), torch.randn(2, 64))
    assert r.bindings["lin"].transposed
    assert (
        r.bindings["lin"].unsupported
        == "the weight of Linear 'lin' is used transposed in its GEMMs"
    )


def test_mha_weights_are_not_dense_uses():
    for method in ("fx", "export"):
        r = trace(ViTMHA(), torch.randn(2, 16, 48), method=method)
        assert all(b.unsupported is None for b in r.bindings.values()), method


def test_einsum_with_ellipsis_is_read_by_fx():
    r = traced(FunctionalForms("einsum_oi"), torch.randn(2, 8, 64))
    assert r.method == "fx" and "w" in weight_names(r)
    assert not [n for n in r.notes if "einsum" in n]


def test_coverage_check_falls_back_to_export():
    msgs: list[str] = []
    r = traced(TensordotModel(), torch.randn(2, 5, 8), progress=msgs.append)
    assert r.method == "export" and r.graph_module is None
    assert any("fx missed" in n and "w (tensordot)" in n for n in r.notes)
    assert any("torch.export" in m for m in msgs)
    assert weight_names(r) == {"w", "v"}
    assert (r.schema["w"].in_features, r.schema["w"].out_features) == (8, 6)
    assert (r.schema["v"].in_features, r.schema["v"].out_features) == (6, 4)
    assert r.schema["v"].type == L.OTHER  # a root param named 'v' is not an attention proj


def test_fx_and_export_agree():
    for model, x in ((ViTMHA(), torch.randn(2, 16, 48)), (ViTSDPA(), torch.randn(2, 8, 32))):
        a = trace(model, x, method="fx").schema
        b = trace(model, x, method="export").schema
        assert [g.to_dict() for g in a] == [g.to_dict() for g in b]


def test_train_mode_buffers_and_rng_untouched():
    model = BNModel().train()
    r = traced(model, torch.randn(4, 8))  # traced() checks buffers, RNG and flags
    assert model.training and r.schema["fc"].rows == 4


# ---------------------------------------------------------------------------------------
# nn.TransformerEncoder (fx fails on its fast-path checks -> export)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder(batch_first):
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=batch_first)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    if not batch_first:
        model.eval()
    x = torch.randn(2, 10, 32) if batch_first else torch.randn(10, 2, 32)
    r = traced(model, x)
    assert r.method == "export"
    assert any("fx failed" in n for n in r.notes)
    assert weight_names(r) == expected_weight_gemms(model)
    s = r.schema
    for i in range(2):
        p = f"layers.{i}"
        assert (s[f"{p}.self_attn.in_proj"].out_features, s[f"{p}.self_attn.in_proj"].rows) == (
            96,
            20,
        )
        assert s[f"{p}.self_attn.in_proj"].type == s[f"{p}.self_attn.out_proj"].type == L.ATTN_PROJ
        assert s[f"{p}.linear1"].type == s[f"{p}.linear2"].type == L.MLP
        assert s[f"{p}.linear1"].rows == 20
        check_attention(r, f"{p}.self_attn", batch=2, heads=4, seq=10, hd=8)
    assert r.bindings["layers.0.self_attn.in_proj"].kind == "mha_in_proj"
    assert r.bindings["layers.0.self_attn.out_proj"].kind == "linear"


# ---------------------------------------------------------------------------------------
# HF transformers (fx cannot trace them -> export)
# ---------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    model = GPT2LMHeadModel(cfg)
    return model, traced(model, torch.randint(0, 100, (2, 12)))


def test_gpt2(gpt2):
    model, r = gpt2
    assert r.method == "export"
    assert weight_names(r) == expected_weight_gemms(model)
    s = r.schema
    for i in range(2):
        p = f"transformer.h.{i}"
        assert s[f"{p}.attn.c_attn"].type == s[f"{p}.attn.c_proj"].type == L.ATTN_PROJ
        assert s[f"{p}.mlp.c_fc"].type == s[f"{p}.mlp.c_proj"].type == L.MLP
        assert (s[f"{p}.attn.c_attn"].in_features, s[f"{p}.attn.c_attn"].out_features) == (64, 192)
        assert (s[f"{p}.mlp.c_proj"].in_features, s[f"{p}.mlp.c_proj"].out_features) == (256, 64)
        assert s[f"{p}.mlp.c_fc"].rows == 24 and s[f"{p}.mlp.c_fc"].bias
        assert r.bindings[f"{p}.mlp.c_fc"].kind == "conv1d"
        check_attention(r, f"{p}.attn", batch=2, heads=4, seq=12, hd=16)
        assert r.attention[f"{p}.attn.scores"].via == "hf"  # reached via AttentionInterface
    head = s["lm_head"]
    assert (head.type, head.in_features, head.out_features, head.rows) == (L.HEAD, 64, 100, 24)
    assert head.shared_with == "transformer.wte.weight" and not head.bias
    assert r.bindings["lm_head"].weight == "lm_head.weight"


@pytest.fixture(scope="module")
def bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=32,
    )
    model = BertForSequenceClassification(cfg)  # train mode (dropout on)
    ids = torch.randint(0, 100, (2, 9))
    return model, traced(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def test_bert_for_sequence_classification(bert_cls):
    model, r = bert_cls
    assert r.method == "export" and model.training
    assert weight_names(r) == expected_weight_gemms(model)
    s = r.schema
    for i in range(2):
        p = f"bert.encoder.layer.{i}"
        for n in ("attention.self.query", "attention.self.key", "attention.self.value"):
            assert s[f"{p}.{n}"].type == L.ATTN_PROJ and s[f"{p}.{n}"].rows == 18
        assert s[f"{p}.attention.output.dense"].type == L.ATTN_PROJ
        assert s[f"{p}.intermediate.dense"].type == L.MLP
        assert s[f"{p}.output.dense"].type == L.MLP
        assert s[f"{p}.output.dense"].in_features == 128
        check_attention(r, f"{p}.attention.self", batch=2, heads=4, seq=9, hd=16)
    assert s["classifier"].type == L.HEAD and s["classifier"].rows == 2
    assert s["bert.pooler.dense"].type == L.HEAD and s["bert.pooler.dense"].rows == 2


def test_bert_model_and_tied_mlm_head():
    from transformers import BertConfig, BertForMaskedLM, BertModel

    cfg = BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=16,
    )
    ids = torch.randint(0, 50, (2, 6))
    model = BertModel(cfg).eval()
    r = traced(model, ids)
    assert weight_names(r) == expected_weight_gemms(model)
    assert r.schema["encoder.layer.1.attention.self.query"].rows == 12
    mlm = BertForMaskedLM(cfg)
    r = traced(mlm, {"input_ids": ids})
    dec = r.schema["cls.predictions.decoder"]
    assert dec.type == L.HEAD and dec.shared_with == "bert.embeddings.word_embeddings.weight"


# ---------------------------------------------------------------------------------------
# failures
# ---------------------------------------------------------------------------------------
def test_untraceable_model_raises_one_line_trace_error():
    model = DataDependent()
    before = snapshot(model)
    with pytest.raises(TraceError) as ei:
        trace(model, torch.randn(2, 5, 8))
    msg = str(ei.value)
    assert "\n" not in msg
    assert "YAML schema" in msg and "pxcompile trace model.py -o schema.yaml" in msg
    assert "fx failed" in msg and "torch.export failed" in msg
    assert "models_zoo.py" in msg  # where it failed
    assert_unchanged(model, before)


def test_no_gemm_found_raises():
    with pytest.raises(TraceError, match="found no GEMM.*YAML schema"):
        trace(CatWeights(), torch.randn(2, 5, 8))


def test_bad_arguments():
    with pytest.raises(TraceError, match="method"):
        trace(nn.Linear(2, 2), torch.randn(1, 2), method="jit")
    with pytest.raises(TraceError, match="example inputs"):
        trace(nn.Linear(2, 2), 3)
    with pytest.raises(TraceError, match="fx failed"):
        trace(DataDependent(), torch.randn(2, 5, 8), method="fx")


def test_name_and_meta():
    r = trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(3, 4))
    assert r.schema.name == "Sequential" and r.schema.meta == {"traced_with": "fx"}
    assert [g.name for g in r.schema] == ["0", "2"]
    assert trace(nn.Linear(4, 4), torch.randn(1, 4), name="tiny").schema.name == "tiny"


@pytest.mark.parametrize(
    "path,expected",
    [
        ("transformer.h.0.attn.c_proj", L.ATTN_PROJ),
        ("transformer.h.0.mlp.c_proj", L.MLP),
        ("encoder.block.0.layer.0.SelfAttention.o", L.ATTN_PROJ),
        ("encoder.block.0.layer.1.DenseReluDense.wo", L.MLP),
        ("model.layers.0.self_attn.q_proj", L.ATTN_PROJ),
        ("model.layers.0.mlp.down_proj", L.MLP),
        ("lm_head", L.HEAD),
        ("head.fc", L.HEAD),
        ("blocks.0.mlp_tokens.fc1", L.TOKEN_MIX),
        ("blocks.0.mlp_channels.fc1", L.MLP),
        ("patch_embed.proj", L.EMBEDDING),
        ("bert.encoder.layer.0.output.dense", L.MLP),
        ("weird", L.OTHER),
    ],
)
def test_classify(path, expected):
    assert classify(path) == expected


# ---------------------------------------------------------------------------------------
# mode-dependent graphs
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False])
def test_a_graph_that_differs_in_train_and_eval_mode_is_not_kept(training):
    from pxcompile.passes.trace import MODE_NOTE

    model = StochasticDepthMLP().train(training)
    r = traced(model, torch.randn(8, 128))  # modes and attributes put back
    assert r.method == "fx" and r.graph_module is None and MODE_NOTE in r.notes
    assert {g.name for g in r.schema} == {"fc1", "fc2"}
    plain = traced(StochasticDepthMLP(0.0).train(training), torch.randn(8, 128))
    assert plain.graph_module is not None and MODE_NOTE not in plain.notes


def test_constants_fx_lifts_stay_off_the_users_model():
    model = LiftedConstant()
    r = traced(model, torch.randn(4, 128))  # checks the model's attributes are unchanged
    assert r.graph_module is not None and hasattr(r.graph_module, "_tensor_constant0")
