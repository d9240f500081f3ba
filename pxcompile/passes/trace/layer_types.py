"""Layer typing: which modules are Linear-likes, and the layer type of a weight GEMM.

Layer types (first rule that matches, on the lower-cased dotted path of the GEMM)
-------------------------------------------------------------------------------------
1. weight shared with an ``nn.Embedding``'s weight -> ``head`` (tied LM head);
2. a path segment in {lm_head, head, heads, classifier, cls, pooler, score, qa_outputs,
   logits, embed_out} -> ``head``;
3. a path segment containing ``embed`` (patch_embed, embeddings, to_patch_embedding, ...)
   -> ``embedding``;
4. a segment containing ``token`` (mlp_tokens, token_mixing, ...) -> ``token_mix``;
5. structural token mixing: the GEMM's input comes (through activations/dropout only) from
   a transpose/permute that moved the second-to-last dim (the sequence) last, or from
   another token-mixing GEMM -> ``token_mix``;
6. MHA GEMMs, a segment containing ``attn``/``attention`` (attn, self_attn, attention,
   SelfAttention, EncDecAttention, ...), or a last segment in {q, k, v (these three not at
   the root), query, key, value,
   qkv, kv, c_attn, in_proj, out_proj, q_proj, k_proj, v_proj, o_proj, to_q, to_k, to_v,
   to_qkv} -> ``attn_proj`` (so GPT-2's ``attn.c_proj`` is attention, ``mlp.c_proj`` MLP);
7. a segment containing mlp/ffn/feed_forward/feedforward/densereludense/intermediate/
   channel, or a last segment in {fc, fc1, fc2, c_fc, linear1, linear2, wi, wo, wi_0, wi_1,
   gate_proj, up_proj, down_proj, w1, w2, w3, dense_h_to_4h, dense_4h_to_h}, or a path
   ending in ``output.dense`` (BERT's FFN output) -> ``mlp``;
8. a top-level GEMM (no dot) named fc/fc_out/out/output/logits/linear/last_linear/final/
   readout/proj_out that is the last weight GEMM of the forward -> ``head``;
9. otherwise ``other``.
"""

from __future__ import annotations

import torch.nn as nn

from ...schema import LayerType


def _is_hf_conv1d(m: nn.Module) -> bool:
    t = type(m)
    return any(
        c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in t.__mro__
    )


def is_linear_like(m: nn.Module) -> bool:
    """``nn.Linear``, HF ``Conv1D`` or ``nn.MultiheadAttention``."""
    return isinstance(m, (nn.Linear, nn.MultiheadAttention)) or _is_hf_conv1d(m)


def module_kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear):
        return "linear"
    if _is_hf_conv1d(m):
        return "conv1d"
    if isinstance(m, nn.MultiheadAttention):
        return "mha"
    return None


# ---------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------
_HEAD_SEGS = {
    "lm_head",
    "head",
    "heads",
    "classifier",
    "cls",
    "pooler",
    "score",
    "qa_outputs",
    "logits",
    "embed_out",
}
_ATTN_LAST = {
    "q",
    "k",
    "v",
    "query",
    "key",
    "value",
    "qkv",
    "kv",
    "c_attn",
    "in_proj",
    "out_proj",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "to_q",
    "to_k",
    "to_v",
    "to_qkv",
}
_MLP_SUBSTR = ("mlp", "ffn", "feed_forward", "feedforward", "densereludense", "intermediate")
_MLP_LAST = {
    "fc",
    "fc1",
    "fc2",
    "c_fc",
    "linear1",
    "linear2",
    "wi",
    "wo",
    "wi_0",
    "wi_1",
    "gate_proj",
    "up_proj",
    "down_proj",
    "w1",
    "w2",
    "w3",
    "dense_h_to_4h",
    "dense_4h_to_h",
}
_TOP_HEAD = {
    "fc",
    "fc_out",
    "out",
    "output",
    "logits",
    "linear",
    "last_linear",
    "final",
    "readout",
    "proj_out",
}


def classify(
    path: str,
    *,
    tied_to_embedding: bool = False,
    token_hint: bool = False,
    is_mha: bool = False,
    last_weight_gemm: bool = False,
) -> LayerType:
    """The layer type of a weight GEMM from its dotted path (rules in the module doc)."""
    segs = [s.lower() for s in path.split(".") if s]
    last = segs[-1] if segs else ""
    if tied_to_embedding:
        return LayerType.HEAD
    if any(s in _HEAD_SEGS for s in segs):
        return LayerType.HEAD
    if any("embed" in s for s in segs):
        return LayerType.EMBEDDING
    if any("token" in s for s in segs):
        return LayerType.TOKEN_MIX
    if token_hint:
        return LayerType.TOKEN_MIX
    if (
        is_mha
        or any("attn" in s or "attention" in s for s in segs)
        or (last in _ATTN_LAST and (len(last) > 1 or len(segs) > 1))
    ):
        return LayerType.ATTN_PROJ
    if (
        any(any(k in s for k in _MLP_SUBSTR) or "channel" in s for s in segs)
        or last in _MLP_LAST
        or path.lower().endswith("output.dense")
    ):
        return LayerType.MLP
    if len(segs) == 1 and last in _TOP_HEAD and last_weight_gemm:
        return LayerType.HEAD
    return LayerType.OTHER
