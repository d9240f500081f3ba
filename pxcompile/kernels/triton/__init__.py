"""Triton kernels (the ``"triton"`` kernels of :mod:`pxcompile.kernels`); importing any module
here imports triton. :func:`kernel` turns a plain Python function written in Triton into a
launchable kernel, built at first launch for Triton's compiler or its interpreter, whichever
:func:`pxcompile.kernels.interpreting` says (so that the choice is made per call, not at import).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Kernel", "kernel"]


class Kernel:
    """A Triton kernel from a plain Python function: ``k[grid](*args, **launch_options)`` runs
    it compiled (``triton.jit``) or interpreted (``TRITON_INTERPRET=1``); each form is built
    once. The function may not call Triton library functions defined with ``@triton.jit``
    only when the process imported triton in the other mode (see :mod:`pxcompile.kernels`)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._built: dict[bool, Any] = {}

    def build(self, interpret: bool) -> Any:
        k = self._built.get(interpret)
        if k is None:
            if interpret:
                from triton.runtime.interpreter import InterpretedFunction

                k = InterpretedFunction(self.fn)
            else:
                from triton.runtime.jit import JITFunction

                k = JITFunction(self.fn)
            self._built[interpret] = k
        return k

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        from pxcompile.kernels import interpreting

        return self.build(interpreting())[grid]


def kernel(fn: Callable[..., Any]) -> Kernel:
    """Decorator: ``fn`` as a :class:`Kernel` (used instead of ``@triton.jit``)."""
    return Kernel(fn)
