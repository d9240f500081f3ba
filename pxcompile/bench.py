"""Side-by-side timing of a compiled model against its dense self (``pxcompile bench``).

Speed claims are ratios measured in one process, alternating the two models and taking
medians of several runs: the machine is noisy, a ratio survives that, an absolute time doesn't.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .api import Inputs, call
from .errors import PxError


def _loss(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().square().mean()
    if isinstance(out, dict) or hasattr(out, "to_tuple"):
        vals = list(out.values()) if isinstance(out, dict) else list(out.to_tuple())
        return _loss(vals[0])
    if isinstance(out, tuple | list):
        return _loss(out[0])
    raise TypeError(f"cannot make a loss from {type(out).__name__}")


def forward_fn(model: nn.Module, inputs: Inputs) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            call(model, inputs)

    return run


def train_step_fn(model: nn.Module, inputs: Inputs, lr: float = 1e-4) -> Callable[[], None]:
    """One training step: forward, a loss, backward, an SGD step."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        _loss(call(model, inputs)).backward()
        opt.step()

    return run


def paired(
    a: Callable[[], None], b: Callable[[], None], repeats: int = 5, warmup: int = 1
) -> tuple[float, float, float]:
    """Run ``a`` and ``b`` back to back ``repeats`` times (after ``warmup`` runs each) and
    return the median of the per-pair ratios ``time(a) / time(b)`` with the median seconds of
    each side. Pairs taken close together see the same machine load, so their ratio is steadier
    than a ratio of two medians on a shared machine."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise PxError(f"repeats must be a positive integer, got {repeats!r}")
    for _ in range(warmup):
        a()
        b()
    ratios, ta, tb = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a()
        t1 = time.perf_counter()
        b()
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / max(t2 - t1, 1e-9))
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return statistics.median(ratios), statistics.median(ta), statistics.median(tb)


@dataclass
class Comparison:
    forward_speedup: float  # dense time / compiled time (median of back-to-back pairs)
    train_speedup: float
    params_ratio: float  # compiled / dense
    forward_ms: tuple[float, float] = (0.0, 0.0)  # median dense, compiled (context only)
    train_ms: tuple[float, float] = (0.0, 0.0)


def compare(dense: nn.Module, compiled: nn.Module, inputs: Inputs, repeats: int = 5) -> Comparison:
    """Forward (inference mode, eval) and one training step, compiled vs dense."""
    dense.eval()
    compiled.eval()
    fwd, fd, fc = paired(forward_fn(dense, inputs), forward_fn(compiled, inputs), repeats)
    dense.train()
    compiled.train()
    trn, td, tc = paired(train_step_fn(dense, inputs), train_step_fn(compiled, inputs), repeats)
    nd = sum(p.numel() for p in dense.parameters())
    nc = sum(p.numel() for p in compiled.parameters())
    return Comparison(fwd, trn, nc / nd, (fd * 1e3, fc * 1e3), (td * 1e3, tc * 1e3))
