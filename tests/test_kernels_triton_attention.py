"""The Triton kernel of Pixelfly attention (pxcompile/kernels/triton/attention.py) in Triton's
interpreter, against the masked-dense reference: outputs and q/k/v gradients over
hypothesis-chosen shapes (pattern blocks 16/32, factors, globals 0/1, causal or not, odd
sequence lengths padded inside PixelflyAttention, head dims that are no power of two), fp64
to rounding, fp32/fp16/bf16 within their precision, the model's masks (rows that see no key
give zeros), dropout (p=0 exact, a fixed seed deterministic, the mask recovered and checked
against the reference, its keep rate), the custom op routed to the kernel, one-line errors.
The tests run in a child process (see tests/triton_interp.py); keep shapes small, the
interpreter is slow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from triton_interp import IN_INTERPRETER, interpreter_only, run_in_interpreter  # noqa: E402

import pxcompile.attention as A  # noqa: E402
from pxcompile.attention import (  # noqa: E402
    AttentionSpec,
    PixelflyAttention,
    attention_layout,
    masked_dense_attention,
    pixelfly_attention,
)
from pxcompile.errors import PxError  # noqa: E402
from pxcompile.kernels.triton import attention as TA  # noqa: E402

SETTINGS = settings(
    max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)


@pytest.mark.skipif(IN_INTERPRETER, reason="this is the interpreter's process")
def test_in_triton_interpreter():
    run_in_interpreter(__file__)


@pytest.fixture
def triton_only(monkeypatch):
    """PXCOMPILE_KERNELS=triton, and the CPU kernel made to fail: only Triton may run."""
    monkeypatch.setenv("PXCOMPILE_KERNELS", "triton")

    def no_cpu(*args, **kwargs):
        raise AssertionError("the CPU kernel ran")

    monkeypatch.setattr(A, "sparse_attention", no_cpu)


def _qkv(B, H, L, d, dv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, L, d, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, L, dv, generator=gen, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _run(fn, q, k, v, go):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), go.to(out.dtype)))


def _compare(fn, ref, q, k, v, tol, seed=1):
    """``fn`` on q, k, v (any dtype) vs ``ref`` on their fp64 copies: output and gradients."""
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    gen = torch.Generator().manual_seed(seed)
    go = torch.randn(*q.shape[:3], v.shape[-1], generator=gen, dtype=torch.float64)
    want = _run(ref, qr, kr, vr, go)
    got = _run(fn, q, k, v, go)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert a.dtype == q.dtype and a.shape == b.shape, name
        assert _rel(a, b) < tol, (name, _rel(a, b))


# -- index tables (no kernel run) ------------------------------------------------------------


@pytest.mark.parametrize(
    "seq,block,factors,g", [(512, 64, 2, 1), (256, 16, 3, 0), (1024, 128, 2, 2), (128, 32, 2, 1)]
)
@pytest.mark.parametrize("causal", [False, True])
def test_tile_tables_are_the_layout(seq, block, factors, g, causal):
    lay = attention_layout(seq, block, factors, g)
    row_ptr, keys, col_ptr, queries = (t.numpy() for t in TA.tile_tables(lay, causal))
    T = min(block, 64)
    nt = seq // T
    m = np.zeros((nt, nt), dtype=bool)
    for i in range(nt):
        m[i, keys[row_ptr[i] : row_ptr[i + 1]]] = True
        assert (np.diff(keys[row_ptr[i] : row_ptr[i + 1]]) > 0).all()
    mt = np.zeros((nt, nt), dtype=bool)
    for j in range(nt):
        mt[queries[col_ptr[j] : col_ptr[j + 1]], j] = True
    assert (m == mt).all()  # the dK/dV table is the same mask transposed
    # a tile is listed iff some element in it is attended
    em = lay.element_mask(causal).numpy().reshape(nt, T, nt, T).any(axis=(1, 3))
    assert (m == em).all()


def test_unsupported_shapes_say_why():
    assert TA.unsupported(attention_layout(256, 16, 2, 1), 64, 64) is None
    assert "pattern block 24" in TA.unsupported(attention_layout(384, 24, 2, 1), 64, 64)
    assert "pattern block 8" in TA.unsupported(attention_layout(128, 8, 2, 1), 64, 64)
    assert "head dim 160" in TA.unsupported(attention_layout(256, 16, 2, 1), 64, 160)


@pytest.mark.skipif(IN_INTERPRETER, reason="needs a process without the interpreter")
def test_triton_on_cpu_without_the_interpreter_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("PXCOMPILE_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = (t.detach() for t in _qkv(1, 1, 128, 16, 16, torch.float32))
    with pytest.raises(PxError, match="TRITON_INTERPRET") as err:
        PixelflyAttention(AttentionSpec(16, 2, 1))(q, k, v)
    assert "\n" not in str(err.value)


# -- the kernel in the interpreter -------------------------------------------------------------


@st.composite
def cases(draw):
    block = draw(st.sampled_from([16, 32]))
    factors = draw(st.integers(1, 2))
    g = draw(st.integers(0, 1))
    causal = draw(st.booleans())
    quantum = block << factors
    L = draw(st.integers(quantum + 1, 2 * quantum))  # padded up to a multiple of quantum
    L = max(L, 8 * block - draw(st.integers(0, block)))  # >= 8 blocks: the layout is sparse
    B, H = draw(st.sampled_from([(1, 1), (1, 2), (2, 1)]))
    d = draw(st.sampled_from([8, 16, 24]))
    dv = draw(st.sampled_from([d, 16]))
    return AttentionSpec(block, factors, g), causal, L, B, H, d, dv, draw(st.integers(0, 99))


@interpreter_only
@SETTINGS
@given(case=cases())
def test_matches_masked_dense(case, triton_only):
    """PixelflyAttention (padding odd lengths) through the Triton kernel vs masked dense
    attention with the layout's element mask, in fp64: outputs and q/k/v gradients."""
    spec, causal, L, B, H, d, dv, seed = case
    att = PixelflyAttention(spec)
    lay = att.layout(L)
    assume(not lay.is_full(causal))
    em = lay.element_mask(causal)[:L, :L]
    q, k, v = _qkv(B, H, L, d, dv, torch.float64, seed)
    _compare(
        lambda a, b, c: att(a, b, c, is_causal=causal),
        lambda a, b, c: masked_dense_attention(a, b, c, em),
        q, k, v, 1e-10,
    )  # fmt: skip


@interpreter_only
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3), (torch.bfloat16, 2e-2)]
)
def test_dtypes(dtype, tol, triton_only):
    """fp32 / fp16 / bf16 inputs (fp32 accumulation) within their precision."""
    lay = attention_layout(128, 16, 2, 1)
    em = lay.element_mask(True)
    q, k, v = _qkv(1, 2, 128, 32, 32, dtype, seed=3)
    _compare(
        lambda a, b, c: pixelfly_attention(a, b, c, lay, causal=True),
        lambda a, b, c: masked_dense_attention(a, b, c, em),
        q, k, v, tol,
    )  # fmt: skip


@interpreter_only
def test_pattern_block_wider_than_a_tile(triton_only):
    """A 128-token pattern block is two 64-token tiles (the causal triangle cuts the diagonal
    block's upper tile pair at tile level, the element mask inside the diagonal tiles)."""
    lay = attention_layout(512, 128, 1, 1)
    assert not lay.is_full(True)
    em = lay.element_mask(True)
    q, k, v = _qkv(1, 1, 512, 16, 16, torch.float64, seed=8)
    _compare(
        lambda a, b, c: pixelfly_attention(a, b, c, lay, causal=True),
        lambda a, b, c: masked_dense_attention(a, b, c, em),
        q, k, v, 1e-10,
    )  # fmt: skip


@interpreter_only
def test_model_masks(triton_only):
    """A per-head boolean mask; an additive float mask with a key padding mask, causal; rows
    that see no key at all give zeros and zero gradients, as on the CPU path."""
    L = 128
    lay = attention_layout(L, 16, 2, 1)
    gen = torch.Generator().manual_seed(4)
    per_head = torch.rand(1, 2, L, L, generator=gen) > 0.3
    per_head[0, 1, 40:50] = False  # rows that see nothing
    q, k, v = _qkv(1, 2, L, 16, 16, torch.float64, seed=5)
    em = lay.element_mask(False)
    _compare(
        lambda a, b, c: pixelfly_attention(a, b, c, lay, attn_mask=per_head),
        lambda a, b, c: masked_dense_attention(a, b, c, em, attn_mask=per_head),
        q, k, v, 1e-10,
    )  # fmt: skip
    additive = torch.randn(1, 1, 1, L, generator=gen, dtype=torch.float64)
    kp = torch.zeros(2, L, dtype=torch.bool)
    kp[0, :20] = True  # causal: the first 20 rows of batch 0 see nothing
    kw = {"attn_mask": additive, "key_padding_mask": kp}
    q, k, v = _qkv(2, 1, L, 16, 16, torch.float64, seed=6)
    em = lay.element_mask(True)
    _compare(
        lambda a, b, c: pixelfly_attention(a, b, c, lay, causal=True, **kw),
        lambda a, b, c: masked_dense_attention(a, b, c, em, **kw),
        q, k, v, 1e-10,
    )  # fmt: skip
    out = pixelfly_attention(q, k, v, lay, causal=True, **kw)
    assert torch.equal(out[0, :, :20], torch.zeros_like(out[0, :, :20]))
    out[0, :, :20].sum().backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t.grad))


@interpreter_only
def test_dropout(triton_only):
    """p = 0 is no dropout (bit for bit); a fixed seed gives the same mask twice; the mask, read
    back through v = identity, keeps about 1 - p of the kept entries, and with it the masked
    dense reference gives the same outputs and q/k/v gradients."""
    B, H, L, p = 1, 2, 64, 0.3
    lay = attention_layout(L, 16, 1, 1)
    em = lay.element_mask(False)
    q, k, v = _qkv(B, H, L, 16, 16, torch.float64, seed=6)
    plain = pixelfly_attention(q, k, v, lay)
    assert torch.equal(pixelfly_attention(q, k, v, lay, dropout_p=0.0), plain)
    torch.manual_seed(11)
    d1 = pixelfly_attention(q, k, v, lay, dropout_p=p)
    torch.manual_seed(11)
    d2 = pixelfly_attention(q, k, v, lay, dropout_p=p)
    assert torch.equal(d1, d2) and not torch.allclose(d1, plain)
    eye = torch.eye(L, dtype=torch.float64).expand(B, H, L, L)
    torch.manual_seed(11)
    pd = pixelfly_attention(q.detach(), k.detach(), eye, lay, dropout_p=p)  # = P * keep / (1-p)
    keep = pd > 0
    assert not keep[:, :, ~em].any()
    rate = keep.sum().item() / (em.sum().item() * B * H)
    assert abs(rate - (1 - p)) < 0.05, rate

    def ref(a, b, c):
        probs = masked_dense_attention(a, b, eye, em)
        return (probs * keep / (1 - p)) @ c

    def fn(a, b, c):
        torch.manual_seed(11)
        return pixelfly_attention(a, b, c, lay, dropout_p=p)

    _compare(fn, ref, q, k, v, 1e-10)


@interpreter_only
def test_custom_op_runs_the_kernel(triton_only):
    """``pxcompile::pixelfly_attention`` (what torch.compile and saved models call) runs the
    Triton kernel, forward and backward."""
    from pxcompile.ops import PixelflyAttentionOp

    att = PixelflyAttention(AttentionSpec(16, 2, 1))
    em = att.layout(128).element_mask(True)
    q, k, v = _qkv(1, 2, 128, 16, 16, torch.float64, seed=7)
    _compare(
        lambda a, b, c: PixelflyAttentionOp(att)(a, b, c, is_causal=True),
        lambda a, b, c: masked_dense_attention(a, b, c, em),
        q, k, v, 1e-10,
    )  # fmt: skip


@interpreter_only
def test_unsupported_under_triton_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("PXCOMPILE_KERNELS", "triton")
    q, k, v = (t.detach() for t in _qkv(1, 1, 128, 16, 16, torch.float64))
    with pytest.raises(PxError, match="pattern block 8 is not a power of two") as err:
        pixelfly_attention(q, k, v, attention_layout(128, 8, 2, 1))
    assert "\n" not in str(err.value)
    monkeypatch.setenv("PXCOMPILE_KERNELS", "auto")  # auto on CPU: the CPU kernel
    lay = attention_layout(128, 8, 2, 1)
    assert torch.allclose(
        pixelfly_attention(q, k, v, lay),
        masked_dense_attention(q, k, v, lay.element_mask(False)),
        atol=1e-12,
    )
