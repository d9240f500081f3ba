"""A small GPT-style language model (Radford et al. 2019) in plain PyTorch, GPT-2 naming.

Vocabulary 512, context 128, width 256, 4 heads, MLP 1024, 4 layers; the output head is tied
to the token embedding (so it stays dense).
"""

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden)
        self.c_proj = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab=512, context=128, dim=256, layers=4, heads=4, hidden=1024):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        self.h = nn.Sequential(*[Block(dim, heads, hidden) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.h(self.wte(idx) + self.wpe(pos))
        return self.lm_head(self.ln_f(x))


torch.manual_seed(0)
model = GPT()


def example_inputs():
    return (torch.randint(0, 512, (4, 128)),)


# The same GPT at 2048 tokens, where attention is sparsified too (policy attention_min_seq):
#   pxcompile examples/gpt.py --model long_model --inputs long_inputs --budget 0.3
def long_model():
    torch.manual_seed(0)
    return GPT(context=2048, layers=2)


def long_inputs():
    return (torch.randint(0, 512, (1, 2048)),)
