"""What one torch function call does with a weight: the single classification that
:class:`~pxcompile.nn.weight.PixelflyWeight` applies (and runs) at each use, and that the trace
pass applies to the dense model's parameters (:mod:`pxcompile.passes.trace.weight_uses`), so
that what the trace calls a dense use is exactly what the rewritten model would materialise.

Kinds (see :class:`WeightUse`): metadata reads; transposes and no-op views; GEMMs the sparse
kernel runs (``F.linear``, ``matmul`` / ``@`` / ``mm`` / ``mv``, ``addmm``, linear-map
``einsum``) when they take the weight in the layer's orientation; writes; and everything else,
a dense use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["WeightUse", "weight_use"]


@dataclass(frozen=True)
class WeightUse:
    """One torch function call that involves the weight.

    ``kind``: ``"none"`` (the weight is not an argument), ``"meta"`` (metadata only),
    ``"view"`` (a transpose or no-op view: the result is the weight again), ``"gemm"`` (a GEMM
    the sparse kernel runs when the weight operand ``weight`` is in orientation ``needs_t``:
    False for ``[out, in]`` as in ``F.linear``, True for ``[in, out]`` as in ``x @ W``), ``"dense"``
    (anything else: the weight's values are needed) or ``"write"`` (writes into the weight).
    ``run`` computes the result from a :class:`PixelflyWeight` (None for the trace's tensors;
    it returns NotImplemented where the dense result is needed after all, e.g. to raise
    torch's own shape error)."""

    kind: str
    needs_t: bool = False
    run: Callable[[], Any] | None = None
    weight: Any = None  # "gemm": the weight operand


_NONE = WeightUse("none")
_META = WeightUse("meta")
_DENSE = WeightUse("dense")
_WRITE = WeightUse("write")
_VIEW = WeightUse("view")

Orientation = Callable[[Any], Any]  # a tensor -> None (not the weight), False, True, or other


def weight_use(func: Any, args: tuple, kwargs: dict, orient: Orientation) -> WeightUse:
    """Classify ``func(*args, **kwargs)`` for the weight that ``orient`` recognises.

    ``orient(t)``: None if ``t`` is not the weight, else its orientation relative to the
    layer (False ``[out, in]``, True ``[in, out]``; anything else: some other view of it, e.g.
    a slice, which no GEMM can take as the weight). ``run`` is set only when the weight
    arguments are :class:`PixelflyWeight` objects.
    """
    if not _mentions(args, orient) and not _mentions(kwargs.values(), orient):
        return _NONE
    if func in _META_FUNCS:
        return _META
    rule = _RULES.get(func)
    if rule is not None:
        return rule(args, kwargs, orient)
    name = getattr(func, "__name__", "")
    if name in ("__set__", "__setitem__") or (_in_place(name) and name != "requires_grad_"):
        first = args[0] if args else None
        if isinstance(first, Tensor) and orient(first) is not None:
            return _WRITE
    out = kwargs.get("out")
    if isinstance(out, Tensor) and orient(out) is not None:
        return _WRITE
    return _DENSE


def _mentions(args: Any, orient: Orientation) -> bool:
    """Is the weight among ``args`` (or in a list / tuple among them)?"""
    for a in args:
        if isinstance(a, Tensor):
            if orient(a) is not None:
                return True
        elif isinstance(a, (list, tuple)) and _mentions(a, orient):
            return True
    return False


def _in_place(name: str) -> bool:
    if name.startswith("__i") and name.endswith("__"):  # __iadd__, __imul__, ...
        return name not in ("__index__", "__int__", "__invert__", "__init__", "__iter__")
    return name.endswith("_") and not name.endswith("__")


def _is_pw(t: Any) -> bool:
    """A PixelflyWeight (told by its class flag: this module does not import it)."""
    return isinstance(t, Tensor) and getattr(type(t), "stands_for_sparse_layer", False)


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


# --------------------------------------------------------------------------------------------
# metadata, transposes and no-op views
# --------------------------------------------------------------------------------------------
_META_GETTERS = (
    "shape", "dtype", "device", "layout", "ndim", "is_cuda", "is_cpu", "is_meta", "is_sparse",
    "is_quantized", "is_mkldnn", "is_nested", "is_mps", "is_xpu", "requires_grad", "is_leaf",
    "grad_fn", "grad", "names", "itemsize", "nbytes", "output_nr", "_version",
)  # fmt: skip
_META_METHODS = (
    "size", "dim", "ndimension", "numel", "nelement", "__len__", "element_size", "stride",
    "is_contiguous", "is_floating_point", "is_complex", "is_signed", "get_device",
    "is_inference", "has_names", "storage_offset",
)  # fmt: skip
_META_FUNCS: set[Any] = set()
for _n in _META_GETTERS:
    if hasattr(Tensor, _n):
        _META_FUNCS.add(getattr(Tensor, _n).__get__)
for _n in _META_METHODS:
    if hasattr(Tensor, _n):
        _META_FUNCS.add(getattr(Tensor, _n))
for _n in ("numel", "is_floating_point", "is_complex", "is_signed", "is_inference"):
    if hasattr(torch, _n):
        _META_FUNCS.add(getattr(torch, _n))


def _flip(w: Any, conj: bool = False) -> WeightUse:
    """A transpose of the weight (``conj``: also conjugated, so only for real dtypes)."""
    if conj and w.is_complex():
        return _DENSE
    run = (lambda: w.layer.weight_view(not w.transposed)) if _is_pw(w) else None
    return WeightUse("view", run=run)


def _same(w: Any) -> WeightUse:
    return WeightUse("view", run=(lambda: w) if _is_pw(w) else None)


def _weight_self(args: tuple, kwargs: dict, orient: Orientation) -> Any:
    """The weight if it is the call's first argument (``self``) in an orientation, else None."""
    w = _arg(args, kwargs, 0, "input")
    return w if isinstance(w, Tensor) and orient(w) in (False, True) else None


def _rule_t(args, kwargs, orient) -> WeightUse:
    w = _weight_self(args, kwargs, orient)
    return _DENSE if w is None else _flip(w)


def _rule_conj_t(args, kwargs, orient) -> WeightUse:
    w = _weight_self(args, kwargs, orient)
    return _DENSE if w is None else _flip(w, conj=True)


def _rule_transpose(args, kwargs, orient) -> WeightUse:
    w = _weight_self(args, kwargs, orient)
    d0, d1 = _arg(args, kwargs, 1, "dim0"), _arg(args, kwargs, 2, "dim1")
    if w is None or not isinstance(d0, int) or not isinstance(d1, int):
        return _DENSE
    if not (-2 <= d0 < 2 and -2 <= d1 < 2):
        return _DENSE  # torch's own error
    return _same(w) if d0 % 2 == d1 % 2 else _flip(w)


def _rule_permute(args, kwargs, orient) -> WeightUse:
    w = _weight_self(args, kwargs, orient)
    dims = list(args[1:]) if len(args) > 1 else kwargs.get("dims")
    if dims is not None and len(dims) == 1 and isinstance(dims[0], (tuple, list, torch.Size)):
        dims = list(dims[0])
    if w is None or dims is None or len(dims) != 2 or not all(isinstance(d, int) for d in dims):
        return _DENSE
    norm = [d % 2 for d in dims if -2 <= d < 2]
    if norm == [0, 1]:
        return _same(w)
    return _flip(w) if norm == [1, 0] else _DENSE


def _rule_contiguous(args, kwargs, orient) -> WeightUse:
    w = _weight_self(args, kwargs, orient)
    return _DENSE if w is None else _same(w)


def _same_shape(w: Tensor, shape: Any) -> bool:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = shape[0]
    if not all(isinstance(s, int) for s in shape):
        return False  # view(dtype) and the like
    try:
        return torch.empty(w.shape, device="meta").view(*shape).shape == w.shape
    except RuntimeError:
        return False


def _rule_view(args, kwargs, orient) -> WeightUse:
    w = _weight_self(args, kwargs, orient)
    shape = args[1:] if len(args) > 1 else (kwargs.get("shape", kwargs.get("size")),)
    if w is None or shape == (None,) or not _same_shape(w, shape):
        return _DENSE
    return _same(w)


def _rule_view_as(args, kwargs, orient) -> WeightUse:
    w = _weight_self(args, kwargs, orient)
    other = _arg(args, kwargs, 1, "other")
    if w is None or not isinstance(other, Tensor) or orient(other) is not None:
        return _DENSE
    return _same(w) if tuple(other.shape) == tuple(w.shape) else _DENSE


def _unchanged(w: Tensor, device: Any, dtype: Any) -> bool:
    if dtype is not None and dtype != w.dtype:
        return False
    if device is None:
        return True
    device = torch.device(device)
    return device.type == w.device.type and (device.index is None or device == w.device)


def _rule_to(args, kwargs, orient) -> WeightUse:
    w = _weight_self(args, kwargs, orient)
    if w is None or kwargs.get("copy"):
        return _DENSE
    rest = {k: v for k, v in kwargs.items() if k not in ("non_blocking", "copy")}
    try:
        device, dtype, _, fmt = torch._C._nn._parse_to(*args[1:], **rest)
    except (TypeError, RuntimeError):
        return _DENSE
    keep = fmt in (None, torch.preserve_format, torch.contiguous_format)
    return _same(w) if keep and _unchanged(w, device, dtype) else _DENSE


def _rule_type_as(args, kwargs, orient) -> WeightUse:
    w = _weight_self(args, kwargs, orient)
    other = _arg(args, kwargs, 1, "other")
    if w is None or not isinstance(other, Tensor) or orient(other) is not None:
        return _DENSE
    return _same(w) if _unchanged(w, other.device, other.dtype) else _DENSE


def _rule_cast(dtype: torch.dtype | None, device: str | None):
    def rule(args, kwargs, orient) -> WeightUse:
        w = _weight_self(args, kwargs, orient)
        if w is None or len(args) > 1 or set(kwargs) - {"memory_format", "non_blocking"}:
            return _DENSE
        return _same(w) if _unchanged(w, device, dtype) else _DENSE

    return rule


# --------------------------------------------------------------------------------------------
# GEMMs
# --------------------------------------------------------------------------------------------
def _fits(x: Any, w: Any) -> bool:
    """``x`` can be the layer's input: a plain tensor whose last dim is the layer's in."""
    return (
        isinstance(x, Tensor)
        and not _is_pw(x)
        and x.dim() >= 1
        and x.shape[-1] == w.layer.in_features
        and (x.dtype == w.dtype or torch.is_autocast_enabled(x.device.type))
    )


def _gemm(w: Any, needs_t: bool, run: Callable[[], Any]) -> WeightUse:
    """A GEMM with the weight in orientation ``needs_t``; runs sparse only if it is so."""
    if _is_pw(w) and w.transposed == needs_t:
        return WeightUse("gemm", needs_t, run, w)
    return WeightUse("gemm", needs_t, None, w)


def _rule_linear(args, kwargs, orient) -> WeightUse:
    x, w, b = (_arg(args, kwargs, i, n) for i, n in enumerate(("input", "weight", "bias")))
    if not isinstance(w, Tensor) or orient(w) not in (False, True):
        return _DENSE
    if orient(x) is not None or (isinstance(b, Tensor) and orient(b) is not None):
        return _DENSE

    def run():
        if not _fits(x, w) or (b is not None and b.shape != (w.layer.out_features,)):
            return NotImplemented
        return w.layer.linear(x, b)

    return _gemm(w, False, run)


def _matmul(a: Any, b: Any, orient: Orientation, *, two_d: bool = False) -> WeightUse:
    """``a @ b`` with the weight as one operand (``two_d``: ``mm``, both must be 2-D)."""
    wa, wb = orient(a), orient(b)
    if (wa is None) == (wb is None):
        return _DENSE  # both operands are the weight
    if wb is not None:  # x @ W: W is [in, out]
        if wb not in (False, True):
            return _DENSE

        def run():
            if not _fits(a, b) or (two_d and a.dim() != 2):
                return NotImplemented
            return b.layer.linear(a, None)

        return _gemm(b, True, run)
    if wa not in (False, True):
        return _DENSE

    def run_first():  # W [out, in] @ x [..., in, n] = (x^T W^T)^T
        if not isinstance(b, Tensor) or _is_pw(b) or b.dim() < 1 or b.dtype != a.dtype:
            return NotImplemented  # (under autocast too: rare enough to run dense)
        if (two_d and b.dim() != 2) or b.shape[-2 if b.dim() > 1 else 0] != a.layer.in_features:
            return NotImplemented
        if b.dim() == 1:
            return a.layer.linear(b, None)
        return a.layer.linear(b.mT, None).mT.contiguous()

    return _gemm(a, False, run_first)


def _rule_matmul(args, kwargs, orient) -> WeightUse:
    if kwargs.get("out") is not None:
        return _WRITE if orient(kwargs["out"]) is not None else _DENSE
    return _matmul(_arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other"), orient)


def _rule_rmatmul(args, kwargs, orient) -> WeightUse:
    return _matmul(_arg(args, kwargs, 1, "other"), _arg(args, kwargs, 0, "input"), orient)


def _rule_mm(args, kwargs, orient) -> WeightUse:
    if kwargs.get("out") is not None:
        return _WRITE if orient(kwargs["out"]) is not None else _DENSE
    a, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "mat2")
    return _matmul(a, b, orient, two_d=True)


def _rule_mv(args, kwargs, orient) -> WeightUse:
    a, v = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "vec")
    if orient(v) is not None or kwargs.get("out") is not None:
        return _DENSE
    if isinstance(v, Tensor) and v.dim() != 1:
        return _DENSE
    return _matmul(a, v, orient)


def _rule_addmm(args, kwargs, orient) -> WeightUse:
    c, a, b = (_arg(args, kwargs, i, n) for i, n in enumerate(("input", "mat1", "mat2")))
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if kwargs.get("out") is not None or not isinstance(c, Tensor) or orient(c) is not None:
        return _DENSE
    if orient(a) is not None:
        return _DENSE  # W @ x plus c: rare, dense
    mm = _matmul(a, b, orient, two_d=True)
    if mm.run is None:
        return mm

    def run():
        if beta == 1 and alpha == 1 and c.shape == (b.layer.out_features,) and _fits(a, b):
            if a.dim() == 2:
                return b.layer.linear(a, c)  # the bias rides along in the kernel
        y = mm.run()  # type: ignore[misc]
        if y is NotImplemented:
            return y
        return torch.add(c if beta == 1 else beta * c, y if alpha == 1 else alpha * y)

    return WeightUse("gemm", True, run, b)


def _rule_einsum(args, kwargs, orient) -> WeightUse:
    eq = _arg(args, kwargs, 0, "equation")
    ops = list(args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str) or len(ops) != 2 or "->" not in eq:
        return _DENSE
    lhs, out = eq.replace(" ", "").split("->")
    subs = lhs.split(",")
    if len(subs) != 2:
        return _DENSE
    (xs, ws), (x, w) = subs, ops
    if orient(x) is not None:
        (xs, ws), (x, w) = (ws, xs), (w, x)
    if orient(x) is not None or orient(w) not in (False, True):
        return _DENSE
    # a linear map: x's last index is contracted with one weight index, the weight's other
    # index comes last in the output, everything else passes through in order
    if len(ws) != 2 or ws[0] == ws[1] or not ws.isalpha() or not xs or not xs[-1].isalpha():
        return _DENSE
    c = xs[-1]
    if c not in ws or c in out:
        return _DENSE
    o = ws.replace(c, "")
    if o in xs or out != xs[:-1] + o or xs[:-1].count(c):
        return _DENSE
    needs_t = ws[0] == c  # "io": W is [in, out]
    plain = xs[:-1].replace("...", "")
    if len(set(plain)) != len(plain):
        return _DENSE

    def run():
        if not _fits(x, w) or ("..." not in xs and x.dim() != len(plain) + 1):
            return NotImplemented
        return w.layer.linear(x, None)

    return _gemm(w, needs_t, run)


_RULES: dict[Any, Callable[[tuple, dict, Orientation], WeightUse]] = {}


def _add(rule, *funcs: Any) -> None:
    for f in funcs:
        if f is not None:
            _RULES[f] = rule


def _t(name: str) -> Any:
    return getattr(Tensor, name, None)


def _g(name: str) -> Any:
    d = getattr(Tensor, name, None)
    return None if d is None else d.__get__


_add(_rule_t, torch.t, _t("t"), _g("T"), _g("mT"))
_add(_rule_conj_t, _g("H"), _g("mH"), _t("adjoint"), getattr(torch, "adjoint", None))
_add(_rule_transpose, torch.transpose, _t("transpose"), torch.swapaxes, _t("swapaxes"))
_add(_rule_transpose, torch.swapdims, _t("swapdims"))
_add(_rule_permute, torch.permute, _t("permute"))
_add(_rule_contiguous, _t("contiguous"))
_add(_rule_view, _t("view"), _t("reshape"), torch.reshape)
_add(_rule_view_as, _t("view_as"), _t("reshape_as"))
_add(_rule_to, _t("to"))
_add(_rule_type_as, _t("type_as"))
_add(_rule_cast(torch.float32, None), _t("float"))
_add(_rule_cast(torch.float64, None), _t("double"))
_add(_rule_cast(torch.float16, None), _t("half"))
_add(_rule_cast(torch.bfloat16, None), _t("bfloat16"))
_add(_rule_cast(None, "cpu"), _t("cpu"))
_add(_rule_cast(None, "cuda"), _t("cuda"))
_add(_rule_linear, torch.nn.functional.linear)
_add(_rule_matmul, torch.matmul, _t("matmul"), _t("__matmul__"))
_add(_rule_rmatmul, _t("__rmatmul__"))
_add(_rule_mm, torch.mm, _t("mm"))
_add(_rule_mv, torch.mv, _t("mv"))
_add(_rule_addmm, torch.addmm, _t("addmm"))
_add(_rule_einsum, torch.einsum)
