"""Figure 12 at CPU scale: which sparsity-pattern components matter (issue #14).

    python experiments/fig12_components.py --jobs 3                  # full run (~25 min at load 35)
    python experiments/fig12_components.py --quick --out /tmp/f12    # smoke run (seconds)
    python experiments/fig12_components.py --low --jobs 3            # the same at ~12.5%

An MLP-Mixer (width 128, MLP 512, depth 2, 16 tokens) on scikit-learn's digits
(:func:`common.digits`), trained from scratch with :func:`common.train` (same steps,
optimizer, schedule for every pattern). The channel MLPs (128 x 512 and 512 x 128, as the paper
sparsifies Mixer) take one pattern each run, all at about 25% of their weights, on a 16 x 16
grid of cells stretched to the weight (cells of 32 x 8 / 8 x 32 elements):

* **local**: a circular band of 4 cells per row; **global**: low rank only (rank 26);
  **butterfly**: the flat block butterfly, 3 factors (4 cells per row); **random**: 64 cells
  at random positions (fixed per layer and seed);
* combinations, a 3-cells-per-row part plus rank 6 (24.6%): **local + global** (band of 3),
  **random + low rank** (48 random cells), **butterfly + low rank** (2 factors): Pixelfly.

``--low``: the same comparison at about 12.5% on a 32 x 32 grid (cells of 16 x 4 / 4 x 16):
band of 4, rank 13, butterfly with 3 factors, 128 random cells; combinations of a 3-cells-per-
row part with rank 3 (12.3%); results in ``fig12_components_low.*``.

Every pattern runs as masked dense math (:class:`baselines.static_masks.MaskedLinear`, the same
code and init rule for all), so only the pattern differs; this measures accuracy, not speed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
from baselines.static_masks import (  # noqa: E402
    MaskedLinear,
    band_cells,
    butterfly_cells,
    random_cells,
    replace_linear,
    stretch,
)

FULL = {"width": 128, "depth": 2, "batch": 32, "steps": 200, "lr": 2e-3, "seeds": 3}
FULL.update(grid=16, evals=4)
QUICK = {"width": 128, "depth": 1, "batch": 16, "steps": 3, "lr": 2e-3, "seeds": 2}
QUICK.update(grid=16, evals=1)

#: name -> pattern: ``band`` (cells per row), ``butterfly`` (factors), ``random`` (cells),
#: ``rank``; ``None`` is the dense model.
PATTERNS: dict[str, dict | None] = {
    "dense": None,
    "local": {"band": 4},
    "global (low rank)": {"rank": 26},
    "butterfly": {"butterfly": 3},
    "random": {"random": 64},
    "local + global": {"band": 3, "rank": 6},
    "random + low rank": {"random": 48, "rank": 6},
    "butterfly + low rank (Pixelfly)": {"butterfly": 2, "rank": 6},
}
#: The same components at about 12.5% on a 32 x 32 grid (``--low``).
PATTERNS_LOW: dict[str, dict | None] = {
    "dense": None,
    "local": {"band": 4},
    "global (low rank)": {"rank": 13},
    "butterfly": {"butterfly": 3},
    "random": {"random": 128},
    "local + global": {"band": 3, "rank": 3},
    "random + low rank": {"random": 96, "rank": 3},
    "butterfly + low rank (Pixelfly)": {"butterfly": 2, "rank": 3},
}


def cells(pattern: dict, n: int, seed: int):
    if "band" in pattern:
        return band_cells(n, pattern["band"])
    if "butterfly" in pattern:
        return butterfly_cells(n, pattern["butterfly"])
    if "random" in pattern:
        return random_cells(n, pattern["random"], seed)
    return None


def make(name: str, cfg: dict, seed: int) -> torch.nn.Module:
    model = C.build("mixer", seed, width=cfg["width"], depth=cfg["depth"])
    pattern = cfg["patterns"][name]
    if pattern is None:
        return model
    j = 0
    for lname, m in list(model.named_modules()):
        if ".mlp_channels.fc" not in lname:
            continue
        c = cells(pattern, cfg["grid"], seed * 1000 + j)
        mask = None if c is None else stretch(c, m.out_features, m.in_features)
        layer = MaskedLinear(m.in_features, m.out_features, mask, pattern.get("rank", 0))
        replace_linear(model, lname, layer)
        j += 1
    return model


def density(model: torch.nn.Module) -> float:
    layers = [m for m in model.modules() if isinstance(m, MaskedLinear)]
    if not layers:
        return 1.0
    return sum(m.kept for m in layers) / sum(m.in_features * m.out_features for m in layers)


def one_run(name: str, cfg: dict, seed: int) -> dict:
    task = C.Task("digits", C.digits(), cfg["batch"])
    model = make(name, cfg, seed)
    label = f"{name} s{seed}"
    r = C.train(task, model, cfg["steps"], cfg["lr"], seed, evals=cfg["evals"], label=label)
    r.update(pattern=name, seed=seed, density=density(model))
    return r


def main(argv: list[str] | None = None) -> int:
    ap = C.parser(__doc__, "fig12_components")
    ap.add_argument("--low", action="store_true", help="the components at ~12.5%% (32x32 grid)")
    args = ap.parse_args(argv)
    out = C.setup(args)
    cfg = dict(QUICK if args.quick else FULL)
    cfg["patterns"] = PATTERNS_LOW if args.low else PATTERNS
    cfg["stem"] = "fig12_components_low" if args.low else "fig12_components"
    if args.low:
        cfg["grid"] = 32
    seeds = list(range(args.seeds or cfg["seeds"]))
    jobs = [(name, cfg, s) for name in cfg["patterns"] for s in seeds]
    runs = C.run_jobs(one_run, jobs, args.jobs)
    res = {"config": cfg, "runs": runs}
    (out / f"{cfg['stem']}.json").write_text(json.dumps(res, indent=1))
    report(out, cfg, seeds, res)
    return 0


def report(out: Path, cfg: dict, seeds: list[int], res: dict) -> None:
    runs = res["runs"]

    def acc(name):
        return [r["metric"] for r in runs if r["pattern"] == name]

    def dens(name):
        return next(r["density"] for r in runs if r["pattern"] == name)

    px = "butterfly + low rank (Pixelfly)"
    rows = []
    for name, pattern in cfg["patterns"].items():
        what = "-" if pattern is None else ", ".join(f"{k} {v}" for k, v in pattern.items())
        rows.append(
            [
                name,
                what,
                f"{dens(name):.4f}",
                C.fmt(acc(name), 2),
                "-" if name == px else C.compare(acc(px), acc(name), True, ("Pixelfly", name)),
                "-"
                if name == "dense"
                else C.compare(acc(name), acc("dense"), True, (name, "dense")),
            ]
        )
    head = ["pattern", "parts", "density", "test acc %", "Pixelfly vs it", "it vs dense"]
    C.write_md(
        out / f"{cfg['stem']}.md",
        "Figure 12 (CPU scale): sparsity-pattern components, Mixer on digits",
        seeds,
        "scikit-learn's 8x8 digits (1797 images, fixed 1297 / 500 split), 2x2 patches "
        "(16 tokens): a real image classification task small enough to train eight patterns "
        "several times on a shared 2-core CPU.",
        [
            f"Mixer width {cfg['width']}, MLP {4 * cfg['width']}, depth {cfg['depth']}; "
            f"{cfg['steps']} AdamW steps of batch {cfg['batch']} (lr {cfg['lr']}, warm-up + "
            f"cosine, clipping 1.0), the same for every pattern. The channel MLPs' weights "
            f"(fc1 {4 * cfg['width']}x{cfg['width']}, fc2 {cfg['width']}x{4 * cfg['width']}) "
            f"take the pattern on a {cfg['grid']}x{cfg['grid']} cell grid (parts: band = "
            f"cells per row of a circular band, butterfly = flat butterfly factors, random = "
            f"random cells, rank = low-rank term); token MLPs, stem and head stay dense. "
            f"Density: kept parameters of those layers (low-rank factors included) over "
            f"their dense size. All patterns run as masked dense math with one init rule "
            f"(output variance of a fresh nn.Linear, split between the sparse and low-rank "
            f"parts by their parameter share), so only the pattern differs.",
            C.table(head, rows),
            "'no difference measured': the means are within one standard deviation (the "
            "larger of the two).",
        ],
    )
    names = list(cfg["patterns"])
    ms = [C.mean_std(acc(n)) for n in names]
    lo, hi = min(m - s for m, s in ms), max(m + s for m, s in ms)
    ylim = (lo - 1.2 * (hi - lo) - 0.1, hi + 0.1)  # room below the points for the legend
    C.plot(
        out / f"{cfg['stem']}.png",
        [
            {
                "title": f"final test accuracy by pattern (density ~{dens(names[1]):.3g})",
                "xlabel": "pattern (index, see table)",
                "ylabel": "test acc %",
                "ylim": ylim,
                "points": {
                    f"{i}: {n}": ([i], [m], [0.0], [s])
                    for i, (n, (m, s)) in enumerate(zip(names, ms))
                },
            },
            {
                "title": "test accuracy during training",
                "xlabel": "step",
                "ylabel": "test acc %",
                "series": {n: C.curve_stats([r for r in runs if r["pattern"] == n]) for n in names},
            },
        ],
        f"Mixer on digits: pattern components at ~{dens(names[1]):.1%} density "
        "(mean ± std over seeds)",
    )


if __name__ == "__main__":
    sys.exit(main())
