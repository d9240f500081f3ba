"""``pxcompile check MODEL.py``: how well each rewritten layer approximates the dense original.

    pxcompile check examples/mixer.py --budget 0.3
    pxcompile check model.py --plan model.plan.yaml --warn-above 0.3 --json

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

import argparse
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from .errors import PxError

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

    from .api import _tensors, call

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
        want = _tensors(call(model, example_inputs))
        got = _tensors(call(compiled, example_inputs))
    num = den = 0.0
    for a, b in zip(want, got):
        if a.is_floating_point() and a.shape == b.shape:
            num += float((a.double() - b.double()).pow(2).sum())
            den += float(a.double().pow(2).sum())
    out_err = math.sqrt(num / den) if den > 0 else math.sqrt(num)
    return CheckResult(layers, out_err, warn_above)


def _warn_above(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from .cli import _add_plan_args, _Parser

    p = _Parser(
        prog="pxcompile check",
        description="Per-layer relative error of the rewrite against the dense original at "
        "initialization; warns about layers the budget approximates poorly.",
        epilog="examples:\n  pxcompile check examples/mixer.py --budget 0.3\n"
        "  pxcompile check model.py --plan model.plan.yaml --warn-above 0.3 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="a model file (.py) defining `model` and `example_inputs`")
    _add_plan_args(p)
    p.add_argument(
        "--warn-above",
        type=_warn_above,
        default=WARN_ABOVE,
        metavar="ERR",
        help=f"warn about layers whose relative error exceeds this (default {WARN_ABOVE})",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def run_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import api
    from .cli import plan_model
    from .model_specs import is_model_spec, load_model, require_weights, source_name
    from .report import make_console

    if Path(args.input).suffix != ".py" and not is_model_spec(args.input):
        raise PxError(f"{args.input}: check needs a model file (.py)")
    model, inputs = load_model(args.input, args.model, args.inputs)
    require_weights(model, args.input, "check")
    traced = api.trace(model, inputs, name=source_name(args.input))
    plan = plan_model(args, model, traced)
    gm = api.apply(model, plan, inputs, traced=traced, init="dense")
    res = check_compiled(model, gm, inputs, args.warn_above)
    if args.json:
        print(json.dumps(res.to_dict(), indent=1))
    else:
        _print(res, plan, make_console())
    err = make_console(stderr=True)
    if res.poor:
        names = ", ".join(f"{lc.name} ({lc.error:.2f})" for lc in res.poor[:5])
        more = f" and {len(res.poor) - 5} more" if len(res.poor) > 5 else ""
        err.print(
            f"warning: {len(res.poor)} of {len(res.layers)} rewritten layers are approximated "
            f"poorly (relative error > {args.warn_above:g}): {names}{more}. The budget may be "
            "too low for them: raise it, give them more density with a policy rule "
            "(--policy), or keep them dense (--dense NAME). Untrained, random weights are "
            "never approximated well (see the 'random' column).",
            markup=False,
            soft_wrap=True,
        )
    if not res.layers:
        err.print("warning: no layer was rewritten", markup=False)
    if getattr(args, "strict", False) and plan.note:
        from .errors import BudgetNotAttainable

        budget = "-" if plan.budget is None else f"{plan.budget:g}"
        raise BudgetNotAttainable(f"budget {budget} not attainable: {plan.note}")
    return 0


def _print(res: CheckResult, plan, console) -> None:
    from rich.table import Table

    t = Table(title="rewrite error at initialization (init=dense)", title_justify="left")
    for col, just in (
        ("layer", "left"),
        ("type", "left"),
        ("shape", "right"),
        ("pattern n/f/pb rank", "left"),
        ("density", "right"),
        ("rel. error", "right"),
        ("random", "right"),
        ("", "left"),
    ):
        t.add_column(col, justify=just)
    for lc in res.layers:
        t.add_row(
            lc.name,
            lc.type,
            lc.shape,
            lc.pattern,
            f"{lc.density:.3f}",
            f"{lc.error:.3f}",
            f"{lc.random_level:.3f}",
            "POOR" if lc.poor else "ok",
        )
    console.print(t)
    s = plan.summary
    console.print(
        f"{len(res.layers)} layers rewritten, budget achieved {s.eligible_fraction:.3f}; "
        f"model output relative error vs dense on the example inputs: {res.output_error:.3f}",
        highlight=False,
    )


def main(argv: list[str]) -> int:
    from .cli import _guard

    args = build_parser().parse_args(argv)
    return _guard(lambda: run_check(args))
