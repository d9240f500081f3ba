"""The torch.export capture (non-strict, no decompositions): export the model and analyze its
aten graph into sites, weights found by parameter name."""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from .analyzer import Analyzer
from .sites import Params, Site


class _Flat(nn.Module):
    """Wraps the model so that export sees only tensors in its output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, *args, **kwargs):
        out = self.m(*args, **kwargs)
        return tuple(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def _strip(path: str) -> str:
    if path == "m":
        return ""
    return path[2:] if path.startswith("m.") else path


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export logs whole graphs when it gives up; our error line says it instead."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.export", "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    sink = io.StringIO()  # it also prints the graph it gave up on
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export_analyze(
    model: nn.Module, args: tuple, kwargs: dict, params: Params
) -> tuple[list[Site], list[str]]:
    with _quiet_torch_logs():
        ep = torch.export.export(_Flat(model), args, kwargs, strict=False)
    in2p = {k: _strip(v) for k, v in ep.graph_signature.inputs_to_parameters.items()}
    gm = ep.graph_module

    def shape_of(n: Any) -> tuple[int, ...] | None:
        if not isinstance(n, fx.Node):
            return None
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            try:
                return tuple(int(s) for s in v.shape)
            except (TypeError, ValueError):
                return None
        return None

    def param_of_node(n: fx.Node) -> str | None:
        if n.op == "placeholder" and n.name in in2p:
            return in2p[n.name]
        return None

    def scope_of(n: fx.Node) -> str:
        st = n.meta.get("nn_module_stack")
        if st:
            return _strip(list(st.values())[-1][0])
        return ""

    an = Analyzer(
        gm,
        params,
        shape_of=shape_of,
        param_of_node=param_of_node,
        scope_of=scope_of,
        module_of_call=lambda n: None,
    )
    for node in gm.graph.nodes:
        an.analyze_op(node)
    return an.sites, an.notes
