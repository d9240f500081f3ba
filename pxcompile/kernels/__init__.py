"""Kernels by device, behind one interface the layers call.

* ``pxcompile.kernels.cpu``: plain PyTorch ops (optionally fused by ``torch.compile``), tuned for
  CPU threads; they run on any device (the ``"torch"`` kernels).
* ``pxcompile.kernels.triton``: Triton kernels (the ``"triton"`` kernels), for CUDA GPUs; on CPU
  tensors they run in Triton's interpreter (tests, no GPU needed).

Which one runs is decided per call by :func:`select` from ``PXCOMPILE_KERNELS``:

* ``auto`` (default): Triton for CUDA tensors when ``triton`` imports, PyTorch otherwise;
* ``torch``: always the PyTorch kernels;
* ``triton``: always Triton. On CPU tensors that needs Triton's interpreter
  (``TRITON_INTERPRET=1``); without it, it is a one-line :class:`~pxcompile.errors.PxError`,
  never a silent fallback.

Both variables are read at each call (a ``torch.compile``'d graph keeps the choice it was traced
with). ``TRITON_INTERPRET=1`` must be in the environment *before Python imports triton*: Triton
builds its own library functions (``tl.zeros``, ``tl.sum``, ...) for the interpreter or for the
compiler at import time, from that variable. Set it in the shell (``TRITON_INTERPRET=1 python
...``), not with ``os.environ`` after ``import torch`` (PyTorch may import triton itself); a
process where it was set too late gets a one-line error saying so. pxcompile's own kernels are
built per call (interpreted or compiled) from the same variable.

Adding a Triton kernel for an op: one line in :data:`TRITON_KERNELS`, then ``if select("op",
x) == "triton": ...`` where the op runs.
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache

import torch
from torch import Tensor

from pxcompile.errors import PxError

__all__ = [
    "CHOICES",
    "ENV",
    "TRITON_KERNELS",
    "interpreting",
    "select",
    "setting",
    "triton_available",
]

#: The environment variable that picks the kernels.
ENV = "PXCOMPILE_KERNELS"

#: Its values.
CHOICES = ("auto", "torch", "triton")

#: Ops that have a Triton kernel: op name -> the module that holds it.
TRITON_KERNELS: dict[str, str] = {
    "linear": "pxcompile.kernels.triton.linear",
    "attention": "pxcompile.kernels.triton.attention",
}


def setting() -> str:
    """``PXCOMPILE_KERNELS`` now (``auto`` when unset or empty), validated."""
    raw = os.environ.get(ENV, "")
    value = raw.strip().lower() or "auto"
    if value not in CHOICES:
        raise PxError(f"{ENV}={raw!r} is not one of {', '.join(CHOICES)}")
    return value


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``import triton`` works (checked once per process)."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # noqa: BLE001 - missing, or broken install: no Triton
        return False
    return True


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's interpreter: ``TRITON_INTERPRET`` is set now (as
    Triton reads it). Raises :class:`PxError` when it was not set yet when triton was imported
    (Triton's library functions were then built for the compiler and cannot be interpreted)."""
    import triton

    if not triton.knobs.runtime.interpret:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton.language.standard.zeros, InterpretedFunction):
        raise PxError(
            "TRITON_INTERPRET=1 was set after triton was imported in this process; set it "
            "before Python starts (TRITON_INTERPRET=1 python ...)"
        )
    return True


@torch.compiler.assume_constant_result
def _choose(op: str, device_type: str) -> str:
    """``"torch"``, ``"triton"`` or ``"error: <message>"``: a constant to ``torch.compile``
    (called once while tracing, so the error is raised by :func:`select`, not inside dynamo)."""
    try:
        return _decide(op, device_type)
    except PxError as e:
        return f"error: {e}"


def _decide(op: str, device_type: str) -> str:
    value = setting()
    if value == "torch":
        return "torch"
    has_kernel = op in TRITON_KERNELS
    if value == "auto":
        ok = has_kernel and device_type == "cuda" and triton_available()
        return "triton" if ok else "torch"
    where = f"{ENV}=triton ({op} on {device_type} tensors)"
    if not has_kernel:
        raise PxError(f"{where}: there is no Triton kernel for {op}; use {ENV}=auto or torch")
    if not triton_available():
        raise PxError(f"{where}: triton is not installed (pip install triton)")
    if device_type != "cuda" and not interpreting():
        raise PxError(
            f"{where}: Triton runs on CUDA GPUs; on {device_type} it needs Triton's interpreter "
            "(TRITON_INTERPRET=1, set before Python starts)"
        )
    return "triton"


def select(op: str, x: Tensor) -> str:
    """Which kernel runs ``op`` (a key of :data:`TRITON_KERNELS`, e.g. ``"linear"``) on ``x``'s
    device now: ``"torch"`` or ``"triton"`` (see the module doc). A bad ``PXCOMPILE_KERNELS``,
    or ``triton`` where Triton cannot run, is a one-line :class:`PxError`."""
    choice = _choose(op, x.device.type)
    if choice.startswith("error: "):
        raise PxError(choice[len("error: ") :])
    return choice
