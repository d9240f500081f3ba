"""The sparse-attention experiments (figures 07-09): the BigBird and Reformer baselines compute
what they claim, the offline LRA data follows its rules, and each script's ``--quick`` runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from experiments.baselines.attention import (
    BigBirdAttention,
    LSHAttention,
    bigbird_block_mask,
    lsh_attention,
)
from experiments.lra_data import LISTOPS_PAD, listops, listops_expression
from pxcompile.attention import masked_dense_attention


def test_bigbird_mask_window_global_random():
    m = bigbird_block_mask(16, window=3, globals=1, random=2, seed=0)
    assert m[0].all() and m[:, 0].all()  # global row and column
    for i in range(1, 16):
        band = set(range(max(0, i - 1), min(16, i + 2)))
        assert band <= set(np.flatnonzero(m[i]))
        assert m[i].sum() == len(band | {0}) + 2  # two random blocks beyond the rest
    assert not (bigbird_block_mask(16, seed=1) == m).all()  # the random blocks follow the seed


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_equals_masked_dense(causal):
    torch.manual_seed(0)
    bb = BigBirdAttention(block=8, window=3, globals=1, random=1, seed=3)
    L = 8 * 8 + 3  # padded inside to 72
    q, k, v = (torch.randn(2, 2, L, 4, requires_grad=True) for _ in range(3))
    out = bb(q, k, v, is_causal=causal)
    em = bb.layout(72, causal).element_mask(causal)[:L, :L]
    assert bb.layout(72, causal).density(causal) < 1
    if causal:
        kept = bb.layout(72, causal).block_mask(causal)
        assert not np.triu(kept, 1).any()
    ref = masked_dense_attention(q, k, v, em)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.autograd.grad(out.square().sum(), (q, k, v))
    gr = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_lsh_one_round_covering_the_sequence_is_shared_qk_attention(causal):
    """With 2 chunks (each attends itself and the other), one hash round sees every key:
    softmax(q k^T) v with k = q / |q|, a token never attending itself when others are
    visible (-1e5)."""
    torch.manual_seed(0)
    q, v = torch.randn(2, 3, 32, 8), torch.randn(2, 3, 32, 8)
    out = lsh_attention(q, v, bucket=16, n_hashes=1, causal=causal)
    s = q @ torch.nn.functional.normalize(q, dim=-1).transpose(-1, -2) / math.sqrt(8)
    if causal:
        s = s.masked_fill(torch.ones(32, 32, dtype=torch.bool).triu(1), -1e9)
    s = s.masked_fill(torch.eye(32, dtype=torch.bool), -1e5)
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v, atol=1e-5, rtol=1e-5)


def test_lsh_module_pads_and_differentiates():
    torch.manual_seed(0)
    att = LSHAttention(bucket=8, n_hashes=2)
    q, k, v = (torch.randn(1, 2, 50, 8, requires_grad=True) for _ in range(3))
    out = att(q, k, v, is_causal=True)
    assert out.shape == (1, 2, 50, 8) and torch.isfinite(out).all()
    out.sum().backward()
    assert q.grad.abs().sum() > 0 and v.grad.abs().sum() > 0
    assert k.grad is None  # shared QK: the keys are the queries
    # causal: the first query sees only itself, so its output is its own value
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0].detach(), atol=1e-5, rtol=1e-5)


def test_listops_follows_the_rules():
    x, y = listops(20, seed=0, min_len=20, max_len=100, pad_to=100)
    lengths = (x != LISTOPS_PAD).sum(1)
    assert ((lengths >= 20) & (lengths <= 100)).all()
    for row, label in zip(x.tolist(), y.tolist()):
        expr = listops_expression(row)
        assert _evaluate(expr.split()) == label


def _evaluate(tokens: list[str]) -> int:
    """An independent evaluator of ListOps text (a stack machine)."""
    stack: list = []
    for t in tokens:
        if t.startswith("["):
            stack.append([t])
        elif t == "]":
            op, *args = stack.pop()
            val = {
                "[MAX": max,
                "[MIN": min,
                "[MED": lambda a: (
                    sorted(a)[(len(a) - 1) // 2]
                    if len(a) % 2
                    else (sorted(a)[len(a) // 2 - 1] + sorted(a)[len(a) // 2]) // 2
                ),
                "[SM": lambda a: sum(a) % 10,
            }[op](args)
            if stack:
                stack[-1].append(val)
            else:
                return val
        else:
            stack[-1].append(int(t))
    raise AssertionError("unbalanced expression")


@pytest.mark.slow
@pytest.mark.parametrize("module", ["fig07_sparse_attention", "fig08_language_model", "fig09_lra"])
def test_quick_runs(module, tmp_path):
    import importlib

    mod = importlib.import_module(f"experiments.{module}")
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    md = tmp_path / f"{module}.md"
    assert md.exists() and "dense" in md.read_text()
    assert (tmp_path / f"{module}.png").exists()
