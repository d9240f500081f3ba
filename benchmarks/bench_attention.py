"""Pixelfly attention against dense ``F.scaled_dot_product_attention`` (fp32, CPU, 2 threads).

Shapes: batch 1, 12 heads x 64, self-attention, sequence 1024..8192; pattern
``AttentionSpec(block=64, factors=4, globals=1)`` (flat butterfly over sequence blocks +
1 global block) unless ``--block/--factors/--globals`` say otherwise.

Every ratio is ``time(other) / time(pixelfly)`` (higher = pixelfly faster), the median over
paired runs: each repetition times the baseline then pixelfly back to back, so both see the
same machine load. Absolute times (ms) are medians, printed as context only. Repetitions:
5 pairs up to 2048 (3 against the masked baseline), 3 at 4096 (1), 1 at 8192 (dense
forward + backward there takes ~30 s a run), so the whole table stays under 5 minutes.

    python benchmarks/bench_attention.py            # full table (< 5 minutes)
    python benchmarks/bench_attention.py --quick    # 1024 and 4096 only, fewer repetitions
    python benchmarks/bench_attention.py --causal   # causal attention (SDPA is_causal=True)
    python benchmarks/bench_attention.py --model    # GPT training steps at 2048 (2x256, 2x768)
    python benchmarks/bench_attention.py --model --threads 1   # the same without fork/joins

Columns: ``kept`` (kept fraction of the score blocks; of the lower triangle when causal),
``sdpa ms`` (dense SDPA), ``px ms`` (pixelfly), ``vs sdpa`` (dense SDPA / pixelfly),
``vs masked`` (SDPA with the same block mask as a boolean ``attn_mask`` / pixelfly), each for
the forward (no grad) and forward + backward (gradients of q, k, v).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pxcompile.attention import AttentionSpec, pixelfly_attention  # noqa: E402
from pxcompile.attention_layout import spec_layout  # noqa: E402
from pxcompile.bench import paired as _paired  # noqa: E402

HEADS, DIM = 12, 64


def paired(base, cand, reps: int, warm: bool = True) -> tuple[float, float, float]:
    """(median base/cand ratio, median base s, median cand s) over back-to-back pairs; the
    warm-up runs each side once (layouts, scratch buffers, worker threads)."""
    return _paired(base, cand, reps, 1 if warm else 0)


def run_case(L: int, spec: AttentionSpec, causal: bool, reps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, L, DIM, generator=gen) for _ in range(3))
    lay = spec_layout(spec, L)
    mask = lay.element_mask(causal)

    def sdpa(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, is_causal=causal)

    def masked(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, attn_mask=mask)

    def px(a, b, c):
        return pixelfly_attention(a, b, c, lay, causal=causal)

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn(q, k, v)

        return run

    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    go = torch.randn(1, HEADS, L, DIM, generator=gen)

    def fwdbwd(fn):
        def run():
            out = fn(qg, kg, vg)
            torch.autograd.grad(out, (qg, kg, vg), go)

        return run

    row = {"L": L, "kept": lay.density(causal)}
    row["fwd"] = paired(fwd(sdpa), fwd(px), reps)
    row["fwd_m"] = paired(fwd(masked), fwd(px), max(1, reps - 2))
    row["fb"] = paired(fwdbwd(sdpa), fwdbwd(px), reps)
    row["fb_m"] = paired(fwdbwd(masked), fwdbwd(px), max(1, reps - 2))
    return row


def table(rows: list[dict]) -> str:
    head = (
        "| seq | kept | fwd: sdpa ms | px ms | vs sdpa | vs masked "
        "| f+b: sdpa ms | px ms | vs sdpa | vs masked |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        f, fm, b, bm = r["fwd"], r["fwd_m"], r["fb"], r["fb_m"]
        lines.append(
            f"| {r['L']} | {r['kept']:.3f} | {f[1] * 1e3:.0f} | {f[2] * 1e3:.0f} | "
            f"{f[0]:.2f}x | {fm[0]:.2f}x | {b[1] * 1e3:.0f} | {b[2] * 1e3:.0f} | "
            f"{b[0]:.2f}x | {bm[0]:.2f}x |"
        )
    return "\n".join(lines)


#: GPT configurations of ``--model``: (layers, width, heads, MLP width). The first is
#: examples/gpt.py's width with 2 layers; the second GPT-2 small's width and heads (12 x 64).
MODELS = {"2x256": (2, 256, 4, 1024), "2x768": (2, 768, 12, 3072)}


def model_steps(
    seq: int, steps: int, reps: int, spec: AttentionSpec, config: str, plan: bool = False
) -> str:
    """Training steps (AdamW, batch 1) of examples/gpt.py's GPT at context ``seq``, ``config``
    one of :data:`MODELS`: MLPs and projections sparsified (budget 0.3, attention dense) vs the
    same plus Pixelfly attention. Both are warmed up with 2 steps, timed over ``reps`` paired
    steps, then trained ``steps`` more steps each (losses compared at the same step).

    ``plan=True``: the second side is what ``pxcompile.sparsify(model, 0.3)`` gives by default
    at this length: attention in the budget (its pattern chosen by the mapping pass, the MLPs'
    densities adjusted so the total stays at 0.3 of the eligible compute)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    from gpt import GPT

    import pxcompile
    from pxcompile.attention import sparsify_attention
    from pxcompile.policy import Policy

    layers, dim, heads, hidden = MODELS[config]
    torch.manual_seed(0)
    model = GPT(context=seq, dim=dim, layers=layers, heads=heads, hidden=hidden)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (1, seq + 1), generator=gen)  # seq inputs + next-token targets
    # both sides: the same plan (MLPs and projections at budget 0.3, attention left dense);
    # the second then gets Pixelfly attention
    policy = None
    if "attention_min_seq" in {f.name for f in dataclasses.fields(Policy)}:
        policy = {"attention_min_seq": 1 << 30}

    def sparse():
        return pxcompile.sparsify(model, 0.3, example_inputs=(ids[:, :seq],), policy=policy)

    mlp = sparse()
    if plan:
        att = pxcompile.sparsify(model, 0.3, example_inputs=(ids[:, :seq],))
        assert att.pxcompile_plan.sparse_attention_layers, "the plan left attention dense"
        spec = att.pxcompile_attention.spec
    else:
        att = sparsify_attention(sparse(), spec, min_seq=seq)

    def stepper(m):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        losses: list[float] = []

        def step():
            logits = m(ids[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())

        return step, losses

    s_mlp, l_mlp = stepper(mlp)
    s_att, l_att = stepper(att)
    for _ in range(2):
        s_mlp()
        s_att()
    ratio, t_mlp, t_att = paired(s_mlp, s_att, reps, warm=False)
    for _ in range(steps):
        s_mlp()
        s_att()
    kept = att.pxcompile_attention.spec.density(seq, causal=True)
    how = "plan, " if plan else ""
    return (
        f"| GPT {config} ({heads} heads), seq {seq} (causal), {how}{spec.block}/{spec.factors}/"
        f"{spec.globals} | {t_mlp * 1e3:.0f} | {t_att * 1e3:.0f} | {ratio:.2f}x | {kept:.3f} | "
        f"{l_att[0]:.3f} -> {l_att[-1]:.3f} ({len(l_att)} steps; MLPs only: {l_mlp[-1]:.3f}) |"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1024 and 4096, fewer repetitions")
    ap.add_argument("--causal", action="store_true", help="causal attention")
    ap.add_argument("--seq", type=int, nargs="*", help="sequence lengths")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--factors", type=int, default=4)
    ap.add_argument("--globals", type=int, default=1)
    ap.add_argument("--model", action="store_true", help="GPT-style training steps at 2048")
    ap.add_argument("--config", nargs="*", choices=list(MODELS), help="--model: GPT configs")
    ap.add_argument(
        "--plan", action="store_true", help="--model: attention from the budget (sparsify default)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = AttentionSpec(block=args.block, factors=args.factors, globals=args.globals)
    if args.model:
        print(
            "| model | step ms, MLPs sparse | step ms, + pixelfly attention | speedup "
            "| kept (causal) | loss (with attention) |"
        )
        print("|---|---|---|---|---|---|")
        for config in args.config or list(MODELS):
            row = model_steps(2048, steps=6, reps=5, spec=spec, config=config, plan=args.plan)
            print(row, flush=True)
        return
    seqs = args.seq or ([1024, 4096] if args.quick else [1024, 2048, 4096, 8192])
    print(
        f"# pixelfly attention vs dense SDPA: batch 1, {HEADS} heads x {DIM}, fp32, "
        f"{torch.get_num_threads()} threads, causal={args.causal}, block={spec.block}, "
        f"factors={spec.factors}, globals={spec.globals}; torch {torch.__version__}",
        flush=True,
    )
    rows = []
    for L in seqs:
        reps = (
            (3 if L <= 2048 else 2) if args.quick else (5 if L <= 2048 else 3 if L <= 4096 else 2)
        )
        rows.append(run_case(L, spec, args.causal, reps))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
