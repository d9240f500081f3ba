"""The ``pxcompile`` command.

    pxcompile SCHEMA.yaml --budget 0.3 --block 32        plan a model described by a schema
    pxcompile MODEL.py --budget 0.3 --block 32 -o m.px   trace, plan, rewrite and save a model

User mistakes end with one line on stderr and exit code 2; nothing half-written is left.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import PxError
from ..version import __version__
from .common import Parser, add_plan_args, finish, guard, output_set, plan_schema_args

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


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
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
    add_plan_args(p)
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
        sub = importlib.import_module(f"{__package__}.{argv[0]}")
        return sub.main(argv[1:])
    args = build_parser().parse_args(argv)
    return guard(lambda: _compile(args))


def _compile(args: argparse.Namespace) -> int:
    from ..model_specs import is_model_spec, parse_spec, weights_needed
    from ..schema import ModelSchema

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
        from .compile_model import compile_model_file  # imports torch: only for models

        return compile_model_file(args)
    schema = ModelSchema.load(path)
    plan = plan_schema_args(args, schema)
    return finish(args, plan)


# Each subcommand's module is imported only when it runs: `pxcompile --help` stays fast.
SUBCOMMANDS = ("trace", "bench", "check", "calibrate")
