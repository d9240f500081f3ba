"""Pixelfly attention on CPU (the torch path): the sparse query blocks grouped by their
number of kept key blocks, gathered, one batched matmul per group, a hand-written backward;
one chunk of heads per worker thread. See :mod:`pxcompile.attention` for the pattern and
the execution strategy; :func:`sparse_attention` is the entry point.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pxcompile.attention_layout import BlockLayout

__all__ = ["TILE_ELEMS", "release_workspace", "sparse_attention"]

#: Largest score buffer per tile, in elements (tiles split heads only; about one head of
#: 2048 tokens with the default pattern, so a tile's buffers stay in cache).
TILE_ELEMS: int = 1 << 19

# --------------------------------------------------------------------------------------------
# execution plan (index tensors) for the sparse rows
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Group:
    """Sparse query blocks that keep the same number ``c`` of key blocks: ``idx[r]`` lists
    query block ``rows[r]``'s kept key blocks (the globals first, then the butterfly partners
    ascending, the diagonal block last). No slot is ever masked, except, when causal, the
    upper triangle inside the diagonal (last) slot: causal rows compute only their valid
    blocks."""

    rows: np.ndarray  # [mc] query blocks
    idx: np.ndarray  # [mc, c] key blocks
    rows_t: Tensor  # [mc * block] query element index per row (for the model's masks)
    cols_t: Tensor  # [mc, c * block] key element index per column

    @property
    def c(self) -> int:
        return self.idx.shape[1]


@dataclass(frozen=True, eq=False)
class _Plan:
    """The sparse query blocks ``g..n-1`` of a layout grouped by their number of kept key
    blocks (:class:`_Group`); the ``g`` global query blocks are dense rows, computed apart.

    For a tile of ``h`` heads the gathered buffers are laid out group after group, each group
    heads-outer: group ``gi``'s query blocks are rows ``h*qo[gi] : h*qo[gi+1]`` of the gathered
    queries, its key blocks rows ``h*ko[gi] : h*ko[gi+1]`` of the gathered keys, so every
    group's operands are plain views."""

    n: int
    g: int
    block: int
    groups: tuple[_Group, ...]
    qo: tuple[int, ...]  # query-block offsets per group (per head), len(groups) + 1
    ko: tuple[int, ...]  # key-slot offsets per group (per head), len(groups) + 1

    @property
    def nr(self) -> int:
        return self.qo[-1]

    @property
    def slots(self) -> int:
        return self.ko[-1]


@lru_cache(maxsize=64)
def _plan(layout: BlockLayout, causal: bool) -> _Plan:
    b, n, g = layout.block, layout.n, layout.globals
    bm = layout.block_mask(causal)
    by_c: dict[int, tuple[list[int], list[list[int]]]] = {}
    for i in range(g, n):
        keys = np.flatnonzero(bm[i]).tolist()
        if i not in keys or keys[:g] != list(range(g)):
            raise ValueError(
                "pixelfly attention: every sparse row must keep its diagonal and global blocks"
            )
        keys = keys[:g] + [j for j in keys[g:] if j != i] + [i]
        rows, idx = by_c.setdefault(len(keys), ([], []))
        rows.append(i)
        idx.append(keys)
    groups: list[_Group] = []
    qo, ko = [0], [0]
    for c, (rows, idx) in sorted(by_c.items()):
        r_ = np.array(rows, dtype=np.int64)
        ix = np.array(idx, dtype=np.int64).reshape(len(rows), c)
        rows_t = torch.from_numpy((r_[:, None] * b + np.arange(b)).reshape(-1))
        cols_t = torch.from_numpy((ix[:, :, None] * b + np.arange(b)).reshape(len(rows), c * b))
        groups.append(_Group(r_, ix, rows_t, cols_t))
        qo.append(qo[-1] + len(rows))
        ko.append(ko[-1] + len(rows) * c)
    return _Plan(n, g, b, tuple(groups), tuple(qo), tuple(ko))


@dataclass(frozen=True, eq=False)
class _Index:
    """Rows of a ``[h * n, block * w]`` view of ``h`` heads' q / k / v (flat over heads and
    blocks), group after group: ``q`` of the sparse query blocks (where their outputs and
    query gradients go back), ``kv`` of the key blocks per slot (where their gradients are
    summed)."""

    q: Tensor  # [h * nr]
    kv: Tensor  # [h * slots]


@lru_cache(maxsize=64)
def _index(plan: _Plan, h: int, device: torch.device) -> _Index:
    n = plan.n
    heads = np.arange(h, dtype=np.int64)
    qs, ks = [], []
    for gr in plan.groups:
        qs.append((heads[:, None] * n + gr.rows[None, :]).reshape(-1))
        ks.append((heads[:, None, None] * n + gr.idx[None]).reshape(-1))
    return _Index(*(torch.from_numpy(np.concatenate(x)).to(device) for x in (qs, ks)))


def _mask_bias(
    attn_mask: Tensor | None, dtype: torch.dtype, B: int, H: int, L: int, S: int
) -> Tensor | None:
    """An SDPA-style mask as an additive float tensor ``[Bm, Hm, Lm, S]`` (Lm in {1, L})."""
    if attn_mask is None:
        return None
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.shape[-1] != S or m.shape[-2] not in (1, L) or m.shape[0] not in (1, B):
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not fit [{B}, {H}, {L}, {S}]"
        )
    if m.shape[1] not in (1, H):
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not fit [{B}, {H}, {L}, {S}]"
        )
    if m.dtype == torch.bool:
        out = torch.zeros(m.shape, dtype=dtype, device=m.device)
        return out.masked_fill_(~m, float("-inf"))
    return m.to(dtype)


def _gather_mask(mb: Tensor, gr: _Group, block: int) -> Tensor:
    """The rows of group ``gr``'s query blocks of an additive mask, at their kept columns:
    ``[Bm, Hm, mc, block or 1, c*block]``."""
    Bm, Hm, Lm, S = mb.shape
    cols = gr.cols_t.to(mb.device)  # [mc, C]
    mc, C = cols.shape
    if Lm == 1:
        return mb[:, :, 0, :][:, :, cols].unsqueeze(3)
    rows = mb[:, :, gr.rows_t.to(mb.device), :].reshape(Bm, Hm, mc, block, S)
    ix = cols[None, None, :, None, :].expand(Bm, Hm, mc, block, C)
    return torch.gather(rows, 4, ix)


# --------------------------------------------------------------------------------------------
# the sparse rows: forward / backward
# --------------------------------------------------------------------------------------------
#
# Few, large ops: on a shared 2-core machine every parallel op pays a scheduling latency, so the
# kernel runs whole-tensor ops per group of query blocks (tiled over heads only when the score
# buffers would exceed TILE_ELEMS elements).


def _head_tiles(BH: int, per_head: int) -> list[tuple[int, int]]:
    hc = max(1, min(BH, TILE_ELEMS // max(per_head, 1)))
    return [(h0, min(BH, h0 + hc)) for h0 in range(0, BH, hc)]


class _Scratch(dict):
    """One thread's scratch buffers (a dict that can be weakly referenced, by identity)."""

    __hash__ = object.__hash__
    __eq__ = object.__eq__


_WS = threading.local()
_WS_ALL: weakref.WeakSet[_Scratch] = weakref.WeakSet()  # live threads' (workers' too)


def _ws(slot: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A reusable scratch buffer (per thread, per slot): big fresh allocations page-fault on
    every call, reused ones don't. Never saved for backward nor returned."""
    cache = getattr(_WS, "bufs", None)
    if cache is None:
        cache = _WS.bufs = _Scratch()
        with _POOL_LOCK:
            _WS_ALL.add(cache)
    # inference tensors (made under torch.inference_mode) can't be written outside it
    key = (slot, like.dtype, like.device, torch.is_inference_mode_enabled())
    n = math.prod(shape)
    buf = cache.get(key)
    if buf is None or buf.numel() < n:
        buf = cache[key] = torch.empty(n, dtype=like.dtype, device=like.device)
    return buf[:n].view(shape)


def release_workspace() -> None:
    """Free the scratch buffers of every thread that ran Pixelfly attention, the worker
    threads' included (they are kept between calls to avoid page faults). Not while an
    attention call runs."""
    with _POOL_LOCK:
        caches = list(_WS_ALL)
    for cache in caches:
        cache.clear()


def _gather(x: Tensor, index: Tensor, block: int, slot: str) -> Tensor:
    """Blocks ``index`` of ``x`` ``[h, n*block, w]`` (flat over heads and blocks):
    ``[len(index), block * w]`` in scratch."""
    h, L, w = x.shape
    out = _ws(slot, (index.numel(), block * w), x)
    return torch.index_select(x.reshape(h * (L // block), block * w), 0, index, out=out)


def _add_user_bias(s: Tensor, ubias: Tensor, h0: int, h1: int, H: int) -> None:
    """s: [h, m, block, C] scores of flat heads h0:h1; ubias: [Bm, Hm, m, block|1, C]."""
    Bm, Hm = ubias.shape[:2]
    if Bm == 1 and Hm == 1:
        s.add_(ubias[0, 0])
    elif h0 % H == 0 and h1 % H == 0:
        ub = ubias[h0 // H : h1 // H] if Bm > 1 else ubias
        s.view(-1, H, *s.shape[1:]).add_(ub)
    else:
        for j in range(h0, h1):
            bi, hi = divmod(j, H)
            s[j - h0].add_(ubias[bi if Bm > 1 else 0, hi if Hm > 1 else 0])


def _global_bias(
    mbias: Tensor | None, gl: int, Sg: int, causal: bool, like: Tensor
) -> Tensor | None:
    """Additive mask of the dense global query rows: ``[Bm, Hm, gl|1, Sg]`` or None."""
    bias = None
    if mbias is not None:
        bias = mbias[:, :, :gl, :Sg]
    if causal:
        tri = _causal_bias(gl, Sg, like.dtype, like.device)
        bias = tri if bias is None else bias + tri
    return bias


@lru_cache(maxsize=16)
def _causal_bias(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    tri = torch.zeros(rows, cols, dtype=dtype, device=device)
    upper = torch.ones(rows, cols, dtype=torch.bool, device=device).triu(1)
    return tri.masked_fill_(upper, -math.inf)


def _head_bias(bias: Tensor, h0: int, h1: int, B: int, H: int) -> Tensor:
    """Flat heads ``h0:h1`` of ``bias`` broadcastable to ``[B, H, r, c]``: ``[h|1, r, c]``."""
    if bias.dim() == 2 or bias.shape[0] == bias.shape[1] == 1:
        return bias.reshape(bias.shape[-2:])
    r, c = bias.shape[-2:]
    return bias.expand(B, H, r, c).reshape(B * H, r, c)[h0:h1]


def _per_head(plan: _Plan) -> int:
    """Score elements per head (all groups)."""
    return plan.slots * plan.block * plan.block


# Work is split over flat heads into one chunk per thread, each run by a worker thread with
# single-threaded ops: on a 2-core machine every OpenMP-parallel op pays a fork/join, which
# costs milliseconds when another process holds a core; per-thread chunks pay it once per call.

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _after_fork() -> None:  # a forked child has none of the parent's worker threads
    global _POOL_LOCK
    _POOLS.clear()
    _POOL_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _single_thread() -> None:
    torch.get_num_threads()  # (the thread's lazy init runs first, so it cannot undo the next line)
    torch.set_num_threads(1)


def _pool(n: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        pool = _POOLS.get(n)
        if pool is None:
            prev = torch.get_num_threads()
            pool = ThreadPoolExecutor(n, "pxcompile-attention", initializer=_single_thread)
            start = threading.Barrier(n)
            list(pool.map(lambda _: start.wait(), range(n)))  # all n workers running
            torch.set_num_threads(prev)  # set_num_threads(1) also changed the process default
            _POOLS[n] = pool
        return pool


def _chunks(BH: int, device: torch.device) -> list[tuple[int, int]]:
    """Flat-head ranges, one per worker thread: one per intra-op thread on CPU when there are
    at least as many heads; else a single one (run by the caller with parallel ops)."""
    nt = torch.get_num_threads() if device.type == "cpu" else 1
    if nt < 2 or BH < nt:
        return [(0, BH)]
    return [(BH * i // nt, BH * (i + 1) // nt) for i in range(nt)]


def _run_chunks(fn: Any, chunks: list[tuple[int, int]]) -> list[Any]:
    """``fn(i, h0, h1)`` per chunk: in the calling thread for one chunk, else on the pool (grad
    and inference modes as in the caller; the kernel's own ops never record autograd)."""
    if len(chunks) == 1:
        with torch.no_grad():
            return [fn(0, *chunks[0])]
    inf = torch.is_inference_mode_enabled()

    def task(i: int) -> Any:
        with torch.inference_mode(inf), torch.no_grad():
            return fn(i, *chunks[i])

    pool = _pool(len(chunks))
    futs = [pool.submit(task, i) for i in range(len(chunks))]
    return [f.result() for f in futs]


def _dropout_keep(shape: tuple[int, ...], p: float, gen: torch.Generator | None, like: Tensor):
    return torch.rand(shape, generator=gen, device=like.device, dtype=like.dtype) >= p


def _fwd_chunk(
    ctx: dict[str, Any], h0: int, h1: int, gen: torch.Generator | None
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Forward of flat heads ``h0:h1``: writes ``out[h0:h1]``; returns (probabilities,
    dropout masks, [global probabilities, global dropout mask]) to save."""
    q3, k3, v3, out = ctx["q3"], ctx["k3"], ctx["v3"], ctx["out"]
    plan, block, scale, causal = ctx["plan"], ctx["block"], ctx["scale"], ctx["causal"]
    mbias, ubias, dropout_p, grad = ctx["mbias"], ctx["ubias"], ctx["dropout_p"], ctx["grad"]
    B, H, L, d, dv_ = ctx["shape"]
    g, n = plan.g, plan.n
    gl = g * block
    glob: list[Tensor] = []
    if g:  # the dense global query rows
        Sg = gl if causal else L
        sg = torch.baddbmm(
            q3.new_empty(()), q3[h0:h1, :gl], k3[h0:h1, :Sg].transpose(1, 2), beta=0, alpha=scale
        )
        gb = _global_bias(mbias, gl, Sg, causal, q3)
        if gb is not None:
            sg.add_(_head_bias(gb, h0, h1, B, H))
        pg = torch.softmax(sg, -1)
        if mbias is not None:
            pg = pg.nan_to_num_(0.0)
        glob.append(pg)
        pgd = pg
        if dropout_p > 0:
            dg = _dropout_keep(pg.shape, dropout_p, gen, pg)
            glob.append(dg)
            pgd = pg * dg / (1 - dropout_p)
        out[h0:h1, :gl] = torch.bmm(pgd, v3[h0:h1, :Sg])
    tri = _causal_bias(block, block, q3.dtype, q3.device) if causal else None
    probs, drops = [], []
    for t0, t1 in _head_tiles(h1 - h0, _per_head(plan)):
        a0, a1, h = h0 + t0, h0 + t1, t1 - t0
        ix = _index(plan, h, q3.device)
        qg = _gather(q3[a0:a1], ix.q, block, "q")
        kg = _gather(k3[a0:a1], ix.kv, block, "k")
        vg = _gather(v3[a0:a1], ix.kv, block, "v")
        og = _ws("o", (h * plan.nr, block * dv_), q3)
        for gi, gr in enumerate(plan.groups):
            mc, c = gr.idx.shape
            C = c * block
            qa, qe = h * plan.qo[gi], h * plan.qo[gi + 1]
            ka, ke = h * plan.ko[gi], h * plan.ko[gi + 1]
            s = _ws("s", (h * mc, block, C), q3)
            kc = kg[ka:ke].view(h * mc, C, d)
            qc = qg[qa:qe].view(h * mc, block, d)
            torch.baddbmm(s, qc, kc.transpose(1, 2), beta=0, alpha=scale, out=s)
            if tri is not None:  # the diagonal (last) slot
                s[:, :, C - block :].add_(tri)
            if ubias is not None:
                _add_user_bias(s.view(h, mc, block, C), ubias[gi], a0, a1, H)
            if grad:
                p = torch.softmax(s, -1)
            else:  # no backward: the probabilities can live in scratch too
                p = torch.ops.aten._softmax.out(s, -1, False, out=_ws("p", s.shape, q3))
            if ubias is not None:
                p = p.nan_to_num_(0.0)  # rows the model's mask hides entirely
            pd = p
            if dropout_p > 0:
                keep = _dropout_keep(p.shape, dropout_p, gen, p)
                drops.append(keep)
                pd = p * keep / (1 - dropout_p)
            vc = vg[ka:ke].view(h * mc, C, dv_)
            torch.bmm(pd, vc, out=og[qa:qe].view(h * mc, block, dv_))
            if grad:
                probs.append(p)
        out[a0:a1].view(h * n, block * dv_).index_copy_(0, ix.q, og)
    return probs, drops, glob


def _bwd_chunk(
    ctx: dict[str, Any],
    h0: int,
    h1: int,
    probs: list[Tensor],
    drops: list[Tensor],
    glob: list[Tensor],
) -> None:
    """Backward of flat heads ``h0:h1``: writes ``dq``, ``dk``, ``dv`` ``[h0:h1]``."""
    q3, k3, v3, out, go3 = ctx["q3"], ctx["k3"], ctx["v3"], ctx["out"], ctx["go3"]
    dq, dk, dv = ctx["dq"], ctx["dk"], ctx["dv"]  # dk, dv: [BH, n, block * d]
    plan, block, scale, dropout_p = ctx["plan"], ctx["block"], ctx["scale"], ctx["dropout_p"]
    B, H, L, d, dv_ = ctx["shape"]
    g, n = plan.g, plan.n
    gl = g * block
    ng = len(plan.groups)
    delta_all = None
    if dropout_p == 0:
        delta_all = (go3[h0:h1] * out[h0:h1]).sum(-1)  # [h, L]
    for t, (t0, t1) in enumerate(_head_tiles(h1 - h0, _per_head(plan))):
        a0, a1, h = h0 + t0, h0 + t1, t1 - t0
        ix = _index(plan, h, q3.device)
        qg = _gather(q3[a0:a1], ix.q, block, "q")
        gog = _gather(go3[a0:a1], ix.q, block, "go")
        kg = _gather(k3[a0:a1], ix.kv, block, "k")
        vg = _gather(v3[a0:a1], ix.kv, block, "v")
        if delta_all is not None:
            dlt = _gather(delta_all[t0:t1].unsqueeze(-1), ix.q, block, "dl")
        dqg = _ws("dq", (h * plan.nr, block * d), q3)
        # per (query block, slot) K / V gradients, summed per key block below
        bk = _ws("bk", (h * plan.slots, block * d), q3)
        bv = _ws("bv", (h * plan.slots, block * dv_), q3)
        for gi, gr in enumerate(plan.groups):
            mc, c = gr.idx.shape
            C = c * block
            qa, qe = h * plan.qo[gi], h * plan.qo[gi + 1]
            ka, ke = h * plan.ko[gi], h * plan.ko[gi + 1]
            p = probs[t * ng + gi]
            qc = qg[qa:qe].view(h * mc, block, d)
            gc = gog[qa:qe].view(h * mc, block, dv_)
            kc = kg[ka:ke].view(h * mc, C, d)
            vc = vg[ka:ke].view(h * mc, C, dv_)
            dp = _ws("s", (h * mc, block, C), q3)
            torch.bmm(gc, vc.transpose(1, 2), out=dp)
            if dropout_p > 0:
                keep = drops[t * ng + gi]
                dp.mul_(keep).div_(1 - dropout_p)
                pd = p * keep / (1 - dropout_p)
                delta = (dp * p).sum(-1, keepdim=True)
            else:
                pd = p
                delta = dlt[qa:qe].view(h * mc, block, 1)
            ds = dp.sub_(delta).mul_(p)
            dqc = dqg[qa:qe].view(h * mc, block, d)
            torch.baddbmm(dqc, ds, kc, beta=0, alpha=scale, out=dqc)
            ok = bk[ka:ke].view(h * mc, C, d)
            torch.baddbmm(ok, ds.transpose(1, 2), qc, beta=0, alpha=scale, out=ok)
            ov = bv[ka:ke].view(h * mc, C, dv_)
            torch.bmm(pd.transpose(1, 2), gc, out=ov)
        dq[a0:a1].view(h * n, block * d).index_copy_(0, ix.q, dqg)
        dk[a0:a1].view(h * n, block * d).index_add_(0, ix.kv, bk)
        dv[a0:a1].view(h * n, block * dv_).index_add_(0, ix.kv, bv)
    if g:  # the dense global query rows
        pg = glob[0]
        Sg = pg.shape[-1]
        gog = go3[h0:h1, :gl]
        dpg = torch.bmm(gog, v3[h0:h1, :Sg].transpose(1, 2))
        if dropout_p > 0:
            keep = glob[1]
            dpg.mul_(keep).div_(1 - dropout_p)
            pgd = pg * keep / (1 - dropout_p)
            dlt = (dpg * pg).sum(-1, keepdim=True)
        else:
            pgd = pg
            dlt = delta_all[:, :gl, None]
        dsg = dpg.sub_(dlt).mul_(pg)
        dq[h0:h1, :gl] = torch.baddbmm(dsg.new_empty(()), dsg, k3[h0:h1, :Sg], beta=0, alpha=scale)
        dk3 = dk.view(-1, L, d)[h0:h1, :Sg]
        dv3 = dv.view(-1, L, dv_)[h0:h1, :Sg]
        # (an in-place baddbmm_ on these strided views would run one addmm per head)
        dk3 += torch.baddbmm(
            dsg.new_empty(()), dsg.transpose(1, 2), q3[h0:h1, :gl], beta=0, alpha=scale
        )
        dv3 += torch.bmm(pgd.transpose(1, 2), gog)


class _PixelflyFn(torch.autograd.Function):
    """Pixelfly attention on q, k, v ``[B, H, L, d]`` (contiguous): the ``g * block`` global
    query rows densely, the others group by group over their kept key blocks only (see
    :class:`_Plan`), one chunk of heads per thread."""

    @staticmethod
    def forward(ctx, q, k, v, plan, block, scale, causal, mbias, dropout_p):  # type: ignore[override]
        B, H, L, d = q.shape
        dv_ = v.shape[-1]
        BH = B * H
        out = q.new_empty(BH, L, dv_)
        ubias = None
        if mbias is not None:
            ubias = [_gather_mask(mbias, gr, block) for gr in plan.groups]
        chunks = _chunks(BH, q.device)
        gens: list[torch.Generator | None] = [None] * len(chunks)
        if dropout_p > 0 and len(chunks) > 1:  # reproducible under torch.manual_seed
            seeds = torch.randint(0, 2**62, (len(chunks),)).tolist()
            gens = [torch.Generator().manual_seed(s) for s in seeds]
        c = {
            "q3": q.view(BH, L, d), "k3": k.view(BH, L, d), "v3": v.view(BH, L, dv_),
            "out": out, "plan": plan, "block": block, "scale": scale, "causal": causal,
            "mbias": mbias, "ubias": ubias, "dropout_p": dropout_p, "shape": (B, H, L, d, dv_),
            "grad": any(ctx.needs_input_grad[:3]),
        }  # fmt: skip
        res = _run_chunks(lambda i, h0, h1: _fwd_chunk(c, h0, h1, gens[i]), chunks)
        counts = [tuple(len(x) for x in r) for r in res]
        ctx.save_for_backward(q, k, v, out, *(t for r in res for part in r for t in part))
        ctx.meta = (plan, block, scale, causal, mbias, dropout_p, chunks, counts)
        return out.view(B, H, L, dv_)

    @staticmethod
    def backward(ctx, go):  # type: ignore[override]
        plan, block, scale, causal, mbias, dropout_p, chunks, counts = ctx.meta
        q, k, v, out, *rest = ctx.saved_tensors
        B, H, L, d = q.shape
        dv_ = v.shape[-1]
        BH = B * H
        n = plan.n
        parts = []
        for cnt in counts:
            ps = []
            for m in cnt:
                ps.append(rest[:m])
                rest = rest[m:]
            parts.append(ps)
        c = {
            "q3": q.view(BH, L, d), "k3": k.view(BH, L, d), "v3": v.view(BH, L, dv_),
            "out": out, "go3": go.contiguous().view(BH, L, dv_), "plan": plan, "block": block,
            "scale": scale, "causal": causal, "dropout_p": dropout_p,
            "shape": (B, H, L, d, dv_), "dq": torch.empty(BH, L, d, dtype=q.dtype, device=q.device),
            "dk": torch.zeros(BH, n, block * d, dtype=k.dtype, device=k.device),
            "dv": torch.zeros(BH, n, block * dv_, dtype=v.dtype, device=v.device),
        }  # fmt: skip
        _run_chunks(lambda i, h0, h1: _bwd_chunk(c, h0, h1, *parts[i]), chunks)
        return (
            c["dq"].view(B, H, L, d),
            c["dk"].view(B, H, L, d),
            c["dv"].view(B, H, L, dv_),
            None,
            None,
            None,
            None,
            None,
            None,
        )


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: BlockLayout,
    causal: bool,
    attn_mask: Tensor | None,
    scale: float,
    dropout_p: float,
) -> Tensor:
    """Pixelfly attention over the kept blocks of ``layout`` (not a full layout) on
    ``[B, H, L, d]`` tensors; ``attn_mask`` as for SDPA (bool: True = attend, or additive),
    the key padding already folded in."""
    B, H, L, _ = q.shape
    plan = _plan(layout, causal)
    mbias = _mask_bias(attn_mask, q.dtype, B, H, L, L)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _PixelflyFn.apply(q, k, v, plan, layout.block, scale, causal, mbias, float(dropout_p))
