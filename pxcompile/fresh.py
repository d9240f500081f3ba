"""Does a model still hold its random initialisation? (``sparsify(init="auto")``)

``init="dense"`` (copy the kept blocks, fit the low-rank term to the rest) keeps a *trained*
model closest to itself. On a *freshly initialised* model it is wrong: the dropped blocks
carry a random share ``1 - density`` of each output's variance, so every sparse layer starts
with its output scale shrunk by about ``sqrt(density)``, and the low-rank fit spends its rank
on noise. ``init="scratch"`` samples the layer the way a dense layer is initialised instead
(see :meth:`pxcompile.layers.PixelflyLinear.reset_parameters`). ``init="auto"`` chooses
between them with the test below.

**The test.** A freshly initialised weight is a matrix of i.i.d. zero-mean entries (uniform,
normal or truncated normal, whatever the module's default init is). Random-matrix theory
bounds its largest singular value: for an ``m x n`` matrix with entries of RMS ``s``,
``sigma_max ~ s (sqrt(m) + sqrt(n))`` (the Marchenko-Pastur / Bai-Yin edge), below it for any
finite size, with fluctuations of relative order ``min(m, n)^(-2/3)``. Training adds a
low-rank signal (the gradients are sums of outer products), which shows up as singular values
*above* the edge; after a few hundred steps the edge ratio of trained layers is 1.3-2 and
beyond, and pretrained networks are known for heavy-tailed spectra far past it. So a weight
"looks fresh" when ``edge_ratio(w) = sigma_max / (s (sqrt(m) + sqrt(n)))`` is at most
``1.1 + 0.5 min(m, n)^(-2/3)`` (:func:`threshold`: over 20,000 sampled uniform and normal
matrices from 8x8 to 256x1024, the largest ratio was 1.15 at 16x16 against a threshold of
1.18; at 768x3072 both uniform and normal stay below 1.005). Orthogonal and other
"well-conditioned" inits sit below the edge, so they count as fresh too. A model is fresh when
*every* weight to be sparsified looks fresh; one weight with a training signal makes it
trained (``init="dense"``), since keeping a trained model's weights matters more than the
variance of a fresh one.

Cost: ``sigma_max`` is exact (``svdvals``) for weights up to 2^18 entries and from 40 power
iterations above that (it can only be under-estimated: random spectra have no gap, so the
estimate falls a little short; a trained weight's outlier has a gap and converges fast). The
check stops at the first trained weight. About 0.1 s for a 768x3072 weight.

**Limits** (pass ``init=`` explicitly in these cases):

* a model trained for only a few steps still looks fresh, and gets the scratch init (its
  little training is discarded);
* a fresh model with a *structured* init that is neither i.i.d. nor well conditioned (a
  non-zero mean, a low-rank or identity-plus-noise init) looks trained and keeps ``dense``;
* weights that are exactly zero (or on the meta device) carry no evidence and are skipped; in
  a fresh model zero weights are re-sampled by the scratch init (pass ``init="dense"`` to
  keep zero-initialised layers);
* non-finite weights count as trained (the dense init then reports them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

#: Weights up to this many entries get an exact largest singular value.
EXACT_MAX_ENTRIES: int = 1 << 18
POWER_ITERATIONS: int = 40


def threshold(rows: int, cols: int) -> float:
    """The largest edge ratio a freshly initialised ``rows x cols`` weight is allowed."""
    return 1.1 + 0.5 * min(rows, cols) ** (-2.0 / 3.0)


def largest_singular_value(w: Tensor) -> float:
    """``sigma_max(w)``: exact for small weights, else power iteration (a lower bound)."""
    w = w.detach().float()
    if w.numel() <= EXACT_MAX_ENTRIES:
        return float(torch.linalg.svdvals(w.double())[0])
    g = torch.Generator(device=w.device).manual_seed(0)
    v = torch.randn(w.shape[1], 1, generator=g, device=w.device)
    for _ in range(POWER_ITERATIONS):
        v = w.t() @ (w @ v)
        n = v.norm()
        if n == 0:
            return 0.0
        v = v / n
    return float((w @ v).norm())


def edge_ratio(w: Tensor) -> float:
    """``sigma_max(w) / (rms(w) (sqrt(rows) + sqrt(cols)))``; ``nan`` for an all-zero weight."""
    w = w.detach().reshape(w.shape[0], -1)
    rows, cols = w.shape
    rms = float(w.double().square().mean().sqrt())
    if rms == 0:
        return math.nan
    return largest_singular_value(w) / (rms * (math.sqrt(rows) + math.sqrt(cols)))


@dataclass(frozen=True)
class WeightCheck:
    """One weight's test: ``fresh`` is None when the weight carries no evidence (all zero)."""

    name: str
    shape: tuple[int, ...]
    ratio: float
    limit: float
    fresh: bool | None


def check_weight(name: str, w: Tensor) -> WeightCheck:
    """The freshness test of one 2-D weight (see the module docstring)."""
    shape = tuple(w.shape)
    if w.is_meta:  # no values: no evidence
        return WeightCheck(name, shape, math.nan, threshold(shape[0], w[0].numel()), None)
    if not bool(torch.isfinite(w).all()):
        return WeightCheck(name, shape, math.inf, 0.0, False)
    rows, cols = w.shape[0], w[0].numel()
    r, lim = edge_ratio(w), threshold(rows, cols)
    return WeightCheck(name, shape, r, lim, None if math.isnan(r) else r <= lim)


@dataclass(frozen=True)
class InitChoice:
    """What ``init="auto"`` chose (``init``: "dense" or "scratch") and why."""

    init: str
    reason: str
    checks: tuple[WeightCheck, ...]


def choose_init(weights: Iterable[tuple[str, Tensor]]) -> InitChoice:
    """``"scratch"`` when every weight looks freshly initialised, else ``"dense"`` (stops at the
    first weight with a training signal)."""
    checks: list[WeightCheck] = []
    for name, w in weights:
        c = check_weight(name, w)
        checks.append(c)
        if c.fresh is False:
            why = (
                "has non-finite values"
                if math.isinf(c.ratio)
                else f"has a training signal (largest singular value {c.ratio:.2f}x the "
                f"random-matrix edge, fresh weights stay below {c.limit:.2f}x)"
            )
            return InitChoice("dense", f"weight {name!r} {why}", tuple(checks))
    seen = [c for c in checks if c.fresh]
    if not seen:
        return InitChoice("dense", "no weight carries evidence of a random init", tuple(checks))
    top = max(seen, key=lambda c: c.ratio / c.limit)
    return InitChoice(
        "scratch",
        f"all {len(seen)} weights look freshly initialised (largest singular value at most "
        f"{top.ratio:.2f}x the random-matrix edge, in {top.name!r})",
        tuple(checks),
    )
