"""Figure 13 at CPU scale: accuracy against training speed as the budget shrinks (issue #14).

    python experiments/fig13_budget_sweep.py --jobs 3                 # full run (~40 min)
    python experiments/fig13_budget_sweep.py --quick --out /tmp/f13   # smoke run (seconds)

An MLP-Mixer (width 256, MLP 1024, depth 1, 16 tokens) on scikit-learn's digits
(:func:`common.digits`), trained from scratch at budgets 1.0 (the dense model), 0.7, 0.5, 0.3,
0.2, 0.1 and 0.05: ``sparsify(model, budget, block=8)`` planned by FLOPs
(:func:`common.sparsify`), default init. At every budget a dense Mixer narrowed to the
Pixelfly model's parameter count (:func:`common.narrower`) is trained the same way. Speed:
training steps of dense, Pixelfly and narrow dense interleaved in one process per budget
(median ratio vs dense; sparse layers on their eager path: compiling six models took longer
than the machine's share allowed). 2 seeds, 150 steps: what 2 cores shared by ~8 jobs
allowed. The paper: accuracy holds down to about 30% of
the parameters and falls below.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

# Width 256 and block 8: the narrowest Mixer whose channel MLPs have patterns down to budget
# 0.05 (width 128 stops at 0.125); depth 1 and 600 steps (dense has converged by then; 150
# were too few) keep 3 seeds x 13 models at about 22 minutes with --jobs 2.
FULL = {"width": 256, "depth": 1, "batch": 64, "steps": 600, "lr": 2e-3, "seeds": 3}
FULL.update(block=8, rounds=8, evals=4, budgets=(1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05))
QUICK = {"width": 128, "depth": 1, "batch": 16, "steps": 3, "lr": 2e-3, "seeds": 1}
QUICK.update(block=16, rounds=1, evals=1, budgets=(1.0, 0.3, 0.05))


def mcfg(cfg: dict, width: int | None = None) -> dict:
    return {"width": width or cfg["width"], "depth": cfg["depth"]}


def make(variant: str, budget: float, cfg: dict, seed: int, task: C.Task, narrow: dict):
    if variant == "narrow dense":
        return C.build("mixer", seed, **mcfg(cfg, narrow[str(budget)][0]))
    dense = C.build("mixer", seed, **mcfg(cfg))
    if budget >= 1.0:
        return dense
    return C.sparsify(dense, budget, cfg["block"], task.batch(seed, 0, size=2)[0])


def one_run(variant: str, budget: float, cfg: dict, seed: int, narrow: dict) -> dict:
    task = C.Task("digits", C.digits(), cfg["batch"])
    model = C.set_path(make(variant, budget, cfg, seed, task, narrow), "eager")
    label = f"{variant} {budget} s{seed}"
    r = C.train(task, model, cfg["steps"], cfg["lr"], seed, evals=cfg["evals"], label=label)
    r.update(variant=variant, budget=budget, seed=seed, params=C.n_params(model))
    plan = getattr(model, "pxcompile_plan", None)
    r["achieved"] = plan.summary.eligible_fraction if plan is not None else 1.0
    return r


def main(argv: list[str] | None = None) -> int:
    args = C.parser(__doc__, "fig13_budget_sweep").parse_args(argv)
    out = C.setup(args, argv)
    cfg = dict(QUICK if args.quick else FULL)
    seeds = list(range(args.seeds or cfg["seeds"]))
    task = C.Task("digits", C.digits(), cfg["batch"])
    dense = make("pixelfly", 1.0, cfg, 0, task, {})
    narrow, speed = {}, {}
    for b in cfg["budgets"]:
        if b >= 1.0:
            narrow[str(b)] = (cfg["width"], C.n_params(dense))
            continue
        px = C.set_path(make("pixelfly", b, cfg, 0, task, {}), "eager")
        narrow[str(b)] = C.narrower("mixer", C.n_params(px), **mcfg(cfg))
        models = {
            "dense": dense,
            "pixelfly": px,
            "narrow dense": make("narrow dense", b, cfg, 0, task, narrow),
        }
        C.log(f"budget {b}: interleaved speed")
        speed[str(b)] = C.speed_ratios(task, models, cfg["rounds"])
    jobs = [("pixelfly", b, cfg, s, narrow) for b in cfg["budgets"] for s in seeds]
    jobs += [("narrow dense", b, cfg, s, narrow) for b in cfg["budgets"] if b < 1.0 for s in seeds]
    runs = C.run_jobs(
        one_run, jobs, args.jobs, None if args.quick else out / "fig13_budget_sweep.runs"
    )
    res = {"config": cfg, "narrow": narrow, "speed": speed, "runs": runs}
    (out / "fig13_budget_sweep.json").write_text(json.dumps(res, indent=1))
    report(out, cfg, seeds, res)
    return 0


def report(out: Path, cfg: dict, seeds: list[int], res: dict) -> None:
    runs = res["runs"]

    def acc(variant, b):
        v = "pixelfly" if b >= 1.0 else variant
        return [r["metric"] for r in runs if r["variant"] == v and r["budget"] == b]

    def params(variant, b):
        v = "pixelfly" if b >= 1.0 else variant
        return next(r["params"] for r in runs if r["variant"] == v and r["budget"] == b)

    dense_acc = acc("pixelfly", 1.0)
    dense_params = params("pixelfly", 1.0)
    rows, pts = [], {"pixelfly": ([], [], [], []), "narrow dense": ([], [], [], [])}
    for b in cfg["budgets"]:
        sp = res["speed"].get(str(b), {})
        got = next(r["achieved"] for r in runs if r["variant"] == "pixelfly" and r["budget"] == b)
        p = params("pixelfly", b)
        row = [f"{b:g}", f"{got:.3f}", f"{p:,} ({p / dense_params:.2f})"]
        row.append(C.fmt(acc("pixelfly", b), 2))
        row.append(f"{sp['pixelfly']['speedup']:.2f}x" if sp else "1.00x")
        row.append(f"{res['narrow'][str(b)][0]}")
        row.append(C.fmt(acc("narrow dense", b), 2))
        row.append(f"{sp['narrow dense']['speedup']:.2f}x" if sp else "1.00x")
        names = ("pixelfly", "narrow dense")
        row.append(
            C.compare(acc("pixelfly", b), acc("narrow dense", b), True, names) if sp else "-"
        )
        row.append(
            C.compare(acc("pixelfly", b), dense_acc, True, ("pixelfly", "dense")) if sp else "-"
        )
        rows.append(row)
        for v in names:
            m, s = C.mean_std(acc(v, b))
            pts[v][0].append(sp[v]["speedup"] if sp else 1.0)
            pts[v][1].append(m)
            pts[v][2].append(0.0)
            pts[v][3].append(s)
    head = [
        "budget",
        "achieved",
        "Pixelfly params (frac)",
        "Pixelfly acc %",
        "Pixelfly speed",
        "narrow width",
        "narrow acc %",
        "narrow speed",
        "Pixelfly vs narrow",
        "Pixelfly vs dense",
    ]
    C.write_md(
        out / "fig13_budget_sweep.md",
        "Figure 13 (CPU scale): Mixer on digits, accuracy vs training speed across budgets",
        seeds,
        "scikit-learn's 8x8 digits (1797 images, fixed 1297 / 500 split).",
        [
            f"Mixer width {cfg['width']}, MLP {4 * cfg['width']}, depth {cfg['depth']}; "
            f"{cfg['steps']} AdamW steps of batch {cfg['batch']} (lr {cfg['lr']}); Pixelfly "
            f"block {cfg['block']}, planned by FLOPs, default init; budget 1.0 is the dense "
            f"model. Speed: training steps interleaved (dense, Pixelfly on its eager path, narrow), "
            f"{cfg['rounds']} rounds, median ratio dense / model.",
            C.table(head, rows),
        ],
    )
    budgets = list(cfg["budgets"])
    curves = {v: (budgets, pts[v][1], pts[v][3]) for v in ("pixelfly", "narrow dense")}
    C.plot(
        out / "fig13_budget_sweep.png",
        [
            {
                "title": "test accuracy vs budget",
                "xlabel": "budget (fraction of dense FLOPs kept)",
                "ylabel": "test acc %",
                "xscale": "log",
                "series": curves,
            },
            {
                "title": "test accuracy vs measured training speedup",
                "xlabel": "training step speedup vs dense",
                "ylabel": "test acc %",
                "points": pts,
            },
        ],
        "Mixer on digits: budget sweep (mean ± std over seeds)",
    )


if __name__ == "__main__":
    sys.exit(main())
