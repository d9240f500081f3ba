"""Checks on a model file before and while it is loaded (see :mod:`pxcompile.serialize`).

Everything here treats the file as hostile: it is read with bounded sizes, and no part of it
reaches code (torch's deserializer, sympy, generated Python) before it passed these checks.
"""

from __future__ import annotations

import ast
import json
import operator
import re
import zipfile
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from .errors import ModelFileError, PxError

_MAX_JSON_BYTES = 512 << 20  # a header / program bigger than this is not ours


class UnsafeFileError(ModelFileError):
    """A model file asks for something loading never does (foreign ops, code, objects)."""


DTYPES: dict[str, torch.dtype] = {
    str(dt).removeprefix("torch."): dt
    for dt in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.complex64,
        torch.complex128,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}
DTYPE_NAMES = {dt: name for name, dt in DTYPES.items()}


def read_tensor(zf: zipfile.ZipFile, path: str, info: dict) -> torch.Tensor:
    name = info["name"]
    dtype = DTYPES.get(info.get("dtype"))
    shape = info.get("shape")
    if dtype is None:
        raise ModelFileError(
            f"{path}: corrupt file: tensor {name!r} has an unknown dtype {info.get('dtype')!r}"
        )
    if not isinstance(shape, list) or not all(is_int(s) and 0 <= s < 1 << 48 for s in shape):
        raise ModelFileError(f"{path}: corrupt file: tensor {name!r} has a bad shape")
    numel = 1
    for s in shape:
        numel *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = numel * itemsize
    entry = info.get("entry")
    try:
        zinfo = zf.getinfo(entry)
    except (KeyError, TypeError):
        raise ModelFileError(f"{path}: corrupt file: no data for tensor {name!r}") from None
    if zinfo.file_size != nbytes:
        raise ModelFileError(
            f"{path}: corrupt file: tensor {name!r} has {zinfo.file_size} bytes, expected {nbytes}"
        )
    raw = torch.empty(nbytes, dtype=torch.uint8)
    buf = memoryview(raw.numpy())
    with zf.open(zinfo) as f:
        got = 0
        while got < nbytes:
            n = f.readinto(buf[got:])
            if not n:
                break
            got += n
        if got != nbytes or f.read(1):  # reading to the end also checks the CRC
            raise ModelFileError(f"{path}: corrupt file: tensor {name!r} is truncated")
    return raw.view(dtype).reshape(shape)


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_FQN_PART = re.compile(r"[A-Za-z0-9_]+\Z")
_OP = re.compile(
    r"torch\.ops\.(aten|prims|pxcompile)\."
    r"((?!__)[A-Za-z_][A-Za-z0-9_]*|__i?(and|or|xor|lshift|rshift)__)"  # aten's few dunder ops
    r"\.(?!_)[A-Za-z0-9_]+\Z"
)
_PY_OPS = {
    "_operator.getitem": operator.getitem,
    **{
        f"_operator.{n}": getattr(operator, n)
        for n in (
            "add sub mul floordiv truediv mod pow neg pos eq ne lt le gt ge and_ or_ lshift rshift"
        ).split()
    },
    "math.trunc": __import__("math").trunc,
    **{
        f"torch.{n}": getattr(torch, n)
        for n in "sym_int sym_float sym_not sym_ite sym_max sym_min sym_sqrt".split()
        if hasattr(torch, n)
    },
}
_OP_NAMESPACES = {"aten", "prims", "pxcompile"}
_FORBIDDEN = {
    "as_graph": "a sub-graph (higher-order operator)",
    "as_operator": "an operator as an argument",
    "as_custom_obj": "a script object",
    "custom_obj": "a script object",
    "token": "an effect token",
    "as_int_lists": "a kernel grid",
    "as_float_lists": "a kernel argument",
    "as_nested_tensors": "a nested tensor list",
}
_NAME_KEYS = {"name", "as_name", "user_input_name"}
_FQN_KEYS = {"parameter_name", "buffer_name", "tensor_constant_name", "fqn"}
# names a shape expression may use (sympy evaluates these strings)
_SYMBOL = re.compile(r"(s|u|d|zf|zuf|ps|c|q|f|i)[0-9]+\Z")
_EXPR_FUNCS = set(
    "Symbol Integer Float Rational Add Mul Max Min Abs Eq Ne Lt Le Gt Ge StrictLessThan "
    "StrictGreaterThan LessThan GreaterThan Equality Unequality And Or Not Piecewise ExprCondPair "
    "FloorDiv ModularIndexing Where PythonMod Mod CleanDiv CeilToInt FloorToInt CeilDiv LShift "
    "RShift FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt "
    "RoundToInt RoundDecimal ToFloat Identity".split()
)
_EXPR_CONSTS = set(
    "true false True False oo Infinity NegativeInfinity Zero One NegativeOne".split()
)
_EXPR_OPS = (
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.FloorDiv,
    ast.Mod,
    ast.USub,
    ast.UAdd,
    ast.Not,
    ast.Invert,
    ast.BitAnd,
    ast.BitOr,
    ast.And,
    ast.Or,
    ast.Eq,
    ast.NotEq,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
)
_NUMBER = re.compile(r"-?[0-9]{1,40}(\.[0-9]{1,40})?([eE][-+]?[0-9]{1,4})?\Z")


class Unsafe(Exception):
    pass


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_expr(s: Any) -> None:
    """A symbolic-shape expression must be plain arithmetic on shape symbols."""
    if not isinstance(s, str) or len(s) > 4096:
        raise Unsafe("a shape expression that is not a short string")
    try:
        tree = ast.parse(s, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise Unsafe(f"a shape expression that does not parse: {s[:60]!r}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Expression | ast.Load | ast.keyword | ast.Tuple) or isinstance(
            node, _EXPR_OPS
        ):
            continue
        if isinstance(node, ast.BinOp | ast.UnaryOp | ast.BoolOp | ast.Compare):
            continue  # operators themselves are walked (and checked) as their own nodes
        if isinstance(node, ast.Name):
            if node.id in _EXPR_FUNCS or node.id in _EXPR_CONSTS or _SYMBOL.match(node.id):
                continue
            raise Unsafe(f"the name {node.id!r} in a shape expression")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _EXPR_FUNCS:
                raise Unsafe("a call to something else than a shape function")
            for kw in node.keywords:
                if kw.arg is None or not re.fullmatch(r"[a-z_]{1,32}", kw.arg):
                    raise Unsafe("a keyword argument in a shape expression")
            continue
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool) or v is None:
                continue
            if is_int(v) and abs(v) < 1 << 64:
                continue
            if isinstance(v, float):
                continue
            if isinstance(v, str) and (_SYMBOL.match(v) or _NUMBER.match(v)):
                continue
            raise Unsafe(f"the constant {str(v)[:40]!r} in a shape expression")
        raise Unsafe(f"{type(node).__name__} in a shape expression")


def _check_ident(v: Any, what: str) -> None:
    if not isinstance(v, str) or not _IDENT.match(v) or v.startswith("__"):
        raise Unsafe(f"{what} {str(v)[:60]!r} that is not an identifier")


def check_fqn(v: Any, what: str) -> None:
    if v == "" and what == "module path":
        return
    if not isinstance(v, str) or len(v) > 1000:
        raise Unsafe(f"a {what} that is not a string")
    for part in v.split("."):
        if not _FQN_PART.match(part) or part.startswith("__"):
            raise Unsafe(f"the {what} {v[:60]!r}")


def _walk(obj: Any, depth: int = 0) -> None:
    if depth > 200:
        raise Unsafe("nesting too deep")
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in _FORBIDDEN:
                raise Unsafe(_FORBIDDEN[k])
            if k == "expr_str":
                _check_expr(v)
            elif k in _NAME_KEYS:
                if v is not None:
                    _check_ident(v, "a name")
            elif k in _FQN_KEYS:
                check_fqn(v, "module path" if k == "fqn" else "parameter path")
            elif k == "metadata":
                continue  # dropped
            _walk(v, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            _walk(v, depth + 1)


class Unregistered(Exception):
    pass


def _check_treespec(spec: Any) -> None:
    """Input / output structures may only use container types registered with pytree (a
    look-up; nothing is imported)."""
    known = getattr(pytree, "SERIALIZED_TYPE_TO_PYTHON_TYPE", None)
    stack = [spec[1] if isinstance(spec, list) and len(spec) == 2 else spec]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            raise ValueError("bad tree spec")
        t = node.get("type")
        if t is not None:
            if not isinstance(t, str):
                raise ValueError("bad tree spec")
            if known is not None and t not in known:
                raise Unregistered(t)
        stack.extend(node.get("children_spec") or [])


def strip_metadata(d: dict) -> None:
    """Drops node metadata (stack traces, module paths): loading never needs it."""
    gm = d.get("graph_module")
    if isinstance(gm, dict):
        if "metadata" in gm:
            gm["metadata"] = {}
        graph = gm.get("graph")
        if isinstance(graph, dict) and isinstance(graph.get("nodes"), list):
            for node in graph["nodes"]:
                if isinstance(node, dict):
                    node["metadata"] = {}


def check_program(d: Any) -> dict:
    """Checks the program JSON (see the module doc) and drops what loading never needs."""
    if not isinstance(d, dict) or not isinstance(d.get("graph_module"), dict):
        raise ValueError("no graph module")
    gm = d["graph_module"]
    graph = gm.get("graph")
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        raise ValueError("no graph")
    if d.get("guards_code"):
        raise Unsafe("guard code")
    if graph.get("custom_obj_values"):
        raise Unsafe("script objects")
    for inp in graph.get("inputs") or []:
        if not isinstance(inp, dict) or len(inp) != 1:
            raise ValueError("bad graph input")
        kind = next(iter(inp))
        if kind not in ("as_tensor", "as_sym_int", "as_int", "as_float", "as_bool", "as_none"):
            raise Unsafe(f"a graph input of kind {kind!r}")
    for node in graph["nodes"]:
        if not isinstance(node, dict):
            raise ValueError("bad node")
        target = node.get("target")
        if not isinstance(target, str) or not (_OP.match(target) or target in _PY_OPS):
            raise Unsafe(f"the operator {str(target)[:80]!r}")
    for key in ("tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values"):
        for name in (graph.get(key) or {}).keys():
            _check_ident(name, "a value name")
    for name in (d.get("range_constraints") or {}).keys():
        if not _SYMBOL.match(name):
            raise Unsafe(f"the shape symbol {name[:40]!r}")
    for entry in gm.get("module_call_graph") or []:
        sig = entry.get("signature") if isinstance(entry, dict) else None
        if isinstance(sig, dict):
            for name in sig.get("forward_arg_names") or []:
                _check_ident(name, "an argument name")
            for key in ("in_spec", "out_spec"):
                if not isinstance(sig.get(key), str):
                    raise ValueError("bad tree spec")
                _check_treespec(json.loads(sig[key]))
    for type_name, fields in (gm.get("treespec_namedtuple_fields") or {}).items():
        check_fqn(type_name, "type name")
        for f in (fields or {}).get("field_names") or []:
            _check_ident(f, "a field name")
    _walk(d)
    strip_metadata(d)
    d["guards_code"] = []
    return d


def check_fx_graph(graph: fx.Graph, where: str, error: type[PxError]) -> None:
    """Every node of the (deserialized or exported) graph calls an allowed operator."""
    allowed_py = set(_PY_OPS.values())
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op != "call_function":
            raise error(f"{where}: the graph has a {node.op} node ({node.target})")
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            if t.namespace not in _OP_NAMESPACES:
                raise error(
                    f"{where}: the graph calls {t}, outside the aten/prims/pxcompile operators "
                    "a model file may use"
                )
        elif t not in allowed_py:
            raise error(f"{where}: the graph calls {getattr(t, '__name__', t)!r}")


def read_json(zf: zipfile.ZipFile, entry: str, path: str) -> Any:
    try:
        info = zf.getinfo(entry)
    except KeyError:
        raise ModelFileError(f"{path}: corrupt file: no {entry}") from None
    if info.file_size > _MAX_JSON_BYTES:
        raise ModelFileError(f"{path}: corrupt file: {entry} is too large")
    return json.loads(zf.read(info).decode("utf-8"))
