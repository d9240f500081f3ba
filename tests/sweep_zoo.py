"""Real third-party architectures for the coverage sweep (issue #10), built from tiny configs
with random weights: nothing is downloaded, nothing is pretrained.

Each builder is seeded and returns ``(model, example_inputs)``, the model in the mode its
library builds it in (train mode: dropout and stochastic depth on, as a user has it). Configs
keep every GEMM side a multiple of 32 with at least 8 blocks of 32 (hidden 256, MLP 1024,
2 layers, 2 heads, 16-64 tokens, 32-64 px images), so that layers can actually be sparse at
block 32, with patterns sparse enough for the budget 0.3 (at 4 blocks the sparsest keeps 0.5). Used by
``tests/test_coverage.py`` and by ``docs/coverage.py`` (which writes ``docs/coverage.md``); not
part of the installed package.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Built = tuple[nn.Module, Any]

BATCH = 2
SEQ = 32
VOCAB = 512
HIDDEN = 256
MLP = 1024
HEADS = 2
LAYERS = 2


@dataclass(frozen=True)
class Arch:
    """One row of the sweep: a name, its library, what the config is, and its builder."""

    name: str
    library: str  # 'transformers', 'timm' or 'torchvision': the module the test imports or skips
    config: str  # a short note for docs/coverage.md
    build: Callable[[], Built]


def _tokens(seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, seq))


def _image(px: int = 32) -> torch.Tensor:
    return torch.randn(BATCH, 3, px, px)


# --- transformers -------------------------------------------------------------------------


def _tf():
    return importlib.import_module("transformers")


def gpt2() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.GPT2Config(
        n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, n_inner=MLP, vocab_size=VOCAB, n_positions=64
    )
    return tf.GPT2LMHeadModel(cfg), {"input_ids": _tokens()}


def _bert_like(config_cls: str, model_cls: str) -> Built:
    tf = _tf()
    torch.manual_seed(0)
    cfg = getattr(tf, config_cls)(
        num_hidden_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
        vocab_size=VOCAB,
        max_position_embeddings=66,  # RoBERTa's positions start after the padding index
    )
    return getattr(tf, model_cls)(cfg), {"input_ids": _tokens()}


def bert() -> Built:
    return _bert_like("BertConfig", "BertModel")


def roberta() -> Built:
    return _bert_like("RobertaConfig", "RobertaModel")


def t5() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.T5Config(
        d_model=HIDDEN,
        d_kv=HIDDEN // HEADS,
        d_ff=MLP,
        num_layers=LAYERS,
        num_decoder_layers=LAYERS,
        num_heads=HEADS,
        vocab_size=VOCAB,
    )
    inputs = {"input_ids": _tokens(), "decoder_input_ids": _tokens(16)}
    return tf.T5Model(cfg), inputs


def bart() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.BartConfig(
        d_model=HIDDEN,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=MLP,
        decoder_ffn_dim=MLP,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return tf.BartModel(cfg), {"input_ids": _tokens()}


def _causal_lm(config_cls: str, model_cls: str, **extra: Any) -> Built:
    tf = _tf()
    torch.manual_seed(0)
    cfg = getattr(tf, config_cls)(
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        **extra,
    )
    return getattr(tf, model_cls)(cfg), {"input_ids": _tokens()}


def llama() -> Built:
    return _causal_lm("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=HEADS)


def mistral() -> Built:
    return _causal_lm("MistralConfig", "MistralForCausalLM", num_key_value_heads=HEADS)


def qwen2() -> Built:
    return _causal_lm("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=HEADS)


def phi() -> Built:
    return _causal_lm("PhiConfig", "PhiForCausalLM")


def vit_hf() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
    )
    return tf.ViTModel(cfg, add_pooling_layer=False), {"pixel_values": _image()}


def clip_text() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.CLIPTextConfig(
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
    )
    return tf.CLIPTextModel(cfg), {"input_ids": _tokens()}


def clip_vision() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.CLIPVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=32,
        patch_size=8,
    )
    return tf.CLIPVisionModel(cfg), {"pixel_values": _image()}


def whisper_encoder() -> Built:
    tf = _tf()
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(0)
    cfg = tf.WhisperConfig(
        d_model=HIDDEN,
        encoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        encoder_ffn_dim=MLP,
        num_mel_bins=80,
        max_source_positions=SEQ,  # the convolutions halve 2 x SEQ frames to SEQ positions
    )
    return WhisperEncoder(cfg), {"input_features": torch.randn(BATCH, 80, 2 * SEQ)}


# --- timm ---------------------------------------------------------------------------------


def _timm(name: str, px: int, **kwargs: Any) -> Built:
    timm = importlib.import_module("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    return model, (_image(px),)


_TIMM_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": HIDDEN, "depth": LAYERS}


def timm_vit() -> Built:
    return _timm("vit_tiny_patch16_224", 32, num_heads=HEADS, **_TIMM_VIT)


def timm_deit() -> Built:
    return _timm("deit_tiny_patch16_224", 32, num_heads=HEADS, **_TIMM_VIT)


def timm_beit() -> Built:
    return _timm("beit_base_patch16_224", 32, num_heads=HEADS, **_TIMM_VIT)


def _timm_mlp_mixer(**kwargs: Any) -> Built:
    # The mixer/resmlp names fix patch_size in create_model, so build their class directly
    # with the same arguments the names pass.
    mlp_mixer = importlib.import_module("timm.models.mlp_mixer")
    torch.manual_seed(0)
    model = mlp_mixer.MlpMixer(
        num_classes=10, img_size=64, patch_size=4, embed_dim=HIDDEN, num_blocks=LAYERS, **kwargs
    )
    return model, (_image(64),)


def timm_mixer() -> Built:
    # 64 px in 4 px patches: 256 tokens, token MLP 256 -> 128 -> 256, channel MLP 256 -> 1024
    return _timm_mlp_mixer(mlp_ratio=(0.5, 4.0))


def timm_resmlp() -> Built:
    # resmlp_12_224's arguments: ResBlock with layer scale, Affine norms, no stem norm
    mlp_mixer = importlib.import_module("timm.models.mlp_mixer")
    block = functools.partial(mlp_mixer.ResBlock, init_values=0.1)
    return _timm_mlp_mixer(
        mlp_ratio=4, block_layer=block, norm_layer=mlp_mixer.Affine, stem_norm=False
    )


def timm_swin() -> Built:
    return _timm(
        "swin_tiny_patch4_window7_224",
        32,
        img_size=32,
        patch_size=4,
        embed_dim=HIDDEN,
        depths=(1, 1),
        num_heads=(2, 4),
        window_size=4,
    )


def timm_convnext() -> Built:
    # convnext_tiny's block has Linear MLPs (conv_mlp=False); ConvNeXt always has 4 stages
    return _timm(
        "convnext_tiny", 32, dims=(HIDDEN, HIDDEN, 2 * HIDDEN, 2 * HIDDEN), depths=(1, 1, 1, 1)
    )


# --- torchvision --------------------------------------------------------------------------


def tv_vit_b_16() -> Built:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=LAYERS,
        num_heads=HEADS,
        hidden_dim=HIDDEN,
        mlp_dim=MLP,
        num_classes=10,
    )
    return model, (_image(32),)


def tv_swin_t() -> Built:
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(
        patch_size=[4, 4],
        embed_dim=HIDDEN,
        depths=[1, 1],
        num_heads=[2, 4],
        window_size=[4, 4],
        num_classes=10,
    )
    return model, (_image(32),)


def tv_maxvit_t() -> Built:
    from torchvision.models.maxvit import MaxVit

    torch.manual_seed(0)
    model = MaxVit(
        input_size=(64, 64),
        stem_channels=32,
        partition_size=4,
        block_channels=[HIDDEN, 2 * HIDDEN],
        block_layers=[1, 1],
        head_dim=64,
        stochastic_depth_prob=0.0,
        num_classes=10,
    )
    return model, (_image(64),)


_TF = "transformers"
_SMALL = f"tiny config: hidden {HIDDEN}, MLP {MLP}, {LAYERS} layers, {HEADS} heads"
ARCHS: list[Arch] = [
    Arch("gpt2", _TF, f"GPT2LMHeadModel, {_SMALL}, 32 tokens", gpt2),
    Arch("bert", _TF, f"BertModel, {_SMALL}, 32 tokens", bert),
    Arch("roberta", _TF, f"RobertaModel, {_SMALL}, 32 tokens", roberta),
    Arch("t5", _TF, f"T5Model, {_SMALL} (enc + dec), 32 + 16 tokens", t5),
    Arch("bart", _TF, f"BartModel, {_SMALL} (enc + dec), 32 tokens", bart),
    Arch("llama", _TF, f"LlamaForCausalLM, {_SMALL}, 32 tokens", llama),
    Arch("mistral", _TF, f"MistralForCausalLM, {_SMALL}, 32 tokens", mistral),
    Arch("qwen2", _TF, f"Qwen2ForCausalLM, {_SMALL}, 32 tokens", qwen2),
    Arch("phi", _TF, f"PhiForCausalLM, {_SMALL}, 32 tokens", phi),
    Arch("vit", _TF, f"ViTModel, {_SMALL}, 32 px / 8 px patches", vit_hf),
    Arch("clip-text", _TF, f"CLIPTextModel, {_SMALL}, 32 tokens", clip_text),
    Arch("clip-vision", _TF, f"CLIPVisionModel, {_SMALL}, 32 px / 8 px patches", clip_vision),
    Arch("whisper-encoder", _TF, f"WhisperEncoder, {_SMALL}, 80 mels x 64 frames", whisper_encoder),
    Arch(
        "timm-vit",
        "timm",
        f"vit_tiny_patch16_224, dim {HIDDEN}, depth {LAYERS}, 32 px / 8 px",
        timm_vit,
    ),
    Arch(
        "timm-deit",
        "timm",
        f"deit_tiny_patch16_224, dim {HIDDEN}, depth {LAYERS}, 32 px / 8 px",
        timm_deit,
    ),
    Arch(
        "timm-mixer",
        "timm",
        f"MlpMixer (mixer_s16_224's class), dim {HIDDEN}, {LAYERS} blocks, 64 px / 4 px",
        timm_mixer,
    ),
    Arch(
        "timm-resmlp",
        "timm",
        f"MlpMixer with ResBlock/Affine (resmlp_12_224's), dim {HIDDEN}, depth {LAYERS}, 64 px / 4 px",
        timm_resmlp,
    ),
    Arch(
        "timm-swin",
        "timm",
        f"swin_tiny_patch4_window7_224, dim {HIDDEN}, depths (1, 1), window 4, 32 px",
        timm_swin,
    ),
    Arch(
        "timm-convnext",
        "timm",
        f"convnext_tiny, dims ({HIDDEN}, {HIDDEN}, {2 * HIDDEN}, {2 * HIDDEN}), depths 1 each, 32 px",
        timm_convnext,
    ),
    Arch(
        "timm-beit",
        "timm",
        f"beit_base_patch16_224, dim {HIDDEN}, depth {LAYERS}, 32 px / 8 px",
        timm_beit,
    ),
    Arch(
        "tv-vit_b_16",
        "torchvision",
        f"VisionTransformer (vit_b_16's class), small config: dim {HIDDEN}, MLP {MLP}, {LAYERS} layers, 32 px / 8 px",
        tv_vit_b_16,
    ),
    Arch(
        "tv-swin_t",
        "torchvision",
        f"SwinTransformer (swin_t's class), small config: dim {HIDDEN}, depths [1, 1], window 4, 32 px",
        tv_swin_t,
    ),
    Arch(
        "tv-maxvit_t",
        "torchvision",
        f"MaxVit (maxvit_t's class), small config: channels [{HIDDEN}, {2 * HIDDEN}], 1 layer each, 64 px",
        tv_maxvit_t,
    ),
]
BY_NAME = {a.name: a for a in ARCHS}
