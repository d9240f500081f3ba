"""Shared code for the figure experiments (``experiments/figNN_<topic>.py``).

Everything here runs offline and on CPU:

* **data**: scikit-learn's bundled 8x8 handwritten digits (:func:`digits`), and a
  character-level text corpus cut from the Python standard library's own ``*.py`` sources
  (:func:`stdlib_text`, :func:`chars`). Both ship with every install, so a run never downloads
  anything. Digits is a real (if small) image classification task: 10 classes, 1797 images, a
  fixed 1297 / 500 split. The standard library is several MB of real, human-written text with
  long-range structure (indentation, names reused far apart, docstrings in English): a
  character-level model over it behaves like one over any source-code or prose corpus of the
  same size (a vocabulary of ~100 symbols, losses of 1-2.5 nats/char), which is what the
  paper's WikiText / ImageNet runs are scaled down to here. The split is fixed (the last 10%
  of the characters are validation), so every method sees the same data.
* **models**: :class:`Mixer` and :class:`ViT` for digits (the 8x8 images, optionally
  upsampled, cut into square patches), :class:`CharGPT` for text. All take a ``width``; the
  MLP widths follow it, so :func:`narrower` can solve for the width of a dense model with the
  parameter count of a sparsified one (the **narrower dense baseline**).
* **training**: :func:`train` (AdamW, warm-up then cosine decay, clipping 1.0: the same for
  every method), :func:`speed_ratios` (training steps of several models interleaved: median
  per-round time ratio against dense), :func:`run_jobs` (runs in parallel processes).
* **results**: :func:`compare` ("no difference measured" when the means are within one
  standard deviation), :func:`write_md`, :func:`plot` (matplotlib, Agg). One torch thread by
  default (:func:`setup`): the machine is shared.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------


def parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The arguments every figure script takes: ``--quick``, ``--out``, ``--seeds``,
    ``--threads``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run (seconds)")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results"), help="output folder")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: mode's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--jobs", type=int, default=1, help="processes (seeds run in parallel)")
    p.set_defaults(name=out)
    return p


_ARGV: list[str] | None = None  # the script's arguments when main(argv) was called


def setup(args: argparse.Namespace, argv: list[str] | None = None) -> Path:
    """Threads, quick-mode settings, the command line to report (``argv`` when the script's
    ``main(argv)`` was called in-process); returns the output folder (created)."""
    global _ARGV
    _ARGV = None if argv is None else [str(ROOT / "experiments" / f"{args.name}.py"), *argv]
    torch.set_num_threads(args.threads)
    if args.quick:  # no torch.compile of the sparse kernels in smoke runs
        os.environ.setdefault("PXCOMPILE_NO_COMPILE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _cached(fn: Callable, path: str | None, args: tuple):
    """``fn(*args)``, read from / written to the JSON file ``path`` when given (a rerun
    resumes); one retry after a pause (a shared working tree may be mid-edit)."""
    import json

    if path and Path(path).exists():
        return json.loads(Path(path).read_text())
    try:
        r = fn(*args)
    except Exception as e:  # noqa: BLE001
        log(f"job failed ({type(e).__name__}: {e}); retrying once in 60 s")
        time.sleep(60)
        r = fn(*args)
    if path:
        Path(path).write_text(json.dumps(r))
    return r


def run_jobs(fn: Callable, jobs: list[tuple], workers: int = 1, cache: Path | None = None):
    """``[fn(*a) for a in jobs]``, in ``workers`` processes (spawned, one torch thread each)
    when ``workers > 1``; ``fn`` must be a module-level function of the script. With
    ``cache`` (a folder), each result is kept as ``cache/<job index>.json`` and reused."""
    if cache is not None:
        Path(cache).mkdir(parents=True, exist_ok=True)
    paths = [str(Path(cache) / f"{i}.json") if cache else None for i in range(len(jobs))]
    items = [(fn, p, a) for p, a in zip(paths, jobs)]
    if workers <= 1 or len(jobs) <= 1:
        return [_cached(*it) for it in items]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    n = min(workers, len(jobs))
    init = (torch.get_num_threads(),)
    with ProcessPoolExecutor(n, mp_context=ctx, initializer=_worker_init, initargs=init) as ex:
        return list(ex.map(_cached, *zip(*items)))


def command_line() -> str:
    """The command that ran this process, with the script path relative to the repository."""
    argv = list(sys.argv if _ARGV is None else _ARGV)
    try:
        argv[0] = str(Path(argv[0]).resolve().relative_to(ROOT))
    except ValueError:
        pass
    return "python " + " ".join(shlex.quote(a) for a in argv)


def machine() -> str:
    load = os.getloadavg()[0]
    return (
        f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), "
        f"Python {platform.python_version()}, torch {torch.__version__}, load {load:.2f}"
    )


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------


def digits(image: int = 8) -> dict:
    """scikit-learn's digits, pixels in [0, 1], shape ``[N, 1, image, image]`` (bilinear
    upsampling from 8x8 when ``image > 8``); a fixed 1297 / 500 train / test split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    if image != 8:
        x = F.interpolate(x, size=(image, image), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    x, y = x[perm], y[perm]
    return {"train": (x[:1297], y[:1297]), "test": (x[1297:], y[1297:]), "image": image}


def stdlib_text(limit: int = 1_000_000) -> tuple[str, str]:
    """The first ``limit`` characters of the standard library's ``*.py`` files (top level,
    then one package level down, each sorted by path; no tests, no site-packages), non-ASCII
    characters as ``?``. Returns the text and a one-line description of the files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3"}
    files = sorted(root.glob("*.py")) + sorted(
        p for p in root.glob("*/*.py") if p.parent.name not in skip
    )
    parts, used, total = [], [], 0
    for p in files:
        try:
            t = p.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        parts.append(t)
        used.append(str(p.relative_to(root)))
        total += len(t)
        if total >= limit:
            break
    text = "".join(parts)[:limit]
    text = "".join(c if ord(c) < 128 else "?" for c in text)
    return text, f"{used[0]} .. {used[-1]} ({len(used)} files, {len(text):,} chars)"


def chars(limit: int = 1_000_000) -> dict:
    """ASCII ids of :func:`stdlib_text`: the first 90% train, the last 10% validation."""
    text, files = stdlib_text(limit)
    ids = torch.tensor(np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.int64))
    split = int(0.9 * len(ids))
    return {"train": ids[:split], "val": ids[split:], "files": files}


# ------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, tokens, C * patch * patch]``."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int, token_hidden: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mlp_tokens = Mlp(tokens, token_hidden)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, hidden)

    def forward(self, x):
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class Mixer(nn.Module):
    """MLP-Mixer over ``[B, 1, image, image]`` images: channel MLP ``ratio * width``, token MLP
    ``tokens * 2`` (not narrowed: it is the token count's)."""

    def __init__(self, width=128, depth=2, image=8, patch=2, ratio=4, classes=10):
        super().__init__()
        self.patch = patch
        tokens = (image // patch) ** 2
        self.stem = nn.Linear(patch * patch, width)
        self.blocks = nn.Sequential(
            *[MixerBlock(tokens, width, 2 * tokens, ratio * width) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.norm(self.blocks(self.stem(patches(x, self.patch))))
        return self.head(x.mean(1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-norm transformer block (attention + MLP)."""

    def __init__(self, dim: int, heads: int, hidden: int, causal: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    """Vision transformer over ``[B, 1, image, image]`` images, mean-pooled tokens."""

    def __init__(self, width=128, depth=2, image=8, patch=2, heads=4, ratio=4, classes=10):
        super().__init__()
        self.patch = patch
        tokens = (image // patch) ** 2
        self.stem = nn.Linear(patch * patch, width)
        self.pos = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.blocks = nn.Sequential(
            *[Block(width, heads, ratio * width, causal=False) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.blocks(self.stem(patches(x, self.patch)) + self.pos)
        return self.head(self.norm(x).mean(1))


class CharGPT(nn.Module):
    """GPT-2-style character model (ASCII vocabulary), head tied to the embedding."""

    def __init__(self, width=128, depth=2, context=64, heads=4, ratio=4, vocab=128):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.h = nn.Sequential(
            *[Block(width, heads, ratio * width, causal=True) for _ in range(depth)]
        )
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        with torch.no_grad():  # GPT-2's init for the (tied) embeddings
            self.wte.weight.normal_(0.0, 0.02)
            self.wpe.weight.normal_(0.0, 0.01)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.lm_head(self.ln_f(self.h(self.wte(idx) + self.wpe(pos))))


MODELS: dict[str, type[nn.Module]] = {"mixer": Mixer, "vit": ViT, "gpt": CharGPT}


def build(kind: str, seed: int, **cfg) -> nn.Module:
    """A freshly initialised ``MODELS[kind](**cfg)`` under ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return MODELS[kind](**cfg)


def n_params(model: nn.Module) -> int:
    """Trainable parameters, shared ones once (a PixelflyLinear stores only its kept blocks)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def sparsify(model: nn.Module, budget: float, block: int, x, init: str = "auto") -> nn.Module:
    """``pxcompile.sparsify`` with the plan made by FLOPs and blocks (the default CPU-calibrated
    planner keeps layers dense where it predicts them slower than dense, which at these
    widths is most of them; here the question is what sparsity costs in accuracy)."""
    import pxcompile
    from pxcompile.passes.mapping import COST_MODELS

    ex = (x,)
    cm = COST_MODELS["flops+blocks"]
    plan = pxcompile.plan(model, budget, block=block, example_inputs=ex, cost_model=cm)
    return pxcompile.sparsify(model, plan=plan, example_inputs=ex, init=init)


def set_path(model: nn.Module, path: str | None) -> nn.Module:
    """Force every PixelflyLinear's execution path (``"eager"``: no torch.compile)."""
    for m in model.modules():
        if type(m).__name__ == "PixelflyLinear":
            m.path = path
    return model


def flops(model: nn.Module, x: torch.Tensor) -> int:
    """Forward FLOPs of one call on ``x`` (torch's FLOP counter; sparse layers on their eager
    path, so their batched block products are what is counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    paths = {}
    for m in model.modules():
        if hasattr(m, "path") and type(m).__name__ == "PixelflyLinear":
            paths[m] = m.path
            m.path = "eager"
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x)
        return int(fc.get_total_flops())
    finally:
        for m, p in paths.items():
            m.path = p


def narrower(kind: str, target: int, step: int = 8, **cfg) -> tuple[int, int]:
    """The width (a multiple of ``step``; of ``heads`` too when the model has heads) of a dense
    ``kind`` model whose parameter count is closest to ``target``. Parameters are counted on
    the meta device (no memory). Returns ``(width, params)``."""
    heads = cfg.get("heads", 1)
    unit = step * heads // math.gcd(step, heads)
    best = None
    with torch.device("meta"):
        for w in range(unit, 4 * cfg.get("width", 512) + unit, unit):
            n = n_params(MODELS[kind](**{**cfg, "width": w}))
            if best is None or abs(n - target) < abs(best[1] - target):
                best = (w, n)
            if n > target:
                break
    assert best is not None
    return best


# ------------------------------------------------------------------------------------------
# tasks and training
# ------------------------------------------------------------------------------------------


class Task:
    """Batches (a function of ``(seed, step)`` only), loss and evaluation for one data set.

    ``kind="digits"``: ``data`` from :func:`digits`, metric test accuracy (%, higher is
    better). ``kind="chars"``: ``data`` from :func:`chars`, ``context`` characters a sequence,
    metric validation loss (nats/char, lower is better) over ``val_batches`` fixed batches.
    """

    def __init__(self, kind: str, data: dict, batch: int, context: int = 64, val_batches=16):
        self.kind, self.data, self.batch_size, self.context = kind, data, batch, context
        self.val_batches = val_batches
        self.metric = "test acc %" if kind == "digits" else "val loss"
        self.higher_is_better = kind == "digits"

    def batch(self, seed: int, step: int, size: int | None = None):
        g = torch.Generator().manual_seed(seed * 100_003 + step)
        b = size or self.batch_size
        if self.kind == "digits":
            x, y = self.data["train"]
            i = torch.randint(0, len(x), (b,), generator=g)
            return x[i], y[i]
        return self._windows(
            self.data["train"], torch.randint(0, self._last("train"), (b,), generator=g)
        )

    def _last(self, split: str) -> int:
        return len(self.data[split]) - self.context - 1

    def _windows(self, ids, starts):
        seq = torch.stack([ids[s : s + self.context + 1] for s in starts.tolist()])
        return seq[:, :-1], seq[:, 1:]

    def loss(self, model: nn.Module, x, y) -> torch.Tensor:
        out = model(x)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        was = model.training
        model.eval()
        try:
            if self.kind == "digits":
                x, y = self.data["test"]
                return float((model(x).argmax(-1) == y).float().mean()) * 100
            n = self.val_batches * self.batch_size
            starts = torch.linspace(0, self._last("val"), n).long()
            total = 0.0
            for i in range(self.val_batches):
                x, y = self._windows(self.data["val"], starts[i :: self.val_batches])
                total += float(self.loss(model, x, y))
            return total / self.val_batches
        finally:
            model.train(was)


def schedule(steps: int, warmup: float = 0.1) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup * steps``, cosine decay to 0.1."""
    warm = max(1, int(warmup * steps))
    return lambda s: (
        min(1.0, (s + 1) / warm)
        * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )


def train(
    task: Task,
    model: nn.Module,
    steps: int,
    lr: float,
    seed: int,
    evals: int = 8,
    weight_decay: float = 0.01,
    label: str = "",
) -> dict:
    """Train ``model`` for ``steps`` AdamW steps on ``task``'s batches for ``seed``.

    Returns ``metric`` (final), ``curve`` (``[(step, metric)]``, ``evals`` points plus step 0),
    ``step_ms`` (median wall-clock training step, evaluation excluded), ``train_s`` and
    ``final_train_loss``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(steps))
    model.train()
    x, y = task.batch(seed, 0)
    task.loss(model, x, y).backward()  # warm-up (allocations, any lazy compile): not timed
    opt.zero_grad(set_to_none=True)
    at = {round(steps * (i + 1) / evals) for i in range(evals)}
    curve = [(0, task.evaluate(model))]
    times = []
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        x, y = task.batch(seed, step)
        t0 = time.perf_counter()
        loss = task.loss(model, x, y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        if step + 1 in at:
            curve.append((step + 1, task.evaluate(model)))
            if label:
                log(f"  {label} step {step + 1}/{steps}: {task.metric} {curve[-1][1]:.3f}")
    return {
        "metric": curve[-1][1],
        "curve": curve,
        "step_ms": statistics.median(times) * 1e3,
        "train_s": sum(times),
        "final_train_loss": loss.item(),
    }


def speed_ratios(task: Task, models: dict[str, nn.Module], rounds: int) -> dict[str, dict]:
    """Training steps (forward, backward, AdamW) of every model in turn, ``rounds`` times;
    per model the median step time and the median over rounds of ``dense / model`` (the
    first model is the reference, "dense")."""
    steps = {}
    for name, m in models.items():
        opt = torch.optim.AdamW(m.parameters(), lr=1e-9)

        def one(m=m, opt=opt):
            x, y = task.batch(0, 0)
            t0 = time.perf_counter()
            task.loss(m, x, y).backward()
            nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        one()  # warm-up
        one()
        steps[name] = one
    times: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(rounds):
        for n, s in steps.items():
            times[n].append(s())
    ref = times[next(iter(times))]
    return {
        n: {
            "speedup": statistics.median(a / b for a, b in zip(ref, t)),
            "step_ms": statistics.median(t) * 1e3,
        }
        for n, t in times.items()
    }


# ------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    v = list(values)
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def fmt(values: Iterable[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def compare(a: Sequence[float], b: Sequence[float], higher_is_better: bool, names=("a", "b")):
    """``"no difference measured"`` when the means are within one standard deviation (the
    larger of the two), else which is better and by how much."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    if abs(ma - mb) <= max(sa, sb):
        return "no difference measured"
    better = names[0] if (ma > mb) == higher_is_better else names[1]
    return f"{better} better by {abs(ma - mb):.3g}"


def table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_md(path: Path, title: str, seeds: Sequence[int], data: str, sections: list[str]) -> None:
    """A results page: title, command, machine, seeds and data, then ``sections`` (markdown)."""
    head = [
        f"# {title}",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine()}  ",
        f"Seeds: {', '.join(map(str, seeds))}  ",
        f"Data: {data}",
        "",
    ]
    path.write_text("\n".join(head) + "\n" + "\n\n".join(s.rstrip() for s in sections) + "\n")


def plot(path: Path, panels: list[dict], title: str = "") -> None:
    """One row of panels. Each panel: ``title``, ``xlabel``, ``ylabel``, optional ``xscale``,
    and ``series``: ``{label: (xs, ys, errs or None)}`` (lines with error bands), or
    ``points``: ``{label: (xs, ys, xerrs, yerrs)}`` (markers with error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for ax, p in zip(axes[0], panels):
        for label, (xs, ys, errs) in p.get("series", {}).items():
            line = ax.plot(xs, ys, label=label)[0]
            if errs is not None:
                lo = [y - e for y, e in zip(ys, errs)]
                hi = [y + e for y, e in zip(ys, errs)]
                ax.fill_between(xs, lo, hi, alpha=0.2, color=line.get_color())
        for label, (xs, ys, xe, ye) in p.get("points", {}).items():
            ax.errorbar(xs, ys, xerr=xe, yerr=ye, fmt="o-", capsize=3, label=label)
        ax.set_title(p.get("title", ""))
        ax.set_xlabel(p.get("xlabel", ""))
        ax.set_ylabel(p.get("ylabel", ""))
        if p.get("xscale"):
            ax.set_xscale(p["xscale"])
        if p.get("ylim"):
            ax.set_ylim(*p["ylim"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curve_stats(runs: list[dict]) -> tuple[list[int], list[float], list[float]]:
    """Mean and std over seeds of runs' ``curve`` (same eval steps in every run)."""
    xs = [s for s, _ in runs[0]["curve"]]
    cols = list(zip(*[[v for _, v in r["curve"]] for r in runs]))
    ms = [mean_std(c) for c in cols]
    return xs, [m for m, _ in ms], [s for _, s in ms]
