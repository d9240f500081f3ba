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

import contextlib
import copy
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx, nn

from .errors import PxError
from .fresh import InitChoice, choose_init
from .inputs import Inputs, call, check_inputs, output_tensors
from .model_specs import require_weights
from .passes.budget import check_args, plan_schema
from .passes.mapping import CostModel
from .passes.rewrite import (
    RewriteResult,
    attach_constants,
    attention_calls,
    attention_reachable,
    install_attention,
    rewritable,
    rewrite,
    weight_target,
)
from .passes.trace import TraceResult
from .passes.trace import trace as _trace
from .plans import Plan
from .policy import Policy
from .schema import ModelSchema

ProgressFn = Callable[[str], None]


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


INITS = ("auto", "dense", "scratch")


def check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise PxError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def check_init(init: Any) -> None:
    if init not in INITS:
        raise PxError(f"init must be 'auto', 'dense' or 'scratch', got {init!r}")


def resolve_init(init: str, model: nn.Module, traced: TraceResult, plan: Plan) -> InitChoice:
    """``init`` as "dense" or "scratch": ``"auto"`` tests the weights the plan sparsifies
    (:func:`pxcompile.fresh.choose_init`: scratch when all look freshly initialised)."""
    if init != "auto":
        return InitChoice(init, "asked for", ())

    def weights():
        for lp in plan.sparse_weight_layers:
            b = traced.bindings.get(lp.name)
            if b is not None:
                yield lp.name, model.get_parameter(weight_target(model, b).weight).detach()

    return choose_init(weights())


def policy_arg(policy: Any) -> Policy | None:
    """``policy`` as a Policy (a dict is parsed); anything else is a one-line PxError."""
    if policy is None or isinstance(policy, Policy):
        return policy
    if isinstance(policy, dict):
        return Policy.from_dict(policy)
    raise PxError(f"policy must be a Policy, a dict or None, got {type(policy).__name__}")


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
    check_model(model)
    example_inputs = _inputs(model, example_inputs)
    check_inputs(model, example_inputs, name)
    return _trace(model, example_inputs, name=name, progress=progress)


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
    check_args(budget, block)
    policy = policy_arg(policy)
    if not isinstance(model_or_schema, nn.Module | ModelSchema | TraceResult):
        raise PxError(
            "plan() takes an nn.Module, a ModelSchema or a TraceResult, "
            f"got {type(model_or_schema).__name__}"
        )
    model: nn.Module | None = None
    if isinstance(model_or_schema, nn.Module):
        model = model_or_schema
        model_or_schema = trace(model, example_inputs)
    if isinstance(model_or_schema, TraceResult):
        return plan_traced(model, model_or_schema, budget, block, policy, cost_model, strict)
    return plan_schema(model_or_schema, budget, block, policy, cost_model, strict=strict)


def plan_traced(
    model: nn.Module | None,
    traced: TraceResult,
    budget: float,
    block: int,
    policy: Policy | dict | None,
    cost_model: CostModel | None = None,
    strict: bool = False,
) -> Plan:
    """Plan a traced model; GEMMs the rewrite can't reach stay dense and say why (``model``:
    the traced module, to tell reachable weights; :func:`plan` passes ``None`` for a bare
    TraceResult)."""
    policy = policy_arg(policy)
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
    init: str = "auto",
    inplace: bool = False,
    progress: ProgressFn | None = None,
) -> fx.GraphModule:
    """Rewrite ``model`` as ``plan`` says; returns the sparsified GraphModule.

    ``init`` as in :func:`sparsify`. The result carries ``pxcompile_plan``,
    ``pxcompile_init`` (the init used: "dense" or "scratch"), ``pxcompile_init_reason`` (why,
    for ``init="auto"``) and ``pxcompile_init_errors`` (relative error of each rewritten
    layer's initial weight against the dense one; empty with the scratch init).

    Example:
        >>> gm = pxcompile.apply(model, p, (x,))      # doctest: +SKIP
    """
    check_model(model)
    check_init(init)
    if not isinstance(plan, Plan):
        raise PxError(f"apply() takes a Plan, got {type(plan).__name__} (Plan.load reads a file)")
    require_weights(model, type(model).__name__, "apply")
    if traced is None:
        traced = trace(model, example_inputs, progress=progress)
    choice = resolve_init(init, model, traced, plan)
    res: RewriteResult = rewrite(
        model, traced, plan, init=choice.init, inplace=inplace, progress=progress
    )
    gm = res.module
    gm.pxcompile_plan = plan.check_against(traced.schema)
    gm.pxcompile_init = choice.init
    gm.pxcompile_init_reason = choice.reason
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
    plan: Plan | str | os.PathLike | None = None,
    inplace: bool = False,
    init: str = "auto",
    progress: ProgressFn | None = None,
) -> fx.GraphModule:
    """Trace, plan and rewrite ``model`` in one call.

    ``budget`` is the fraction of the eligible GEMMs' dense FLOPs to keep; ``plan`` (a Plan or
    a plan YAML path) replaces planning. The user's model is left untouched unless
    ``inplace=True``.

    ``init`` says how the sparse layers start:

    * ``"dense"``: from the model's weights (kept blocks copied, the low-rank term fitted to
      the rest by truncated SVD): for a *trained* model, to fine-tune or run it sparse.
    * ``"scratch"``: sampled like a fresh dense layer, each layer's output scale kept (kept
      blocks scaled up by ``sqrt(fan-in / kept fan-in)``, the low-rank term given its share
      of the variance): for a model you are about to *train from scratch*. ``"dense"`` on a
      fresh model would shrink each layer's output by about ``sqrt(density)``.
    * ``"auto"`` (default): ``"scratch"`` if every weight to sparsify looks freshly
      initialised (no singular value above the random-matrix edge,
      :mod:`pxcompile.fresh`), else ``"dense"``. ``gm.pxcompile_init`` says which was used
      and ``gm.pxcompile_init_reason`` why. A model trained for only a few steps counts as
      fresh; pass ``init`` explicitly to be sure.

    Example:
        >>> gm = pxcompile.sparsify(model, 0.3, example_inputs=(x,))   # doctest: +SKIP
        >>> loss = gm(x).pow(2).mean(); loss.backward()                # doctest: +SKIP
    """
    # Every argument is checked before the (slow) trace.
    check_model(model)
    check_init(init)
    require_weights(model, type(model).__name__, "sparsify")
    policy = policy_arg(policy)
    if plan is None:
        if budget is None:
            raise PxError("give a budget or a plan")
        check_args(budget, block)
    elif isinstance(plan, str | os.PathLike):
        plan = Plan.load(plan)
    elif not isinstance(plan, Plan):
        raise PxError(f"plan must be a Plan or a plan file's path, got {type(plan).__name__}")
    example_inputs = _inputs(model, example_inputs)
    traced = trace(model, example_inputs, progress=progress)
    if plan is None:
        the_plan = plan_traced(model, traced, budget, block, policy)  # type: ignore[arg-type]
    else:
        the_plan = plan.check_against(traced.schema)
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
            t = weight_target(ref, traced.bindings[name])
            layer = compiled.get_submodule(path)
            w = layer.dense_weight()
            ref.get_parameter(t.weight).copy_(w.t() if t.transposed else w)
            if t.bias is not None:
                ref.get_parameter(t.bias).copy_(layer.bias)
    plan = compiled.pxcompile_plan
    calls = attention_calls(plan, traced, ref)
    if calls is not None:
        if traced.method == "fx" and traced.graph_module is not None:
            # The SDPA calls to replace are nodes of the traced graph: run that graph.
            attach_constants(ref, traced.graph_module)
            ref = fx.GraphModule(ref, copy.deepcopy(traced.graph_module.graph))
        install_attention(ref, calls, plan, traced.method, reference=True)
    return ref


def verify(
    original: nn.Module, compiled: fx.GraphModule, traced: TraceResult, example_inputs: Inputs
) -> float:
    """Max relative output difference of ``compiled`` against the masked-dense reference.

    Both run in eval mode (dropout, stochastic depth and batch-norm statistics are then
    deterministic, so like is compared with like) with the RNG forked; ``compiled`` gets its
    modes back afterwards. Non-finite outputs raise :class:`PxError` naming the first module
    that produced them: a NaN is never a small difference.
    """
    ref = masked_dense_reference(original, compiled, traced).eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad(), eval_mode(compiled):
        want = output_tensors(call(ref, example_inputs))
        got = output_tensors(call(compiled, example_inputs))
        for which, module, outs in (("model", ref, want), ("compiled model", compiled, got)):
            if any(t.is_floating_point() and not torch.isfinite(t).all() for t in outs):
                where = first_nonfinite_module(module, example_inputs)
                raise PxError(
                    f"verify: the {which}'s output has NaN or inf values"
                    + (f", first from {where!r}" if where else "")
                    + ": check its weights and the example inputs"
                )
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


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the block; every submodule's own mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def first_nonfinite_module(module: nn.Module, inputs: Inputs) -> str | None:
    """The qualified name of the first module (in call order) whose output holds NaN or inf
    on ``inputs``, or None."""
    found: list[str] = []

    def hook(name: str):
        def check(_m, _args, out):
            if not found and any(
                t.is_floating_point() and not torch.isfinite(t).all() for t in output_tensors(out)
            ):
                found.append(name)

        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in module.named_modules() if n]
    try:
        with torch.no_grad():
            call(module, inputs)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None
