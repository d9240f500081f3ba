"""``pxcompile bench MODEL.py``: the compiled model timed against its dense self."""

from __future__ import annotations

import argparse
import json

from .common import Parser, add_plan_args, cost_model_arg, guard, plan_model, positive_arg


def main(argv: list[str]) -> int:
    p = Parser(
        prog="pxcompile bench",
        description="Compile a model file and time it against its dense self: forward "
        "(inference mode) and one training step, medians of alternating runs, as ratios.",
        epilog="example:\n  pxcompile bench examples/gpt.py --budget 0.3 --repeats 5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="a model file (.py) defining `model` and `example_inputs`")
    add_plan_args(p)
    p.add_argument(
        "--repeats", type=positive_arg, default=5, help="timed runs per variant (default 5)"
    )
    p.add_argument(
        "--threads", type=positive_arg, default=None, help="torch threads (default: torch's)"
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

        from .. import api, report
        from ..bench import compare, layer_speedups, layer_table
        from ..model_specs import load_model, require_weights

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        model, inputs = load_model(args.input, args.model, args.inputs)
        require_weights(model, args.input, "bench")
        traced = api.trace(model, inputs)
        plan = plan_model(args, model, traced)
        gm = api.apply(model, plan, inputs, traced=traced)
        c = compare(copy.deepcopy(model), gm, inputs, args.repeats)
        layers = [] if args.no_layers else layer_speedups(plan, cost_model_arg(args), 3)
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
            con.print(layer_table(layers, report.prediction_model(plan, cost_model_arg(args))))
        return 0

    return guard(run)
