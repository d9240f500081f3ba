"""Sparse building blocks: :class:`PixelflyLinear` (``pxcompile.layers``) and
:class:`PixelflyWeight`, the tensor that stands for its dense weight wherever a model uses it
(:mod:`pxcompile.nn.weight`)."""

from __future__ import annotations

from .weight import PixelflyWeight, WeightViews

__all__ = ["PixelflyLinear", "PixelflyWeight", "WeightViews"]


def __getattr__(name: str):
    # pxcompile.layers imports pxcompile.nn.weight: import it lazily here, not at the top, so
    # that neither import is circular.
    if name == "PixelflyLinear":
        from ..layers import PixelflyLinear

        return PixelflyLinear
    raise AttributeError(f"module 'pxcompile.nn' has no attribute {name!r}")
