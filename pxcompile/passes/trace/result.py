"""The trace pass's result: the schema plus how the rewrite pass reaches each GEMM."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from ...schema import ModelSchema


@dataclass
class GemmBinding:
    """How the rewrite pass reaches the weight of one weight GEMM."""

    gemm: str  # Gemm.name
    module: str  # qualified name of the owning module ('' for root)
    kind: str  # see below
    weight: str  # qualified parameter name
    bias: str | None = None
    unsupported: str | None = None  # why the rewrite must leave it dense, if it must
    transposed: bool = False  # the weight is stored [in, out] (HF Conv1D, x @ W)


# GemmBinding.kind:
#   'linear'        an nn.Linear called as a module (also nn.MultiheadAttention.out_proj,
#                   which MHA uses through its weight; module = '<mha>.out_proj')
#   'conv1d'        an HF Conv1D called as a module (weight stored [in, out])
#   'mha_in_proj'   the packed in-projection of an nn.MultiheadAttention (module = the MHA;
#                   weight '<mha>.in_proj_weight' [3E, E], or q/k/v_proj_weight when separate)
#   'functional'    F.linear(x, <parameter>[, <parameter>]) with the parameter itself
#   'functional_op' any other use of a parameter in a GEMM: x @ W, W @ x, F.linear on W.t(),
#                   addmm, einsum, ..., or a weight used both as a module and functionally
# Both functional kinds are rewritten through a PixelflyWeight (pxcompile/nn/weight.py): a
# Linear-like owner is swapped for a PixelflyLinear (whose .weight is one), a bare parameter
# is replaced by one. The coverage run (weight_uses.py) sets ``transposed`` and, where the
# weight's dense values are used (w.norm(), a slice...), ``unsupported``.


@dataclass(frozen=True)
class AttentionSite:
    """How the rewrite pass reaches the attention core behind a scores/values GEMM.

    ``via``: ``'hf'`` (a Hugging Face model's attention, replaced through transformers'
    ``AttentionInterface`` whatever it traced as), ``'sdpa'`` (an
    ``F.scaled_dot_product_attention`` call; ``nodes`` names its nodes in the traced graph),
    ``'mha'`` (inside an ``nn.MultiheadAttention``) or ``'chain'`` (written out as matmul,
    softmax, matmul)."""

    via: str
    nodes: tuple[str, ...] = ()
    unsupported: str | None = None  # why Pixelfly attention can't stand in for it, if so


@dataclass
class TraceResult:
    schema: ModelSchema
    bindings: dict[str, GemmBinding]  # by gemm name, weight GEMMs only
    method: str  # 'fx' or 'export'
    graph_module: fx.GraphModule | None  # the fx graph when method == 'fx', else None
    notes: list[str] = field(default_factory=list)
    attention: dict[str, AttentionSite] = field(default_factory=dict)  # activation GEMMs
