"""Figure 5 at CPU scale: vision models, accuracy and training speed vs dense (issue #14).

    python experiments/fig05_vision.py --jobs 3                 # full run (~25 min, 2 busy cores)
    python experiments/fig05_vision.py --quick --out /tmp/f05   # smoke run (seconds)

An MLP-Mixer and a ViT on scikit-learn's digits (8x8 images cut into 2x2 patches: 16 tokens;
:func:`common.digits`), trained from scratch, three ways with the same batches, steps,
AdamW and schedule:

* ``dense``: the model as written (width 128, MLP 512, depth 2);
* ``pixelfly``: ``sparsify(model, 0.3, block=16)`` planned by FLOPs (:func:`common.sparsify`),
  default init (``auto``: the fresh model gets the scratch init);
* ``narrow dense``: the same architecture made narrower to Pixelfly's parameter count
  (:func:`common.narrower`).

Accuracy: test accuracy (500 held-out images) mean ± std over seeds, learning curves in the
png. Speed: full training steps (forward, backward, AdamW) of the three models interleaved in
one process, median per-round ratio against dense (:func:`common.speed_ratios`), the sparse
layers on their eager path (compiling them took longer than the machine's share allowed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

# 3 seeds, 800 steps of batch 32: every model's test accuracy has flattened by then (the
# learning curves in the png; at 200 steps the ViT had not converged). Four minutes with
# --jobs 2 on the 2 cores when nothing else runs.
FULL = {"width": 128, "depth": 2, "batch": 32, "steps": 800, "lr": 2e-3, "seeds": 3}
FULL.update(block=16, budget=0.3, rounds=8, evals=8)
QUICK = {"width": 128, "depth": 1, "batch": 16, "steps": 4, "lr": 2e-3, "seeds": 1}
QUICK.update(block=16, budget=0.3, rounds=2, evals=2)
MODELS = {"mixer": {}, "vit": {"heads": 4}}
VARIANTS = ("dense", "pixelfly", "narrow dense")


def model_cfg(kind: str, cfg: dict, width: int | None = None) -> dict:
    return {"width": width or cfg["width"], "depth": cfg["depth"], **MODELS[kind]}


def make(kind: str, variant: str, cfg: dict, seed: int, task: C.Task, narrow: dict):
    dense = C.build(kind, seed, **model_cfg(kind, cfg))
    if variant == "dense":
        return dense
    if variant == "narrow dense":
        return C.build(kind, seed, **model_cfg(kind, cfg, narrow[kind][0]))
    x = task.batch(seed, 0, size=2)[0]
    return C.sparsify(dense, cfg["budget"], cfg["block"], x)


def one_run(kind: str, variant: str, cfg: dict, seed: int, narrow: dict) -> dict:
    task = C.Task("digits", C.digits(), cfg["batch"])
    model = C.set_path(make(kind, variant, cfg, seed, task, narrow), "eager")
    label = f"{kind} {variant} s{seed}"
    r = C.train(task, model, cfg["steps"], cfg["lr"], seed, evals=cfg["evals"], label=label)
    r.update(kind=kind, variant=variant, seed=seed, params=C.n_params(model))
    r["init"] = getattr(model, "pxcompile_init", "-")
    r["layers"] = len(getattr(model, "pxcompile_layers", {}))
    return r


def main(argv: list[str] | None = None) -> int:
    args = C.parser(__doc__, "fig05_vision").parse_args(argv)
    out = C.setup(args, argv)
    cfg = dict(QUICK if args.quick else FULL)
    seeds = list(range(args.seeds or cfg["seeds"]))
    task = C.Task("digits", C.digits(), cfg["batch"])
    x = task.batch(0, 0, size=2)[0]
    narrow, speed, flops = {}, {}, {}
    for kind in MODELS:
        px = make(kind, "pixelfly", cfg, 0, task, {})
        narrow[kind] = C.narrower(kind, C.n_params(px), **model_cfg(kind, cfg))
        models = {v: C.set_path(make(kind, v, cfg, 0, task, narrow), "eager") for v in VARIANTS}
        flops[kind] = {v: C.flops(m, x) / 2 for v, m in models.items()}  # per image
        C.log(f"{kind}: interleaved speed, {cfg['rounds']} rounds")
        speed[kind] = C.speed_ratios(task, models, cfg["rounds"])
    jobs = [(k, v, cfg, s, narrow) for k in MODELS for s in seeds for v in VARIANTS]
    runs = C.run_jobs(one_run, jobs, args.jobs, None if args.quick else out / "fig05_vision.runs")
    res = {"config": cfg, "narrow": narrow, "speed": speed, "flops": flops, "runs": runs}
    (out / "fig05_vision.json").write_text(json.dumps(res, indent=1))
    report(out, cfg, seeds, res)
    return 0


def report(out: Path, cfg: dict, seeds: list[int], res: dict) -> None:
    sections = [
        f"Models: width {cfg['width']}, MLP {4 * cfg['width']}, depth {cfg['depth']}, 16 tokens "
        f"(2x2 patches); {cfg['steps']} AdamW steps of batch {cfg['batch']} (lr {cfg['lr']}, "
        f"warm-up + cosine); Pixelfly: budget {cfg['budget']}, block {cfg['block']}, planned "
        "by FLOPs, default init. Speed: training steps interleaved in one process, "
        f"{cfg['rounds']} rounds, median ratio dense time / model time (> 1: faster); "
        "FLOPs: forward, per image."
    ]
    panels = []
    for kind in MODELS:
        runs = [r for r in res["runs"] if r["kind"] == kind]
        by = {v: [r for r in runs if r["variant"] == v] for v in VARIANTS}
        acc = {v: [r["metric"] for r in rs] for v, rs in by.items()}
        rows = []
        for v, rs in by.items():
            sp = res["speed"][kind][v]
            rows.append(
                [
                    v,
                    f"{rs[0]['params']:,}",
                    f"{res['flops'][kind][v] / 1e6:.2f} M",
                    rs[0]["init"] if v == "pixelfly" else "-",
                    C.fmt(acc[v], 2),
                    f"{sp['step_ms']:.1f}",
                    f"{sp['speedup']:.2f}x",
                ]
            )
        head = ["model", "params", "FLOPs", "init", "test acc %", "step ms", "speed vs dense"]
        w = res["narrow"][kind][0]
        verdicts = [
            "Pixelfly vs dense: "
            + C.compare(acc["pixelfly"], acc["dense"], True, ("pixelfly", "dense")),
            f"Pixelfly vs narrow dense (width {w}): "
            + C.compare(acc["pixelfly"], acc["narrow dense"], True, ("pixelfly", "narrow dense")),
        ]
        sections.append(f"## {kind}\n\n" + C.table(head, rows) + "\n\n- " + "\n- ".join(verdicts))
        panels.append(
            {
                "title": f"{kind}: test accuracy",
                "xlabel": "step",
                "ylabel": "test acc %",
                "series": {v: C.curve_stats(rs) for v, rs in by.items()},
                "ylim": (50, 100),
            }
        )
    C.write_md(
        out / "fig05_vision.md",
        "Figure 5 (CPU scale): Mixer and ViT on digits, dense vs Pixelfly vs narrower dense",
        seeds,
        "scikit-learn's 8x8 digits (1797 images, fixed 1297 / 500 split): a real image task "
        "small enough to train to convergence on 2 shared cores.",
        sections,
    )
    C.plot(out / "fig05_vision.png", panels, "digits, budget 0.3: learning curves (mean ± std)")


if __name__ == "__main__":
    sys.exit(main())
