"""The Plan: which GEMM gets which pattern, and why. Plain data, written to YAML, edited by
hand, applied again; deciding (the passes) is kept apart from rewriting (the torch side).

Figures in a plan file (densities, FLOPs, the summary) are informational: on load they are
recomputed from the patterns, so an edited plan can never report a density it doesn't have.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .errors import PlanError, PolicyError
from .io import atomic_write_text
from .patterns import AttentionSpec, PatternSpec, block_mask
from .policy import Policy
from .schema import Gemm, LayerType, ModelSchema

PLAN_VERSION = 1
#: The CPU kernels a sparse weight layer can run (:mod:`pxcompile.kernels.cpu`): one matmul
#: per group of cells, or gathered blocks; a plan records the one its cost model priced.
CPU_KERNELS = ("grouped", "gather")
TOLERANCE = 0.02  # the budget is met when achieved is in [budget - TOLERANCE, budget]


@dataclass(frozen=True)
class LayerPlan:
    """What one GEMM gets: a pattern (sparse) or nothing (dense), with the reason.

    Weight GEMMs take a :class:`PatternSpec`; attention's activation GEMMs (scores and values)
    an :class:`AttentionSpec` over sequence blocks.
    """

    gemm: Gemm
    pattern: PatternSpec | AttentionSpec | None
    reason: str
    #: The CPU kernel of a sparse weight layer (one of :data:`CPU_KERNELS`), as the plan's
    #: cost model chose it; None: the layer chooses by the shipped cost model.
    kernel: str | None = None

    @property
    def name(self) -> str:
        return self.gemm.name

    @property
    def sparse(self) -> bool:
        return self.pattern is not None

    @property
    def eligible(self) -> bool:
        """Counted in the budget's denominator: the layers the policy let be sparsified and
        that got a pattern (a layer no pattern fits is dense and says why)."""
        return self.pattern is not None

    @property
    def density(self) -> float:
        """Kept fraction of the GEMM's weight and FLOPs, low-rank included (1 if dense)."""
        p = self.pattern
        if p is None:
            return 1.0
        if isinstance(p, AttentionSpec):
            return p.compute_fraction(self.gemm.seq or 0)
        return p.density(self.gemm.in_features, self.gemm.out_features)

    @property
    def padding(self) -> str:
        """How the weight is padded for its pattern (``'padded in 196->384'``; '' if not)."""
        p = self.pattern
        if not isinstance(p, PatternSpec):
            return ""
        return p.padding_text(self.gemm.out_features, self.gemm.in_features)

    @property
    def block_density(self) -> float:
        """Density of the block mask alone (what ``--masks-out`` writes; of the padded weight
        for a padded pattern)."""
        p = self.pattern
        if p is None:
            return 1.0
        if isinstance(p, AttentionSpec):
            return p.density(self.gemm.seq or 0)
        return p.block_density

    @property
    def attention(self) -> AttentionSpec | None:
        """The attention pattern of a sparse scores/values GEMM (None otherwise)."""
        return self.pattern if isinstance(self.pattern, AttentionSpec) else None

    @property
    def flops(self) -> float:
        return self.gemm.flops * self.density

    @property
    def params(self) -> int:
        g = self.gemm
        if not g.has_weight:
            return 0
        if not isinstance(self.pattern, PatternSpec):
            return g.params
        p = self.pattern
        kept = p.kept_blocks(g.out_features, g.in_features) * p.pattern_block**2
        po, pi = p.sides(g.out_features, g.in_features)  # a padded layer stores padded factors
        return kept + p.rank * (pi + po) + (g.out_features if g.bias else 0)

    @property
    def kept_per_row(self) -> int | None:
        if not isinstance(self.pattern, PatternSpec):
            return None
        return self.pattern.kept_per_row(self.gemm.out_features, self.gemm.in_features)

    def mask(self, block: int) -> np.ndarray | None:
        """The weight's mask over ``block`` x ``block`` hardware blocks (of the padded weight
        for a padded pattern); for attention, the score matrix's mask over sequence blocks
        (the pattern's own block)."""
        if self.pattern is None:
            return None
        if isinstance(self.pattern, AttentionSpec):
            return self.pattern.block_mask(self.gemm.seq or 0)
        return block_mask(self.pattern, self.gemm.out_features, self.gemm.in_features, block)


@dataclass(frozen=True)
class Summary:
    eligible_flops: int
    eligible_kept: float
    model_flops: int
    model_kept: float
    dense_params: int
    params: int
    attainable: bool
    note: str
    attention_flops: int = 0  # dense FLOPs of attention's scores and values GEMMs
    attention_kept: float = 0.0

    @property
    def attention_share(self) -> float:
        """Attention's share of the model's dense FLOPs."""
        return self.attention_flops / self.model_flops if self.model_flops else 0.0

    @property
    def eligible_fraction(self) -> float:
        return self.eligible_kept / self.eligible_flops if self.eligible_flops else 1.0

    @property
    def model_fraction(self) -> float:
        return self.model_kept / self.model_flops if self.model_flops else 1.0


@dataclass
class Plan:
    """The compiler's decision for every GEMM of a schema.

    Example:
        >>> from pxcompile.schema import Gemm, LayerType, ModelSchema
        >>> from pxcompile.passes.budget import plan_schema
        >>> s = ModelSchema("m", [Gemm("fc", LayerType.MLP, 768, 3072, rows=1024)])
        >>> p = plan_schema(s, budget=0.3, block=32)
        >>> round(p.summary.eligible_fraction, 2) <= 0.3
        True
    """

    model: str
    block: int
    budget: float | None
    layers: list[LayerPlan]
    policy: dict[str, Any] = field(default_factory=dict)
    cost_model: str = ""
    note: str = ""  # why the budget could not be met, if it couldn't
    version: int = PLAN_VERSION

    def __getitem__(self, name: str) -> LayerPlan:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(name)

    @property
    def sparse_layers(self) -> list[LayerPlan]:
        return [lp for lp in self.layers if lp.sparse]

    @property
    def sparse_weight_layers(self) -> list[LayerPlan]:
        """Sparse weight GEMMs: the layers the rewrite turns into PixelflyLinear."""
        return [lp for lp in self.layers if isinstance(lp.pattern, PatternSpec)]

    @property
    def sparse_attention_layers(self) -> list[LayerPlan]:
        """Sparse attention GEMMs (scores and values): Pixelfly attention."""
        return [lp for lp in self.layers if lp.attention is not None]

    @property
    def summary(self) -> Summary:
        el = [lp for lp in self.layers if lp.eligible]
        ef = sum(lp.gemm.flops for lp in el)
        ek = sum(lp.flops for lp in el)
        att = [lp for lp in self.layers if not lp.gemm.has_weight]
        attainable = not self.note
        return Summary(
            eligible_flops=ef,
            eligible_kept=ek,
            model_flops=sum(lp.gemm.flops for lp in self.layers),
            model_kept=sum(lp.flops for lp in self.layers),
            dense_params=sum(lp.gemm.params for lp in self.layers),
            params=sum(lp.params for lp in self.layers),
            attainable=attainable,
            note=self.note,
            attention_flops=sum(lp.gemm.flops for lp in att),
            attention_kept=sum(lp.flops for lp in att),
        )

    def masks(self) -> dict[str, np.ndarray]:
        """Block masks (hardware-block granularity) of the sparse layers, by GEMM name."""
        return {lp.name: lp.mask(self.block) for lp in self.sparse_layers}  # type: ignore[misc]

    # -- plain data -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        s = self.summary
        layers = []
        for lp in self.layers:
            g = lp.gemm
            d: dict[str, Any] = {
                "name": g.name,
                "type": g.type.value,
                "in": g.in_features,
                "out": g.out_features,
                "rows": g.rows,
            }
            if g.calls != 1:
                d["calls"] = g.calls
            if g.bias:
                d["bias"] = True
            if g.heads is not None:
                d["heads"] = g.heads
            if g.seq is not None:
                d["seq"] = g.seq
            if lp.pattern is None:
                d["action"] = "dense"
            else:
                d["action"] = "sparse"
                d["pattern"] = lp.pattern.to_dict()
                if lp.kernel:
                    d["kernel"] = lp.kernel
                d["density"] = round(lp.density, 6)
            d["reason"] = lp.reason
            layers.append(d)
        return {
            "version": self.version,
            "model": self.model,
            "block": self.block,
            "budget": self.budget,
            "summary": {
                "eligible_fraction": round(s.eligible_fraction, 6),
                "model_fraction": round(s.model_fraction, 6),
                "params": s.params,
                "dense_params": s.dense_params,
                "attainable": s.attainable,
                **(
                    {
                        "attention_share": round(s.attention_share, 6),
                        "attention_kept": round(s.attention_kept / s.attention_flops, 6),
                    }
                    if s.attention_flops
                    else {}
                ),
                **({"note": s.note} if s.note else {}),
            },
            "cost_model": self.cost_model,
            "policy": self.policy,
            "layers": layers,
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, width=100)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_yaml())

    @classmethod
    def from_dict(cls, data: Any, source: str = "<plan>") -> Plan:
        if not isinstance(data, dict):
            raise PlanError(f"{source}: expected a mapping with 'version' and 'layers'")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(
                f"{source}: 'version' must be {PLAN_VERSION}, got {data.get('version')!r}"
            )
        block = data.get("block")
        if (
            isinstance(block, bool)
            or not isinstance(block, int)
            or block < 1
            or block & (block - 1)
        ):
            raise PlanError(f"{source}: 'block' must be a power of two, got {block!r}")
        raw = data.get("layers")
        if not isinstance(raw, list) or not raw:
            raise PlanError(f"{source}: 'layers' must be a non-empty list")
        budget = data.get("budget")
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget <= 1
        ):
            raise PlanError(
                f"{source}: 'budget' must be a number in (0, 1] or null, got {budget!r}"
            )
        policy = data.get("policy") or {}
        try:  # copied into every plan written from this one: it must be a valid policy
            Policy.from_dict(policy, f"{source}: policy")
        except PolicyError as e:
            raise PlanError(str(e)) from None
        layers = [_layer_from_dict(e, i, source, block) for i, e in enumerate(raw)]
        names = [lp.name for lp in layers]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise PlanError(f"{source}: layer {dup!r} appears twice")
        summary = data.get("summary") or {}
        return cls(
            model=str(data.get("model", "")),
            block=block,
            budget=budget,
            layers=layers,
            policy=policy,
            cost_model=str(data.get("cost_model", "")),
            note=str(summary.get("note", "")) if isinstance(summary, dict) else "",
        )

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise PlanError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise PlanError(f"{path}: cannot read ({type(e).__name__})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise PlanError(
                f"{path}:{where}: {getattr(e, 'problem', None) or 'invalid YAML'}"
            ) from None
        return cls.from_dict(data, str(path))

    def check_against(self, schema: ModelSchema, source: str = "plan") -> Plan:
        """Fit this plan to ``schema``: same GEMM names and shapes (rows may differ, and are
        taken from the schema). Raises PlanError naming the first mismatch."""
        mine = {lp.name: lp for lp in self.layers}
        theirs = {g.name: g for g in schema.gemms}
        missing = [n for n in theirs if n not in mine]
        extra = [n for n in mine if n not in theirs]
        if extra:
            raise PlanError(
                f"{source}: layer {extra[0]!r} is not in model {schema.name!r}"
                + (f" ({len(extra)} such layers)" if len(extra) > 1 else "")
            )
        if missing:
            raise PlanError(
                f"{source}: model {schema.name!r} has GEMM {missing[0]!r} that the plan lacks"
                + (f" ({len(missing)} such GEMMs)" if len(missing) > 1 else "")
            )
        layers = []
        for g in schema.gemms:
            lp = mine[g.name]
            if (lp.gemm.in_features, lp.gemm.out_features) != (g.in_features, g.out_features):
                raise PlanError(
                    f"{source}: layer {g.name!r} is {lp.gemm.out_features}x{lp.gemm.in_features}"
                    f" in the plan but {g.out_features}x{g.in_features} in the model"
                )
            if isinstance(lp.pattern, PatternSpec) and not g.has_weight:
                raise PlanError(
                    f"{source}: layer {g.name!r} is an activation GEMM ({g.type.value}); "
                    "it has no weight to sparsify (give it an attention pattern: block, "
                    "factors, globals)"
                )
            if isinstance(lp.pattern, AttentionSpec):
                if g.has_weight:
                    raise PlanError(
                        f"{source}: layer {g.name!r} is a weight GEMM; an attention pattern "
                        "(block, factors, globals) fits attention scores/values GEMMs only"
                    )
                why = lp.pattern.misfit(g.seq or 0) if g.seq else "its sequence length is unknown"
                if why:
                    raise PlanError(f"{source}: layer {g.name!r}: attention pattern: {why}")
            if lp.pattern is not None and g.shared_with:
                raise PlanError(
                    f"{source}: layer {g.name!r} shares its weight with {g.shared_with}; "
                    "it cannot be sparsified"
                )
            layers.append(replace(lp, gemm=g))
        return replace(self, layers=layers)


def _layer_from_dict(e: Any, i: int, source: str, block: int) -> LayerPlan:
    if not isinstance(e, dict):
        raise PlanError(f"{source}: layers[{i}]: expected a mapping")
    name = e.get("name")
    where = f"{source}: layers[{i}] ({name})" if name else f"{source}: layers[{i}]"
    if not isinstance(name, str) or not name:
        raise PlanError(f"{where}: 'name' must be a non-empty string")
    try:
        ltype = LayerType(e.get("type", "other"))
    except ValueError:
        raise PlanError(f"{where}: unknown 'type' {e.get('type')!r}") from None
    vals: dict[str, int | None] = {}
    for k in ("in", "out", "rows", "calls", "heads", "seq"):
        v = e.get(k, 1 if k == "calls" else None)
        if v is None and k in ("heads", "seq"):
            vals[k] = None
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise PlanError(f"{where}: '{k}' must be a positive integer, got {v!r}")
        vals[k] = v
    bias = e.get("bias", False)
    if not isinstance(bias, bool):
        raise PlanError(f"{where}: 'bias' must be true or false, got {bias!r}")
    gemm = Gemm(
        name,
        ltype,
        vals["in"],  # type: ignore[arg-type]
        vals["out"],  # type: ignore[arg-type]
        vals["rows"],  # type: ignore[arg-type]
        vals["calls"],  # type: ignore[arg-type]
        bias=bias,
        heads=vals["heads"],
        seq=vals["seq"],
    )
    action = e.get("action")
    reason = str(e.get("reason", ""))
    if action == "dense":
        return LayerPlan(gemm, None, reason or "dense (plan)")
    if action != "sparse":
        raise PlanError(f"{where}: 'action' must be 'sparse' or 'dense', got {action!r}")
    p = e.get("pattern")
    if not isinstance(p, dict):
        raise PlanError(f"{where}: a sparse layer needs a 'pattern' mapping")
    kernel = e.get("kernel")
    if kernel is not None and kernel not in CPU_KERNELS:
        raise PlanError(
            f"{where}: 'kernel' must be one of {', '.join(CPU_KERNELS)}, got {kernel!r}"
        )
    if "butterfly" not in p and ltype.is_activation:
        att = _attention_from_dict(p, where, gemm)
        if kernel is not None:
            raise PlanError(f"{where}: 'kernel' applies to weight layers, not to attention")
        return LayerPlan(gemm, att, reason or "pattern from plan")
    unknown = set(p) - {"butterfly", "factors", "pattern_block", "rank", "padded_out", "padded_in"}
    if unknown:
        raise PlanError(f"{where}: pattern: unknown field {sorted(unknown)[0]!r}")
    padded = {}
    for k in ("padded_out", "padded_in"):
        v = p.get(k, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise PlanError(f"{where}: pattern.{k} must be a non-negative integer, got {v!r}")
        padded[k] = v
    for k in ("butterfly", "factors", "pattern_block"):
        v = p.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise PlanError(f"{where}: pattern.{k} must be a positive integer, got {v!r}")
    rank = p.get("rank", 0)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise PlanError(f"{where}: pattern.rank must be a non-negative integer, got {rank!r}")
    try:
        spec = PatternSpec(p["butterfly"], p["factors"], p["pattern_block"], rank, **padded)
    except ValueError as err:
        raise PlanError(f"{where}: pattern: {err}") from None
    why = spec.misfit(gemm.out_features, gemm.in_features, block)
    if why:
        raise PlanError(f"{where}: pattern does not fit: {why}")
    if spec.density(gemm.in_features, gemm.out_features) >= 1:
        what = " (padding included)" if spec.padded else ""
        raise PlanError(f"{where}: pattern keeps the whole weight{what} (density >= 1)")
    return LayerPlan(gemm, spec, reason or "pattern from plan", kernel)


def _attention_from_dict(p: dict, where: str, gemm: Gemm) -> AttentionSpec:
    unknown = set(p) - {"block", "factors", "globals"}
    if unknown:
        raise PlanError(
            f"{where}: attention pattern: unknown field {sorted(unknown)[0]!r} "
            "(expected block, factors, globals)"
        )
    for k in ("block", "factors", "globals"):
        v = p.get(k)
        low = 0 if k == "globals" else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            kind = "non-negative" if low == 0 else "positive"
            raise PlanError(f"{where}: pattern.{k} must be a {kind} integer, got {v!r}")
    try:
        spec = AttentionSpec(p["block"], p["factors"], p["globals"])
    except ValueError as err:
        raise PlanError(f"{where}: attention pattern: {err}") from None
    if gemm.seq is None:
        raise PlanError(f"{where}: a sparse attention GEMM needs its sequence length 'seq'")
    why = spec.misfit(gemm.seq)
    if why:
        raise PlanError(f"{where}: attention pattern does not fit: {why}")
    return spec
