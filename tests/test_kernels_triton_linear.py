"""The Triton kernel of PixelflyLinear (pxcompile/kernels/triton/linear.py) in Triton's
interpreter, against the masked-dense reference: output and every gradient (x, blocks, U, V,
bias), hypothesis-chosen shapes (pattern blocks 16/32, butterfly sizes, factors, cell widths,
ranks 0 and > 0, bias or not, row counts that are no multiple of a tile), both block layouts,
fp32/fp64 exactly, fp16/bf16 within their rounding. The tests run in a child process (see
tests/triton_interp.py); keep shapes small, the interpreter is slow."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from triton_interp import IN_INTERPRETER, interpreter_only, run_in_interpreter  # noqa: E402

from pxcompile.layers import PixelflyLinear, masked_dense_reference  # noqa: E402
from pxcompile.patterns import PatternSpec  # noqa: E402

SETTINGS = settings(
    max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)


@pytest.mark.skipif(IN_INTERPRETER, reason="this is the interpreter's process")
def test_in_triton_interpreter():
    run_in_interpreter(__file__)


@pytest.mark.skipif(IN_INTERPRETER, reason="compiles for the GPU: not the interpreter's job")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_a_gpu(dtype):
    """Both kernels go through Triton's whole compiler (to a cubin for sm_90, with the bundled
    ptxas; no GPU needed) with the forward's largest tiles: what the interpreter cannot check
    (types, tl.dot shapes and precisions, shared memory)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from pxcompile.kernels.triton import linear as TL

    wide = dtype == "bf16"
    ti = TL.tiles(4096, 4096, 4096, torch.bfloat16 if wide else torch.float32)
    modes = {"UPCAST": False, "PREC": "tf32", "ACC": triton.language.float32}
    cases = [
        (TL._bsmm, ("X", "W", "T", "L", "BIAS", "Y"), {
            "F1": 3, "HAS_LR": True, "HAS_BIAS": True, "BR": 16,
            "BM": ti["BM"], "BN": ti["BN"], "BK": ti["BK"], **modes}, ti["num_warps"]),
        (TL._sddmm, ("DY", "X", "G"), {"F1": 3, "BM": 64, "BO": 64, "BC": 64, **modes}, 4),
    ]  # fmt: skip
    for kern, ptrs, consts, warps in cases:
        fn = JITFunction(kern.fn)
        sig = {
            a: "constexpr" if a in consts else f"*{dtype}" if a in ptrs else "*i64" if a == "IDX"
            else "i32"
            for a in fn.arg_names
        }  # fmt: skip
        src = ASTSource(fn, sig, constexprs=consts)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        assert k.asm.get("cubin")


def _reference(layer: PixelflyLinear):
    w = layer.block_weight().detach().clone().requires_grad_(True)
    b = None if layer.bias is None else layer.bias.detach().clone().requires_grad_(True)
    u = v = None
    if layer.lowrank_u is not None:
        u = layer.lowrank_u.detach().clone().requires_grad_(True)
        v = layer.lowrank_v.detach().clone().requires_grad_(True)
    return masked_dense_reference(w, b, layer.spec, u, v), w, b, u, v


def _as_dense(layer: PixelflyLinear, blocks: torch.Tensor) -> torch.Tensor:
    """``blocks`` (a gradient in the layer's layout) as an ``[out, in]`` matrix."""
    probe = PixelflyLinear(
        layer.in_features, layer.out_features, layer.spec, bias=False, dtype=blocks.dtype
    )
    with torch.no_grad():
        probe.blocks.copy_(blocks)
    return probe.block_weight().detach()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _check(layer, rows: int, dtype: torch.dtype, tol: float, monkeypatch, device: str = "cpu"):
    """Layer in ``dtype`` on ``device`` through the Triton kernel vs the fp64 masked-dense
    reference (on the CPU)."""
    torch.manual_seed(1)
    layer = layer.double()
    ref, w, b, u, v = _reference(layer)
    x = torch.randn(rows, layer.in_features, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    yr = ref(xr)
    gy = torch.randn_like(yr)
    yr.backward(gy)
    layer = layer.to(device, dtype)
    xt = x.to(device, dtype).requires_grad_(True)
    monkeypatch.setenv("PXCOMPILE_KERNELS", "triton")
    y = layer(xt)
    y.backward(gy.to(device, dtype))
    assert y.dtype == dtype and y.shape == yr.shape and y.device == xt.device
    assert _rel(y, yr) < tol
    assert _rel(xt.grad, xr.grad) < tol
    g_blocks = _as_dense(layer, layer.blocks.grad.double().cpu())
    assert _rel(g_blocks, w.grad * layer.mask().cpu()) < tol
    if b is not None:
        assert _rel(layer.bias.grad, b.grad) < tol
    if u is not None:
        assert _rel(layer.lowrank_u.grad, u.grad) < tol
        assert _rel(layer.lowrank_v.grad, v.grad) < tol


@st.composite
def layers(draw):
    n = draw(st.sampled_from([2, 4]))
    factors = draw(st.integers(1, n.bit_length() - 1))
    pb = draw(st.sampled_from([16, 32]))
    co, ci = draw(st.sampled_from([(1, 1), (1, 2), (2, 1)]))
    fout, fin = n * pb * co, n * pb * ci
    rank = draw(st.sampled_from([0, 0, 1, 3, 17]))
    rank = min(rank, fin, fout)
    bias = draw(st.booleans())
    rows = draw(st.integers(1, 70))
    spec = PatternSpec(n, factors, pb, rank)
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return PixelflyLinear(fin, fout, spec, bias=bias), rows


@interpreter_only
@SETTINGS
@given(case=layers())
def test_fp32_matches_masked_dense(case, monkeypatch):
    layer, rows = case
    _check(layer, rows, torch.float32, 1e-5, monkeypatch)


@interpreter_only
@pytest.mark.parametrize(
    ("fin", "fout", "spec"),
    [(64, 128, PatternSpec(4, 2, 16, 4)), (128, 64, PatternSpec(4, 1, 16, 0))],
    ids=["gather-r4", "scatter-r0"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(fin, fout, spec, dtype, monkeypatch):
    """fp64 to rounding; fp16 / bf16 inputs (fp32 accumulation) within their precision."""
    tol = {torch.float64: 1e-12, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    torch.manual_seed(0)
    _check(PixelflyLinear(fin, fout, spec), 45, dtype, tol, monkeypatch)


@interpreter_only
def test_pattern_block_8_and_wide_cells(monkeypatch):
    """Cells narrower than the smallest tile (pattern block 8: masked 16-wide tiles), cells
    wider than a tile (several tiles per cell, reduced in several steps), n = 12."""
    torch.manual_seed(0)
    _check(PixelflyLinear(64, 128, PatternSpec(4, 2, 8, 4)), 33, torch.float32, 1e-5, monkeypatch)
    _check(PixelflyLinear(128, 640, PatternSpec(2, 1, 64, 2)), 20, torch.float32, 1e-5, monkeypatch)
    # a butterfly size that is no power of two (12 cells a side), scatter layout
    _check(PixelflyLinear(192, 96, PatternSpec(12, 2, 8, 5)), 9, torch.float32, 1e-5, monkeypatch)


@interpreter_only
@pytest.mark.parametrize(
    ("fin", "fout", "spec"),
    [
        (50, 64, PatternSpec(4, 1, 16, 2, padded_in=64)),
        (60, 24, PatternSpec(2, 1, 16, 4, padded_out=32, padded_in=64)),
    ],
    ids=["gather-pad-in", "scatter-pad-both"],
)
def test_padded_layers_match_the_torch_kernel(fin, fout, spec, monkeypatch):
    """A padded pattern (input padded with zeros, output sliced in the layer): the Triton
    kernel gives the torch kernel's output and gradients (tests/test_layers.py checks that one
    against the masked-dense reference)."""
    torch.manual_seed(0)
    layer = PixelflyLinear(fin, fout, spec)
    x = torch.randn(2, 13, fin)
    results = []
    for kernels in ("torch", "triton"):
        monkeypatch.setenv("PXCOMPILE_KERNELS", kernels)
        layer.zero_grad()
        xg = x.clone().requires_grad_(True)
        y = layer(xg)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        grads = [xg.grad] + [p.grad.clone() for p in layer.parameters()]
        results.append((y.detach(), grads))
    (y0, g0), (y1, g1) = results
    assert y1.shape == (2, 13, fout)
    assert _rel(y1, y0) < 1e-5
    for a, b in zip(g1, g0):
        assert _rel(a, b) < 1e-5


@interpreter_only
def test_only_some_gradients(monkeypatch):
    """Frozen weights (only dx), frozen input (only weight grads), no grad at all."""
    monkeypatch.setenv("PXCOMPILE_KERNELS", "triton")
    torch.manual_seed(0)
    layer = PixelflyLinear(64, 128, PatternSpec(4, 2, 16, 4))
    ref, *_ = _reference(layer)
    x = torch.randn(9, 64)
    with torch.no_grad():
        assert torch.allclose(layer(x), ref(x), rtol=1e-5, atol=1e-6)
    layer.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    xr = x.clone().requires_grad_(True)
    ref(xr).sum().backward()
    assert torch.allclose(xg.grad, xr.grad, rtol=1e-5, atol=1e-6)
    layer.requires_grad_(True)
    layer.lowrank_v.requires_grad_(False)
    layer(x).sum().backward()
    assert layer.blocks.grad is not None and layer.lowrank_u.grad is not None
    assert layer.lowrank_v.grad is None


@interpreter_only
def test_autocast_bf16(monkeypatch):
    """Under autocast the kernel runs in the autocast dtype (as F.linear); fp32 weights get
    fp32 gradients."""
    monkeypatch.setenv("PXCOMPILE_KERNELS", "triton")
    torch.manual_seed(0)
    layer = PixelflyLinear(64, 128, PatternSpec(4, 2, 16, 4))
    ref, w, b, u, v = _reference(layer)
    x = torch.randn(21, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert _rel(y, ref(x)) < 2e-2
    y.float().sum().backward()
    assert layer.blocks.grad.dtype == torch.float32


@interpreter_only
def test_torch_compile_sees_one_op_per_layer(monkeypatch):
    """Under torch.compile each layer call is the opaque op pxcompile::pixelfly_linear_triton
    (fullgraph, no graph break), with the same values and gradients as eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    monkeypatch.setenv("PXCOMPILE_KERNELS", "triton")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        PixelflyLinear(64, 128, PatternSpec(4, 2, 16, 4)),
        torch.nn.GELU(),
        PixelflyLinear(128, 64, PatternSpec(4, 1, 16, 0)),
    )
    x = torch.randn(12, 64, requires_grad=True)
    want = model(x)
    want.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    cnt = CompileCounterWithBackend("aot_eager")
    got = torch.compile(model, backend=cnt, fullgraph=True)(x)
    got.sum().backward()
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    assert torch.allclose(x.grad, gx, rtol=1e-6, atol=1e-6)
    ops = [n.target for n in cnt.graphs[0].graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.pxcompile.pixelfly_linear_triton.default) == 2
    torch._dynamo.reset()


needs_cuda = pytest.mark.skipif(
    IN_INTERPRETER or not torch.cuda.is_available(), reason="needs a CUDA GPU"
)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("fin", "fout", "spec", "rows"),
    [
        (256, 1024, PatternSpec(4, 2, 32, 8), 1000),
        (1024, 256, PatternSpec(8, 3, 32, 0), 777),
        (192, 96, PatternSpec(12, 2, 8, 5), 33),
        (768, 3072, PatternSpec(8, 1, 64, 16), 2048),
    ],
    ids=["gather", "scatter", "n12", "gpt2-fc"],
)
def test_cuda_matches_masked_dense(fin, fout, spec, rows, dtype, monkeypatch):
    """On a GPU (compiled kernels, auto dispatch picks them): the same checks, fp32 at full
    precision, fp16/bf16 within their rounding; the layer moved with .to("cuda")."""
    from pxcompile.kernels import select

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert select("linear", torch.zeros(1, device="cuda")) == "triton"
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    torch.manual_seed(0)
    _check(PixelflyLinear(fin, fout, spec), rows, dtype, tol, monkeypatch, device="cuda")


@interpreter_only
def test_opcheck():
    """The custom op's registration (schema, fake tensor, autograd, aot dispatch) is sound."""
    from pxcompile.kernels.triton import linear as TL

    torch.manual_seed(0)
    layer = PixelflyLinear(64, 128, PatternSpec(4, 2, 16, 4))
    x = torch.randn(10, 64, requires_grad=True)
    args = (x, layer.blocks, layer.lowrank_u, layer.lowrank_v, layer.bias, layer.cell_index, True)
    torch.library.opcheck(TL.linear_op, args)
