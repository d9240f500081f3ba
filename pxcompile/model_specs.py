"""Models named by a spec instead of a model file, built without their weights.

    hf:PATH              a Hugging Face config.json (PATH: the file or its directory)
    timm:NAME            a model timm ships (``timm.create_model(NAME, pretrained=False)``)
    torchvision:NAME     a model torchvision ships (``get_model(NAME, weights=None)``)

Each is built on the ``meta`` device: parameters have shapes and no values, so a 7B model
takes no memory and nothing is downloaded. Its example inputs come from the config: token ids
of the model's context length (at most :data:`MAX_SEQ`) for text models, one image of the
model's default size for vision models. Options after the name, comma separated, change
them: ``hf:llama,seq=2048,batch=8``, ``timm:vit_base_patch16_224,batch=16``,
``torchvision:resnet50,size=160``.

Such a model can be traced and planned (its schema is the same as the model's with weights);
anything that runs it for its values (rewrite, verification, ``bench``, ``check``, ``-o``)
needs the real weights: :func:`require_weights` says so in one line.
"""

from __future__ import annotations

import difflib
import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PxError

if TYPE_CHECKING:  # torch is imported when a model is built, not to read a spec
    import torch
    from torch import nn

KINDS = ("hf", "timm", "torchvision")
MAX_SEQ = 4096  # default sequence length: the model's context, capped
DEFAULT_SEQ = 1024  # when the config names no context length
DEFAULT_IMAGE = 224
OPTIONS = ("batch", "seq", "size")  # ,key=N after a spec
_OPTION_RE = re.compile(r"(?:,(?:" + "|".join(OPTIONS) + r")=[^,]*)+$")
_MAX_CONFIG_BYTES = 1 << 20
# Building a model of N layers (even on meta) costs Python objects per layer: a config from a
# stranger must not ask for a million. The deepest published models have about 128 layers.
MAX_CONFIG_LAYERS = 1024
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")


@dataclass
class ModelSpec:
    """A parsed spec: ``kind:name`` and its options."""

    kind: str
    name: str
    options: dict[str, int] = field(default_factory=dict)
    text: str = ""

    @property
    def label(self) -> str:
        """A short name for reports: the config's directory, or the model name."""
        if self.kind == "hf":
            p = Path(self.name)
            if p.name == "config.json":
                return p.resolve().parent.name
            return p.stem if p.is_file() else p.resolve().name
        return self.name


def is_model_spec(source: str | Path) -> bool:
    """Whether ``source`` names a model by spec (``hf:``, ``timm:``, ``torchvision:``)."""
    return isinstance(source, str) and source.split(":", 1)[0] in KINDS and ":" in source


def parse_spec(source: str) -> ModelSpec:
    """``kind:NAME[,key=value...]`` as a :class:`ModelSpec`; a bad one is a one-line error."""
    kind, _, rest = source.partition(":")
    if kind not in KINDS:
        raise PxError(f"{source}: not a model spec (hf:PATH, timm:NAME or torchvision:NAME)")
    m = _OPTION_RE.search(rest)
    name, opts = (rest[: m.start()], rest[m.start() + 1 :]) if m else (rest, "")
    if not name:
        raise PxError(f"{source}: give a {'path' if kind == 'hf' else 'model name'} after {kind}:")
    options: dict[str, int] = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        if not value.isdigit() or int(value) < 1:
            raise PxError(f"{source}: {key} must be a positive integer, got {value!r}")
        options[key] = int(value)
    if "seq" in options and kind != "hf":
        raise PxError(f"{source}: seq applies to hf: text models; use size= for images")
    return ModelSpec(kind, name, options, source)


def build_model(source: str) -> tuple[nn.Module, Any]:
    """The model ``source`` names, built on the meta device in eval mode, and its example
    inputs (meta tensors)."""
    spec = parse_spec(source)
    build = {"hf": _build_hf, "timm": _build_timm, "torchvision": _build_torchvision}[spec.kind]
    return build(spec)


def load_model(
    source: str, model_name: str = "model", inputs_name: str = "example_inputs"
) -> tuple[nn.Module, Any]:
    """``(model, example_inputs)`` from a spec or a model file (see :mod:`.modelfile`)."""
    if is_model_spec(source):
        return build_model(source)
    from .modelfile import load_model_file

    return load_model_file(source, model_name, inputs_name)


def source_name(source: str) -> str:
    """The name a schema of ``source`` gets: the config's directory, the model's name, or
    the model file's stem."""
    if is_model_spec(source):
        return parse_spec(source).label
    return Path(source).stem


def source_files(source: str) -> list[str]:
    """The files ``source`` reads (outputs must not overwrite them)."""
    if is_model_spec(source):
        spec = parse_spec(source)
        return [str(_config_path(spec))] if spec.kind == "hf" else []
    return [source]


def weights_needed(source: str, what: str) -> PxError:
    """The one-line error for ``what`` (``bench``, ``-o``...) on a model built without its
    weights, with what to do instead."""
    return PxError(
        f"{what} needs the model's weights, and {source} was built without them (meta "
        "device): plan it (--plan-out plan.yaml, or pxcompile.plan), then apply that plan to "
        "the model with its weights (pxcompile MODEL.py --plan plan.yaml, or "
        "pxcompile.sparsify(model, plan='plan.yaml'))"
    )


def require_weights(model: nn.Module, source: str, what: str) -> None:
    """Raise :func:`weights_needed` when ``model`` was built without weights (every tensor on
    the meta device): ``what`` runs it for its values."""
    from .passes.trace.repeats import is_meta_model

    if is_meta_model(model):
        raise weights_needed(source, what)


# ---------------------------------------------------------------------------------------
# Hugging Face
# ---------------------------------------------------------------------------------------
def _config_path(spec: ModelSpec) -> Path:
    p = Path(spec.name)
    return p / "config.json" if p.is_dir() else p


def _read_config(spec: ModelSpec) -> dict:
    path = _config_path(spec)
    where = f"hf:{spec.name}"
    if not path.is_file():
        if Path(spec.name).is_dir():
            raise PxError(f"{where}: no config.json in {spec.name}")
        raise PxError(f"{where}: no such file or directory")
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise PxError(f"{where}: {path} is larger than a config ({_MAX_CONFIG_BYTES:,} bytes)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PxError(f"{where}: {path} is not JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise PxError(
            f"{where}: {path} is not a Hugging Face config (no model_type): give the "
            "config.json of a transformers model"
        )
    _check_layer_counts(data, f"{where}: {path}")
    return data


def _check_layer_counts(data: dict, where: str, prefix: str = "") -> None:
    """A layer count (an int under a key naming layers, nested configs included) above
    MAX_CONFIG_LAYERS is a one-line error, before anything is built."""
    for key, value in data.items():
        if isinstance(value, dict):
            _check_layer_counts(value, where, f"{prefix}{key}.")
        elif (
            "layer" in str(key)
            and isinstance(value, int)
            and not isinstance(value, bool)
            and value > MAX_CONFIG_LAYERS
        ):
            raise PxError(
                f"{where}: {prefix}{key} = {value:,} layers is more than {MAX_CONFIG_LAYERS:,}"
            )


def _hf_config(spec: ModelSpec) -> Any:
    from .hf import config_from_header, read_hf_header

    data = _read_config(spec)
    path = str(_config_path(spec))
    try:
        import transformers  # noqa: F401
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:
        raise PxError("hf: specs need transformers: pip install transformers") from None
    model_type = data["model_type"]
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise PxError(
            f"hf:{spec.name}: model_type {model_type!r} is not one transformers "
            f"{transformers.__version__} knows{hint}"
        )
    info = read_hf_header({"hf": {"config": data, "model_type": model_type}}, path)
    return config_from_header(info, path)  # type: ignore[arg-type]


def _hf_class(config: Any, spec: ModelSpec) -> Any:
    import transformers
    from transformers.models.auto import modeling_auto as auto

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, str(arch), None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    for mapping in (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, auto.MODEL_MAPPING_NAMES):
        name = mapping.get(config.model_type)
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if cls is not None:
            return cls
    raise PxError(f"hf:{spec.name}: transformers has no model class for {config.model_type!r}")


def _context(config: Any) -> int | None:
    for cfg in (config, getattr(config, "text_config", None)):
        for key in _CONTEXT_KEYS:
            v = getattr(cfg, key, None) if cfg is not None else None
            if isinstance(v, int) and v > 0:
                return v
    return None


def _build_hf(spec: ModelSpec) -> tuple[nn.Module, Any]:
    import torch
    from transformers.utils import logging as hf_logging

    config = _hf_config(spec)
    cls = _hf_class(config, spec)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # ids a config names outside its vocabulary, etc.
    try:
        with torch.device("meta"):
            model = cls(config)
    except Exception as e:  # noqa: BLE001 - a config transformers can't build from
        raise PxError(f"hf:{spec.name}: {cls.__name__} cannot be built from it: {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    batch = spec.options.get("batch", 1)
    main = getattr(model, "main_input_name", "input_ids")
    if main == "input_ids":
        seq = spec.options.get("seq") or min(_context(config) or DEFAULT_SEQ, MAX_SEQ)
        ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
        inputs = {"input_ids": ids}
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = ids
        return model, inputs
    if main == "pixel_values":
        vision = getattr(config, "vision_config", None) or config
        size = spec.options.get("size") or getattr(vision, "image_size", None)
        if isinstance(size, list | tuple):
            size = size[0]
        chans = getattr(vision, "num_channels", 3)
        if not isinstance(size, int):
            raise PxError(f"hf:{spec.name}: the config gives no image_size: add ,size=N")
        x = torch.zeros(batch, chans, size, size, device="meta")
        return model, {"pixel_values": x}
    raise PxError(
        f"hf:{spec.name}: no example inputs for a model whose main input is {main!r}: "
        "write a model file (model + example_inputs)"
    )


# ---------------------------------------------------------------------------------------
# timm and torchvision
# ---------------------------------------------------------------------------------------
def _unknown(kind: str, name: str, known: list[str]) -> PxError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return PxError(f"{kind}:{name}: no such model{hint}")


def _image(spec: ModelSpec, size: int, chans: int = 3) -> torch.Tensor:
    import torch

    batch = spec.options.get("batch", 1)
    size = spec.options.get("size", size)
    return torch.zeros(batch, chans, size, size, device="meta")


def _build_timm(spec: ModelSpec) -> tuple[nn.Module, Any]:
    import torch

    try:
        import timm
    except ImportError:
        raise PxError("timm: specs need timm: pip install timm") from None
    if not timm.is_model(spec.name.split(".", 1)[0]):
        raise _unknown("timm", spec.name, timm.list_models())
    try:
        with torch.device("meta"):
            model = timm.create_model(spec.name, pretrained=False)
    except Exception as e:  # noqa: BLE001
        raise PxError(f"timm:{spec.name}: cannot be built: {e}") from None
    model.eval()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans, h, _w = tuple(cfg.get("input_size", (3, DEFAULT_IMAGE, DEFAULT_IMAGE)))
    return model, (_image(spec, int(h), int(chans)),)


def _build_torchvision(spec: ModelSpec) -> tuple[nn.Module, Any]:
    import torch

    try:
        import torchvision.models as tvm
    except ImportError:
        raise PxError("torchvision: specs need torchvision: pip install torchvision") from None
    import torchvision.models.segmentation as seg
    import torchvision.models.video as video

    name = spec.name
    if name not in tvm.list_models():
        raise _unknown("torchvision", name, tvm.list_models())
    families = (tvm.list_models(module=m) for m in (tvm, seg, video))
    if not any(name in f for f in families):
        raise PxError(
            f"torchvision:{name}: only image classification, segmentation and video models "
            "take one tensor: write a model file (model + example_inputs) for this one"
        )
    kwargs: dict[str, Any] = {"weights": None}
    if "weights_backbone" in inspect.signature(tvm.get_model_builder(name)).parameters:
        kwargs["weights_backbone"] = None  # never fetched: nothing is downloaded
    try:
        with torch.device("meta"):
            model = tvm.get_model(name, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise PxError(f"torchvision:{name}: cannot be built: {e}") from None
    model.eval()
    if name in tvm.list_models(module=video):
        frames = torch.zeros(spec.options.get("batch", 1), 3, 16, 112, 112, device="meta")
        return model, (frames,)
    size = getattr(model, "image_size", None)
    return model, (_image(spec, size if isinstance(size, int) else DEFAULT_IMAGE),)


__all__ = [
    "KINDS",
    "ModelSpec",
    "build_model",
    "is_model_spec",
    "load_model",
    "parse_spec",
    "require_weights",
    "source_files",
    "source_name",
    "weights_needed",
]
