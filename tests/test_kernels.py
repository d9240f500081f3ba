"""pxcompile.kernels: which kernel runs (PXCOMPILE_KERNELS, device, triton, interpreter)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from pxcompile import kernels
from pxcompile.errors import PxError
from pxcompile.layers import PixelflyLinear
from pxcompile.patterns import PatternSpec

CUDA = SimpleNamespace(device=torch.device("cuda"))  # a "tensor" on CUDA, no GPU needed
CPU = torch.zeros(1)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_setting_default_and_values(monkeypatch):
    assert kernels.setting() == "auto"
    for raw, want in (("", "auto"), ("torch", "torch"), (" Triton ", "triton"), ("AUTO", "auto")):
        monkeypatch.setenv(kernels.ENV, raw)
        assert kernels.setting() == want


def test_bad_setting_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "cuda")
    with pytest.raises(PxError, match="PXCOMPILE_KERNELS='cuda' is not one of auto, torch, triton"):
        kernels.select("linear", CPU)
    layer = PixelflyLinear(64, 128, PatternSpec(4, 2, 16, 0))
    with pytest.raises(PxError) as err:
        layer(torch.randn(3, 64))
    assert "\n" not in str(err.value)


def test_auto_and_torch(monkeypatch):
    assert kernels.select("linear", CPU) == "torch"
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    assert kernels.select("linear", CUDA) == "triton"
    assert kernels.select("no-such-op", CUDA) == "torch"  # no Triton kernel: torch, in auto
    monkeypatch.setenv(kernels.ENV, "torch")
    assert kernels.select("linear", CUDA) == "torch"
    monkeypatch.setenv(kernels.ENV, "auto")
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    assert kernels.select("linear", CUDA) == "torch"


def test_triton_where_it_cannot_run_is_an_error(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "triton")
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    with pytest.raises(PxError, match="triton is not installed"):
        kernels.select("linear", CUDA)
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    with pytest.raises(PxError, match="no Triton kernel for no-such-op"):
        kernels.select("no-such-op", CUDA)
    assert kernels.select("linear", CUDA) == "triton"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv(kernels.ENV, "triton")
    with pytest.raises(PxError, match=r"on cpu it needs Triton's interpreter \(TRITON_INTERPRET=1"):
        kernels.select("linear", CPU)
    layer = PixelflyLinear(64, 128, PatternSpec(4, 2, 16, 0))
    with pytest.raises(PxError, match="TRITON_INTERPRET"):
        layer(torch.randn(3, 64))


def test_interpreter_set_after_triton_import_is_an_error():
    """TRITON_INTERPRET=1 set once triton is imported cannot work (Triton's own library is
    built for the compiler by then): a one-line error saying to set it before Python starts."""
    pytest.importorskip("triton")
    code = (
        "import os, torch, triton\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "os.environ['PXCOMPILE_KERNELS'] = 'triton'\n"
        "from pxcompile.errors import PxError\n"
        "from pxcompile.kernels import select\n"
        "try:\n"
        "    select('linear', torch.zeros(1))\n"
        "except PxError as e:\n"
        "    print('PXERROR', e)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert "PXERROR TRITON_INTERPRET=1 was set after triton was imported" in r.stdout, r.stderr


def test_errors_stay_one_line_under_torch_compile(monkeypatch):
    """The choice is a constant to dynamo: a bad setting is the same PxError, not an internal
    dynamo error around it."""
    monkeypatch.setenv(kernels.ENV, "bogus")
    layer = PixelflyLinear(64, 128, PatternSpec(4, 2, 16, 0))
    with pytest.raises(PxError) as err:
        torch.compile(layer, backend="eager")(torch.randn(3, 64))
    assert str(err.value) == "PXCOMPILE_KERNELS='bogus' is not one of auto, torch, triton"
    torch._dynamo.reset()
