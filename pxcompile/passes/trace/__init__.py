"""Trace pass: from an ``nn.Module`` and example inputs, build the :class:`ModelSchema`.

The schema lists every *weight GEMM* (linear layers, HF ``Conv1D``, the packed projections
of ``nn.MultiheadAttention``, ``F.linear`` / ``matmul`` on a parameter) and the *activation
GEMMs* of attention (``Q K^T`` and ``A V``, written out or as one
``scaled_dot_product_attention`` call), with shapes measured on the example inputs.

How
---
1. **torch.fx** with a tracer that keeps Linear-likes (``nn.Linear``, HF ``Conv1D``,
   ``nn.MultiheadAttention``) as leaf ``call_module`` nodes and traces into every other
   module that contains one. The graph is run once (``ShapeProp``) to get shapes.
2. **Coverage check.** That run happens under a ``TorchFunctionMode`` that records every
   parameter (2-D or more, matched by storage, so views/slices/tied weights count) reaching
   a GEMM function (``linear``, ``matmul``, ``mm``, ``addmm``, ``bmm``, ``baddbmm``,
   ``einsum``, ``mv``, ``tensordot``, ``bilinear``, ``multi_head_attention_forward``). If
   the graph analysis did not bind every recorded weight to a GEMM (e.g. ``einsum`` with a
   weight, a leaf the tracer could not see into), fx is abandoned.
3. **torch.export** (``strict=False``, no ``run_decompositions``, static shapes) is the
   fallback: ``aten.linear`` / ``matmul`` / ``mm`` / ``addmm`` / ``bmm`` / ``baddbmm`` /
   ``scaled_dot_product_attention`` nodes are read with their ``meta['val']`` shapes, and
   weights are found by parameter name (``graph_signature.inputs_to_parameters``, walking
   back through ``t``/``transpose``/``split``/``getitem``/``slice``/... nodes), the calling
   module from ``meta['nn_module_stack']``.
4. If neither traces, :class:`TraceError` (one line: what failed, in which module, and the
   advice to write a YAML schema).

If both trace but both miss weights, the one missing fewer is returned and the misses are
listed in ``TraceResult.notes`` (those weights are absent from the schema, so they stay
dense and their FLOPs are not counted).

The model is traced in the mode it is in (train/eval), under ``torch.no_grad()``; buffers
(e.g. BatchNorm running stats) and the RNG state are restored afterwards, and nothing is
set on the model.

Shapes and counts
-----------------
* ``in``/``out`` come from the weight: ``nn.Linear`` ``[out, in]``, HF ``Conv1D``
  ``[in, out]``, MHA ``in_proj_weight`` ``[3E, E]``; for functional uses, from how the
  weight enters the op (``linear(x, W)``: ``W`` is ``[out, in]``; ``x @ W``: ``[in, out]``;
  ``W @ x``: ``[out, in]`` with rows counted along ``x``'s last dim).
* ``rows`` of one call = ``numel(output) / out`` (= the product of all input dims but the
  last for ``x @ W``).
* ``calls`` = how often the same GEMM runs in one forward. If the calls differ in shape
  (e.g. a module reused on two sequence lengths, or MHA cross-attention where Q and K/V have
  different lengths, or slices of one packed weight), the calls are merged into ``calls=1``
  with ``rows`` chosen so that FLOPs are exact: ``rows = sum(2*r*i*o) / (2*in*out)`` (rounded).
* Activation GEMMs (per attention call): ``scores``: ``in=head_dim, out=seq_k,
  rows=batch*heads*seq_q``; ``values``: ``in=seq_k, out=head_dim, rows=batch*heads*seq_q``;
  ``heads`` from a 4-D shape (``[B, H, L, D]``) or the module's ``num_heads``-like attribute
  for 3-D ``bmm``; ``seq`` = the key sequence length (``seq_k``; equal to ``seq_q`` in
  self-attention). A ``matmul``/``bmm`` of two activations is the scores GEMM if its result
  flows into a softmax within a few elementwise ops, the values GEMM if its left operand
  comes from a softmax; other activation matmuls are skipped (with a note).

Naming
------
* Linear-like module: its qualified name (``transformer.h.0.mlp.c_fc``).
* ``nn.MultiheadAttention``: ``<mha>.in_proj`` (packed ``[3E, E]``; with separate weights
  ``<mha>.q_proj``/``.k_proj``/``.v_proj``), ``<mha>.out_proj``, ``<mha>.scores``,
  ``<mha>.values``.
* Functional use of a parameter: the parameter name without ``.weight``.
* Attention activation GEMMs: ``<innermost module>.scores`` / ``.values`` (the fx/aten node
  name when the op is at the root).
* Tied weights: a GEMM whose weight is also reachable under another name gets
  ``shared_with`` = the other GEMM's name if that parameter is another GEMM's weight, else
  the other parameter's name (e.g. GPT-2 ``lm_head`` -> ``transformer.wte.weight``).

Layer types (first rule that matches, on the lower-cased dotted path of the GEMM)
-------------------------------------------------------------------------------------
1. weight shared with an ``nn.Embedding``'s weight -> ``head`` (tied LM head);
2. a path segment in {lm_head, head, heads, classifier, cls, pooler, score, qa_outputs,
   logits, embed_out} -> ``head``;
3. a path segment containing ``embed`` (patch_embed, embeddings, to_patch_embedding, ...)
   -> ``embedding``;
4. a segment containing ``token`` (mlp_tokens, token_mixing, ...) -> ``token_mix``;
5. structural token mixing: the GEMM's input comes (through activations/dropout only) from
   a transpose/permute that moved the second-to-last dim (the sequence) last, or from
   another token-mixing GEMM -> ``token_mix``;
6. MHA GEMMs, a segment containing ``attn``/``attention`` (attn, self_attn, attention,
   SelfAttention, EncDecAttention, ...), or a last segment in {q, k, v (these three not at
   the root), query, key, value,
   qkv, kv, c_attn, in_proj, out_proj, q_proj, k_proj, v_proj, o_proj, to_q, to_k, to_v,
   to_qkv} -> ``attn_proj`` (so GPT-2's ``attn.c_proj`` is attention, ``mlp.c_proj`` MLP);
7. a segment containing mlp/ffn/feed_forward/feedforward/densereludense/intermediate/
   channel, or a last segment in {fc, fc1, fc2, c_fc, linear1, linear2, wi, wo, wi_0, wi_1,
   gate_proj, up_proj, down_proj, w1, w2, w3, dense_h_to_4h, dense_4h_to_h}, or a path
   ending in ``output.dense`` (BERT's FFN output) -> ``mlp``;
8. a top-level GEMM (no dot) named fc/fc_out/out/output/logits/linear/last_linear/final/
   readout/proj_out that is the last weight GEMM of the forward -> ``head``;
9. otherwise ``other``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import logging
import math
import operator
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ..errors import TraceError
from ..schema import Gemm, LayerType, ModelSchema

__all__ = ["GemmBinding", "TraceResult", "trace", "is_linear_like", "classify"]

YAML_HINT = "write a YAML schema (start from `pxcompile trace model.py -o schema.yaml`)"


@dataclass
class GemmBinding:
    """How the rewrite pass reaches the weight of one weight GEMM."""

    gemm: str  # Gemm.name
    module: str  # qualified name of the owning module ('' for root)
    kind: str  # see below
    weight: str  # qualified parameter name
    bias: str | None = None
    unsupported: str | None = None  # why the rewrite must leave it dense, if it must


# GemmBinding.kind:
#   'linear'        an nn.Linear called as a module (also nn.MultiheadAttention.out_proj,
#                   which MHA uses through its weight; module = '<mha>.out_proj')
#   'conv1d'        an HF Conv1D called as a module (weight stored [in, out])
#   'mha_in_proj'   the packed in-projection of an nn.MultiheadAttention (module = the MHA;
#                   weight '<mha>.in_proj_weight' [3E, E], or q/k/v_proj_weight when separate)
#   'functional'    F.linear(x, <parameter>[, <parameter>]) with the parameter itself, weight
#                   [out, in] (the fx rewrite can replace that call)
#   'functional_op' any other use of a parameter in a GEMM: x @ W ([in, out]), W @ x,
#                   F.linear on W.t() or a slice, addmm, einsum, tensordot, or a weight used
#                   both as a module and functionally; not rewritable, stays dense


@dataclass(frozen=True)
class AttentionSite:
    """How the rewrite pass reaches the attention core behind a scores/values GEMM.

    ``via``: ``'hf'`` (a Hugging Face model's attention, replaced through transformers'
    ``AttentionInterface`` whatever it traced as), ``'sdpa'`` (an
    ``F.scaled_dot_product_attention`` call; ``nodes`` names its nodes in the traced graph),
    ``'mha'`` (inside an ``nn.MultiheadAttention``) or ``'chain'`` (written out as matmul,
    softmax, matmul)."""

    via: str
    nodes: tuple[str, ...] = ()
    unsupported: str | None = None  # why Pixelfly attention can't stand in for it, if so


@dataclass
class TraceResult:
    schema: ModelSchema
    bindings: dict[str, GemmBinding]  # by gemm name, weight GEMMs only
    method: str  # 'fx' or 'export'
    graph_module: fx.GraphModule | None  # the fx graph when method == 'fx', else None
    notes: list[str] = field(default_factory=list)
    attention: dict[str, AttentionSite] = field(default_factory=dict)  # activation GEMMs


# ---------------------------------------------------------------------------------------
# Linear-likes
# ---------------------------------------------------------------------------------------
def is_hf_model(model: nn.Module | None) -> bool:
    """Does ``model`` contain a Hugging Face ``PreTrainedModel``?"""
    if model is None:
        return False
    return any(
        any(c.__name__ == "PreTrainedModel" for c in type(m).__mro__) for m in model.modules()
    )


def _weight_read_by_owner(model: nn.Module, b: GemmBinding) -> str | None:
    """A Linear whose owner's forward reads ``self.<leaf>.weight`` itself (Hugging Face T5 checks
    ``self.wo.weight.dtype``) can't become a PixelflyLinear, which has no dense weight."""
    if b.kind not in ("linear", "conv1d") or not b.module:
        return None
    parent, _, leaf = b.module.rpartition(".")
    try:
        owner = model.get_submodule(parent)
    except AttributeError:
        return None
    if type(owner).__module__.startswith("torch.") and not isinstance(owner, nn.Sequential):
        return None  # torch's own layers: the rewrite handles their fast paths (rewrite.py)
    if _reads_weight(type(owner), leaf):
        return f"{type(owner).__name__}.forward reads {leaf}.weight itself"
    return None


@functools.lru_cache(maxsize=256)
def _reads_weight(cls: type, leaf: str) -> bool:
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return re.search(rf"\.{re.escape(leaf)}\.weight\b", src) is not None


def hf_attention_unsupported(model: nn.Module) -> str | None:
    """Why a Hugging Face model's attention can't run as Pixelfly attention: attention that
    adds a learned position bias to the scores (T5-style) or soft-caps the logits (Gemma-2)
    is more than softmax(Q K^T) V under a mask."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is None:
            continue
        if getattr(cfg, "relative_attention_num_buckets", None):
            return "attention adds a relative position bias to the scores (T5-style)"
        if getattr(cfg, "attn_logit_softcapping", None):
            return "attention soft-caps its logits"
        if getattr(cfg, "alibi", None) or getattr(cfg, "position_embedding_type", "") == "alibi":
            return "attention adds ALiBi position biases to the scores"
    return None


def _is_hf_conv1d(m: nn.Module) -> bool:
    t = type(m)
    return any(
        c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in t.__mro__
    )


def is_linear_like(m: nn.Module) -> bool:
    """``nn.Linear``, HF ``Conv1D`` or ``nn.MultiheadAttention``."""
    return isinstance(m, (nn.Linear, nn.MultiheadAttention)) or _is_hf_conv1d(m)


def _module_kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear):
        return "linear"
    if _is_hf_conv1d(m):
        return "conv1d"
    if isinstance(m, nn.MultiheadAttention):
        return "mha"
    return None


# ---------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------
_HEAD_SEGS = {
    "lm_head",
    "head",
    "heads",
    "classifier",
    "cls",
    "pooler",
    "score",
    "qa_outputs",
    "logits",
    "embed_out",
}
_ATTN_LAST = {
    "q",
    "k",
    "v",
    "query",
    "key",
    "value",
    "qkv",
    "kv",
    "c_attn",
    "in_proj",
    "out_proj",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "to_q",
    "to_k",
    "to_v",
    "to_qkv",
}
_MLP_SUBSTR = ("mlp", "ffn", "feed_forward", "feedforward", "densereludense", "intermediate")
_MLP_LAST = {
    "fc",
    "fc1",
    "fc2",
    "c_fc",
    "linear1",
    "linear2",
    "wi",
    "wo",
    "wi_0",
    "wi_1",
    "gate_proj",
    "up_proj",
    "down_proj",
    "w1",
    "w2",
    "w3",
    "dense_h_to_4h",
    "dense_4h_to_h",
}
_TOP_HEAD = {
    "fc",
    "fc_out",
    "out",
    "output",
    "logits",
    "linear",
    "last_linear",
    "final",
    "readout",
    "proj_out",
}


def classify(
    path: str,
    *,
    tied_to_embedding: bool = False,
    token_hint: bool = False,
    is_mha: bool = False,
    last_weight_gemm: bool = False,
) -> LayerType:
    """The layer type of a weight GEMM from its dotted path (rules in the module doc)."""
    segs = [s.lower() for s in path.split(".") if s]
    last = segs[-1] if segs else ""
    if tied_to_embedding:
        return LayerType.HEAD
    if any(s in _HEAD_SEGS for s in segs):
        return LayerType.HEAD
    if any("embed" in s for s in segs):
        return LayerType.EMBEDDING
    if any("token" in s for s in segs):
        return LayerType.TOKEN_MIX
    if token_hint:
        return LayerType.TOKEN_MIX
    if (
        is_mha
        or any("attn" in s or "attention" in s for s in segs)
        or (last in _ATTN_LAST and (len(last) > 1 or len(segs) > 1))
    ):
        return LayerType.ATTN_PROJ
    if (
        any(any(k in s for k in _MLP_SUBSTR) or "channel" in s for s in segs)
        or last in _MLP_LAST
        or path.lower().endswith("output.dense")
    ):
        return LayerType.MLP
    if len(segs) == 1 and last in _TOP_HEAD and last_weight_gemm:
        return LayerType.HEAD
    return LayerType.OTHER


# ---------------------------------------------------------------------------------------
# Parameter identity (storage based: views, slices and tied weights resolve)
# ---------------------------------------------------------------------------------------
class _Params:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.aliases: dict[int, list[str]] = {}  # id(param) -> all qualified names
        self.by_name: dict[str, nn.Parameter] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            self.aliases.setdefault(id(p), []).append(n)
            self.by_name[n] = p
        self.canon = {pid: names[0] for pid, names in self.aliases.items()}
        # storage ptr -> [(start, end, pid)], GEMM-capable params only (2-D or more)
        self.ranges: dict[int, list[tuple[int, int, int]]] = {}
        seen: set[int] = set()
        for p in self.by_name.values():
            if id(p) in seen or p.dim() < 2 or p.numel() == 0 or _is_fake(p):
                continue
            seen.add(id(p))
            try:
                sp = p.untyped_storage().data_ptr()
            except Exception:  # noqa: BLE001 - exotic tensor subclasses
                continue
            start = p.data_ptr()
            self.ranges.setdefault(sp, []).append(
                (start, start + p.numel() * p.element_size(), id(p))
            )
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.embedding_pids = {
            id(m.weight) for m in self.modules.values() if isinstance(m, nn.Embedding)
        }

    def pid_of_tensor(self, t: torch.Tensor) -> int | None:
        if _is_fake(t):
            return None
        try:
            sp = t.untyped_storage().data_ptr()
        except Exception:  # noqa: BLE001
            return None
        cands = self.ranges.get(sp)
        if not cands:
            return None
        ptr = t.data_ptr()
        for start, end, pid in cands:
            if start <= ptr < end:
                return pid
        return cands[0][2]

    def pid(self, name: str) -> int | None:
        p = self.by_name.get(name)
        return None if p is None else id(p)

    def name_under(self, pid: int, module: str) -> str:
        """The alias of ``pid`` owned by ``module`` if any, else its canonical name."""
        prefix = module + "." if module else ""
        for n in self.aliases.get(pid, []):
            if n.startswith(prefix) and "." not in n[len(prefix) :]:
                return n
        for n in self.aliases.get(pid, []):
            if n.startswith(prefix):
                return n
        return self.canon[pid]


def _is_fake(t: Any) -> bool:
    return type(t).__name__ in ("FakeTensor", "FunctionalTensor") or (
        isinstance(t, torch.Tensor) and t.device.type == "meta"
    )


# ---------------------------------------------------------------------------------------
# Ground truth: which weights reach a GEMM function in a real run
# ---------------------------------------------------------------------------------------
_GEMM_FUNC_NAMES = {
    "linear",
    "matmul",
    "__matmul__",
    "__rmatmul__",
    "mm",
    "bmm",
    "addmm",
    "baddbmm",
    "einsum",
    "mv",
    "addmv",
    "tensordot",
    "bilinear",
    "multi_head_attention_forward",
}


class _GemmRecorder(TorchFunctionMode):
    def __init__(self, params: _Params) -> None:
        super().__init__()
        self.params = params
        self.used: dict[int, str] = {}  # pid -> function name

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fname = getattr(func, "__name__", "")
        if fname in _GEMM_FUNC_NAMES:
            for t in pytree.tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor):
                    pid = self.params.pid_of_tensor(t)
                    if pid is not None:
                        self.used.setdefault(pid, fname)
        return func(*args, **kwargs)


@contextmanager
def _preserved(model: nn.Module, tensors: list[torch.Tensor]):
    """no_grad, and put back buffers (values and objects), RNG and train flags afterwards."""
    bufs = [
        (m, k, b, b.detach().clone())
        for m in model.modules()
        for k, b in m._buffers.items()
        if b is not None
    ]
    flags = [(m, m.training) for m in model.modules()]
    devices = sorted(
        {t.device.index or 0 for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda}
    )
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        with torch.no_grad():
            for m, k, b, saved in bufs:
                m._buffers[k] = b
                if b.shape == saved.shape:
                    b.copy_(saved)
        for m, f in flags:
            m.training = f


# ---------------------------------------------------------------------------------------
# Sites: GEMM calls found in a graph, before merging into Gemm entries
# ---------------------------------------------------------------------------------------
@dataclass
class _Site:
    name: str
    in_f: int
    out_f: int
    rows: int
    weight_pid: int | None = None  # None for activation GEMMs
    ltype: LayerType | None = None  # fixed type (activation GEMMs)
    kind: str = ""
    module: str = ""
    weight: str = ""
    bias: str | None = None
    has_bias: bool = False
    full_in: int | None = None  # full weight dims when the op used a slice
    full_out: int | None = None
    heads: int | None = None
    seq: int | None = None
    token_hint: bool = False
    is_mha: bool = False
    via: str = ""  # activation GEMMs: 'sdpa' | 'mha' | 'chain'
    node: str = ""  # activation GEMMs: the graph node of the attention call


def _prod(xs) -> int:
    return int(math.prod(int(x) for x in xs))


_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "nhead", "heads")


def _heads_from_modules(params: _Params, scope: str, lead: int) -> int | None:
    path = scope
    while True:
        m = params.modules.get(path)
        if m is not None:
            for a in _HEAD_ATTRS:
                v = getattr(m, a, None)
                if isinstance(v, int) and v > 0 and lead % v == 0:
                    return v
        if not path:
            return None
        path = path.rpartition(".")[0]


# --- graph helpers shared by the fx and export analyses ---------------------------------
_PASS_OPS = {
    "gelu",
    "relu",
    "silu",
    "tanh",
    "sigmoid",
    "dropout",
    "contiguous",
    "clone",
    "to",
    "_to_copy",
    "alias",
    "detach",
    "float",
    "half",
    "bfloat16",
    "type_as",
    "identity",
    "mish",
    "leaky_relu",
    "elu",
    "hardswish",
    "feature_dropout",
}
_SCORE_PASS = _PASS_OPS | {
    "div",
    "mul",
    "add",
    "sub",
    "masked_fill",
    "where",
    "truediv",
    "iadd",
    "imul",
    "itruediv",
    "float",
    "type",
}
_WEIGHT_VIEW_OPS = {
    "t",
    "transpose",
    "permute",
    "contiguous",
    "to",
    "_to_copy",
    "alias",
    "detach",
    "float",
    "half",
    "bfloat16",
    "type_as",
    "numpy_t",
    "mt",
    "getitem",
    "split",
    "split_with_sizes",
    "chunk",
    "slice",
    "unsafe_split",
    "lift_fresh",
    "clone",
    "view",
    "reshape",
    "unsqueeze",
    "expand",
    "_unsafe_view",
}


def _op_name(node: fx.Node) -> str:
    """A lower-case op name for a node: 'linear', 'matmul', 'transpose', 'softmax', ..."""
    t = node.target
    if node.op == "call_method":
        return str(t).lower()
    if node.op != "call_function":
        return ""
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name.split("::")[-1].lower()
    if isinstance(t, torch._ops.OpOverloadPacket):
        return str(t).split(".")[-1].lower()
    name = getattr(t, "__name__", str(t)).lower()
    return name


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, fx.Node)]


# ---------------------------------------------------------------------------------------
# Merging sites into the schema
# ---------------------------------------------------------------------------------------
def _build_schema(
    sites: list[_Site], params: _Params, name: str, method: str, description: str
) -> tuple[ModelSchema, dict[str, GemmBinding], dict[str, AttentionSite]]:
    weight_site_names = {s.name for s in sites if s.weight_pid is not None}
    groups: dict[str, list[_Site]] = {}
    for s in sites:
        if s.weight_pid is None and s.name in weight_site_names:  # e.g. a Linear named 'scores'
            s.name += "_act"
        groups.setdefault(s.name, []).append(s)
    weight_names = [n for n, g in groups.items() if g[0].weight_pid is not None]
    last_weight = weight_names[-1] if weight_names else None
    pid_to_gemm: dict[int, str] = {}
    for n in weight_names:
        pid_to_gemm.setdefault(groups[n][0].weight_pid, n)  # type: ignore[arg-type]

    gemms: list[Gemm] = []
    bindings: dict[str, GemmBinding] = {}
    attention: dict[str, AttentionSite] = {}
    for gname, group in groups.items():
        s0 = group[0]
        in_f = s0.full_in or s0.in_f
        out_f = s0.full_out or s0.out_f
        same = all((s.in_f, s.out_f, s.rows) == (s0.in_f, s0.out_f, s0.rows) for s in group) and (
            in_f,
            out_f,
        ) == (s0.in_f, s0.out_f)
        if same:
            rows, calls = s0.rows, len(group)
        else:
            total = sum(s.rows * s.in_f * s.out_f for s in group)
            rows, calls = max(1, round(total / (in_f * out_f))), 1
        shared = None
        if s0.weight_pid is not None:
            pid = s0.weight_pid
            tied_emb = pid in params.embedding_pids
            other_gemm = next(
                (n for n, g in groups.items() if n != gname and g[0].weight_pid == pid), None
            )
            if other_gemm is not None:
                shared = other_gemm
            else:
                others = [a for a in params.aliases.get(pid, []) if a != s0.weight]
                shared = others[0] if others else None
            ltype = classify(
                s0.module if s0.kind in ("linear", "conv1d") else gname,
                tied_to_embedding=tied_emb,
                token_hint=any(s.token_hint for s in group),
                is_mha=s0.is_mha,
                last_weight_gemm=gname == last_weight,
            )
            kinds = {s.kind for s in group}
            kind = s0.kind if len(kinds) == 1 else "functional_op"
            bindings[gname] = GemmBinding(gname, s0.module, kind, s0.weight, s0.bias)
        else:
            ltype = s0.ltype  # type: ignore[assignment]
            vias = {s.via for s in group}
            attention[gname] = AttentionSite(
                s0.via if len(vias) == 1 else "chain",
                tuple(dict.fromkeys(s.node for s in group if s.node)),
            )
        gemms.append(
            Gemm(
                name=gname,
                type=ltype,  # type: ignore[arg-type]
                in_features=int(in_f),
                out_features=int(out_f),
                rows=int(rows),
                calls=calls,
                bias=any(s.has_bias for s in group),
                shared_with=shared,
                heads=s0.heads,
                seq=s0.seq,
            )
        )
    schema = ModelSchema(
        name=name, gemms=gemms, description=description, meta={"traced_with": method}
    )
    return schema, bindings, attention


# ---------------------------------------------------------------------------------------
# Graph analysis (common to fx and export graphs)
# ---------------------------------------------------------------------------------------
class _Analyzer:
    """Turns GEMM nodes of an fx graph (torch-level or aten-level) into sites."""

    def __init__(
        self,
        gm: fx.GraphModule,
        params: _Params,
        *,
        shape_of: Callable[[fx.Node], tuple[int, ...] | None],
        param_of_node: Callable[[fx.Node], str | None],
        scope_of: Callable[[fx.Node], str],
        module_of_call: Callable[[fx.Node], nn.Module | None],
    ) -> None:
        self.gm = gm
        self.params = params
        self.shape_of = shape_of
        self.param_of_node = param_of_node
        self.scope_of = scope_of
        self.module_of_call = module_of_call
        self.sites: list[_Site] = []
        self.notes: list[str] = []
        self.token_nodes: set[fx.Node] = set()
        self._gemm_nodes: set[fx.Node] = set()

    # -- helpers --------------------------------------------------------------------------
    def resolve_weight(self, node: Any, depth: int = 0) -> str | None:
        """The parameter a GEMM operand is (a view/slice of), or None."""
        if not isinstance(node, fx.Node) or depth > 8:
            return None
        p = self.param_of_node(node)
        if p is not None:
            return p
        if node.op in ("call_function", "call_method") and _op_name(node) in _WEIGHT_VIEW_OPS:
            ins = _tensor_inputs(node)
            if ins:
                return self.resolve_weight(ins[0], depth + 1)
        if (  # fx: `w.T` / `w.mT` are getattr calls on the proxy
            node.op == "call_function"
            and node.target is getattr
            and len(node.args) == 2
            and node.args[1] in ("T", "mT", "H", "mH", "data")
        ):
            return self.resolve_weight(node.args[0], depth + 1)
        return None

    def _is_softmax(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            m = self.module_of_call(node)
            return isinstance(m, nn.Softmax)
        return "softmax" in _op_name(node)

    def from_softmax(self, node: Any, depth: int = 0) -> bool:
        if not isinstance(node, fx.Node) or depth > 8:
            return False
        if self._is_softmax(node):
            return True
        passthrough = (
            node.op in ("call_function", "call_method") and _op_name(node) in _SCORE_PASS
        ) or (node.op == "call_module" and isinstance(self.module_of_call(node), nn.Dropout))
        if passthrough:
            return any(self.from_softmax(a, depth + 1) for a in _tensor_inputs(node))
        return False

    def to_softmax(self, node: fx.Node) -> bool:
        frontier, seen = [node], set()
        for _ in range(8):
            nxt = []
            for n in frontier:
                for u in n.users:
                    if u in seen:
                        continue
                    seen.add(u)
                    if self._is_softmax(u):
                        return True
                    if u.op in ("call_function", "call_method") and (
                        _op_name(u) in _SCORE_PASS or _op_name(u) in ("view", "reshape")
                    ):
                        nxt.append(u)
            frontier = nxt
        return False

    def transposed_input(self, node: Any, depth: int = 0) -> bool:
        """Is this activation in "sequence last" layout (the input of a token-mixing GEMM)?

        A transpose/permute that swaps the last two dims flips the layout; activations,
        dropout and casts keep it; a token-mixing GEMM's output is in that layout; anything
        else (norms, reshapes, other GEMMs, inputs) is in the normal layout.
        """
        if not isinstance(node, fx.Node) or depth > 12:
            return False
        if node in self.token_nodes:
            return True
        ins = _tensor_inputs(node)
        if node.op == "call_module":
            m = self.module_of_call(node)
            if (
                m is not None
                and not is_linear_like(m)
                and (
                    isinstance(m, (nn.Dropout, nn.Identity))
                    or type(m).__module__ == "torch.nn.modules.activation"
                )
            ):
                return bool(ins) and self.transposed_input(ins[0], depth + 1)
            return False
        if node.op not in ("call_function", "call_method") or not ins:
            return False
        op = _op_name(node)
        if op in ("transpose", "swapaxes", "swapdims", "permute", "mt"):
            shp = self.shape_of(ins[0])
            if shp is None or len(shp) < 3:
                return False
            if self._swaps_last_two(node, op, len(shp)):
                return not self.transposed_input(ins[0], depth + 1)
            return False
        if op in _PASS_OPS:
            return self.transposed_input(ins[0], depth + 1)
        return False

    @staticmethod
    def _swaps_last_two(node: fx.Node, op: str, nd: int) -> bool:
        if op == "mt":
            return True
        rest = list(node.args[1:]) + list(node.kwargs.values())
        if op == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            dims = [d % nd for d in dims if isinstance(d, int)]
            return dims == [*range(nd - 2), nd - 1, nd - 2]
        ds = [a for a in rest if isinstance(a, int)]
        return len(ds) >= 2 and {ds[0] % nd, ds[1] % nd} == {nd - 1, nd - 2}

    # -- site makers ----------------------------------------------------------------------
    def weight_site(
        self,
        node: fx.Node,
        x: Any,
        w_node: Any,
        pname: str,
        w_is_linear: bool,
        w_first: bool,
        bias_node: Any,
    ) -> None:
        wshape = self.shape_of(w_node)
        oshape = self.shape_of(node)
        if wshape is None or oshape is None or len(wshape) < 2:
            self.notes.append(f"{node.name}: weight {pname} has an unexpected shape; skipped")
            return
        wshape = tuple(wshape[-2:])  # a weight broadcast over a batch (bmm) counts per row
        if w_is_linear:  # x @ W^T, W [out, in]
            out_f, in_f = wshape
        elif w_first:  # W [m, k] @ x [..., k, n]: per column of x, in=k out=m
            out_f, in_f = wshape
        else:  # x @ W, W [in, out]
            in_f, out_f = wshape
        rows = max(1, _prod(oshape) // max(1, out_f))
        direct = w_is_linear and self.param_of_node(w_node) is not None
        self._weight_site_dims(node, x, pname, in_f, out_f, rows, bias_node, wshape, direct)

    def _weight_site_dims(
        self,
        node: fx.Node,
        x: Any,
        pname: str,
        in_f: int,
        out_f: int,
        rows: int,
        bias_node: Any,
        wshape: tuple[int, ...],
        direct: bool = False,
    ) -> None:
        """One weight GEMM site; ``direct``: ``linear(x, <parameter>)`` (no view of it)."""
        pid = self.params.pid(pname)
        assert pid is not None
        scope = self.scope_of(node)
        owner, _, leaf = pname.rpartition(".")
        owner_mod = self.params.modules.get(owner)
        okind = _module_kind(owner_mod) if owner_mod is not None else None
        full = self.params.by_name[pname].shape
        full_in = full_out = None
        bias_ok = bias_node is None or (
            isinstance(bias_node, fx.Node) and self.param_of_node(bias_node) is not None
        )
        kind = "functional" if direct and bias_ok else "functional_op"
        gname, is_mha, module = pname, False, owner
        if okind == "mha" and leaf in (
            "in_proj_weight",
            "q_proj_weight",
            "k_proj_weight",
            "v_proj_weight",
        ):
            kind, is_mha = "mha_in_proj", True
            gname = f"{owner}.in_proj" if leaf == "in_proj_weight" else f"{owner}.{leaf[:6]}"
            full_out, full_in = int(full[0]), int(full[1])
        elif (
            okind in ("linear", "conv1d")
            and leaf == "weight"
            and (scope == owner or self._is_mha_out_proj(owner))
        ):
            kind, gname = okind, owner
            is_mha = self._is_mha_out_proj(owner)
            if okind == "linear":
                full_out, full_in = int(full[0]), int(full[1])
            else:
                full_in, full_out = int(full[0]), int(full[1])
        else:
            if gname.endswith(".weight"):
                gname = gname[: -len(".weight")]
            if tuple(full) != tuple(wshape) and tuple(full) != tuple(reversed(wshape)):
                # a slice of a bigger parameter: keep the op's in, spread the rest over out
                full_in = in_f
                full_out = max(1, self.params.by_name[pname].numel() // in_f)
        bias_name = None
        has_bias = bias_node is not None
        if isinstance(bias_node, fx.Node):
            bias_name = self.resolve_weight(bias_node)
        elif kind in ("linear", "conv1d"):
            b = getattr(owner_mod, "bias", None)
            has_bias = b is not None
            bias_name = f"{owner}.bias" if has_bias else None
        if kind == "mha_in_proj":
            has_bias = owner_mod.in_proj_bias is not None  # type: ignore[union-attr]
            bias_name = f"{owner}.in_proj_bias" if has_bias else None
        if kind in ("linear", "conv1d") and bias_name is None:
            b = getattr(owner_mod, "bias", None)
            has_bias = b is not None
            bias_name = f"{owner}.bias" if has_bias else None
        token = self.transposed_input(x)
        if token:
            self.token_nodes.add(node)
        self.sites.append(
            _Site(
                name=gname,
                in_f=int(in_f),
                out_f=int(out_f),
                rows=rows,
                weight_pid=pid,
                kind=kind,
                module=module,
                weight=pname
                if kind.startswith("functional")
                else self.params.name_under(pid, owner),
                bias=bias_name,
                has_bias=has_bias,
                full_in=full_in,
                full_out=full_out,
                token_hint=token,
                is_mha=is_mha,
            )
        )

    def _is_mha_out_proj(self, owner: str) -> bool:
        parent, _, leaf = owner.rpartition(".")
        return leaf == "out_proj" and isinstance(
            self.params.modules.get(parent), nn.MultiheadAttention
        )

    def attn_sites(
        self,
        node: fx.Node,
        *,
        q: tuple[int, ...],
        k_len: int,
        v_dim: int,
        scope: str,
        which: tuple[str, ...] = ("scores", "values"),
        heads: int | None = None,
        via: str = "sdpa",
    ) -> None:
        """Scores/values of one attention call; q = [..., L, D]."""
        d = int(q[-1])
        rows = _prod(q[:-1])
        if heads is None:
            if len(q) >= 4:
                heads = int(q[-3])
            else:
                lead = _prod(q[:-2]) if len(q) >= 3 else 1
                heads = _heads_from_modules(self.params, scope, lead)
        base = scope or node.name
        if "scores" in which:
            self.sites.append(
                _Site(
                    f"{base}.scores",
                    d,
                    int(k_len),
                    rows,
                    ltype=LayerType.ATTN_SCORES,
                    heads=heads,
                    seq=int(k_len),
                    via=via,
                    node=node.name,
                )
            )
        if "values" in which:
            self.sites.append(
                _Site(
                    f"{base}.values",
                    int(k_len),
                    int(v_dim),
                    rows,
                    ltype=LayerType.ATTN_VALUES,
                    heads=heads,
                    seq=int(k_len),
                    via=via,
                    node=node.name,
                )
            )

    def matmul_site(self, node: fx.Node, a: Any, b: Any, bias: Any = None) -> None:
        pa, pb = self.resolve_weight(a), self.resolve_weight(b)
        if pb is not None and pa is None:
            self.weight_site(node, a, b, pb, w_is_linear=False, w_first=False, bias_node=bias)
            return
        if pa is not None and pb is None:
            self.weight_site(node, b, a, pa, w_is_linear=False, w_first=True, bias_node=bias)
            return
        if pa is not None and pb is not None:
            self.notes.append(f"{node.name}: matmul of two parameters ({pa}, {pb}); skipped")
            return
        sa, so = self.shape_of(a), self.shape_of(node)
        if sa is None or so is None or len(sa) < 2 or len(so) < 2:
            return
        scope = self.scope_of(node)
        if self.from_softmax(a):
            kind = "values"
        elif self.to_softmax(node):
            kind = "scores"
        else:
            self.notes.append(
                f"{node.name}: matmul of two activations in '{scope or '<root>'}' is not "
                "recognized as attention; skipped"
            )
            return
        # both: in = a[-1], out = out[-1], rows = prod(out[:-1])
        in_f, out_f = int(sa[-1]), int(so[-1])
        rows = _prod(so[:-1])
        seq = in_f if kind == "values" else out_f
        if len(so) >= 4:
            heads = int(so[-3])
        else:
            heads = _heads_from_modules(self.params, scope, _prod(so[:-2]) if len(so) >= 3 else 1)
        base = scope or node.name
        ltype = LayerType.ATTN_VALUES if kind == "values" else LayerType.ATTN_SCORES
        self.sites.append(
            _Site(
                f"{base}.{kind}", in_f, out_f, rows, ltype=ltype, heads=heads, seq=seq, via="chain"
            )
        )

    def einsum_site(self, node: fx.Node) -> None:
        """Two-operand einsum: a weight GEMM if one operand is a parameter, else attention."""
        eq = node.args[0] if node.args else node.kwargs.get("equation")
        ops = list(node.args[1:])
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        if not isinstance(eq, str) or len(ops) != 2 or "..." in eq or "->" not in eq:
            self.notes.append(f"{node.name}: einsum {eq!r} not understood; skipped")
            return
        lhs, out_sub = eq.replace(" ", "").split("->")
        subs = lhs.split(",")
        a, b = ops
        pa, pb = self.resolve_weight(a), self.resolve_weight(b)
        if pa is not None and pb is None:
            a, b, pa, pb, subs = b, a, pb, pa, subs[::-1]
        sa, sb, so = self.shape_of(a), self.shape_of(b), self.shape_of(node)
        if sa is None or sb is None or so is None or len(subs) != 2:
            self.notes.append(f"{node.name}: einsum shapes unknown; skipped")
            return
        size = dict(zip(subs[0], sa))
        size.update(zip(subs[1], sb))
        in_f = _prod(size[c] for c in subs[1] if c in subs[0] and c not in out_sub)
        out_f = _prod(size[c] for c in subs[1] if c in out_sub and c not in subs[0])
        rows = max(1, _prod(so) // max(1, out_f))
        if pb is not None and pa is None:
            wshape = (in_f, out_f)
            self._weight_site_dims(node, a, pb, in_f, out_f, rows, None, wshape, False)
            return
        if pb is not None:
            self.notes.append(f"{node.name}: einsum of two parameters; skipped")
            return
        scope = self.scope_of(node)
        kind = "values" if self.from_softmax(a) else "scores" if self.to_softmax(node) else None
        if kind is None:
            self.notes.append(f"{node.name}: einsum of two activations is not attention; skipped")
            return
        heads = _heads_from_modules(self.params, scope, max(1, rows))
        ltype = LayerType.ATTN_VALUES if kind == "values" else LayerType.ATTN_SCORES
        seq = in_f if kind == "values" else out_f
        self.sites.append(
            _Site(
                f"{scope or node.name}.{kind}",
                in_f,
                out_f,
                rows,
                ltype=ltype,
                heads=heads,
                seq=seq,
                via="chain",
            )
        )

    def tensordot_site(self, node: fx.Node) -> None:
        """aten.tensordot(a, b, dims_a, dims_b) with a parameter operand (export graphs)."""
        a, b, da, db = (list(node.args) + [None] * 4)[:4]
        pa, pb = self.resolve_weight(a), self.resolve_weight(b)
        if pa is not None and pb is None:
            a, b, pa, pb, da, db = b, a, pb, pa, db, da
        sb, so = self.shape_of(b), self.shape_of(node)
        if pb is None or pa is not None or sb is None or so is None or not isinstance(db, list):
            self.notes.append(f"{node.name}: tensordot without exactly one weight; skipped")
            return
        nd = len(sb)
        contracted = {int(d) % nd for d in db}
        in_f = _prod(sb[d] for d in contracted)
        out_f = _prod(sb[d] for d in range(nd) if d not in contracted)
        rows = max(1, _prod(so) // max(1, out_f))
        self._weight_site_dims(node, a, pb, in_f, out_f, rows, None, (in_f, out_f))

    def sdpa_site(self, node: fx.Node) -> None:
        args = list(node.args) + [None] * 3
        q = args[0] if isinstance(args[0], fx.Node) else node.kwargs.get("query")
        k = args[1] if isinstance(args[1], fx.Node) else node.kwargs.get("key")
        v = args[2] if isinstance(args[2], fx.Node) else node.kwargs.get("value")
        sq, sk, sv = self.shape_of(q), self.shape_of(k), self.shape_of(v)
        if sq is None or sk is None or sv is None:
            self.notes.append(f"{node.name}: attention shapes unknown; skipped")
            return
        self.attn_sites(node, q=sq, k_len=int(sk[-2]), v_dim=int(sv[-1]), scope=self.scope_of(node))

    def node_op(self, node: fx.Node) -> str | None:
        """'linear' | 'matmul' | 'addmm' | 'baddbmm' | 'sdpa' for GEMM nodes."""
        if node.op == "call_function":
            t = node.target
            if t in (F.linear, torch._C._nn.linear):
                return "linear"
            if t in (torch.matmul, operator.matmul, torch.mm, torch.bmm, torch.mv):
                return "matmul"
            if t is torch.addmm:
                return "addmm"
            if t is torch.baddbmm:
                return "baddbmm"
            if t is F.scaled_dot_product_attention:
                return "sdpa"
            if t is torch.einsum:
                return "einsum"
            if isinstance(t, torch._ops.OpOverload):
                n = _op_name(node)
                if n == "linear":
                    return "linear"
                if n in ("matmul", "mm", "bmm", "mv"):
                    return "matmul"
                if n == "addmm":
                    return "addmm"
                if n == "baddbmm":
                    return "baddbmm"
                if n == "scaled_dot_product_attention" or (
                    n.startswith("_scaled_dot_product_") and "backward" not in n
                ):  # the fused variants appear in decomposed graphs (older torch.export)
                    return "sdpa"
                if n == "einsum":
                    return "einsum"
                if n == "tensordot":
                    return "tensordot"
        elif node.op == "call_method":
            n = str(node.target)
            if n in ("matmul", "mm", "bmm", "__matmul__", "mv"):
                return "matmul"
            if n == "__rmatmul__":
                return "rmatmul"
            if n == "addmm":
                return "addmm"
        return None

    def analyze_op(self, node: fx.Node) -> bool:
        op = self.node_op(node)
        if op is None:
            return False
        a = node.args
        kw = node.kwargs
        if op == "linear":
            x = a[0] if a else kw.get("input")
            w = a[1] if len(a) > 1 else kw.get("weight")
            b = a[2] if len(a) > 2 else kw.get("bias")
            pname = self.resolve_weight(w)
            if pname is None:
                self.notes.append(f"{node.name}: linear with a non-parameter weight; skipped")
                return True
            self.weight_site(node, x, w, pname, w_is_linear=True, w_first=False, bias_node=b)
        elif op == "matmul":
            self.matmul_site(node, a[0], a[1])
        elif op == "rmatmul":
            self.matmul_site(node, a[1], a[0])
        elif op == "addmm":
            self.matmul_site(node, a[1], a[2], bias=a[0])
        elif op == "baddbmm":
            self.matmul_site(node, a[1], a[2])
        elif op == "sdpa":
            self.sdpa_site(node)
        elif op == "einsum":
            self.einsum_site(node)
        elif op == "tensordot":
            self.tensordot_site(node)
        return True


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------
def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TraceError(
        f"example inputs must be a Tensor, a tuple or a dict, got {type(example_inputs).__name__}"
    )


def _describe_inputs(args: tuple, kwargs: dict) -> str:
    def d(v: Any) -> str:
        return "x".join(map(str, v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__

    parts = [d(v) for v in args] + [f"{k}={d(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------
# Errors: one line, with the module the failure happened in
# ---------------------------------------------------------------------------------------
def _first_line(e: BaseException, limit: int = 160) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = lines[0] if lines else type(e).__name__
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return f"{type(e).__name__}: {msg}"


def _where(e: BaseException, params: _Params) -> str:
    """' in <module> (<Type>, file:line)': the innermost module of the model whose code was
    running when ``e`` was raised ('' if none)."""
    ids = {}
    for n, m in params.modules.items():
        ids.setdefault(id(m), n)
    where = None
    tb = e.__traceback__
    while tb is not None:
        s = tb.tb_frame.f_locals.get("self")
        if isinstance(s, nn.Module) and id(s) in ids:
            code = tb.tb_frame.f_code
            name = ids[id(s)] or "<root>"
            where = (
                f" in '{name}' ({type(s).__name__}, "
                f"{code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno})"
            )
        tb = tb.tb_next
    return where or ""


# ---------------------------------------------------------------------------------------
# fx
# ---------------------------------------------------------------------------------------
class _LeafTracer(fx.Tracer):
    """Keeps Linear-likes as leaves, traces into torch.nn containers that hold one."""

    def __init__(self) -> None:
        super().__init__()
        self._holds: dict[int, bool] = {}

    def _holds_linear_like(self, m: nn.Module) -> bool:
        key = id(m)
        if key not in self._holds:
            self._holds[key] = any(is_linear_like(c) for c in m.modules())
        return self._holds[key]

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_linear_like(m):
            return True
        if self._holds_linear_like(m):
            return False
        return super().is_leaf_module(m, module_qualified_name)


def _signature_values(model: nn.Module, args: tuple, kwargs: dict) -> tuple[list, dict]:
    """Forward's arguments in order (defaults filled), and concrete args for the tracer."""
    sig = inspect.signature(model.forward)
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TraceError(f"forward of {type(model).__name__} takes *args/**kwargs")
    bound = sig.bind(*args, **kwargs)
    given = set(bound.arguments)
    bound.apply_defaults()
    concrete = {k: v for k, v in bound.arguments.items() if k not in given}
    return list(bound.arguments.values()), concrete


def _fx_analyze(
    model: nn.Module, args: tuple, kwargs: dict, params: _Params
) -> tuple[fx.GraphModule, list[_Site], list[str], dict[int, str]]:
    from torch.fx.passes.shape_prop import ShapeProp

    values, concrete = _signature_values(model, args, kwargs)
    tracer = _LeafTracer()
    graph = tracer.trace(model, concrete_args=concrete or None)
    gm = fx.GraphModule(model, graph, type(model).__name__)
    recorder = _GemmRecorder(params)
    with recorder:
        ShapeProp(gm).propagate(*values)

    def shape_of(n: Any) -> tuple[int, ...] | None:
        if not isinstance(n, fx.Node):
            return None
        tm = n.meta.get("tensor_meta")
        shp = getattr(tm, "shape", None)
        return tuple(int(s) for s in shp) if shp is not None else None

    def param_of_node(n: fx.Node) -> str | None:
        if n.op == "get_attr" and str(n.target) in params.by_name:
            return str(n.target)
        return None

    def scope_of(n: fx.Node) -> str:
        st = n.meta.get("nn_module_stack")
        if st:
            return list(st.values())[-1][0]
        return ""

    def module_of_call(n: fx.Node) -> nn.Module | None:
        if n.op == "call_module":
            return params.modules.get(str(n.target))
        return None

    an = _Analyzer(
        gm,
        params,
        shape_of=shape_of,
        param_of_node=param_of_node,
        scope_of=scope_of,
        module_of_call=module_of_call,
    )
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = params.modules.get(str(node.target))
            kind = _module_kind(m) if m is not None else None
            if kind in ("linear", "conv1d"):
                _fx_linear_site(an, node, m, kind)  # type: ignore[arg-type]
            elif kind == "mha":
                _fx_mha_sites(an, node, m)  # type: ignore[arg-type]
        else:
            an.analyze_op(node)
    return gm, an.sites, an.notes, recorder.used


def _fx_linear_site(an: _Analyzer, node: fx.Node, m: nn.Module, kind: str) -> None:
    qn = str(node.target)
    x = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    xs = an.shape_of(x)
    if kind == "linear":
        in_f, out_f = m.in_features, m.out_features
    else:
        in_f, out_f = int(m.weight.shape[0]), int(m.weight.shape[1])
    rows = _prod(xs) // in_f if xs else 1
    has_bias = getattr(m, "bias", None) is not None
    token = an.transposed_input(x)
    if token:
        an.token_nodes.add(node)
    pid = id(m.weight)
    an.sites.append(
        _Site(
            name=qn,
            in_f=int(in_f),
            out_f=int(out_f),
            rows=max(1, rows),
            weight_pid=pid,
            kind=kind,
            module=qn,
            weight=an.params.name_under(pid, qn),
            bias=f"{qn}.bias" if has_bias else None,
            has_bias=has_bias,
            token_hint=token,
        )
    )


def _fx_mha_sites(an: _Analyzer, node: fx.Node, m: nn.MultiheadAttention) -> None:
    qn = str(node.target)
    try:
        b = inspect.signature(type(m).forward).bind(m, *node.args, **node.kwargs)
    except TypeError:
        an.notes.append(f"{qn}: could not read the MultiheadAttention call; skipped")
        return
    q, k = b.arguments.get("query"), b.arguments.get("key")
    sq, sk = an.shape_of(q), an.shape_of(k)
    if sq is None or sk is None:
        an.notes.append(f"{qn}: MultiheadAttention input shapes unknown; skipped")
        return
    if len(sq) == 2:
        B, L, S = 1, sq[0], sk[0]
    elif m.batch_first:
        B, L, S = sq[0], sq[1], sk[1]
    else:
        L, B, S = sq[0], sq[1], sk[0]
    E, H = m.embed_dim, m.num_heads
    hd = E // H
    pre = f"{qn}."
    has_in_bias = m.in_proj_bias is not None
    in_bias = pre + "in_proj_bias" if has_in_bias else None
    if m._qkv_same_embed_dim:
        pid = id(m.in_proj_weight)
        total = B * L + 2 * B * S
        an.sites.append(
            _Site(
                f"{qn}.in_proj",
                E,
                3 * E,
                max(1, round(total / 3)),
                weight_pid=pid,
                kind="mha_in_proj",
                module=qn,
                weight=an.params.name_under(pid, qn),
                bias=in_bias,
                has_bias=has_in_bias,
                is_mha=True,
            )
        )
    else:
        for leaf, dim, r in (
            ("q_proj", E, B * L),
            ("k_proj", m.kdim, B * S),
            ("v_proj", m.vdim, B * S),
        ):
            w = getattr(m, f"{leaf}_weight")
            an.sites.append(
                _Site(
                    f"{qn}.{leaf}",
                    int(dim),
                    E,
                    r,
                    weight_pid=id(w),
                    kind="mha_in_proj",
                    module=qn,
                    weight=an.params.name_under(id(w), qn),
                    bias=in_bias,
                    has_bias=has_in_bias,
                    is_mha=True,
                )
            )
    s_eff = S + (1 if m.bias_k is not None else 0) + (1 if m.add_zero_attn else 0)
    an.attn_sites(node, q=(B, H, L, hd), k_len=s_eff, v_dim=hd, scope=qn, heads=H, via="mha")
    op = m.out_proj
    pid = id(op.weight)
    has_b = op.bias is not None
    an.sites.append(
        _Site(
            f"{qn}.out_proj",
            E,
            E,
            B * L,
            weight_pid=pid,
            kind="linear",
            module=f"{qn}.out_proj",
            weight=an.params.name_under(pid, f"{qn}.out_proj"),
            bias=f"{qn}.out_proj.bias" if has_b else None,
            has_bias=has_b,
            is_mha=True,
        )
    )


# ---------------------------------------------------------------------------------------
# torch.export
# ---------------------------------------------------------------------------------------
class _Flat(nn.Module):
    """Wraps the model so that export sees only tensors in its output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, *args, **kwargs):
        out = self.m(*args, **kwargs)
        return tuple(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def _strip(path: str) -> str:
    if path == "m":
        return ""
    return path[2:] if path.startswith("m.") else path


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export logs whole graphs when it gives up; our error line says it instead."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.export", "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    sink = io.StringIO()  # it also prints the graph it gave up on
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _export_analyze(
    model: nn.Module, args: tuple, kwargs: dict, params: _Params
) -> tuple[list[_Site], list[str]]:
    with _quiet_torch_logs():
        ep = torch.export.export(_Flat(model), args, kwargs, strict=False)
    in2p = {k: _strip(v) for k, v in ep.graph_signature.inputs_to_parameters.items()}
    gm = ep.graph_module

    def shape_of(n: Any) -> tuple[int, ...] | None:
        if not isinstance(n, fx.Node):
            return None
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            try:
                return tuple(int(s) for s in v.shape)
            except (TypeError, ValueError):
                return None
        return None

    def param_of_node(n: fx.Node) -> str | None:
        if n.op == "placeholder" and n.name in in2p:
            return in2p[n.name]
        return None

    def scope_of(n: fx.Node) -> str:
        st = n.meta.get("nn_module_stack")
        if st:
            return _strip(list(st.values())[-1][0])
        return ""

    an = _Analyzer(
        gm,
        params,
        shape_of=shape_of,
        param_of_node=param_of_node,
        scope_of=scope_of,
        module_of_call=lambda n: None,
    )
    for node in gm.graph.nodes:
        an.analyze_op(node)
    return an.sites, an.notes


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------
def _missing(used: dict[int, str], sites: list[_Site], params: _Params) -> list[str]:
    bound = {s.weight_pid for s in sites if s.weight_pid is not None}
    return [f"{params.canon[pid]} ({fn})" for pid, fn in used.items() if pid not in bound]


def trace(
    model: nn.Module,
    example_inputs: tuple | dict | torch.Tensor,
    *,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
    method: str = "auto",
) -> TraceResult:
    """Build the schema of ``model`` on ``example_inputs`` (see the module doc).

    ``example_inputs``: a Tensor (one positional input), a tuple (positional inputs) or a
    dict (keyword inputs). ``method``: ``'auto'`` (fx, then export if fx fails or misses a
    weight GEMM), ``'fx'`` or ``'export'`` (only that one; no fallback). Raises
    :class:`TraceError` when nothing traces.
    """
    if method not in ("auto", "fx", "export"):
        raise TraceError(f"trace method must be auto, fx or export, got {method!r}")
    say = progress or (lambda _msg: None)
    args, kwargs = _split_inputs(example_inputs)
    name = name or type(model).__name__
    params = _Params(model)
    notes: list[str] = []
    leaves = pytree.tree_leaves((args, kwargs))
    desc_inputs = _describe_inputs(args, kwargs)

    def finish(how: str, sites: list[_Site], extra: list[str], gm: fx.GraphModule | None):
        notes.extend(extra)
        if not sites:
            why = f" ({notes[-1]})" if notes else ""
            raise TraceError(f"tracing {name} with {how} found no GEMM{why}; {YAML_HINT}")
        schema, bindings, attention = _build_schema(
            sites, params, name, how, f"traced with {how} on inputs ({desc_inputs})"
        )
        for b in bindings.values():
            b.unsupported = _weight_read_by_owner(model, b)
        if is_hf_model(model):
            why = hf_attention_unsupported(model)
            attention = {k: AttentionSite("hf", v.nodes, why) for k, v in attention.items()}
        say(f"traced {name} with {how}: {len(schema)} GEMMs")
        return TraceResult(schema, bindings, how, gm, notes, attention)

    def fail(errors: list[str]) -> TraceError:
        return TraceError(f"cannot trace {name}: {'; '.join(errors)}; {YAML_HINT}")

    # 1. fx
    errors: list[str] = []
    fx_out = None
    fx_missing: list[str] = []
    used: dict[int, str] | None = None
    if method in ("auto", "fx"):
        say("tracing with torch.fx")
        try:
            with _preserved(model, leaves):
                fx_out = _fx_analyze(model, args, kwargs, params)
        except Exception as e:  # noqa: BLE001 - any failure means: try export
            errors.append(f"fx failed{_where(e, params)}: {_first_line(e)}")
            notes.append(errors[-1])
            say(errors[-1])
            if method == "fx":
                raise fail(errors) from None
    if fx_out is not None:
        gm, fx_sites, fx_notes, used = fx_out
        fx_missing = _missing(used, fx_sites, params)
        if not fx_missing or method == "fx":
            if fx_missing:
                notes.append("fx missed weight GEMMs: " + ", ".join(fx_missing))
            return finish("fx", fx_sites, fx_notes, gm)
        notes.append("fx missed weight GEMMs: " + ", ".join(fx_missing))
        say(notes[-1] + "; trying torch.export")

    # 2. export
    say("tracing with torch.export (non-strict)")
    try:
        with _preserved(model, leaves):
            ex_sites, ex_notes = _export_analyze(model, args, kwargs, params)
    except Exception as e:  # noqa: BLE001
        errors.append(f"torch.export failed{_where(e, params)}: {_first_line(e)}")
        notes.append(errors[-1])
        say(errors[-1])
        if fx_out is not None:  # fx traced but missed some weights: better than nothing
            return finish("fx", fx_out[1], fx_out[2], fx_out[0])
        raise fail(errors) from None
    if used is None:  # ground truth from one real run
        try:
            rec = _GemmRecorder(params)
            with _preserved(model, leaves), rec:
                model(*args, **kwargs)
            used = rec.used
        except Exception as e:  # noqa: BLE001
            notes.append(f"coverage check skipped: the model failed to run ({_first_line(e)})")
            used = {}
    ex_missing = _missing(used, ex_sites, params)
    if ex_missing:
        notes.append("torch.export missed weight GEMMs: " + ", ".join(ex_missing))
        say(notes[-1])
        if fx_out is not None and len(fx_missing) < len(ex_missing):
            return finish("fx", fx_out[1], fx_out[2], fx_out[0])
    return finish("export", ex_sites, ex_notes, None)
