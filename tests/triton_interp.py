"""Running a test module in Triton's interpreter (no GPU needed).

``TRITON_INTERPRET=1`` only works when it is set before the process imports triton (Triton
builds its library functions for the interpreter or the compiler at import), and a pytest run
has usually imported it long before (PyTorch imports it). So a module that tests Triton kernels
marks its tests :data:`interpreter_only` and adds ``test_in_triton_interpreter``, which reruns
the module in a child pytest with ``TRITON_INTERPRET=1`` set from the start: the parent reports
one test (the child's output on failure), the child runs the real ones. Nothing leaks into the
other tests' process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

#: This process runs Triton kernels interpreted (set before it started).
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET", "") == "1"

interpreter_only = pytest.mark.skipif(
    not IN_INTERPRETER, reason="runs in the TRITON_INTERPRET=1 child of test_in_triton_interpreter"
)


def run_in_interpreter(path: str, timeout: float = 600) -> None:
    """Run the test module ``path`` in a child pytest with ``TRITON_INTERPRET=1``; fail with
    the child's output unless all its tests pass."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("PYTEST_ADDOPTS", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(path)]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    if r.returncode != 0:
        pytest.fail(f"interpreted tests failed (rc {r.returncode}):\n{out[-8000:]}", pytrace=False)
    if " passed" not in out:
        pytest.fail(f"interpreted tests did not run:\n{out[-4000:]}", pytrace=False)
