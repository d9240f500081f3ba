"""The Python API: ``sparsify(model, budget)``, and its steps ``trace``, ``plan``, ``apply``.

>>> import torch, pxcompile
>>> model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(),
...                             torch.nn.Linear(1024, 256))
>>> x = torch.randn(64, 256)
>>> gm = pxcompile.sparsify(model, 0.3, block=32, example_inputs=(x,))
>>> gm(x).shape
torch.Size([64, 256])
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from .errors import PxError
from .passes.budget import plan_schema
from .passes.mapping import CostModel
from .passes.rewrite import (
    RewriteResult,
    attention_calls,
    attention_reachable,
    install_attention,
    rewritable,
    rewrite,
)
from .passes.trace import TraceResult
from .passes.trace import trace as _trace
from .plans import Plan
from .policy import Policy
from .schema import ModelSchema

ProgressFn = Callable[[str], None]
Inputs = Any  # a tensor, a tuple of positional inputs, or a dict of keyword inputs


def _inputs(model: nn.Module, example_inputs: Inputs | None) -> Inputs:
    if example_inputs is not None:
        return example_inputs
    dummy = getattr(model, "dummy_inputs", None)  # Hugging Face models carry these
    if isinstance(dummy, dict) and dummy:
        return dict(dummy)
    raise PxError(
        f"{type(model).__name__}: pass example_inputs (a tensor or a tuple of the forward's "
        "inputs): tracing needs them to find every GEMM and its rows"
    )


def _as_args(inputs: Inputs) -> tuple[tuple, dict]:
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, tuple | list):
        return tuple(inputs), {}
    return (inputs,), {}


def call(model: nn.Module, inputs: Inputs) -> Any:
    """Run ``model`` on example inputs given as a tensor, a tuple or a dict."""
    args, kwargs = _as_args(inputs)
    return model(*args, **kwargs)


def trace(
    model: nn.Module,
    example_inputs: Inputs | None = None,
    *,
    name: str | None = None,
    progress: ProgressFn | None = None,
) -> TraceResult:
    """Find every GEMM of ``model`` (the model schema) and how to reach its weight.

    Example:
        >>> t = pxcompile.trace(model, (x,))          # doctest: +SKIP
        >>> [g.name for g in t.schema.gemms]          # doctest: +SKIP
        ['0', '2']
    """
    return _trace(model, _inputs(model, example_inputs), name=name, progress=progress)


def plan(
    model_or_schema: nn.Module | ModelSchema | TraceResult,
    budget: float,
    block: int = 32,
    *,
    example_inputs: Inputs | None = None,
    policy: Policy | dict | None = None,
    cost_model: CostModel | None = None,
    strict: bool = False,
) -> Plan:
    """Run the budget and mapping passes: which GEMM gets which pattern.

    Example:
        >>> p = pxcompile.plan(pxcompile.ModelSchema.load("schemas/vit-b16.yaml"), 0.3)  # doctest: +SKIP
        >>> p.summary.eligible_fraction <= 0.3                                            # doctest: +SKIP
        True
    """
    model: nn.Module | None = None
    if isinstance(model_or_schema, nn.Module):
        model = model_or_schema
        model_or_schema = trace(model, example_inputs)
    if isinstance(model_or_schema, TraceResult):
        return _plan_traced(model, model_or_schema, budget, block, policy, cost_model, strict)
    if isinstance(policy, dict):
        policy = Policy.from_dict(policy)
    return plan_schema(model_or_schema, budget, block, policy, cost_model, strict=strict)


def _plan_traced(
    model: nn.Module | None,
    traced: TraceResult,
    budget: float,
    block: int,
    policy: Policy | dict | None,
    cost_model: CostModel | None = None,
    strict: bool = False,
) -> Plan:
    """Plan a traced model; GEMMs the rewrite can't reach stay dense and say why."""
    if isinstance(policy, dict):
        policy = Policy.from_dict(policy)
    forced = {}
    for name, b in traced.bindings.items():
        why = rewritable(b, model, traced.method)
        if why:
            forced[name] = why
    for name, site in traced.attention.items():
        why = attention_reachable(site, traced.method)
        if why:
            forced[name] = why
    return plan_schema(traced.schema, budget, block, policy, cost_model, strict, dense=forced)


def apply(
    model: nn.Module,
    plan: Plan,
    example_inputs: Inputs | None = None,
    *,
    traced: TraceResult | None = None,
    init: str = "dense",
    inplace: bool = False,
    progress: ProgressFn | None = None,
) -> fx.GraphModule:
    """Rewrite ``model`` as ``plan`` says; returns the sparsified GraphModule.

    The result carries ``pxcompile_plan`` and ``pxcompile_init_errors`` (relative error of
    each rewritten layer's initial weight against the dense one).

    Example:
        >>> gm = pxcompile.apply(model, p, (x,))      # doctest: +SKIP
    """
    if traced is None:
        traced = trace(model, example_inputs, progress=progress)
    res: RewriteResult = rewrite(model, traced, plan, init=init, inplace=inplace, progress=progress)
    gm = res.module
    gm.pxcompile_plan = plan.check_against(traced.schema)
    gm.pxcompile_init_errors = res.init_errors
    gm.pxcompile_layers = res.layers
    gm.pxcompile_example_inputs = example_inputs  # lets save(gm, path) export without inputs
    return gm


def sparsify(
    model: nn.Module,
    budget: float | None = 0.3,
    block: int = 32,
    example_inputs: Inputs | None = None,
    policy: Policy | dict | None = None,
    plan: Plan | str | None = None,
    inplace: bool = False,
    init: str = "dense",
    progress: ProgressFn | None = None,
) -> fx.GraphModule:
    """Trace, plan and rewrite ``model`` in one call.

    ``budget`` is the fraction of the eligible GEMMs' dense FLOPs to keep; ``plan`` (a Plan or
    a plan YAML path) replaces planning. The user's model is left untouched unless
    ``inplace=True``.

    Example:
        >>> gm = pxcompile.sparsify(model, 0.3, example_inputs=(x,))   # doctest: +SKIP
        >>> loss = gm(x).pow(2).mean(); loss.backward()                # doctest: +SKIP
    """
    example_inputs = _inputs(model, example_inputs)
    traced = trace(model, example_inputs, progress=progress)
    if plan is None:
        if budget is None:
            raise PxError("give a budget or a plan")
        the_plan = _plan_traced(model, traced, budget, block, policy)
    else:
        the_plan = Plan.load(plan) if isinstance(plan, str) else plan
        the_plan = the_plan.check_against(traced.schema)
    return apply(
        model,
        the_plan,
        example_inputs,
        traced=traced,
        init=init,
        inplace=inplace,
        progress=progress,
    )


def masked_dense_reference(
    original: nn.Module, compiled: fx.GraphModule, traced: TraceResult
) -> nn.Module:
    """A copy of the original model whose rewritten GEMMs hold the compiled layers' dense
    equivalent (``B + U V^T``), and whose sparse attention calls are dense attention under
    the same element mask: the reference the rewrite is checked against."""
    ref = copy.deepcopy(original)
    with torch.no_grad():
        for name, path in compiled.pxcompile_layers.items():
            b = traced.bindings[name]
            w = compiled.get_submodule(path).dense_weight()
            p = ref.get_parameter(b.weight)
            p.copy_(w.t() if b.kind == "conv1d" else w)
            if b.bias is not None:
                ref.get_parameter(b.bias).copy_(compiled.get_submodule(path).bias)
    plan = compiled.pxcompile_plan
    calls = attention_calls(plan, traced, ref)
    if calls is not None:
        if traced.method == "fx" and traced.graph_module is not None:
            # The SDPA calls to replace are nodes of the traced graph: run that graph.
            ref = fx.GraphModule(ref, copy.deepcopy(traced.graph_module.graph))
        install_attention(ref, calls, plan, traced.method, reference=True)
    return ref


def verify(
    original: nn.Module, compiled: fx.GraphModule, traced: TraceResult, example_inputs: Inputs
) -> float:
    """Max relative output difference of ``compiled`` against the masked-dense reference."""
    ref = masked_dense_reference(original, compiled, traced)
    with torch.no_grad():
        want = _tensors(call(ref, example_inputs))
        got = _tensors(call(compiled, example_inputs))
    if len(want) != len(got):
        raise PxError("the compiled model's outputs differ in structure from the model's")
    worst = 0.0
    for a, b in zip(want, got):
        if a.shape != b.shape:
            raise PxError(f"output shape {tuple(b.shape)} differs from {tuple(a.shape)}")
        if a.is_floating_point():
            scale = a.abs().max().clamp_min(1e-12)
            worst = max(worst, float((a - b).abs().max() / scale))
        elif not torch.equal(a, b):
            worst = max(worst, 1.0)
    return worst


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "to_tuple"):
        vals = out.values() if isinstance(out, dict) else out.to_tuple()
        return [t for v in vals for t in _tensors(v)]
    if isinstance(out, tuple | list):
        return [t for v in out for t in _tensors(v)]
    return []
