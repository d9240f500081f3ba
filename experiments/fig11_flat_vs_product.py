"""Figure 11 at CPU scale: flat block butterfly against the product of its factors (issue #14).

    python experiments/fig11_flat_vs_product.py                       # full run (a few minutes)
    python experiments/fig11_flat_vs_product.py --quick --out /tmp/f11  # smoke run (seconds)

The same block butterfly (block 32, ``n = size / 32`` block rows, all ``log2(n)`` factors) on
``size x size`` weights, ``size`` from 512 to 4096, ``rows`` input rows:

* **product**: :class:`baselines.butterfly.ProductButterfly`, ``log2(n)`` sequential
  block-sparse multiplies, each factor one batched matmul over its ``n/2`` pairs of block rows
  (``2b x 2b`` matrices), autograd backward;
* **flat**: ``PixelflyLinear`` with ``PatternSpec(n, log2(n), 32, rank=0)``: the sum of the
  same factors' supports, one block-sparse multiply, its hand-written backward;
* **dense**: ``F.linear`` (reference).

Forward (autograd recording) and backward timed separately, all three interleaved in one
process, ``rounds`` rounds, one torch thread, eager PyTorch for both butterflies (the flat
layer's compiled path is not used, so neither side gets a compiler); medians, and the median
over rounds of the per-round ratio. The product does ``2 log2(n) / (log2(n) + 1)`` times the
flat form's FLOPs; the rest of the gap is the sequence of small multiplies and permutations.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
from baselines.butterfly import ProductButterfly  # noqa: E402

FULL = {"sizes": (512, 1024, 2048, 4096), "block": 32, "rows": 512, "rounds": 9}
QUICK = {"sizes": (128, 256), "block": 32, "rows": 16, "rounds": 2}
METHODS = ("dense", "flat", "product")


def layers(size: int, block: int) -> dict[str, torch.nn.Module]:
    from pxcompile.layers import PixelflyLinear
    from pxcompile.patterns import PatternSpec

    n = size // block
    flat = PixelflyLinear(size, size, PatternSpec(n, int(math.log2(n)), block, rank=0))
    flat.path = "eager"
    return {
        "dense": torch.nn.Linear(size, size),
        "flat": flat,
        "product": ProductButterfly(size, block),
    }


def timed(m: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[float, float]:
    """Forward (autograd recording) and backward seconds of one call."""
    t0 = time.perf_counter()
    y = F.linear(x, m.weight, m.bias) if isinstance(m, torch.nn.Linear) else m(x)
    t1 = time.perf_counter()
    y.backward(g)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def measure(size: int, cfg: dict) -> dict:
    torch.manual_seed(0)
    ms = layers(size, cfg["block"])
    x = torch.randn(cfg["rows"], size, requires_grad=True)
    g = torch.randn(cfg["rows"], size)
    for m in ms.values():  # warm-up
        for _ in range(2):
            timed(m, x, g)
    t: dict[str, list[tuple[float, float]]] = {k: [] for k in ms}
    for _ in range(cfg["rounds"]):
        for k, m in ms.items():
            m.zero_grad(set_to_none=True)
            x.grad = None
            t[k].append(timed(m, x, g))
    n = size // cfg["block"]
    f = int(math.log2(n))
    rows = cfg["rows"]
    kept = {"dense": 1.0, "flat": (f + 1) / n, "product": 2 * f / n}
    res: dict = {"size": size, "n": n, "factors": f, "load": os.getloadavg()[0]}
    for k in ms:
        fw = [a for a, _ in t[k]]
        bw = [b for _, b in t[k]]
        res[k] = {
            "fwd_ms": statistics.median(fw) * 1e3,
            "bwd_ms": statistics.median(bw) * 1e3,
            "total_ms": statistics.median(a + b for a, b in t[k]) * 1e3,
            "gflop": 2 * rows * size * size * kept[k] / 1e9,
            "density": kept[k],
        }
    for part, idx in (("fwd", 0), ("bwd", 1)):
        ratios = [p[idx] / q[idx] for p, q in zip(t["product"], t["flat"])]
        res[f"product_over_flat_{part}"] = statistics.median(ratios)
    tot = [sum(p) / sum(q) for p, q in zip(t["product"], t["flat"])]
    res["product_over_flat_total"] = statistics.median(tot)
    res["dense_over_flat_total"] = statistics.median(
        sum(d) / sum(q) for d, q in zip(t["dense"], t["flat"])
    )
    res["dense_over_product_total"] = statistics.median(
        sum(d) / sum(p) for d, p in zip(t["dense"], t["product"])
    )
    return res


def main(argv: list[str] | None = None) -> int:
    args = C.parser(__doc__, "fig11_flat_vs_product").parse_args(argv)
    out = C.setup(args)
    cfg = dict(QUICK if args.quick else FULL)
    load0 = os.getloadavg()[0]
    results = []
    for size in cfg["sizes"]:
        C.log(f"size {size}")
        results.append(measure(size, cfg))
    res = {"config": cfg, "load_start": load0, "load_end": os.getloadavg()[0], "sizes": results}
    (out / "fig11_flat_vs_product.json").write_text(json.dumps(res, indent=1))
    report(out, cfg, res)
    return 0


def report(out: Path, cfg: dict, res: dict) -> None:
    rows = []
    for r in res["sizes"]:
        rows.append(
            [
                f"{r['size']} (n={r['n']}, {r['factors']} factors)",
                f"{r['flat']['density']:.4f} / {r['product']['density']:.4f}",
                f"{r['dense']['fwd_ms']:.2f} / {r['dense']['bwd_ms']:.2f}",
                f"{r['flat']['fwd_ms']:.2f} / {r['flat']['bwd_ms']:.2f}",
                f"{r['product']['fwd_ms']:.2f} / {r['product']['bwd_ms']:.2f}",
                f"{r['product_over_flat_fwd']:.2f}x / {r['product_over_flat_bwd']:.2f}x",
                f"**{r['product_over_flat_total']:.2f}x**",
                f"{r['dense_over_flat_total']:.2f}x / {r['dense_over_product_total']:.2f}x",
                f"{r['load']:.1f}",
            ]
        )
    head = [
        "size",
        "kept: flat / product",
        "dense ms fwd / bwd",
        "flat ms fwd / bwd",
        "product ms fwd / bwd",
        "product / flat fwd / bwd",
        "product / flat (fwd+bwd)",
        "speedup vs dense: flat / product",
        "load",
    ]
    C.write_md(
        out / "fig11_flat_vs_product.md",
        "Figure 11 (CPU scale): flat block butterfly vs the product of its factors",
        [0],
        "random inputs (timing only).",
        [
            f"Block {cfg['block']}, {cfg['rows']} rows, square weights; all log2(n) butterfly "
            f"factors. Product: one batched matmul per factor over its n/2 pairs of block rows, "
            f"applied in sequence, autograd backward. Flat: PixelflyLinear(rank 0) with the "
            f"same factors summed, one block-sparse multiply, eager path. 'kept' is the "
            f"fraction of a dense multiply's FLOPs each form does. {cfg['rounds']} interleaved "
            f"rounds; times are medians, ratios are medians of per-round ratios (> 1: the "
            f"product is slower). Load average {res['load_start']:.1f} at the start, "
            f"{res['load_end']:.1f} at the end (2 cores, shared), per size in the last column.",
            C.table(head, rows),
            "The paper reports the flat form up to 3x faster than the product on GPU.",
        ],
    )
    sizes = [r["size"] for r in res["sizes"]]
    C.plot(
        out / "fig11_flat_vs_product.png",
        [
            {
                "title": "forward + backward time (median)",
                "xlabel": "size (square weight)",
                "ylabel": "ms",
                "xscale": "log",
                "series": {
                    k: (sizes, [r[k]["total_ms"] for r in res["sizes"]], None) for k in METHODS
                },
            },
            {
                "title": "product / flat time ratio",
                "xlabel": "size (square weight)",
                "ylabel": "ratio (> 1: flat faster)",
                "xscale": "log",
                "series": {
                    f"{p}": (sizes, [r[f"product_over_flat_{p}"] for r in res["sizes"]], None)
                    for p in ("fwd", "bwd", "total")
                },
            },
        ],
        f"Flat vs product block butterfly (block {cfg['block']}, {cfg['rows']} rows)",
    )


if __name__ == "__main__":
    sys.exit(main())
