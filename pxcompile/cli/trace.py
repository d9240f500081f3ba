"""``pxcompile trace MODEL``: the model schema a model file (or a config-built model) traces to."""

from __future__ import annotations

import argparse
import json

from .common import Parser, guard


def main(argv: list[str]) -> int:
    p = Parser(
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
        from .. import api, report
        from ..io import OutputSet
        from ..model_specs import load_model, source_files, source_name

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

    return guard(run)
