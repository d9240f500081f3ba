"""Acceptance for the Triton kernels (issue #13): with ``PXCOMPILE_KERNELS=triton`` and
``TRITON_INTERPRET=1`` a sparsified model runs on CPU through the Triton kernels with the same
outputs and gradients as the PyTorch kernels (1e-4), and so does its saved-and-loaded copy: sparse
layers alone, and sparse layers with Pixelfly attention.
Runs in a child process (tests/triton_interp.py)."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from triton_interp import IN_INTERPRETER, interpreter_only, run_in_interpreter  # noqa: E402

import pxcompile  # noqa: E402
from pxcompile.attention import PixelflyAttention  # noqa: E402
from pxcompile.attention_layout import spec_layout  # noqa: E402
from pxcompile.layers import PixelflyLinear  # noqa: E402
from pxcompile.patterns import AttentionSpec, PatternSpec  # noqa: E402
from pxcompile.plans import Plan  # noqa: E402
from pxcompile.schema import LayerType  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(IN_INTERPRETER, reason="this is the interpreter's process")
def test_in_triton_interpreter():
    run_in_interpreter(__file__)


def _example(name: str):
    spec = importlib.util.spec_from_file_location(
        f"px_example_{name}", ROOT / "examples" / f"{name}.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _plan(model, idx) -> Plan:
    """Every projection and MLP GEMM sparse with a fixed pattern (the kernels are under test,
    not the planner's choices): low rank on the MLPs, none on attention's projections."""
    plan = pxcompile.plan(model, 0.3, example_inputs=(idx,), block=16)
    patterns = {
        LayerType.MLP: PatternSpec(4, 2, 16, 4),
        LayerType.ATTN_PROJ: PatternSpec(4, 1, 16, 0),
    }
    layers = [
        replace(lp, pattern=patterns[lp.gemm.type], reason="test pattern")
        if lp.gemm.type in patterns
        else lp
        for lp in plan.layers
    ]
    return replace(plan, layers=layers)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


def _run(gm, idx, kernels: str, monkeypatch):
    monkeypatch.setenv("PXCOMPILE_KERNELS", kernels)
    gm.zero_grad()
    out = gm(idx)
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
    (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
    return out.detach(), grads


@interpreter_only
def test_sparsified_gpt_matches_the_torch_kernels(monkeypatch, tmp_path):
    from pxcompile.kernels.triton import linear as triton_linear

    calls = []
    real = triton_linear.pixelfly_linear

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_linear, "pixelfly_linear", counting)
    gpt = _example("gpt")
    torch.manual_seed(0)
    model = gpt.GPT(vocab=64, context=32, dim=64, layers=2, heads=2, hidden=128)
    idx = torch.randint(0, 64, (2, 32))
    monkeypatch.setenv("PXCOMPILE_KERNELS", "torch")
    gm = pxcompile.apply(model, _plan(model, idx), (idx,))
    sparse = [m for m in gm.modules() if isinstance(m, PixelflyLinear)]
    assert len(sparse) == 8
    want, want_g = _run(gm, idx, "torch", monkeypatch)
    assert not calls
    got, got_g = _run(gm, idx, "triton", monkeypatch)
    assert len(calls) == len(sparse)  # every sparse layer ran the Triton kernel
    assert _rel(got, want) < 1e-4
    assert got_g.keys() == want_g.keys()
    for name in want_g:
        assert _rel(got_g[name], want_g[name]) < 1e-4, name

    path = tmp_path / "gpt.px"
    pxcompile.save(gm, path)
    again = pxcompile.load(path)
    calls.clear()
    monkeypatch.setenv("PXCOMPILE_KERNELS", "triton")
    with torch.no_grad():
        loaded = again(idx)
    assert len(calls) == len(sparse)
    assert _rel(loaded, want) < 1e-4


@interpreter_only
def test_sparsified_gpt_with_pixelfly_attention_matches_the_torch_kernels(monkeypatch, tmp_path):
    """Sparse layers and Pixelfly attention (a causal GPT at 64 tokens, 16-token blocks: a
    sparse layout) through the Triton kernels: outputs and gradients as with the PyTorch
    kernels; the saved-and-loaded copy too."""
    from pxcompile.kernels.triton import attention as triton_attention

    calls = []
    real = triton_attention.sparse_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_attention, "sparse_attention", counting)
    gpt = _example("gpt")
    torch.manual_seed(0)
    model = gpt.GPT(vocab=64, context=64, dim=64, layers=2, heads=2, hidden=128)
    idx = torch.randint(0, 64, (1, 64))
    monkeypatch.setenv("PXCOMPILE_KERNELS", "torch")
    plan = pxcompile.plan(
        model, 0.3, example_inputs=(idx,), block=16, policy={"attention_min_seq": 64}
    )
    att = AttentionSpec(16, 1, 1)
    patterns = {
        LayerType.MLP: PatternSpec(4, 2, 16, 4),
        LayerType.ATTN_PROJ: PatternSpec(4, 1, 16, 0),
        LayerType.ATTN_SCORES: att,
        LayerType.ATTN_VALUES: att,
    }
    layers = [
        replace(lp, pattern=patterns[lp.gemm.type], reason="test pattern")
        if lp.gemm.type in patterns
        else lp
        for lp in plan.layers
    ]
    gm = pxcompile.apply(model, replace(plan, layers=layers), (idx,))
    assert [type(m) for m in gm.modules()].count(PixelflyAttention) == 1
    assert not spec_layout(att, 64).is_full(causal=True)
    want, want_g = _run(gm, idx, "torch", monkeypatch)
    assert not calls
    got, got_g = _run(gm, idx, "triton", monkeypatch)
    assert len(calls) == 2  # both blocks' attention ran the Triton kernel
    assert _rel(got, want) < 1e-4
    assert got_g.keys() == want_g.keys()
    for name in want_g:
        assert _rel(got_g[name], want_g[name]) < 1e-4, name

    path = tmp_path / "gpt_attention.px"
    pxcompile.save(gm, path)
    again = pxcompile.load(path)
    calls.clear()
    monkeypatch.setenv("PXCOMPILE_KERNELS", "triton")
    with torch.no_grad():
        loaded = again(idx)
    assert len(calls) == 2
    assert _rel(loaded, want) < 1e-4


@pytest.mark.skipif(IN_INTERPRETER or not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sparsified_gpt_moved_to_cuda(monkeypatch):
    """sparsify on the CPU, then .to("cuda"): the Triton kernels (auto) give the CPU model's
    outputs and gradients."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.delenv("PXCOMPILE_KERNELS", raising=False)
    gpt = _example("gpt")
    torch.manual_seed(0)
    model = gpt.GPT(vocab=64, context=32, dim=64, layers=2, heads=2, hidden=128)
    idx = torch.randint(0, 64, (2, 32))
    gm = pxcompile.apply(model, _plan(model, idx), (idx,))
    want, want_g = _run(gm, idx, "auto", monkeypatch)
    gm.to("cuda")
    got, got_g = _run(gm, idx.cuda(), "auto", monkeypatch)
    assert _rel(got.cpu(), want) < 1e-4
    for name in want_g:
        assert _rel(got_g[name].cpu(), want_g[name]) < 1e-4, name
