"""Whole models compiled at --budget 0.3 --block 32 against their dense selves: one training
step (forward, backward, SGD step) and forward-only inference, plus the peak memory of one
training step. Ratios are dense time / compiled time: each repetition runs dense then compiled
back to back and takes the ratio of that pair (both see the same machine load), the table shows
the median pair; fp32, 2 threads, one process. The load average is printed with the table.

    python benchmarks/bench_model.py              # Mixer-B/16 (batch 8), GPT-2 small (seq 512, batch 2)
    python benchmarks/bench_model.py --quick      # smaller models, fewer runs
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build(name: str, quick: bool):
    """(model, inputs) for one benchmark model, built from the examples' plain-PyTorch code."""
    torch.manual_seed(0)
    if name == "mixer-b16":
        Mixer = runpy.run_path(str(ROOT / "examples" / "mixer.py"))["Mixer"]
        if quick:
            m = Mixer(image=112, patch=16, dim=384, depth=2, token_hidden=192, channel_hidden=1536)
            return m, (torch.randn(8, 3, 112, 112),)
        m = Mixer(
            image=224,
            patch=16,
            dim=768,
            depth=12,
            token_hidden=384,
            channel_hidden=3072,
            classes=1000,
        )
        return m, (torch.randn(8, 3, 224, 224),)
    if name == "gpt2-small":
        GPT = runpy.run_path(str(ROOT / "examples" / "gpt.py"))["GPT"]
        if quick:
            m = GPT(vocab=8192, context=256, dim=384, layers=2, heads=6, hidden=1536)
            return m, (torch.randint(0, 8192, (2, 256)),)
        m = GPT(vocab=50257, context=1024, dim=768, layers=12, heads=12, hidden=3072)
        return m, (torch.randint(0, 50257, (2, 512)),)
    raise ValueError(name)


def peak_memory_mb(name: str, variant: str, quick: bool, budget: float, block: int) -> float:
    """Peak RSS growth of one training step, measured in a fresh process (the kernel's
    peak-RSS mark is reset just before the step: /proc/self/clear_refs)."""
    code = f"""
import gc, sys, torch
sys.path.insert(0, {str(ROOT / "benchmarks")!r})
from bench_model import build
import pxcompile
from pxcompile.bench import train_step_fn
torch.set_num_threads(2)
m, x = build({name!r}, {quick!r})
if {variant!r} == "pixelfly":
    m = pxcompile.sparsify(m, {budget}, block={block}, example_inputs=x, init="scratch")
m.train()
step = train_step_fn(m, x)
step()  # optimizer state and caches exist from here on
def kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
gc.collect()
base = kb("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
step()
print((kb("VmHWM:") - base) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def compare(dense, compiled, inputs, repeats: int) -> dict:
    """Forward (inference mode, eval) and one training step (train mode), paired ratios."""
    from dataclasses import asdict

    from pxcompile.bench import compare as bench_compare

    return asdict(bench_compare(dense, compiled, inputs, repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description="Whole-model speed of pxcompile vs dense")
    ap.add_argument("--quick", action="store_true", help="smaller models, fewer runs")
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--models", default="mixer-b16,gpt2-small")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    torch.set_num_threads(2)
    import pxcompile

    load0 = os.getloadavg()
    repeats = args.repeats or (3 if args.quick else 5)
    rows = []
    for name in args.models.split(","):
        model, inputs = build(name, args.quick)
        gm = pxcompile.sparsify(
            model, args.budget, block=args.block, example_inputs=inputs, init="scratch"
        )
        s = gm.pxcompile_plan.summary
        c = compare(model, gm, inputs, repeats)
        row = {
            "model": name,
            "flops_kept": s.model_fraction,
            "eligible_kept": s.eligible_fraction,
            **c,
        }
        if not args.no_memory:
            row["peak_mb_dense"] = peak_memory_mb(
                name, "dense", args.quick, args.budget, args.block
            )
            row["peak_mb_pixelfly"] = peak_memory_mb(
                name, "pixelfly", args.quick, args.budget, args.block
            )
        rows.append(row)
        print(f"done {name}", file=sys.stderr)
    load1 = os.getloadavg()
    print(
        f"\nbudget {args.budget}, block {args.block}, fp32, 2 threads, median of {repeats} paired "
        f"runs; load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end"
    )
    print(
        "| model | FLOPs kept (model / eligible) | params | forward speedup | train step speedup | peak MB train step (dense -> pixelfly) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        mem = (
            f"{r['peak_mb_dense']:.0f} -> {r['peak_mb_pixelfly']:.0f}"
            if "peak_mb_dense" in r
            else "-"
        )
        print(
            f"| {r['model']} | {r['flops_kept']:.3f} / {r['eligible_kept']:.3f} | {r['params_ratio']:.3f}x "
            f"| {r['forward_speedup']:.2f}x | {r['train_speedup']:.2f}x | {mem} |"
        )
    print("\nmedian ms (context only; dense / pixelfly):")
    for r in rows:
        print(
            f"  {r['model']}: forward {r['forward_ms'][0]:.0f} / {r['forward_ms'][1]:.0f}, "
            f"train step {r['train_ms'][0]:.0f} / {r['train_ms'][1]:.0f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
