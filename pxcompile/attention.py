"""Pixelfly attention: block-sparse attention whose score matrix keeps a flat block butterfly.

The sequence is cut into ``n = seq / block`` blocks; query block ``i`` attends key block ``j``
iff one of

* **butterfly**: ``i XOR j`` is in ``{0, 1, 2, ..., 2^(f-1)}`` (the flat block butterfly of
  :func:`pxcompile.patterns.flat_butterfly` over sequence blocks, diagonal included);
* **global keys**: ``j < g`` (the first ``g`` blocks are attended by every query);
* **global queries**: ``i < g`` (the first ``g`` blocks attend every key);

and, for causal attention, ``j <= i`` (inside the diagonal block the element-wise lower
triangle applies, so no query ever sees a later key). All heads share the pattern. Masks from
the model (a boolean/additive ``attn_mask`` broadcastable to ``[B, H, L, S]`` or a
``key_padding_mask``) apply on top, element by element.

Execution on CPU (:func:`pixelfly_attention` -> :mod:`pxcompile.kernels.cpu.attention`; the
layout itself lives in :mod:`pxcompile.attention_layout`):

* the ``g`` global query blocks are dense rows (batched matmuls over all the keys they see);
* every other query block attends exactly its kept key blocks: query blocks are grouped by
  their number ``c`` of kept blocks (``f + 1 + g`` at most; causal rows keep only the partners
  before them, about 4 of 6 slots with the default pattern, so they are grouped by that count
  and no masked slot is ever computed). Per group, the K/V blocks are gathered into
  ``[..., c * block, d]`` (the diagonal block last: the only one with a mask, the causal
  triangle), one batched matmul gives the scores, a complete softmax over them, one batched
  matmul with the gathered V. A hand-written :class:`torch.autograd.Function` gives the
  backward (it keeps the probabilities; the K/V gradients are summed back with
  ``index_add_``);
* on CPU the heads are split into one chunk per intra-op thread, each run by a worker thread
  with single-threaded ops (one fork/join per call instead of one per op: on a busy 2-core
  machine each OpenMP fork/join can cost milliseconds), tiled over heads so each tile's
  buffers stay in cache;
* a layout that keeps every block (every block of the lower triangle when causal) runs
  :func:`F.scaled_dot_product_attention` itself, so it equals dense attention exactly.

Sequence lengths that are not a multiple of ``block * 2^f`` are padded up inside
:class:`PixelflyAttention` (padded keys are masked, padded queries dropped).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pxcompile import kernels
from pxcompile.attention_layout import BlockLayout, attention_layout, spec_layout
from pxcompile.errors import PxError
from pxcompile.kernels.cpu.attention import TILE_ELEMS, release_workspace, sparse_attention
from pxcompile.patterns import AttentionSpec
from pxcompile.policy import DEFAULT_ATTENTION_MIN_SEQ

__all__ = [
    "AttentionSpec",
    "BlockLayout",
    "attention_layout",
    "pixelfly_attention",
    "masked_dense_attention",
    "PixelflyAttention",
    "TILE_ELEMS",
    "release_workspace",
]


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------


def pixelfly_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: BlockLayout,
    causal: bool = False,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Attention over the kept blocks of ``layout`` only.

    ``q``, ``k``, ``v``: ``[B, H, L, d]`` with ``L == layout.seq`` (self-attention).
    ``attn_mask``: as for :func:`F.scaled_dot_product_attention` (bool: True = attend, or
    additive float), broadcastable to ``[B, H, L, L]`` with a query dim of 1 or L.
    ``key_padding_mask``: ``[B, L]`` bool, True = padding (ignored key), as in
    :class:`nn.MultiheadAttention`. ``causal``: intersect with the lower triangle.
    Equals ``masked_dense_attention`` with ``layout.element_mask(causal)`` combined with the
    masks; rows with no visible key give zeros.

    Kernel (``PXCOMPILE_KERNELS``, :func:`pxcompile.kernels.select`): the CPU kernel
    (:mod:`pxcompile.kernels.cpu.attention`) or the Triton one
    (:mod:`pxcompile.kernels.triton.attention`: pattern blocks that are powers of two >= 16,
    head dims <= 128; under ``auto`` other calls run the CPU kernel, under ``triton`` they are
    a one-line error).
    """
    if q.dim() != 4 or k.shape != q.shape[:3] + k.shape[3:] or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"expected q, k, v as [B, H, L, d] with equal B, H, L; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, L, d = q.shape
    if L != layout.seq:
        raise ValueError(f"sequence length {L} != layout's {layout.seq}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if key_padding_mask is not None:
        kp = ~key_padding_mask.bool().view(B, 1, 1, L)
        if attn_mask is None:
            attn_mask = kp
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & kp
        else:
            attn_mask = attn_mask.masked_fill(~kp, float("-inf"))
    if layout.is_full(causal):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal, scale=scale
        )
    if kernels.select("attention", q) == "triton":
        from pxcompile.kernels.triton import attention as triton_kernel

        why = triton_kernel.unsupported(layout, d, v.shape[-1])
        if why is None:
            return triton_kernel.sparse_attention(
                q, k, v, layout, causal, attn_mask, scale, float(dropout_p)
            )
        if kernels.setting() == "triton":  # asked for explicitly: no silent fallback
            raise PxError(
                f"{kernels.ENV}=triton: Pixelfly attention's Triton kernel cannot run this call "
                f"({why}); use {kernels.ENV}=auto or torch"
            )
    return sparse_attention(q, k, v, layout, causal, attn_mask, scale, float(dropout_p))


def masked_dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Reference: dense ``softmax(q k^T * scale + masks) v`` with the element mask ``mask``
    (``[L, S]`` bool, True = attend) and the same optional masks as
    :func:`pixelfly_attention`; rows with no visible key give zeros."""
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask.to(s.device), float("-inf"))
    if attn_mask is not None:
        s = (
            s.masked_fill(~attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else s + attn_mask
        )
    if key_padding_mask is not None:
        B, L = key_padding_mask.shape
        s = s.masked_fill(key_padding_mask.bool().view(B, 1, 1, L), float("-inf"))
    mx = s.amax(-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp(s - mx)
    den = e.sum(-1, keepdim=True)
    p = e / torch.where(den > 0, den, torch.ones_like(den))
    return torch.matmul(p, v)


class PixelflyAttention(nn.Module):
    """Drop-in for ``F.scaled_dot_product_attention`` on self-attention with Pixelfly
    block sparsity: ``forward(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
    scale=None, key_padding_mask=None)`` on ``[B, H, L, d]`` tensors.

    Inputs shorter than ``min_seq``, cross-attention (``q`` and ``k`` of different lengths)
    and layouts that keep every block run dense SDPA. Other lengths are padded up to a
    multiple of ``block * 2^factors`` (padded keys masked, padded queries dropped).
    """

    def __init__(self, spec: AttentionSpec | None = None, min_seq: int = 0) -> None:
        super().__init__()
        self.spec = spec or AttentionSpec()
        self.min_seq = min_seq

    def extra_repr(self) -> str:
        s = self.spec
        return f"block={s.block}, factors={s.factors}, globals={s.globals}, min_seq={self.min_seq}"

    def layout(self, seq: int) -> BlockLayout:
        return spec_layout(self.spec, seq)

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
        if torch.compiler.is_compiling() and not (dropout_p and self.training):
            # torch.compile / export see one opaque operator (its fake kernel gives shapes)
            # instead of tracing the layout's numpy code
            from pxcompile.ops import PixelflyAttentionOp

            return PixelflyAttentionOp(self)(
                q, k, v, attn_mask, 0.0, is_causal, scale, key_padding_mask, enable_gqa
            )
        if torch.compiler.is_compiling():
            return _eager_attention(
                self, q, k, v, attn_mask, dropout_p, is_causal, scale, key_padding_mask, enable_gqa
            )
        L, S = q.shape[-2], k.shape[-2]
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            rep = q.shape[-3] // k.shape[-3]
            k = k.repeat_interleave(rep, dim=-3)
            v = v.repeat_interleave(rep, dim=-3)
        if q.dim() != 4 or L != S or L < max(self.min_seq, 1):
            if key_padding_mask is not None:
                kp = ~key_padding_mask.bool()[:, None, None, :]
                if attn_mask is None:
                    attn_mask = kp
                elif attn_mask.dtype == torch.bool:
                    attn_mask = attn_mask & kp
                else:
                    attn_mask = attn_mask.masked_fill(~kp, float("-inf"))
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
            )
        layout = spec_layout(self.spec, L)
        P = layout.seq
        if P != L:
            pad = P - L
            q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
            B = q.shape[0]
            kpm = torch.zeros(B, P, dtype=torch.bool, device=q.device)
            kpm[:, L:] = True
            if key_padding_mask is not None:
                kpm[:, :L] |= key_padding_mask.bool()
            key_padding_mask = kpm
            if attn_mask is not None:
                am = attn_mask
                while am.dim() < 4:
                    am = am.unsqueeze(0)
                padq = pad if am.shape[-2] == L else 0
                fill: Any = True if am.dtype == torch.bool else 0.0
                attn_mask = F.pad(am, (0, pad, 0, padq), value=fill)
        out = pixelfly_attention(
            q,
            k,
            v,
            layout,
            causal=is_causal,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            scale=scale,
            dropout_p=dropout_p,
        )
        return out[:, :, :L] if P != L else out


@torch.compiler.disable
def _eager_attention(att: PixelflyAttention, *args: Any) -> Tensor:
    """Pixelfly attention with dropout under torch.compile: run eagerly (a graph break), since
    the operator form cannot record dropout's randomness."""
    return att(*args)


# --------------------------------------------------------------------------------------------
# putting it in models
# --------------------------------------------------------------------------------------------

#: Sequence length from which Pixelfly attention (default spec) beats dense SDPA on CPU:
#: measured with benchmarks/bench_attention.py (see benchmarks/RESULTS.md, "## Attention").
DEFAULT_MIN_SEQ: int = DEFAULT_ATTENTION_MIN_SEQ

#: Set on a Hugging Face attention module that runs Pixelfly attention when
#: :func:`sparsify_attention` was given a selection of modules.
SPARSE_FLAG = "pxcompile_sparse_attention"


def _module_reference(att: PixelflyAttention):
    """Masked dense attention with exactly the element mask ``att`` applies (dense SDPA where
    ``att`` falls back to it): the reference a sparsified model is checked against."""

    def ref(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        L, S = q.shape[-2], k.shape[-2]
        if q.dim() != 4 or L != S or L < max(att.min_seq, 1):
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale
            )
        em = att.layout(L).element_mask(is_causal)[:L, :L].to(q.device)
        am = attn_mask
        if am is not None and am.dtype != torch.bool:
            am = am.to(q.dtype)
        return masked_dense_attention(q, k, v, em, attn_mask=am, scale=scale)

    return ref


def _hf_attention(att: Any, selective: bool = False):
    """A transformers ``AttentionInterface`` function running ``att`` (SDPA-like callable);
    ``selective``: only in modules flagged with ``SPARSE_FLAG``, dense SDPA in the others."""

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                is_causal=None, **kwargs):  # fmt: skip
        run = att if not selective or getattr(module, SPARSE_FLAG, False) else _sdpa
        if run is att and isinstance(att, PixelflyAttention) and _exporting():
            from pxcompile.ops import PixelflyAttentionOp  # one op node in the exported graph

            run = PixelflyAttentionOp(att)
        if kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
            raise NotImplementedError("pixelfly attention: position_bias / softcap unsupported")
        rep = getattr(module, "num_key_value_groups", 1)
        if rep > 1:
            key = key.repeat_interleave(rep, dim=1)
            value = value.repeat_interleave(rep, dim=1)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
        out = run(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=causal,
            scale=scaling,
        )  # fmt: skip
        return out.transpose(1, 2).contiguous(), None

    return forward


def _is_sdpa(node: Any) -> bool:
    return node.op == "call_function" and (
        node.target is F.scaled_dot_product_attention
        or getattr(node.target, "__name__", "") == "scaled_dot_product_attention"
    )


def _exporting() -> bool:
    """Inside torch.export (``torch.compiler.is_exporting`` is missing from older torch)."""
    check = getattr(torch.compiler, "is_exporting", None)
    return bool(check and check())


def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )


def sparsify_attention(
    model: nn.Module,
    spec: AttentionSpec | None = None,
    min_seq: int = DEFAULT_MIN_SEQ,
    *,
    reference: bool = False,
    nodes: Collection[str] | None = None,
    modules: Collection[nn.Module] | None = None,
) -> nn.Module:
    """Make ``model``'s attention cores Pixelfly attention (in place; returns ``model``).

    * Hugging Face models (also inside a pxcompile GraphModule): a ``pixelfly_*`` attention
      implementation is registered with transformers' ``AttentionInterface`` (masks built as
      for SDPA) and set on the model;
    * ``torch.fx`` GraphModules: ``F.scaled_dot_product_attention`` calls become calls of a
      :class:`PixelflyAttention` submodule ``pixelfly_attention``.

    Self-attention at ``min_seq`` tokens or more runs sparse, anything else (short inputs,
    cross-attention, cached decoding) dense SDPA. ``reference=True`` installs the masked-dense
    equivalent instead (same element mask, dense math): the reference for checks.

    ``nodes`` (fx SDPA node names) and ``modules`` (Hugging Face attention modules) restrict
    the change to those attention calls (the rewrite pass passes the plan's sparse ones);
    ``None`` means every one.
    """
    from torch import fx

    att = PixelflyAttention(spec, min_seq)
    impl: Any = _module_reference(att) if reference else att
    done = 0
    if isinstance(model, fx.GraphModule):
        graph = model.graph
        chosen = [n for n in graph.nodes if _is_sdpa(n) and (nodes is None or n.name in nodes)]
        if chosen:
            if reference:
                model.pixelfly_attention = _RefModule(impl)
            else:
                model.pixelfly_attention = att
            for node in chosen:
                with graph.inserting_before(node):
                    new = graph.call_module("pixelfly_attention", node.args, dict(node.kwargs))
                node.replace_all_uses_with(new)
                graph.erase_node(node)
            graph.lint()
            model.recompile()
            done += len(chosen)
    try:
        from transformers import AttentionInterface, PreTrainedModel
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # pragma: no cover - transformers is optional
        PreTrainedModel = None  # type: ignore[assignment]  # noqa: N806
    if PreTrainedModel is not None:
        s = att.spec
        selective = modules is not None
        name = f"pixelfly_b{s.block}_f{s.factors}_g{s.globals}_s{min_seq}" + (
            ("_ref" if reference else "") + ("_sel" if selective else "")
        )
        if selective:
            for m in modules or ():
                setattr(m, SPARSE_FLAG, True)
        if not selective or modules:
            AttentionInterface.register(name, _hf_attention(impl, selective))
            AttentionMaskInterface.register(name, sdpa_mask)
            for m in model.modules():
                if isinstance(m, PreTrainedModel) and m.config._attn_implementation != name:
                    m.set_attn_implementation(name)
                    done += 1
    if not done:
        raise ValueError(
            f"{type(model).__name__}: no attention core found (F.scaled_dot_product_attention in "
            "an fx graph, or a Hugging Face model)"
        )
    model.pxcompile_attention = att
    return model


class _RefModule(nn.Module):
    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.fn(*args, **kwargs)
