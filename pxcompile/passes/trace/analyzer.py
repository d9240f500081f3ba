"""Graph analysis common to fx (torch-level) and export (aten-level) graphs: turns GEMM nodes
into sites (weight GEMMs, attention scores/values).

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
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ...schema import LayerType
from .layer_types import is_linear_like, module_kind
from .sites import (
    PASS_OPS,
    SCORE_PASS,
    WEIGHT_VIEW_OPS,
    Params,
    Site,
    op_name,
    prod,
    tensor_inputs,
)

_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "nhead", "heads")


def _heads_from_modules(params: Params, scope: str, lead: int) -> int | None:
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


# ---------------------------------------------------------------------------------------
# Graph analysis (common to fx and export graphs)
# ---------------------------------------------------------------------------------------
def _spell_ellipsis(
    eq: str, subs: list[str], out: str, shapes: tuple[tuple[int, ...], ...]
) -> tuple[list[str], str] | None:
    """An einsum's ``...`` spelled out as letters unused in ``eq``, given the operands'
    shapes (broadcast dims align right): ``"...i,oi->...o"`` on 3-D x -> ``"ABi,oi->ABo"``."""
    dims = [len(shp) - (len(s) - 3) for s, shp in zip(subs, shapes) if "..." in s]
    if not dims or min(dims) < 0:
        return None
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq]
    ell = "".join(free[: max(dims)])
    spelled = []
    for s, shp in zip(subs, shapes):
        if "..." in s:
            k = len(shp) - (len(s) - 3)
            s = s.replace("...", ell[len(ell) - k :])
        spelled.append(s)
    return spelled, out.replace("...", ell)


class Analyzer:
    """Turns GEMM nodes of an fx graph (torch-level or aten-level) into sites."""

    def __init__(
        self,
        gm: fx.GraphModule,
        params: Params,
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
        self.sites: list[Site] = []
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
        if node.op in ("call_function", "call_method") and op_name(node) in WEIGHT_VIEW_OPS:
            ins = tensor_inputs(node)
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
        return "softmax" in op_name(node)

    def from_softmax(self, node: Any, depth: int = 0) -> bool:
        if not isinstance(node, fx.Node) or depth > 8:
            return False
        if self._is_softmax(node):
            return True
        passthrough = (
            node.op in ("call_function", "call_method") and op_name(node) in SCORE_PASS
        ) or (node.op == "call_module" and isinstance(self.module_of_call(node), nn.Dropout))
        if passthrough:
            return any(self.from_softmax(a, depth + 1) for a in tensor_inputs(node))
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
                        op_name(u) in SCORE_PASS or op_name(u) in ("view", "reshape")
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
        ins = tensor_inputs(node)
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
        op = op_name(node)
        if op in ("transpose", "swapaxes", "swapdims", "permute", "mt"):
            shp = self.shape_of(ins[0])
            if shp is None or len(shp) < 3:
                return False
            if self._swaps_last_two(node, op, len(shp)):
                return not self.transposed_input(ins[0], depth + 1)
            return False
        if op in PASS_OPS:
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
        rows = max(1, prod(oshape) // max(1, out_f))
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
        okind = module_kind(owner_mod) if owner_mod is not None else None
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
            Site(
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
        rows = prod(q[:-1])
        if heads is None:
            if len(q) >= 4:
                heads = int(q[-3])
            else:
                lead = prod(q[:-2]) if len(q) >= 3 else 1
                heads = _heads_from_modules(self.params, scope, lead)
        base = scope or node.name
        if "scores" in which:
            self.sites.append(
                Site(
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
                Site(
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
        rows = prod(so[:-1])
        seq = in_f if kind == "values" else out_f
        if len(so) >= 4:
            heads = int(so[-3])
        else:
            heads = _heads_from_modules(self.params, scope, prod(so[:-2]) if len(so) >= 3 else 1)
        base = scope or node.name
        ltype = LayerType.ATTN_VALUES if kind == "values" else LayerType.ATTN_SCORES
        self.sites.append(
            Site(
                f"{base}.{kind}", in_f, out_f, rows, ltype=ltype, heads=heads, seq=seq, via="chain"
            )
        )

    def einsum_site(self, node: fx.Node) -> None:
        """Two-operand einsum: a weight GEMM if one operand is a parameter, else attention."""
        eq = node.args[0] if node.args else node.kwargs.get("equation")
        ops = list(node.args[1:])
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        if not isinstance(eq, str) or len(ops) != 2 or "->" not in eq:
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
        if "..." in eq:
            spelled = _spell_ellipsis(eq, subs, out_sub, (sa, sb))
            if spelled is None:
                self.notes.append(f"{node.name}: einsum {eq!r} not understood; skipped")
                return
            subs, out_sub = spelled
        size = dict(zip(subs[0], sa))
        size.update(zip(subs[1], sb))
        in_f = prod(size[c] for c in subs[1] if c in subs[0] and c not in out_sub)
        out_f = prod(size[c] for c in subs[1] if c in out_sub and c not in subs[0])
        rows = max(1, prod(so) // max(1, out_f))
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
            Site(
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
        in_f = prod(sb[d] for d in contracted)
        out_f = prod(sb[d] for d in range(nd) if d not in contracted)
        rows = max(1, prod(so) // max(1, out_f))
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
                n = op_name(node)
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
