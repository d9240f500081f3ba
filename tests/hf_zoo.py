"""Tiny Hugging Face causal LMs built from config (random weights, nothing downloaded), with
their default config (``use_cache=True``), and what the tests do with them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

VOCAB = 128


def tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()  # bos/eos ids outside the tiny vocabulary
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=64)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def token_ids(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def sparsified(model: nn.Module, block: int = 16):
    """``model`` compiled at budget 0.3 with blocks small enough that layers are sparse."""
    import pxcompile
    from pxcompile.layers import PixelflyLinear

    gm = pxcompile.sparsify(model, 0.3, block=block, example_inputs={"input_ids": token_ids()})
    assert gm.pxcompile_plan.sparse_weight_layers
    assert any(isinstance(m, PixelflyLinear) for m in gm.modules())
    return gm


@torch.no_grad()
def greedy_loop(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by hand: the argmax of the last logits, appended, ``new_tokens`` times."""
    for _ in range(new_tokens):
        logits = model(input_ids=ids).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids
