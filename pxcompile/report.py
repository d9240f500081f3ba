"""Reports of a Plan: a rich table for people, a dict (JSON) for machines, mask files and
pictures of the masks."""

from __future__ import annotations

import io
import zipfile
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from .passes.mapping import COST_MODELS, CostModel, FlopsBlockCost, predicted_speedup
from .plans import Plan
from .schema import human


def prediction_model(plan: Plan, cost_model: CostModel | None = None) -> CostModel:
    """The cost model that predicts speedups in reports: ``cost_model`` (the one planning
    used, e.g. a calibrated file), else the plan's if it is registered, else calibrated-cpu;
    never flops+blocks, which ranks patterns but does not predict time."""
    for m in (cost_model, COST_MODELS.get(plan.cost_model), _policy_cost_model(plan)):
        if m is not None and not isinstance(m, FlopsBlockCost):
            return m
    return COST_MODELS["calibrated-cpu"]


def _policy_cost_model(plan: Plan) -> CostModel | None:
    """The cost-model file the plan's policy named, if it still loads."""
    from .cost_file import CostModelError, resolve

    spec = plan.policy.get("cost_model") if isinstance(plan.policy, dict) else None
    if not isinstance(spec, str) or not spec:
        return None
    try:
        m = resolve(spec, "policy cost_model")
    except CostModelError:
        return None
    return m if m.name == plan.cost_model else None


def plan_table(
    plan: Plan,
    extra_columns: dict[str, dict[str, str]] | None = None,
    cost_model: CostModel | None = None,
) -> Table:
    """One row per GEMM: what it gets and what that costs. ``extra_columns`` maps a column
    title to per-layer cells (e.g. measured errors or predicted speedups); "pred x" is the
    :func:`prediction_model`'s."""
    model = prediction_model(plan, cost_model)
    t = Table(
        title=f"{plan.model}: block {plan.block}, budget {_budget(plan)}", title_justify="left"
    )
    for col, kw in (
        ("GEMM", {}),
        ("type", {}),
        ("shape", {"justify": "right"}),
        ("pattern n/f/pb", {"justify": "right"}),
        ("rank", {"justify": "right"}),
        ("blk/row", {"justify": "right"}),
        ("mask dens", {"justify": "right"}),
        ("density", {"justify": "right"}),
        ("params", {"justify": "right"}),
        ("FLOPs", {"justify": "right"}),
        ("why", {"overflow": "fold", "max_width": 48}),
    ):
        t.add_column(col, **kw)
    extra_columns = dict(extra_columns or {})
    t.add_column("pred x", justify="right")
    for title in extra_columns:
        t.add_column(title, justify="right")
    for lp in plan.layers:
        g = lp.gemm
        shape = f"{g.out_features}x{g.in_features}"
        if lp.pattern is None:
            pat = rank = kpr = "-"
            dens = mdens = "1"
            style = "dim"
        elif lp.attention is not None:
            a = lp.attention
            pat = f"attn {a.block}/{a.factors}/g{a.globals}"
            rank = kpr = "-"
            mdens = f"{lp.block_density:.4f}"
            dens = f"{lp.density:.4f}"
            style = ""
        else:
            p = lp.pattern
            pat = f"{p.butterfly}/{p.factors}/{p.pattern_block}"
            rank = str(p.rank)
            kpr = str(lp.kept_per_row)
            mdens = f"{lp.block_density:.4f}"
            dens = f"{lp.density:.4f}"
            style = ""
        params = "-" if not g.has_weight else f"{human(g.params)} → {human(lp.params)}"
        flops = f"{human(g.flops)} → {human(lp.flops)}"
        pred = "-" if lp.pattern is None else f"{predicted_speedup(g, lp.pattern, model):.2f}"
        cells = [
            g.name,
            g.type.value,
            shape,
            pat,
            rank,
            kpr,
            mdens,
            dens,
            params,
            flops,
            "; ".join(filter(None, (lp.reason, lp.padding))),
            pred,
        ]
        cells += [extra_columns[title].get(g.name, "") for title in extra_columns]
        t.add_row(*cells, style=style)
    s = plan.summary
    t.add_section()
    t.add_row(
        "total",
        "",
        "",
        "",
        "",
        "",
        "",
        f"{s.model_fraction:.4f}",
        f"{human(s.dense_params)} → {human(s.params)}",
        f"{human(s.model_flops)} → {human(s.model_kept)}",
        f"{len(plan.sparse_layers)} of {len(plan.layers)} GEMMs sparse",
        f"{model_predicted_speedup(plan, model):.2f}",
        *["" for _ in extra_columns],
        style="bold",
    )
    return t


def _budget(plan: Plan) -> str:
    """The plan's budget for reports (a hand-written plan may have none)."""
    return "-" if plan.budget is None else f"{plan.budget:g}"


def model_predicted_speedup(plan: Plan, cost_model: CostModel | None = None) -> float:
    """Predicted forward speedup of all the schema's GEMMs together (the
    :func:`prediction_model`: calibrated CPU unless planning used another)."""
    model = prediction_model(plan, cost_model)
    dense = sum(model.dense_cost(lp.gemm) for lp in plan.layers)
    sparse = sum(
        model.dense_cost(lp.gemm) / predicted_speedup(lp.gemm, lp.pattern, model)
        for lp in plan.layers
    )
    return dense / sparse if sparse else 1.0


def summary_lines(plan: Plan, cost_model: CostModel | None = None) -> list[str]:
    s = plan.summary
    model = prediction_model(plan, cost_model)
    where = "on CPU" if model.name == "calibrated-cpu" else f"({model.name})"
    lines = [
        f"achieved budget: {s.eligible_fraction:.4f} of the eligible GEMMs' compute "
        f"(budget {_budget(plan)}); whole model: {s.model_fraction:.4f} "
        f"(dense GEMMs included); params {s.params / max(s.dense_params, 1):.4f} of dense; "
        f"predicted GEMM speedup {where} {model_predicted_speedup(plan, model):.2f}x"
    ]
    if s.attention_flops:
        att = plan.sparse_attention_layers
        lines.append(
            f"attention (scores and values): {s.attention_share:.4f} of the model's compute, "
            f"keeps {s.attention_kept / s.attention_flops:.4f} of it"
            + (
                f" (Pixelfly attention {att[0].attention.to_dict()}, sparse from "  # type: ignore[union-attr]
                f"{plan.policy.get('attention_min_seq', '?')} tokens)"
                if att
                else " (dense)"
            )
        )
    if s.note:
        lines.append(f"not attainable: {s.note}")
    return lines


def make_console(stderr: bool = False) -> Console:
    """A console that keeps tables readable when piped (no 80-column squeeze)."""
    c = Console(stderr=stderr, highlight=False)
    if not c.is_terminal:
        c = Console(stderr=stderr, highlight=False, width=200)
    return c


def print_plan(
    plan: Plan,
    console: Console | None = None,
    extra_columns=None,
    cost_model: CostModel | None = None,
) -> None:
    console = console or make_console()
    console.print(plan_table(plan, extra_columns, cost_model))
    for line in summary_lines(plan, cost_model):
        style = "bold red" if line.startswith("not attainable") else "bold"
        console.print(line, style=style, highlight=False)


def plan_json(plan: Plan, cost_model: CostModel | None = None) -> dict[str, Any]:
    """The same as the table, for machines."""
    model = prediction_model(plan, cost_model)
    d = plan.to_dict()
    s = plan.summary
    d["summary"].update(
        eligible_flops=s.eligible_flops,
        eligible_kept_flops=s.eligible_kept,
        model_flops=s.model_flops,
        model_kept_flops=s.model_kept,
    )
    for row, lp in zip(d["layers"], plan.layers):
        row.update(
            params=lp.gemm.params,
            sparse_params=lp.params,
            flops=lp.gemm.flops,
            sparse_flops=lp.flops,
            mask_density=lp.block_density,
            density=lp.density,
            kept_per_row=lp.kept_per_row,
            predicted_speedup=predicted_speedup(lp.gemm, lp.pattern, model),
        )
        if lp.padding:  # 'padded in 196->384'; the padded sides are in the pattern
            row["padding"] = lp.padding
    d["summary"]["predicted_speedup"] = model_predicted_speedup(plan, model)
    d["summary"]["prediction_model"] = model.name
    return d


def masks_npz_bytes(plan: Plan) -> bytes:
    """Each sparse layer's block mask (bool, hardware-block granularity), keyed by name, as
    a compressed ``.npz`` (``np.load`` reads it).

    Written entry by entry rather than with ``np.savez_compressed(buf, **masks)``: a GEMM
    may be named like one of its arguments (``file``), and fixed timestamps make the same
    plan give the same bytes.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, mask in plan.masks().items():
            arr = io.BytesIO()
            np.lib.format.write_array(arr, np.ascontiguousarray(mask), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, arr.getvalue())
    return buf.getvalue()


def draw_png_bytes(plan: Plan, max_panels: int = 12) -> bytes:
    """The distinct masks side by side (kept blocks dark), as in the paper's figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    distinct: dict[tuple, tuple[str, np.ndarray, str]] = {}
    for lp in plan.sparse_layers:
        g, p = lp.gemm, lp.pattern
        a = lp.attention
        key = ("attention", g.seq, a) if a is not None else (g.out_features, g.in_features, p)
        if key not in distinct:
            m = lp.mask(plan.block)
            if a is not None:
                title = (
                    f"attention, {g.seq} tokens\nblock={a.block} f={a.factors} "
                    f"g={a.globals}\nmask {lp.block_density:.3f}"
                )
            else:
                shape = f"{g.out_features}x{g.in_features}"
                po, pi = p.sides(g.out_features, g.in_features)
                if p.padded:
                    shape += f" (padded {po}x{pi})"
                title = (
                    f"{shape}\nn={p.butterfly} f={p.factors} "
                    f"pb={p.pattern_block} r={p.rank}\nmask {lp.block_density:.3f}"
                )
            distinct[key] = (g.name, m, title)
    panels = list(distinct.values())[:max_panels]
    k = max(len(panels), 1)
    fig, axes = plt.subplots(1, k, figsize=(3.2 * k, 3.6), squeeze=False)
    for ax, (_, m, title) in zip(axes[0], panels):
        ax.imshow(m, cmap="Greys", interpolation="nearest", aspect="auto", vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if not panels:
        axes[0][0].text(0.5, 0.5, "no sparse layer", ha="center")
        axes[0][0].axis("off")
    fig.suptitle(f"{plan.model}: block masks at block {plan.block} (dark = kept)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def print_schema(traced, console: Console | None = None) -> None:
    """The traced schema as a table: what was found and how the rewrite will reach it."""
    console = console or make_console()
    schema = traced.schema
    t = Table(
        title=f"{schema.name}: {len(schema.gemms)} GEMMs (traced with {traced.method})",
        title_justify="left",
    )
    for col in ("GEMM", "type", "in", "out", "rows", "calls", "FLOPs", "weight"):
        t.add_column(
            col, justify="right" if col in ("in", "out", "rows", "calls", "FLOPs") else "left"
        )
    for g in schema.gemms:
        b = traced.bindings.get(g.name)
        site = getattr(traced, "attention", {}).get(g.name)
        if b is not None:
            how = b.kind + (f" (shared with {g.shared_with})" if g.shared_with else "")
        elif site is not None:
            how = f"attention ({site.via}), {g.seq} tokens"
        else:
            how = "-"
        t.add_row(
            g.name,
            g.type.value,
            str(g.in_features),
            str(g.out_features),
            str(g.rows),
            str(g.calls),
            human(g.flops),
            how,
        )
    console.print(t)
    for note in traced.notes:
        console.print(f"note: {note}", highlight=False)
