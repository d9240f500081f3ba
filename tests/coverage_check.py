"""The coverage sweep's checker: ``check_model(model, inputs) -> Row``.

``pxcompile.sparsify`` at budget 0.3 and block 32, then: every weight GEMM the trace finds
(and every Linear-like module the forward calls) is sparse, or dense for a reason on a short
fixed list; outputs and gradients equal the masked-dense reference; one optimizer step lowers
the loss of a fixed batch; ``save`` + ``load`` round-trips; the original model is untouched.
Used by ``tests/test_coverage.py`` and ``docs/coverage.py``.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import pxcompile
from pxcompile import api
from pxcompile.inputs import as_args
from pxcompile.layers import PixelflyLinear
from pxcompile.passes.trace import is_linear_like

BUDGET = 0.3
BLOCK = 32
RTOL = 1e-4

# Why a weight GEMM may stay dense: the policy keeps its type dense (embeddings, heads), it
# has under min_blocks blocks on a side, its weight is tied to another GEMM's, or no pattern
# fits its shape. Any other reason is a GEMM the tool could not reach: a bug.
POLICY_TYPE = "policy type"
UNDER_MIN_BLOCKS = "under min_blocks"
TIED = "tied"
NO_PATTERN = "no fitting pattern"
REASONS = (POLICY_TYPE, UNDER_MIN_BLOCKS, TIED, NO_PATTERN)


def reason_category(reason: str) -> str | None:
    """The fixed-list category of a dense layer's plan reason, or None if it is not on it."""
    if reason.startswith("type ") and reason.endswith("stays dense (policy)"):
        return POLICY_TYPE
    if reason.startswith("under ") and " blocks of " in reason:
        return UNDER_MIN_BLOCKS
    if reason.startswith("weight shared with "):
        return TIED
    if (
        reason.startswith("no butterfly pattern fits ")
        or (reason.startswith("'in'=") or reason.startswith("'out'="))
        and "is not a multiple of block" in reason
        or reason.startswith("no pattern keeps ")
    ):
        return NO_PATTERN
    return None


@dataclass
class Row:
    """One model's line of docs/coverage.md; ``problems`` empty means every check passed."""

    gemms: int = 0  # weight GEMMs the trace found
    sparse: int = 0
    dense: Counter = field(default_factory=Counter)  # fixed-list category -> count
    unreached: list[str] = field(default_factory=list)  # 'gemm: reason' off the fixed list
    eligible_fraction: float = 0.0  # sparse FLOPs / FLOPs of GEMMs not dense by a fixed reason
    budget_fraction: float = 0.0  # the plan's achieved fraction of the eligible compute
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def verified(self) -> bool:
        return not self.problems


def check_model(model: nn.Module, inputs: Any, *, save_dir: str | None = None) -> Row:
    """Sparsify ``model`` and check it (see the module docstring). Exceptions from
    ``sparsify`` propagate; failed checks after it are listed in ``Row.problems``."""
    start = time.perf_counter()
    row = Row()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    attrs = [sorted(vars(m)) for m in model.modules()]
    called = _called_linear_likes(model, inputs)

    traced = api.trace(model, inputs)
    # reach, not speed: tiny configs are predicted slower than dense (min_speedup 0 plans them)
    gm = pxcompile.sparsify(
        model, BUDGET, block=BLOCK, example_inputs=inputs, policy={"min_speedup": 0}
    )
    _count(row, gm.pxcompile_plan, traced, called)

    _check(row, "forward", lambda: _check_forward(model, gm, traced, inputs))
    _check(row, "gradients", lambda: _check_gradients(model, gm, traced, inputs))
    _check(row, "save/load", lambda: _check_save_load(gm, inputs, save_dir))
    _check(row, "training step", lambda: _check_training_step(gm, inputs))

    after = model.state_dict()
    if before.keys() != after.keys() or not all(torch.equal(before[k], after[k]) for k in before):
        row.problems.append("original model: state_dict changed")
    if any(isinstance(m, PixelflyLinear) for m in model.modules()):
        row.problems.append("original model: holds PixelflyLinear layers")
    if [m.training for m in model.modules()] != modes:
        row.problems.append("original model: train/eval modes changed")
    if [sorted(vars(m)) for m in model.modules()] != attrs:
        row.problems.append("original model: attributes added or removed")
    row.seconds = time.perf_counter() - start
    return row


def _check(row: Row, what: str, fn) -> None:
    try:
        why = fn()
    except Exception as e:  # a crash is recorded like a mismatch; the test names it
        why = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    if why:
        row.problems.append(f"{what}: {why}")


def _called_linear_likes(model: nn.Module, inputs: Any) -> set[str]:
    """Linear-like modules the forward actually calls (unused ones are not GEMMs)."""
    called: set[str] = set()
    model = copy.deepcopy(model)  # a train-mode run updates batch-norm statistics
    for n, m in model.named_modules():
        if is_linear_like(m) and not isinstance(m, nn.MultiheadAttention):
            m.register_forward_hook(lambda *_a, n=n: called.add(n))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        api.call(model, inputs)
    return called


def _count(row: Row, plan, traced, called: set[str]) -> None:
    weight = [lp for lp in plan.layers if lp.gemm.has_weight]
    row.gemms = len(weight)
    eligible = reached = 0.0
    for lp in weight:
        if lp.sparse:
            row.sparse += 1
            eligible += lp.gemm.flops
            reached += lp.gemm.flops
            continue
        cat = reason_category(lp.reason)
        if cat is None:
            row.unreached.append(f"{lp.name}: {lp.reason}")
            eligible += lp.gemm.flops
        else:
            row.dense[cat] += 1
    row.eligible_fraction = reached / eligible if eligible else 1.0
    row.budget_fraction = plan.summary.eligible_fraction
    modules = {b.module for b in traced.bindings.values()}
    missed = sorted(called - modules)
    if missed:
        row.problems.append(f"trace: Linear-like modules missing from the schema: {missed}")
    if row.unreached:
        row.problems.append(f"dense off the fixed list: {row.unreached}")


# --- the checks: each returns None or what is wrong ------------------------------------------


def _float_outputs(out: Any) -> list[torch.Tensor]:
    """The float tensors of a model's output (tensor, tuple, dict or ModelOutput), in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict) or hasattr(out, "to_tuple"):
        out = list(out.values() if isinstance(out, dict) else out.to_tuple())
    if isinstance(out, tuple | list):
        return [t for v in out for t in _float_outputs(v)]
    return []


def _compare(want: list[torch.Tensor], got: list[torch.Tensor], what: str) -> str | None:
    if len(want) != len(got):
        return f"{what}: {len(got)} output tensors, expected {len(want)}"
    for i, (a, b) in enumerate(zip(want, got)):
        if a.shape != b.shape:
            return f"{what}: output {i} has shape {tuple(b.shape)}, expected {tuple(a.shape)}"
        err = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
        if not err <= RTOL:
            return f"{what}: output {i} differs by {err:.2e} (relative)"
    return None


def _check_forward(model, gm, traced, inputs) -> str | None:
    """Eval mode (``api.verify``), then train mode: with the same seed, dropout and
    stochastic depth must drop the same things in both models."""
    err = api.verify(model, gm, traced, inputs)
    if not err <= RTOL:
        return f"differs from the masked-dense reference by {err:.2e} (eval mode)"
    ref = api.masked_dense_reference(model, gm, traced).train()
    gm = copy.deepcopy(gm).train()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        want = _float_outputs(api.call(ref, inputs))
        torch.manual_seed(0)
        got = _float_outputs(api.call(gm, inputs))
    return _compare(want, got, "train mode, same seed")


def _wrap_prefix(traced) -> str:
    # The rewrite wraps models fx cannot trace as ``gm.model``.
    return "" if traced.method == "fx" and traced.graph_module is not None else "model."


def _check_gradients(model, gm, traced, inputs) -> str | None:
    """Gradients of one scalar loss w.r.t. the float inputs and every parameter of ``gm``:
    the reference runs the masked-dense model with each sparse layer's dense equivalent
    ``B + U V^T`` (differentiably) and ``gm``'s own dense parameters."""
    ref = api.masked_dense_reference(model, gm, traced).eval()
    ref_names = {n for n, _ in ref.named_parameters(remove_duplicate=False)}
    prefix = _wrap_prefix(traced)
    xs = _float_inputs(inputs)
    layer_params = {
        id(p) for m in gm.modules() if isinstance(m, PixelflyLinear) for p in m.parameters()
    }
    with api.eval_mode(gm), torch.random.fork_rng(devices=[]):
        params = {n: p for n, p in gm.named_parameters() if p.requires_grad}
        mapped: dict[str, torch.Tensor] = {}
        for n, p in params.items():
            name = n.removeprefix(prefix) if prefix and n.startswith(prefix) else n
            if name in ref_names:
                mapped[name] = p
            elif id(p) not in layer_params:
                return f"parameter {n!r} of the compiled model has no counterpart"
        for n, p in gm.named_parameters():
            name = n.removeprefix(prefix) if prefix and n.startswith(prefix) else n
            if not p.requires_grad and name in ref_names:
                mapped[name] = p  # frozen (e.g. Whisper's positions): same values, no gradient
        for gname, path in gm.pxcompile_layers.items():
            b = traced.bindings[gname]
            layer = gm.get_submodule(path)
            w = layer.dense_weight()
            mapped[b.weight] = w.t() if b.kind == "conv1d" else w
            if b.bias is not None:
                mapped[b.bias] = layer.bias
        wrt = xs + list(params.values())
        got = _loss(api.call(gm, _with(inputs, xs)))
        g_got = torch.autograd.grad(got, wrt, allow_unused=True)
        args, kwargs = as_args(_with(inputs, xs))
        want = _loss(torch.func.functional_call(ref, mapped, args, kwargs))
        g_want = torch.autograd.grad(want, wrt, allow_unused=True)
    got, want = float(got.detach()), float(want.detach())
    if not abs(got - want) <= RTOL * abs(want):
        return f"loss {got:.6g} vs reference {want:.6g}"
    names = [f"input {i}" for i in range(len(xs))] + list(params)
    scale = max((float(b.abs().max()) for b in g_want if b is not None), default=0.0)
    for n, a, b in zip(names, g_got, g_want):
        if (a is None) != (b is None):
            return f"{n}: gradient {'missing' if a is None else 'unexpected'}"
        if a is None:
            continue
        # float32: a gradient that is ~0 (e.g. by symmetry, or summed over many positions)
        # compares against the largest one
        tol = RTOL * float(b.abs().max()) + 1e-5 * scale
        if not float((a - b).abs().max()) <= tol:
            return f"gradient of {n} differs by {float((a - b).abs().max()):.2e} (tol {tol:.2e})"
    return None


def _float_inputs(inputs: Any) -> list[torch.Tensor]:
    vals = inputs.values() if isinstance(inputs, dict) else as_args(inputs)[0]
    return [
        t.detach().clone().requires_grad_(True)
        for t in vals
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]


def _with(inputs: Any, xs: list[torch.Tensor]) -> Any:
    """``inputs`` with its float tensors replaced, in order, by ``xs``."""
    it = iter(xs)

    def sub(t):
        return next(it) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    if isinstance(inputs, dict):
        return {k: sub(v) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return tuple(sub(t) for t in inputs)
    return sub(inputs)


def _loss(out: Any, targets: list[torch.Tensor] | None = None) -> torch.Tensor:
    outs = _float_outputs(out)
    if targets is None:
        return sum(t.square().mean() for t in outs)
    return sum(torch.nn.functional.mse_loss(t, y) for t, y in zip(outs, targets))


def _check_save_load(gm, inputs, save_dir: str | None) -> str | None:
    with tempfile.TemporaryDirectory(dir=save_dir) as d:
        path = Path(d) / "model.px"
        pxcompile.save(gm, path)
        loaded = pxcompile.load(path)
        with torch.no_grad(), api.eval_mode(gm), torch.random.fork_rng(devices=[]):
            want = _float_outputs(api.call(gm, inputs))
            got = _float_outputs(api.call(loaded, inputs))
    return _compare(want, got, "loaded model")


def _check_training_step(gm, inputs) -> str | None:
    """One SGD step in train mode on a fixed batch (same dropout masks before and after)
    lowers that batch's loss. Runs on a copy: ``gm`` is left as it was."""
    gm = copy.deepcopy(gm).train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with torch.no_grad():
            targets = [torch.randn_like(t) for t in _float_outputs(api.call(gm, inputs))]
        opt = torch.optim.SGD(gm.parameters(), lr=1e-3)
        losses = []
        for _ in range(2):
            torch.manual_seed(1)
            opt.zero_grad()
            loss = _loss(api.call(gm, inputs), targets)
            losses.append(float(loss.detach()))
            if len(losses) == 1:
                loss.backward()
                opt.step()
    if not losses[1] < losses[0]:
        return f"loss went from {losses[0]:.6g} to {losses[1]:.6g}"
    return None
