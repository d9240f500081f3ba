"""What every ``pxcompile`` subcommand shares: argument types, the one-line error guard, the
planning flags and how they become a plan, and writing the outputs all or nothing."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console

from ..errors import PxError


def checked_arg(
    cast: Callable[[str], Any], ok: Callable[[Any], bool], want: str, bound: str | None = None
) -> Callable[[str], Any]:
    """An argparse ``type``: ``cast(s)``, refused with "must be ``want``" when it does not
    parse and "must be ``bound``" (default ``want``) when ``ok`` says it is out of range."""

    def parse(s: str) -> Any:
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {bound or want}, got {s}")
        return v

    return parse


budget_arg = checked_arg(float, lambda v: 0 < v <= 1, "a number in (0, 1]", "in (0, 1]")
block_arg = checked_arg(int, lambda v: v >= 1 and not v & (v - 1), "a power of two")
positive_arg = checked_arg(int, lambda v: v >= 1, "a positive integer")


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"pxcompile: error: {message}\n")
        raise SystemExit(2)


def add_plan_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("planning")
    g.add_argument(
        "--budget",
        type=budget_arg,
        help="fraction of the eligible GEMMs' dense FLOPs to keep, in (0, 1], e.g. 0.3",
    )
    g.add_argument(
        "--block",
        type=block_arg,
        default=None,
        help="hardware block size, a power of two (default 32)",
    )
    g.add_argument(
        "--policy", metavar="FILE", help="policy YAML (see README: Policy), e.g. policy.yaml"
    )
    g.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one policy field, e.g. --set types.attn_proj.eligible=false",
    )
    g.add_argument(
        "--dense",
        metavar="PATTERN",
        action="append",
        default=[],
        help="keep matching GEMMs dense: a name, a glob or re:REGEX, e.g. --dense 're:.*attn.*'",
    )
    g.add_argument(
        "--cost-model",
        metavar="NAME|FILE",
        default=None,
        help="how the mapping pass prices patterns: calibrated-cpu (default; fitted to this "
        "project's CPU measurements), flops+blocks, gpu (a roofline prediction for H100-class "
        "GPUs, not yet measured), or a file from `pxcompile calibrate -o FILE`",
    )
    g.add_argument(
        "--strict", action="store_true", help="fail (exit 3) when the budget is not attainable"
    )
    g.add_argument(
        "--plan",
        metavar="FILE",
        help="apply this plan YAML instead of planning, e.g. --plan gpt2.plan.yaml",
    )
    g.add_argument(
        "--model",
        default="model",
        help="model.py: name of the nn.Module or factory (default 'model')",
    )
    g.add_argument(
        "--inputs",
        default="example_inputs",
        help="model.py: name of the inputs tuple or factory (default 'example_inputs')",
    )


def guard(fn) -> int:
    err = Console(stderr=True, highlight=False)
    try:
        return fn()
    except PxError as e:
        err.print(f"pxcompile: error: {e}", markup=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        err.print("pxcompile: interrupted", markup=False)
        return 130


def cost_model_arg(args: argparse.Namespace):
    """``--cost-model NAME|FILE``, or None: the policy's ``cost_model``, else calibrated-cpu."""
    from ..cost_file import resolve

    spec = getattr(args, "cost_model", None)
    return resolve(spec) if spec else None


def policy_arg(args: argparse.Namespace):
    from ..policy import Policy

    pol = Policy.load(args.policy) if args.policy else Policy()
    return pol.with_overrides(args.set).with_dense(args.dense)


def load_plan_for(args: argparse.Namespace, schema):
    """``--plan FILE`` fitted to ``schema``; planning flags don't mix with it."""
    from ..plans import Plan

    if args.budget is not None:
        raise PxError("give --budget or --plan, not both")
    for flag, val in (("--policy", args.policy), ("--set", args.set), ("--dense", args.dense)):
        if val:
            raise PxError(f"{flag} applies to planning, not to --plan: edit the plan instead")
    plan = Plan.load(args.plan).check_against(schema, args.plan)
    if args.block is not None and args.block != plan.block:
        raise PxError(f"--block {args.block} differs from the plan's block {plan.block}")
    return plan


def plan_model(args: argparse.Namespace, model, traced):
    """The plan for a traced model file: ``--plan FILE``, or the passes with the flags' budget,
    block, policy and cost model (shared by compile, bench and check)."""
    from .. import api

    if args.plan:
        return load_plan_for(args, traced.schema)
    if args.budget is None:
        raise PxError("--budget is required (or --plan FILE), e.g. --budget 0.3")
    return api.plan_traced(
        model, traced, args.budget, args.block or 32, policy_arg(args), cost_model_arg(args)
    )


def plan_schema_args(args: argparse.Namespace, schema):
    from ..passes.budget import plan_schema

    if args.plan:
        return load_plan_for(args, schema)
    if args.budget is None:
        raise PxError("--budget is required (or --plan FILE), e.g. --budget 0.3")
    return plan_schema(
        schema, args.budget, args.block or 32, policy_arg(args), cost_model_arg(args)
    )


def output_set(args: argparse.Namespace):
    """The command's output files as an :class:`~pxcompile.io.OutputSet`: every path checked
    (so a bad one fails before any work), written all or nothing, never over the input."""
    from ..io import OutputSet

    paths = {
        "-o": getattr(args, "output", None),
        "--plan-out": getattr(args, "plan_out", None),
        "--masks-out": getattr(args, "masks_out", None),
        "--draw": getattr(args, "draw", None),
    }
    from ..model_specs import source_files

    outs = OutputSet(paths, protect=source_files(args.input))
    if paths["--draw"]:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise PxError("--draw needs matplotlib: pip install 'pxcompile[draw]'") from None
    return outs


# --masks-out and --draw hold every distinct mask in memory, one bool per block: a schema may
# describe layers far too wide for that (up to 2^24), so refuse rather than run out of memory.
MAX_MASK_CELLS = 1 << 28


def check_mask_size(plan, flag: str) -> None:
    """Raise PxError when the plan's distinct masks exceed :data:`MAX_MASK_CELLS` blocks."""
    sizes: dict = {}
    for lp in plan.sparse_layers:
        g, a = lp.gemm, lp.attention
        if a is not None:
            side = a.padded_seq(g.seq or 0) // a.block
            sizes[("attention", side, a)] = side * side
        else:
            sizes[(g.out_features, g.in_features, lp.pattern)] = (g.out_features // plan.block) * (
                g.in_features // plan.block
            )
    cells = sum(sizes.values())
    if cells > MAX_MASK_CELLS:
        raise PxError(
            f"{flag}: the masks would hold {cells:,} blocks, more than {MAX_MASK_CELLS:,}: "
            "use a larger --block or leave the widest layers out"
        )


def finish(
    args: argparse.Namespace, plan, extra_files: dict | None = None, extra_columns=None
) -> int:
    """Print the report and write the outputs; exit 3 when strict and not attainable."""
    from .. import report

    outs = output_set(args)
    if args.masks_out or args.draw:
        check_mask_size(plan, "--masks-out" if args.masks_out else "--draw")
    files: dict = dict(extra_files or {})
    if args.plan_out:
        files[args.plan_out] = plan.to_yaml().encode()
    if args.masks_out:
        files[args.masks_out] = report.masks_npz_bytes(plan)
    if args.draw:
        try:
            files[args.draw] = report.draw_png_bytes(plan)
        except ImportError:
            raise PxError("--draw needs matplotlib: pip install 'pxcompile[draw]'") from None
    cost_model = cost_model_arg(args) if getattr(args, "cost_model", None) else None
    if args.json:
        print(json.dumps(report.plan_json(plan, cost_model), indent=1))
    else:
        report.print_plan(plan, report.make_console(), extra_columns, cost_model)
    if getattr(args, "strict", False) and plan.note:
        from ..errors import BudgetNotAttainable

        budget = "-" if plan.budget is None else f"{plan.budget:g}"
        raise BudgetNotAttainable(f"budget {budget} not attainable: {plan.note}")
    with outs:  # all or nothing: no existing output changes unless every one is written
        for path, data in files.items():
            outs.write_bytes(path, data)
    return 0
