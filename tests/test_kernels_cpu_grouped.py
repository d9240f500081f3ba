"""pxcompile.kernels.cpu.grouped: the grouped CPU kernel of PixelflyLinear (one matmul per
group of 2^f cells) against the masked-dense reference and the gather kernel, outputs and all
gradients, padded or not; and which kernel a layer runs."""

from __future__ import annotations

import pytest
import torch

from pxcompile.kernels.cpu.grouped import group_weight
from pxcompile.layers import PixelflyLinear, masked_dense_reference
from pxcompile.passes.cost_cpu import CalibratedCost, cpu_execution, group_pieces
from pxcompile.patterns import PatternSpec

CASES = [
    (64, 128, PatternSpec(4, 1, 8, 0)),  # gather layout, f = 1: no waste
    (128, 64, PatternSpec(4, 1, 8, 4)),  # scatter layout, low rank
    (96, 96, PatternSpec(12, 2, 8, 8)),  # f = 2: a dropped cell per group row, n not 2^k
    (64, 256, PatternSpec(8, 3, 8, 0)),  # one group holds the whole weight
    (49, 96, PatternSpec(4, 1, 8, 4, padded_in=64)),  # padded input: a short last group
    (96, 49, PatternSpec(4, 1, 8, 0, padded_out=64)),  # padded output
    (25, 40, PatternSpec(4, 1, 8, 4, padded_out=64, padded_in=32)),  # groups all padding
    # the low rank fused on the in side (in > out), cut short by padding
    (96, 49, PatternSpec(4, 1, 8, 4, padded_out=64)),
    (40, 25, PatternSpec(4, 1, 8, 4, padded_out=32, padded_in=64)),
    (256, 64, PatternSpec(8, 2, 8, 8)),  # in side, f = 2
]


def _pair(fin, fout, spec, bias):
    torch.manual_seed(0)
    grouped = PixelflyLinear(fin, fout, spec, bias=bias, dtype=torch.float64)
    gather = PixelflyLinear(fin, fout, spec, bias=bias, dtype=torch.float64)
    gather.load_state_dict(grouped.state_dict())
    grouped.execution, gather.execution = "grouped", "gather"
    return grouped, gather


@pytest.mark.parametrize(("fin", "fout", "spec"), CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_matches_masked_dense_and_the_gather_kernel(fin, fout, spec, bias):
    grouped, gather = _pair(fin, fout, spec, bias)
    x = torch.randn(2, 11, fin, dtype=torch.float64)
    gy = torch.randn(2, 11, fout, dtype=torch.float64)
    w = grouped.block_weight().detach().requires_grad_(True)
    b = None if not bias else grouped.bias.detach().clone().requires_grad_(True)
    u = v = None
    if spec.rank:
        u = grouped.lowrank_u.detach().clone().requires_grad_(True)
        v = grouped.lowrank_v.detach().clone().requires_grad_(True)
    xs = [x.clone().requires_grad_(True) for _ in range(3)]
    ref = masked_dense_reference(w, b, spec, u, v)(xs[0])
    y = grouped(xs[1])
    y2 = gather(xs[2])
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(y, y2)
    (ref * gy).sum().backward()
    (y * gy).sum().backward()
    (y2 * gy).sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad)
    torch.testing.assert_close(grouped.block_weight(), gather.block_weight())
    for name, p in grouped.named_parameters():
        torch.testing.assert_close(p.grad, dict(gather.named_parameters())[name].grad)
    # the masked-dense weight's gradient, on the kept elements, is the blocks' gradient
    torch.testing.assert_close(
        grouped.block_weight().new_zeros(fout, fin) + w.grad * grouped.mask(),
        _dense_from_blocks_grad(grouped),
    )


def _dense_from_blocks_grad(layer: PixelflyLinear) -> torch.Tensor:
    """The blocks' gradient laid out as the dense ``[out, in]`` weight it belongs to."""
    with torch.no_grad():
        saved = layer.blocks.detach().clone()
        layer.blocks.copy_(layer.blocks.grad)
        out = layer.block_weight().detach().clone()
        layer.blocks.copy_(saved)
    return out


@pytest.mark.parametrize(
    ("fin", "fout", "spec"),
    [
        (64, 128, PatternSpec(4, 1, 8, 4)),  # low rank fused on the out side
        (128, 64, PatternSpec(4, 1, 8, 4)),  # on the in side
        (40, 25, PatternSpec(4, 1, 8, 4, padded_out=32, padded_in=64)),  # in side, cut
    ],
)
@pytest.mark.parametrize("frozen", ["x", "blocks", "lowrank", "blocks+lowrank_v", "x+blocks"])
def test_grouped_partial_gradients_match_the_gather_kernel(fin, fout, spec, frozen):
    """Frozen parts (an input without grad, frozen blocks or factors) take other branches of
    the fused backward: what is still trained gets the same gradient as with the gather
    kernel."""
    grouped, gather = _pair(fin, fout, spec, True)
    x = torch.randn(13, fin, dtype=torch.float64)
    xs = [x.clone().requires_grad_("x" not in frozen) for _ in range(2)]
    for layer in (grouped, gather):
        layer.blocks.requires_grad_("blocks" not in frozen)
        layer.lowrank_u.requires_grad_(frozen not in ("lowrank",))
        layer.lowrank_v.requires_grad_("lowrank" not in frozen)
    gy = torch.randn(13, fout, dtype=torch.float64)
    for layer, xi in zip((grouped, gather), xs, strict=True):
        (layer(xi) * gy).sum().backward()
    if "x" not in frozen:
        torch.testing.assert_close(xs[0].grad, xs[1].grad)
    ref = dict(gather.named_parameters())
    for name, p in grouped.named_parameters():
        assert (p.grad is None) == (ref[name].grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref[name].grad)


def test_group_weight_holds_each_kept_block_once_and_zeros_elsewhere():
    spec = PatternSpec(8, 2, 4, 0)
    layer = PixelflyLinear(32, 64, spec, bias=False, dtype=torch.float64)
    w = group_weight(layer.blocks.detach(), layer.groups)
    assert w.shape == (2, 32, 16)
    dense = layer.block_weight().detach()
    for g in range(2):
        torch.testing.assert_close(w[g], dense[g * 32 : (g + 1) * 32, g * 16 : (g + 1) * 16])
    assert (w != 0).sum() == (layer.blocks != 0).sum()


def test_inference_autocast_and_no_grad_paths_agree():
    grouped, gather = _pair(64, 128, PatternSpec(4, 1, 8, 4), True)
    grouped.float(), gather.float()
    x = torch.randn(9, 64)
    with torch.no_grad():
        torch.testing.assert_close(grouped(x), gather(x))
    with torch.inference_mode():
        torch.testing.assert_close(grouped(x), gather(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = grouped(x)
        assert yb.dtype == torch.bfloat16
        yb.float().sum().backward()
    assert grouped.blocks.grad is not None and grouped.blocks.grad.dtype == torch.float32
    torch.testing.assert_close(yb.float(), gather(x).detach(), atol=0.1, rtol=0.05)


def test_torch_compile_traces_the_grouped_kernel():
    grouped, _ = _pair(49, 96, PatternSpec(4, 1, 8, 4, padded_in=64), True)
    x = torch.randn(7, 49, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(grouped, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, grouped(x))
    y.sum().backward()
    assert x.grad is not None and grouped.blocks.grad is not None


def test_mixer_token_mixing_runs_grouped_and_wide_f3_runs_gather():
    """The cost model's choice: block-diagonal patterns (f = 1) run grouped; a pattern whose
    groups would be mostly dropped cells (f = 3: 4 of 8 kept) runs the gather kernel."""
    token = PatternSpec(4, 1, 32, 8, padded_in=256)
    assert cpu_execution(384, 196, token) == "grouped"
    assert PixelflyLinear(196, 384, token).execution == "grouped"
    assert cpu_execution(3072, 768, PatternSpec(24, 3, 32, 16)) == "gather"
    assert PixelflyLinear(768, 3072, PatternSpec(24, 3, 32, 16)).execution == "gather"


def test_group_pieces_cut_padding_and_price_only_real_work():
    spec = PatternSpec(4, 1, 32, 0, padded_out=512, padded_in=256)
    assert group_pieces(384, 196, spec) == [(0, 128, 0, 256), (128, 196, 256, 384)]
    m = CalibratedCost()
    cost = m.grouped_row_cost(384, 196, spec)
    assert cost == 2.0 * (128 * 256 + 68 * 128) + m.group_move * (196 + 384)


def test_unknown_execution_is_an_error():
    layer = PixelflyLinear(64, 128, PatternSpec(4, 1, 8, 0))
    layer.execution = "fast"
    with pytest.raises(ValueError, match="unknown execution"):
        layer(torch.randn(2, 64))
