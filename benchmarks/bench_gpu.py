"""Pixelfly on a CUDA GPU against cuBLAS, torch's BSR matmul and SDPA's flash kernel (issue #13).

Every number is a ratio ``baseline time / Pixelfly time`` (higher = Pixelfly faster), the
median over paired runs in one process: each repetition times the baseline then Pixelfly back
to back with CUDA events (each side repeated ``inner`` times between the events, so short
kernels are not lost in the timer), after warm-up runs (Triton compiles, cuBLAS heuristics).
Absolute times are medians, printed as context only. ``pred`` is what the GPU cost model
(``pxcompile.passes.cost_gpu.GpuCost``, H100-class defaults) predicts for the same shape.

* **layer**: ``PixelflyLinear(...).to("cuda")`` (768 <-> 3072 and 4096 <-> 1024 at densities
  about 0.17 and 0.3, 8192 rows, bf16 and fp16) against dense ``F.linear`` (cuBLAS) and, for the
  forward, against torch's BSR matmul (the same block-sparse ``B`` as ``to_sparse_bsr``, through
  ``F.linear``, else ``torch.sparse.mm``; no low-rank term); forward and forward + backward.
* **attention**: ``pxcompile.attention.pixelfly_attention`` against
  ``F.scaled_dot_product_attention`` restricted to the flash backend, 2k to 16k tokens, causal
  and not, batch 4 x 12 heads x 64, bf16; forward and forward + backward.
* **model**: Mixer-B/16 (batch 64, 224 px) and GPT-2 small (batch 8 x 1024 tokens) from
  ``examples/``, ``pxcompile.sparsify(..., budget 0.3)`` (planned with ``--cost-model``, default
  ``gpu``), moved to the GPU; a training step (forward, loss, backward, SGD) and a forward under
  bf16 autocast.

The kernels are whatever ``PXCOMPILE_KERNELS`` (``auto`` by default: Triton on CUDA when it
is installed) picks; the ``path`` column says which ran.

    python benchmarks/bench_gpu.py                      # all three tables
    python benchmarks/bench_gpu.py --only layer         # layer | attention | model (comma list)
    python benchmarks/bench_gpu.py --json out.json      # the rows as JSON too
    python benchmarks/bench_gpu.py --dry-run            # CPU, tiny shapes: checks the script
    python benchmarks/bench_gpu.py --predict            # the cost model's predictions only (no GPU)

Without CUDA (and without ``--dry-run``) it prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import runpy
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pxcompile  # noqa: E402
from pxcompile import kernels  # noqa: E402
from pxcompile.attention import pixelfly_attention  # noqa: E402
from pxcompile.attention_layout import spec_layout  # noqa: E402
from pxcompile.layers import PixelflyLinear  # noqa: E402
from pxcompile.passes.cost_gpu import GpuCost  # noqa: E402
from pxcompile.passes.mapping import COST_MODELS  # noqa: E402
from pxcompile.patterns import AttentionSpec, PatternSpec  # noqa: E402
from pxcompile.schema import Gemm, LayerType  # noqa: E402

SECTIONS = ("layer", "attention", "model")

# (label, in, out, target density, pattern): the two densities of issue #13 on each shape
LAYER_CASES = [
    ("768->3072", 768, 3072, 0.17, PatternSpec(12, 1, 64)),
    ("3072->768", 3072, 768, 0.17, PatternSpec(12, 1, 64)),
    ("768->3072", 768, 3072, 0.3, PatternSpec(12, 2, 64, rank=32)),
    ("3072->768", 3072, 768, 0.3, PatternSpec(12, 2, 64, rank=32)),
    ("4096->1024", 4096, 1024, 0.17, PatternSpec(32, 4, 32)),
    ("1024->4096", 1024, 4096, 0.17, PatternSpec(32, 4, 32)),
    ("4096->1024", 4096, 1024, 0.3, PatternSpec(16, 4, 64)),
    ("1024->4096", 1024, 4096, 0.3, PatternSpec(16, 4, 64)),
]
DRY_LAYER_CASES = [
    ("128->256", 128, 256, 0.5, PatternSpec(4, 1, 32)),
    ("256->128", 256, 128, 0.5, PatternSpec(4, 1, 32, rank=8)),
]
ATTENTION_SPECS = [AttentionSpec(64, 4, 1), AttentionSpec(128, 4, 1)]  # ~5% / ~11% kept at 8k


@dataclass
class Setup:
    device: torch.device
    cuda: bool
    dtypes: list[torch.dtype]
    reps: int
    inner: int
    warm: int

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def paired(self, base: Callable[[], object], cand: Callable[[], object]) -> tuple[float, ...]:
        """(median base/cand ratio, median base ms, median cand ms) of back-to-back pairs."""
        for _ in range(self.warm):
            base()
            cand()
        self.sync()
        ratios, tb, tc = [], [], []
        for _ in range(self.reps):
            a, b = self._time(base), self._time(cand)
            ratios.append(a / max(b, 1e-9))
            tb.append(a)
            tc.append(b)
        return statistics.median(ratios), statistics.median(tb), statistics.median(tc)

    def _time(self, fn: Callable[[], object]) -> float:
        """Milliseconds per call, over ``inner`` calls."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(self.inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / self.inner
        t0 = time.perf_counter()
        for _ in range(self.inner):
            fn()
        return (time.perf_counter() - t0) * 1e3 / self.inner


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


# -- layer ----------------------------------------------------------------------------------


def _bsr_forward(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, pb: int):
    """torch's BSR matmul on the block-sparse weight: ``F.linear``, else ``torch.sparse.mm``;
    None when torch has neither for this device and dtype."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse BSR tensor support is in beta")
            wb = w.to_sparse_bsr((pb, pb))
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    for fn in (lambda: F.linear(x, wb, b), lambda: torch.sparse.mm(wb, x.t()).t() + b):
        try:
            with torch.no_grad():
                fn()
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            continue
        return fn
    return None


def layer_case(s: Setup, rows: int, dtype: torch.dtype, case: tuple, model: GpuCost) -> dict:
    label, fin, fout, target, spec = case
    torch.manual_seed(0)
    lin = nn.Linear(fin, fout)
    layer = PixelflyLinear.from_dense(lin.weight.detach(), lin.bias.detach(), spec)
    masked = (lin.weight.detach() * layer.mask()).to(s.device, dtype)
    lin = lin.to(s.device, dtype)
    layer = layer.to(s.device, dtype)
    x = torch.randn(rows, fin, device=s.device, dtype=dtype)
    w, b = lin.weight.detach(), lin.bias.detach()

    def dense():
        with torch.no_grad():
            F.linear(x, w, b)

    def px():
        with torch.no_grad():
            layer(x)

    fwd, dense_ms, px_ms = s.paired(dense, px)
    bsr = _bsr_forward(masked, b, x, spec.pattern_block)
    r_bsr = s.paired(bsr, px)[0] if bsr else None
    xg = x.clone().requires_grad_(True)
    gy = torch.randn(rows, fout, device=s.device, dtype=dtype)

    def step(m: nn.Module):
        def run():
            m.zero_grad(set_to_none=True)
            xg.grad = None
            m(xg).backward(gy)

        return run

    fb = s.paired(step(lin), step(layer))[0]
    g = Gemm("fc", LayerType.MLP, fin, fout, rows=rows, bias=True)
    return {
        "case": label,
        "dtype": _dtype_name(dtype),
        "target": target,
        "density": spec.density(fin, fout),
        "pattern": spec.to_dict(),
        "rows": rows,
        "dense_ms": dense_ms,
        "px_ms": px_ms,
        "fwd": fwd,
        "vs_bsr": r_bsr,
        "fwd_bwd": fb,
        "pred_fwd": model.dense_cost(g) / model.sparse_cost(g, spec),
        "pred_fwd_bwd": model.train_speedup(g, spec),
        "path": kernels.select("linear", x),
    }


def bench_layer(s: Setup, rows: int, cases: list, model: GpuCost) -> list[dict]:
    out = []
    for dtype in s.dtypes:
        for case in cases:
            out.append(layer_case(s, rows, dtype, case, model))
            r = out[-1]
            print(f"  layer {r['case']} {r['dtype']} d={r['target']}: {r['fwd']:.2f}x",
                  file=sys.stderr)  # fmt: skip
    return out


def print_layer(rows: list[dict]) -> None:
    print("\n### Layer: PixelflyLinear vs dense F.linear (and torch BSR), ratios = baseline / px")
    print("| case | dtype | density | pattern (n/f/pb/r) | rows | dense ms | fwd | vs bsr fwd "
          "| fwd+bwd | pred fwd | pred fwd+bwd | path |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["pattern"]
        bsr = "n/a" if r["vs_bsr"] is None else f"{r['vs_bsr']:.2f}x"
        print(
            f"| {r['case']} | {r['dtype']} | {r['density']:.3f} | {p['butterfly']}/{p['factors']}"
            f"/{p['pattern_block']}/{p['rank']} | {r['rows']} | {r['dense_ms']:.3f} | "
            f"{r['fwd']:.2f}x | {bsr} | {r['fwd_bwd']:.2f}x | {r['pred_fwd']:.2f}x | "
            f"{r['pred_fwd_bwd']:.2f}x | {r['path']} |"
        )


# -- attention ------------------------------------------------------------------------------


def _flash():
    """SDPA restricted to its flash kernel (on CUDA)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def attention_case(
    s: Setup, shape: tuple[int, int, int], seq: int, spec: AttentionSpec, causal: bool, model
) -> dict:
    batch, heads, dim = shape
    lay = spec_layout(spec, seq)
    gen = torch.Generator(device=s.device).manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, lay.seq, dim, device=s.device, dtype=s.dtypes[0], generator=gen)
        for _ in range(3)
    )
    dense_in = tuple(t[:, :, :seq] for t in (q, k, v))  # SDPA on the real length
    ctx = _flash if s.cuda else contextlib.nullcontext

    def sdpa(a, b, c):
        with ctx():
            return F.scaled_dot_product_attention(a, b, c, is_causal=causal)

    def px(a, b, c):
        return pixelfly_attention(a, b, c, lay, causal=causal)

    def fwd(fn, args):
        def run():
            with torch.no_grad():
                fn(*args)

        return run

    def fwdbwd(fn, args):
        args = tuple(t.clone().requires_grad_(True) for t in args)
        go = torch.randn_like(args[0])

        def run():
            torch.autograd.grad(fn(*args), args, go)

        return run

    f, sd_ms, px_ms = s.paired(fwd(sdpa, dense_in), fwd(px, (q, k, v)))
    fb = s.paired(fwdbwd(sdpa, dense_in), fwdbwd(px, (q, k, v)))[0]
    return {
        "seq": seq,
        "padded": lay.seq - seq,
        "causal": causal,
        "spec": spec.to_dict(),
        "kept": spec.density(seq, causal),
        "sdpa_ms": sd_ms,
        "px_ms": px_ms,
        "fwd": f,
        "fwd_bwd": fb,
        "pred": model.attention_speedup(seq, spec, causal),
    }


def bench_attention(s: Setup, shape: tuple[int, int, int], seqs, specs, model) -> list[dict]:
    out = []
    for seq in seqs:
        for spec in specs:
            if spec.misfit(seq):
                continue
            for causal in (False, True):
                out.append(attention_case(s, shape, seq, spec, causal, model))
                print(f"  attention {seq} {spec.to_dict()} causal={causal}: "
                      f"{out[-1]['fwd']:.2f}x", file=sys.stderr)  # fmt: skip
    return out


def print_attention(rows: list[dict], shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    b, h, d = shape
    print(f"\n### Attention: pixelfly_attention vs SDPA flash, batch {b} x {h} heads x {d}, "
          f"{_dtype_name(dtype)}; ratios = SDPA / px")  # fmt: skip
    print("| tokens | block/factors/globals | causal | kept | sdpa ms | fwd | fwd+bwd | pred |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        sp = r["spec"]
        pad = f" (+{r['padded']} pad)" if r["padded"] else ""
        print(
            f"| {r['seq']}{pad} | {sp['block']}/{sp['factors']}/{sp['globals']} | "
            f"{'yes' if r['causal'] else 'no'} | {r['kept']:.3f} | {r['sdpa_ms']:.3f} | "
            f"{r['fwd']:.2f}x | {r['fwd_bwd']:.2f}x | {r['pred']:.2f}x |"
        )


# -- models ---------------------------------------------------------------------------------


def build_model(name: str, dry: bool):
    """(model, inputs for tracing, inputs for timing), fp32 on the CPU."""
    torch.manual_seed(0)
    if name == "mixer-b16":
        Mixer = runpy.run_path(str(ROOT / "examples" / "mixer.py"))["Mixer"]
        if dry:
            m = Mixer(image=32, patch=8, dim=256, depth=1, token_hidden=64, channel_hidden=1024)
            return m, (torch.randn(2, 3, 32, 32),), (torch.randn(2, 3, 32, 32),)
        m = Mixer(image=224, patch=16, dim=768, depth=12, token_hidden=384,
                  channel_hidden=3072, classes=1000)  # fmt: skip
        return m, (torch.randn(1, 3, 224, 224),), (torch.randn(64, 3, 224, 224),)
    if name == "gpt2-small":
        GPT = runpy.run_path(str(ROOT / "examples" / "gpt.py"))["GPT"]
        if dry:
            m = GPT(vocab=256, context=64, dim=256, layers=1, heads=4, hidden=1024)
            x = torch.randint(0, 256, (2, 64))
            return m, (x,), (x,)
        m = GPT(vocab=50257, context=1024, dim=768, layers=12, heads=12, hidden=3072)
        x = torch.randint(0, 50257, (8, 1024))
        return m, (x[:1],), (x,)
    raise ValueError(name)


def _autocast(s: Setup):
    if not s.cuda:
        return contextlib.nullcontext()
    return torch.autocast(s.device.type, dtype=s.dtypes[0])


def _train_step(s: Setup, m: nn.Module, x: tuple) -> Callable[[], None]:
    opt = torch.optim.SGD(m.parameters(), lr=1e-4)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        with _autocast(s):
            y = m(*x)
        y.float().square().mean().backward()
        opt.step()

    return run


def _forward(s: Setup, m: nn.Module, x: tuple) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode(), _autocast(s):
            m(*x)

    return run


def model_case(s: Setup, name: str, budget: float, cost_model, dry: bool) -> dict:
    model, trace_in, inputs = build_model(name, dry)
    plan = pxcompile.plan(model, budget, example_inputs=trace_in, cost_model=cost_model)
    gm = pxcompile.sparsify(model, plan=plan, example_inputs=trace_in, init="scratch")
    model, gm = model.to(s.device), gm.to(s.device)
    x = tuple(t.to(s.device) for t in inputs)
    model.train()
    gm.train()
    train, dense_ms, px_ms = s.paired(_train_step(s, model, x), _train_step(s, gm, x))
    model.eval()
    gm.eval()
    fwd = s.paired(_forward(s, model, x), _forward(s, gm, x))[0]
    summ = plan.summary
    return {
        "model": name,
        "batch": tuple(x[0].shape),
        "cost_model": cost_model.name,
        "sparse_gemms": len(plan.sparse_layers),
        "flops_kept": summ.model_fraction,
        "eligible_kept": summ.eligible_fraction,
        "dense_step_ms": dense_ms,
        "px_step_ms": px_ms,
        "train": train,
        "fwd": fwd,
        "path": kernels.select("linear", torch.empty(1, device=s.device)),
    }


def bench_models(s: Setup, names: list[str], budget: float, cost: str, dry: bool) -> list[dict]:
    cost_model = {"gpu": GpuCost(), **COST_MODELS}[cost]
    s = replace(s, inner=1)  # a step takes milliseconds: one per timing is enough
    out = []
    for name in names:
        out.append(model_case(s, name, budget, cost_model, dry))
        print(f"  model {name}: train step {out[-1]['train']:.2f}x", file=sys.stderr)
        if s.cuda:
            torch.cuda.empty_cache()
    return out


def print_models(rows: list[dict], budget: float, dtype: str) -> None:
    print(f"\n### Models at budget {budget}: training step and forward, {dtype} autocast, SGD; "
          "ratios = dense / pixelfly")  # fmt: skip
    print("| model | input | planned with | FLOPs kept (model / eligible) | dense step ms "
          "| train step | forward | path |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        shape = "x".join(str(d) for d in r["batch"])
        print(
            f"| {r['model']} | {shape} | {r['cost_model']} | {r['flops_kept']:.3f} / "
            f"{r['eligible_kept']:.3f} | {r['dense_step_ms']:.1f} | {r['train']:.2f}x | "
            f"{r['fwd']:.2f}x | {r['path']} |"
        )


# -- predictions (no GPU) ----------------------------------------------------------------------

# the models' schemas at the batch the model table runs: (schema file, rows scale)
MODEL_SCHEMAS = {"mixer-b16": ("mixer-b16.yaml", 64 / 8), "gpt2-small": ("gpt2-small.yaml", 1.0)}


def predict_models(names: list[str], budget: float, model: GpuCost) -> list[dict]:
    """Each model's schema planned with the GPU cost model; predicted GEMM time ratios (the
    rest of a step, norms, activations, softmax, the optimizer, is not modelled)."""
    from pxcompile.schema import ModelSchema

    out = []
    for name in names:
        path, scale = MODEL_SCHEMAS[name]
        schema = ModelSchema.load(ROOT / "schemas" / path).with_rows(scale)
        plan = pxcompile.plan(schema, budget, cost_model=model)
        dense = [0.0, 0.0]
        px = [0.0, 0.0]
        for lp in plan.layers:
            g, spec = lp.gemm, lp.pattern
            d = (model.dense_cost(g), model.dense_train_cost(g))
            if isinstance(spec, PatternSpec):
                c = (model.sparse_cost(g, spec), model.sparse_train_cost(g, spec))
            elif isinstance(spec, AttentionSpec):
                k = model.attention_speedup(g.seq or 1, spec)
                c = (d[0] / k, d[1] / k)
            else:
                c = d
            for i in range(2):
                dense[i] += d[i]
                px[i] += c[i]
        out.append(
            {
                "model": name,
                "rows": schema.gemms[-2].rows,
                "sparse_gemms": len(plan.sparse_layers),
                "gemms": len(plan.layers),
                "eligible_kept": plan.summary.eligible_fraction,
                "pred_fwd": dense[0] / px[0],
                "pred_train": dense[1] / px[1],
            }
        )
    return out


def print_predictions(rows_: int, seqs: list[int], names: list[str], budget: float) -> dict:
    model = GpuCost()
    print(f"\n### Predicted by the GPU cost model (GpuCost defaults: H100 SXM, bf16), {rows_} rows")
    print("| case | density | pattern (n/f/pb/r) | fwd | fwd+bwd |")
    print("|---|---|---|---|---|")
    layer = []
    for label, fin, fout, _, spec in LAYER_CASES:
        g = Gemm("fc", LayerType.MLP, fin, fout, rows=rows_, bias=True)
        f, fb = model.dense_cost(g) / model.sparse_cost(g, spec), model.train_speedup(g, spec)
        layer.append({"case": label, "density": spec.density(fin, fout), "fwd": f, "fwd_bwd": fb})
        print(f"| {label} | {spec.density(fin, fout):.3f} | {spec.butterfly}/{spec.factors}/"
              f"{spec.pattern_block}/{spec.rank} | {f:.2f}x | {fb:.2f}x |")  # fmt: skip
    print("\n| tokens | block/factors/globals | kept (non-causal / causal) | vs flash | causal |")
    print("|---|---|---|---|---|")
    attention = []
    for seq in seqs:
        for a in ATTENTION_SPECS:
            nc, c = model.attention_speedup(seq, a), model.attention_speedup(seq, a, True)
            attention.append({"seq": seq, "spec": a.to_dict(), "pred": nc, "pred_causal": c})
            print(f"| {seq} | {a.block}/{a.factors}/{a.globals} | {a.density(seq):.3f} / "
                  f"{a.density(seq, True):.3f} | {nc:.2f}x | {c:.2f}x |")  # fmt: skip
    models = predict_models(names, budget, model)
    print(f"\n| model (schema, budget {budget}) | rows | sparse GEMMs | eligible kept "
          "| GEMM time fwd | GEMM time train step |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in models:
        print(f"| {r['model']} | {r['rows']} | {r['sparse_gemms']} of {r['gemms']} | "
              f"{r['eligible_kept']:.3f} | {r['pred_fwd']:.2f}x | {r['pred_train']:.2f}x |")  # fmt: skip
    return {"layer": layer, "attention": attention, "model": models}


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help="layer,attention,model")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, one repetition")
    ap.add_argument("--predict", action="store_true", help="print the cost model's predictions")
    ap.add_argument("--rows", type=int, default=8192, help="layer rows (default 8192)")
    ap.add_argument("--seqs", default="2048,4096,8192,16384", help="attention lengths")
    ap.add_argument("--models", default="mixer-b16,gpt2-small")
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument(
        "--cost-model",
        choices=sorted({"gpu", *COST_MODELS}),
        help="how the models are planned (default gpu; flops+blocks in a dry run, where the GPU "
        "model rightly keeps the tiny layers dense)",
    )
    ap.add_argument("--reps", type=int, default=None, help="paired repetitions (default 15)")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    sections = [x for x in args.only.split(",") if x]
    bad = [x for x in sections if x not in SECTIONS]
    if bad:
        ap.error(f"--only: {bad[0]!r} is not one of {', '.join(SECTIONS)}")
    seqs = [int(x) for x in args.seqs.split(",")]
    if args.predict:
        names = [x for x in args.models.split(",") if x]
        results = print_predictions(args.rows, seqs, names, args.budget)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        return 0
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print(
            "bench_gpu.py: no CUDA device (torch.cuda.is_available() is False); run it on a "
            "machine with an NVIDIA GPU, or pass --dry-run to check the script on the CPU",
            file=sys.stderr,
        )
        return 2
    dry = args.dry_run
    if dry:
        torch.set_num_threads(1)  # tiny ops on a shared CPU: threads only contend
    s = Setup(
        device=torch.device("cuda" if cuda else "cpu"),
        cuda=cuda,
        dtypes=[torch.bfloat16, torch.float16] if cuda else [torch.float32],
        reps=1 if dry else (args.reps or 15),
        inner=1 if dry else 10,
        warm=1 if dry else 3,
    )
    model = GpuCost()
    load0 = os.getloadavg()
    if cuda:
        name = torch.cuda.get_device_name()
    else:
        name = "CPU (dry run: tiny shapes, the numbers mean nothing)"
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = "not installed"
    print(f"## bench_gpu.py on {name}")
    print(f"torch {torch.__version__}, triton {triton_v}, {kernels.ENV}={kernels.setting()}, "
          f"{s.reps} paired runs x {s.inner} calls (models: 1), medians; load average {load0[0]:.2f}")  # fmt: skip
    results: dict[str, list[dict]] = {}
    if "layer" in sections:
        cases = DRY_LAYER_CASES if dry else LAYER_CASES
        results["layer"] = bench_layer(s, 64 if dry else args.rows, cases, model)
        print_layer(results["layer"])
    if "attention" in sections:
        shape = (1, 2, 16) if dry else (4, 12, 64)
        seqs = [256] if dry else seqs
        specs = [AttentionSpec(16, 2, 1)] if dry else ATTENTION_SPECS
        results["attention"] = bench_attention(s, shape, seqs, specs, model)
        print_attention(results["attention"], shape, s.dtypes[0])
    if "model" in sections:
        names = [x for x in args.models.split(",") if x]
        cost = args.cost_model or ("flops+blocks" if dry else "gpu")
        results["model"] = bench_models(s, names, args.budget, cost, dry)
        print_models(results["model"], args.budget, _dtype_name(s.dtypes[0]))
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
