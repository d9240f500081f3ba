"""Training a compiled model the way users do: DDP (gloo, 2 processes), torch.compile,
autocast (bf16 on CPU), gradient clipping, optimizer state save/restore, and checkpoints that
resume across ``pxcompile.save`` / ``pxcompile.load``."""

from __future__ import annotations

import io
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from models_zoo import CausalSDPA
from torch import nn

import pxcompile
from pxcompile.layers import PixelflyLinear

STEPS = 4
GLOBAL_BATCH = 16


def _dense(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 10)
    )


def _compiled(seed: int = 0) -> torch.fx.GraphModule:
    """Budget 0.4 with rank 8: butterfly blocks and a low-rank term in every rewritten layer."""
    x = torch.randn(4, 64)
    gm = pxcompile.sparsify(
        _dense(seed), 0.4, block=16, example_inputs=(x,), policy={"rank": 8, "min_speedup": 0}
    )
    assert len(gm.pxcompile_layers) >= 2
    assert all(gm.get_submodule(p).spec.rank > 0 for p in gm.pxcompile_layers.values())
    return gm


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 64, generator=g), torch.randint(
        0, 10, (GLOBAL_BATCH,), generator=g
    )


def _train(model, steps, rank=0, world=1, opt=None):
    opt = opt or torch.optim.AdamW(model.parameters(), lr=1e-2)
    per = GLOBAL_BATCH // world
    for step in range(steps):
        x, y = _data(step)
        x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return opt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        gm = _compiled(seed=rank)  # different init per rank: DDP must broadcast rank 0's
        ddp = nn.parallel.DistributedDataParallel(gm)
        _train(ddp, STEPS, rank, world)
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in gm.state_dict().items()}, out)
    finally:
        dist.destroy_process_group()


def _fsdp2_worker(rank: int, world: int, port: int, out: str) -> None:
    import warnings

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        gm = _compiled(seed=0)  # FSDP shards what each rank holds: same init everywhere
        with warnings.catch_warnings():
            # FSDP2 warns when a module returns a view of its input or its workspace (an
            # in-place op on it would skip FSDP's hooks): PixelflyLinear must not.
            warnings.simplefilter("error")
            for m in gm.modules():
                if isinstance(m, PixelflyLinear):
                    fully_shard(m, mesh=mesh)
            fully_shard(gm, mesh=mesh)
            _train(gm, STEPS + 1, rank, world)
        state = {k: v.full_tensor().detach().clone() for k, v in gm.state_dict().items()}
        if rank == 0:
            torch.save(state, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_process(tmp_path):
    """FSDP2 (``fully_shard`` per sparse layer and on the root, gloo, 2 processes, half the
    batch each) trains exactly like one process on the whole batch."""
    out = str(tmp_path / "fsdp.pt")
    mp.spawn(_fsdp2_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    got = torch.load(out)
    ref = _compiled(seed=0)
    _train(ref, STEPS + 1)
    want = ref.state_dict()
    assert set(got) == set(want)
    for k, w in want.items():
        torch.testing.assert_close(got[k], w, rtol=0, atol=1e-5, msg=k)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    got = torch.load(out)
    ref = _compiled(seed=0)
    _train(ref, STEPS)
    want = ref.state_dict()
    assert set(got) == set(want)
    assert any(isinstance(m, PixelflyLinear) for m in ref.modules())
    moved = 0.0
    for k, w in want.items():
        torch.testing.assert_close(got[k], w, rtol=1e-4, atol=1e-5, msg=k)
        moved = max(moved, float((w - _compiled(0).state_dict()[k]).abs().max()))
    assert moved > 1e-3  # the weights did train


@pytest.mark.slow
def test_torch_compile_forward_backward():
    gm = _compiled()
    x, y = _data(0)
    ref = gm(x)
    nn.functional.cross_entropy(ref, y).backward()
    want = {n: p.grad.clone() for n, p in gm.named_parameters()}
    gm.zero_grad()
    out = torch.compile(gm)(x)
    nn.functional.cross_entropy(out, y).backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for n, p in gm.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-5, msg=n)


def test_autocast_bf16_forward_backward_close_to_fp32():
    gm = _compiled()
    x, y = _data(0)
    ref = gm(x)
    nn.functional.cross_entropy(ref, y).backward()
    want = {n: p.grad.clone() for n, p in gm.named_parameters()}
    gm.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gm(x)
        loss = nn.functional.cross_entropy(out.float(), y)
    loss.backward()
    assert torch.isfinite(out).all()
    rel = float((out.float() - ref).detach().norm() / ref.detach().norm())
    assert rel < 3e-2, rel
    for n, p in gm.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype, n
        assert torch.isfinite(p.grad).all(), n
        g_rel = float((p.grad - want[n]).norm() / want[n].norm().clamp_min(1e-12))
        assert g_rel < 0.1, (n, g_rel)


def test_gradient_clipping():
    gm = _compiled()
    x, y = _data(0)
    (100 * nn.functional.cross_entropy(gm(x), y)).backward()
    grads = [p.grad for p in gm.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    total = torch.nn.utils.clip_grad_norm_(gm.parameters(), 0.5)
    torch.testing.assert_close(total, norm)
    assert norm > 0.5
    after = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in gm.parameters()])
    )
    assert after == pytest.approx(0.5, rel=1e-4)


def _snapshot(model, opt) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    return buf.getvalue()


def test_optimizer_state_save_restore_resumes_identically():
    gm = _compiled()
    opt = _train(gm, 3)
    blob = _snapshot(gm, opt)
    _train(gm, 3, opt=opt)
    want = gm.state_dict()

    again = _compiled(seed=5)  # another init: everything must come from the checkpoint
    ck = torch.load(io.BytesIO(blob))
    again.load_state_dict(ck["model"])
    opt2 = torch.optim.AdamW(again.parameters(), lr=1e-2)
    opt2.load_state_dict(ck["opt"])
    _train(again, 3, opt=opt2)
    for k, v in again.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0, msg=k)


def test_parameter_names_stable_across_save_load_and_checkpoint_resumes(tmp_path):
    gm = _compiled()
    opt = _train(gm, 2)
    path = tmp_path / "m.px"
    pxcompile.save(gm, path)
    blob = _snapshot(gm, opt)
    _train(gm, 2, opt=opt)
    want = gm.state_dict()

    loaded = pxcompile.load(path, model=_dense(seed=7))
    assert [n for n, _ in loaded.named_parameters()] == [n for n, _ in gm.named_parameters()]
    assert list(loaded.state_dict()) == list(gm.state_dict())
    ck = torch.load(io.BytesIO(blob))
    for k, v in loaded.state_dict().items():  # the file holds the weights of the checkpoint
        torch.testing.assert_close(v, ck["model"][k], rtol=0, atol=0, msg=k)
    loaded.train()
    opt2 = torch.optim.AdamW(loaded.parameters(), lr=1e-2)
    opt2.load_state_dict(ck["opt"])  # same groups, same order: the optimizer state fits
    _train(loaded, 2, opt=opt2)
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0, msg=k)


def _with_attention() -> tuple[torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 256, 32)
    policy = {"attention_min_seq": 256, "attention_block": 16}
    gm = pxcompile.sparsify(CausalSDPA(32), 0.3, block=8, example_inputs=(x,), policy=policy)
    assert gm.pxcompile_plan.sparse_attention_layers
    return gm, x


@pytest.mark.slow
def test_torch_compile_with_pixelfly_attention():
    gm, x = _with_attention()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = gm(a)
    ref.pow(2).sum().backward()
    out = torch.compile(gm)(b)  # attention is one opaque operator to dynamo
    out.pow(2).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5)


def test_pixelfly_attention_in_inference_mode_then_no_grad():
    gm, x = _with_attention()
    gm.eval()
    with torch.inference_mode():
        a = gm(x)
    with torch.no_grad():  # scratch buffers made under inference_mode are not reused here
        b = gm(x)
    torch.testing.assert_close(a, b)
