"""``pxcompile calibrate``: fit the calibrated cost model to this machine.

It times a few layer shapes, rows, butterfly patterns (factors, pattern blocks) and ranks:
a dense ``F.linear`` against a :class:`~pxcompile.layers.PixelflyLinear` forward, back to
back, medians of the per-pair ratios (:func:`pxcompile.bench.paired`). Then it fits the
constants of :class:`~pxcompile.passes.mapping.CalibratedCost` (``move``, ``per_block``,
``lowrank`` on the gather kernel; ``group_move`` and ``fuse_move`` on the grouped one) by
least squares on the log of the time ratios, and writes a cost-model file
(:mod:`pxcompile.cost_file`) that ``--cost-model FILE`` and the policy's ``cost_model`` read.
The model is linear in its constants, so the fit is a weighted linear least squares (the
weights make it one on relative errors, i.e. log ratios to first order) followed by a few
Gauss-Newton steps on the log errors, constants kept non-negative.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .bench import layer_ratio
from .errors import PxError
from .passes.mapping import COST_MODELS, CalibratedCost, patterns
from .patterns import PatternSpec
from .schema import Gemm, LayerType

#: (out, in) shapes timed by default: transformer/Mixer MLP sides both ways and a square one.
SHAPES: tuple[tuple[int, int], ...] = ((3072, 768), (768, 3072), (1024, 1024))
ROWS: tuple[int, ...] = (1024,)
QUICK_SHAPES: tuple[tuple[int, int], ...] = ((1536, 384), (384, 1536))
QUICK_ROWS: tuple[int, ...] = (512,)
#: Stop measuring after this many seconds (the fit uses what was measured by then).
TIME_LIMIT = 40.0


@dataclass(frozen=True)
class Point:
    gemm: Gemm
    spec: PatternSpec
    ratio: float  # measured sparse time / dense time (1 / speedup)
    execution: str = "gather"  # the CPU kernel timed: "gather" or "grouped"


def specs_for(out_features: int, in_features: int, block: int = 32) -> list[PatternSpec]:
    """A few patterns for one shape: at the two smallest pattern blocks, the sparsest pattern
    of block density 0.05 or more and a middle one (different factor counts), and the
    sparsest again with a rank of about 4% of the narrow side (the reference's 32 at 768)."""
    g = Gemm("calibrate", LayerType.MLP, in_features, out_features, rows=1)
    by_pb: dict[int, list[PatternSpec]] = {}
    for s in patterns(g, block, 4):
        if 0.05 <= s.block_density <= 0.5:
            by_pb.setdefault(s.pattern_block, []).append(s)
    rank = max(8, (min(out_features, in_features) // 24) // 8 * 8)
    out: list[PatternSpec] = []
    for pb in sorted(by_pb)[:2]:
        specs = sorted(by_pb[pb], key=lambda s: (s.block_density, s.factors))
        lo, mid = specs[0], specs[len(specs) // 2]
        out += [lo, PatternSpec(lo.butterfly, lo.factors, lo.pattern_block, rank)]
        if mid != lo:
            out.append(mid)
    return out


def plan_points(
    shapes: Sequence[tuple[int, int]], rows: Sequence[int], block: int = 32
) -> list[tuple[Gemm, PatternSpec, str]]:
    """The (GEMM, pattern, kernel) triples to time, interleaved so a time limit still covers
    every shape, pattern block, rank and kernel: each pattern under the gather kernel, and
    those with ``f <= 2`` (at most a third of a group wasted) under the grouped one too."""
    per_shape = []
    for o, i in shapes:
        specs = specs_for(o, i, block)
        if not specs:
            raise PxError(f"calibrate: no butterfly pattern fits {o}x{i} at block {block}")
        for r in rows:
            g = Gemm(f"{o}x{i}@{r}", LayerType.MLP, i, o, rows=r)
            todo = [(g, s, "gather") for s in specs]
            todo += [(g, s, "grouped") for s in specs if s.factors <= 2]
            per_shape.append(todo)
    out = []
    for k in range(max(len(p) for p in per_shape)):
        out += [p[k] for p in per_shape if k < len(p)]
    return out


def measure(
    todo: Sequence[tuple[Gemm, PatternSpec, str]],
    repeats: int = 3,
    time_limit: float = TIME_LIMIT,
    progress: Callable[[int, int], None] | None = None,
) -> list[Point]:
    """Time each pair until ``time_limit`` seconds have passed (at least three points)."""
    start = time.perf_counter()
    out: list[Point] = []
    for k, (g, s, ex) in enumerate(todo):
        if len(out) >= 3 and time.perf_counter() - start > time_limit:
            break
        out.append(Point(g, s, layer_ratio(g, s, repeats, ex), ex))
        if progress:
            progress(k + 1, len(todo))
    return out


def _terms(p: Point) -> tuple[np.ndarray, float]:
    """The model's sparse/dense time ratio as ``base + terms @ (move, per_block, lowrank)``."""
    o, i = p.gemm.out_features, p.gemm.in_features
    s, pb = p.spec, p.spec.pattern_block
    kept = s.kept_blocks(o, i)
    dense = 2.0 * o * i
    base = 2.0 * kept * pb * pb / dense
    terms = np.array([min(o, i) * (s.factors + 1), kept, 2.0 * s.rank * (i + o)]) / dense
    return terms, base


def predict(model: CalibratedCost, p: Point) -> float:
    """The model's sparse / dense time ratio for ``p`` under the kernel it timed."""
    o, i = p.gemm.out_features, p.gemm.in_features
    row = model.grouped_row_cost if p.execution == "grouped" else model.gather_row_cost
    return row(o, i, p.spec) / (2.0 * o * i)


def fit(points: Sequence[Point], name: str = "calibrated") -> tuple[CalibratedCost, float]:
    """Least squares on log time ratios; returns the model and its RMS log error."""
    grouped = [p for p in points if p.execution == "grouped"]
    points_all, points = points, [p for p in points if p.execution != "grouped"]
    if len(points) < 3:
        raise PxError(f"calibrate: need at least 3 measurements, got {len(points)}")
    rows = [_terms(p) for p in points]
    A = np.stack([t for t, _ in rows])
    base = np.array([b for _, b in rows])
    y = np.array([p.ratio for p in points])
    has_rank = bool(A[:, 2].any())
    if not has_rank:  # no rank measured: keep the shipped lowrank factor
        A[:, 2] = 0.0
    x = _nnls(A / y[:, None], (y - base) / y)
    default = CalibratedCost()
    if not has_rank:
        x[2] = default.lowrank
    for _ in range(20):  # Gauss-Newton on log(pred) - log(y)
        pred = np.maximum(base + A @ x, 1e-9)
        r = np.log(pred) - np.log(y)
        J = A / pred[:, None]
        step = _nnls(J, J @ x - r) - x
        x = np.maximum(x + step, 0.0)
        if not has_rank:
            x[2] = default.lowrank
        if np.abs(step).max() <= 1e-9 * max(1.0, np.abs(x).max()):
            break
    x[2] = max(x[2], 1e-3)  # a zero low-rank factor is not a cost model
    group_move, fuse_move = _fit_grouped(grouped, float(x[2]))
    model = CalibratedCost(
        move=float(x[0]),
        per_block=float(x[1]),
        lowrank=float(x[2]),
        group_move=group_move,
        fuse_move=fuse_move,
        name=name,
    )
    return model, rms_log_error(model, points_all)


def _fit_grouped(points: Sequence[Point], lowrank: float) -> tuple[float, float]:
    """``(group_move, fuse_move)`` from grouped-kernel timings: non-negative least squares on
    relative error (the shipped values for what the points don't measure: no grouped point,
    or none with a rank)."""
    default = CalibratedCost(lowrank=lowrank)
    if not points:
        return default.group_move, default.fuse_move
    A, b = [], []
    for p in points:
        o, i = p.gemm.out_features, p.gemm.in_features
        narrow = min(i, o) if p.spec.rank else 0.0
        base = default.grouped_row_cost(o, i, p.spec)
        base -= default.group_move * (i + o) + default.fuse_move * narrow
        dense = 2.0 * o * i
        A.append(np.array([i + o, narrow]) / dense / p.ratio)
        b.append((p.ratio - base / dense) / p.ratio)
    x = _nnls(np.stack(A), np.array(b))
    has_rank = any(p.spec.rank for p in points)
    return float(x[0]), float(x[1]) if has_rank else default.fuse_move


def _nnls(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a few unknowns: the best of every active set."""
    best, best_err = np.zeros(A.shape[1]), float(np.sum(b * b))
    n = A.shape[1]
    for mask in range(1, 1 << n):
        cols = [j for j in range(n) if mask >> j & 1]
        sol, *_ = np.linalg.lstsq(A[:, cols], b, rcond=None)
        if (sol < 0).any():
            continue
        x = np.zeros(n)
        x[cols] = sol
        err = float(np.sum((A @ x - b) ** 2))
        if err < best_err:
            best, best_err = x, err
    return best


def rms_log_error(model: CalibratedCost, points: Sequence[Point]) -> float:
    errs = [math.log(predict(model, p) / p.ratio) for p in points]
    return math.sqrt(sum(e * e for e in errs) / len(errs))


def fit_record(points: Sequence[Point], rms: float, threads: int, seconds: float) -> dict:
    """How the model was measured (stored in the file's ``fit``, for people)."""
    shipped = COST_MODELS["calibrated-cpu"]
    assert isinstance(shipped, CalibratedCost)
    return {
        "points": len(points),
        "rms_log_error": round(rms, 4),
        "shipped_rms_log_error": round(rms_log_error(shipped, points), 4),
        "shapes": sorted({f"{p.gemm.out_features}x{p.gemm.in_features}" for p in points}),
        "rows": sorted({p.gemm.rows for p in points}),
        "threads": threads,
        "seconds": round(seconds, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": str(torch.__version__),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``OUTxIN[,OUTxIN...]``, e.g. ``3072x768,768x3072``."""
    out = []
    for part in text.split(","):
        try:
            o, i = (int(v) for v in part.strip().lower().split("x"))
        except ValueError:
            raise PxError(f"--shapes: expected OUTxIN[,OUTxIN...], got {part.strip()!r}") from None
        if not (1 <= o <= 65536 and 1 <= i <= 65536):
            raise PxError(f"--shapes: {o}x{i}: sides must be in [1, 65536]")
        out.append((o, i))
    return out


def parse_rows(text: str) -> list[int]:
    """``N[,N...]``, e.g. ``512,2048``."""
    try:
        rows = [int(v) for v in text.split(",")]
    except ValueError:
        raise PxError(f"--rows: expected N[,N...], got {text!r}") from None
    if any(not 1 <= r <= 1 << 20 for r in rows):
        raise PxError(f"--rows: each must be in [1, {1 << 20}], got {text}")
    return rows


def run(
    shapes: Sequence[tuple[int, int]],
    rows: Sequence[int],
    block: int = 32,
    repeats: int = 3,
    time_limit: float = TIME_LIMIT,
    name: str = "calibrated",
    show_progress: bool = True,
) -> tuple[CalibratedCost, list[Point], dict]:
    """Measure and fit; returns the model, the points and the file's ``fit`` record."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    todo = plan_points(shapes, rows, block)
    start = time.perf_counter()
    with Progress(
        TextColumn("calibrating"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} layers"),
        TimeElapsedColumn(),
        transient=True,
        disable=not show_progress,
    ) as bar:
        task = bar.add_task("calibrate", total=len(todo))
        points = measure(
            todo, repeats, time_limit, lambda k, n: bar.update(task, completed=k, total=n)
        )
    model, rms = fit(points, name)
    return (
        model,
        points,
        fit_record(points, rms, torch.get_num_threads(), time.perf_counter() - start),
    )


def print_table(model: CalibratedCost, points: Sequence[Point], fit: dict, console) -> None:
    """Measured vs predicted speedup per timed layer, fitted and shipped, and the constants."""
    from rich.table import Table

    shipped = COST_MODELS["calibrated-cpu"]
    assert isinstance(shipped, CalibratedCost)
    t = Table(title=f"{model.name}: dense / Pixelfly forward time", title_justify="left")
    cols = ("shape", "rows", "pattern n/f/pb", "rank", "kernel", "measured x", "fitted x")
    for col in (*cols, "shipped x"):
        t.add_column(col, justify="right")
    for p in points:
        s = p.spec
        t.add_row(
            f"{p.gemm.out_features}x{p.gemm.in_features}",
            str(p.gemm.rows),
            f"{s.butterfly}/{s.factors}/{s.pattern_block}",
            str(s.rank),
            p.execution,
            f"{1 / p.ratio:.2f}",
            f"{1 / predict(model, p):.2f}",
            f"{1 / predict(shipped, p):.2f}",
        )
    console.print(t)
    console.print(
        f"fitted: move {model.move:.1f}, per_block {model.per_block:.1f}, lowrank "
        f"{model.lowrank:.2f}, group_move {model.group_move:.1f}, fuse_move "
        f"{model.fuse_move:.1f} (shipped calibrated-cpu: "
        f"{shipped.move:g}, {shipped.per_block:g}, {shipped.lowrank:g}, "
        f"{shipped.group_move:g}, {shipped.fuse_move:g}); RMS log error {fit['rms_log_error']:.3f} "
        f"(shipped: {fit['shipped_rms_log_error']:.3f}) over {fit['points']} layers, "
        f"{fit['threads']} threads, {fit['seconds']:.0f} s",
        highlight=False,
    )
