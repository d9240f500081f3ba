"""How long tracing and rewriting take on GPT-2 small (12 layers, HF transformers, random
weights built from config): the frontend's goal is under 15 s on a 2-core CPU.

    python benchmarks/bench_compile.py [--layers 12] [--seq 128]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--budget", type=float, default=0.3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    import transformers

    import pxcompile
    from pxcompile import api

    cfg = transformers.GPT2Config(n_layer=args.layers)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    inputs = {"input_ids": torch.randint(0, cfg.vocab_size, (2, args.seq))}

    t0 = time.perf_counter()
    traced = api.trace(model, inputs)
    t1 = time.perf_counter()
    plan = pxcompile.plan(traced, args.budget)
    t2 = time.perf_counter()
    gm = pxcompile.apply(model, plan, inputs, traced=traced)
    t3 = time.perf_counter()
    n = len(plan.sparse_layers)
    print(f"GPT-2 small ({args.layers} layers), {len(traced.schema.gemms)} GEMMs, {n} rewritten")
    print(f"trace ({traced.method}) {t1 - t0:6.2f} s")
    print(f"plan            {t2 - t1:6.2f} s")
    print(f"rewrite         {t3 - t2:6.2f} s")
    print(f"total           {t3 - t0:6.2f} s   (goal: under 15 s)")
    with torch.no_grad():
        gm(**inputs)


if __name__ == "__main__":
    main()
