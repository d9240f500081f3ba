"""Figure 11 at CPU scale: flat block butterfly against the product of its factors (issue #14).

    python experiments/fig11_flat_vs_product.py                       # full run (~7 min at load 28)
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

FULL = {"sizes": (512, 1024, 2048, 4096), "block": 32, "rows": 256, "rounds": 7, "compiled": True}
QUICK = {"sizes": (128, 256), "block": 32, "rows": 16, "rounds": 2, "compiled": False}
PAIRS = (("flat", "product"), ("flat compiled", "product compiled"))


def layers(size: int, block: int, compiled: bool) -> dict[str, torch.nn.Module]:
    """dense, flat and product (eager); with ``compiled``, also the flat layer on its compiled
    path and the product through ``torch.compile``."""
    from pxcompile.layers import PixelflyLinear
    from pxcompile.patterns import PatternSpec

    n = size // block
    spec = PatternSpec(n, int(math.log2(n)), block, rank=0)
    flat = PixelflyLinear(size, size, spec)
    flat.path = "eager"
    product = ProductButterfly(size, block)
    ms = {"dense": torch.nn.Linear(size, size), "flat": flat, "product": product}
    if compiled:
        fc = PixelflyLinear(size, size, spec)
        fc.path = "compiled"
        ms["flat compiled"] = fc
        ms["product compiled"] = torch.compile(ProductButterfly(size, block), dynamic=False)
    return ms


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
    ms = layers(size, cfg["block"], cfg["compiled"])
    x = torch.randn(cfg["rows"], size, requires_grad=True)
    g = torch.randn(cfg["rows"], size)
    for m in ms.values():  # warm-up (and compiling)
        for _ in range(3):
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
    kept.update({"flat compiled": kept["flat"], "product compiled": kept["product"]})
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
    for fl, pr in PAIRS:
        if fl not in t:
            continue
        ratio: dict[str, float] = {}
        for part, idx in (("fwd", 0), ("bwd", 1)):
            ratio[part] = statistics.median(p[idx] / q[idx] for p, q in zip(t[pr], t[fl]))
        ratio["total"] = statistics.median(sum(p) / sum(q) for p, q in zip(t[pr], t[fl]))
        for k in (fl, pr):
            ratio[f"dense_over_{k}"] = statistics.median(
                sum(d) / sum(q) for d, q in zip(t["dense"], t[k])
            )
        res[f"{pr} / {fl}"] = ratio
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
        for fl, pr in PAIRS:
            q = r.get(f"{pr} / {fl}")
            if q is None:
                continue
            rows.append(
                [
                    f"{r['size']} (n={r['n']}, {r['factors']} factors)",
                    "compiled" if "compiled" in fl else "eager",
                    f"{r[fl]['density']:.4f} / {r[pr]['density']:.4f}",
                    f"{r['dense']['fwd_ms']:.1f} / {r['dense']['bwd_ms']:.1f}",
                    f"{r[fl]['fwd_ms']:.1f} / {r[fl]['bwd_ms']:.1f}",
                    f"{r[pr]['fwd_ms']:.1f} / {r[pr]['bwd_ms']:.1f}",
                    f"{q['fwd']:.2f}x / {q['bwd']:.2f}x",
                    f"**{q['total']:.2f}x**",
                    f"{q['dense_over_' + fl]:.2f}x / {q['dense_over_' + pr]:.2f}x",
                    f"{r['load']:.1f}",
                ]
            )
    head = [
        "size",
        "path",
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
            f"applied in sequence, autograd backward (path 'compiled': the module through "
            f"torch.compile). Flat: PixelflyLinear(rank 0) with the same factors summed, one "
            f"block-sparse multiply, its hand-written backward (path 'eager' or its compiled "
            f"bodies). 'kept' is the fraction of a dense multiply's FLOPs each form does. "
            f"{cfg['rounds']} interleaved rounds of every method (dense: F.linear); times are "
            f"medians, ratios are medians of per-round ratios (> 1: the product is slower). "
            f"Load average {res['load_start']:.1f} at the start, {res['load_end']:.1f} at the "
            f"end (2 cores, shared), per size in the last column.",
            C.table(head, rows),
            "The paper reports the flat form up to 3x faster than the product on GPU.",
        ],
    )
    sizes = [r["size"] for r in res["sizes"]]
    first = res["sizes"][0]
    methods = [k for k, v in first.items() if isinstance(v, dict) and "fwd_ms" in v]
    ratios = {}
    for fl, pr in PAIRS:
        key = f"{pr} / {fl}"
        if key in first:
            for p in ("fwd", "bwd", "total"):
                ratios[f"{key}: {p}"] = (sizes, [r[key][p] for r in res["sizes"]], None)
    C.plot(
        out / "fig11_flat_vs_product.png",
        [
            {
                "title": "forward + backward time (median)",
                "xlabel": "size (square weight)",
                "ylabel": "ms",
                "xscale": "log",
                "series": {
                    k: (sizes, [r[k]["total_ms"] for r in res["sizes"]], None) for k in methods
                },
            },
            {
                "title": "product / flat time ratio",
                "xlabel": "size (square weight)",
                "ylabel": "ratio (> 1: flat faster)",
                "xscale": "log",
                "series": ratios,
            },
        ],
        f"Flat vs product block butterfly (block {cfg['block']}, {cfg['rows']} rows)",
    )


if __name__ == "__main__":
    sys.exit(main())
