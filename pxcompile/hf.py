"""A sparsified Hugging Face model is still a Hugging Face model.

Design: the rewrite emits an ``fx.GraphModule`` for every model. fx can't trace Hugging Face
models, so theirs is a :class:`ModelView`: a GraphModule whose graph calls the rewritten model
(submodule ``model``) and whose unknown public attributes resolve on it. ``gm.generate(...)``
is the wrapped model's own ``generate`` (its sparse layers, its KV cache), ``gm.config``,
``gm.generation_config``, ``gm.device``, ``gm.dtype``, ``gm.main_input_name``, ... are the
wrapped model's. nn.Module's own attributes (``forward``, ``parameters``, ``state_dict``,
``to``, ``train``, ...) stay the GraphModule's, so parameter names start with ``model.``.
``gm.model`` is the wrapped model itself (for Llama, ``gm.model.model`` is its decoder).
``save_pretrained`` / ``push_to_hub`` raise a :class:`~pxcompile.errors.PxError` pointing to
``pxcompile.save``: ``from_pretrained`` can't read a sparse state dict back.

A saved Hugging Face model (``pxcompile.save``) carries its config as JSON (:func:`hf_header`),
and a loaded one rebuilds it (:func:`config_from_header`); a loaded causal LM generates with
:func:`generate`, a small loop without KV cache (each step reruns the whole sequence).

Everything here tells Hugging Face models apart by class names (no transformers import), so
pxcompile works without transformers installed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, NoReturn

import torch
from torch import fx, nn

from .errors import ModelFileError, PxError

__all__ = [
    "LoadedCausalLMMixin",
    "ModelView",
    "config_from_header",
    "generate",
    "hf_header",
    "hf_model_of",
    "import_output_types",
    "is_causal_lm",
    "is_pretrained_model",
    "read_hf_header",
]


class ModelView(fx.GraphModule):
    """A GraphModule whose graph calls one wrapped model, the submodule ``model``, and whose
    public attributes it lacks resolve on that model (``generate``, ``config``, ``device``...).

    ``isinstance(view, fx.GraphModule)`` holds; deep copies are ModelViews too.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Private names stay the GraphModule's: torch probes those with hasattr().
            modules = self.__dict__.get("_modules")
            inner = None if modules is None else modules.get("model")
            if name.startswith("_") or inner is None:
                raise
            try:
                return getattr(inner, name)
            except AttributeError:
                pass
            raise

    def __dir__(self) -> list[str]:
        inner = self.__dict__.get("_modules", {}).get("model")
        extra = {n for n in dir(inner) if not n.startswith("_")} if inner is not None else set()
        return sorted(set(super().__dir__()) | extra)

    def save_pretrained(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise PxError(
            f"save_pretrained: {type(self).__name__} has sparse layers that from_pretrained "
            "can't read back: save it with pxcompile.save(model, path) and load it with "
            "pxcompile.load(path)"
        )

    def push_to_hub(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise PxError(
            f"push_to_hub: {type(self).__name__} has sparse layers that from_pretrained "
            "can't read back: save it with pxcompile.save(model, path)"
        )


def is_pretrained_model(module: Any) -> bool:
    """Is ``module`` a Hugging Face ``PreTrainedModel``?"""
    return any(c.__name__ == "PreTrainedModel" for c in type(module).__mro__)


def hf_model_of(module: nn.Module) -> nn.Module | None:
    """The Hugging Face model ``module`` is, or wraps as its submodule ``model`` (what the
    rewrite emits); None for other modules."""
    if is_pretrained_model(module):
        return module
    inner = module._modules.get("model") if isinstance(module, fx.GraphModule) else None
    return inner if inner is not None and is_pretrained_model(inner) else None


def is_causal_lm(model: nn.Module) -> bool:
    """A decoder-only model that generates (``generate`` without an encoder)."""
    config = getattr(model, "config", None)
    can = getattr(model, "can_generate", None)
    try:
        generates = bool(can()) if callable(can) else False
    except Exception:  # a model's own can_generate that fails: treat it as not generating
        generates = False
    return generates and not getattr(config, "is_encoder_decoder", False)


def hf_header(model: nn.Module) -> dict:
    """What a model file stores about a Hugging Face model: JSON only, never code."""
    config = model.config
    to_json = getattr(config, "to_json_string", None)
    data = json.loads(to_json(use_diff=False)) if callable(to_json) else dict(config.to_dict())
    return {
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", None) or None,
        "main_input_name": str(getattr(model, "main_input_name", "input_ids")),
        "causal_lm": is_causal_lm(model),
        "config": data,
    }


_DTYPE_NAMES = {
    n
    for n in dir(torch)
    if not n.startswith("_") and isinstance(getattr(torch, n, None), torch.dtype)
}


def _check_config(d: Any, path: str, depth: int = 0) -> None:
    """transformers turns a config's ``dtype`` string into ``getattr(torch, dtype)``: only
    dtype names get there. Keys become attributes of the config: no dunder names."""
    if depth > 20:
        raise ModelFileError(f"{path}: corrupt file: the Hugging Face config nests too deep")
    if isinstance(d, dict):
        for k, v in d.items():
            if not isinstance(k, str) or k.startswith("__"):
                raise ModelFileError(f"{path}: corrupt file: config key {str(k)[:40]!r}")
            if k in ("dtype", "torch_dtype") and isinstance(v, str) and v not in _DTYPE_NAMES:
                raise ModelFileError(f"{path}: corrupt file: config {k} {v[:40]!r}")
            _check_config(v, path, depth + 1)
    elif isinstance(d, list):
        for v in d:
            _check_config(v, path, depth + 1)


def read_hf_header(header: dict, path: str) -> dict | None:
    """The file's Hugging Face entry, checked (None for other models)."""
    info = header.get("hf")
    if info is None:
        return None
    if (
        not isinstance(info, dict)
        or not isinstance(info.get("config"), dict)
        or not isinstance(info.get("main_input_name", "input_ids"), str)
        or not isinstance(info.get("model_type"), str | None)
    ):
        raise ModelFileError(f"{path}: corrupt file: bad Hugging Face entry")
    _check_config(info["config"], path)
    return info


def config_from_header(info: dict, path: str) -> Any:
    """The stored config as a transformers config of its ``model_type`` (a plain dict when
    transformers is not installed). Building a config from a dict runs no code from the file:
    the class comes from transformers' own table, by name."""
    data = dict(info["config"])
    try:
        from transformers import PretrainedConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:
        return data
    model_type = info.get("model_type")
    cls = CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else PretrainedConfig
    try:
        return cls.from_dict(data)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ModelFileError(f"{path}: corrupt file: bad Hugging Face config: {e}") from None


def import_output_types() -> None:
    """Register transformers' output classes (``CausalLMOutputWithPast``...) with torch's
    pytree, so that a saved model's outputs can be rebuilt. A no-op without transformers."""
    try:
        import transformers.modeling_outputs  # noqa: F401
    except ImportError:
        pass


LogitsFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


@torch.no_grad()
def generate(
    logits_fn: LogitsFn,
    input_ids: torch.Tensor,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    pad_token_id: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Decode up to ``max_new_tokens`` tokens after ``input_ids`` ``[batch, seq]``; returns the
    prompt and the new tokens, like Hugging Face's ``generate``.

    ``logits_fn(ids, attention_mask)`` gives the logits ``[batch, seq, vocab]`` of a whole
    sequence: there is no KV cache, each step reruns the full sequence. Greedy by default;
    ``do_sample=True`` samples from ``softmax(logits / temperature)``, restricted to the
    ``top_k`` most likely tokens when given (``generator`` for reproducible draws). A row
    that produced ``eos_token_id`` is finished: it gets ``pad_token_id`` (default: the eos
    token) until every row is finished or the budget is spent.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise PxError("generate: input_ids must be a [batch, seq] tensor of token ids")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise PxError(f"generate: max_new_tokens must be an integer, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise PxError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise PxError(f"generate: temperature must be > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise PxError(f"generate: top_k must be a positive integer, got {top_k!r}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise PxError(
            f"generate: attention_mask {tuple(attention_mask.shape)} must have the shape of "
            f"input_ids {tuple(input_ids.shape)}"
        )
    if eos_token_id is None:
        eos = []
    elif isinstance(eos_token_id, int):
        eos = [eos_token_id]
    else:
        eos = [int(e) for e in eos_token_id]
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    ids = input_ids
    mask = attention_mask
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        logits = logits_fn(ids, mask)[:, -1, :].float()
        if do_sample:
            logits = logits / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = logits.softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        ids = torch.cat([ids, nxt[:, None].to(ids.dtype)], dim=1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        if eos:
            done |= torch.isin(nxt, torch.tensor(eos, device=nxt.device))
            if bool(done.all()):
                break
    return ids


class LoadedCausalLMMixin:
    """``generate`` (and ``device``, ``can_generate``) for a Hugging Face causal LM loaded
    from a model file; mixed into :class:`pxcompile.serialize.LoadedModel`, which sets
    ``config``, ``main_input_name``, ``pxcompile_inputs`` (the file's input description) and
    ``pxcompile_dynamic_seq``."""

    config: Any
    main_input_name: str = "input_ids"
    pxcompile_inputs: dict | None = None
    pxcompile_dynamic_seq: bool = False

    def can_generate(self) -> bool:
        return True

    @property
    def device(self) -> torch.device:
        for t in self.parameters():  # type: ignore[attr-defined]
            return t.device
        return torch.device("cpu")

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        eos_token_id: int | list[int] | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        pad_token_id: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Greedy (or sampled) decoding with :func:`pxcompile.hf.generate`: no KV cache, each
        new token reruns the whole sequence through the stored graph. ``eos_token_id`` and
        ``pad_token_id`` default to the stored config's, as Hugging Face's ``generate``.

        A model saved with a fixed sequence length (``pxcompile_dynamic_seq`` false) runs each
        step on the sequence padded on the right to that length (causal: the padding changes
        no earlier logit), so the prompt and the tokens made so far must fit in it."""
        if eos_token_id is None:
            eos_token_id = _config_get(self.config, "eos_token_id")
        if pad_token_id is None:
            pad_token_id = _config_get(self.config, "pad_token_id")
        return generate(
            self._logits,
            input_ids,
            max_new_tokens,
            do_sample,
            eos_token_id,
            attention_mask,
            pad_token_id=pad_token_id,
            temperature=temperature,
            top_k=top_k,
            generator=generator,
        )

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Call the stored graph with the inputs it was saved with, built from ids / mask."""
        spec = self.pxcompile_inputs or {}
        args, kwargs = spec.get("args") or [], spec.get("kwargs") or {}
        n = ids.shape[1]
        if not self.pxcompile_dynamic_seq or not getattr(self, "pxcompile_dynamic_batch", True):
            ids, mask = self._fixed_shape(
                ids, mask, args[0] if args else kwargs.get(self.main_input_name)
            )
        used_mask = False
        if not kwargs and len(args) == 1:
            out = self(ids)  # type: ignore[operator]
        elif not args and self.main_input_name in kwargs:
            call: dict[str, Any] = {}
            for name, s in kwargs.items():
                if name == self.main_input_name:
                    call[name] = ids
                elif name == "attention_mask":
                    call[name] = torch.ones_like(ids) if mask is None else mask
                    used_mask = True
                elif name == "position_ids":
                    call[name] = _position_ids(ids, mask)
                    used_mask = True
                elif isinstance(s, dict) and "value" in s:
                    call[name] = s["value"]  # a constant the graph was exported with
                else:
                    raise PxError(
                        f"generate: the stored model takes {name!r}, which generate can't supply"
                    )
            out = self(**call)  # type: ignore[operator]
        else:
            raise PxError(
                f"generate: the stored model does not take {self.main_input_name!r} as its "
                "input: save it with example_inputs={'input_ids': ...}"
            )
        if mask is not None and not used_mask and not bool(mask.bool().all()):
            raise PxError(
                "generate: the stored model was saved without attention_mask: save it with "
                "attention_mask in example_inputs to generate on padded batches"
            )
        return _logits_of(out)[:, :n]

    def _fixed_shape(
        self, ids: torch.Tensor, mask: torch.Tensor | None, spec: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``ids`` (and ``mask``) padded on the right to the stored fixed sequence length;
        a PxError for what the stored shapes can't take."""
        try:
            batch, length = (int(d) for d in spec["tensor"]["shape"][:2])
        except (TypeError, KeyError, ValueError):
            raise PxError(
                f"generate: the stored model does not describe its {self.main_input_name!r} input"
            ) from None
        if not getattr(self, "pxcompile_dynamic_batch", True) and ids.shape[0] != batch:
            raise PxError(
                f"generate: this model was saved for a fixed batch of {batch}, got {ids.shape[0]}"
            )
        if self.pxcompile_dynamic_seq:
            return ids, mask
        extra = length - ids.shape[1]
        if extra < 0:
            raise PxError(
                f"generate: this model was saved for a fixed length of {length} tokens, which "
                f"prompt and new tokens run past ({ids.shape[1]} tokens in)"
            )
        ids = torch.cat([ids, ids.new_zeros(ids.shape[0], extra)], dim=1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], extra)], dim=1)
        return ids, mask


def _config_get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def _position_ids(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Positions as Hugging Face's generate makes them: padding skipped (left padding)."""
    if mask is None:
        return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def _logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise PxError(f"generate: the stored model returns {type(out).__name__}, not logits")
