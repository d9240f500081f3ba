"""The model schema: a model seen as the list of its GEMMs (the compiler's IR).

A :class:`Gemm` is one matrix multiply of a forward pass: ``rows x in`` times ``in x out``.
Weight GEMMs (linear layers, embeddings used as a head, ...) multiply activations by a
parameter; activation GEMMs (attention scores ``Q K^T`` and values ``A V``) multiply two
activations. The schema is plain data: it round-trips through YAML (with a ``version``) and
is what the trace pass emits and the budget pass reads.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import SchemaError

SCHEMA_VERSION = 1

# Largest ``in``, ``out``, ``heads`` and ``seq`` a schema file may give: 2^24 = 16,777,216 is
# far beyond any real layer yet keeps planning fast; ``rows`` and ``calls`` (pure counts,
# batch x tokens x heads) may go to 2^40.
MAX_DIM = 1 << 24
MAX_COUNT = 1 << 40


class LayerType(str, enum.Enum):
    """What a GEMM is for; the policy decides per type what may be sparsified."""

    MLP = "mlp"  # feed-forward / channel-mixing layers
    ATTN_PROJ = "attn_proj"  # Q/K/V/output projections of attention
    TOKEN_MIX = "token_mix"  # MLP-Mixer token-mixing layers (mix along the sequence)
    ATTN_SCORES = "attn_scores"  # Q K^T (activation x activation)
    ATTN_VALUES = "attn_values"  # softmax(QK^T) V (activation x activation)
    EMBEDDING = "embedding"  # patch/token embeddings expressed as a GEMM
    HEAD = "head"  # classifier / LM head
    OTHER = "other"  # any other weight GEMM

    @property
    def is_activation(self) -> bool:
        """True for GEMMs with no weight (both operands are activations)."""
        return self in (LayerType.ATTN_SCORES, LayerType.ATTN_VALUES)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Gemm:
    """One GEMM of a forward pass.

    ``rows`` is the number of rows one call multiplies (tokens x batch; for attention
    GEMMs also x heads), so one call costs ``2 * rows * in_features * out_features`` FLOPs,
    and the forward runs it ``calls`` times.

    Example:
        >>> Gemm("h.0.mlp.c_fc", LayerType.MLP, 768, 3072, rows=1024).flops
        4831838208
    """

    name: str
    type: LayerType
    in_features: int
    out_features: int
    rows: int
    calls: int = 1
    bias: bool = False
    shared_with: str | None = None  # another GEMM (or parameter) holding the same weight
    heads: int | None = None  # attention GEMMs: number of heads folded into rows
    seq: int | None = None  # attention GEMMs: sequence length

    @property
    def flops(self) -> int:
        """Dense FLOPs of one forward (multiply-adds count two)."""
        return 2 * self.rows * self.in_features * self.out_features * self.calls

    @property
    def has_weight(self) -> bool:
        return not self.type.is_activation

    @property
    def params(self) -> int:
        """Dense parameter count of the weight (and bias); 0 for activation GEMMs."""
        if not self.has_weight:
            return 0
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)

    @property
    def shape(self) -> tuple[int, int]:
        """The weight's shape as torch stores it: ``(out, in)``."""
        return (self.out_features, self.in_features)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "type": self.type.value,
            "in": self.in_features,
            "out": self.out_features,
            "rows": self.rows,
        }
        if self.calls != 1:
            d["calls"] = self.calls
        if self.bias:
            d["bias"] = True
        if self.shared_with is not None:
            d["shared_with"] = self.shared_with
        if self.heads is not None:
            d["heads"] = self.heads
        if self.seq is not None:
            d["seq"] = self.seq
        return d


_GEMM_KEYS = {"name", "type", "in", "out", "rows", "calls", "bias", "shared_with", "heads", "seq"}


@dataclass
class ModelSchema:
    """A model as the list of its GEMMs, in forward order.

    Example:
        >>> s = ModelSchema("tiny", [Gemm("fc", LayerType.MLP, 256, 1024, rows=64)])
        >>> ModelSchema.from_yaml(s.to_yaml()) == s
        True
    """

    name: str
    gemms: list[Gemm]
    description: str = ""
    version: int = SCHEMA_VERSION
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for i, g in enumerate(self.gemms):
            if g.name in seen:
                raise SchemaError(f"gemms[{i}] ({g.name}): duplicate name")
            seen.add(g.name)

    def __iter__(self) -> Iterator[Gemm]:
        return iter(self.gemms)

    def __len__(self) -> int:
        return len(self.gemms)

    def __getitem__(self, name: str) -> Gemm:
        for g in self.gemms:
            if g.name == name:
                return g
        raise KeyError(name)

    @property
    def flops(self) -> int:
        return sum(g.flops for g in self.gemms)

    @property
    def weight_gemms(self) -> list[Gemm]:
        return [g for g in self.gemms if g.has_weight]

    def with_rows(self, scale: float) -> ModelSchema:
        """The same schema with every GEMM's rows scaled (e.g. another batch size)."""
        return replace(
            self, gemms=[replace(g, rows=max(1, round(g.rows * scale))) for g in self.gemms]
        )

    # -- YAML ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"version": self.version, "name": self.name}
        if self.description:
            d["description"] = self.description
        if self.meta:
            d["meta"] = dict(self.meta)
        d["gemms"] = [g.to_dict() for g in self.gemms]
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)

    def save(self, path: str | Path) -> None:
        from .io import atomic_write_text

        atomic_write_text(path, self.to_yaml())

    @classmethod
    def from_dict(cls, data: Any, source: str = "<schema>") -> ModelSchema:
        """Build and validate a schema; errors name the source, the entry and the field."""
        if not isinstance(data, dict):
            raise SchemaError(f"{source}: expected a mapping with 'version' and 'gemms'")
        version = data.get("version")
        if type(version) is not int or version != SCHEMA_VERSION:
            raise SchemaError(f"{source}: 'version' must be {SCHEMA_VERSION}, got {version!r}")
        unknown = set(data) - {"version", "name", "description", "meta", "gemms"}
        if unknown:
            raise SchemaError(f"{source}: unknown top-level key {sorted(unknown, key=str)[0]!r}")
        name = data.get("name", Path(source).stem)
        if not isinstance(name, str) or not name:
            raise SchemaError(f"{source}: 'name' must be a non-empty string, got {name!r}")
        raw = data.get("gemms")
        if not isinstance(raw, list) or not raw:
            raise SchemaError(f"{source}: 'gemms' must be a non-empty list")
        meta = data.get("meta") or {}
        if not isinstance(meta, dict):
            raise SchemaError(f"{source}: 'meta' must be a mapping")
        description = data.get("description") or ""
        if not isinstance(description, str):
            raise SchemaError(f"{source}: 'description' must be a string")
        gemms = [_gemm_from_dict(entry, i, source) for i, entry in enumerate(raw)]
        try:
            schema = cls(
                name=name,
                gemms=gemms,
                description=description,
                meta=meta,
            )
        except SchemaError as e:
            raise SchemaError(f"{source}: {e}") from None
        _check_shared(gemms, source)
        return schema

    @classmethod
    def from_yaml(cls, text: str, source: str = "<schema>") -> ModelSchema:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or "invalid YAML"
            raise SchemaError(f"{source}:{where}: {problem}") from None
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | Path) -> ModelSchema:
        p = Path(path)
        try:
            text = p.read_text()
        except FileNotFoundError:
            raise SchemaError(f"{path}: no such file") from None
        except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
            raise SchemaError(f"{path}: cannot read ({type(e).__name__})") from None
        return cls.from_yaml(text, str(path))


def _gemm_from_dict(entry: Any, i: int, source: str) -> Gemm:
    if not isinstance(entry, dict):
        raise SchemaError(f"{source}: gemms[{i}]: expected a mapping, got {type(entry).__name__}")
    name = entry.get("name")
    shown = name if isinstance(name, str) and name.isprintable() else repr(name)
    label = f"gemms[{i}] ({shown})" if isinstance(name, str) and name else f"gemms[{i}]"
    where = f"{source}: {label}"
    if not isinstance(name, str) or not name:
        raise SchemaError(f"{where}: 'name' must be a non-empty string, got {name!r}")
    unknown = set(entry) - _GEMM_KEYS
    if unknown:
        raise SchemaError(f"{where}: unknown field {sorted(unknown, key=str)[0]!r}")
    t = entry.get("type")
    try:
        ltype = LayerType(t)
    except ValueError:
        allowed = ", ".join(x.value for x in LayerType)
        raise SchemaError(f"{where}: 'type' must be one of {allowed}, got {t!r}") from None

    def pos_int(key: str, default: int | None = None, required: bool = True) -> int | None:
        if key not in entry:
            if required and default is None:
                raise SchemaError(f"{where}: '{key}' is missing")
            return default
        v = entry[key]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise SchemaError(f"{where}: '{key}' must be a positive integer, got {v!r}")
        limit = MAX_COUNT if key in ("rows", "calls") else MAX_DIM
        if v > limit:
            raise SchemaError(
                f"{where}: '{key}' must be at most {limit} (2^{limit.bit_length() - 1}), got {v}"
            )
        return v

    bias = entry.get("bias", False)
    if not isinstance(bias, bool):
        raise SchemaError(f"{where}: 'bias' must be true or false, got {bias!r}")
    shared = entry.get("shared_with")
    if "shared_with" in entry and shared is None:
        raise SchemaError(f"{where}: 'shared_with' must be a name, got None")
    if shared is not None and (not isinstance(shared, str) or not shared):
        raise SchemaError(f"{where}: 'shared_with' must be a name, got {shared!r}")
    return Gemm(
        name=name,
        type=ltype,
        in_features=pos_int("in"),  # type: ignore[arg-type]
        out_features=pos_int("out"),  # type: ignore[arg-type]
        rows=pos_int("rows"),  # type: ignore[arg-type]
        calls=pos_int("calls", 1),  # type: ignore[arg-type]
        bias=bias,
        shared_with=shared,
        heads=pos_int("heads", None, required=False),
        seq=pos_int("seq", None, required=False),
    )


def _check_shared(gemms: list[Gemm], source: str) -> None:
    """``shared_with`` names another GEMM with the same weight (or its transpose), or a
    parameter outside the GEMM list (e.g. a token embedding tied to the head)."""
    by_name = {g.name: g for g in gemms}
    for i, g in enumerate(gemms):
        if g.shared_with is None:
            continue
        shown = g.name if g.name.isprintable() else repr(g.name)
        where = f"{source}: gemms[{i}] ({shown}): 'shared_with'"
        if not g.has_weight:
            raise SchemaError(f"{where}: a {g.type.value} GEMM has no weight to share")
        if g.shared_with == g.name:
            raise SchemaError(f"{where} names the GEMM itself")
        other = by_name.get(g.shared_with)
        if other is None:
            continue
        if not other.has_weight:
            raise SchemaError(f"{where}: {other.name} is a {other.type.value} GEMM, with no weight")
        if other.shape not in (g.shape, g.shape[::-1]):
            o, i_ = other.shape
            raise SchemaError(
                f"{where}: {other.name}'s weight is {o}x{i_}, not {g.out_features}x"
                f"{g.in_features} or its transpose"
            )


def total_flops(gemms: Iterable[Gemm]) -> int:
    return sum(g.flops for g in gemms)


def human(n: float) -> str:
    """1234567 -> '1.23M' (for reports)."""
    if n == 0:
        return "0"
    units = ["", "K", "M", "G", "T", "P"]
    k = min(int(math.log10(abs(n)) // 3), len(units) - 1)
    return f"{n / 1000**k:.3g}{units[k]}"
