"""How well each rewritten layer approximates the dense original (``pxcompile check``).

The model is rewritten with ``init="dense"`` (kept blocks copied, low-rank term fitted to the
residual by truncated SVD), and for every rewritten layer the command prints the relative error
``||W - (B + U V^T)||_F / ||W||_F`` of its weight at initialization, next to the error an
unstructured random matrix would have at the same density (about ``sqrt(1 - density)``: trained
weights with structure do better; random, untrained weights don't). Layers whose error is above
``--warn-above`` (default 0.5) get a warning on stderr: a sign the budget is too low for them
(give them more density with a policy rule, or keep them dense). It also reports the relative
output error of the whole compiled model against the dense model on the example inputs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

#: Default ``--warn-above``: a rewrite losing more than half of a weight's norm is poor.
WARN_ABOVE = 0.5


@dataclass
class LayerCheck:
    name: str
    type: str
    shape: str  # "out x in"
    pattern: str
    density: float
    error: float  # relative Frobenius error of the weight at init
    random_level: float  # ~ error of an unstructured random matrix at this density
    poor: bool


@dataclass
class CheckResult:
    layers: list[LayerCheck]
    output_error: float  # ||y_compiled - y_dense||_F / ||y_dense||_F on the example inputs
    warn_above: float

    @property
    def poor(self) -> list[LayerCheck]:
        return [lc for lc in self.layers if lc.poor]

    def to_dict(self) -> dict[str, Any]:
        return {
            "warn_above": self.warn_above,
            "output_error": self.output_error,
            "layers": [asdict(lc) for lc in self.layers],
            "poor": [lc.name for lc in self.poor],
        }


def _pattern(spec) -> str:
    return f"{spec.butterfly}/{spec.factors}/{spec.pattern_block} r{spec.rank}"


def check_compiled(model, compiled, example_inputs, warn_above: float = WARN_ABOVE) -> CheckResult:
    """Per-layer init errors of ``compiled`` (from :func:`pxcompile.sparsify` or
    :func:`pxcompile.apply`, ideally with ``init="dense"``) and its output error against
    ``model`` on ``example_inputs``."""
    import torch

    from .inputs import call, output_tensors

    plan = compiled.pxcompile_plan
    errors = compiled.pxcompile_init_errors
    layers = []
    for name in compiled.pxcompile_layers:
        lp = plan[name]
        err = errors.get(name)
        if err is None:  # scratch init: measure against the dense weight directly
            err = float("nan")
        d = lp.density
        g = lp.gemm
        layers.append(
            LayerCheck(
                name=name,
                type=g.type.value if hasattr(g.type, "value") else str(g.type),
                shape=f"{g.out_features}x{g.in_features}",
                pattern=_pattern(lp.pattern),
                density=d,
                error=float(err),
                random_level=math.sqrt(max(0.0, 1.0 - d)),
                poor=bool(err > warn_above),
            )
        )
    with torch.no_grad():
        want = output_tensors(call(model, example_inputs))
        got = output_tensors(call(compiled, example_inputs))
    num = den = 0.0
    for a, b in zip(want, got):
        if a.is_floating_point() and a.shape == b.shape:
            num += float((a.double() - b.double()).pow(2).sum())
            den += float(a.double().pow(2).sum())
    out_err = math.sqrt(num / den) if den > 0 else math.sqrt(num)
    return CheckResult(layers, out_err, warn_above)
