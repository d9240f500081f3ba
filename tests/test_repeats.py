"""Tracing a model built on the meta device once per kind of layer (passes/trace/repeats.py):
the schema, bindings and attention sites equal a full trace of the same model with weights,
and every case a cut could get wrong traces the whole model instead."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pxcompile.passes.trace import trace
from pxcompile.passes.trace.repeats import cut_repeats, is_meta_model


def _both(build, inputs):
    """(trace of the model with weights, trace of it built on meta, progress lines)."""
    torch.manual_seed(0)
    real = build().eval()
    with torch.device("meta"):
        meta = build().eval()
    lines: list[str] = []
    r_real = trace(real, inputs(torch.device("cpu")))
    r_meta = trace(meta, inputs(torch.device("meta")), progress=lines.append)
    return r_real, r_meta, lines


def _same(a, b) -> None:
    assert a.schema == b.schema and a.schema.to_yaml() == b.schema.to_yaml()
    assert a.bindings == b.bindings
    assert list(a.attention) == list(b.attention)
    for k, site in a.attention.items():
        assert (site.via, site.unsupported) == (b.attention[k].via, b.attention[k].unsupported)
    assert a.method == b.method and a.notes == b.notes


class Block(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.use_mlp = True  # a plain setting a layer may branch on

    def forward(self, x):
        qkv = self.qkv(self.norm(x)).view(x.shape[0], x.shape[1], 3, 2, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(x.shape))
        return x + self.fc2(torch.relu(self.fc1(x))) if self.use_mlp else x


class Net(nn.Module):
    def __init__(self, n: int = 5, shared: nn.Module | None = None, tie: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.blocks = nn.ModuleList(Block() for _ in range(n))
        self.shared = shared
        self.head = nn.Linear(32, 10)
        if tie:
            self.blocks[3].fc1.weight = self.blocks[1].fc1.weight

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
            if self.shared is not None:
                x = self.shared(x)
        return self.head(x)


def tokens(device):
    return torch.zeros(2, 16, 8, device=device)


def test_meta_model_detection():
    assert not is_meta_model(Net())
    with torch.device("meta"):
        assert is_meta_model(Net())
    assert not is_meta_model(nn.ReLU())  # no tensors at all


def test_repeated_blocks_traced_once_equal_the_full_trace():
    real, meta, lines = _both(Net, tokens)
    _same(real, meta)
    assert real.method == "fx" and meta.graph_module is None
    assert not [ln for ln in lines if "differ" in ln]  # cut and expanded, no fallback
    assert meta.schema["blocks.4.fc2"].rows == 32 and meta.schema["blocks.4.scores"].heads == 2


def test_cut_is_put_back():
    with torch.device("meta"):
        net = Net()
    before = list(net.blocks._modules)
    with cut_repeats(net, (tokens("meta"),), {}) as cuts:
        assert [c.prefix for c in cuts] == ["blocks"] and len(net.blocks) == 2
    assert list(net.blocks._modules) == before and len(net.blocks) == 5


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: Net(shared=nn.Linear(32, 32)), id="module-shared-by-every-layer"),
        pytest.param(lambda: Net(tie=True), id="tied-weights"),
        pytest.param(lambda: _no_mlp(Net(), 3), id="a-layer-branches-on-a-setting"),
        pytest.param(
            lambda: nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)]), id="last-gemm-in-list"
        ),
        pytest.param(
            lambda: nn.Sequential(
                nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), Halve()) for _ in range(3)]),
                nn.Linear(8, 4),
            ),
            id="stream-shrinks",
        ),
    ],
)
def test_cases_a_cut_could_get_wrong_trace_the_whole_model(build):
    real, meta, _ = _both(build, tokens)
    _same(real, meta)
    assert real.method == meta.method == "fx"
    assert meta.graph_module is not None  # the whole model was traced


def _no_mlp(net: Net, i: int) -> Net:
    net.blocks[i].use_mlp = False
    return net


class Halve(nn.Module):
    def forward(self, x):
        return x[:, ::2]
