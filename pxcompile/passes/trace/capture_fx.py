"""The torch.fx capture: a tracer that keeps Linear-likes as leaves, one ShapeProp run under
the coverage recorder, and the analysis of the fx graph into sites."""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch.fx as fx
import torch.nn as nn

from ...errors import TraceError
from .analyzer import Analyzer
from .layer_types import is_linear_like, module_kind
from .sites import GemmRecorder, Params, Site, prod
from .weight_uses import WeightUses


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


def fx_analyze(
    model: nn.Module, args: tuple, kwargs: dict, params: Params, uses: WeightUses | None = None
) -> tuple[fx.GraphModule, list[Site], list[str], dict[int, str]]:
    """The fx graph, its sites and notes, and the weights its run took to GEMMs (pid ->
    function). ``uses``, when given, records how the run used each weight."""
    from torch.fx.passes.shape_prop import ShapeProp

    values, concrete = _signature_values(model, args, kwargs)
    tracer = _LeafTracer()
    attrs = set(vars(model))
    graph = tracer.trace(model, concrete_args=concrete or None)
    gm = fx.GraphModule(model, graph, type(model).__name__)
    # fx put the tensors it lifted out of the forward (torch.arange(...) in an index) on the
    # model itself; ``gm`` holds them now, and the user's model stays as it was.
    for k in set(vars(model)) - attrs:
        delattr(model, k)
    recorder = GemmRecorder(params, None if uses is None else uses.record)
    current: list[fx.Node] = []

    def scope_of(n: fx.Node) -> str:
        st = n.meta.get("nn_module_stack")
        if st:
            return list(st.values())[-1][0]
        return ""

    class _Prop(ShapeProp):  # remembers the running node: the module a weight's use is in
        def run_node(self, n: fx.Node) -> Any:
            current[:] = [n]
            return super().run_node(n)

    if uses is not None:
        uses.scope = lambda: scope_of(current[0]) if current else ""
    try:
        with recorder:
            _Prop(gm).propagate(*values)
    finally:
        if uses is not None:
            uses.scope = None

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

    def module_of_call(n: fx.Node) -> nn.Module | None:
        if n.op == "call_module":
            return params.modules.get(str(n.target))
        return None

    an = Analyzer(
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
            kind = module_kind(m) if m is not None else None
            if kind in ("linear", "conv1d"):
                _fx_linear_site(an, node, m, kind)  # type: ignore[arg-type]
            elif kind == "mha":
                _fx_mha_sites(an, node, m)  # type: ignore[arg-type]
        else:
            an.analyze_op(node)
    return gm, an.sites, an.notes, recorder.used


def _fx_linear_site(an: Analyzer, node: fx.Node, m: nn.Module, kind: str) -> None:
    qn = str(node.target)
    x = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    xs = an.shape_of(x)
    if kind == "linear":
        in_f, out_f = m.in_features, m.out_features
    else:
        in_f, out_f = int(m.weight.shape[0]), int(m.weight.shape[1])
    rows = prod(xs) // in_f if xs else 1
    has_bias = getattr(m, "bias", None) is not None
    token = an.transposed_input(x)
    if token:
        an.token_nodes.add(node)
    pid = id(m.weight)
    an.sites.append(
        Site(
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


def _fx_mha_sites(an: Analyzer, node: fx.Node, m: nn.MultiheadAttention) -> None:
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
            Site(
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
                Site(
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
        Site(
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


def depends_on_mode(model: nn.Module, graph: fx.Graph, args: tuple, kwargs: dict) -> bool:
    """Whether ``model`` traced with every module's train/eval mode flipped gives another
    graph than ``graph``: code that branches on ``self.training`` (stochastic depth such as
    timm's ``DropPath``, ``F.dropout(x, p, self.training)``) was traced through and its branch
    baked in, so ``graph`` is right in one mode only. The modes are put back."""
    _, concrete = _signature_values(model, args, kwargs)
    modes = [(m, m.training) for m in model.modules()]
    attrs = set(vars(model))
    try:
        for m, training in modes:
            m.training = not training
        other = _LeafTracer().trace(model, concrete_args=concrete or None)
    except Exception:  # noqa: BLE001 - traces in one mode only: that graph is mode-bound too
        return True
    finally:
        for m, training in modes:
            m.training = training
        for k in set(vars(model)) - attrs:  # constants fx lifted onto the model for this graph
            delattr(model, k)
    # fx numbers the constant tensors it lifts on from those an earlier trace left on the model
    return _code(other) != _code(graph)


def _code(graph: fx.Graph) -> str:
    return re.sub(r"_tensor_constant\d+", "_tensor_constant", graph.python_code("self").src)
