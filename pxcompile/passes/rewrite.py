"""The rewrite pass: model + Plan -> a ``torch.fx.GraphModule`` with sparse layers.

Every GEMM the plan makes sparse becomes a :class:`~pxcompile.layers.PixelflyLinear` that
stores only its kept blocks and low-rank factors; its dense weight is gone from the result.
How a GEMM is reached comes from the trace pass's bindings:

* ``linear`` / ``conv1d``: the module (``nn.Linear``, HF ``Conv1D`` whose weight is stored
  ``[in, out]``) is swapped for a PixelflyLinear with the same qualified name;
* ``mha_in_proj``: the ``nn.MultiheadAttention`` is swapped for
  :class:`~pxcompile.mha.ProjectedMultiheadAttention`, whose packed in-projection and
  out-projection are modules (sparse or not, each as the plan says);
* ``functional`` / ``functional_op`` (a weight used through ``F.linear``, ``@``, ``matmul``,
  ``einsum``, ``addmm``...; :func:`weight_target` says where its layer goes): a weight owned by
  an ``nn.Linear`` / ``Conv1D`` swaps that module, whose ``.weight`` is then a
  :class:`~pxcompile.nn.weight.PixelflyWeight` that runs the sparse kernel wherever the model
  uses it; a bare ``nn.Parameter`` ``<owner>.<w>`` gets a PixelflyLinear ``<owner>.<w>_pixelfly``
  (built in the orientation its GEMMs take it in), and the attribute ``<owner>.<w>`` becomes
  that layer's PixelflyWeight. Both work in fx-traced models (the graph reads the weight from
  the layer) and in models fx can't trace alike. A weight whose dense values the model uses
  (``w.norm()``, a slice; the trace records it) stays dense, with that reason.

The user's model is deep-copied first unless ``inplace=True``. With an fx trace the result's
graph is the traced graph (Linear-likes as module calls); a model fx cannot trace (Hugging Face
models) comes back as a :class:`~pxcompile.hf.ModelView`: a GraphModule whose graph calls the
rewritten model as one module ``model`` and whose unknown public attributes resolve on it, so a
sparsified Hugging Face model keeps ``generate``, ``config``, ``device``... (it stays a
GraphModule, as every rewrite result is; ``save_pretrained`` raises, pointing to
``pxcompile.save``). See :mod:`pxcompile.hf`.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..errors import PlanError, PxError
from ..hf import ModelView
from ..layers import PixelflyLinear
from ..mha import ProjectedMultiheadAttention, unsupported_reason
from ..patterns import AttentionSpec
from ..plans import LayerPlan, Plan
from ..policy import DEFAULT_ATTENTION_MIN_SEQ
from .trace import AttentionSite, GemmBinding, TraceResult, is_hf_model
from .trace.layer_types import module_kind

ProgressFn = Callable[[str], None]
_LIFTED = re.compile(r"_tensor_constant\d+")  # fx.Tracer's name for a lifted tensor


@dataclass
class RewriteResult:
    module: fx.GraphModule
    init_errors: dict[str, float] = field(default_factory=dict)  # relative Frobenius error
    layers: dict[str, str] = field(default_factory=dict)  # GEMM name -> path in ``module``


def rewritable(binding: GemmBinding, model: nn.Module | None, method: str) -> str | None:
    """Why the GEMM behind ``binding`` can't be rewritten (None if it can). Every weight is
    reachable whichever way (``method``: fx or export) the model was traced."""
    owner = None if model is None else _mha_of(model, binding)
    if owner is not None:
        return unsupported_reason(model.get_submodule(owner))
    if binding.kind not in ("linear", "conv1d", "mha_in_proj", "functional", "functional_op"):
        return f"no rewrite for GEMMs of kind {binding.kind!r}"
    if model is not None and binding.kind.startswith("functional"):
        w = model.get_parameter(binding.weight)
        if w.dim() != 2:
            return f"a {w.dim()}-D weight (a stack of matrices) has no Pixelfly layer"
    return binding.unsupported


def attention_reachable(site: AttentionSite, method: str) -> str | None:
    """Why the attention core behind an attention GEMM can't be made Pixelfly attention
    (None if it can)."""
    if site.unsupported:
        return site.unsupported
    if site.via == "hf":  # the trace marks every attention call of a Hugging Face model
        return None
    if site.via == "sdpa":
        if method == "fx" and site.nodes:
            return None
        return "an SDPA call in a model fx cannot trace (export graphs are not rewritten)"
    if site.via == "mha":
        return "nn.MultiheadAttention's attention core is not replaced (only its projections)"
    return (
        "attention written out as matmul, softmax, matmul: pxcompile replaces "
        "F.scaled_dot_product_attention calls and Hugging Face attention"
    )


def _mha_of(model: nn.Module, binding: GemmBinding) -> str | None:
    """The nn.MultiheadAttention this GEMM belongs to (its packed in_proj or its out_proj
    Linear), if any."""
    if binding.kind == "mha_in_proj":
        return binding.module
    if binding.kind != "linear" or not binding.module:
        return None
    parent = binding.module.rpartition(".")[0]
    try:
        p = model.get_submodule(parent)
    except AttributeError:
        return None
    return parent if isinstance(p, nn.MultiheadAttention) else None


@dataclass(frozen=True)
class WeightTarget:
    """Where the sparse layer of one weight GEMM goes, and what it replaces."""

    path: str  # the module the layer replaces; for a bare parameter, where the layer is added
    weight: str  # the dense weight parameter it replaces
    bias: str | None  # the bias parameter it takes over (None: the layer has no bias)
    transposed: bool  # the weight is stored [in, out] (the layer is built from its transpose)
    bare: bool  # a bare nn.Parameter: its attribute becomes the layer's PixelflyWeight


def weight_target(model: nn.Module, b: GemmBinding) -> WeightTarget:
    """Where ``b``'s layer goes in ``model`` (the model as traced, before any rewrite)."""
    if b.kind in ("linear", "conv1d", "mha_in_proj"):
        return WeightTarget(b.module, b.weight, b.bias, b.kind == "conv1d", False)
    owner_path, _, leaf = b.weight.rpartition(".")
    owner = model.get_submodule(owner_path)
    kind = module_kind(owner)
    if leaf == "weight" and kind in ("linear", "conv1d"):  # swap the module itself
        bias = f"{owner_path}.bias" if getattr(owner, "bias", None) is not None else None
        return WeightTarget(owner_path, b.weight, bias, kind == "conv1d", False)
    name, k = f"{leaf}_pixelfly", 1
    while hasattr(owner, name):
        name, k = f"{leaf}_pixelfly{k}", k + 1
    path = f"{owner_path}.{name}" if owner_path else name
    # The bias (F.linear(x, w, b)) stays where it is: the weight's uses pass it themselves.
    return WeightTarget(path, b.weight, None, b.transposed, True)


def _dense_weight(model: nn.Module, t: WeightTarget) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The GEMM's weight in ``[out, in]`` layout and its bias."""
    w = model.get_parameter(t.weight)
    bias = model.get_parameter(t.bias) if t.bias else None
    return (w.t() if t.transposed else w), bias


def _install_bare(root: nn.Module, t: WeightTarget, layer: PixelflyLinear) -> None:
    """Add ``layer`` at ``t.path`` and make the parameter's attribute its PixelflyWeight (a
    plain attribute: the layer holds the parameters)."""
    owner_path, _, leaf = t.weight.rpartition(".")
    owner = root.get_submodule(owner_path)
    owner.add_module(t.path.rpartition(".")[2], layer)
    delattr(owner, leaf)  # the nn.Parameter
    setattr(owner, leaf, layer.weight_view(t.transposed))


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def rewrite(
    model: nn.Module,
    traced: TraceResult,
    plan: Plan,
    *,
    init: str = "dense",
    inplace: bool = False,
    progress: ProgressFn | None = None,
) -> RewriteResult:
    """Emit the sparsified GraphModule for ``model`` as ``plan`` says."""
    if init not in ("dense", "scratch"):
        raise ValueError(f"init must be 'dense' or 'scratch', got {init!r}")
    plan = plan.check_against(traced.schema)
    target = model if inplace else copy.deepcopy(model)
    errors: dict[str, float] = {}
    sparse: list[LayerPlan] = plan.sparse_weight_layers
    attention = attention_calls(plan, traced, target)
    made: dict[str, PixelflyLinear] = {}
    targets: dict[str, WeightTarget] = {}
    for k, lp in enumerate(sparse):
        b = traced.bindings.get(lp.name)
        if b is None:
            raise PlanError(f"plan: layer {lp.name!r} has no weight to rewrite")
        why = rewritable(b, target, traced.method)
        if why:
            raise PlanError(f"plan: layer {lp.name!r} can't be sparsified: {why}")
        if progress:
            progress(f"rewriting {lp.name} ({k + 1}/{len(sparse)})")
        targets[lp.name] = weight_target(target, b)
        w, bias = _dense_weight(target, targets[lp.name])
        if init == "dense" and not bool(torch.isfinite(w).all()):
            raise PxError(
                f"layer {lp.name!r}: its weight {b.weight!r} has NaN or inf values, so its "
                "kept blocks and low-rank fit would be too (fix the weight or use init='scratch')"
            )
        with torch.no_grad():
            layer = PixelflyLinear.from_dense(w, bias, lp.pattern, init=init)
            if lp.kernel:  # the CPU kernel the plan's cost model priced
                layer.execution = lp.kernel
        layer.train(target.get_submodule(b.module).training if b.module else target.training)
        if layer.init_error is not None:
            errors[lp.name] = layer.init_error
        made[lp.name] = layer

    # Where each new layer goes, decided before anything is swapped (a swap changes the
    # parents _mha_of looks at). A MultiheadAttention's projections go into its wrapper.
    mhas: dict[str, dict[str, nn.Module]] = {}
    views: dict[str, tuple[str, bool]] = {}  # weight -> (its layer, transposed): fx get_attrs
    paths: dict[str, str] = {}
    for name, layer in made.items():
        b = traced.bindings[name]
        owner = _mha_of(target, b)
        if owner is not None:
            part = "in_proj" if b.kind == "mha_in_proj" else "out_proj"
            mhas.setdefault(owner, {})[part] = layer
            paths[name] = f"{owner}.{part}" if owner else part
        else:
            t = targets[name]
            paths[name] = t.path
            views[t.weight] = (t.path, t.transposed)
            if t.bare:
                _install_bare(target, t, layer)
            else:  # its .weight reads as the module's did ([in, out] for Conv1D)
                layer.weight_transposed = t.transposed
                _set_submodule(target, t.path, layer)
    for mname, parts in mhas.items():
        mha = target.get_submodule(mname)
        in_proj = parts.get("in_proj") or _packed_linear(mha)
        out_proj = parts.get("out_proj") or mha.out_proj
        wrapper = ProjectedMultiheadAttention(mha, in_proj, out_proj)
        wrapper.train(mha.training)
        _set_submodule(target, mname, wrapper)
    if made:
        _no_fast_paths(target)

    if traced.method == "fx" and traced.graph_module is not None:
        attach_constants(target, traced.graph_module)
        gm = _rebuild_fx(target, traced.graph_module.graph, views)
    else:
        gm = _wrap(target)
        paths = {k: f"model.{v}" for k, v in paths.items()}
    if attention is not None:
        install_attention(gm, attention, plan, traced.method, root=_root(traced))
    # The copy kept every submodule's own mode (a user's frozen batch-norm stays in eval);
    # only the new root takes the model's.
    gm.training = model.training
    return RewriteResult(gm, errors, paths)


@dataclass
class AttentionCalls:
    spec: AttentionSpec
    nodes: list[str]  # fx SDPA nodes to replace
    scopes: list[str]  # modules owning them (Hugging Face attention modules)


def _root(traced: TraceResult) -> str:
    """Where the model sits in the rewritten GraphModule ('' when fx rebuilt its graph)."""
    return "" if traced.method == "fx" and traced.graph_module is not None else "model"


def attention_calls(plan: Plan, traced: TraceResult, target: nn.Module) -> AttentionCalls | None:
    """The plan's sparse attention, checked: one pattern for the model, scores and values of
    one call both sparse, and a core the rewrite can reach."""
    lps = plan.sparse_attention_layers
    if not lps:
        return None
    specs = {lp.attention for lp in lps}
    if len(specs) > 1:
        raise PlanError(
            "plan: sparse attention GEMMs use different patterns "
            f"({', '.join(sorted(str(s.to_dict()) for s in specs))}); one model takes one"
        )
    sparse = {lp.name for lp in lps}
    nodes: list[str] = []
    scopes: list[str] = []
    for lp in lps:
        site = traced.attention.get(lp.name)
        if site is None:
            raise PlanError(f"plan: layer {lp.name!r} is not an attention call of the model")
        why = attention_reachable(site, traced.method)
        if why:
            raise PlanError(f"plan: layer {lp.name!r} can't be sparsified: {why}")
        base, _, kind = lp.name.rpartition(".")
        other = f"{base}.{'values' if kind == 'scores' else 'scores'}"
        if other in traced.attention and other not in sparse:
            raise PlanError(
                f"plan: {lp.name!r} is sparse but {other!r} is dense; an attention call's "
                "scores and values take the same pattern"
            )
        nodes += [n for n in site.nodes if n not in nodes]
        if base not in scopes:
            scopes.append(base)
    return AttentionCalls(next(iter(specs)), nodes, scopes)  # type: ignore[arg-type]


def install_attention(
    module: nn.Module,
    calls: AttentionCalls,
    plan: Plan,
    method: str,
    *,
    root: str = "",
    reference: bool = False,
) -> None:
    """Make ``calls`` Pixelfly attention in ``module`` (``reference=True``: masked-dense
    attention with the same element mask). ``root``: where the traced model sits in
    ``module`` ('model' in a wrapping GraphModule)."""
    from ..attention import sparsify_attention

    min_seq = plan.policy.get("attention_min_seq", DEFAULT_ATTENTION_MIN_SEQ)
    if isinstance(min_seq, bool) or not isinstance(min_seq, int) or min_seq < 1:
        raise PlanError(
            f"plan: policy.attention_min_seq must be a positive integer, got {min_seq!r}"
        )
    modules: list[nn.Module] | None = []
    for scope in calls.scopes:
        path = ".".join(p for p in (root, scope) if p)
        try:
            modules.append(module.get_submodule(path))  # type: ignore[union-attr]
        except AttributeError:
            modules = None  # a call outside any module: all of the model's attention
            break
    if not is_hf_model(module):
        modules = None
    sparsify_attention(
        module,
        calls.spec,
        min_seq,
        reference=reference,
        nodes=calls.nodes if method == "fx" else [],
        modules=modules,
    )


def _no_fast_paths(target: nn.Module) -> None:
    """Turn off the inference fast paths of torch's Transformer layers that hold rewritten
    layers: they pass ``linear1.weight`` and friends to one fused kernel, which needs dense
    values (a PixelflyLinear's weight would be materialised; the MultiheadAttention wrapper
    has none). ``activation_relu_or_gelu`` is read only by those fast-path checks, so 0 turns
    them off and changes nothing else."""
    for m in target.modules():
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False
        if isinstance(m, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer) and any(
            isinstance(s, PixelflyLinear | ProjectedMultiheadAttention) for s in m.modules()
        ):
            m.activation_relu_or_gelu = 0


def _packed_linear(mha: nn.MultiheadAttention) -> nn.Linear:
    e = mha.embed_dim
    lin = nn.Linear(e, 3 * e, bias=mha.in_proj_bias is not None)
    lin.weight = mha.in_proj_weight
    if mha.in_proj_bias is not None:
        lin.bias = mha.in_proj_bias
    return lin


def attach_constants(root: nn.Module, traced: fx.GraphModule) -> None:
    """Give ``root`` the tensors fx lifted out of the forward while tracing (``torch.arange``
    in an index; fx names them ``_tensor_constant<i>``), which the traced GraphModule holds
    and the user's model does not keep, so that the traced graph can be built on ``root``."""
    for node in traced.graph.nodes:
        name = str(node.target)
        if node.op == "get_attr" and _LIFTED.fullmatch(name) and not hasattr(root, name):
            setattr(root, name, getattr(traced, name))


def _rebuild_fx(
    root: nn.Module, graph: fx.Graph, views: dict[str, tuple[str, bool]]
) -> fx.GraphModule:
    """The traced graph on the rewritten ``root``. A replaced weight the graph reads
    (``get_attr``: ``F.linear(x, self.qkv.weight)``, ``x @ self.w``) is read from its layer
    instead (``layer.weight_view(transposed)``), so the layer, not a copy of the weight
    object, is what the GraphModule holds (and what its copies and exports see)."""
    name = type(root).__name__ + "Pixelfly"
    graph = copy.deepcopy(graph)
    last = None
    for node in graph.nodes:
        if node.op == "placeholder":
            last = node
    layers: dict[str, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op != "get_attr" or node.target not in views:
            continue
        path, transposed = views[node.target]
        if path not in layers:  # first thing after the inputs: copied whole, before its parts
            where = graph.inserting_after(last) if last else graph.inserting_before(node)
            with where:
                layers[path] = last = graph.get_attr(path)
        with graph.inserting_before(node):
            view = graph.call_method("weight_view", (layers[path], transposed))
        node.replace_all_uses_with(view)
        graph.erase_node(node)
    gm = fx.GraphModule(root, graph, class_name=name)
    graph = gm.graph
    graph.eliminate_dead_code()
    graph.lint()
    # Rebuilding from itself keeps only what the graph uses: dense weights left unused go.
    return fx.GraphModule(gm, graph, class_name=name)


def _wrap(target: nn.Module) -> ModelView:
    """A GraphModule whose graph calls ``target`` as one module (for models fx can't trace);
    a :class:`~pxcompile.hf.ModelView`, so ``target``'s own API (``generate``, ``config``)
    stays reachable on it.

    Named parameters are passed by keyword: Hugging Face's forward decorators fill some
    (``use_cache``) themselves and reject them positionally.
    """
    g = fx.Graph()
    sig = inspect.signature(target.forward)
    args, kwargs = [], {}
    for pname, p in sig.parameters.items():
        if p.kind is p.VAR_POSITIONAL:
            args.append(g.placeholder(f"*{pname}"))
        elif p.kind is p.VAR_KEYWORD:
            continue
        else:
            default = inspect.Parameter.empty if p.default is p.empty else p.default
            node = g.placeholder(pname, default_value=default)
            if p.kind is p.POSITIONAL_ONLY:
                args.append(node)
            else:
                kwargs[pname] = node
    out = g.call_module("model", tuple(args), kwargs)
    g.output(out)
    root = nn.Module()
    root.model = target
    return ModelView(root, g, class_name=type(target).__name__ + "Pixelfly")
