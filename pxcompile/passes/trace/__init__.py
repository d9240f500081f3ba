"""Trace pass: from an ``nn.Module`` and example inputs, build the :class:`ModelSchema`.

The schema lists every *weight GEMM* (linear layers, HF ``Conv1D``, the packed projections
of ``nn.MultiheadAttention``, ``F.linear`` / ``matmul`` on a parameter) and the *activation
GEMMs* of attention (``Q K^T`` and ``A V``, written out or as one
``scaled_dot_product_attention`` call), with shapes measured on the example inputs.

How
---
1. **torch.fx** with a tracer that keeps Linear-likes (``nn.Linear``, HF ``Conv1D``,
   ``nn.MultiheadAttention``) as leaf ``call_module`` nodes and traces into every other
   module that contains one. The graph is run once (``ShapeProp``) to get shapes.
2. **Coverage check.** That run happens under a ``TorchFunctionMode`` that records every
   parameter (2-D or more, matched by storage, so views/slices/tied weights count) reaching
   a GEMM function (``linear``, ``matmul``, ``mm``, ``addmm``, ``bmm``, ``baddbmm``,
   ``einsum``, ``mv``, ``tensordot``, ``bilinear``, ``multi_head_attention_forward``). If
   the graph analysis did not bind every recorded weight to a GEMM (e.g. ``einsum`` with a
   weight, a leaf the tracer could not see into), fx is abandoned. The same run records how
   each weight is used (:mod:`.weight_uses`): the orientation its GEMMs take it in, and any
   use of its dense values, which keeps it dense with the reason.
3. **torch.export** (``strict=False``, no ``run_decompositions``, static shapes) is the
   fallback: ``aten.linear`` / ``matmul`` / ``mm`` / ``addmm`` / ``bmm`` / ``baddbmm`` /
   ``scaled_dot_product_attention`` nodes are read with their ``meta['val']`` shapes, and
   weights are found by parameter name (``graph_signature.inputs_to_parameters``, walking
   back through ``t``/``transpose``/``split``/``getitem``/``slice``/... nodes), the calling
   module from ``meta['nn_module_stack']``.
4. If neither traces, :class:`TraceError` (one line: what failed, in which module, and the
   advice to write a YAML schema).

If both trace but both miss weights, the one missing fewer is returned and the misses are
listed in ``TraceResult.notes`` (those weights are absent from the schema, so they stay
dense and their FLOPs are not counted).

The model is traced in the mode it is in (train/eval), under ``torch.no_grad()``; buffers
(e.g. BatchNorm running stats) and the RNG state are restored afterwards, and nothing is
set on the model.

Shapes and counts are described in :mod:`.sites`, naming in :mod:`.analyzer`, layer types in
:mod:`.layer_types`; the fx capture is :mod:`.capture_fx`, the export one :mod:`.capture_export`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from ...errors import TraceError
from .capture_export import export_analyze
from .capture_fx import depends_on_mode, fx_analyze
from .layer_types import classify, is_linear_like
from .repeats import cut_repeats, expand, is_meta_model
from .result import AttentionSite, GemmBinding, TraceResult
from .sites import (
    GemmRecorder,
    Params,
    Site,
    build_schema,
    hf_attention_unsupported,
    is_hf_model,
    preserved,
)
from .weight_uses import WeightUses

__all__ = [
    "AttentionSite",
    "GemmBinding",
    "TraceResult",
    "YAML_HINT",
    "classify",
    "hf_attention_unsupported",
    "is_hf_model",
    "is_linear_like",
    "is_meta_model",
    "trace",
]

YAML_HINT = "write a YAML schema (start from `pxcompile trace model.py -o schema.yaml`)"
MODE_NOTE = (
    "the fx graph differs in train and eval mode (code branching on self.training was traced "
    "through): the rewrite keeps the model's own forward"
)
MODE_SDPA = "an SDPA call in a model whose fx graph differs in train and eval mode"


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------
def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TraceError(
        f"example inputs must be a Tensor, a tuple or a dict, got {type(example_inputs).__name__}"
    )


def _describe_inputs(args: tuple, kwargs: dict) -> str:
    def d(v: Any) -> str:
        return "x".join(map(str, v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__

    parts = [d(v) for v in args] + [f"{k}={d(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------
# Errors: one line, with the module the failure happened in
# ---------------------------------------------------------------------------------------
def _first_line(e: BaseException, limit: int = 160) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = lines[0] if lines else type(e).__name__
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return f"{type(e).__name__}: {msg}"


def _where(e: BaseException, params: Params) -> str:
    """' in <module> (<Type>, file:line)': the innermost module of the model whose code was
    running when ``e`` was raised ('' if none)."""
    ids = {}
    for n, m in params.modules.items():
        ids.setdefault(id(m), n)
    where = None
    tb = e.__traceback__
    while tb is not None:
        s = tb.tb_frame.f_locals.get("self")
        if isinstance(s, nn.Module) and id(s) in ids:
            code = tb.tb_frame.f_code
            name = ids[id(s)] or "<root>"
            where = (
                f" in '{name}' ({type(s).__name__}, "
                f"{code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno})"
            )
        tb = tb.tb_next
    return where or ""


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------
def _missing(used: dict[int, str], sites: list[Site], params: Params) -> list[str]:
    bound = {s.weight_pid for s in sites if s.weight_pid is not None}
    return [f"{params.canon[pid]} ({fn})" for pid, fn in used.items() if pid not in bound]


def trace(
    model: nn.Module,
    example_inputs: tuple | dict | torch.Tensor,
    *,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
    method: str = "auto",
) -> TraceResult:
    """Build the schema of ``model`` on ``example_inputs`` (see the module doc).

    ``example_inputs``: a Tensor (one positional input), a tuple (positional inputs) or a
    dict (keyword inputs). ``method``: ``'auto'`` (fx, then export if fx fails or misses a
    weight GEMM), ``'fx'`` or ``'export'`` (only that one; no fallback). Raises
    :class:`TraceError` when nothing traces.

    A model built without weights (every tensor on the ``meta`` device) is traced with its
    lists of identical layers cut to two, the rest written out from those (:mod:`.repeats`;
    the same schema, in a fraction of the time); the result then holds no graph.
    """
    if method not in ("auto", "fx", "export"):
        raise TraceError(f"trace method must be auto, fx or export, got {method!r}")
    if is_meta_model(model):
        cut = None
        with cut_repeats(model, *_split_inputs(example_inputs)) as cuts:
            with contextlib.suppress(TraceError):  # then the whole model says what fails
                cut = _trace(model, example_inputs, name, progress, method) if cuts else None
        whole = None if cut is None else expand(cut, cuts)
        if whole is not None:
            return whole
        if cut is not None and progress is not None:
            progress("the repeated layers differ: tracing every layer")
    return _trace(model, example_inputs, name, progress, method)


def _trace(
    model: nn.Module,
    example_inputs: tuple | dict | torch.Tensor,
    name: str | None,
    progress: Callable[[str], None] | None,
    method: str,
) -> TraceResult:
    say = progress or (lambda _msg: None)
    args, kwargs = _split_inputs(example_inputs)
    name = name or type(model).__name__
    params = Params(model)
    notes: list[str] = []
    leaves = pytree.tree_leaves((args, kwargs))
    desc_inputs = _describe_inputs(args, kwargs)
    uses = WeightUses(params)  # how the coverage run uses each weight

    def finish(how: str, sites: list[Site], extra: list[str], gm: fx.GraphModule | None):
        notes.extend(extra)
        if not sites:
            why = f" ({notes[-1]})" if notes else ""
            raise TraceError(f"tracing {name} with {how} found no GEMM{why}; {YAML_HINT}")
        schema, bindings, attention = build_schema(
            sites, params, name, how, f"traced with {how} on inputs ({desc_inputs})"
        )
        uses.apply(bindings, model, schema)
        mode_bound = False
        if gm is not None:
            with preserved(model, leaves):
                mode_bound = depends_on_mode(model, gm.graph, args, kwargs)
        if mode_bound:
            # The rewrite runs the model's own forward (its modes live) instead of a graph
            # that would apply one mode's dropout/stochastic depth in both.
            gm = None
            notes.append(MODE_NOTE)
            attention = {
                k: replace(v, unsupported=v.unsupported or MODE_SDPA) if v.via == "sdpa" else v
                for k, v in attention.items()
            }
        if is_hf_model(model):
            why = hf_attention_unsupported(model)
            attention = {k: AttentionSite("hf", v.nodes, why) for k, v in attention.items()}
        say(f"traced {name} with {how}: {len(schema)} GEMMs")
        return TraceResult(schema, bindings, how, gm, notes, attention)

    def fail(errors: list[str]) -> TraceError:
        return TraceError(f"cannot trace {name}: {'; '.join(errors)}; {YAML_HINT}")

    # 1. fx
    errors: list[str] = []
    fx_out = None
    fx_missing: list[str] = []
    used: dict[int, str] | None = None
    if method in ("auto", "fx"):
        say("tracing with torch.fx")
        try:
            with preserved(model, leaves):
                fx_out = fx_analyze(model, args, kwargs, params, uses)
        except Exception as e:  # noqa: BLE001 - any failure means: try export
            errors.append(f"fx failed{_where(e, params)}: {_first_line(e)}")
            notes.append(errors[-1])
            say(errors[-1])
            if method == "fx":
                raise fail(errors) from None
    if fx_out is not None:
        gm, fx_sites, fx_notes, used = fx_out
        fx_missing = _missing(used, fx_sites, params)
        if not fx_missing or method == "fx":
            if fx_missing:
                notes.append("fx missed weight GEMMs: " + ", ".join(fx_missing))
            return finish("fx", fx_sites, fx_notes, gm)
        notes.append("fx missed weight GEMMs: " + ", ".join(fx_missing))
        say(notes[-1] + "; trying torch.export")

    # 2. export
    say("tracing with torch.export (non-strict)")
    try:
        with preserved(model, leaves):
            ex_sites, ex_notes = export_analyze(model, args, kwargs, params)
    except Exception as e:  # noqa: BLE001
        errors.append(f"torch.export failed{_where(e, params)}: {_first_line(e)}")
        notes.append(errors[-1])
        say(errors[-1])
        if fx_out is not None:  # fx traced but missed some weights: better than nothing
            return finish("fx", fx_out[1], fx_out[2], fx_out[0])
        raise fail(errors) from None
    if used is None:  # ground truth from one real run
        try:
            rec = GemmRecorder(params, uses.record)
            with preserved(model, leaves), rec:
                model(*args, **kwargs)
            used = rec.used
        except Exception as e:  # noqa: BLE001
            notes.append(f"coverage check skipped: the model failed to run ({_first_line(e)})")
            used = {}
    ex_missing = _missing(used, ex_sites, params)
    if ex_missing:
        notes.append("torch.export missed weight GEMMs: " + ", ".join(ex_missing))
        say(notes[-1])
        if fx_out is not None and len(fx_missing) < len(ex_missing):
            return finish("fx", fx_out[1], fx_out[2], fx_out[0])
    return finish("export", ex_sites, ex_notes, None)
