"""Parity study: does a Pixelfly-compiled model train as well as its dense original, and faster?

    python examples/parity.py --out examples/results          # the full study (~11 min, 2 cores)
    python examples/parity.py --quick --out /tmp/parity        # a smoke run (about a minute)

Two tasks, both on data every machine has offline, both trained from scratch:

* **digits**: scikit-learn's bundled 8x8 handwritten digits (1797 images; a fixed split of 1297
  train / 500 test), an MLP-Mixer (16 tokens of 2x2 patches, width 128, channel MLP 512,
  depth 2). Metric: test accuracy.
* **chars**: a character-level GPT (width 128, MLP 512, 2 layers, 4 heads, context 64) on the
  Python standard library's own source (the first ~1 MB of ``*.py`` files, sorted, ASCII).
  Metric: validation loss (nats per character) on a held-out 10%.

Each task trains the same architecture, with the same seeds, batches and optimizer:

* ``dense``: the model as written;
* ``pixelfly``: ``pxcompile.sparsify(model, budget, init="scratch")`` (flat block butterfly +
  low rank, the reference's density-aware init), with ``min_speedup: 0`` (these widths are
  predicted slower than dense, which would keep them dense; here accuracy is the question);
* ``random``: the same layers, each with a *random* block-sparse mask keeping the same number
  of blocks in every block row as the butterfly mask, plus the same low-rank term and init:
  it isolates whether the butterfly *pattern* matters;
* ``lowrank``: each sparsified layer replaced by a low-rank ``U V^T`` with (about) the same
  parameter count: it isolates whether the sparse part matters at all.

The two baselines are built in this file (not in the package) by swapping the layers the plan
sparsifies. For every run the study records the metric, the wall-clock training time (same
steps; excluding a warm-up step), the trainable parameter count and the empirical-NTK distance
from the dense model at initialization (:func:`pxcompile.ntk.ntk_distance`). Because the machine
may be shared, speed is also measured *interleaved*: one training step of each variant in turn,
repeated, and the median of the per-round time ratios (dense / variant) is reported.

Outputs under ``--out``: ``results.json`` (everything), ``results.md`` (the tables),
``parity.png`` (the plot) and ``command.txt`` (the command line and environment).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import pxcompile
from pxcompile.ntk import empirical_ntk, kernel_distance
from pxcompile.patterns import block_mask

VARIANTS = ("dense", "pixelfly", "random", "lowrank")

FULL = {
    "budgets": (0.5, 0.3, 0.15),
    "block": 8,
    "digits": {"steps": 80, "batch": 64, "lr": 3e-3, "seeds": (0, 1, 2)},
    "chars": {"steps": 120, "batch": 16, "lr": 2e-3, "seeds": (0, 1, 2), "val_batches": 16},
    "ntk_batch": 16,
    "ntk_outputs": 8,
    "speed_rounds": 8,
    "probe": {"dim": 768, "rows": 1024, "budgets": (0.3, 0.15), "rounds": 4},
}
QUICK = {
    "budgets": (0.3,),
    "block": 8,
    "digits": {"steps": 12, "batch": 32, "lr": 3e-3, "seeds": (0,)},
    "chars": {"steps": 6, "batch": 8, "lr": 2e-3, "seeds": (0,), "val_batches": 2},
    "ntk_batch": 4,
    "ntk_outputs": 2,
    "speed_rounds": 2,
    "probe": {"dim": 256, "rows": 128, "budgets": (0.3,), "rounds": 1},
}


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------


def digits_data() -> dict:
    """scikit-learn's bundled digits: a fixed 1297 / 500 split, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    x, y = x[perm], y[perm]
    return {"train": (x[:1297], y[:1297]), "test": (x[1297:], y[1297:])}


def stdlib_text(limit: int = 1_000_000) -> tuple[str, list[str]]:
    """The first ``limit`` characters of the standard library's top-level ``*.py`` files,
    sorted by name; non-ASCII characters become ``?``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, files, total = [], [], 0
    for p in sorted(root.glob("*.py")):
        try:
            t = p.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        parts.append(t)
        files.append(p.name)
        total += len(t)
        if total >= limit:
            break
    text = "".join(parts)[:limit]
    return "".join(c if ord(c) < 128 else "?" for c in text), files


def chars_data(context: int) -> dict:
    text, files = stdlib_text()
    ids = torch.tensor(np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.int64))
    split = int(0.9 * len(ids))
    return {
        "train": ids[:split],
        "val": ids[split:],
        "context": context,
        "files": f"{files[0]} .. {files[-1]} ({len(files)} files, {len(ids)} chars)",
    }


# ------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------


class MlpBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mlp_tokens = MlpBlock(tokens, token_hidden)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp_channels = MlpBlock(dim, channel_hidden)

    def forward(self, x):  # [batch, tokens, dim]
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class Mixer(nn.Module):
    """MLP-Mixer for 8x8 single-channel images given as ``[batch, 64]`` pixel vectors."""

    def __init__(self, image=8, patch=2, dim=128, depth=2, token_hidden=64, channel_hidden=512):
        super().__init__()
        self.image, self.patch = image, patch
        tokens = (image // patch) ** 2
        self.stem = nn.Linear(patch * patch, dim)
        self.blocks = nn.Sequential(
            *[MixerBlock(tokens, dim, token_hidden, channel_hidden) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, pixels):
        b, s, p = pixels.shape[0], self.image // self.patch, self.patch
        x = pixels.view(b, s, p, s, p).transpose(2, 3).reshape(b, s * s, p * p)
        x = self.norm(self.blocks(self.stem(x)))
        return self.head(x.mean(1))


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MlpBlock(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CharGPT(nn.Module):
    """GPT-2-style character model (ASCII vocabulary of 128), head tied to the embedding."""

    def __init__(self, vocab=128, context=64, dim=128, layers=2, heads=4, hidden=512):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        self.h = nn.Sequential(*[Block(dim, heads, hidden) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        with torch.no_grad():  # GPT-2's init for the (tied) embeddings
            self.wte.weight.normal_(0.0, 0.02)
            self.wpe.weight.normal_(0.0, 0.01)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.lm_head(self.ln_f(self.h(self.wte(idx) + self.wpe(pos))))


# ------------------------------------------------------------------------------------------
# baselines (kept here, not in the package)
# ------------------------------------------------------------------------------------------


class RandomBlockSparseLinear(nn.Module):
    """``y = x (W * M)^T + (x V^T) U^T + bias``, ``M`` a random block mask that keeps
    ``per_row`` blocks (random columns) in every block row, plus an optional rank-``rank``
    term. An accuracy baseline only: it runs as masked dense math (dense speed by
    construction), so its training time says nothing about a block-sparse kernel."""

    def __init__(self, in_f, out_f, block, per_row, rank, bias, generator):
        super().__init__()
        self.in_features, self.out_features = in_f, out_f
        rows, cols = out_f // block, in_f // block
        mask = torch.zeros(rows, cols, dtype=torch.bool)
        for r in range(rows):
            mask[r, torch.randperm(cols, generator=generator)[:per_row]] = True
        mask = mask.repeat_interleave(block, 0).repeat_interleave(block, 1)
        self.register_buffer("mask", mask, persistent=False)
        self.weight = nn.Parameter(torch.empty(out_f, in_f))
        self.lowrank_u = nn.Parameter(torch.empty(out_f, rank)) if rank else None
        self.lowrank_v = nn.Parameter(torch.empty(rank, in_f)) if rank else None
        self.bias = nn.Parameter(torch.empty(out_f)) if bias else None
        with torch.no_grad():  # the same density-aware init as PixelflyLinear's scratch init
            bound = 1.0 / math.sqrt(in_f)
            scale = math.sqrt(cols / per_row)
            self.weight.uniform_(-bound * scale, bound * scale)
            self.weight.mul_(mask)
            if rank:
                self.lowrank_v.uniform_(-bound, bound)
                ub = 1e-2 * scale * math.sqrt(3.0 / rank)
                self.lowrank_u.uniform_(-ub, ub)
            if bias:
                self.bias.uniform_(-bound, bound)

    def stored_params(self) -> int:
        """Parameters a block-sparse layer would store: kept blocks, low rank, bias."""
        n = int(self.mask.sum())
        for p in (self.lowrank_u, self.lowrank_v, self.bias):
            n += 0 if p is None else p.numel()
        return n

    def forward(self, x):
        y = F.linear(x, self.weight * self.mask, self.bias)
        if self.lowrank_u is not None:
            y = y + (x @ self.lowrank_v.t()) @ self.lowrank_u.t()
        return y


class LowRankLinear(nn.Module):
    """``y = (x V^T) U^T + bias``: a low-rank-only layer (``nn.Linear`` inits for both)."""

    def __init__(self, in_f, out_f, rank, bias):
        super().__init__()
        self.v = nn.Linear(in_f, rank, bias=False)
        self.u = nn.Linear(rank, out_f, bias=bias)

    def forward(self, x):
        return self.u(self.v(x))


# Plan by density alone: the study's widths are too small to be predicted faster than dense.
DENSITY_ONLY = {"min_speedup": 0}


def build_variant(variant, dense, budget, block, inputs, seed):
    """The model to train for one run, built from a freshly seeded dense model."""
    if variant == "dense":
        return dense
    torch.manual_seed(seed + 1000)
    gm = pxcompile.sparsify(
        dense, budget, block=block, example_inputs=inputs, init="scratch", policy=DENSITY_ONLY
    )
    if variant == "pixelfly":
        return gm
    model = copy.deepcopy(dense)
    gen = torch.Generator().manual_seed(seed + 2000)
    for name, path in gm.pxcompile_layers.items():
        layer = gm.get_submodule(path)
        old = model.get_submodule(name)
        assert isinstance(old, nn.Linear), name
        i, o, bias = layer.in_features, layer.out_features, layer.bias is not None
        if variant == "random":
            mask = block_mask(layer.spec, o, i, block=block)
            per_row = int(mask.sum(1)[0])
            assert (mask.sum(1) == per_row).all()
            new = RandomBlockSparseLinear(i, o, block, per_row, layer.spec.rank, bias, gen)
        else:  # lowrank: the same parameter count as the Pixelfly layer's weight
            rank = max(1, round(layer.density * i * o / (i + o)))
            new = LowRankLinear(i, o, rank, bias)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model


def set_path(model, path):
    for m in model.modules():
        if isinstance(m, pxcompile.PixelflyLinear):
            m.path = None if path == "auto" else path


def n_params(model) -> int:
    """Trainable parameters a real implementation stores (a masked baseline counts its kept
    blocks only)."""
    masked = [m for m in model.modules() if isinstance(m, RandomBlockSparseLinear)]
    skip = {id(p) for m in masked for p in m.parameters()}
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in skip)
    return n + sum(m.stored_params() for m in masked)


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------


class Task:
    """Batches, loss and evaluation for one task; batches depend only on (seed, step)."""

    def __init__(self, name, data, cfg):
        self.name, self.data, self.cfg = name, data, cfg

    def make_dense(self, seed):
        torch.manual_seed(seed)
        return Mixer() if self.name == "digits" else CharGPT(context=self.data["context"])

    def batch(self, seed, step, batch=None):
        g = torch.Generator().manual_seed(seed * 100_003 + step)
        b = batch or self.cfg["batch"]
        if self.name == "digits":
            x, y = self.data["train"]
            i = torch.randint(0, len(x), (b,), generator=g)
            return x[i], y[i]
        ids, t = self.data["train"], self.data["context"]
        start = torch.randint(0, len(ids) - t - 1, (b,), generator=g)
        seq = torch.stack([ids[s : s + t + 1] for s in start.tolist()])
        return seq[:, :-1], seq[:, 1:]

    def loss(self, model, x, y):
        out = model(x)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        model.eval()
        try:
            if self.name == "digits":
                x, y = self.data["test"]
                out = model(x)
                return {
                    "test_acc": float((out.argmax(1) == y).float().mean()) * 100,
                    "test_loss": float(F.cross_entropy(out, y)),
                }
            ids, t = self.data["val"], self.data["context"]
            nb, b = self.cfg["val_batches"], 16
            starts = np.linspace(0, len(ids) - t - 1, nb * b).astype(int)
            losses = []
            for k in range(nb):
                seq = torch.stack([ids[s : s + t + 1] for s in starts[k * b : (k + 1) * b]])
                losses.append(float(self.loss(model, seq[:, :-1], seq[:, 1:])))
            return {"val_loss": statistics.fmean(losses)}
        finally:
            model.train()

    @property
    def metric(self):
        return "test_acc" if self.name == "digits" else "val_loss"


def train(task, model, seed, log=None) -> dict:
    cfg = task.cfg
    steps = cfg["steps"]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warm)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        ),
    )
    model.train()
    x, y = task.batch(seed, 0)
    task.loss(model, x, y).backward()  # warm-up (allocations, any lazy compile): not timed
    opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for step in range(steps):
        x, y = task.batch(seed, step)
        loss = task.loss(model, x, y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if log and (step + 1) % max(1, steps // 4) == 0:
            log(f"    step {step + 1}/{steps} loss {loss.item():.3f}")
    return {"train_s": time.perf_counter() - t0, "final_train_loss": loss.item()}


def speed_ratios(task, models: dict, rounds: int, seed: int = 0) -> dict:
    """Median over rounds of dense step time / variant step time, steps interleaved."""
    steps = {}
    for name, m in models.items():
        opt = torch.optim.AdamW(m.parameters(), lr=1e-9)

        def step(m=m, opt=opt):
            x, y = task.batch(seed, 0)
            t0 = time.perf_counter()
            task.loss(m, x, y).backward()
            nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        step()  # warm-up
        steps[name] = step
    times = {n: [] for n in steps}
    for _ in range(rounds):
        for n, s in steps.items():
            times[n].append(s())
    d = times["dense"]
    return {
        n: {
            "speedup": statistics.median(a / b for a, b in zip(d, t)),
            "step_ms": statistics.median(t) * 1e3,
        }
        for n, t in times.items()
    }


# ------------------------------------------------------------------------------------------
# the study
# ------------------------------------------------------------------------------------------


def run_task(task, cfg, layer_path, log) -> dict:
    block = cfg["block"]
    runs = []
    speed = {}
    ex = task.batch(0, 0, batch=2)[0]
    for seed in task.cfg["seeds"]:
        dense_ref = task.make_dense(seed)  # the dense model at init: NTK reference
        ntk_x = task.batch(seed, 10**6, batch=cfg["ntk_batch"])[0]
        k_dense = empirical_ntk(dense_ref, ntk_x, outputs=cfg["ntk_outputs"], seed=seed)
        for budget in (None, *cfg["budgets"]):
            for variant in VARIANTS if budget is not None else ("dense",):
                if budget is not None and variant == "dense":
                    continue
                dense = task.make_dense(seed)
                model = build_variant(variant, dense, budget, block, (ex,), seed)
                set_path(model, layer_path)
                row = {"task": task.name, "variant": variant, "budget": budget, "seed": seed}
                row["params"] = n_params(model)
                if variant != "dense":
                    k = empirical_ntk(model, ntk_x, outputs=cfg["ntk_outputs"], seed=seed)
                    row["ntk_relative"] = kernel_distance(k_dense, k, "relative")
                    row["ntk_alignment"] = kernel_distance(k_dense, k, "alignment")
                if variant == "pixelfly":
                    s = model.pxcompile_plan.summary
                    row["achieved_budget"] = s.eligible_fraction
                    row["layers"] = len(model.pxcompile_layers)
                log(f"  {task.name} seed {seed} {variant} budget {budget}: training")
                row.update(train(task, model, seed, log))
                row.update(task.evaluate(model))
                log(f"  -> {task.metric} {row[task.metric]:.4f} in {row['train_s']:.1f}s")
                runs.append(row)
    for budget in cfg["budgets"]:
        seed = task.cfg["seeds"][0]
        models = {  # random runs as masked dense: no speed to measure
            v: build_variant(v, task.make_dense(seed), budget, block, (ex,), seed)
            for v in VARIANTS
            if v != "random"
        }
        for m in models.values():
            set_path(m, layer_path)
        speed[str(budget)] = speed_ratios(task, models, cfg["speed_rounds"])
        log(
            f"  {task.name} budget {budget} interleaved speedup vs dense: "
            + ", ".join(f"{v} {s['speedup']:.2f}x" for v, s in speed[str(budget)].items())
        )
    return {"runs": runs, "speed": speed}


def speed_probe(cfg, log) -> dict:
    """Interleaved train-step speed, dense vs Pixelfly, of the char GPT at GPT-2-like width
    (768, MLP 3072, block 32, 1 layer, batch x context = 1024 rows): whether the kernels pay
    off at sizes where GEMMs dominate. Random inputs; no training."""
    p = cfg["probe"]
    out = {}
    torch.manual_seed(0)
    dense = CharGPT(context=64, dim=p["dim"], layers=1, heads=p["dim"] // 64, hidden=4 * p["dim"])
    data = {"train": torch.randint(0, 128, (100_000,)), "context": 64}
    task = Task("chars", data, {"batch": p["rows"] // 64})
    ex = task.batch(0, 0, batch=2)[0]
    for budget in p["budgets"]:
        models = {
            "dense": dense,
            "pixelfly": pxcompile.sparsify(
                dense, budget, block=32, example_inputs=(ex,), init="scratch", policy=DENSITY_ONLY
            ),
        }
        set_path(models["pixelfly"], "eager")
        r = speed_ratios(task, models, p["rounds"])
        out[str(budget)] = {
            "speedup": r["pixelfly"]["speedup"],
            "dense_step_ms": r["dense"]["step_ms"],
            "pixelfly_step_ms": r["pixelfly"]["step_ms"],
            "params_frac": n_params(models["pixelfly"]) / n_params(dense),
        }
        log(f"  probe width {p['dim']} budget {budget}: {r['pixelfly']['speedup']:.2f}x")
    return {"dim": p["dim"], "rows": p["rows"], "by_budget": out}


def summarize(task_name, runs, speed, budgets) -> list[dict]:
    metric = "test_acc" if task_name == "digits" else "val_loss"
    rows = []
    for budget in (None, *budgets):
        for variant in VARIANTS:
            rs = [r for r in runs if r["variant"] == variant and r["budget"] == budget]
            if not rs:
                continue
            vals = [r[metric] for r in rs]
            row = {
                "task": task_name,
                "budget": budget,
                "variant": variant,
                "seeds": len(rs),
                metric: statistics.fmean(vals),
                metric + "_std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "train_s": statistics.fmean(r["train_s"] for r in rs),
                "params": rs[0]["params"],
            }
            if variant != "dense":
                row["ntk_relative"] = statistics.fmean(r["ntk_relative"] for r in rs)
                row["ntk_alignment"] = statistics.fmean(r["ntk_alignment"] for r in rs)
                row["speedup"] = speed[str(budget)].get(variant, {}).get("speedup")
            else:
                row["speedup"] = 1.0
            rows.append(row)
    dense = next(r for r in rows if r["variant"] == "dense")
    for r in rows:
        if metric == "test_acc":
            r["vs_dense"] = r[metric] - dense[metric]  # accuracy points
        else:
            r["vs_dense"] = (r[metric] / dense[metric] - 1) * 100  # percent
        r["params_frac"] = r["params"] / dense["params"]
        r["time_frac"] = r["train_s"] / dense["train_s"]
    return rows


def spearman(a, b) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    if len(a) < 2:
        return float("nan")
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / va if va else float("nan")


def ntk_prediction(rows, budgets) -> dict:
    """Does a smaller NTK distance at init go with a better final metric? Spearman rank
    correlation between NTK distance and badness (lower accuracy / higher loss): positive
    means the NTK predicts the ranking. Over all sparse runs, and within each budget."""
    out = {}
    sparse = [r for r in rows if r["variant"] != "dense"]
    metric = "test_acc" if "test_acc" in rows[0] else "val_loss"
    bad = [(-r[metric] if metric == "test_acc" else r[metric]) for r in sparse]
    for kind in ("ntk_relative", "ntk_alignment"):
        dist = [r[kind] for r in sparse]
        res = {"all": spearman(dist, bad)}
        for budget in budgets:
            idx = [i for i, r in enumerate(sparse) if r["budget"] == budget]
            res[str(budget)] = spearman([dist[i] for i in idx], [bad[i] for i in idx])
            order_ntk = [sparse[i]["variant"] for i in sorted(idx, key=lambda i: dist[i])]
            order_metric = [sparse[i]["variant"] for i in sorted(idx, key=lambda i: bad[i])]
            res[f"{budget}_order"] = {"by_ntk": order_ntk, "by_metric": order_metric}
        out[kind] = res
    return out


def markdown(results) -> str:
    lines = [
        "# Parity study results",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}; total wall time {results['wall_s'] / 60:.1f} min.",
        "",
        "Columns: metric mean ± std over seeds; *vs dense*: accuracy points (digits) or "
        "relative validation loss in % (chars); *params*: trainable parameters (fraction of "
        "dense); *train s*: wall-clock training time of the run (same steps); *speedup*: "
        "dense step time / variant step time, steps interleaved, median (robust to a shared "
        "machine's load); *NTK*: relative distance of the empirical NTK from the dense "
        "model's at initialization.",
    ]
    for task in results["tasks"].values():
        metric = "test_acc" if task["name"] == "digits" else "val_loss"
        head = "test acc %" if metric == "test_acc" else "val loss (nats/char)"
        unit = "pts" if metric == "test_acc" else "%"
        lines += [
            "",
            f"## {task['name']}: {task['description']}",
            "",
            f"| budget | variant | seeds | {head} | vs dense ({unit}) | params | train s "
            "| speedup | NTK dist |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in task["summary"]:
            b = "dense" if r["budget"] is None else f"{r['budget']:g}"
            ntk = f"{r['ntk_relative']:.3f}" if "ntk_relative" in r else "-"
            sp = "masked" if r["speedup"] is None else f"{r['speedup']:.2f}x"
            lines.append(
                f"| {b} | {r['variant']} | {r['seeds']} | {r[metric]:.3f} ± "
                f"{r[metric + '_std']:.3f} | {r['vs_dense']:+.2f} | {r['params']:,} "
                f"({r['params_frac']:.2f}) | {r['train_s']:.1f} | {sp} | {ntk} |"
            )
        p = task["ntk_prediction"]["ntk_relative"]
        lines += [
            "",
            f"NTK distance vs final {metric}: Spearman rank correlation between distance and "
            f"badness {p['all']:+.2f} over all sparse runs (+1: the NTK orders them exactly).",
        ]
        for b in results["budgets"]:
            o = p[f"{b}_order"]
            lines.append(
                f"- budget {b:g}: closest NTK first {', '.join(o['by_ntk'])}; best "
                f"{'accuracy' if metric == 'test_acc' else 'loss'} first "
                f"{', '.join(o['by_metric'])}"
            )
    pr = results["probe"]
    lines += [
        "",
        f"## Speed at a wider size (width {pr['dim']}, MLP {4 * pr['dim']}, block 32, "
        f"{pr['rows']} rows, 1 layer, interleaved train steps, eager kernels)",
        "",
        "| budget | params (frac) | dense step ms | Pixelfly step ms | speedup |",
        "|---|---|---|---|---|",
    ]
    for b, r in pr["by_budget"].items():
        lines.append(
            f"| {b} | {r['params_frac']:.2f} | {r['dense_step_ms']:.0f} | "
            f"{r['pixelfly_step_ms']:.0f} | {r['speedup']:.2f}x |"
        )
    lines += ["", "## Goals at budget 0.3", ""] + [f"- {g}" for g in results["goals"]]
    return "\n".join(lines) + "\n"


def goals(results) -> list[str]:
    out = []
    for name, task in results["tasks"].items():
        rows = {(r["budget"], r["variant"]): r for r in task["summary"]}
        r = rows.get((0.3, "pixelfly"))
        if r is None:
            continue
        if name == "digits":
            ok = r["vs_dense"] >= -1.0
            out.append(
                f"digits: Pixelfly test accuracy {r['test_acc']:.2f}% vs dense "
                f"{rows[(None, 'dense')]['test_acc']:.2f}% ({r['vs_dense']:+.2f} points; goal "
                f"within 1 point): {'met' if ok else 'NOT met'}"
            )
        else:
            ok = r["vs_dense"] <= 3.0
            out.append(
                f"chars: Pixelfly validation loss {r['val_loss']:.4f} vs dense "
                f"{rows[(None, 'dense')]['val_loss']:.4f} ({r['vs_dense']:+.2f}%; goal within "
                f"3%): {'met' if ok else 'NOT met'}"
            )
        ok = r["speedup"] >= 1.5
        out.append(
            f"{name}: training speed, Pixelfly vs dense, interleaved steps: "
            f"{r['speedup']:.2f}x (per-run wall clock {1 / r['time_frac']:.2f}x; goal >= 1.5x): "
            f"{'met' if ok else 'NOT met'}"
        )
    return out


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"].values())
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 8.5), squeeze=False)
    colors = {
        "dense": "black",
        "pixelfly": "tab:blue",
        "random": "tab:orange",
        "lowrank": "tab:green",
    }
    for col, task in enumerate(tasks):
        metric = "test_acc" if task["name"] == "digits" else "val_loss"
        ax = axes[0][col]
        rows = task["summary"]
        dense = next(r for r in rows if r["variant"] == "dense")
        ax.axhline(dense[metric], color="black", label="dense")
        ax.axhspan(
            dense[metric] - dense[metric + "_std"],
            dense[metric] + dense[metric + "_std"],
            color="black",
            alpha=0.1,
        )
        for v in VARIANTS[1:]:
            rs = sorted((r for r in rows if r["variant"] == v), key=lambda r: r["budget"])
            ax.errorbar(
                [r["budget"] for r in rs],
                [r[metric] for r in rs],
                yerr=[r[metric + "_std"] for r in rs],
                marker="o",
                capsize=3,
                color=colors[v],
                label=v,
            )
        ax.set_xlabel("budget (fraction of dense GEMM FLOPs)")
        ax.set_ylabel("test accuracy (%)" if metric == "test_acc" else "validation loss")
        ax.set_title(f"{task['name']}: {'accuracy' if metric == 'test_acc' else 'loss'}")
        ax.legend()
        ax = axes[1][col]
        for v in VARIANTS[1:]:
            rs = [r for r in rows if r["variant"] == v]
            ax.scatter(
                [r["ntk_relative"] for r in rs], [r[metric] for r in rs], color=colors[v], label=v
            )
            for r in rs:
                ax.annotate(f"{r['budget']:g}", (r["ntk_relative"], r[metric]), fontsize=8)
        ax.axhline(dense[metric], color="black", lw=0.8)
        sp = task["ntk_prediction"]["ntk_relative"]["all"]
        ax.set_title(f"{task['name']}: NTK distance at init vs result (Spearman {sp:+.2f})")
        ax.set_xlabel("relative NTK distance from dense at init")
        ax.set_ylabel(metric)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny run (for the test suite)")
    ap.add_argument("--out", default="examples/results", help="output folder")
    ap.add_argument(
        "--layer-path",
        choices=["eager", "compiled", "auto"],
        default="eager",
        help="PixelflyLinear execution path (compiled: torch.compile'd bodies, minutes to "
        "compile each shape on 2 cores; default eager)",
    )
    ap.add_argument("--tasks", default="digits,chars", help="comma-separated: digits,chars")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine, 2 threads stall on "
        "each other's load and time 5-20x worse)",
    )
    args = ap.parse_args(argv)
    cfg = copy.deepcopy(QUICK if args.quick else FULL)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    t0 = time.perf_counter()
    results = {
        "command": "python examples/parity.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"Python {platform.python_version()}, torch {torch.__version__}",
        "config": {k: v for k, v in cfg.items()},
        "layer_path": args.layer_path,
        "budgets": list(cfg["budgets"]),
        "tasks": {},
    }
    for name in args.tasks.split(","):
        tcfg = cfg[name]
        if name == "digits":
            data = digits_data()
            desc = (
                "MLP-Mixer (16 tokens, width 128, channel MLP 512, depth 2) on scikit-learn "
                f"digits, {tcfg['steps']} steps of batch {tcfg['batch']}"
            )
        else:
            data = chars_data(context=64)
            desc = (
                "char GPT (width 128, MLP 512, 2 layers, context 64) on the Python standard "
                f"library's source ({data['files']}), {tcfg['steps']} steps of batch "
                f"{tcfg['batch']}"
            )
        log(f"{name}: {desc}")
        task = Task(name, data, tcfg)
        res = run_task(task, cfg, args.layer_path, log)
        summary = summarize(name, res["runs"], res["speed"], cfg["budgets"])
        results["tasks"][name] = {
            "name": name,
            "description": desc,
            "runs": res["runs"],
            "speed": res["speed"],
            "summary": summary,
            "ntk_prediction": ntk_prediction(summary, cfg["budgets"]),
        }
    log("speed probe at a wider size")
    results["probe"] = speed_probe(cfg, log)
    results["goals"] = goals(results)
    results["wall_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))
    (out / "command.txt").write_text(
        results["command"] + "\n# " + results["machine"] + f"\n# took {results['wall_s']:.0f} s\n"
    )
    try:
        plot(results, out / "parity.png")
    except ImportError:
        log("matplotlib is not installed: no plot")
    log((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
