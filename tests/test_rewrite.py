"""The rewrite pass reaches every weight GEMM: weights used through F.linear, @, matmul, einsum,
addmm or W @ x (on an nn.Linear's ``.weight`` or on a bare nn.Parameter), in models fx traces
and in models only torch.export captures, run sparse and match the masked-dense reference;
a weight whose dense values the model uses stays dense with the reason."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from models_zoo import DenseUse, FunctionalForms
from torch import nn

import pxcompile
from pxcompile import api
from pxcompile.layers import PixelflyLinear
from pxcompile.nn import PixelflyWeight
from pxcompile.passes.rewrite import weight_target


def reference_call(model, gm, traced, x):
    """``model`` run with each rewritten weight = B + U V^T of its compiled layer,
    differentiably (gradients reach the compiled layers' own parameters)."""
    params = {}
    for name, path in gm.pxcompile_layers.items():
        t = weight_target(model, traced.bindings[name])
        layer = gm.get_submodule(path)
        w = layer.dense_weight()
        params[t.weight] = w.t() if t.transposed else w
        if t.bias is not None:
            params[t.bias] = layer.bias
    return torch.func.functional_call(model, params, (x,))


def no_dense_weights(monkeypatch):
    def boom(self):
        raise AssertionError("a weight was materialised densely")

    monkeypatch.setattr(PixelflyLinear, "dense_weight", boom)


@pytest.mark.parametrize("traceable", [True, False], ids=["fx", "export"])
@pytest.mark.parametrize("form", FunctionalForms.FORMS)
def test_functional_gemms_run_sparse_and_match_the_reference(form, traceable, monkeypatch):
    torch.manual_seed(0)
    model = FunctionalForms(form, traceable)
    x = torch.randn(2, 8, 64)
    traced = api.trace(model, (x,))
    assert traced.method == ("fx" if traceable else "export")
    gm = pxcompile.sparsify(model, 0.3, block=16, example_inputs=(x,))
    assert set(gm.pxcompile_layers) == {"lin", "w", "proj"}, gm.pxcompile_plan
    left = {n.removeprefix("model.") for n, _ in gm.named_parameters()}
    assert not left & {"lin.weight", "w", "proj.weight"}  # the dense weights are gone
    uses_b = form in ("linear", "addmm")
    assert "b" in left or not uses_b  # F.linear / addmm's bias stays the model's own

    xs = x.clone().requires_grad_(True)
    want = reference_call(model, gm, traced, xs)
    layers = [
        p for path in gm.pxcompile_layers.values() for p in gm.get_submodule(path).parameters()
    ]
    # the bias b is the model's own in the reference, a copy in gm
    gw = torch.autograd.grad(want.square().sum(), [xs, *layers] + [model.b] * uses_b)
    no_dense_weights(monkeypatch)
    got = gm(xs)
    gm_b = [gm.get_parameter("b" if traceable else "model.b")] if uses_b else []
    gg = torch.autograd.grad(got.square().sum(), [xs, *layers, *gm_b])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("traceable", [True, False], ids=["fx", "export"])
def test_bare_parameter_becomes_a_pixelfly_weight(traceable):
    torch.manual_seed(0)
    model = FunctionalForms("matmul_op", traceable)
    x = torch.randn(2, 8, 64)
    gm = pxcompile.sparsify(model, 0.3, block=16, example_inputs=(x,))
    root = gm if traceable else gm.model
    layer = root.get_submodule("w_pixelfly")
    assert isinstance(layer, PixelflyLinear) and (layer.in_features, layer.out_features) == (
        64,
        128,
    )  # built in the orientation of x @ w: w is [in, out]
    assert gm.pxcompile_layers["w"] == ("w_pixelfly" if traceable else "model.w_pixelfly")
    if not traceable:  # the model's own forward reads self.w
        assert isinstance(root.w, PixelflyWeight) and root.w.layer is layer
        assert root.w.shape == model.w.shape
    assert api.verify(model, gm, api.trace(model, (x,)), (x,)) < 1e-5


@pytest.mark.parametrize("traceable", [True, False], ids=["fx", "export"])
def test_save_and_load_with_functional_weights(traceable, tmp_path):
    torch.manual_seed(0)
    model = FunctionalForms("einsum_io", traceable).eval()
    x = torch.randn(2, 8, 64)
    gm = pxcompile.sparsify(model, 0.3, block=16, example_inputs=(x,))
    pxcompile.save(gm, tmp_path / "m.px")
    back = pxcompile.load(tmp_path / "m.px")
    ops = [n for n in back.graph.nodes if "pixelfly_linear" in str(n.target)]
    assert len(ops) == 3  # lin (F.linear on .weight), w (einsum), proj (module call)
    torch.testing.assert_close(back(x), gm.eval()(x))
    again = pxcompile.load(tmp_path / "m.px", model=FunctionalForms("einsum_io", traceable))
    torch.testing.assert_close(again(x), gm(x))


@pytest.mark.parametrize("traceable", [True, False], ids=["fx", "export"])
def test_weight_used_densely_stays_dense_with_the_reason(traceable):
    torch.manual_seed(0)
    model = DenseUse(traceable=traceable)
    x = torch.randn(2, 8, 64)
    plan = api.plan(model, 0.3, 16, example_inputs=(x,))
    assert not plan["block.w"].sparse
    assert plan["block.w"].reason == "weight used densely by norm in block"
    assert plan["block.v"].sparse  # its dtype and shape were read: not a dense use
    gm = api.apply(model, plan, (x,))
    assert api.verify(model, gm, api.trace(model, (x,)), (x,)) < 1e-5


def test_plan_forcing_an_unreachable_weight_sparse_is_refused():
    model = DenseUse()
    x = torch.randn(2, 8, 64)
    traced = api.trace(model, (x,))
    plan = api.plan(traced, 0.3, 16)
    lp = plan["block.v"]
    forced = plan.to_dict()
    for entry in forced["layers"]:
        if entry["name"] == "block.w":  # an edited plan: the same pattern as block.v
            entry.update(action="sparse", pattern=lp.pattern.to_dict(), density=lp.density)
    with pytest.raises(pxcompile.PxError, match="weight used densely by norm in block"):
        api.apply(model, pxcompile.Plan.from_dict(forced), (x,), traced=traced)


def test_a_stack_of_matrices_stays_dense():
    class Batched(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 64, 64))

        def forward(self, x):
            return torch.bmm(x, self.w)

    model = Batched()
    plan = api.plan(model, 0.3, 16, example_inputs=(torch.randn(2, 8, 64),))
    assert not plan["w"].sparse and plan["w"].reason.startswith("a 3-D weight")


@pytest.mark.slow
def test_torchvision_swin_attention_weights_are_sparsified():
    """torchvision's Swin calls F.linear(x, self.qkv.weight, ...) inside
    shifted_window_attention (fx can't see into it: traced with export)."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=64,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=[4, 4],
        num_classes=10,
    ).eval()
    x = torch.randn(1, 3, 64, 64)
    traced = api.trace(model, (x,))
    gm = pxcompile.sparsify(model, 0.3, block=16, example_inputs=(x,))
    dense = {lp.name: lp.reason for lp in gm.pxcompile_plan.layers if lp.gemm.has_weight}
    dense = {k: v for k, v in dense.items() if not gm.pxcompile_plan[k].sparse}
    assert dense == {"head": "type head stays dense (policy)"}, dense
    assert {"features.1.0.attn.qkv", "features.3.1.attn.proj"} <= set(gm.pxcompile_layers)
    assert api.verify(model, gm, traced, (x,)) < 1e-4


@pytest.mark.slow
def test_hugging_face_t5_feed_forward_output_is_sparsified():
    """T5DenseActDense.forward reads self.wo.weight.dtype: a metadata read, not a dense use."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(
        d_model=64, d_ff=128, num_layers=2, num_heads=2, d_kv=32, vocab_size=128
    )
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    inputs = {
        "input_ids": torch.randint(0, 128, (2, 16)),
        "decoder_input_ids": torch.randint(0, 128, (2, 8)),
    }
    traced = api.trace(model, inputs)
    gm = pxcompile.sparsify(model, 0.3, block=16, example_inputs=inputs)
    plan = gm.pxcompile_plan
    wo = [lp for lp in plan.layers if lp.name.endswith("DenseReluDense.wo")]
    assert wo and all(lp.sparse for lp in wo), [(lp.name, lp.reason) for lp in wo]
    assert api.verify(model, gm, traced, inputs) < 1e-4


def test_padded_layers_run_sparse_match_the_reference_and_save(tmp_path):
    """Awkward sizes (issue #12.3): 100 tokens at block 16 pad to a size a pattern fits. The
    rewritten model keeps its shapes, matches the masked-dense reference in outputs and in every
    gradient, and its saved file (the op with the padded sides) loads and runs the same."""
    from models_zoo import MixerBlock

    from pxcompile.passes.budget import plan_schema
    from pxcompile.passes.mapping import FlopsBlockCost

    torch.manual_seed(0)
    model = MixerBlock(tokens=100, dim=128, token_hidden=192, channel_hidden=512)
    x = torch.randn(4, 100, 128)
    traced = api.trace(model, (x,))
    # the calibrated CPU model predicts padded token mixing slower than dense: plan by FLOPs
    plan = plan_schema(traced.schema, 0.4, 16, cost_model=FlopsBlockCost())
    padded = [lp.name for lp in plan.sparse_weight_layers if lp.pattern.padded]
    assert set(padded) == {"token_mixing.0", "token_mixing.2"}, plan.to_dict()
    gm = pxcompile.sparsify(model, plan=plan, example_inputs=(x,))
    assert set(gm.pxcompile_layers) == {lp.name for lp in plan.layers}
    for name in padded:
        layer = gm.get_submodule(gm.pxcompile_layers[name])
        assert layer.spec.padded and (layer.out_features, layer.in_features) == (
            model.get_submodule(name).weight.shape
        )
    xs = x.clone().requires_grad_(True)
    want = reference_call(model, gm, traced, xs)
    layers = [
        p for path in gm.pxcompile_layers.values() for p in gm.get_submodule(path).parameters()
    ]
    gw = torch.autograd.grad(want.square().sum(), [xs, *layers])
    got = gm(xs)
    gg = torch.autograd.grad(got.square().sum(), [xs, *layers])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert api.verify(model, gm, traced, (x,)) < 1e-5
    pxcompile.save(gm, tmp_path / "m.px")
    back = pxcompile.load(tmp_path / "m.px")
    assert back.pxcompile_plan["token_mixing.2"].pattern == plan["token_mixing.2"].pattern
    torch.testing.assert_close(back(x), gm.eval()(x))
    # rebuilt onto the user's dense model class: padded PixelflyLinear layers again
    again = pxcompile.load(tmp_path / "m.px", model=MixerBlock(100, 128, 192, 512))
    assert again.get_submodule("token_mixing.2").spec == plan["token_mixing.2"].pattern
    torch.testing.assert_close(again(x), gm(x))


@pytest.mark.parametrize("kernel", ["grouped", "gather"])
def test_each_layer_runs_the_cpu_kernel_its_plan_names(kernel):
    torch.manual_seed(0)
    model = FunctionalForms("linear", True)
    x = torch.randn(2, 8, 64)
    traced = api.trace(model, (x,))
    plan = api.plan(traced, 0.3, 16)
    edited = pxcompile.Plan(
        plan.model,
        plan.block,
        plan.budget,
        [dataclasses.replace(lp, kernel=kernel) if lp.kernel else lp for lp in plan.layers],
    )
    assert edited.sparse_weight_layers
    gm = api.apply(model, edited, (x,), traced=traced)
    assert {gm.get_submodule(p).execution for p in gm.pxcompile_layers.values()} == {kernel}
    assert api.verify(model, gm, traced, (x,)) < 1e-5
