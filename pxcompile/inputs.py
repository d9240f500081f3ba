"""A model's example inputs: how a model is called on them, checked against them, and what
tensors its output holds (shared by tracing, the API, model files and the checks)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import TraceError
from .passes.trace.sites import preserved

Inputs = Any  # a tensor, a tuple of positional inputs, or a dict of keyword inputs

__all__ = ["Inputs", "as_args", "call", "check_inputs", "input_mismatch", "output_tensors"]


def check_inputs(model: nn.Module, example_inputs: Inputs, name: str | None = None) -> None:
    """Run ``model`` once on ``example_inputs`` (no grad; buffers, train flags and the RNG put
    back): inputs that do not fit the model are a one-line TraceError now, rather than a
    traceback from inside tracing or a compiled model that cannot run."""
    name = name or type(model).__name__
    args, kwargs = as_args(example_inputs)
    try:
        with preserved(model, [*args, *kwargs.values()]):
            call(model, example_inputs)
    except Exception as e:  # noqa: BLE001 - whatever the forward raises, the inputs don't fit
        raise TraceError(f"{name}: {input_mismatch(model, example_inputs, e)}") from None


def input_mismatch(model: nn.Module, example_inputs: Inputs, e: Exception) -> str:
    """Why the forward failed on the example inputs, in one line; a dtype mismatch between
    the floating-point inputs and the parameters is said as such."""
    args, kwargs = as_args(example_inputs)
    leaves = [*args, *kwargs.values()]
    got = {t.dtype for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()}
    want = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if got and len(want) == 1 and not got & want:
        names = sorted(str(d).removeprefix("torch.") for d in got)
        wname = str(next(iter(want))).removeprefix("torch.")
        return (
            f"example inputs are {', '.join(names)} but the model's parameters are {wname}: "
            f"cast the inputs (x.to(torch.{wname})) or the model (model.to(torch.{names[0]}))"
        )
    msg = str(e).strip().splitlines()
    first = msg[0] if msg else ""
    if len(first) > 200:
        first = first[:197] + "..."
    return f"the model fails on its example inputs: {type(e).__name__}: {first}"


def as_args(inputs: Inputs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of example inputs given as a tensor, a tuple or a dict."""
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, tuple | list):
        return tuple(inputs), {}
    return (inputs,), {}


def call(model: nn.Module, inputs: Inputs) -> Any:
    """Run ``model`` on example inputs given as a tensor, a tuple or a dict."""
    args, kwargs = as_args(inputs)
    return model(*args, **kwargs)


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model's output (tensors, tuples, lists, dicts, HF ``ModelOutput``s),
    in order: what output comparisons walk."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "to_tuple"):
        vals = out.values() if isinstance(out, dict) else out.to_tuple()
        return [t for v in vals for t in output_tensors(v)]
    if isinstance(out, tuple | list):
        return [t for v in out for t in output_tensors(v)]
    return []
