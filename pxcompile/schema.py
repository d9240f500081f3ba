"""The model schema: a model seen as the list of its GEMMs (the compiler's IR).

A :class:`Gemm` is one matrix multiply of a forward pass: ``rows x in`` times ``in x out``.
Weight GEMMs (linear layers, embeddings used as a head, ...) multiply activations by a
parameter; activation GEMMs (attention scores ``Q K^T`` and values ``A V``) multiply two
activations. The schema is plain data: it round-trips through YAML (with a ``version``) and
is what the trace pass emits and the budget pass reads.

A schema file may also give a block of GEMMs once and repeat it (the compact form):
``{repeat: N, start: S, gemms: [...]}`` in the ``gemms`` list stands for its GEMMs written out
``N`` times with ``{i}`` in their names (and ``shared_with``) replaced by ``S, S+1, ...``.
Loading expands it, so a :class:`ModelSchema` is always the long list; ``to_yaml(compact=True)``
writes the repeated blocks it finds back in that form.
"""

from __future__ import annotations

import enum
import math
import re
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
# Most GEMMs a schema may hold once its repeats are expanded: 2^17 = 131,072 is hundreds of
# times a 7B model's (289) and room for large mixtures of experts, yet a hostile ``repeat``
# can't make a file of a few lines stand for millions of GEMMs.
MAX_GEMMS = 1 << 17
INDEX = "{i}"  # the block index in the names of a repeated block


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
    def to_dict(self, compact: bool = False) -> dict[str, Any]:
        """The schema as plain data; ``compact=True`` writes repeated blocks as ``repeat``
        entries (it loads back to the same schema)."""
        d: dict[str, Any] = {"version": self.version, "name": self.name}
        if self.description:
            d["description"] = self.description
        if self.meta:
            d["meta"] = dict(self.meta)
        entries = [g.to_dict() for g in self.gemms]
        d["gemms"] = compact_entries(entries) if compact else entries
        return d

    def to_yaml(self, compact: bool = False) -> str:
        return yaml.safe_dump(
            self.to_dict(compact), sort_keys=False, default_flow_style=None, width=100
        )

    def save(self, path: str | Path, compact: bool = False) -> None:
        from .io import atomic_write_text

        atomic_write_text(path, self.to_yaml(compact))

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
        gemms, places = _read_gemms(raw, source)
        _check_unique(gemms, places, source)
        schema = cls(name=name, gemms=gemms, description=description, meta=meta)
        _check_shared(gemms, places, source)
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


def _read_gemms(raw: list[Any], source: str) -> tuple[list[Gemm], list[str]]:
    """The GEMMs of a ``gemms`` list, repeats expanded, and where each one was written."""
    repeats = {k: _repeat_fields(e, k, source) for k, e in enumerate(raw) if _is_repeat(e)}
    total = len(raw) - len(repeats) + sum(n * len(t) for n, _, t in repeats.values())
    if total > MAX_GEMMS:
        raise SchemaError(
            f"{source}: 'gemms' expands to {total} GEMMs, more than the {MAX_GEMMS} "
            f"(2^{MAX_GEMMS.bit_length() - 1}) a schema may hold"
        )
    gemms: list[Gemm] = []
    places: list[str] = []
    for k, entry in enumerate(raw):
        if k not in repeats:
            gemms.append(_gemm_from_dict(entry, f"gemms[{k}]", source))
            places.append(f"gemms[{k}]")
            continue
        count, start, templates = repeats[k]
        block = []
        for j, t in enumerate(templates):
            place = f"gemms[{k}].gemms[{j}]"
            if _is_repeat(t):
                raise SchemaError(f"{source}: {place}: a repeated block may not hold a repeat")
            g = _gemm_from_dict(t, place, source)
            if INDEX not in g.name:
                raise SchemaError(
                    f"{source}: {place} ({_shown(g.name)}): 'name' must contain {INDEX} (the "
                    "block index), or the repeated GEMMs would have the same name"
                )
            block.append((place, g))
        for i in range(start, start + count):
            for place, g in block:
                name = g.name.replace(INDEX, str(i))
                shared = g.shared_with
                gemms.append(
                    replace(g, name=name, shared_with=shared and shared.replace(INDEX, str(i)))
                )
                places.append(f"{place}, i={i}")
    return gemms, places


def _is_repeat(entry: Any) -> bool:
    return isinstance(entry, dict) and "repeat" in entry


def _repeat_fields(entry: dict[Any, Any], k: int, source: str) -> tuple[int, int, list[Any]]:
    """``(count, start, templates)`` of the repeat entry ``gemms[k]``, checked."""
    where = f"{source}: gemms[{k}] (repeat)"
    unknown = set(entry) - {"repeat", "start", "gemms"}
    if unknown:
        raise SchemaError(
            f"{where}: unknown field {sorted(unknown, key=str)[0]!r} (a repeat has 'repeat', "
            "'start' and 'gemms')"
        )
    count = entry["repeat"]
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise SchemaError(
            f"{where}: 'repeat' must be a positive integer (how many blocks), got {count!r}"
        )
    if count > MAX_GEMMS:
        raise SchemaError(
            f"{where}: 'repeat' must be at most {MAX_GEMMS} "
            f"(2^{MAX_GEMMS.bit_length() - 1}), got {count}"
        )
    start = entry.get("start", 0)
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= MAX_DIM:
        raise SchemaError(
            f"{where}: 'start' must be an integer from 0 to {MAX_DIM} (the first block's "
            f"index), got {start!r}"
        )
    templates = entry.get("gemms")
    if not isinstance(templates, list) or not templates:
        raise SchemaError(f"{where}: 'gemms' must be a non-empty list (the repeated block)")
    return count, start, templates


def _shown(name: str) -> str:
    return name if name.isprintable() else repr(name)


def _gemm_from_dict(entry: Any, place: str, source: str) -> Gemm:
    if not isinstance(entry, dict):
        raise SchemaError(f"{source}: {place}: expected a mapping, got {type(entry).__name__}")
    name = entry.get("name")
    shown = name if isinstance(name, str) and name.isprintable() else repr(name)
    label = f"{place} ({shown})" if isinstance(name, str) and name else place
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


def _check_unique(gemms: list[Gemm], places: list[str], source: str) -> None:
    first: dict[str, int] = {}
    for k, g in enumerate(gemms):
        if g.name not in first:
            first[g.name] = k
            continue
        where = f"{source}: {places[k]} ({_shown(g.name)}): duplicate name"
        other = places[first[g.name]]
        if ", i=" in places[k] or ", i=" in other:  # say where the other one comes from
            where += f", also {other}"
        raise SchemaError(where)


def _check_shared(gemms: list[Gemm], places: list[str], source: str) -> None:
    """``shared_with`` names another GEMM with the same weight (or its transpose), or a
    parameter outside the GEMM list (e.g. a token embedding tied to the head)."""
    by_name = {g.name: g for g in gemms}
    for i, g in enumerate(gemms):
        if g.shared_with is None:
            continue
        where = f"{source}: {places[i]} ({_shown(g.name)}): 'shared_with'"
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


# -- the compact form's writer ------------------------------------------------------------

# a dotted component of a name that is a block index: "h.0.attn" -> "0" (no leading zeros)
_INDEX_COMPONENT = re.compile(r"(?<![^.])(0|[1-9][0-9]*)(?=\.|$)")


def compact_entries(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``Gemm.to_dict`` entries with each run of repeated blocks written as one ``repeat``.

    A block is the GEMMs under one index of a dotted name (``transformer.h.3.*``); a run is
    two or more blocks in a row that are the same but for that index, counting up by one.
    The longest run found at each position wins (the outermost index on ties). Reading the
    result back gives exactly ``entries``.

    Example:
        >>> e = [{"name": f"h.{i}.fc", "type": "mlp", "in": 2, "out": 2, "rows": 1}
        ...      for i in range(3)]
        >>> compact_entries(e)[0]["repeat"], compact_entries(e)[0]["gemms"][0]["name"]
        (3, 'h.{i}.fc')
    """
    out: list[dict[str, Any]] = []
    p = 0
    while p < len(entries):
        best = _longest_run(entries, p)
        if best is None:
            out.append(entries[p])
            p += 1
            continue
        count, start, block = best
        rep: dict[str, Any] = {"repeat": count}
        if start:
            rep["start"] = start
        rep["gemms"] = block
        out.append(rep)
        p += count * len(block)
    return out


def _longest_run(
    entries: list[dict[str, Any]], p: int
) -> tuple[int, int, list[dict[str, Any]]] | None:
    best: tuple[int, int, list[dict[str, Any]]] | None = None
    name = entries[p]["name"]
    for m in _INDEX_COMPONENT.finditer(name):
        head, start = name[: m.end()], int(m.group(1))
        length = 0
        while p + length < len(entries) and _under(entries[p + length]["name"], head):
            length += 1
        block = entries[p : p + length]
        if any(INDEX in e["name"] or INDEX in e.get("shared_with", "") for e in block):
            continue  # a literal {i} would be read as the index
        templates = [_template(e, head, m.start()) for e in block]
        count = 1
        while start + count <= MAX_DIM and p + (count + 1) * length <= len(entries):
            at = p + count * length
            if any(_instance(t, start + count) != entries[at + j] for j, t in enumerate(templates)):
                break
            count += 1
        if (
            count > 1
            and count <= MAX_GEMMS
            and (best is None or count * length > best[0] * len(best[2]))
        ):
            best = (count, start, templates)
    return best


def _under(name: str, head: str) -> bool:
    return name == head or name.startswith(head + ".")


def _template(entry: dict[str, Any], head: str, at: int) -> dict[str, Any]:
    t = dict(entry)
    t["name"] = entry["name"][:at] + INDEX + entry["name"][len(head) :]
    shared = entry.get("shared_with")
    if isinstance(shared, str) and _under(shared, head):
        t["shared_with"] = shared[:at] + INDEX + shared[len(head) :]
    return t


def _instance(template: dict[str, Any], i: int) -> dict[str, Any]:
    e = dict(template)
    e["name"] = template["name"].replace(INDEX, str(i))
    if "shared_with" in template:
        e["shared_with"] = template["shared_with"].replace(INDEX, str(i))
    return e


def total_flops(gemms: Iterable[Gemm]) -> int:
    return sum(g.flops for g in gemms)


def human(n: float) -> str:
    """1234567 -> '1.23M' (for reports)."""
    if n == 0:
        return "0"
    units = ["", "K", "M", "G", "T", "P"]
    k = min(int(math.log10(abs(n)) // 3), len(units) - 1)
    return f"{n / 1000**k:.3g}{units[k]}"
