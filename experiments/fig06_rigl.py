"""Figure 6 at CPU scale: Pixelfly against RigL and static random blocks (issue #14).

    python experiments/fig06_rigl.py --jobs 2                    # full run (~25 min at load 35)
    python experiments/fig06_rigl.py --quick --out /tmp/f06      # smoke run (seconds)

An MLP-Mixer (width 128, MLP 512, depth 2, 16 tokens) on scikit-learn's digits
(:func:`common.digits`), trained from scratch, same steps, optimizer and schedule
(:func:`common.train`) for every method:

* **dense**; **Pixelfly**: ``sparsify(model, 0.3, block=16)`` planned by FLOPs
  (:func:`common.sparsify`, default init); **narrow dense**: a dense Mixer narrowed to
  Pixelfly's parameter count (:func:`common.narrower`);
* **RigL** (:mod:`baselines.rigl`, Evci et al. 2020) on the same layers Pixelfly sparsifies,
  at the same total density of those layers (uniform; ERK gives the same densities here, every
  sparse layer being 128 x 512 or 512 x 128): unstructured masks, drop by magnitude and grow
  by gradient every ``delta_t`` steps with a cosine-decayed update fraction (alpha 0.3) until
  75% of training, new connections at zero;
* **random blocks**: on the same layers, the same number of 16 x 16 blocks as Pixelfly
  (and its rank, if any) at random positions, fixed for training
  (:class:`baselines.static_masks.MaskedLinear`, masked dense math).

Speed: training steps interleaved in one process (median ratio vs dense). Pixelfly runs its
block-sparse kernels (compiled path); RigL and random blocks run as what they are on these
kernels, dense math with masks: RigL's step is a dense step plus gradient and weight masking,
with its mask update (timed as a model that updates every step) amortised over ``delta_t``
steps; random blocks' step is a masked dense step (a block-sparse kernel for arbitrary block
positions would do Pixelfly's FLOPs; none is timed here).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
from baselines.rigl import RigL, erk_densities  # noqa: E402
from baselines.static_masks import MaskedLinear, replace_linear, stretch  # noqa: E402

FULL = {"width": 128, "depth": 2, "batch": 32, "steps": 200, "lr": 2e-3, "seeds": 3}
FULL.update(budget=0.3, block=16, rounds=10, evals=4, delta_t=10, alpha=0.3, t_end=0.75)
QUICK = {"width": 128, "depth": 1, "batch": 16, "steps": 4, "lr": 2e-3, "seeds": 1}
QUICK.update(budget=0.3, block=16, rounds=1, evals=2, delta_t=2, alpha=0.3, t_end=0.75)
VARIANTS = ("dense", "pixelfly", "narrow dense", "rigl", "random blocks")


def mcfg(cfg: dict, width: int | None = None) -> dict:
    return {"width": width or cfg["width"], "depth": cfg["depth"]}


def sparse_layers(px: torch.nn.Module) -> dict[str, dict]:
    """Per PixelflyLinear of a sparsified model: shape, kept blocks, rank, kept parameters."""
    out = {}
    for name, m in px.named_modules():
        if type(m).__name__ == "PixelflyLinear":
            pb = m.spec.pattern_block
            out[name] = {
                "out": m.out_features,
                "in": m.in_features,
                "blocks": m.blocks.numel() // (pb * pb),
                "pattern_block": pb,
                "rank": m.spec.rank,
                "kept": m.blocks.numel() + m.spec.rank * (m.in_features + m.out_features),
                "density": m.density,
                "spec": str(m.spec),
            }
    return out


def rigl_for(model: torch.nn.Module, layers: dict, cfg: dict, seed: int) -> RigL:
    kept = sum(v["kept"] for v in layers.values())
    total = sum(v["out"] * v["in"] for v in layers.values())
    mods = [model.get_submodule(n) for n in layers]
    t_end = round(cfg["t_end"] * cfg["steps"])
    return RigL(mods, kept / total, cfg["delta_t"], t_end, cfg["alpha"], "uniform", seed=seed)


def random_blocks(model: torch.nn.Module, layers: dict, seed: int) -> torch.nn.Module:
    """Each of ``layers`` as a :class:`MaskedLinear` keeping as many blocks as Pixelfly's, at
    uniformly random positions of its block grid (and Pixelfly's rank)."""
    for j, (name, v) in enumerate(layers.items()):
        pb = v["pattern_block"]
        rows, cols = v["out"] // pb, v["in"] // pb
        rng = np.random.default_rng(seed * 1000 + j)
        flat = np.zeros(rows * cols, dtype=bool)
        flat[rng.choice(rows * cols, size=v["blocks"], replace=False)] = True
        cells = flat.reshape(rows, cols)
        mask = stretch(cells, v["out"], v["in"])
        replace_linear(model, name, MaskedLinear(v["in"], v["out"], mask, v["rank"]))
    return model


def make(variant: str, cfg: dict, seed: int, task: C.Task, info: dict):
    """The model of ``variant`` for ``seed`` (and its RigL, or None)."""
    if variant == "narrow dense":
        return C.build("mixer", seed, **mcfg(cfg, info["narrow"][0])), None
    model = C.build("mixer", seed, **mcfg(cfg))
    if variant == "dense":
        return model, None
    if variant == "pixelfly":
        return C.sparsify(model, cfg["budget"], cfg["block"], task.batch(seed, 0, size=2)[0]), None
    if variant == "rigl":
        return model, rigl_for(model, info["layers"], cfg, seed)
    if variant == "random blocks":
        return random_blocks(model, info["layers"], seed), None
    raise ValueError(variant)


def one_run(variant: str, cfg: dict, seed: int, info: dict) -> dict:
    torch.manual_seed(seed)
    task = C.Task("digits", C.digits(), cfg["batch"])
    model, rigl = make(variant, cfg, seed, task, info)
    C.set_path(model, "eager")
    label = f"{variant} s{seed}"
    if rigl is None:
        r = C.train(task, model, cfg["steps"], cfg["lr"], seed, evals=cfg["evals"], label=label)
    else:
        with rigl.attached():
            r = C.train(task, model, cfg["steps"], cfg["lr"], seed, evals=cfg["evals"], label=label)
        r["rigl_updates"] = rigl.updates
        r["rigl_density"] = rigl.density()
    r.update(variant=variant, seed=seed)
    return r


def speed(cfg: dict, task: C.Task, info: dict) -> dict:
    """Interleaved training steps; RigL twice: masking only (no update due) and an update every
    step, the update's cost amortised over ``delta_t``."""
    models = {v: make(v, cfg, 0, task, info) for v in VARIANTS}
    masked, mrigl = models["rigl"]
    upd_model, _ = make("rigl", cfg, 0, task, info)
    urigl = RigL(
        [upd_model.get_submodule(n) for n in info["layers"]],
        mrigl.density(),
        delta_t=1,
        t_end=10**9,
        alpha=cfg["alpha"],
    )
    mrigl.delta_t = 10**9
    named = {v: m for v, (m, _) in models.items()}
    named["rigl (update every step)"] = upd_model
    with mrigl.attached(), urigl.attached():
        res = C.speed_ratios(task, named, cfg["rounds"])
    upd = res.pop("rigl (update every step)")
    extra = (upd["step_ms"] - res["rigl"]["step_ms"]) / cfg["delta_t"]
    res["rigl"]["masked_step_ms"] = res["rigl"]["step_ms"]
    res["rigl"]["update_ms"] = upd["step_ms"] - res["rigl"]["step_ms"]
    res["rigl"]["step_ms"] += extra
    res["rigl"]["speedup"] = res["dense"]["step_ms"] / res["rigl"]["step_ms"]
    return res


def main(argv: list[str] | None = None) -> int:
    args = C.parser(__doc__, "fig06_rigl").parse_args(argv)
    out = C.setup(args)
    cfg = dict(QUICK if args.quick else FULL)
    seeds = list(range(args.seeds or cfg["seeds"]))
    task = C.Task("digits", C.digits(), cfg["batch"])
    px, _ = make("pixelfly", cfg, 0, task, {})
    layers = sparse_layers(px)
    if not layers:
        raise SystemExit("the plan sparsified no layer: nothing to compare")
    narrow = C.narrower("mixer", C.n_params(px), **mcfg(cfg))
    shapes = [(v["out"], v["in"]) for v in layers.values()]
    kept = sum(v["kept"] for v in layers.values()) / sum(o * i for o, i in shapes)
    info = {"layers": layers, "narrow": narrow, "density": kept, "erk": erk_densities(shapes, kept)}
    C.log("interleaved speed")
    sp = speed(cfg, task, info)
    jobs = [(v, cfg, s, info) for v in VARIANTS for s in seeds]
    runs = C.run_jobs(one_run, jobs, args.jobs)
    params = {
        "dense": C.n_params(C.build("mixer", 0, **mcfg(cfg))),
        "pixelfly": C.n_params(px),
        "narrow dense": narrow[1],
    }
    res = {"config": cfg, "info": info, "speed": sp, "runs": runs, "params": params}
    (out / "fig06_rigl.json").write_text(json.dumps(res, indent=1))
    report(out, cfg, seeds, res)
    return 0


def report(out: Path, cfg: dict, seeds: list[int], res: dict) -> None:
    runs, sp, info = res["runs"], res["speed"], res["info"]

    def acc(v):
        return [r["metric"] for r in runs if r["variant"] == v]

    speed_note = {
        "dense": "dense",
        "pixelfly": "block-sparse kernel",
        "narrow dense": "dense",
        "rigl": "dense + masks (unstructured)",
        "random blocks": "masked dense",
    }
    sparse_params = res["params"]["pixelfly"]
    rows = []
    for v in VARIANTS:
        p = res["params"].get(v, sparse_params)
        rows.append(
            [
                v,
                f"{p:,}",
                C.fmt(acc(v), 2),
                f"{sp[v]['speedup']:.2f}x ({speed_note[v]})",
                "-"
                if v == "pixelfly"
                else C.compare(acc("pixelfly"), acc(v), True, ("pixelfly", v)),
            ]
        )
    lay = [
        [n, f"{v['out']}x{v['in']}", v["spec"], f"{v['density']:.4f}", v["blocks"]]
        for n, v in info["layers"].items()
    ]
    rigl_runs = [r for r in runs if r["variant"] == "rigl"]
    ups = rigl_runs[0]["rigl_updates"]
    changed = [sum(u["changed"] for u in r["rigl_updates"]) for r in rigl_runs]
    active = round(info["density"] * sum(v["out"] * v["in"] for v in info["layers"].values()))
    r_ms = sp["rigl"]
    C.write_md(
        out / "fig06_rigl.md",
        "Figure 6 (CPU scale): Pixelfly vs RigL vs static random blocks, Mixer on digits",
        seeds,
        "scikit-learn's 8x8 digits (1797 images, fixed 1297 / 500 split), 2x2 patches "
        "(16 tokens): a real image classification task small enough to train every method "
        "several times on a shared 2-core CPU.",
        [
            f"Mixer width {cfg['width']}, MLP {4 * cfg['width']}, depth {cfg['depth']}; "
            f"{cfg['steps']} AdamW steps of batch {cfg['batch']} (lr {cfg['lr']}, warm-up + "
            f"cosine, clipping 1.0), the same for every method. Pixelfly: budget "
            f"{cfg['budget']}, block {cfg['block']}, planned by FLOPs, default init. RigL and "
            f"random blocks sparsify the same layers at the same density "
            f"({info['density']:.4f} of those layers' weights kept; ERK would give "
            + ", ".join(f"{d:.4f}" for d in info["erk"])
            + f", i.e. uniform); narrow dense: width {info['narrow'][0]}.",
            "Sparse layers (Pixelfly's plan; RigL and random blocks use the same layers):\n\n"
            + C.table(["layer", "out x in", "Pixelfly pattern", "density", "blocks"], lay),
            C.table(
                ["method", "params", "test acc %", "training-step speed vs dense", "vs Pixelfly"],
                rows,
            ),
            f"RigL: delta_t {cfg['delta_t']}, alpha {cfg['alpha']}, cosine decay to step "
            f"{round(cfg['t_end'] * cfg['steps'])}: {len(ups)} mask updates; connections "
            f"changed over training: "
            + ", ".join(f"{c:,}" for c in changed)
            + f" (per seed; {active:,} active). Its masks are unstructured, so it trains as "
            f"the dense model with masked gradients and weights: measured step "
            f"{r_ms['masked_step_ms']:.1f} ms masked + {r_ms['update_ms']:.1f} ms per mask "
            f"update / {cfg['delta_t']} = {r_ms['step_ms']:.1f} ms vs dense "
            f"{sp['dense']['step_ms']:.1f} ms. Random blocks run as masked dense math here "
            f"(a kernel for arbitrary block positions would do Pixelfly's FLOPs). Pixelfly's "
            f"step: {sp['pixelfly']['step_ms']:.1f} ms on its block-sparse kernels. "
            f"Speed: {cfg['rounds']} interleaved rounds, medians.",
            "'no difference measured': the means are within one standard deviation.",
        ],
    )
    curves = {v: C.curve_stats([r for r in runs if r["variant"] == v]) for v in VARIANTS}
    pts = {}
    for v in VARIANTS:
        m, s = C.mean_std(acc(v))
        pts[v] = ([sp[v]["speedup"]], [m], [0.0], [s])
    C.plot(
        out / "fig06_rigl.png",
        [
            {
                "title": "test accuracy during training",
                "xlabel": "step",
                "ylabel": "test acc %",
                "series": curves,
            },
            {
                "title": "final accuracy vs measured training speed",
                "xlabel": "training-step speedup vs dense",
                "ylabel": "test acc %",
                "points": pts,
            },
        ],
        "Mixer on digits: Pixelfly vs RigL vs random blocks (mean ± std over seeds)",
    )


if __name__ == "__main__":
    sys.exit(main())
