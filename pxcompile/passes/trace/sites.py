"""GEMM sites shared by the fx and export captures: parameter identity, the coverage
recorder, sites and their merging into the schema, graph helpers, and the HF-specific checks.

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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ...schema import Gemm, LayerType, ModelSchema
from .layer_types import classify
from .result import AttentionSite, GemmBinding


# ---------------------------------------------------------------------------------------
# Hugging Face checks
# ---------------------------------------------------------------------------------------
def is_hf_model(model: nn.Module | None) -> bool:
    """Does ``model`` contain a Hugging Face ``PreTrainedModel``?"""
    if model is None:
        return False
    return any(
        any(c.__name__ == "PreTrainedModel" for c in type(m).__mro__) for m in model.modules()
    )


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


# ---------------------------------------------------------------------------------------
# Parameter identity (storage based: views, slices and tied weights resolve)
# ---------------------------------------------------------------------------------------
class Params:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.aliases: dict[int, list[str]] = {}  # id(param) -> all qualified names
        self.by_name: dict[str, nn.Parameter] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            self.aliases.setdefault(id(p), []).append(n)
            self.by_name[n] = p
        self.canon = {pid: names[0] for pid, names in self.aliases.items()}
        # storage -> [(start, end, pid)], GEMM-capable params only (2-D or more)
        self.ranges: dict[Any, list[tuple[int, int, int]]] = {}
        seen: set[int] = set()
        for p in self.by_name.values():
            if id(p) in seen or p.dim() < 2 or p.numel() == 0 or _is_fake(p):
                continue
            seen.add(id(p))
            sp = _storage_key(p)
            if sp is None:
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
        cands = self.ranges.get(_storage_key(t))
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
    """A tensor of export's tracing (fake or functional): not one of the model's weights."""
    return type(t).__name__ in ("FakeTensor", "FunctionalTensor")


def _storage_key(t: torch.Tensor) -> Any:
    """What identifies ``t``'s storage: its data pointer, or for a tensor on the ``meta``
    device (no data; ``data_ptr()`` is then the byte offset in the storage) the storage
    object itself, so a model built without weights resolves views and tied weights alike."""
    try:
        st = t.untyped_storage()
        return ("meta", st._cdata) if t.device.type == "meta" else st.data_ptr()
    except Exception:  # noqa: BLE001 - exotic tensor subclasses
        return None


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


class GemmRecorder(TorchFunctionMode):
    def __init__(
        self, params: Params, on_call: Callable[[Any, tuple, dict], None] | None = None
    ) -> None:
        super().__init__()
        self.params = params
        self.used: dict[int, str] = {}  # pid -> function name
        self.on_call = on_call  # sees every call too (how each weight is used: weight_uses.py)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fname = getattr(func, "__name__", "")
        if fname in _GEMM_FUNC_NAMES:
            for t in pytree.tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor):
                    pid = self.params.pid_of_tensor(t)
                    if pid is not None:
                        self.used.setdefault(pid, fname)
        if self.on_call is not None:
            self.on_call(func, args, kwargs)
        return func(*args, **kwargs)


@contextmanager
def preserved(model: nn.Module, tensors: list[torch.Tensor]):
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
class Site:
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


def prod(xs) -> int:
    return int(math.prod(int(x) for x in xs))


# --- graph helpers shared by the fx and export analyses ---------------------------------
PASS_OPS = {
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
SCORE_PASS = PASS_OPS | {
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
WEIGHT_VIEW_OPS = {
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


def op_name(node: fx.Node) -> str:
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


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, fx.Node)]


# ---------------------------------------------------------------------------------------
# Merging sites into the schema
# ---------------------------------------------------------------------------------------
def build_schema(
    sites: list[Site], params: Params, name: str, method: str, description: str
) -> tuple[ModelSchema, dict[str, GemmBinding], dict[str, AttentionSite]]:
    weight_site_names = {s.name for s in sites if s.weight_pid is not None}
    groups: dict[str, list[Site]] = {}
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
