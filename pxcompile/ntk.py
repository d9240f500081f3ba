"""Empirical neural tangent kernels, to compare a compiled model with its dense original.

The Pixelfly paper (Chen, Dao et al., ICLR 2022, Figure 4) uses the distance between a sparse
network's NTK and the dense network's as a guide: the sparsity pattern whose NTK stays closest
to the dense one tends to train to the best accuracy. :func:`ntk_distance` measures it on a
small batch, so two plans (or a plan and a baseline) can be compared before training.

The kernel is ``K[i, j] = sum_c <d f_c(x_i) / d theta, d f_c(x_j) / d theta>``: the trace over
outputs of the empirical NTK, an ``N x N`` matrix for ``N`` inputs. Models with many outputs
per input (a language model's ``tokens x vocabulary`` logits) are first projected onto
``outputs`` fixed random directions (a Gaussian sketch, the same for both models), which
keeps the kernel's expectation and bounds the cost at ``N * outputs`` backward passes.

Gradients come from plain ``torch.autograd.grad`` (one backward per input and output
direction), so any module works, including ones whose layers are custom
``torch.autograd.Function`` s that ``torch.func`` transforms can't see through.

>>> import torch, pxcompile
>>> from pxcompile.ntk import ntk_distance
>>> dense = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(),
...                             torch.nn.Linear(512, 10))
>>> x = torch.randn(8, 256)
>>> gm = pxcompile.sparsify(dense, 0.3, block=32, example_inputs=(x,))
>>> 0.0 <= ntk_distance(dense, gm, x) < 1.0
True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .inputs import as_args

__all__ = ["empirical_ntk", "kernel_distance", "ntk_distance"]

METRICS = ("relative", "alignment")


def _first_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "to_tuple"):
        out = list(out.values()) if isinstance(out, dict) else list(out.to_tuple())
    if isinstance(out, tuple | list):
        for v in out:
            if isinstance(v, Tensor) and v.is_floating_point():
                return v
    raise TypeError(f"the model's output has no floating-point tensor: {type(out).__name__}")


def _batch_size(inputs: Any) -> int:
    args, kwargs = as_args(inputs)
    for v in (*args, *kwargs.values()):
        if isinstance(v, Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError("inputs hold no batched tensor (the first dimension is the batch)")


def empirical_ntk(
    model: nn.Module,
    inputs: Any,
    *,
    outputs: int = 8,
    seed: int = 0,
    output_fn=None,
) -> Tensor:
    """The empirical NTK (trace over outputs) of ``model`` at ``inputs``: ``[N, N]`` float64.

    ``inputs`` is a batched tensor, a tuple of positional inputs or a dict of keyword inputs
    (batch first). ``output_fn`` maps the model's output to a ``[N, ...]`` tensor (default:
    the output itself, or its first floating-point tensor). When an input has more than
    ``outputs`` output values they are projected onto ``outputs`` random Gaussian directions
    drawn from ``seed`` (scaled by ``1/sqrt(outputs)``). Parameters without
    ``requires_grad`` are constants. The model's mode (train/eval) is left as it is; call
    ``model.eval()`` first for a deterministic kernel when it has dropout.
    """
    params = [p for p in dict(model.named_parameters()).values() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    args, kwargs = as_args(inputs)
    out = model(*args, **kwargs)
    y = output_fn(out) if output_fn is not None else _first_tensor(out)
    n = _batch_size(inputs)
    if y.shape[0] != n:
        raise ValueError(f"output batch {y.shape[0]} differs from the input batch {n}")
    y = y.reshape(n, -1)
    d = y.shape[1]
    if d > outputs:
        g = torch.Generator().manual_seed(seed)
        proj = torch.randn(d, outputs, generator=g, dtype=torch.float64) / outputs**0.5
        y = y.double() @ proj.to(y.device)
    k = torch.zeros(n, n, dtype=torch.float64)
    total = n * y.shape[1]
    done = 0
    for c in range(y.shape[1]):
        rows = []
        for i in range(n):
            done += 1
            grads = torch.autograd.grad(
                y[i, c], params, retain_graph=done < total, allow_unused=True
            )
            flat = [
                (g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                for g, p in zip(grads, params)
            ]
            rows.append(torch.cat(flat).cpu())
        j = torch.stack(rows)  # [N, P]
        k += j @ j.t()
    return k


def kernel_distance(k_ref: Tensor, k: Tensor, metric: str = "relative") -> float:
    """Distance of kernel ``k`` from the reference ``k_ref`` (both ``[N, N]``).

    ``"relative"``: ``||k - k_ref||_F / ||k_ref||_F`` (0 for the same kernel; scale matters).
    ``"alignment"``: ``1 - <k, k_ref>_F / (||k||_F ||k_ref||_F)``, in ``[0, 1]`` for PSD
    kernels (0 when one is a positive multiple of the other; scale doesn't matter).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if k_ref.shape != k.shape:
        raise ValueError(f"kernel shapes differ: {tuple(k_ref.shape)} and {tuple(k.shape)}")
    a, b = k_ref.double(), k.double()
    na = torch.linalg.norm(a)
    if metric == "relative":
        return float(torch.linalg.norm(b - a) / na.clamp_min(1e-300))
    nb = torch.linalg.norm(b)
    return float(1.0 - (a * b).sum() / (na * nb).clamp_min(1e-300))


def ntk_distance(
    dense_model: nn.Module,
    compiled_model: nn.Module,
    inputs: Any,
    *,
    metric: str = "relative",
    outputs: int = 8,
    seed: int = 0,
    output_fn=None,
) -> float:
    """How far ``compiled_model``'s empirical NTK on ``inputs`` is from ``dense_model``'s.

    Both models get the same inputs and the same output projection (see
    :func:`empirical_ntk`); ``metric`` as in :func:`kernel_distance`. Use a small batch
    (8-32 inputs): the cost is ``len(batch) * min(outputs, output size)`` backward passes
    per model. Lower is closer to dense; compare plans on the same inputs and seed.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    kw = {"outputs": outputs, "seed": seed, "output_fn": output_fn}
    k_ref = empirical_ntk(dense_model, inputs, **kw)
    k = empirical_ntk(compiled_model, inputs, **kw)
    return kernel_distance(k_ref, k, metric)
