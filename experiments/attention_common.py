"""What figures 07-09 (sparse attention) share: the attention cores compared, the transformer
whose attention core is swapped (everything else identical), a training loop that gives every
method the same steps, optimizer and schedule, side-by-side step timing, and result writing.

Attention cores (all called like ``F.scaled_dot_product_attention`` on ``[B, H, L, d]``):

* ``dense``: ``F.scaled_dot_product_attention`` (the fused CPU kernel);
* ``pixelfly``: :class:`pxcompile.PixelflyAttention` (flat block butterfly over sequence blocks
  + the diagonal + global blocks);
* ``bigbird``: :class:`baselines.attention.BigBirdAttention` (window + global + random blocks,
  on the same block-sparse kernel; as many kept blocks per row as Pixelfly's pattern);
* ``reformer``: :class:`baselines.attention.LSHAttention` (shared-QK LSH, sorted chunks).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from experiments.baselines.attention import BigBirdAttention, LSHAttention
from pxcompile.attention import PixelflyAttention
from pxcompile.patterns import AttentionSpec

METHODS = ("dense", "pixelfly", "bigbird", "reformer")
COLORS = {
    "dense": "black",
    "narrow": "tab:gray",
    "pixelfly": "tab:blue",
    "bigbird": "tab:orange",
    "reformer": "tab:green",
}


@dataclass(frozen=True)
class CoreConfig:
    """Pattern sizes: ``block`` tokens per block (Pixelfly, BigBird) and per LSH bucket/chunk
    (Reformer), Pixelfly's ``factors`` / ``globals``, BigBird's ``window`` / ``random``,
    Reformer's ``n_hashes``."""

    block: int = 64
    factors: int = 4
    globals: int = 1
    window: int = 3
    random: int = 2
    n_hashes: int = 2

    def describe(self) -> str:
        return (
            f"Pixelfly: block {self.block}, {self.factors} butterfly factors + diagonal, "
            f"{self.globals} global block(s); BigBird: block {self.block}, window "
            f"{self.window}, {self.globals} global, {self.random} random blocks per row; "
            f"Reformer: shared QK, {self.n_hashes} hash rounds, buckets/chunks of "
            f"{self.block} tokens, each chunk + the previous one "
            f"({2 * self.block * self.n_hashes} keys per query)"
        )


class DenseAttention(nn.Module):
    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)


def make_core(method: str, cfg: CoreConfig, seed: int = 0) -> nn.Module:
    """The attention core of ``method`` (BigBird's random blocks drawn from ``seed``)."""
    if method == "dense":
        return DenseAttention()
    if method == "pixelfly":
        return PixelflyAttention(AttentionSpec(cfg.block, cfg.factors, cfg.globals), min_seq=0)
    if method == "bigbird":
        return BigBirdAttention(cfg.block, cfg.window, cfg.globals, cfg.random, seed=seed)
    if method == "reformer":
        return LSHAttention(cfg.block, cfg.n_hashes)
    raise ValueError(f"unknown attention method {method!r}")


def kept_fraction(method: str, core: nn.Module, seq: int, causal: bool = False) -> float:
    """Fraction of the score matrix each method computes (of the lower triangle if causal)."""
    if method == "dense":
        return 1.0
    if method == "reformer":
        full = (seq + 1) / 2 if causal else seq
        return min(1.0, core.keys_per_query() / full)
    if method == "bigbird":
        return core.density(seq, causal)
    return core.layout(seq).density(causal)


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, core: nn.Module, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.core = core

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = self.core(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, core: nn.Module, causal: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, core, causal)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


@dataclass(frozen=True)
class ModelConfig:
    vocab: int
    context: int
    dim: int = 64
    depth: int = 2
    heads: int = 2
    hidden: int = 256
    classes: int = 0  # 0: a language model (logits per token, tied head), else a classifier
    pool: str = "mean"  # classifier readout: "mean" over non-pad tokens, or "last" token
    causal: bool = False


class Transformer(nn.Module):
    """Pre-LN transformer with learned positions; every block's attention core is built by
    ``core_fn(layer)``. A classifier (``classes > 0``) reads out the mean over tokens that are
    not ``pad`` (or the last token); a language model predicts the next token (tied head)."""

    def __init__(self, cfg: ModelConfig, core_fn: Callable[[int], nn.Module], pad: int = -1):
        super().__init__()
        self.cfg, self.pad = cfg, pad
        self.wte = nn.Embedding(cfg.vocab, cfg.dim)
        self.wpe = nn.Embedding(cfg.context, cfg.dim)
        self.h = nn.Sequential(
            *[
                Block(cfg.dim, cfg.heads, cfg.hidden, core_fn(i), cfg.causal)
                for i in range(cfg.depth)
            ]
        )
        self.ln_f = nn.LayerNorm(cfg.dim)
        with torch.no_grad():
            self.wte.weight.normal_(0.0, 0.02)
            self.wpe.weight.normal_(0.0, 0.01)
        if cfg.classes:
            self.head = nn.Linear(cfg.dim, cfg.classes)
        else:
            self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
            self.head.weight = self.wte.weight

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.ln_f(self.h(self.wte(idx) + self.wpe(pos)))
        if not self.cfg.classes:
            return self.head(x)
        if self.cfg.pool == "last":
            return self.head(x[:, -1])
        keep = (idx != self.pad).unsqueeze(-1).to(x.dtype)
        return self.head((x * keep).sum(1) / keep.sum(1).clamp_min(1.0))


def build_model(
    method: str, mcfg: ModelConfig, ccfg: CoreConfig, seed: int, pad: int = -1
) -> Transformer:
    """The same initial weights for every method at a given seed (only the core differs)."""
    torch.manual_seed(seed)
    return Transformer(mcfg, lambda i: make_core(method, ccfg, seed=1000 * seed + i), pad)


def n_params(model: nn.Module, method: str = "dense") -> int:
    """Trainable parameters the method uses (Reformer's shared QK leaves the K third of each
    attention's input projection unused: not counted)."""
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    if method == "reformer":
        for m in model.modules():
            if isinstance(m, Attention):
                n -= m.qkv.weight.shape[1] * m.qkv.weight.shape[0] // 3 + m.qkv.bias.numel() // 3
    return n


# --------------------------------------------------------------------------------------------
# training and timing
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    steps: int
    batch: int
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.1
    eval_every: int = 0  # 0: evaluate at the end only
    clip: float = 1.0


@dataclass
class Run:
    method: str
    seed: int
    metrics: dict[str, float]
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, eval metric)
    train_s: float = 0.0
    params: int = 0


def train(
    model: nn.Module,
    batches: Callable[[int], tuple[Tensor, Tensor]],
    loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor],
    tcfg: TrainConfig,
    evaluate: Callable[[nn.Module], dict[str, float]],
    metric: str,
    log: Callable[[str], None] = print,
    seed: int = 0,
) -> tuple[dict[str, float], list[tuple[int, float]], float]:
    """AdamW, linear warm-up then cosine decay to 10%, gradient clipping: the same for every
    method. ``batches(step)`` gives step ``step``'s batch (the same for every method at a
    seed). Returns (final metrics, learning curve, training seconds without evaluation)."""
    steps = tcfg.steps
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    warm = max(1, int(steps * tcfg.warmup))

    def lr_at(s: int) -> float:
        return min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    torch.manual_seed(seed + 77)  # Reformer's rotations: the same stream for every seed
    curve: list[tuple[int, float]] = []
    spent = 0.0
    model.train()
    for step in range(steps):
        x, y = batches(step)
        t0 = time.perf_counter()
        loss = loss_fn(model, x, y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), tcfg.clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        spent += time.perf_counter() - t0
        if tcfg.eval_every and (step + 1) % tcfg.eval_every == 0 and step + 1 < steps:
            m = evaluate(model)
            curve.append((step + 1, m[metric]))
            log(f"    step {step + 1}/{steps} loss {loss.item():.3f} {metric} {m[metric]:.4f}")
    final = evaluate(model)
    curve.append((steps, final[metric]))
    final["final_train_loss"] = float(loss.item())
    return final, curve, spent


def interleaved_ratios(
    steps: dict[str, Callable[[], None]], rounds: int, reference: str = "dense"
) -> dict[str, dict[str, float]]:
    """Run ``steps[name]()`` for every name in turn, ``rounds`` times (after one warm-up
    each); per name: median time and median of the per-round ratios reference / name (> 1:
    faster than the reference)."""
    for f in steps.values():
        f()
    times: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(rounds):
        for n, f in steps.items():
            t0 = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t0)
    ref = times[reference]
    return {
        n: {
            "ms": statistics.median(t) * 1e3,
            "ratio": statistics.median(a / b for a, b in zip(ref, t)),
        }
        for n, t in times.items()
    }


def fwd_bwd(model: nn.Module, x: Tensor, loss_fn: Callable, y: Tensor) -> Callable[[], None]:
    """One forward + backward of ``model`` on a fixed batch (gradients dropped)."""

    def run() -> None:
        loss_fn(model, x, y).backward()
        model.zero_grad(set_to_none=True)

    return run


def core_fwd_bwd(core: nn.Module, shape: tuple[int, ...], causal: bool) -> Callable[[], None]:
    """Forward + backward of one attention core alone on random ``[B, H, L, d]`` inputs."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g).requires_grad_() for _ in range(3))

    def run() -> None:
        out = core(q, k, v, is_causal=causal)
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None

    return run


# --------------------------------------------------------------------------------------------
# statistics and results
# --------------------------------------------------------------------------------------------


def mean_std(vals: list[float]) -> tuple[float, float]:
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def verdict(a: list[float], b: list[float], higher_better: bool, names: tuple[str, str]) -> str:
    """'no difference measured' when the means are within one (larger) std; else who wins."""
    ma, sa = mean_std(a)
    mb, sb = mean_std(b)
    if abs(ma - mb) <= max(sa, sb) or len(a) < 2 or len(b) < 2:
        return "no difference measured"
    better = names[0] if (ma > mb) == higher_better else names[1]
    return f"{better} better"


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
        f"thread(s), Python {platform.python_version()}, torch {torch.__version__}"
    )


def chunks(seq: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def write_results(
    out: Path,
    stem: str,
    md: str,
    plot: Callable[[Path], None] | None,
    data: dict[str, Any] | None = None,
) -> None:
    """``out/<stem>.md``, ``out/<stem>.json`` (``data``: every run, to re-plot or merge) and,
    if matplotlib is there, ``out/<stem>.png``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(md)
    if data is not None:
        (out / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    if plot is None:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:  # pragma: no cover - matplotlib is optional
        return
    plot(out / f"{stem}.png")


# --------------------------------------------------------------------------------------------
# one classification task, every method, every seed
# --------------------------------------------------------------------------------------------


@dataclass
class ClassTask:
    """A classification task for :func:`train_methods`: ``batch(seed, step)`` gives a training
    batch (the same for every method), ``test`` the fixed test set."""

    name: str
    model: ModelConfig
    batch: Callable[[int, int], tuple[Tensor, Tensor]]
    test: tuple[Tensor, Tensor]
    pad: int = -1


def class_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y)


def evaluator(task: ClassTask, batch: int = 8) -> Callable[[nn.Module], dict[str, float]]:
    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        model.eval()
        torch.manual_seed(4242)  # Reformer's rotations at evaluation: the same for every run
        x_all, y_all = task.test
        correct, loss = 0, 0.0
        for i in range(0, len(x_all), batch):
            x, y = x_all[i : i + batch], y_all[i : i + batch]
            out = model(x)
            correct += int((out.argmax(1) == y).sum())
            loss += float(F.cross_entropy(out, y, reduction="sum"))
        model.train()
        return {"acc": 100.0 * correct / len(x_all), "loss": loss / len(x_all)}

    return evaluate


def train_methods(
    task: ClassTask,
    methods: tuple[str, ...],
    seeds: tuple[int, ...],
    tcfg: TrainConfig,
    core: CoreConfig,
    log: Callable[[str], None] = print,
    on_run: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train every method at every seed (same initial weights, batches, optimizer);
    ``on_run(runs so far)`` after each run (to save partial results)."""
    evaluate = evaluator(task)
    runs = []
    for seed in seeds:
        for method in methods:
            model = build_model(method, task.model, core, seed, pad=task.pad)
            log(f"  {task.name} seed {seed} {method}: {tcfg.steps} steps")
            final, curve, spent = train(
                model,
                lambda step, seed=seed: task.batch(seed, step),
                class_loss,
                tcfg,
                evaluate,
                "acc",
                log=log,
                seed=seed,
            )
            runs.append(
                {
                    "task": task.name,
                    "method": method,
                    "seed": seed,
                    "acc": final["acc"],
                    "loss": final["loss"],
                    "curve": curve,
                    "train_s": spent,
                    "params": n_params(model, method),
                }
            )
            log(f"  -> acc {final['acc']:.1f}% in {spent:.0f}s (load {load_average()})")
            if on_run is not None:
                on_run(runs)
    return runs


def speed_methods(
    task: ClassTask,
    methods: tuple[str, ...],
    core: CoreConfig,
    batch: int,
    rounds: int,
) -> dict[str, dict[str, float]]:
    """Forward + backward of each method's model on one training batch, side by side."""
    x, y = task.batch(0, 0)
    x, y = x[:batch], y[:batch]
    steps = {
        m: fwd_bwd(build_model(m, task.model, core, 0, pad=task.pad), x, class_loss, y)
        for m in methods
    }
    res = interleaved_ratios(steps, rounds)
    for m in methods:
        res[m]["kept"] = kept_fraction(m, make_core(m, core), task.model.context, task.model.causal)
    return res
