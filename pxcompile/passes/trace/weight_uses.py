"""How the coverage run uses each weight: the orientation its GEMMs take it in, and the first
use that needs its dense values.

The rewrite replaces a sparsified weight by a :class:`~pxcompile.nn.weight.PixelflyWeight`
wherever the model reads it (a swapped ``nn.Linear``'s ``.weight``, or a bare
``nn.Parameter``). That object runs a GEMM sparse when it takes the weight in the layer's
orientation, answers metadata reads and transposes without computing anything, and
materialises the weight for anything else. The coverage run already sees every torch function
a parameter reaches; classifying each call with the rule the ``PixelflyWeight`` itself applies
(:func:`~pxcompile.nn.weight.weight_use`) tells, per weight:

* its orientation: ``[out, in]`` (``F.linear(x, W)``, ``W @ x``) or ``[in, out]`` (``x @ W``,
  HF ``Conv1D``'s ``addmm``), fixed by its first GEMM; the layer is built so;
* its first *dense use*: anything else (``w.norm()``, ``w * 2``, ``w[:k]``, a cast to another
  dtype, a GEMM taking it the other way round), which keeps the GEMM dense with the reason
  ``weight used densely by <op> in <module>``. Reading ``.dtype`` or ``.shape`` is not one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ...nn.weight_use import weight_use
from ...schema import Gemm, ModelSchema
from .layer_types import module_kind
from .result import GemmBinding
from .sites import Params

# Torch functions whose use of a weight the rewrite takes away: nn.MultiheadAttention's
# forward (its projections become modules of the wrapper that replaces it) and the inference
# fast paths of torch's Transformer layers (turned off where layers were rewritten).
_REPLACED = {
    "multi_head_attention_forward",
    "_transformer_encoder_layer_fwd",
    "_native_multi_head_attention",
}


def _label(func: Any) -> str:
    """A short name for a torch function: ``norm``, ``mul`` (``w * 2``), ``data``."""
    name = getattr(func, "__name__", None) or str(func)
    if name in ("__get__", "__set__"):  # a Tensor property: name the property
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name.strip("_") or name


def _relative(t: torch.Tensor, p: torch.Tensor) -> Any:
    """``t``'s orientation relative to parameter ``p``: False (``p`` itself), True (its
    transpose), or "other" (a slice, a reshaped or copied view...)."""
    if p.dim() != 2 or t.dim() != 2 or t.data_ptr() != p.data_ptr():
        return "other"
    if tuple(t.shape) == tuple(p.shape) and t.stride() == p.stride():
        return False
    if tuple(t.shape) == tuple(p.shape)[::-1] and t.stride() == p.stride()[::-1]:
        return True
    return "other"


class WeightUses:
    """Filled by the coverage recorder, one torch function call at a time."""

    def __init__(self, params: Params) -> None:
        self.params = params
        #: pid -> the weight is stored ``[in, out]`` (relative to the layer the rewrite builds)
        self.transposed: dict[int, bool] = {}
        #: pid -> why its values are needed ("weight used densely by <op> in <module>")
        self.dense: dict[int, str] = {}
        #: the current module when no model module is on the Python stack (fx graphs)
        self.scope: Callable[[], str] | None = None
        self._names: dict[int, str] = {}
        for n, m in params.modules.items():
            self._names.setdefault(id(m), n)
        self._param = {pid: params.by_name[n] for pid, n in params.canon.items()}

    def record(self, func: Any, args: tuple, kwargs: dict) -> None:
        if not self.params.ranges:
            return
        pids = self._pids(args) | self._pids(kwargs.values())
        for pid in pids:
            if pid in self.dense:
                continue
            p = self._param[pid]

            def orient(t: Any, pid: int = pid, p: torch.Tensor = p) -> Any:
                if not isinstance(t, torch.Tensor) or self.params.pid_of_tensor(t) != pid:
                    return None
                return _relative(t, p)

            use = weight_use(func, args, kwargs, orient)
            if use.kind in ("none", "meta", "view"):
                continue
            if use.kind == "gemm":
                o = orient(use.weight)
                if o in (False, True):
                    stored_t = o != use.needs_t
                    if self.transposed.setdefault(pid, stored_t) == stored_t:
                        continue
            if _label(func) in _REPLACED:
                continue
            self.dense[pid] = f"weight used densely by {_label(func)} in {self._where()}"

    def _pids(self, args: Any) -> set[int]:
        out: set[int] = set()
        for a in args:
            if isinstance(a, torch.Tensor):
                pid = self.params.pid_of_tensor(a)
                if pid is not None:
                    out.add(pid)
            elif isinstance(a, (list, tuple)):
                out |= self._pids(a)
        return out

    def _where(self) -> str:
        """The innermost module of the model whose code is running."""
        f = sys._getframe(1)
        while f is not None:
            s = f.f_locals.get("self")
            if isinstance(s, nn.Module) and id(s) in self._names:
                return self._names[id(s)] or "<root>"
            f = f.f_back
        return (self.scope() if self.scope is not None else "") or "<root>"

    def apply(
        self, bindings: dict[str, GemmBinding], model: nn.Module, schema: ModelSchema
    ) -> None:
        """Set each binding's ``transposed`` and, for a weight the rewrite reaches through a
        PixelflyWeight, ``unsupported`` when the run used its dense values."""
        gemms = {g.name: g for g in schema.gemms}
        for b in bindings.values():
            pid = self.params.pid(b.weight)
            if b.kind == "conv1d":
                b.transposed = True
            elif b.kind in ("functional", "functional_op"):
                if pid in self.transposed:
                    b.transposed = self.transposed[pid]
                else:  # no recorded GEMM (the coverage run failed): from the shapes
                    how = _from_shapes(self._param.get(pid), gemms.get(b.gemm), b.kind)
                    if how is None:
                        b.unsupported = "which way round its GEMMs take the weight is unknown"
                    else:
                        b.transposed = how
            if b.kind == "mha_in_proj" or _in_mha(model, b.module):
                continue  # the MultiheadAttention wrapper uses these weights as modules
            if pid is not None and pid in self.dense:
                b.unsupported = self.dense[pid]
            elif b.kind in ("functional", "functional_op") and not b.unsupported:
                b.unsupported = _against_its_module(self.params, b)


def _from_shapes(p: torch.Tensor | None, g: Gemm | None, kind: str) -> bool | None:
    """Is the weight stored ``[in, out]``, from its shape (None: can't tell)?"""
    if kind == "functional":
        return False  # F.linear(x, W) on the parameter itself
    if p is None or g is None or p.dim() != 2:
        return None
    shape = tuple(p.shape)
    out_in, in_out = (g.out_features, g.in_features), (g.in_features, g.out_features)
    if out_in == in_out or shape not in (out_in, in_out):
        return None
    return shape == in_out


def _against_its_module(params: Params, b: GemmBinding) -> str | None:
    """A Linear's (Conv1D's) weight is replaced by swapping the module, whose layer computes
    what the module computes: GEMMs taking the weight the other way round (``x @ lin.weight``)
    would all run dense."""
    owner, _, leaf = b.weight.rpartition(".")
    m = params.modules.get(owner)
    kind = module_kind(m) if m is not None else None
    if leaf != "weight" or kind not in ("linear", "conv1d") or b.transposed == (kind == "conv1d"):
        return None
    return f"the weight of {type(m).__name__} {owner!r} is used transposed in its GEMMs"


def _in_mha(model: nn.Module, module: str) -> bool:
    parent = module.rpartition(".")[0]
    try:
        return bool(module) and isinstance(model.get_submodule(parent), nn.MultiheadAttention)
    except AttributeError:
        return False
