"""Small plain-PyTorch models for the trace tests (random weights, CPU, fast)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mixing = nn.Sequential(
            nn.Linear(tokens, token_hidden), nn.GELU(), nn.Linear(token_hidden, tokens)
        )
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mixing = nn.Sequential(
            nn.Linear(dim, channel_hidden), nn.GELU(), nn.Linear(channel_hidden, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mixing(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mixing(self.norm2(x))


class NeutralMixerBlock(nn.Module):
    """A Mixer block whose names say nothing: token mixing is found from the transpose."""

    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.a1 = nn.Linear(tokens, 2 * tokens)
        self.a2 = nn.Linear(2 * tokens, tokens)
        self.b1 = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x).transpose(1, 2)
        y = self.a2(F.gelu(self.a1(y))).transpose(1, 2)
        return x + self.b1(y)[..., : x.shape[-1]]


class MLPMixer(nn.Module):
    """Patch embedding as a Linear on flattened patches, 2 Mixer blocks, a head."""

    def __init__(
        self, image: int = 16, patch: int = 4, dim: int = 32, depth: int = 2, classes: int = 10
    ) -> None:
        super().__init__()
        self.patch = patch
        tokens = (image // patch) ** 2
        self.patch_embed = nn.Linear(3 * patch * patch, dim)
        self.blocks = nn.Sequential(*[MixerBlock(tokens, dim, 24, 64) for _ in range(depth)])
        self.neutral = NeutralMixerBlock(tokens, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        b, c, h, w = img.shape
        p = self.patch
        x = img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        x = x.reshape(b, (h // p) * (w // p), c * p * p)
        x = self.blocks(self.patch_embed(x))
        x = self.neutral(x)
        return self.head(self.norm(x).mean(1))


class ViTBlockMHA(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViTMHA(nn.Module):
    """A ViT with nn.MultiheadAttention blocks (fx keeps MHA as a leaf)."""

    def __init__(self, seq: int = 16, in_dim: int = 48, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Linear(in_dim, dim)
        self.pos = nn.Parameter(torch.zeros(1, seq, dim))
        self.blocks = nn.ModuleList([ViTBlockMHA(dim, heads) for _ in range(2)])
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(x[:, 0])


class SDPAAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, h, d // h).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


class CausalSDPA(nn.Module):
    """Causal self-attention: packed qkv Linear + F.scaled_dot_product_attention(is_causal)."""

    def __init__(self, dim: int = 64, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class ManualAttention(nn.Module):
    """Written-out attention: softmax(Q K^T / sqrt(d)) V with a packed qkv Linear."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        a = (q @ k.transpose(-2, -1)) * (d // h) ** -0.5
        a = a.softmax(dim=-1)
        o = (a @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(o)


class ViTSDPA(nn.Module):
    """Manual q/k/v Linears + F.scaled_dot_product_attention, and one written-out block."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.attn = SDPAAttention(dim, heads)
        self.attn2 = ManualAttention(dim, heads)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        x = x + self.attn2(x)
        return x + self.fc2(F.gelu(self.fc1(x)))


class FunctionalLinear(nn.Module):
    """Weights used functionally: F.linear on a Linear's weight, x @ W on a bare Parameter."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.w = nn.Parameter(torch.randn(3 * dim, dim) * 0.1)  # stored [in, out]
        self.out = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.qkv.weight, self.qkv.bias)
        z = torch.relu(y) @ self.w
        return self.out(z) + self.out(z * 2)  # `out` is called twice


class Reused(nn.Module):
    """One Linear called on two inputs of different lengths (rows are summed)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).sum() + self.fc(x[:, :3]).sum()


class EinsumModel(nn.Module):
    """A weight used through einsum (both tracers read two-operand einsums)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bnd,de->bne", self.fc(x), self.w)


class DataDependent(nn.Module):
    """A size computed from data: neither fx nor export can trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = int(x.abs().max().item() * 3) + 1
        return self.fc(x).repeat(1, n, 1)[:, :n]


class BNModel(nn.Module):
    """BatchNorm in train mode and a buffer reassigned in forward: tracing must leave both."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 4)
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps = self.steps + 1
        return self.fc(self.drop(self.bn(x)))


class TensordotModel(nn.Module):
    """A weight used through tensordot and one through `.T`.

    The fx analysis does not read tensordot, so its coverage check fails and the trace
    falls back to torch.export, which reads aten.tensordot.
    """

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))
        self.v = nn.Parameter(torch.randn(4, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensordot(x, self.w, dims=1) @ self.v.T


class CatWeights(nn.Module):
    """A weight built by an op (torch.cat) is not a parameter: no tracer sees it (limitation)."""

    def __init__(self) -> None:
        super().__init__()
        self.wq = nn.Parameter(torch.randn(8, 8))
        self.wk = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, torch.cat([self.wq, self.wk]))


class FunctionalForms(nn.Module):
    """A Linear used through its ``.weight`` and a bare parameter ``w`` used through one GEMM
    form (``form``); ``traceable=False`` branches on a shape, which fx can't trace (torch.export
    can: shapes are static there)."""

    FORMS = ("linear", "matmul_op", "matmul_t", "einsum_io", "einsum_oi", "addmm", "w_first")
    STORED_IN_OUT = ("matmul_op", "einsum_io", "addmm")  # w is [in, out] for these

    def __init__(self, form: str, traceable: bool = True, dim: int = 64) -> None:
        super().__init__()
        self.form, self.traceable, self.dim = form, traceable, dim
        self.lin = nn.Linear(dim, dim)
        shape = (dim, 2 * dim) if form in self.STORED_IN_OUT else (2 * dim, dim)
        self.w = nn.Parameter(torch.randn(shape) / dim**0.5)
        self.b = nn.Parameter(torch.randn(2 * dim) * 0.1)
        self.proj = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.traceable and x.shape[0] > 0:
            x = x * 1.0
        h = F.linear(x, self.lin.weight, self.lin.bias)
        f, w = self.form, self.w
        if f == "linear":
            y = F.linear(h, w, self.b)
        elif f == "matmul_op":
            y = h @ w
        elif f == "matmul_t":
            y = torch.matmul(h, w.t())
        elif f == "einsum_io":
            y = torch.einsum("bsi,io->bso", h, w)
        elif f == "einsum_oi":
            y = torch.einsum("...i,oi->...o", h, w)
        elif f == "addmm":
            y = torch.addmm(self.b, h.reshape(-1, self.dim), w).view(h.shape[0], h.shape[1], -1)
        else:  # "w_first"
            y = (w @ h.mT).mT
        return self.proj(torch.relu(y))


class NormedWeight(nn.Module):
    """``x @ w / ||w||``: a weight used in a GEMM and densely (its norm); ``v`` only has its
    ``dtype`` and ``shape`` read besides its GEMM, which is not a dense use."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim, dim) / dim**0.5)
        self.v = nn.Parameter(torch.randn(dim, dim) / dim**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x.to(self.v.dtype) @ self.v) * self.v.shape[0] ** -0.5
        return y + (x @ self.w) / self.w.norm()


class DenseUse(nn.Module):
    """A NormedWeight block; ``traceable=False`` branches on a shape (fx can't trace it)."""

    def __init__(self, dim: int = 64, traceable: bool = True) -> None:
        super().__init__()
        self.traceable = traceable
        self.block = NormedWeight(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.traceable and x.shape[0] > 0:
            x = x * 1.0
        return self.proj(self.block(x))


class DropPath(nn.Module):
    """Stochastic depth as timm writes it: not a torch.nn module (fx traces into it) and it
    branches on ``self.training``, so an fx graph bakes one mode's branch in."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], 1).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class StochasticDepthMLP(nn.Module):
    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(128, 256), nn.Linear(256, 128)
        self.drop_path = DropPath(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.fc2(torch.relu(self.fc1(x))))


class LiftedConstant(nn.Module):
    """A tensor made in forward from constants: fx lifts it out as ``_tensor_constant0``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(128, 256), nn.Linear(256, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        order = torch.arange(127, -1, -1)
        return self.fc2(torch.relu(self.fc1(x[:, order])))
