"""Pixelfly attention put into compiled models: HF GPT-2 (SDPA) and BERT at sequence 2048, and
an fx-traced model calling ``F.scaled_dot_product_attention``; outputs match the masked-dense
reference (same element mask, dense math) and differ from dense attention."""

from __future__ import annotations

import copy

import pytest
import torch
from models_zoo import CausalSDPA, ManualAttention
from torch import nn

from pxcompile import api
from pxcompile.attention import (
    DEFAULT_MIN_SEQ,
    AttentionSpec,
    PixelflyAttention,
    sparsify_attention,
)

transformers = pytest.importorskip("transformers")

SEQ = 2048


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _compile_both(model, inputs, policy=None):
    """(compiled at budget 0.3 from example inputs of SEQ tokens, so the plan sparsifies
    attention too; its masked-dense reference: same weights, same element mask)."""
    traced = api.trace(model, inputs)
    plan = api.plan(traced, 0.3, 32, policy=policy)
    assert plan.sparse_attention_layers, [lp.reason for lp in plan.layers]
    gm = api.apply(model, plan, inputs, traced=traced)
    ref = api.masked_dense_reference(model, gm, traced)
    return gm, ref


def _gpt2():
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=128, n_head=2, vocab_size=512, n_positions=SEQ,
        attn_implementation="sdpa", bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _bert():
    cfg = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512,
        vocab_size=512, max_position_embeddings=SEQ, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def _ids(batch=2):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (batch, SEQ), generator=g)
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    mask[-1, SEQ - 150 :] = 0  # padding on the last sequence
    return ids, mask


def test_default_threshold_is_a_valid_length():
    assert DEFAULT_MIN_SEQ >= 1024
    assert AttentionSpec().padded_seq(DEFAULT_MIN_SEQ) == DEFAULT_MIN_SEQ


@pytest.mark.slow
@pytest.mark.parametrize("make", [_gpt2, _bert], ids=["gpt2", "bert"])
def test_hf_models_match_masked_dense(make):
    model = make()
    ids, mask = _ids()
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask)[0]
    gm, ref = _compile_both(model, {"input_ids": ids[:1]})
    assert gm.model.config._attn_implementation.startswith("pixelfly_")
    with torch.no_grad():
        for kw in ({"attention_mask": mask}, {}):
            got = gm(input_ids=ids, **kw)[0]
            want = ref(input_ids=ids, **kw)[0]
            assert torch.isfinite(got).all()
            assert _rel(got, want) < 1e-4
        short = gm(input_ids=ids[:, :256])[0]  # under the threshold: dense attention
        assert _rel(short, ref(input_ids=ids[:, :256])[0]) < 1e-4
    # the sparse attention really is sparse: dense attention gives something else
    assert _rel(want, dense) > 1e-3 if make is _gpt2 else _rel(got, dense) > 1e-5


@pytest.mark.slow
def test_gpt2_causality_and_training_step():
    model = _gpt2().train()
    ids, _ = _ids(1)
    gm, _ = _compile_both(model.eval(), {"input_ids": ids})
    gm.eval()
    with torch.no_grad():
        a = gm(input_ids=ids)[0]
        ids2 = ids.clone()
        ids2[:, 1500:] = (ids2[:, 1500:] + 7) % 512
        b = gm(input_ids=ids2)[0]
    assert torch.equal(a[:, :1500], b[:, :1500])  # no position sees a later token
    assert not torch.equal(a[:, 1500:], b[:, 1500:])
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=0.5)
    losses = []
    for _ in range(3):
        loss = gm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_fx_sdpa_node_replaced():
    torch.manual_seed(0)
    model = nn.Sequential(CausalSDPA(), CausalSDPA())
    x = torch.randn(1, 1024, 64)
    y = torch.randn(1, SEQ, 64)
    gm, ref = _compile_both(model, (y,))
    assert isinstance(gm.pixelfly_attention, PixelflyAttention)
    assert any(n.op == "call_module" and n.target == "pixelfly_attention" for n in gm.graph.nodes)
    with torch.no_grad():
        assert _rel(gm(y), ref(y)) < 1e-4
        assert _rel(gm(x), ref(x)) < 1e-4  # 1024 < threshold: dense on both sides
    z = y.clone().requires_grad_()
    gm(z).sum().backward()
    assert torch.isfinite(z.grad).all()


def test_no_attention_found():
    with pytest.raises(ValueError, match="no attention core"):
        sparsify_attention(nn.Linear(4, 4))


def test_custom_spec_and_reference_are_separate_implementations():
    a = sparsify_attention(_gpt2(), AttentionSpec(block=32, factors=3, globals=2), min_seq=1024)
    b = sparsify_attention(_gpt2(), reference=True)
    assert a.config._attn_implementation != b.config._attn_implementation
    ids = torch.randint(0, 512, (1, 1024))
    with torch.no_grad():
        assert torch.isfinite(a(input_ids=ids)[0]).all()
    assert copy.deepcopy(a).config._attn_implementation == a.config._attn_implementation


def test_plan_gradients_match_masked_dense_reference():
    torch.manual_seed(0)
    model = nn.Sequential(CausalSDPA(), CausalSDPA())
    y = torch.randn(1, SEQ, 64)
    gm, ref = _compile_both(model, (y,))
    a, b = y.clone().requires_grad_(), y.clone().requires_grad_()
    gm(a).pow(2).sum().backward()
    ref(b).pow(2).sum().backward()
    assert _rel(a.grad, b.grad) < 1e-4
    # the dense layers' weights (the attention projections stay what the plan says)
    for name, p in ref.named_parameters():
        if name.endswith("weight") and name in dict(gm.named_parameters()):
            assert _rel(dict(gm.named_parameters())[name].grad, p.grad) < 1e-4


def test_attention_under_min_seq_stays_dense_with_reason():
    model = nn.Sequential(CausalSDPA())
    plan = api.plan(model, 0.3, 32, example_inputs=(torch.randn(1, 1024, 64),))
    lp = plan["0.scores"]
    assert not lp.sparse and "under attention_min_seq 2048" in lp.reason
    plan = api.plan(
        model, 0.3, 32, example_inputs=(torch.randn(1, 1024, 64),),
        policy={"attention_min_seq": 1024},
    )  # fmt: skip
    assert plan["0.scores"].attention is not None


def test_unreachable_attention_stays_dense_with_reason():
    x = torch.randn(1, SEQ, 64)
    plan = api.plan(nn.Sequential(ManualAttention(64, 2)), 0.3, 32, example_inputs=(x,))
    assert not plan["0.scores"].sparse and "matmul, softmax, matmul" in plan["0.scores"].reason
    mha = nn.MultiheadAttention(64, 2, batch_first=True)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    plan = api.plan(M(), 0.3, 32, example_inputs=(x,))
    att = [lp for lp in plan.layers if not lp.gemm.has_weight]
    assert att and all("MultiheadAttention" in lp.reason for lp in att)


def test_plan_attention_errors_are_one_line(tmp_path):
    from dataclasses import replace

    from pxcompile.errors import PlanError

    model = nn.Sequential(CausalSDPA(), CausalSDPA())
    y = torch.randn(1, SEQ, 64)
    traced = api.trace(model, (y,))
    plan = api.plan(traced, 0.3, 32)
    layers = [
        replace(lp, pattern=AttentionSpec(64, 3, 1)) if lp.name.startswith("1.") and lp.attention
        else lp
        for lp in plan.layers
    ]  # fmt: skip
    with pytest.raises(PlanError, match="different patterns"):
        api.apply(model, replace(plan, layers=layers), (y,), traced=traced)
    layers = [replace(lp, pattern=None) if lp.name == "0.values" else lp for lp in plan.layers]
    with pytest.raises(PlanError, match="'0.scores' is sparse but '0.values' is dense"):
        api.apply(model, replace(plan, layers=layers), (y,), traced=traced)
    # a plan file round trip keeps the attention pattern
    path = tmp_path / "plan.yaml"
    plan.save(path)
    again = type(plan).load(path).check_against(traced.schema)
    assert [lp.pattern for lp in again.layers] == [lp.pattern for lp in plan.layers]


@pytest.mark.slow
def test_hf_plan_with_some_attention_dense_is_selective():
    model = _gpt2()
    ids, _ = _ids(1)
    policy = {"rules": [{"match": "transformer.h.1.attn.*", "dense": True}]}
    gm, ref = _compile_both(model, {"input_ids": ids}, policy=policy)
    att = [m for m in gm.modules() if type(m).__name__ == "GPT2Attention"]
    assert getattr(att[0], "pxcompile_sparse_attention", False)
    assert not getattr(att[1], "pxcompile_sparse_attention", False)
    with torch.no_grad():
        assert _rel(gm(input_ids=ids)[0], ref(input_ids=ids)[0]) < 1e-4


@pytest.mark.slow
def test_t5_attention_with_position_bias_stays_dense_and_runs():
    cfg = transformers.T5Config(d_model=128, d_ff=256, num_layers=1, num_heads=2, vocab_size=128)
    torch.manual_seed(0)
    model = transformers.T5Model(cfg).eval()
    ids = torch.randint(0, 128, (1, SEQ))
    inputs = {"input_ids": ids, "decoder_input_ids": ids[:, :16], "use_cache": False}
    traced = api.trace(model, inputs)
    plan = api.plan(traced, 0.3, 32)
    att = [lp for lp in plan.layers if not lp.gemm.has_weight]
    assert att and not any(lp.sparse for lp in att)
    assert "relative position bias" in plan["encoder.block.0.layer.0.SelfAttention.scores"].reason
    # T5's feed-forward reads self.wo.weight.dtype: a metadata read, so wo is sparsified
    assert plan["encoder.block.0.layer.1.DenseReluDense.wo"].sparse
    gm = api.apply(model, plan, inputs, traced=traced)
    assert api.verify(model, gm, traced, inputs) < 1e-4


def test_hf_attention_that_is_more_than_a_masked_softmax_is_recognized():
    from types import SimpleNamespace

    from pxcompile.passes.trace import hf_attention_unsupported

    def with_config(**cfg):
        m = nn.Module()
        m.config = SimpleNamespace(**cfg)
        return nn.Sequential(m)

    assert hf_attention_unsupported(with_config()) is None
    assert "relative position" in hf_attention_unsupported(
        with_config(relative_attention_num_buckets=32)
    )
    assert "soft-caps" in hf_attention_unsupported(with_config(attn_logit_softcapping=50.0))
    assert "ALiBi" in hf_attention_unsupported(with_config(alibi=True))
    assert "ALiBi" in hf_attention_unsupported(with_config(position_embedding_type="alibi"))


def test_plan_with_a_bad_attention_min_seq_is_a_one_line_error():
    from dataclasses import replace

    from pxcompile.errors import PlanError

    model = nn.Sequential(CausalSDPA())
    y = torch.randn(1, SEQ, 64)
    traced = api.trace(model, (y,))
    plan = api.plan(traced, 0.3, 32)
    bad = replace(plan, policy={**plan.policy, "attention_min_seq": "long"})
    with pytest.raises(PlanError, match="attention_min_seq must be a positive integer"):
        api.apply(model, bad, (y,), traced=traced)


def test_attention_reachable_reasons():
    from pxcompile.passes.rewrite import attention_reachable
    from pxcompile.passes.trace import AttentionSite

    assert attention_reachable(AttentionSite("hf"), "export") is None
    assert attention_reachable(AttentionSite("sdpa", ("sdpa_1",)), "fx") is None
    assert "fx cannot trace" in attention_reachable(AttentionSite("sdpa", ("sdpa_1",)), "export")
    assert "MultiheadAttention" in attention_reachable(AttentionSite("mha"), "fx")
    assert "matmul, softmax, matmul" in attention_reachable(AttentionSite("chain"), "fx")
    assert attention_reachable(AttentionSite("hf", (), "soft-caps"), "export") == "soft-caps"
