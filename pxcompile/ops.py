"""``torch.ops.pxcompile.pixelfly_linear``: :class:`~pxcompile.layers.PixelflyLinear` as a
custom operator, so that ``torch.export`` can record a sparse layer as one graph node whose
inputs are its tensors and whose pattern is a handful of ints (no Python object, no code).

    y = torch.ops.pxcompile.pixelfly_linear(
        x, blocks, lowrank_u, lowrank_v, bias,
        in_features, out_features, butterfly, factors, pattern_block, rank
        [, padded_out, padded_in])

is exactly ``PixelflyLinear(in_features, out_features, PatternSpec(butterfly, factors,
pattern_block, rank, padded_out, padded_in), bias=bias is not None)`` run on ``x`` with those
parameters (the padded sides are passed only for a padded pattern, so graphs of unpadded
layers are what they were before padding existed, and files saved then still load): the
implementation builds such a layer once per (shape, pattern, dtype, device, thread), keeps it
as a *shell*, and calls it through :func:`torch.func.functional_call` with the given tensors,
so the op runs the very same code (and gives bitwise the same results) as the module.

Autograd: the backward is a second op, ``torch.ops.pxcompile.pixelfly_linear_backward``, that
recomputes the layer's forward with autograd on and differentiates it (``torch.autograd.grad``);
being an op, it is one opaque node to anything that traces a backward (``torch.compile``).
Training through the op therefore costs one extra forward of each sparse layer per step (about
a third more time in those layers than the module itself, which keeps what its backward
needs); higher-order gradients are not supported. Memory: each shell holds one (unused) set of
weights of its shape, so one layer's worth per distinct layer shape, dtype and device.

Importing this module registers the op (``pxcompile.serialize`` imports it; so must anything
that runs a graph that calls it).
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor, nn

from .layers import PixelflyLinear
from .nn.weight import WeightViews
from .patterns import PatternSpec

__all__ = [
    "PixelflyAttentionOp",
    "PixelflyOp",
    "pixelfly_attention",
    "pixelfly_attention_backward",
    "pixelfly_linear",
    "pixelfly_linear_backward",
    "spec_args",
]

OP_NAME = "pxcompile::pixelfly_linear"

_local = threading.local()


def _shell(
    in_features: int,
    out_features: int,
    spec: PatternSpec,
    bias: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> PixelflyLinear:
    """A cached layer of this shape, whose parameters are swapped in at each call."""
    cache = getattr(_local, "shells", None)
    if cache is None:
        cache = _local.shells = {}
    key = (in_features, out_features, spec, bias, dtype, device)
    layer = cache.get(key)
    if layer is None:
        # building a layer draws its (unused) initial weights: leave the caller's RNG alone
        devs = [device] if device.type != "cpu" else []
        with torch.random.fork_rng(devices=devs, device_type=device.type):
            layer = PixelflyLinear(
                in_features, out_features, spec, bias=bias, device=device, dtype=dtype
            )
        layer.requires_grad_(False)
        cache[key] = layer
    return layer


def _run(
    x, blocks, lowrank_u, lowrank_v, bias, in_f, out_f, n, f, pb, rank, pad_out=0, pad_in=0
) -> Tensor:
    spec = PatternSpec(n, f, pb, rank, pad_out, pad_in)
    shell = _shell(in_f, out_f, spec, bias is not None, blocks.dtype, blocks.device)
    params = {"blocks": blocks}
    if lowrank_u is not None:
        params["lowrank_u"] = lowrank_u
        params["lowrank_v"] = lowrank_v
    if bias is not None:
        params["bias"] = bias
    return torch.func.functional_call(shell, params, (x,))


def _fresh(outs: list[Tensor], inputs) -> list[Tensor]:
    """An op's outputs may not share memory with its inputs or with each other: copy those
    that do (a layer's backward may hand back, say, its incoming gradient as is)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    fresh = []
    for t in outs:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        fresh.append(t)
    return fresh


@torch.library.custom_op(OP_NAME, mutates_args=())
def pixelfly_linear(
    x: Tensor,
    blocks: Tensor,
    lowrank_u: Tensor | None,
    lowrank_v: Tensor | None,
    bias: Tensor | None,
    in_features: int,
    out_features: int,
    butterfly: int,
    factors: int,
    pattern_block: int,
    rank: int,
    padded_out: int = 0,
    padded_in: int = 0,
) -> Tensor:
    """``PixelflyLinear`` with the given parameters, as one operator (see the module doc)."""
    with torch.no_grad():
        y = _run(
            x,
            blocks,
            lowrank_u,
            lowrank_v,
            bias,
            in_features,
            out_features,
            butterfly,
            factors,
            pattern_block,
            rank,
            padded_out,
            padded_in,
        )
    return _fresh([y], (x, blocks, lowrank_u, lowrank_v, bias))[0]


@pixelfly_linear.register_fake
def _(x, blocks, lowrank_u, lowrank_v, bias, in_features, out_features, *rest):
    torch._check(x.shape[-1] == in_features, lambda: f"expected last dim {in_features}")
    return x.new_empty(*x.shape[:-1], out_features)


def _autograd_on():
    """Re-enable autograd dispatch inside an op's kernel (the dispatcher turns it off below
    the autograd key) so that the backward kernel can differentiate the recomputed forward."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradFunctionality)
    return torch._C._ForceDispatchKeyGuard(
        torch._C._dispatch_tls_local_include_set(),
        torch._C._dispatch_tls_local_exclude_set() - keys,
    )


def _setup_context(ctx, inputs, output) -> None:
    x, blocks, u, v, bias, *cfg = inputs
    ctx.save_for_backward(x, blocks, u, v, bias)
    ctx.cfg = tuple(cfg)


@torch.library.custom_op(OP_NAME + "_backward", mutates_args=())
def pixelfly_linear_backward(
    grad: Tensor,
    x: Tensor,
    blocks: Tensor,
    lowrank_u: Tensor | None,
    lowrank_v: Tensor | None,
    bias: Tensor | None,
    in_features: int,
    out_features: int,
    butterfly: int,
    factors: int,
    pattern_block: int,
    rank: int,
    padded_out: int,
    padded_in: int,
    wanted: int,
) -> list[Tensor]:
    """Gradients of ``pixelfly_linear`` with respect to its inputs (``x, blocks, u, v, bias``)
    whose bit is set in ``wanted``, in that order: the forward recomputed with autograd on.
    An op of its own so that tracing a backward (aot autograd) sees one opaque node."""
    cfg = (
        in_features,
        out_features,
        butterfly,
        factors,
        pattern_block,
        rank,
        padded_out,
        padded_in,
    )
    tensors = (x, blocks, lowrank_u, lowrank_v, bias)
    with _autograd_on(), torch.enable_grad():
        leaves = [
            None if t is None else t.detach().requires_grad_(bool(wanted >> i & 1))
            for i, t in enumerate(tensors)
        ]
        y = _run(*leaves, *cfg)
        want = [t for i, t in enumerate(leaves) if wanted >> i & 1]
        if not want:
            return []
        grads = torch.autograd.grad(y, want, grad, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, want)]
    return _fresh(grads, (grad, *tensors))


@pixelfly_linear_backward.register_fake
def _(grad, x, blocks, lowrank_u, lowrank_v, bias, *cfg_and_wanted):
    wanted = cfg_and_wanted[-1]
    tensors = (x, blocks, lowrank_u, lowrank_v, bias)
    return [torch.empty_like(t) for i, t in enumerate(tensors) if wanted >> i & 1]


def _backward(ctx, grad):
    tensors = ctx.saved_tensors
    wanted = 0
    for i, (t, need) in enumerate(zip(tensors, ctx.needs_input_grad[:5])):
        if t is not None and need:
            wanted |= 1 << i
    got = iter(
        torch.ops.pxcompile.pixelfly_linear_backward(grad, *tensors, *ctx.cfg, wanted)
        if wanted
        else ()
    )
    grads = [next(got) if wanted >> i & 1 else None for i in range(5)]
    return (*grads, *([None] * len(ctx.cfg)))


pixelfly_linear.register_autograd(_backward, setup_context=_setup_context)


def spec_args(layer: PixelflyLinear) -> tuple[int, ...]:
    """The op's int arguments for ``layer`` (the padded sides only for a padded pattern)."""
    s = layer.spec
    args = (
        int(layer.in_features),
        int(layer.out_features),
        int(s.butterfly),
        int(s.factors),
        int(s.pattern_block),
        int(s.rank),
    )
    return (*args, int(s.padded_out), int(s.padded_in)) if s.padded else args


class PixelflyOp(WeightViews, nn.Module):
    """Calls the op with a PixelflyLinear's own parameters (shared, not copied): the stand-in
    for the layer when a model is exported. Its ``weight`` works as the layer's does
    (:class:`~pxcompile.nn.weight.PixelflyWeight`), its GEMMs calling the op."""

    def __init__(self, layer: PixelflyLinear) -> None:
        super().__init__()
        self.blocks = layer.blocks
        self.lowrank_u = layer.lowrank_u
        self.lowrank_v = layer.lowrank_v
        self.bias = layer.bias
        self.cfg = spec_args(layer)
        self.weight_transposed = layer.weight_transposed

    @property
    def in_features(self) -> int:
        return self.cfg[0]

    @property
    def out_features(self) -> int:
        return self.cfg[1]

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x, self.bias)

    def linear(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """The op on ``x`` with ``bias`` instead of the layer's own."""
        return torch.ops.pxcompile.pixelfly_linear(
            x, self.blocks, self.lowrank_u, self.lowrank_v, bias, *self.cfg
        )

    def dense_weight(self) -> Tensor:
        """``B + U V^T`` as a dense ``[out, in]`` tensor, differentiable: the op applied to
        the identity (for a weight's rare dense uses only)."""
        eye = torch.eye(self.in_features, dtype=self.blocks.dtype, device=self.blocks.device)
        return self.linear(eye, None).t()

    def extra_repr(self) -> str:
        pad = ", padded_out={}, padded_in={}".format(*self.cfg[6:]) if len(self.cfg) > 6 else ""
        return (
            "in={}, out={}, butterfly={}, factors={}, pattern_block={}, rank={}".format(
                *self.cfg[:6]
            )
            + pad
        )


# --------------------------------------------------------------------------------------------
# Pixelfly attention as an operator
# --------------------------------------------------------------------------------------------
ATTENTION_OP_NAME = "pxcompile::pixelfly_attention"


def _attention_module(block: int, factors: int, globals: int, min_seq: int) -> nn.Module:
    from .attention import PixelflyAttention
    from .patterns import AttentionSpec

    return PixelflyAttention(AttentionSpec(block, factors, globals), min_seq)


def _run_attention(q, k, v, attn_mask, key_padding_mask, is_causal, enable_gqa, scale, *cfg):
    att = _attention_module(*cfg)
    return att(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
        key_padding_mask=key_padding_mask, enable_gqa=enable_gqa,
    )  # fmt: skip


@torch.library.custom_op(ATTENTION_OP_NAME, mutates_args=())
def pixelfly_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    is_causal: bool,
    enable_gqa: bool,
    scale: float | None,
    block: int,
    factors: int,
    globals: int,
    min_seq: int,
) -> Tensor:
    """``PixelflyAttention(AttentionSpec(block, factors, globals), min_seq)`` on ``q, k, v``
    (``[B, H, L, d]``, no dropout), as one operator: what an exported model records."""
    with torch.no_grad():
        out = _run_attention(
            q, k, v, attn_mask, key_padding_mask, is_causal, enable_gqa, scale,
            block, factors, globals, min_seq,
        )  # fmt: skip
    return _fresh([out.contiguous()], (q, k, v, attn_mask, key_padding_mask))[0]


@pixelfly_attention.register_fake
def _(q, k, v, *rest):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@torch.library.custom_op(ATTENTION_OP_NAME + "_backward", mutates_args=())
def pixelfly_attention_backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    is_causal: bool,
    enable_gqa: bool,
    scale: float | None,
    block: int,
    factors: int,
    globals: int,
    min_seq: int,
    wanted: int,
) -> list[Tensor]:
    """Gradients of ``pixelfly_attention`` for the inputs (``q, k, v``) whose bit is set in
    ``wanted``: the forward recomputed with autograd on (as for ``pixelfly_linear``)."""
    cfg = (attn_mask, key_padding_mask, is_causal, enable_gqa, scale, block, factors, globals)
    with _autograd_on(), torch.enable_grad():
        leaves = [t.detach().requires_grad_(bool(wanted >> i & 1)) for i, t in enumerate((q, k, v))]
        out = _run_attention(*leaves, *cfg, min_seq)
        want = [t for i, t in enumerate(leaves) if wanted >> i & 1]
        if not want:
            return []
        grads = torch.autograd.grad(out, want, grad, allow_unused=True)
    # contiguous, as the fake kernel promises (torch.compile checks strides)
    grads = [t.new_zeros(t.shape) if g is None else g.contiguous() for g, t in zip(grads, want)]
    return _fresh(grads, (grad, q, k, v, attn_mask, key_padding_mask))


@pixelfly_attention_backward.register_fake
def _(grad, q, k, v, *rest):
    wanted = rest[-1]
    return [t.new_empty(t.shape) for i, t in enumerate((q, k, v)) if wanted >> i & 1]


def _attention_setup_context(ctx, inputs, output) -> None:
    q, k, v, attn_mask, key_padding_mask, *cfg = inputs
    ctx.save_for_backward(q, k, v, attn_mask, key_padding_mask)
    ctx.cfg = tuple(cfg)


def _attention_backward(ctx, grad):
    saved = ctx.saved_tensors
    wanted = sum(1 << i for i, need in enumerate(ctx.needs_input_grad[:3]) if need)
    got = iter(
        torch.ops.pxcompile.pixelfly_attention_backward(grad, *saved, *ctx.cfg, wanted)
        if wanted
        else ()
    )
    grads = [next(got) if wanted >> i & 1 else None for i in range(3)]
    return (*grads, *([None] * (2 + len(ctx.cfg))))


pixelfly_attention.register_autograd(_attention_backward, setup_context=_attention_setup_context)


class PixelflyAttentionOp(nn.Module):
    """Calls the attention op with a :class:`~pxcompile.attention.PixelflyAttention`'s
    pattern: its stand-in when a model is exported. Same call signature as the module (and as
    ``F.scaled_dot_product_attention``); dropout is not recorded (exports are in eval mode)."""

    def __init__(self, att: nn.Module) -> None:
        super().__init__()
        s = att.spec  # type: ignore[attr-defined]
        self.cfg = (int(s.block), int(s.factors), int(s.globals), int(att.min_seq))  # type: ignore[attr-defined]

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        key_padding_mask: Tensor | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        return torch.ops.pxcompile.pixelfly_attention(
            q, k, v, attn_mask, key_padding_mask, bool(is_causal), bool(enable_gqa), scale,
            *self.cfg,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return "block={}, factors={}, globals={}, min_seq={}".format(*self.cfg)
