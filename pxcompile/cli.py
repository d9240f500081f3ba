"""The ``pxcompile`` command.

    pxcompile SCHEMA.yaml --budget 0.3 --block 32        plan a model described by a schema
    pxcompile MODEL.py --budget 0.3 --block 32 -o m.px   trace, plan, rewrite and save a model

User mistakes end with one line on stderr and exit code 2; nothing half-written is left.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from . import __version__
from .errors import PxError

EPILOG = """\
examples:
  pxcompile schemas/gpt2-small.yaml --budget 0.3 --block 32
  pxcompile schemas/vit-b16.yaml --budget 0.3 --plan-out vit.plan.yaml --masks-out vit.npz
  pxcompile schemas/vit-b16.yaml --plan vit.plan.yaml          # re-apply an (edited) plan
  pxcompile schemas/bert-base.yaml --budget 0.3 --dense 're:.*attention.*' --json
  pxcompile schemas/mixer-b16.yaml --budget 0.3 --set size_exponent=0.5 --draw masks.png
  pxcompile examples/mixer.py --budget 0.3 --block 32 -o mixer.px
  pxcompile hf:examples/hf/llama-2-7b --budget 0.3 --plan-out llama.plan.yaml   # no weights
  pxcompile timm:mixer_b16_224 --budget 0.3      # also torchvision:NAME (built on meta)
other commands:
  pxcompile trace MODEL --schema-out s.yaml  dump the traced schema (a start for a YAML schema)
  pxcompile bench MODEL.py --budget 0.3     measure the compiled model against its dense self
  pxcompile check MODEL.py --budget 0.3     per-layer error of the rewrite at initialization
  pxcompile calibrate -o cost.yaml          fit the cost model to this machine (--cost-model FILE)
"""


def _budget(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {s!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


def _block(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a power of two, got {s!r}") from None
    if v < 1 or v & (v - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two, got {s}")
    return v


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"pxcompile: error: {message}\n")
        raise SystemExit(2)


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("planning")
    g.add_argument(
        "--budget",
        type=_budget,
        help="fraction of the eligible GEMMs' dense FLOPs to keep, in (0, 1], e.g. 0.3",
    )
    g.add_argument(
        "--block",
        type=_block,
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


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pxcompile",
        description="Compile a model to Pixelfly sparsity (flat block butterfly + low rank).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "input",
        help="a model schema (.yaml), a model file (.py), or a model built from its config "
        "without weights: hf:PATH (a config.json or its directory), timm:NAME, "
        "torchvision:NAME (options: hf:PATH,seq=2048,batch=8; timm:NAME,size=384)",
    )
    _add_plan_args(p)
    o = p.add_argument_group("outputs")
    o.add_argument(
        "--plan-out", metavar="FILE", help="write the plan as YAML, e.g. --plan-out plan.yaml"
    )
    o.add_argument(
        "--masks-out",
        metavar="FILE.npz",
        help="write each sparse layer's block mask, e.g. --masks-out masks.npz",
    )
    o.add_argument(
        "--draw",
        metavar="FILE.png",
        help="draw the distinct masks side by side, e.g. --draw masks.png",
    )
    o.add_argument(
        "--json", action="store_true", help="print the report as JSON instead of a table"
    )
    o.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="model.py: write the compiled model, e.g. -o model.px",
    )
    o.add_argument(
        "--init",
        choices=["auto", "dense", "scratch"],
        default="auto",
        help="model.py: start the sparse layers from the dense weights (a trained model), "
        "sampled to keep each layer's output scale (a fresh model to train), or auto "
        "(default: scratch if the weights look freshly initialised, else dense)",
    )
    p.add_argument("--version", action="version", version=f"pxcompile {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    return _guard(lambda: _compile(args))


def _guard(fn) -> int:
    err = Console(stderr=True, highlight=False)
    try:
        return fn()
    except PxError as e:
        err.print(f"pxcompile: error: {e}", markup=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        err.print("pxcompile: interrupted", markup=False)
        return 130


def _cost_model(args: argparse.Namespace):
    """``--cost-model NAME|FILE``, or None: the policy's ``cost_model``, else calibrated-cpu."""
    from .cost_file import resolve

    spec = getattr(args, "cost_model", None)
    return resolve(spec) if spec else None


def _policy(args: argparse.Namespace):
    from .policy import Policy

    pol = Policy.load(args.policy) if args.policy else Policy()
    return pol.with_overrides(args.set).with_dense(args.dense)


def load_plan_for(args: argparse.Namespace, schema):
    """``--plan FILE`` fitted to ``schema``; planning flags don't mix with it."""
    from .plans import Plan

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
    from . import api

    if args.plan:
        return load_plan_for(args, traced.schema)
    if args.budget is None:
        raise PxError("--budget is required (or --plan FILE), e.g. --budget 0.3")
    return api._plan_traced(
        model, traced, args.budget, args.block or 32, _policy(args), _cost_model(args)
    )


def _make_plan(args: argparse.Namespace, schema):
    from .passes.budget import plan_schema

    if args.plan:
        return load_plan_for(args, schema)
    if args.budget is None:
        raise PxError("--budget is required (or --plan FILE), e.g. --budget 0.3")
    return plan_schema(schema, args.budget, args.block or 32, _policy(args), _cost_model(args))


def output_set(args: argparse.Namespace):
    """The command's output files as an :class:`~pxcompile.io.OutputSet`: every path checked
    (so a bad one fails before any work), written all or nothing, never over the input."""
    from .io import OutputSet

    paths = {
        "-o": getattr(args, "output", None),
        "--plan-out": getattr(args, "plan_out", None),
        "--masks-out": getattr(args, "masks_out", None),
        "--draw": getattr(args, "draw", None),
    }
    from .model_specs import source_files

    outs = OutputSet(paths, protect=source_files(args.input))
    if paths["--draw"]:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise PxError("--draw needs matplotlib: pip install 'pxcompile[draw]'") from None
    return outs


def _compile(args: argparse.Namespace) -> int:
    from .model_specs import is_model_spec, parse_spec, weights_needed
    from .schema import ModelSchema

    path = Path(args.input)
    spec = is_model_spec(args.input)
    if spec:
        parse_spec(args.input)  # a malformed spec fails before anything is imported
        if args.output:
            raise weights_needed(args.input, "-o/--output")
    elif not path.exists():
        raise PxError(f"{args.input}: no such file")
    if args.output and path.suffix != ".py":
        raise PxError("-o/--output needs a model file (.py); for a schema use --plan-out")
    output_set(args)  # bad output paths fail now, not after the work
    if spec or path.suffix == ".py":
        from .frontend_cli import compile_model_file  # imports torch: only for models

        return compile_model_file(args)
    schema = ModelSchema.load(path)
    plan = _make_plan(args, schema)
    return _finish(args, plan)


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


def _finish(
    args: argparse.Namespace, plan, extra_files: dict | None = None, extra_columns=None
) -> int:
    """Print the report and write the outputs; exit 3 when strict and not attainable."""
    from . import report

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
    cost_model = _cost_model(args) if getattr(args, "cost_model", None) else None
    if args.json:
        print(json.dumps(report.plan_json(plan, cost_model), indent=1))
    else:
        report.print_plan(plan, report.make_console(), extra_columns, cost_model)
    if getattr(args, "strict", False) and plan.note:
        from .errors import BudgetNotAttainable

        budget = "-" if plan.budget is None else f"{plan.budget:g}"
        raise BudgetNotAttainable(f"budget {budget} not attainable: {plan.note}")
    with outs:  # all or nothing: no existing output changes unless every one is written
        for path, data in files.items():
            outs.write_bytes(path, data)
    return 0


def _trace_cmd(argv: list[str]) -> int:
    p = _Parser(
        prog="pxcompile trace",
        description="Trace a model file into a model schema (every GEMM, its type and rows).",
        epilog="examples:\n  pxcompile trace examples/vit.py --schema-out vit.yaml\n"
        "  pxcompile trace hf:examples/hf/mistral-7b --schema-out mistral.yaml\n"
        "  pxcompile mistral.yaml --budget 0.3      # plan it later",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "input",
        help="a model file (.py) defining `model` and `example_inputs`, or hf:PATH, "
        "timm:NAME, torchvision:NAME (built from its config without weights)",
    )
    p.add_argument(
        "--schema-out",
        "-o",
        "--output",
        dest="output",
        metavar="FILE",
        help="write the schema YAML (the form `pxcompile FILE` plans; repeated blocks written "
        "once with repeat: N), e.g. --schema-out s.yaml",
    )
    p.add_argument(
        "--long", action="store_true", help="--schema-out: write every GEMM out, no repeat: blocks"
    )
    p.add_argument(
        "--model", default="model", help="name of the nn.Module or factory (default 'model')"
    )
    p.add_argument(
        "--inputs", default="example_inputs", help="name of the inputs (default 'example_inputs')"
    )
    p.add_argument("--json", action="store_true", help="print the schema as JSON")
    args = p.parse_args(argv)

    def run() -> int:
        from . import api, report
        from .io import OutputSet
        from .model_specs import load_model, source_files, source_name

        outs = OutputSet({"--schema-out": args.output}, protect=source_files(args.input))
        model, inputs = load_model(args.input, args.model, args.inputs)
        traced = api.trace(model, inputs, name=source_name(args.input))
        if args.json:
            print(json.dumps(traced.schema.to_dict(), indent=1))
        else:
            report.print_schema(traced, report.make_console())
        if args.output:
            with outs:
                outs.write_text(args.output, traced.schema.to_yaml(compact=not args.long))
        return 0

    return _guard(run)


def _bench_cmd(argv: list[str]) -> int:
    p = _Parser(
        prog="pxcompile bench",
        description="Compile a model file and time it against its dense self: forward "
        "(inference mode) and one training step, medians of alternating runs, as ratios.",
        epilog="example:\n  pxcompile bench examples/gpt.py --budget 0.3 --repeats 5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="a model file (.py) defining `model` and `example_inputs`")
    _add_plan_args(p)
    p.add_argument(
        "--repeats", type=_positive, default=5, help="timed runs per variant (default 5)"
    )
    p.add_argument(
        "--threads", type=_positive, default=None, help="torch threads (default: torch's)"
    )
    p.add_argument(
        "--no-layers",
        action="store_true",
        help="skip timing each distinct sparse layer alone (predicted vs measured speedup)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)

    def run() -> int:
        import copy

        import torch

        from . import api, report
        from .bench import compare, layer_speedups, layer_table
        from .model_specs import load_model, require_weights

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        model, inputs = load_model(args.input, args.model, args.inputs)
        require_weights(model, args.input, "bench")
        traced = api.trace(model, inputs)
        plan = plan_model(args, model, traced)
        gm = api.apply(model, plan, inputs, traced=traced)
        c = compare(copy.deepcopy(model), gm, inputs, args.repeats)
        layers = [] if args.no_layers else layer_speedups(plan, _cost_model(args), 3)
        s = plan.summary
        result = {
            "model": args.input,
            "budget": plan.budget,
            "flops_kept": s.model_fraction,
            "eligible_kept": s.eligible_fraction,
            "params_ratio": c.params_ratio,
            "forward_speedup": c.forward_speedup,
            "train_step_speedup": c.train_speedup,
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "layers": [
                {
                    "gemms": ls.names,
                    "shape": [ls.gemm.out_features, ls.gemm.in_features],
                    "rows": ls.gemm.rows,
                    "pattern": ls.spec.to_dict(),
                    "predicted_speedup": ls.predicted,
                    "measured_speedup": ls.measured,
                }
                for ls in layers
            ],
        }
        if args.json:
            print(json.dumps(result, indent=1))
            return 0
        con = report.make_console()
        con.print(
            f"{args.input}: FLOPs kept {s.model_fraction:.3f} of the model "
            f"({s.eligible_fraction:.3f} of the eligible GEMMs), params {c.params_ratio:.3f}x",
            highlight=False,
        )
        con.print(
            f"speedup vs dense ({torch.get_num_threads()} threads, median of {args.repeats}): "
            f"forward {c.forward_speedup:.2f}x, training step {c.train_speedup:.2f}x",
            highlight=False,
        )
        if layers:
            con.print(layer_table(layers, report.prediction_model(plan, _cost_model(args))))
        return 0

    return _guard(run)


def _check_cmd(argv: list[str]) -> int:
    from .check import main as check_main

    return check_main(argv)


def _calibrate_cmd(argv: list[str]) -> int:
    from .calibrate import QUICK_ROWS, QUICK_SHAPES, ROWS, SHAPES, TIME_LIMIT

    p = _Parser(
        prog="pxcompile calibrate",
        description="Fit the calibrated cost model to this machine: time dense vs Pixelfly "
        "layers (a few shapes, rows, patterns and ranks; medians of back-to-back pairs; at "
        f"most about {TIME_LIMIT:.0f} s), fit move, per_block and lowrank, and write a "
        "cost-model file for --cost-model FILE.",
        epilog="example:\n  pxcompile calibrate -o cost.yaml\n"
        "  pxcompile examples/gpt.py --budget 0.3 --cost-model cost.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-o", "--output", metavar="FILE", help="write the cost model (YAML; .json: JSON)"
    )
    p.add_argument("--quick", action="store_true", help="smaller layers, fewer points (~10 s)")
    p.add_argument(
        "--shapes",
        metavar="OUTxIN,...",
        help="layer shapes to time (default "
        + ",".join(f"{o}x{i}" for o, i in SHAPES)
        + "; --quick: "
        + ",".join(f"{o}x{i}" for o, i in QUICK_SHAPES)
        + ")",
    )
    p.add_argument(
        "--rows",
        metavar="N,...",
        help=f"rows (tokens x batch) per forward (default {','.join(map(str, ROWS))}; "
        f"--quick: {','.join(map(str, QUICK_ROWS))})",
    )
    p.add_argument("--block", type=_block, default=32, help="hardware block (default 32)")
    p.add_argument("--repeats", type=_positive, default=3, help="timed pairs per layer (default 3)")
    p.add_argument(
        "--threads", type=_positive, default=None, help="torch threads (default: torch's)"
    )
    p.add_argument(
        "--name", default=None, help="the model's name in plans (default calibrated:HOST)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)

    def run() -> int:
        import platform

        import torch

        from . import calibrate, cost_file, report
        from .io import OutputSet

        outs = OutputSet({"-o": args.output})  # a bad path fails before the work
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        shapes = calibrate.parse_shapes(args.shapes) if args.shapes else None
        rows = calibrate.parse_rows(args.rows) if args.rows else None
        name = args.name or f"calibrated:{platform.node() or 'this-machine'}"
        model, points, fit = calibrate.run(
            shapes or (QUICK_SHAPES if args.quick else SHAPES),
            rows or (QUICK_ROWS if args.quick else ROWS),
            args.block,
            args.repeats,
            name=name,
            show_progress=not args.json,
        )
        data = cost_file.to_data(model, fit)
        if args.json:
            print(json.dumps(data, indent=1))
        else:
            calibrate.print_table(model, points, fit, report.make_console())
        if args.output:
            text = json.dumps(data, indent=1) + "\n" if args.output.endswith(".json") else None
            with outs:
                outs.write_text(args.output, text or cost_file.dumps(model, fit))
        return 0

    return _guard(run)


SUBCOMMANDS: dict = {
    "trace": _trace_cmd,
    "bench": _bench_cmd,
    "check": _check_cmd,
    "calibrate": _calibrate_cmd,
}
