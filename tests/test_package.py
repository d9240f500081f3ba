"""The package's shape: no import circles, and the plain-data modules stay torch-free.

The import graph counts every ``import`` in the package, deferred ones inside functions too:
a deferred import hides a circle from Python, not from a reader.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pxcompile"

# Circles left to break (each a deferred import today); a new one fails the test.
KNOWN_CIRCLES = {
    frozenset({"pxcompile.attention", "pxcompile.ops"}),
}

# Plain data and the command's front: importing them must not import torch (planning a YAML
# schema, `pxcompile --help`, reading a plan).
TORCH_FREE = (
    "pxcompile.patterns",
    "pxcompile.schema",
    "pxcompile.policy",
    "pxcompile.plans",
    "pxcompile.cost_file",
    "pxcompile.check",
    "pxcompile.cli",
    "pxcompile.cli.main",
    "pxcompile.cli.common",
)


def module_names() -> dict[str, Path]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from pkg import mod`` counts as ``mod``)."""
    mods = module_names()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                subs = [f"{target}.{a.name}" for a in node.names]
                found = [s for s in subs if s in mods]
                targets = found + ([target] if len(found) < len(subs) else [])
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {t for t in targets if t in mods and t != m}
    return graph


def circles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.add(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_sees_deferred_imports():
    graph = import_graph()
    assert "pxcompile.cli.compile_model" in graph["pxcompile.cli.main"]  # deferred
    assert "pxcompile.inputs" in graph["pxcompile.check"]  # deferred
    assert "pxcompile.cli.common" in graph["pxcompile.cli.check"]  # module level


def test_no_new_import_circles():
    found = circles(import_graph())
    new = found - KNOWN_CIRCLES
    assert not new, f"import circles: {[sorted(c) for c in new]}"
    gone = KNOWN_CIRCLES - found
    assert not gone, f"broken circles still listed in KNOWN_CIRCLES: {[sorted(c) for c in gone]}"


def test_the_command_and_check_do_not_import_each_other():
    graph = import_graph()
    assert "pxcompile.cli" not in graph["pxcompile.check"]
    assert not any(m.startswith("pxcompile.cli") for m in graph["pxcompile.check"])
    assert "pxcompile.attention" not in graph["pxcompile.patterns"]


def test_plain_data_modules_do_not_import_torch():
    code = (
        "import importlib, sys\n"
        f"for m in {TORCH_FREE!r}:\n"
        "    importlib.import_module(m)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False", out.stderr
