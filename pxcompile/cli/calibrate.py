"""``pxcompile calibrate``: fit the calibrated cost model to this machine."""

from __future__ import annotations

import argparse
import json

from .common import Parser, block_arg, guard, positive_arg


def main(argv: list[str]) -> int:
    from ..calibrate import QUICK_ROWS, QUICK_SHAPES, ROWS, SHAPES, TIME_LIMIT

    p = Parser(
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
    p.add_argument("--block", type=block_arg, default=32, help="hardware block (default 32)")
    p.add_argument(
        "--repeats", type=positive_arg, default=3, help="timed pairs per layer (default 3)"
    )
    p.add_argument(
        "--threads", type=positive_arg, default=None, help="torch threads (default: torch's)"
    )
    p.add_argument(
        "--name", default=None, help="the model's name in plans (default calibrated:HOST)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)

    def run() -> int:
        import platform

        import torch

        from .. import calibrate, cost_file, report
        from ..io import OutputSet

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

    return guard(run)
