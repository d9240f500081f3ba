"""The sparsity policy: which GEMMs may be sparsified and how density is handed out.

A :class:`Policy` is plain data (YAML-friendly) with documented defaults:

* ``types``: per :class:`~pxcompile.schema.LayerType`, whether it is ``eligible`` and its
  density ``floor`` and ``ceiling``. By default MLPs, attention projections, token mixing and
  other weight GEMMs are eligible, and attention's activation GEMMs from ``attention_min_seq``
  tokens on (ceiling 0.25); embeddings and heads stay dense.
* ``rules``: ordered name rules that override the type's settings for matching GEMMs; the
  last matching rule wins per field. ``match`` is an exact name, a glob (``*mlp*``) or a
  regular expression with the prefix ``re:`` (``re:.*attn.*``, matched against the full name).
* ``min_blocks``: a GEMM with fewer hardware blocks than this on a side stays dense (too small
  to pay for itself).
* ``size_exponent``: within a type, the target density follows ``size ** -size_exponent``
  (size = in x out), so bigger GEMMs get lower (never higher) densities than smaller ones.
* ``lowrank_share``: the largest share of a layer's density given to the low-rank term
  (``rank: auto``), or ``rank``: a fixed rank for every sparse layer.
* ``max_pattern_block``: the largest pattern block, in hardware blocks (pattern blocks are
  power-of-two multiples of the hardware block).
* ``attention_min_seq``: attention's activation GEMMs (``attn_scores``, ``attn_values``) are
  eligible only at this many tokens or more; below it dense attention (a fused SDPA kernel) is
  faster (measured: ``benchmarks/RESULTS.md``, "Attention"). ``attention_block`` (tokens per
  sequence block) and ``attention_globals`` (global blocks) fix the rest of the attention
  pattern; the mapping pass picks its butterfly factors.
* ``pad``: ``auto`` (default) lets the mapping pass lay a pattern on a zero-padded weight
  when no pattern fits the layer's own sides (196 tokens -> 224, say), where the cost model
  predicts the padded layer faster than dense; ``never`` keeps such layers dense. Name rules
  may set ``pad`` for the GEMMs they match.
* ``min_speedup``: a pattern is chosen only where the cost model predicts it more than this
  many times faster than dense (default 1: never slower than dense; 0: plan by density alone,
  e.g. to study accuracy on models too small to be faster).
* ``cost_model``: how the mapping pass prices patterns: ``calibrated-cpu`` (the default),
  ``flops+blocks``, another registered name, or a cost-model file written by
  ``pxcompile calibrate -o FILE`` (a relative path is relative to the policy file).
  ``--cost-model`` overrides it.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import PolicyError
from .schema import Gemm, LayerType

#: Sequence length from which Pixelfly attention beats dense SDPA on the project's CPU
#: (benchmarks/bench_attention.py; benchmarks/RESULTS.md, "Attention").
DEFAULT_ATTENTION_MIN_SEQ: int = 2048
#: Default density ceiling of attention's scores/values GEMMs.
ATTENTION_CEILING: float = 0.25
#: Values of the policy's ``pad`` (and of a name rule's).
PAD_MODES: tuple[str, ...] = ("auto", "never")


@dataclass(frozen=True)
class TypeRule:
    eligible: bool
    floor: float = 0.05
    ceiling: float = 0.9


@dataclass(frozen=True)
class NameRule:
    """Overrides for GEMMs whose name matches ``match``."""

    match: str
    dense: bool | None = None  # True: keep dense; False: eligible whatever its type
    floor: float | None = None
    ceiling: float | None = None
    density: float | None = None  # pin the target density (skips the allocator)
    rank: int | None = None
    pad: str | None = None  # "auto" or "never"

    def matches(self, name: str) -> bool:
        if self.match.startswith("re:"):
            return re.fullmatch(self.match[3:], name) is not None
        if any(c in self.match for c in "*?["):
            return fnmatch.fnmatchcase(name, self.match)
        return name == self.match


def _default_types() -> dict[LayerType, TypeRule]:
    eligible = {LayerType.MLP, LayerType.ATTN_PROJ, LayerType.TOKEN_MIX, LayerType.OTHER}
    rules = {t: TypeRule(eligible=t in eligible) for t in LayerType}
    # Above about a quarter of the score blocks, Pixelfly attention stops beating the fused
    # dense SDPA kernel on CPU (benchmarks/RESULTS.md, "Attention"): cap attention there.
    for t in (LayerType.ATTN_SCORES, LayerType.ATTN_VALUES):
        rules[t] = TypeRule(eligible=True, ceiling=ATTENTION_CEILING)
    return rules


@dataclass(frozen=True)
class Resolved:
    """The policy's settings for one GEMM, with the reason it is dense if it is."""

    dense_reason: str | None
    floor: float
    ceiling: float
    pinned: float | None
    rank: int | None
    pad: bool = False  # the mapping pass may offer padded patterns


@dataclass(frozen=True)
class Policy:
    types: dict[LayerType, TypeRule] = field(default_factory=_default_types)
    rules: tuple[NameRule, ...] = ()
    min_blocks: int = 4
    size_exponent: float = 0.25
    lowrank_share: float = 0.15
    rank: int | None = None  # None = auto (up to lowrank_share of the density)
    rank_multiple: int = 8
    max_pattern_block: int = 4
    attention_min_seq: int = DEFAULT_ATTENTION_MIN_SEQ
    attention_block: int = 64
    attention_globals: int = 1
    pad: str = "auto"  # "auto": pad where a padded pattern is predicted faster; "never"
    cost_model: str | None = None  # a cost model's name or file; None: calibrated-cpu
    min_speedup: float | None = None  # None: mapping.MIN_SPEEDUP (1.0, never slower than dense)

    def __post_init__(self) -> None:
        for t, r in self.types.items():
            _check_range(f"types.{t.value}.floor", r.floor)
            _check_range(f"types.{t.value}.ceiling", r.ceiling)
            if r.floor > r.ceiling:
                raise PolicyError(f"policy: types.{t.value}: floor {r.floor} > ceiling {r.ceiling}")
        for i, rule in enumerate(self.rules):
            for k in ("floor", "ceiling", "density"):
                v = getattr(rule, k)
                if v is not None:
                    _check_range(f"rules[{i}] ({rule.match}).{k}", v)
            if rule.rank is not None and rule.rank < 0:
                raise PolicyError(
                    f"policy: rules[{i}] ({rule.match}).rank must be >= 0, got {rule.rank}"
                )
            if rule.pad is not None and rule.pad not in PAD_MODES:
                raise PolicyError(
                    f"policy: rules[{i}] ({rule.match}).pad must be auto or never, got {rule.pad!r}"
                )
            if rule.match.startswith("re:"):
                try:
                    re.compile(rule.match[3:])
                except re.error as e:
                    raise PolicyError(f"policy: rules[{i}]: bad regular expression: {e}") from None
        if self.min_blocks < 1:
            raise PolicyError(f"policy: 'min_blocks' must be >= 1, got {self.min_blocks}")
        if not 0 <= self.size_exponent <= 4:
            raise PolicyError(
                f"policy: 'size_exponent' must be in [0, 4], got {self.size_exponent}"
            )
        if not 0 <= self.lowrank_share < 1:
            raise PolicyError(
                f"policy: 'lowrank_share' must be in [0, 1), got {self.lowrank_share}"
            )
        if self.rank is not None and self.rank < 0:
            raise PolicyError(f"policy: 'rank' must be >= 0, got {self.rank}")
        if self.rank_multiple < 1:
            raise PolicyError(f"policy: 'rank_multiple' must be >= 1, got {self.rank_multiple}")
        mpb = self.max_pattern_block
        if mpb < 1 or mpb & (mpb - 1):
            raise PolicyError(f"policy: 'max_pattern_block' must be a power of two, got {mpb}")
        if self.attention_min_seq < 1:
            raise PolicyError(
                f"policy: 'attention_min_seq' must be >= 1, got {self.attention_min_seq}"
            )
        if self.attention_block < 1:
            raise PolicyError(f"policy: 'attention_block' must be >= 1, got {self.attention_block}")
        if self.attention_globals < 0:
            raise PolicyError(
                f"policy: 'attention_globals' must be >= 0, got {self.attention_globals}"
            )
        if self.pad not in PAD_MODES:
            raise PolicyError(f"policy: 'pad' must be auto or never, got {self.pad!r}")
        if self.min_speedup is not None and not 0 <= self.min_speedup <= 100:
            raise PolicyError(f"policy: 'min_speedup' must be in [0, 100], got {self.min_speedup}")
        cm = self.cost_model
        if cm is not None and (not isinstance(cm, str) or not cm or not cm.isprintable()):
            raise PolicyError(
                f"policy: 'cost_model' must be a cost model's name or a file, got {cm!r}"
            )

    # -- resolution -----------------------------------------------------------------------
    def resolve(self, gemm: Gemm, block: int) -> Resolved:
        """The settings that apply to ``gemm``: type defaults, then name rules in order."""
        tr = self.types[gemm.type]
        eligible: bool = tr.eligible
        why = None if eligible else f"type {gemm.type.value} stays dense (policy)"
        floor, ceiling = tr.floor, tr.ceiling
        pinned: float | None = None
        rank = self.rank
        pad = self.pad
        for rule in self.rules:
            if not rule.matches(gemm.name):
                continue
            if rule.dense is not None:
                eligible = not rule.dense
                why = None if eligible else f"kept dense by rule {rule.match!r}"
            floor = rule.floor if rule.floor is not None else floor
            ceiling = rule.ceiling if rule.ceiling is not None else ceiling
            pinned = rule.density if rule.density is not None else pinned
            rank = rule.rank if rule.rank is not None else rank
            pad = rule.pad if rule.pad is not None else pad
        if eligible:
            if gemm.shared_with:
                why = f"weight shared with {gemm.shared_with}"
            elif not gemm.has_weight:
                if gemm.seq is None:
                    why = "attention GEMM of unknown sequence length"
                elif gemm.seq < self.attention_min_seq:
                    why = (
                        f"sequence {gemm.seq} is under attention_min_seq "
                        f"{self.attention_min_seq} (dense attention is faster there)"
                    )
            else:
                small = min(gemm.in_features, gemm.out_features)
                if small < self.min_blocks * block:
                    why = f"under {self.min_blocks} blocks of {block} on a side"
                elif pad != "auto":
                    for side, size in (("in", gemm.in_features), ("out", gemm.out_features)):
                        if size % block:
                            why = f"'{side}'={size} is not a multiple of block {block}"
                            break
        return Resolved(why, floor, max(floor, ceiling), pinned, rank, pad == "auto")

    # -- plain data -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "types": {
                t.value: {"eligible": r.eligible, "floor": r.floor, "ceiling": r.ceiling}
                for t, r in self.types.items()
            },
            "rules": [{k: v for k, v in vars(r).items() if v is not None} for r in self.rules],
            "min_blocks": self.min_blocks,
            "size_exponent": self.size_exponent,
            "lowrank_share": self.lowrank_share,
            "rank": "auto" if self.rank is None else self.rank,
            "rank_multiple": self.rank_multiple,
            "max_pattern_block": self.max_pattern_block,
            "attention_min_seq": self.attention_min_seq,
            "attention_block": self.attention_block,
            "attention_globals": self.attention_globals,
            "pad": self.pad,
            **({"cost_model": self.cost_model} if self.cost_model else {}),
            **({"min_speedup": self.min_speedup} if self.min_speedup is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "policy", base: Policy | None = None) -> Policy:
        """Build a policy from (partial) plain data on top of ``base`` (default: defaults)."""
        base = base or cls()
        if data is None:
            return base
        if not isinstance(data, dict):
            raise PolicyError(f"{source}: expected a mapping")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PolicyError(f"{source}: unknown key {sorted(unknown)[0]!r}")
        kw: dict[str, Any] = {}
        if "types" in data:
            types = dict(base.types)
            if not isinstance(data["types"], dict):
                raise PolicyError(f"{source}: 'types' must be a mapping")
            for name, val in data["types"].items():
                try:
                    t = LayerType(name)
                except ValueError:
                    raise PolicyError(f"{source}: types: unknown layer type {name!r}") from None
                if not isinstance(val, dict) or set(val) - {"eligible", "floor", "ceiling"}:
                    raise PolicyError(
                        f"{source}: types.{name}: expected keys eligible, floor, ceiling"
                    )
                cur = types[t]
                types[t] = TypeRule(
                    eligible=_bool(
                        val.get("eligible", cur.eligible), f"{source}: types.{name}.eligible"
                    ),
                    floor=_num(val.get("floor", cur.floor), f"{source}: types.{name}.floor"),
                    ceiling=_num(
                        val.get("ceiling", cur.ceiling), f"{source}: types.{name}.ceiling"
                    ),
                )
            kw["types"] = types
        if "rules" in data:
            raw = data["rules"]
            if not isinstance(raw, list):
                raise PolicyError(f"{source}: 'rules' must be a list")
            kw["rules"] = base.rules + tuple(
                _name_rule(r, f"{source}: rules[{i}]") for i, r in enumerate(raw)
            )
        for k in (
            "min_blocks",
            "rank_multiple",
            "max_pattern_block",
            "attention_min_seq",
            "attention_block",
            "attention_globals",
        ):
            if k in data:
                kw[k] = _int(data[k], f"{source}: {k}")
        for k in ("size_exponent", "lowrank_share", "min_speedup"):
            if k in data:
                kw[k] = _num(data[k], f"{source}: {k}")
        if "pad" in data:
            kw["pad"] = _pad(data["pad"], f"{source}: pad")
        if "cost_model" in data:
            cm = data["cost_model"]
            if cm is not None and not isinstance(cm, str):
                raise PolicyError(f"{source}: cost_model: expected a name or a file, got {cm!r}")
            kw["cost_model"] = cm
        if "rank" in data:
            kw["rank"] = (
                None if data["rank"] in ("auto", None) else _int(data["rank"], f"{source}: rank")
            )
        try:
            return replace(base, **kw)
        except PolicyError as e:
            raise PolicyError(f"{source}: {str(e).removeprefix('policy: ')}") from None

    @classmethod
    def load(cls, path: str | Path, base: Policy | None = None) -> Policy:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise PolicyError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise PolicyError(f"{path}: cannot read ({type(e).__name__})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PolicyError(f"{path}: invalid YAML ({getattr(e, 'problem', e)})") from None
        pol = cls.from_dict(data, str(path), base)
        cm = data.get("cost_model") if isinstance(data, dict) else None
        if cm and not Path(cm).is_absolute() and (Path(path).parent / cm).is_file():
            pol = replace(pol, cost_model=str(Path(path).parent / cm))  # beside the policy
        return pol

    def with_overrides(self, assignments: list[str]) -> Policy:
        """Apply ``key=value`` overrides, e.g. ``types.attn_proj.eligible=false``,
        ``size_exponent=0.5``, ``rank=32``."""
        pol = self
        for a in assignments:
            if "=" not in a:
                raise PolicyError(f"--set {a!r}: expected KEY=VALUE")
            key, val = a.split("=", 1)
            try:
                value = yaml.safe_load(val)
            except yaml.YAMLError as e:
                problem = getattr(e, "problem", None) or "invalid YAML"
                raise PolicyError(f"--set {a}: invalid value ({problem})") from None
            parts = key.strip().split(".")
            data: Any = value
            for p in reversed(parts):
                data = {p: data}
            pol = Policy.from_dict(data, f"--set {a}", pol)
        return pol

    def with_dense(self, patterns: list[str]) -> Policy:
        return replace(self, rules=self.rules + tuple(NameRule(p, dense=True) for p in patterns))


def _check_range(what: str, v: float) -> None:
    if not 0 < v <= 1:
        raise PolicyError(f"policy: {what} must be in (0, 1], got {v}")


def _num(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise PolicyError(f"{where}: expected a number, got {v!r}")
    return float(v)


def _int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise PolicyError(f"{where}: expected an integer, got {v!r}")
    return v


def _pad(v: Any, where: str) -> str:
    if v not in PAD_MODES:
        raise PolicyError(f"{where}: expected auto or never, got {v!r}")
    return v


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise PolicyError(f"{where}: expected true or false, got {v!r}")
    return v


def _name_rule(r: Any, where: str) -> NameRule:
    if not isinstance(r, dict) or "match" not in r:
        raise PolicyError(f"{where}: expected a mapping with 'match'")
    allowed = {"match", "dense", "floor", "ceiling", "density", "rank", "pad"}
    unknown = set(r) - allowed
    if unknown:
        raise PolicyError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    if not isinstance(r["match"], str) or not r["match"]:
        raise PolicyError(f"{where}: 'match' must be a non-empty string")
    return NameRule(
        match=r["match"],
        dense=_bool(r["dense"], f"{where}.dense") if "dense" in r else None,
        floor=_num(r["floor"], f"{where}.floor") if "floor" in r else None,
        ceiling=_num(r["ceiling"], f"{where}.ceiling") if "ceiling" in r else None,
        density=_num(r["density"], f"{where}.density") if "density" in r else None,
        rank=_int(r["rank"], f"{where}.rank") if "rank" in r else None,
        pad=_pad(r["pad"], f"{where}.pad") if "pad" in r else None,
    )
