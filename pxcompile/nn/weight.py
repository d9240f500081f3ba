"""``PixelflyWeight``: a sparse layer's dense weight, as a tensor that is never materialised.

A model reaches its weights in more ways than by calling the owning module: torchvision's Swin
calls ``F.linear(x, self.qkv.weight, bias)`` inside a plain function, hand-written layers do
``x @ self.w`` or ``einsum("bsi,io->bso", x, self.w)`` on a bare ``nn.Parameter``, Hugging
Face's T5 reads ``self.wo.weight.dtype`` before calling ``self.wo``. Every such weight must be
reachable by the rewrite, in models fx traces and in models only torch.export captures.

Why a tensor subclass, not a graph rewrite
------------------------------------------
Rewriting the captured graph at each GEMM node needs a runnable graph of the whole model. fx
gives one only for models it can trace; for the others, an exported program is a different,
frozen model (eval-mode only, no Python ``forward``, Hugging Face's methods gone), which the
rewrite may not hand back in place of the user's model. And each way of writing a GEMM is a
pattern to match in two graph dialects (torch-level and aten-level).

A weight that answers for itself works wherever the model's own Python code uses it, in both
cases, with no graph at all (the approach torchao takes for quantized weights):
:class:`PixelflyWeight` stands for the dense ``[out, in]`` weight of one sparse layer (or its
``[in, out]`` transpose). Its shape, dtype, device and ``requires_grad`` are the dense
weight's, ``isinstance(w, torch.Tensor)`` holds, and its ``__torch_function__`` sends each use
where it belongs:

* **GEMMs run the layer's sparse kernel** (:meth:`linear` of the layer, same code as its
  module call): ``F.linear(x, W, b)`` with the *given* bias ``b``; ``x @ W.t()``,
  ``torch.matmul`` / ``mm`` / ``Tensor.matmul``, ``W @ x`` and ``mv``; ``torch.addmm(b, x,
  W.t())``; ``einsum`` with two operands whose contraction is a plain linear map
  (``"...i,oi->...o"``, ``"bsi,io->bso"``). ``bmm`` / ``baddbmm`` take 3-D operands, so a
  2-D weight is never one: those fall under the last rule.
* **Metadata, transposes and no-op views stay sparse**: ``.shape``, ``.dtype``, ``.device``,
  ``size()``, ...; ``.t()``, ``.T``, ``.mT``, ``transpose(-2, -1)``, ``permute(1, 0)`` just
  flip the orientation; ``contiguous()``, ``to()`` / ``float()`` / ``type_as()`` that change
  nothing, ``view`` / ``reshape`` to the same shape return the weight itself.
* **Anything else is a real dense use**: the weight is materialised with the layer's
  differentiable ``dense_weight()`` (``B + U V^T``) and the function runs on that, so results
  and gradients stay exact, only not fast. The trace pass records such uses on the dense model
  (:func:`~pxcompile.nn.weight_use.weight_use` is the one classification both share) and keeps
  those weights dense with the reason. In-place writes raise: there is no dense storage.

The layer side is :class:`WeightViews`, the ``weight`` property of
:class:`~pxcompile.layers.PixelflyLinear` and :class:`~pxcompile.ops.PixelflyOp` (the op-calling
stand-in that ``pxcompile.save`` exports). A ``PixelflyWeight`` holds its layer, so a model's
``deepcopy`` copies the layer once (memo), and pickling keeps the link; it is never a
parameter or a buffer: ``state_dict()`` and ``named_parameters()`` hold the layer's ``blocks``,
``lowrank_u``, ``lowrank_v`` and ``bias`` only.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .weight_use import weight_use

__all__ = ["PixelflyWeight", "WeightViews"]


class WeightViews:
    """Mixin for a sparse linear layer: ``weight`` (and :meth:`weight_view`) as a
    :class:`PixelflyWeight`. The layer provides ``in_features``, ``out_features``, ``blocks``
    (whose dtype, device and ``requires_grad`` the weight reports), ``linear(x, bias)`` and a
    differentiable ``dense_weight()`` (``[out, in]``)."""

    #: ``weight`` is ``[in, out]`` (the layer stands in for a module that stores it so, e.g.
    #: Hugging Face's ``Conv1D``), else ``[out, in]``.
    weight_transposed: bool = False

    @property
    def weight(self) -> PixelflyWeight:
        """The dense weight as a :class:`PixelflyWeight` (read-only; nothing is materialised)."""
        return self.weight_view(self.weight_transposed)

    def weight_view(self, transposed: bool = False) -> PixelflyWeight:
        """The weight as ``[out, in]``, or ``[in, out]`` when ``transposed``."""
        # Made once per orientation (a wrapper costs microseconds; a module is called on every
        # step): its dtype, device and requires_grad are read from the layer at each use.
        views = self.__dict__.get("_weight_views")
        if views is None:
            views = self.__dict__["_weight_views"] = {}
        w = views.get(transposed)
        if w is None:
            w = views[bool(transposed)] = PixelflyWeight(self, transposed)
        return w


class PixelflyWeight(Tensor):
    """The dense weight of a sparse linear ``layer`` (``[out, in]``; ``[in, out]`` when
    ``transposed``), computed through the layer's sparse kernel wherever it is used in a GEMM
    (see the module doc)."""

    layer: Any
    transposed: bool
    #: ``weight.data``: no gradient, and every use but metadata and writes runs on the
    #: materialised (detached) weight; writes raise as on the weight itself, where a plain
    #: materialised ``.data`` would take them and lose them silently.
    detached: bool = False
    stands_for_sparse_layer = True  # how weight_use tells it from other tensors

    @staticmethod
    def __new__(cls, layer: Any, transposed: bool = False, meta: tuple | None = None):
        # meta: (shape, dtype, device) when the layer can't be asked (a copy or an unpickled
        # object still being built)
        if meta is None:
            shape = (layer.in_features, layer.out_features)
            meta = (shape if transposed else shape[::-1], layer.blocks.dtype, layer.blocks.device)
        shape, dtype, device = meta
        # requires_grad stays off on the wrapper itself (autograd never sees it; the property
        # below answers for the layer), so that it can be made under inference_mode too
        w = Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device)
        w.layer = layer
        w.transposed = bool(transposed)
        return w

    def __init__(self, layer: Any, transposed: bool = False, meta: tuple | None = None) -> None:
        pass  # all done in __new__

    # The layer's parameters may change dtype, device or requires_grad after this object was
    # made (``model.to(...)``, ``requires_grad_``): read them from the layer, not the wrapper.
    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        return self.layer.blocks.dtype

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return self.layer.blocks.device

    @property
    def requires_grad(self) -> bool:  # type: ignore[override]
        return not self.detached and self.layer.blocks.requires_grad

    def detached_view(self) -> PixelflyWeight:
        """What ``.data`` gives: this weight without gradient (see ``detached``)."""
        w = PixelflyWeight(self.layer, self.transposed, self._meta())
        w.detached = True
        return w

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return self.device.type == "cuda"

    @property
    def is_cpu(self) -> bool:  # type: ignore[override]
        return self.device.type == "cpu"

    def dense(self) -> Tensor:
        """The dense weight, materialised (differentiable unless ``detached``): a plain
        tensor."""
        w = self.layer.dense_weight()
        if self.detached:
            w = w.detach()
        return w.t() if self.transposed else w

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        o, i = (self.shape[1], self.shape[0]) if self.transposed else tuple(self.shape)
        t = ".t()" if self.transposed else ""
        return (
            f"PixelflyWeight(out={o}, in={i}{t}, dtype={self.dtype}, device={self.device}, "
            f"layer={type(self.layer).__name__})"
        )

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __hash__(self) -> int:  # Tensor hashes by identity; don't materialise for it
        return id(self)

    def _meta(self) -> tuple:
        return (tuple(self.shape), self.dtype, self.device)

    def __deepcopy__(self, memo: dict) -> PixelflyWeight:
        # The layer is copied through the memo: once per model copy, and possibly still being
        # built when this is reached from its own attributes.
        out = PixelflyWeight(copy.deepcopy(self.layer, memo), self.transposed, self._meta())
        out.detached = self.detached
        memo[id(self)] = out
        return out

    def __reduce_ex__(self, protocol: Any) -> tuple:
        return (PixelflyWeight, (self.layer, self.transposed, self._meta()))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _DATA and len(args) == 1:
            return args[0].detached_view()
        if not kwargs:  # the common GEMMs, checked inline (a few microseconds per call)
            out = _fast_gemm(cls, func, args)
            if out is not None:
                return out
        kwargs = kwargs or {}
        use = weight_use(func, args, kwargs, _orientation)
        if use.kind == "meta":
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        detached = any(isinstance(a, cls) and a.detached for a in pytree.tree_leaves(args))
        if use.kind in ("view", "gemm") and use.run is not None:
            if not detached:
                out = use.run()
                if out is not NotImplemented:
                    return out
            elif use.kind == "view":  # ``weight.data.t()``: still no storage to write into
                out = use.run()
                if isinstance(out, cls):
                    return out.detached_view()
        if use.kind == "write":
            w = next(a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, cls))
            raise RuntimeError(
                f"{getattr(func, '__name__', func)} would write into the weight of a sparse "
                f"{type(w.layer).__name__}, which has no dense storage; change its blocks, "
                "lowrank_u and lowrank_v instead"
            )
        args, kwargs = pytree.tree_map_only(cls, PixelflyWeight.dense, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Every use is answered in __torch_function__; reaching here means torch functions
        # were disabled around the call, and computing on a materialised copy would lose the
        # gradient silently.
        raise RuntimeError(
            f"a PixelflyWeight reached {func} with torch functions disabled; use the layer "
            "(or its dense_weight()) instead"
        )


_LINEAR = torch.nn.functional.linear
_DATA = {Tensor.data.__get__}  # a new method-wrapper at each access: compared by equality
_MATMULS = {torch.matmul, Tensor.matmul, Tensor.__matmul__}
_FLIPS = {torch.t, Tensor.t, Tensor.T.__get__, Tensor.mT.__get__}


def _fast_gemm(cls: type, func: Any, args: tuple) -> Tensor | None:
    """``F.linear(x, W[, b])``, ``x @ W.t()`` in the layer's orientation and ``W.t()`` itself,
    the same as :func:`~pxcompile.nn.weight_use.weight_use` would run them, without its
    generality; None for anything else."""
    if func in _FLIPS and len(args) == 1:
        if args[0].__class__ is not cls or args[0].detached:
            return None
        return args[0].layer.weight_view(not args[0].transposed)
    if func is _LINEAR and 2 <= len(args) <= 3:
        x, w = args[0], args[1]
        b = args[2] if len(args) == 3 else None
        if w.__class__ is not cls or w.transposed or w.detached:
            return None
        lay = w.layer
        if b is not None and (b.__class__ is cls or b.dim() != 1 or b.shape[0] != lay.out_features):
            return None
    elif func in _MATMULS and len(args) == 2:
        x, w = args
        if w.__class__ is not cls or not w.transposed or w.detached:
            return None
        lay, b = w.layer, None
    else:
        return None
    if x.__class__ is cls or not isinstance(x, Tensor) or x.dim() < 1:
        return None
    if x.shape[-1] != lay.in_features:
        return None
    if x.dtype != lay.blocks.dtype and not torch.is_autocast_enabled(x.device.type):
        return None
    return lay.linear(x, b)


def _orientation(t: Any) -> bool | None:
    return t.transposed if isinstance(t, PixelflyWeight) else None
