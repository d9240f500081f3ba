"""Tracing a model built without weights (on the ``meta`` device) once per *kind* of layer.

A 7B model is 32 copies of one decoder layer. Its weights are not there to run, so all a
trace can learn is shapes, and torch.export spends its time (about half a second a layer)
on the same layer again and again. For a model whose parameters are all on ``meta``, the
trace pass therefore traces it with every list of identical layers cut to its first two
(:func:`cut_repeats`) and writes the other layers out from the second (:func:`expand`).

A list is cut only when that cannot change the schema:

* it is an ``nn.ModuleList`` / ``nn.Sequential`` of three or more layers of one structure
  (class, submodules, parameter and buffer names, shapes and dtypes, and plain settings such
  as ``is_sliding``; a layer's own index aside) sharing no parameter with anything else (tied
  weights keep the model whole);
* the trace of the cut model then shows the stream is stationary: the two layers took inputs
  of the same shapes and gave outputs of the same shapes, the first output being the shape
  of the first input (so layer 3 and on see what layer 2 saw);
* their GEMMs are the same up to the layer index, contiguous (nothing outside the list ran
  between them: a module shared by every layer would be counted once per layer) and the
  model's last weight GEMM is not in the list (its type depends on being last).

Otherwise :func:`expand` returns None and the caller traces the whole model. The expanded
result has no graph (a model without weights is planned, never rewritten); attention sites of
written-out layers name the template layer's graph nodes.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from .result import TraceResult
from .sites import preserved

KEEP = 2  # layers of a cut list that are traced


def is_meta_model(model: nn.Module) -> bool:
    """Whether every parameter and buffer of ``model`` is on the ``meta`` device (and it has
    at least one): a model built from its config alone."""
    tensors = [*model.parameters(), *model.buffers()]
    return bool(tensors) and all(t.device.type == "meta" for t in tensors)


@dataclass
class _Cut:
    prefix: str  # qualified name of the list
    keys: list[str]  # its layers' names in it ('0', '1', ... or a Sequential's own)
    # (input shapes, output shapes) of each call of each kept layer in the probe run
    shapes: dict[int, list[tuple[tuple, tuple]]] = field(default_factory=dict)
    recording: bool = False


def _shapes(x: Any) -> tuple:
    return tuple(
        tuple(t.shape) if isinstance(t, torch.Tensor) else None
        for t in pytree.tree_leaves(x)
        if isinstance(t, torch.Tensor)
    )


# A layer's own index (Hugging Face's ``layer_idx``...) differs from layer to layer by design.
_INDEX_ATTR = re.compile(r"(^|_)(idx|index|layer_id|layer_number|layer_num)($|_)")


def _settings(s: nn.Module) -> tuple:
    """A module's plain settings (numbers, strings, flags, None): a layer that branches on one
    (``self.is_sliding``, a KV-sharing flag) may run other GEMMs than its neighbours."""
    return tuple(
        (k, v)
        for k, v in sorted(vars(s).items())
        if not k.startswith("_")
        and (v is None or isinstance(v, bool | int | float | str))
        and not _INDEX_ATTR.search(k)
    )


def _structure(m: nn.Module) -> tuple:
    return tuple(
        (
            n,
            type(s).__qualname__,
            tuple((k, tuple(p.shape), p.dtype) for k, p in s._parameters.items() if p is not None),
            tuple((k, tuple(b.shape), b.dtype) for k, b in s._buffers.items() if b is not None),
            _settings(s),
        )
        for n, s in m.named_modules(remove_duplicate=False)
    )


def _repeated_lists(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost lists of three or more identical layers that share no parameter."""
    owners: dict[int, set[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), set()).add(n)
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList | nn.Sequential) or len(m) <= KEEP:
            continue
        if any(name == f or name.startswith(f + ".") for f, _ in found if f):
            continue
        children = list(m._modules.values())
        if any(c is None for c in children) or len({id(c) for c in children}) != len(children):
            continue
        first = _structure(children[0])
        if any(_structure(c) != first for c in children[1:]):
            continue
        shared = any(len(owners.get(id(p), ())) > 1 for p in m.parameters())
        if not shared:
            found.append((name, m))
    return found


@contextlib.contextmanager
def cut_repeats(model: nn.Module, args: tuple, kwargs: dict) -> Iterator[list[_Cut]]:
    """``model`` with each list of identical layers cut to its first :data:`KEEP` for the
    block, after one run on ``args``/``kwargs`` (on ``meta``: no compute) that records the
    kept layers' input and output shapes. Put back afterwards. No list is cut (the block
    gets ``[]``) when that run fails."""
    lists = _repeated_lists(model)
    cuts: list[_Cut] = []
    saved: list[tuple[nn.Module, Any]] = []
    hooks = []
    try:
        for name, m in lists:
            cut = _Cut(name, list(m._modules))
            cuts.append(cut)
            mods = m.__dict__["_modules"]
            saved.append((m, mods))
            kept = list(mods.items())[:KEEP]
            m.__dict__["_modules"] = type(mods)(kept)
            for i, (_, child) in enumerate(kept):

                def hook(_m, args, kwargs, out, cut=cut, i=i):
                    if cut.recording:
                        cut.shapes.setdefault(i, []).append((_shapes((args, kwargs)), _shapes(out)))

                hooks.append(child.register_forward_hook(hook, with_kwargs=True))
        if cuts:
            for cut in cuts:
                cut.recording = True
            try:
                with preserved(model, pytree.tree_leaves((args, kwargs))):
                    model(*args, **kwargs)
            except Exception:  # noqa: BLE001 - the trace will say what is wrong
                cuts = []
            for cut in cuts:
                cut.recording = False
        yield cuts
    finally:
        for h in hooks:
            h.remove()
        for m, mods in saved:
            m.__dict__["_modules"] = mods


def _layer_re(name: str) -> re.Pattern:
    """``name`` (a layer's qualified name) where it stands whole in a string."""
    return re.compile(re.escape(name) + r"(?![0-9A-Za-z_])")


def _under(name: str, layer: str) -> bool:
    return name == layer or name.startswith(layer + ".")


def _renamed(x: Any, pat: re.Pattern, to: str) -> Any:
    if type(x) is str:  # a name or a reason (not a LayerType, a str enum)
        return pat.sub(to, x)
    if isinstance(x, tuple):
        return tuple(_renamed(v, pat, to) for v in x)
    return x


def _moved(obj: Any, pat: re.Pattern, to: str) -> Any:
    """A Gemm or GemmBinding of one layer, written for another (names and reasons)."""
    return replace(obj, **{k: _renamed(v, pat, to) for k, v in vars(obj).items()})


def expand(result: TraceResult, cuts: list[_Cut]) -> TraceResult | None:
    """The trace of the whole model from the trace of the cut one, or None when a cut could
    have changed the schema (see the module doc)."""
    schema = result.schema
    gemms = list(schema.gemms)
    bindings = dict(result.bindings)
    attention = dict(result.attention)
    weight_gemms = [g.name for g in gemms if g.name in bindings]
    for cut in cuts:
        calls = [cut.shapes.get(i, []) for i in range(KEEP)]
        if any(c != calls[0] for c in calls):
            return None  # the layers were called differently
        if any(not ins or not outs or ins[0] != outs[0] for ins, outs in calls[0]):
            return None  # the stream changes shape from layer to layer
        first, second = (f"{cut.prefix}.{k}" if cut.prefix else k for k in cut.keys[:KEEP])
        idx = [i for i, g in enumerate(gemms) if _under(g.name, first) or _under(g.name, second)]
        if not idx:
            continue
        if idx != list(range(idx[0], idx[-1] + 1)):
            return None  # something outside the list ran between its layers
        if weight_gemms and any(_under(weight_gemms[-1], n) for n in (first, second)):
            return None  # the model's last weight GEMM (typed as such) is in the list
        block0 = [g for g in gemms[idx[0] : idx[-1] + 1] if _under(g.name, first)]
        block1 = [g for g in gemms[idx[0] : idx[-1] + 1] if _under(g.name, second)]
        if gemms[idx[0] : idx[0] + len(block0)] != block0:
            return None
        at0, at1 = _layer_re(first), _layer_re(second)
        if [_moved(g, at0, second) for g in block0] != block1:
            return None
        for g in block0:
            b0, b1 = bindings.get(g.name), bindings.get(at0.sub(second, g.name))
            if b0 is not None and (b1 is None or _moved(b0, at0, second) != b1):
                return None
        written: list = []
        for k in cut.keys[KEEP:]:
            to = f"{cut.prefix}.{k}" if cut.prefix else k
            for g in block1:
                ng = _moved(g, at1, to)
                written.append(ng)
                if g.name in bindings:
                    bindings[ng.name] = _moved(bindings[g.name], at1, to)
                a = attention.get(g.name)
                if a is not None:  # the template's nodes: no graph is kept
                    attention[ng.name] = replace(a, unsupported=_renamed(a.unsupported, at1, to))
        gemms[idx[-1] + 1 : idx[-1] + 1] = written
    order = [g.name for g in gemms]
    return TraceResult(
        replace(schema, gemms=gemms, meta=dict(schema.meta)),
        {n: bindings[n] for n in order if n in bindings},
        result.method,
        None,
        list(result.notes),
        {n: attention[n] for n in order if n in attention},
    )


__all__ = ["KEEP", "cut_repeats", "expand", "is_meta_model"]
