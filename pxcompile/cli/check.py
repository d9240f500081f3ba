"""``pxcompile check MODEL.py``: how well each rewritten layer approximates the dense original.

pxcompile check examples/mixer.py --budget 0.3
pxcompile check model.py --plan model.plan.yaml --warn-above 0.3 --json
"""

from __future__ import annotations

import argparse
import json

from ..check import WARN_ABOVE, CheckResult, check_compiled
from ..errors import PxError
from .common import Parser, add_plan_args, checked_arg, guard, plan_model

_warn_above = checked_arg(float, lambda v: v > 0, "a number > 0", "> 0")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="pxcompile check",
        description="Per-layer relative error of the rewrite against the dense original at "
        "initialization; warns about layers the budget approximates poorly.",
        epilog="examples:\n  pxcompile check examples/mixer.py --budget 0.3\n"
        "  pxcompile check model.py --plan model.plan.yaml --warn-above 0.3 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="a model file (.py) defining `model` and `example_inputs`")
    add_plan_args(p)
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

    from .. import api
    from ..model_specs import is_model_spec, load_model, require_weights, source_name
    from ..report import make_console

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
        from ..errors import BudgetNotAttainable

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
    args = build_parser().parse_args(argv)
    return guard(lambda: run_check(args))
