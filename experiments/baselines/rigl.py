"""RigL (Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners") as a baseline for
the figure experiments: dynamic unstructured sparse training of chosen ``nn.Linear`` layers.

* **Masks**: each layer keeps a boolean element mask at its density; the dense weight holds
  exact zeros where the mask is off (so the model runs as an ordinary dense model: RigL's
  unstructured masks give no speed-up on dense hardware kernels, and none is claimed).
  Densities are ``"uniform"`` (every layer at the overall density) or ``"erk"``
  (Erdos-Renyi-Kernel: layer density proportional to ``(fan_in + fan_out) / (fan_in *
  fan_out)``, scaled to the same total of kept weights, capped at 1 with the excess spread
  over the others). The first mask is random at that density.
* **Gradients**: a hook on each weight masks its gradient (the inactive weights get none, so
  clipping and the optimizer see the sparse model's gradient); on a mask-update step it first
  keeps a copy of the dense gradient, which growing needs.
* **Updates** (every ``delta_t`` optimizer steps, until ``t_end``): per layer, drop the ``k``
  active weights of smallest magnitude and grow the ``k`` inactive ones (after the drop) of
  largest dense-gradient magnitude, ``k = f(t) * active``, ``f(t) = alpha / 2 * (1 + cos(pi
  t / t_end))`` (cosine-decayed update fraction). New connections start at zero, with zeroed
  optimizer state (Adam's moments); a dropped weight that is grown back keeps its value.
* **Wiring**: :meth:`RigL.attach` registers the gradient hooks and a global optimizer
  step-post-hook (``torch.optim.optimizer.register_optimizer_step_post_hook``) that acts only
  on optimizers holding these weights: after each step it re-applies the masks (weight decay
  and momentum cannot revive an inactive weight) and, when due, updates them. Any training
  loop that calls ``optimizer.step()`` trains RigL without changes. Differences from the
  reference: the mask update runs after that step's optimizer update rather than instead of
  it, and the first mask is uniform random per layer (as the reference's default).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook


def erk_densities(shapes: list[tuple[int, int]], density: float) -> list[float]:
    """Erdos-Renyi-Kernel densities for linear layers of ``(out, in)`` shapes, keeping
    ``density`` of their weights in total: ``d_l = eps * (in + out) / (in * out)``, layers
    that would exceed 1 made dense and ``eps`` solved again over the rest."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    sizes = [o * i for o, i in shapes]
    raw = [(o + i) / (o * i) for o, i in shapes]
    dense: set[int] = set()
    while True:
        budget = density * sum(sizes) - sum(sizes[j] for j in dense)
        free = sum(raw[j] * sizes[j] for j in range(len(shapes)) if j not in dense)
        eps = budget / free
        over = {j for j in range(len(shapes)) if j not in dense and eps * raw[j] > 1}
        if not over:
            return [1.0 if j in dense else eps * raw[j] for j in range(len(shapes))]
        dense |= over


def uniform_densities(shapes: list[tuple[int, int]], density: float) -> list[float]:
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return [density] * len(shapes)


def update_fraction(step: int, alpha: float, t_end: int) -> float:
    """``alpha / 2 * (1 + cos(pi * step / t_end))`` (0 from ``t_end`` on)."""
    if step >= t_end:
        return 0.0
    return alpha / 2 * (1 + math.cos(math.pi * step / t_end))


class RigL:
    """RigL over the ``nn.Linear`` modules in ``layers`` (see the module docstring).

    ``density`` is the fraction of their weights kept in total; ``distribution`` ``"uniform"``
    or ``"erk"``; ``delta_t`` steps between mask updates, ``alpha`` the initial update
    fraction, ``t_end`` the last step that updates; ``seed`` the first masks' seed.
    ``scale_init``: rescale each row's kept weights by ``sqrt(in / kept in the row)`` so the
    sparse layer's output has the dense layer's variance at init (the rule the Pixelfly
    reference and ``PixelflyLinear`` use; applied once, to the first mask).
    """

    def __init__(
        self,
        layers: Iterable[nn.Linear],
        density: float,
        delta_t: int,
        t_end: int,
        alpha: float = 0.3,
        distribution: str = "uniform",
        seed: int = 0,
        scale_init: bool = True,
    ) -> None:
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("RigL needs at least one nn.Linear layer")
        if delta_t < 1 or t_end < 0 or not 0 <= alpha <= 1:
            raise ValueError(f"bad schedule: delta_t={delta_t}, t_end={t_end}, alpha={alpha}")
        fn = {"uniform": uniform_densities, "erk": erk_densities}.get(distribution)
        if fn is None:
            raise ValueError(f"distribution must be 'uniform' or 'erk', got {distribution!r}")
        self.delta_t, self.t_end, self.alpha = delta_t, t_end, alpha
        shapes = [tuple(m.weight.shape) for m in self.layers]
        self.densities = fn(shapes, density)  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(seed)
        self.masks: list[torch.Tensor] = []
        for m, d in zip(self.layers, self.densities):
            w = m.weight
            n = w.numel()
            keep = max(1, round(d * n))
            idx = torch.randperm(n, generator=g)[:keep]
            mask = torch.zeros(n, dtype=torch.bool)
            mask[idx] = True
            mask = mask.view_as(w).to(w.device)
            self.masks.append(mask)
            with torch.no_grad():
                if scale_init:
                    kept = mask.sum(1, keepdim=True).clamp(min=1)
                    w.mul_((w.shape[1] / kept).sqrt())
                w.mul_(mask)
        self.step = 0
        self.updates: list[dict] = []  # per update: step, fraction, changed connections
        self._dense_grads: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles: list = []

    # ---------------------------------------------------------------------------- wiring

    @property
    def weights(self) -> list[nn.Parameter]:
        return [m.weight for m in self.layers]

    def due(self, step: int | None = None) -> bool:
        """Whether the step about to finish (``step``, default the current one, counted from
        1) updates the masks."""
        s = self.step + 1 if step is None else step
        return s % self.delta_t == 0 and s < self.t_end

    def attach(self) -> RigL:
        """Register the gradient hooks and the optimizer post-hook (see the module
        docstring); :meth:`detach` removes them."""
        self.detach()
        for j, w in enumerate(self.weights):
            self._handles.append(w.register_hook(self._grad_hook(j)))
        post = register_optimizer_step_post_hook(self._post_step)
        self._handles.append(post)
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextmanager
    def attached(self):
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    def _grad_hook(self, j: int):
        def hook(g: torch.Tensor) -> torch.Tensor:
            if self.due():
                self._dense_grads[j] = g.detach().clone()
            return g * self.masks[j]

        return hook

    def _post_step(self, opt: torch.optim.Optimizer, args, kwargs) -> None:
        ids = {id(w) for w in self.weights}
        if not any(id(p) in ids for grp in opt.param_groups for p in grp["params"]):
            return
        self.step += 1
        if self.step % self.delta_t == 0 and self.step < self.t_end:
            self.update(opt)
        self.apply_masks()

    # ---------------------------------------------------------------------------- masks

    @torch.no_grad()
    def apply_masks(self) -> None:
        for w, mask in zip(self.weights, self.masks):
            w.mul_(mask)

    @torch.no_grad()
    def update(self, opt: torch.optim.Optimizer | None = None) -> None:
        """One drop-and-grow on every layer, from the weights and the dense gradients kept
        by the hooks (a layer without one is skipped)."""
        frac = update_fraction(self.step, self.alpha, self.t_end)
        changed = 0
        for j, (w, mask) in enumerate(zip(self.weights, self.masks)):
            grad = self._dense_grads[j]
            self._dense_grads[j] = None
            if grad is None:
                continue
            flat_mask = mask.view(-1)
            active = int(flat_mask.sum())
            k = min(int(frac * active), int((~flat_mask).sum()))
            if k <= 0:
                continue
            # drop: the k smallest-magnitude active weights
            score = w.detach().abs().view(-1).masked_fill(~flat_mask, float("inf"))
            drop = torch.topk(score, k, largest=False).indices
            after = flat_mask.clone()
            after[drop] = False
            # grow: the k largest dense-gradient magnitudes among the inactive (after drop)
            gscore = grad.abs().view(-1).masked_fill(after, -1.0)
            grow = torch.topk(gscore, k).indices
            after[grow] = True
            new = after & ~flat_mask  # connections that were off before: start at zero
            w.view(-1)[new] = 0.0
            if opt is not None:
                for v in opt.state.get(w, {}).values():
                    if torch.is_tensor(v) and v.shape == w.shape:
                        v.view(-1)[new] = 0.0
            changed += int(new.sum())
            mask.copy_(after.view_as(mask))
        self.updates.append({"step": self.step, "fraction": frac, "changed": changed})

    def density(self) -> float:
        """Kept fraction of the layers' weights now."""
        return sum(int(m.sum()) for m in self.masks) / sum(m.numel() for m in self.masks)
