"""pxcompile: a model-schema compiler for Pixelfly structured sparsity.

    >>> import pxcompile
    >>> gm = pxcompile.sparsify(model, 0.3, example_inputs=(x,))   # doctest: +SKIP

See ``pxcompile.api`` for ``trace``, ``plan``, ``apply`` and ``sparsify``.
"""

from __future__ import annotations

from .errors import PxError
from .patterns import PatternSpec, block_mask, flat_butterfly
from .plans import LayerPlan, Plan
from .policy import NameRule, Policy, TypeRule
from .schema import Gemm, LayerType, ModelSchema
from .version import __version__ as __version__

__all__ = [
    "Gemm",
    "LayerPlan",
    "LayerType",
    "ModelSchema",
    "NameRule",
    "PatternSpec",
    "Plan",
    "Policy",
    "PxError",
    "TypeRule",
    "apply",
    "block_mask",
    "flat_butterfly",
    "load",
    "plan",
    "save",
    "sparsify",
    "trace",
]


def __getattr__(name: str):
    # The torch frontend is imported lazily so that planning on schemas starts fast.
    if name in ("sparsify", "trace", "plan", "apply", "verify"):
        from . import api

        return getattr(api, name)
    if name in ("save", "load"):
        from . import serialize

        return getattr(serialize, name)
    if name == "PixelflyLinear":
        from .layers import PixelflyLinear

        return PixelflyLinear
    raise AttributeError(f"module 'pxcompile' has no attribute {name!r}")
