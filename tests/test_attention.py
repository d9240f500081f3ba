"""Pixelfly attention: layout, equivalence with masked dense attention (outputs and gradients),
exact equality when every block is kept, causality, masks, gradcheck."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pxcompile.kernels.cpu.attention as CA
from pxcompile.attention import (
    AttentionSpec,
    PixelflyAttention,
    attention_layout,
    masked_dense_attention,
    pixelfly_attention,
)
from pxcompile.patterns import flat_butterfly


def _qkv(B, H, L, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, d, generator=gen, dtype=dtype).requires_grad_() for _ in range(3)]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _check(q, k, v, lay, causal=False, tol=1e-4, **masks):
    out = pixelfly_attention(q, k, v, lay, causal=causal, **masks)
    ref = masked_dense_attention(q, k, v, lay.element_mask(causal), **masks)
    go = torch.randn_like(out)
    g1 = torch.autograd.grad(out, (q, k, v), go)
    g2 = torch.autograd.grad(ref, (q, k, v), go)
    assert _rel(out, ref) < tol
    for a, b in zip(g1, g2, strict=True):
        assert _rel(a, b) < tol


# -- layout ------------------------------------------------------------------------------------


def test_layout_rule():
    lay = attention_layout(1024, 64, 2, 1)
    n = 16
    m = lay.mask
    bf = flat_butterfly(n, 2)
    for i in range(n):
        for j in range(n):
            assert m[i, j] == (bf[i, j] or i < 1 or j < 1)
    assert lay.density() == m.sum() / n**2
    assert (lay.block_mask(True) == np.tril(m)).all()
    assert lay.key_blocks()[5] == [0, 4, 5, 7]
    assert lay.key_blocks(causal=True)[5] == [0, 4, 5]


def test_layout_errors_and_spec():
    with pytest.raises(ValueError):
        attention_layout(1000, 64, 2)
    with pytest.raises(ValueError):
        attention_layout(64 * 12, 64, 3)  # 12 blocks not a multiple of 8
    s = AttentionSpec(block=64, factors=4, globals=1)
    assert s.padded_seq(4000) == 4096 and s.padded_seq(1024) == 1024
    assert 0.09 < s.density(4096) < 0.11
    assert s.density(8192) < s.density(4096)
    with pytest.raises(ValueError):
        AttentionSpec(block=0)


def test_element_mask_matches_blocks():
    lay = attention_layout(256, 32, 2, 1)
    em = lay.element_mask(causal=True)
    assert not em.triu(1).any()
    assert em[40, 0] and em[40, 40] and not em[40, 41]


# -- equivalence with masked dense attention --------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("g", [0, 1, 2])
def test_equivalence_float32(causal, g):
    lay = attention_layout(512, 32, 3, g)
    q, k, v = _qkv(2, 3, 512, 16)
    _check(q, k, v, lay, causal)


@pytest.mark.parametrize("causal", [False, True])
def test_equivalence_float64(causal):
    lay = attention_layout(256, 16, 3, 1)
    q, k, v = _qkv(1, 2, 256, 8, torch.float64)
    _check(q, k, v, lay, causal, tol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_and_masks(causal):
    lay = attention_layout(256, 32, 2, 1)
    q, k, v = _qkv(2, 3, 256, 16)
    kp = torch.zeros(2, 256, dtype=torch.bool)
    kp[1, 200:] = True
    kp[0, :10] = True  # left padding: some global keys hidden
    _check(q, k, v, lay, causal, key_padding_mask=kp)
    gen = torch.Generator().manual_seed(1)
    bool_mask = torch.rand(2, 3, 256, 256, generator=gen) > 0.3  # per head
    bool_mask[..., 0] = True
    _check(q, k, v, lay, causal, attn_mask=bool_mask)
    add = torch.randn(2, 1, 256, 256, generator=gen)  # additive float mask
    _check(q, k, v, lay, causal, attn_mask=add)
    col = torch.ones(2, 1, 1, 256, dtype=torch.bool)
    col[0, ..., 100:130] = False
    _check(q, k, v, lay, causal, attn_mask=col)


def test_fully_masked_rows_give_zeros():
    lay = attention_layout(128, 32, 1, 1)
    q, k, v = _qkv(1, 1, 128, 8)
    am = torch.ones(1, 1, 128, 128, dtype=torch.bool)
    am[..., 70, :] = False
    out = pixelfly_attention(q, k, v, lay, attn_mask=am)
    assert torch.isfinite(out).all() and (out[..., 70, :] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_tiled_equals_untiled(monkeypatch):
    lay = attention_layout(512, 32, 3, 1)
    q, k, v = _qkv(2, 3, 512, 16, torch.float64)
    kp = torch.zeros(2, 512, dtype=torch.bool)
    kp[1, 300:] = True
    out1 = pixelfly_attention(q, k, v, lay, causal=True, key_padding_mask=kp)
    g1 = torch.autograd.grad(out1.square().sum(), (q, k, v))
    monkeypatch.setattr(CA, "TILE_ELEMS", 1)  # one head per tile
    out2 = pixelfly_attention(q, k, v, lay, causal=True, key_padding_mask=kp)
    g2 = torch.autograd.grad(out2.square().sum(), (q, k, v))
    assert torch.allclose(out1, out2, atol=1e-12)
    for a, b in zip(g1, g2, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


# -- exact equality with dense attention when every block is kept -----------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_full_layout_is_dense_sdpa_exactly(causal):
    q, k, v = _qkv(1, 2, 256, 16)
    for lay in (attention_layout(128, 64, 1, 0), attention_layout(256, 64, 1, 4)):
        assert lay.is_full()
        L = lay.seq
        qq, kk, vv = (t[:, :, :L] for t in (q, k, v))
        out = pixelfly_attention(qq, kk, vv, lay, causal=causal)
        ref = F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal)
        assert torch.equal(out, ref)
        g1 = torch.autograd.grad(out.sum(), (q, k, v))
        g2 = torch.autograd.grad(ref.sum(), (q, k, v))
        for a, b in zip(g1, g2, strict=True):
            assert torch.equal(a, b)


# -- causality --------------------------------------------------------------------------------


def test_causality_later_keys_never_seen():
    lay = attention_layout(512, 32, 3, 2)
    q, k, v = (t.detach() for t in _qkv(1, 2, 512, 16))
    out = pixelfly_attention(q, k, v, lay, causal=True)
    for pos in (0, 31, 64, 100, 255, 400):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, pos + 1 :] = torch.randn_like(k2[:, :, pos + 1 :]) * 10
        v2[:, :, pos + 1 :] = torch.randn_like(v2[:, :, pos + 1 :]) * 10
        out2 = pixelfly_attention(q, k2, v2, lay, causal=True)
        assert torch.equal(out[:, :, : pos + 1], out2[:, :, : pos + 1])
    # gradients: a query's output does not depend on later keys
    kk = k.clone().requires_grad_()
    o = pixelfly_attention(q, kk, v, lay, causal=True)
    (gk,) = torch.autograd.grad(o[:, :, 100].sum(), kk)
    assert (gk[:, :, 101:] == 0).all() and gk[:, :, :101].abs().sum() > 0


# -- gradcheck --------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(causal):
    lay = attention_layout(32, 4, 2, 1)
    q, k, v = _qkv(1, 2, 32, 3, torch.float64)
    kp = torch.zeros(1, 32, dtype=torch.bool)
    kp[0, 30:] = True
    assert torch.autograd.gradcheck(
        lambda a, b, c: pixelfly_attention(a, b, c, lay, causal=causal, key_padding_mask=kp),
        (q, k, v),
        fast_mode=True,
    )


def test_gradcheck_float64_full_tiny():
    lay = attention_layout(8, 2, 1, 1)
    q, k, v = _qkv(1, 1, 8, 2, torch.float64)
    assert not lay.is_full() and not lay.is_full(causal=True)
    for causal in (False, True):
        assert torch.autograd.gradcheck(
            lambda a, b, c, cz=causal: pixelfly_attention(a, b, c, lay, causal=cz), (q, k, v)
        )


def test_gradcheck_dropout():
    lay = attention_layout(16, 4, 1, 1)
    q, k, v = _qkv(1, 1, 16, 3, torch.float64)

    def fn(a, b, c):
        torch.manual_seed(3)
        return pixelfly_attention(a, b, c, lay, dropout_p=0.3)

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)
    torch.manual_seed(3)
    assert not torch.equal(fn(q, k, v), pixelfly_attention(q, k, v, lay))


# -- module -----------------------------------------------------------------------------------


def test_module_pads_odd_lengths_and_falls_back():
    mod = PixelflyAttention(AttentionSpec(block=16, factors=2, globals=1), min_seq=64)
    q, k, v = _qkv(2, 2, 100, 8)  # padded to 128 inside
    kp = torch.zeros(2, 100, dtype=torch.bool)
    kp[0, 90:] = True
    for causal in (False, True):
        out = mod(q, k, v, is_causal=causal, key_padding_mask=kp)
        lay = mod.layout(100)
        assert lay.seq == 128
        em = lay.element_mask(causal)[:100, :100]
        ref = masked_dense_attention(q, k, v, em, key_padding_mask=kp)
        assert out.shape == q.shape and _rel(out, ref) < 1e-4
    am = torch.ones(2, 1, 100, 100, dtype=torch.bool).tril()
    out = mod(q, k, v, attn_mask=am)
    ref = masked_dense_attention(q, k, v, mod.layout(100).element_mask()[:100, :100], attn_mask=am)
    assert _rel(out, ref) < 1e-4
    short = [t[:, :, :40] for t in (q, k, v)]  # under min_seq: dense SDPA
    assert torch.equal(
        mod(*short, is_causal=True), F.scaled_dot_product_attention(*short, is_causal=True)
    )
    cross = mod(q, k[:, :, :80], v[:, :, :80])  # cross attention: dense
    assert torch.equal(cross, F.scaled_dot_product_attention(q, k[:, :, :80], v[:, :, :80]))


# -- grouped causal rows, worker threads ------------------------------------------------------


@pytest.mark.parametrize(
    "seq,block,factors,g",
    [(512, 32, 3, 1), (2048, 64, 4, 1), (384, 24, 4, 0), (256, 8, 5, 3), (64, 4, 2, 2)],
)
@pytest.mark.parametrize("causal", [False, True])
def test_plan_groups_cover_the_layout_exactly(seq, block, factors, g, causal):
    lay = attention_layout(seq, block, factors, g)
    plan = CA._plan(lay, causal)
    keys = lay.key_blocks(causal)
    seen = set()
    for gr in plan.groups:
        for i, row in zip(gr.rows.tolist(), gr.idx.tolist(), strict=True):
            assert row[-1] == i  # the diagonal last (only it is ever masked, when causal)
            assert row[:g] == list(range(g))
            assert sorted(row) == keys[i]  # exactly the kept blocks: no masked slot
            seen.add(i)
    assert seen == set(range(g, lay.n))
    assert plan.slots == sum(len(keys[i]) for i in range(g, lay.n))
    if causal:  # fewer slots than the non-causal rows: causal work is not wasted
        assert plan.slots < CA._plan(lay, False).slots


@pytest.mark.parametrize(
    "L,block,factors,g,B,H,d,dv",
    [(48, 3, 2, 0, 1, 3, 5, 5), (320, 10, 5, 3, 1, 3, 4, 6), (192, 24, 3, 1, 3, 1, 7, 3)],
)
@pytest.mark.parametrize("causal", [False, True])
def test_equivalence_odd_shapes(L, block, factors, g, B, H, d, dv, causal):
    lay = attention_layout(L, block, factors, g)
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(B, H, L, d, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, L, dv, generator=gen, dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    _check(q, k, v, lay, causal, tol=1e-10)
    kp = torch.zeros(B, L, dtype=torch.bool)
    kp[-1, L // 2 :] = True
    _check(q, k, v, lay, causal, tol=1e-10, key_padding_mask=kp)
    per_head = torch.rand(B, H, L, L, generator=gen) > 0.2  # chunks may split a batch's heads
    _check(q, k, v, lay, causal, tol=1e-10, attn_mask=per_head)


def _grads(q, k, v, lay, **kw):
    out = pixelfly_attention(q, k, v, lay, **kw)
    return (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))


def test_worker_chunks_equal_one_chunk(monkeypatch):
    lay = attention_layout(256, 16, 3, 1)
    q, k, v = _qkv(1, 3, 256, 8, torch.float64)  # 3 heads: uneven chunks over the workers
    kp = torch.zeros(1, 256, dtype=torch.bool)
    kp[0, 200:] = True
    for causal in (False, True):
        monkeypatch.setattr(CA, "_chunks", lambda BH, dev: [(0, BH // 3), (BH // 3, BH)])
        r1 = _grads(q, k, v, lay, causal=causal, key_padding_mask=kp)
        monkeypatch.setattr(CA, "_chunks", lambda BH, dev: [(0, BH)])  # the calling thread
        r2 = _grads(q, k, v, lay, causal=causal, key_padding_mask=kp)
        for a, b in zip(r1, r2, strict=True):
            assert torch.allclose(a, b, atol=1e-12, rtol=0)


def test_worker_threads_leave_the_caller_alone(monkeypatch):
    monkeypatch.setattr(CA, "_chunks", lambda BH, dev: [(0, 1), (1, BH)])
    lay = attention_layout(128, 16, 2, 1)
    q, k, v = _qkv(1, 2, 128, 8)
    threads = torch.get_num_threads()
    ref = pixelfly_attention(q, k, v, lay, causal=True)
    assert torch.get_num_threads() == threads
    with torch.inference_mode():
        out = pixelfly_attention(*(t.detach() for t in (q, k, v)), lay, causal=True)
    assert torch.equal(out, ref.detach())
    with torch.no_grad():
        assert torch.equal(pixelfly_attention(q, k, v, lay, causal=True), ref.detach())
    # dropout masks come from per-chunk generators seeded from the caller's RNG
    torch.manual_seed(7)
    d1 = pixelfly_attention(q, k, v, lay, causal=True, dropout_p=0.5)
    torch.manual_seed(7)
    d2 = pixelfly_attention(q, k, v, lay, causal=True, dropout_p=0.5)
    assert torch.equal(d1, d2) and not torch.equal(d1, ref)


def test_gradcheck_dropout_in_chunks(monkeypatch):
    monkeypatch.setattr(CA, "_chunks", lambda BH, dev: [(0, 1), (1, BH)])
    lay = attention_layout(16, 4, 1, 1)
    q, k, v = _qkv(1, 2, 16, 3, torch.float64)

    def fn(a, b, c):
        torch.manual_seed(3)
        return pixelfly_attention(a, b, c, lay, causal=True, dropout_p=0.3)

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_release_workspace_frees_the_workers_buffers(monkeypatch):
    monkeypatch.setattr(CA, "_chunks", lambda BH, dev: [(0, 1), (1, BH)])
    lay = attention_layout(128, 16, 2, 1)
    q, k, v = (t.detach() for t in _qkv(1, 2, 128, 8))
    pixelfly_attention(q, k, v, lay, causal=True)
    assert sum(len(c) for c in list(CA._WS_ALL)) > 0
    CA.release_workspace()
    assert sum(len(c) for c in list(CA._WS_ALL)) == 0
    assert torch.allclose(
        pixelfly_attention(q, k, v, lay, causal=True),
        masked_dense_attention(q, k, v, lay.element_mask(True)),
        atol=1e-5,
    )
