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
from rich.table import Table
from torch import nn

from .errors import PxError
from .inputs import Inputs, call
from .passes.mapping import CostModel, predicted_speedup
from .patterns import PatternSpec
from .plans import Plan
from .schema import Gemm


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


def layer_ratio(
    gemm: Gemm, spec: PatternSpec, repeats: int = 3, execution: str | None = None
) -> float:
    """Pixelfly / dense forward time (no grad) of one layer of ``gemm``'s shape at its rows:
    ``F.linear`` against a :class:`~pxcompile.layers.PixelflyLinear` with ``spec`` (running
    ``execution``'s CPU kernel when given, else the one it picks), median of back-to-back
    pairs (a first pair warms up, and compiles where the layer compiles)."""
    from .layers import PixelflyLinear

    torch.manual_seed(0)
    o, i = gemm.out_features, gemm.in_features
    w, b = torch.randn(o, i) / i**0.5, torch.zeros(o)
    layer = PixelflyLinear(i, o, spec)
    if execution is not None:
        layer.execution = execution
    x = torch.randn(max(1, gemm.rows), i)

    def dense() -> None:
        with torch.no_grad():
            torch.nn.functional.linear(x, w, b)

    def sparse() -> None:
        with torch.no_grad():
            layer(x)

    return paired(sparse, dense, repeats=repeats, warmup=1)[0]


@dataclass
class LayerSpeed:
    """Predicted and measured forward speedup of the sparse weight GEMMs of one shape,
    pattern and row count (``names``: the plan's GEMMs that share them)."""

    names: list[str]
    gemm: Gemm
    spec: PatternSpec
    predicted: float
    measured: float

    @property
    def error(self) -> float:
        """predicted / measured - 1 (positive: the cost model is optimistic)."""
        return self.predicted / self.measured - 1.0


def layer_table(layers: list[LayerSpeed], cost_model: CostModel) -> Table:
    """Predicted vs measured speedup per distinct sparse layer, and the model's RMS error."""
    import math

    t = Table(
        title=f"each sparse layer alone, forward: predicted ({cost_model.name}) vs measured",
        title_justify="left",
    )
    for col in ("GEMMs", "shape", "rows", "pattern n/f/pb", "rank", "pred x", "meas x", "error"):
        t.add_column(col, justify="left" if col == "GEMMs" else "right")
    for ls in layers:
        s = ls.spec
        more = f" (+{len(ls.names) - 1})" if len(ls.names) > 1 else ""
        t.add_row(
            ls.names[0] + more,
            f"{ls.gemm.out_features}x{ls.gemm.in_features}",
            str(ls.gemm.rows),
            f"{s.butterfly}/{s.factors}/{s.pattern_block}",
            str(s.rank),
            f"{ls.predicted:.2f}",
            f"{ls.measured:.2f}",
            f"{ls.error:+.0%}",
        )
    if layers:
        rms = math.sqrt(sum(math.log(x.predicted / x.measured) ** 2 for x in layers) / len(layers))
        t.caption = f"RMS log error {rms:.2f} (pxcompile calibrate fits the model to this machine)"
    return t


def layer_speedups(
    plan: Plan,
    cost_model: CostModel | None = None,
    repeats: int = 3,
    progress: Callable[[int, int], None] | None = None,
) -> list[LayerSpeed]:
    """Each distinct sparse weight layer of ``plan`` timed alone (:func:`layer_ratio`) beside
    what ``cost_model`` (default: the report's, calibrated-cpu) predicts for it."""
    from .report import prediction_model

    model = prediction_model(plan, cost_model)
    groups: dict[tuple, list] = {}
    for lp in plan.sparse_weight_layers:
        g, spec = lp.gemm, lp.pattern
        groups.setdefault((g.out_features, g.in_features, g.rows, spec), []).append(lp)
    out = []
    for k, lps in enumerate(groups.values()):
        g, spec = lps[0].gemm, lps[0].pattern
        measured = 1.0 / layer_ratio(g, spec, repeats)
        out.append(
            LayerSpeed(
                [lp.name for lp in lps], g, spec, predicted_speedup(g, spec, model), measured
            )
        )
        if progress:
            progress(k + 1, len(groups))
    return out
