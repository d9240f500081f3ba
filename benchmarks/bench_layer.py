"""PixelflyLinear speed against dense ``F.linear`` (fp32, CPU, 2 threads by default).

Every number printed is a ratio ``dense_time / other_time`` (higher is faster than dense),
the median over paired runs: each repetition times dense then the candidate back to back, so
both see the same machine load. Absolute times are printed only as context.

    python benchmarks/bench_layer.py            # full table (a few minutes)
    python benchmarks/bench_layer.py --quick    # fewer cases and repetitions
    python benchmarks/bench_layer.py --eager    # no torch.compile (same as PXCOMPILE_NO_COMPILE=1)
    python benchmarks/bench_layer.py --kernel gather   # force a CPU kernel (default: the layer's)

Columns: ``dense ms`` (context only), ``masked`` (dense GEMM on ``W * mask``, the reference),
``bsr`` (torch sparse BSR weight, forward only), ``px fwd`` (no-grad forward), ``px f+b``
(forward + backward of input and all parameters, against dense forward + backward), ``ideal``
(1 / density, low-rank included), ``frac`` (px fwd / ideal), ``kernel`` (the CPU kernel:
``gather`` or ``grouped``, see pxcompile.kernels.cpu) and ``path`` (auto dispatch choice).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pxcompile import layers as L  # noqa: E402
from pxcompile.bench import paired  # noqa: E402
from pxcompile.layers import PixelflyLinear  # noqa: E402
from pxcompile.patterns import PatternSpec  # noqa: E402

# (label, in, out, rows, spec, do_backward)
CASES = [
    ("768->3072 d.167", 768, 3072, 1568, PatternSpec(24, 3, 32), True),
    ("3072->768 d.167", 3072, 768, 1568, PatternSpec(24, 3, 32), True),
    ("768->3072 d.167 r32", 768, 3072, 1568, PatternSpec(24, 3, 32, 32), True),
    ("3072->768 d.167 r32", 3072, 768, 1568, PatternSpec(24, 3, 32, 32), True),
    ("768->3072 d.25 pb64", 768, 3072, 1568, PatternSpec(12, 2, 64), True),
    ("3072->768 d.25 pb64", 3072, 768, 1568, PatternSpec(12, 2, 64), True),
    ("768->3072 d.125", 768, 3072, 1568, PatternSpec(24, 2, 32), True),
    ("1024->4096 d.156", 1024, 4096, 4096, PatternSpec(32, 4, 32), True),
    ("4096->1024 d.156", 4096, 1024, 4096, PatternSpec(32, 4, 32), True),
    ("768->3072 1 row", 768, 3072, 1, PatternSpec(24, 3, 32), False),
    ("3072->768 1 row", 3072, 768, 1, PatternSpec(24, 3, 32), False),
    ("768->3072 64 rows", 768, 3072, 64, PatternSpec(24, 3, 32), False),
    ("3072->768 64 rows", 3072, 768, 64, PatternSpec(24, 3, 32), False),
    # Mixer-B/16's token mixing (196 tokens, batch 8), padded as `--cost-model flops+blocks`
    # plans it at budget 0.3 (issue #12.3): the layer pads its input and slices its output
    ("196->384 pad 256x512", 196, 384, 6144, PatternSpec(8, 1, 32, 0, 512, 256), True),
    ("384->196 pad 384x384", 384, 196, 6144, PatternSpec(12, 1, 32, 0, 384), True),
    # Block-diagonal patterns (f = 1), which the grouped kernel runs as one matmul per group
    ("768->3072 d.25 f1", 768, 3072, 1568, PatternSpec(8, 1, 32), True),
    ("3072->768 d.25 f1", 3072, 768, 1568, PatternSpec(8, 1, 32), True),
    ("768->3072 d.25 f1 r16", 768, 3072, 1568, PatternSpec(8, 1, 32, 16), True),
    ("3072->768 d.25 f1 r16", 3072, 768, 1568, PatternSpec(8, 1, 32, 16), True),
    ("768->3072 d.25 f1 r8", 768, 3072, 1568, PatternSpec(8, 1, 32, 8), True),
    ("3072->768 d.167 f1 r8", 3072, 768, 1568, PatternSpec(12, 1, 32, 8), True),
    ("196->384 pad 256x384", 196, 384, 6144, PatternSpec(4, 1, 32, 0, 0, 256), True),
    ("384->196 pad 256x384", 384, 196, 6144, PatternSpec(4, 1, 32, 0, 256), True),
    ("196->384 pad 256x384 r8", 196, 384, 6144, PatternSpec(4, 1, 32, 8, 0, 256), True),
    ("384->196 pad 256x384 r8", 384, 196, 6144, PatternSpec(4, 1, 32, 8, 256), True),
    # timm Mixer-S/16's token mixing at budget 0.3: four 64-wide groups, rank 5 (aligned to 8
    # by the grouped kernel: `--rank-align 1` measures it unaligned)
    ("196->256 pad 256 r5", 196, 256, 8192, PatternSpec(8, 1, 32, 5, 0, 256), True),
    ("256->196 pad 256 r5", 256, 196, 8192, PatternSpec(8, 1, 32, 5, 256), True),
]
QUICK = {
    "768->3072 d.167",
    "3072->768 d.167",
    "768->3072 d.167 r32",
    "768->3072 d.25 pb64",
    "768->3072 1 row",
    "768->3072 64 rows",
}


def paired_ratio(base, cand, reps: int, warm: int = 2) -> tuple[float, float]:
    """Median of ``time(base) / time(cand)`` over back-to-back pairs, and median base ms."""
    ratio, tb, _ = paired(base, cand, reps, warm)
    return ratio, tb * 1e3


def reps_for(rows: int, quick: bool) -> int:
    r = 200 if rows <= 64 else 9
    return max(3, r // 3) if quick else r


def run_case(label, fin, fout, rows, spec, backward, quick, kernel=None):
    torch.manual_seed(0)
    lin = torch.nn.Linear(fin, fout)
    layer = PixelflyLinear.from_dense(lin.weight.detach(), lin.bias.detach(), spec)
    if kernel:
        layer.execution = kernel
    mask = layer.mask()
    w, b = lin.weight.detach(), lin.bias.detach()
    x = torch.randn(rows, fin)
    reps = reps_for(rows, quick)

    def dense():
        with torch.no_grad():
            F.linear(x, w, b)

    def masked():
        with torch.no_grad():
            F.linear(x, w * mask, b)

    def px():
        with torch.no_grad():
            layer(x)

    r_fwd, dense_ms = paired_ratio(dense, px, reps)
    r_mask, _ = paired_ratio(dense, masked, reps)
    try:
        wb = (w * mask).to_sparse_bsr((spec.pattern_block, spec.pattern_block))

        def bsr():
            with torch.no_grad():
                (wb @ x.t()).t() + b

        r_bsr = f"{paired_ratio(dense, bsr, reps)[0]:.2f}"
    except (RuntimeError, NotImplementedError):
        r_bsr = "n/a"
    r_fb = "-"
    if backward:
        xg = x.clone().requires_grad_(True)
        gy = torch.randn(rows, fout)

        def dense_fb():
            lin.zero_grad(set_to_none=True)
            xg.grad = None
            lin(xg).backward(gy)

        def px_fb():
            layer.zero_grad(set_to_none=True)
            xg.grad = None
            layer(xg).backward(gy)

        r_fb = f"{paired_ratio(dense_fb, px_fb, reps)[0]:.2f}"
    ideal = 1.0 / spec.density(fin, fout)
    path = layer.choose_path(rows)
    return (label, f"{dense_ms:.2f}", f"{r_mask:.2f}", r_bsr, f"{r_fwd:.2f}", r_fb,
            f"{ideal:.2f}", f"{r_fwd / ideal:.2f}", layer.execution, path)  # fmt: skip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer cases and repetitions")
    ap.add_argument("--eager", action="store_true", help="never compile")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="substring filter on case labels")
    ap.add_argument("--kernel", choices=("gather", "grouped"), help="force this CPU kernel")
    ap.add_argument(
        "--rank-align",
        type=int,
        help="round the grouped kernel's fused rank up to a multiple of this (default 8)",
    )
    args = ap.parse_args(argv)
    if args.rank_align:
        from pxcompile.kernels.cpu import grouped

        grouped.RANK_ALIGN = args.rank_align
    torch.set_num_threads(args.threads)
    if args.eager:
        L.COMPILE = False
    cases = [c for c in CASES if (not args.quick or c[0] in QUICK) and args.only in c[0]]
    head = ("case", "dense ms", "masked", "bsr", "px fwd", "px f+b", "ideal", "frac", "kernel")
    head += ("path",)
    widths = (23, 9, 7, 6, 7, 7, 6, 5, 7, 9)
    print(f"torch {torch.__version__}, {args.threads} threads, compile={L.compile_available()}")
    print(f"load average {os.getloadavg()[0]:.2f} at the start")
    print("ratios = dense time / time (higher is faster); medians of paired runs")
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths))))
    for case in cases:
        row = run_case(*case, quick=args.quick, kernel=args.kernel)
        print(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))),
            flush=True,
        )
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
