"""The budget pass: hand out a density to every eligible GEMM from one compute budget.

``budget`` is the fraction of the dense forward FLOPs of the eligible GEMMs that they keep.
GEMMs with the same type and shape (and the same policy settings) form a class and get the
same pattern. Allocation:

1. a target per class, ``level * (size / smallest size of its type) ** -size_exponent``,
   clamped to the type's floor and ceiling, rounded down to an achievable density (the
   mapping pass's menu); ``level`` is found by bisection so the total stays within budget;
2. monotone repair: within a type, a bigger class never keeps a higher density than a
   smaller one (options a smaller class could not take without breaking the rule are first
   dropped from its menu; a class left with none stays dense and says why);
3. greedy fill: the slack left by rounding is handed out one menu step at a time, to the
   least dense class first, never breaking the budget or the monotone rule.

The achieved fraction is <= budget whenever the sparsest allowed patterns fit under it, and
within ``TOLERANCE`` of it unless floors, ceilings or too few eligible layers prevent it;
either case is recorded in the plan's ``note`` (and is an error with ``strict=True``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BudgetNotAttainable, PxError
from ..patterns import AttentionSpec, PatternSpec
from ..plans import TOLERANCE, LayerPlan, Plan
from ..policy import Policy, Resolved
from ..schema import Gemm, ModelSchema
from .cost_cpu import CalibratedCost, cpu_execution
from .mapping import (
    DEFAULT_COST_MODEL,
    Choice,
    CostModel,
    choose,
    max_auto_rank,
    menu,
    min_auto_rank,
    rank_time_share,
    slower_than_dense,
)


@dataclass
class _Class:
    members: list[Gemm]
    options: list[Choice]
    type_key: str
    size: int
    pinned: float | None
    first: Gemm  # the first member and its policy settings (to rebuild the menu)
    resolved: Resolved
    pick: int = 0  # index into options

    @property
    def flops(self) -> int:
        return sum(g.flops for g in self.members)

    @property
    def density(self) -> float:
        return self.options[self.pick].density


def check_args(budget: float, block: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget <= 1:
        raise PxError(f"--budget must be in (0, 1], got {budget!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1 or block & (block - 1):
        raise PxError(f"--block must be a power of two, got {block!r}")


def plan_schema(
    schema: ModelSchema,
    budget: float,
    block: int = 32,
    policy: Policy | None = None,
    cost_model: CostModel | None = None,
    strict: bool = False,
    dense: dict[str, str] | None = None,
) -> Plan:
    """Run the budget and mapping passes on a schema and return the Plan.

    ``dense`` forces GEMMs dense with a reason (e.g. ones the rewrite can't reach).
    """
    check_args(budget, block)
    policy = policy or Policy()
    if cost_model is None and policy.cost_model:
        from ..cost_file import resolve

        cost_model = resolve(policy.cost_model, "policy cost_model")
    cost_model = cost_model or DEFAULT_COST_MODEL
    fits = [min(g.in_features, g.out_features) for g in schema.weight_gemms or schema.gemms]
    if block > max(fits):
        raise PxError(
            f"--block {block} is larger than every layer of {schema.name} "
            f"(the widest layer's narrow side is {max(fits)})"
        )

    classes: dict[tuple, _Class] = {}
    forced = dict(dense or {})
    why_dense: dict[str, str] = {}
    for g in schema.gemms:
        res = policy.resolve(g, block)
        if res.dense_reason or g.name in forced:
            why_dense[g.name] = res.dense_reason or forced[g.name]
            continue
        if g.has_weight:
            shape: tuple = (g.type.value, g.in_features, g.out_features)
            type_key, size = g.type.value, g.in_features * g.out_features
        else:
            # An attention call's scores and values GEMMs share one pattern: one class.
            shape = ("attention", g.seq)
            type_key, size = "attention", (g.seq or 0) ** 2
        key = (*shape, res.floor, res.ceiling, res.pinned, res.rank, res.pad)
        cls = classes.get(key)
        if cls is None:
            # Rank by benefit (time-capped ranks), unless only higher ranks reach the floor.
            opts = menu(g, block, policy, res, cost_model, faster_only=True, benefit=True)
            opts = opts or menu(g, block, policy, res, cost_model, faster_only=True)
            slow = None if opts else slower_than_dense(g, block, policy, res, cost_model)
            if slow:
                why_dense[g.name] = slow
                continue
            if not opts:
                what = (
                    f"butterfly pattern fits {g.out_features}x{g.in_features} at block {block}"
                    if g.has_weight
                    else f"attention pattern of block {policy.attention_block} fits {g.seq} tokens"
                )
                why_dense[g.name] = f"no {what} within density [{res.floor:g}, {res.ceiling:g}]"
                continue
            cls = classes[key] = _Class([], opts, type_key, size, res.pinned, g, res)
        cls.members.append(g)

    # Rank by benefit: auto ranks are capped by their share of the predicted time as well as
    # of the density; only when the budget can't be met so do they get their density share.
    everyone = dict(classes)
    capped = {k: c.options for k, c in classes.items()}
    wide_ranks = False
    why_capped = dict(why_dense)
    note = _monotone_and_allocate(classes, why_dense, budget, policy)
    if note and any(c.pinned is None and c.resolved.rank is None for c in everyone.values()):
        wide = dict(everyone)
        for c in wide.values():
            c.options = menu(c.first, block, policy, c.resolved, cost_model, faster_only=True)
        why_wide = dict(why_capped)
        if not _monotone_and_allocate(wide, why_wide, budget, policy):
            classes, why_dense, note, wide_ranks = wide, why_wide, "", True
        else:  # no better: back to the time-capped menus
            classes, why_dense = dict(everyone), dict(why_capped)
            for k, c in classes.items():
                c.options = capped[k]
            note = _monotone_and_allocate(classes, why_dense, budget, policy)
    picks: dict[str, tuple[PatternSpec | AttentionSpec, str]] = {}
    for c in classes.values():
        ch = c.options[c.pick]
        why = (
            f"pinned at {c.pinned:g} by policy"
            if c.pinned is not None
            else f"allocated {ch.density:.3f}"
        ) + _rank_note(c, ch, cost_model, policy, wide_ranks)
        for g in c.members:
            picks[g.name] = (ch.spec, why)
    layers = []
    for g in schema.gemms:
        if g.name in picks:
            spec, why = picks[g.name]
            kernel = None
            if isinstance(spec, PatternSpec) and isinstance(cost_model, CalibratedCost):
                kernel = cpu_execution(g.out_features, g.in_features, spec, cost_model)
            layers.append(LayerPlan(g, spec, why, kernel))
        else:
            layers.append(LayerPlan(g, None, why_dense[g.name]))
    plan = Plan(
        model=schema.name,
        block=block,
        budget=float(budget),
        layers=layers,
        policy=policy.to_dict(),
        cost_model=cost_model.name,
        note=note,
    )
    if strict and note:
        raise BudgetNotAttainable(f"budget {budget:g} not attainable: {note}")
    return plan


def _rank_note(
    c: _Class, ch: Choice, cost_model: CostModel, policy: Policy, wide_ranks: bool
) -> str:
    """What rank a weight GEMM got and why (rank by benefit, see ``mapping.max_auto_rank``)."""
    spec = ch.spec
    if not isinstance(spec, PatternSpec) or spec.rank == 0:
        return ""
    if c.resolved.rank is not None:
        return f"; rank {spec.rank} (policy)"
    share = rank_time_share(c.first, spec, cost_model)
    least = min_auto_rank(c.first, spec, policy)
    over = wide_ranks and spec.rank > max(
        least, max_auto_rank(c.first, spec, policy.lowrank_share, cost_model, least)
    )
    connect = f" ({least} connect its groups)" if least else ""
    return f"; rank {spec.rank} = {share:.0%} of its time{connect}" + (
        " (over lowrank_share of time, to meet the budget)" if over else ""
    )


def _monotone_and_allocate(
    classes: dict[tuple, _Class], why_dense: dict[str, str], budget: float, policy: Policy
) -> str:
    """The monotone repair of the menus (classes left with none leave ``classes`` for
    ``why_dense``), then the allocation; returns the allocation's note."""
    for key, why in _monotone_menus(classes).items():
        for g in classes.pop(key).members:
            why_dense[g.name] = why
    return _allocate(list(classes.values()), budget, policy)


def _monotone_menus(classes: dict[tuple, _Class]) -> dict[tuple, str]:
    """Make the monotone rule always satisfiable: drop from each free class the options
    sparser than the sparsest option of a bigger free class of its type (shapes can make a
    bigger layer's menu start above a smaller one's). A class left with no option stays
    dense; returns those classes with the reason."""
    emptied: dict[tuple, str] = {}
    free = [(k, c) for k, c in classes.items() if c.pinned is None]
    for key, c in sorted(free, key=lambda kc: -kc[1].size):
        bigger = [
            o.options[0].density
            for k, o in free
            if o.type_key == c.type_key and o.size > c.size and k not in emptied
        ]
        low = max(bigger, default=0.0)
        c.options = [ch for ch in c.options if ch.density >= low - 1e-12]
        if not c.options:
            emptied[key] = (
                f"no pattern keeps {low:.3f} or more (the sparsest a larger {c.type_key} "
                "layer can have); kept dense so density stays monotone in size"
            )
    return emptied


def _allocate(classes: list[_Class], budget: float, policy: Policy) -> str:
    """Choose an option per class; return '' or why the budget could not be met."""
    if not classes:
        return "no GEMM is eligible for sparsity"
    total = sum(c.flops for c in classes)
    limit = budget * total
    free = [c for c in classes if c.pinned is None]
    for c in classes:
        if c.pinned is not None:
            c.pick = _index(c.options, choose(c.options, c.pinned))
    smallest: dict[str, int] = {}
    for c in free:
        smallest[c.type_key] = min(smallest.get(c.type_key, c.size), c.size)

    def kept() -> float:
        return sum(c.flops * c.density for c in classes)

    def set_level(level: float) -> None:
        for c in free:
            target = level * (c.size / smallest[c.type_key]) ** -policy.size_exponent
            c.pick = _index(c.options, choose(c.options, target))

    set_level(0.0)
    if kept() > limit * (1 + 1e-12):
        return (
            f"the sparsest allowed patterns keep {kept() / total:.3f} of the eligible compute, "
            f"above the budget {budget:g}"
        )
    lo, hi = 0.0, 1.0
    set_level(hi)
    while kept() <= limit and hi < 1e6:
        lo, hi = hi, hi * 2
        set_level(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        set_level(mid)
        if kept() <= limit:
            lo = mid
        else:
            hi = mid
    set_level(lo)
    _repair_monotone(free)
    _fill(free, classes, limit)
    achieved = kept() / total
    if achieved < budget - TOLERANCE:
        return (
            f"reached {achieved:.3f} of the eligible compute: density ceilings or too few "
            f"eligible layers keep it below the budget {budget:g}"
        )
    return ""


def _index(options: list[Choice], choice: Choice) -> int:
    return options.index(choice)


def _cap_for(c: _Class, free: list[_Class]) -> float:
    """The highest density ``c`` may take: that of any strictly smaller class of its type."""
    caps = [o.density for o in free if o.type_key == c.type_key and o.size < c.size]
    return min(caps, default=float("inf"))


def _repair_monotone(free: list[_Class]) -> None:
    for c in sorted(free, key=lambda c: c.size):
        cap = _cap_for(c, free)
        while c.pick > 0 and c.density > cap + 1e-12:
            c.pick -= 1


def _fill(free: list[_Class], classes: list[_Class], limit: float) -> None:
    kept = sum(c.flops * c.density for c in classes)
    while True:
        best: tuple | None = None
        for c in free:
            if c.pick + 1 >= len(c.options):
                continue
            nxt = c.options[c.pick + 1].density
            if nxt > _cap_for(c, free) + 1e-12:
                continue
            extra = c.flops * (nxt - c.density)
            if kept + extra > limit:
                continue
            key = (c.density, c.size, c.type_key)
            if best is None or key < best[0]:
                best = (key, c, extra)
        if best is None:
            return
        _, c, extra = best
        c.pick += 1
        kept += extra
