"""Checks on a model file before and while it is loaded (see :mod:`pxcompile.serialize`).

Everything here treats the file as hostile. The archive is read with bounded sizes (JSON
members up to a cap, tensors only as many bytes as the graph declares and the archive
physically holds); the program may call only the operators of
:mod:`pxcompile.serialize_ops`; shape expressions are parsed by :mod:`pxcompile.shape_expr`
and handed on re-written, so no text from the file reaches sympy's parser, torch's
deserializer or generated Python before it passed these checks.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections import Counter
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from .errors import ModelFileError, PxError
from .serialize_ops import ALLOWED_OPS, serialized_name
from .shape_expr import SYMBOL, ShapeExprError, parse_shape_expr

MAX_HEADER_BYTES = 16 << 20  # the header holds the plan: a few KB per hundred layers
MAX_PROGRAM_BYTES = 64 << 20  # the graph without metadata: about 1 KB per node
MAX_INPUT_BYTES = 256 << 20  # zeros built from the stored example-input description
_MAX_INT = 1 << 63  # any integer in the program (sizes, hints, ranges, arguments)
_MAX_DIM = 1 << 48  # one dimension of a stored tensor


class UnsafeFileError(ModelFileError):
    """A model file asks for something loading never does (foreign ops, code, objects), or
    declares sizes that do not add up."""


class Unsafe(Exception):
    """What a file asks for that loading never does (the message completes "the graph has")."""


class Unregistered(Exception):
    """A pytree container type nobody registered here (the message is its name)."""


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
# torch.export's schema numbers for these dtypes (ScalarType; fixed within a schema version)
_SCHEMA_DTYPES = {
    1: "uint8",
    2: "int8",
    3: "int16",
    4: "int32",
    5: "int64",
    6: "float16",
    7: "float32",
    8: "float64",
    10: "complex64",
    11: "complex128",
    12: "bool",
    13: "bfloat16",
}
_STRIDED = 7  # torch.export's schema number for torch.strided


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _nbytes(dtype: str, shape: list[int] | tuple[int, ...]) -> int:
    n = DTYPES[dtype].itemsize
    for s in shape:
        n *= s
    return n


def _show(dtype: str, shape: Any) -> str:
    return f"{dtype}{list(shape)}"


# ------------------------------------------------------------------------------------------
# the archive
# ------------------------------------------------------------------------------------------


def archive_members(zf: zipfile.ZipFile, size: int, path: str) -> dict[str, zipfile.ZipInfo]:
    """The archive's members by name, each checked to lie within the file's ``size`` bytes
    (zip headers can claim any size: those claims are never used to allocate)."""
    members: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        if info.filename in members:
            raise ModelFileError(f"{path}: corrupt file: the archive holds {info.filename!r} twice")
        if info.flag_bits & 0x1 or info.compress_type not in (
            zipfile.ZIP_STORED,
            zipfile.ZIP_DEFLATED,
        ):
            raise ModelFileError(
                f"{path}: corrupt file: {info.filename!r} is encrypted or compressed in a way "
                "pxcompile never writes"
            )
        if info.header_offset + info.compress_size > size:
            raise UnsafeFileError(
                f"{path}: refused: {info.filename!r} claims {info.compress_size} bytes, "
                f"more than the file's {size}"
            )
        members[info.filename] = info
    return members


def read_json(zf: zipfile.ZipFile, entry: str, path: str, limit: int) -> Any:
    """A JSON member, decompressed up to ``limit`` bytes (its stated size is not trusted)."""
    try:
        info = zf.getinfo(entry)
    except KeyError:
        raise ModelFileError(f"{path}: corrupt file: no {entry}") from None
    with zf.open(info) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnsafeFileError(f"{path}: refused: {entry} is larger than {limit >> 20} MiB")
    return json.loads(data.decode("utf-8"))


def read_tensors(
    zf: zipfile.ZipFile,
    members: dict[str, zipfile.ZipInfo],
    header: dict,
    declared: dict[str, tuple[str, str, tuple[int, ...]]],
    size: int,
    path: str,
) -> dict[str, tuple[str, Any]]:
    """name -> (kind, tensor) for the header's tensors; parameters come back as nn.Parameter.

    Before anything is allocated, the header's tensor list must match the graph's tensor
    inputs (``declared``: name -> (kind, dtype, shape)) exactly, and each tensor's bytes must
    be an uncompressed member of exactly that size; together they fit in the file."""
    planned: list[tuple[str, str, str, tuple[int, ...], dict]] = []
    by_name: dict[str, tuple[str, tuple[int, ...]]] = {}
    entries: set[str] = set()
    total = 0
    for info in header["tensors"]:
        if not isinstance(info, dict) or not isinstance(info.get("name"), str):
            raise ModelFileError(f"{path}: corrupt file: bad tensor entry")
        name, kind = info["name"], info.get("kind")
        try:
            check_fqn(name, "tensor name")
        except Unsafe as e:
            raise UnsafeFileError(f"{path}: refused: {e}") from None
        if name in by_name:
            raise ModelFileError(f"{path}: corrupt file: tensor {name!r} twice")
        if name not in declared:
            raise UnsafeFileError(f"{path}: refused: tensor {name!r} is not an input of the graph")
        want_kind, dtype, shape = declared[name]
        if kind != want_kind:
            raise UnsafeFileError(
                f"{path}: refused: tensor {name!r} is a {kind!r} in the header, "
                f"a {want_kind} in the graph"
            )
        if info.get("dtype") != dtype or info.get("shape") != list(shape):
            raise UnsafeFileError(
                f"{path}: refused: tensor {name!r} is {_show(info.get('dtype'), info.get('shape'))}"
                f" in the header, {_show(dtype, shape)} in the graph"
            )
        by_name[name] = (dtype, shape)
        if "alias" in info:
            if by_name.get(info["alias"]) != (dtype, shape) or info["alias"] == name:
                raise ModelFileError(
                    f"{path}: corrupt file: {name!r} aliases a tensor it is not shaped like"
                )
            planned.append((name, kind, dtype, shape, info))
            continue
        entry = info.get("entry")
        member = members.get(entry) if isinstance(entry, str) else None
        if member is None or entry in entries:
            raise ModelFileError(f"{path}: corrupt file: no data for tensor {name!r}")
        entries.add(entry)
        nbytes = _nbytes(dtype, shape)
        if member.compress_type != zipfile.ZIP_STORED:
            raise UnsafeFileError(f"{path}: refused: tensor {name!r} is stored compressed")
        if member.file_size != nbytes or member.compress_size != nbytes:
            raise UnsafeFileError(
                f"{path}: refused: tensor {name!r} has {member.file_size} bytes in the archive, "
                f"the graph needs {nbytes}"
            )
        total += nbytes
        planned.append((name, kind, dtype, shape, info))
    missing = [n for n in declared if n not in by_name]
    if missing:
        raise ModelFileError(f"{path}: corrupt file: no data for tensor {missing[0]!r}")
    if total > size:  # members may overlap: their sum, not each one, must fit in the file
        raise UnsafeFileError(f"{path}: refused: its tensors add up to more than the file holds")

    out: dict[str, tuple[str, Any]] = {}
    for name, kind, dtype, shape, info in planned:
        if "alias" in info:
            out[name] = (kind, out[info["alias"]][1])
            continue
        t = _read_tensor(zf, members[info["entry"]], name, dtype, shape, path)
        if kind == "parameter":
            grad = bool(info.get("requires_grad", True)) and (
                t.is_floating_point() or t.is_complex()
            )
            t = torch.nn.Parameter(t, requires_grad=grad)
        out[name] = (kind, t)
    return out


def _read_tensor(
    zf: zipfile.ZipFile, member: zipfile.ZipInfo, name: str, dtype: str, shape: tuple, path: str
) -> torch.Tensor:
    nbytes = member.file_size  # checked against the graph's declaration by the caller
    raw = torch.empty(nbytes, dtype=torch.uint8)
    buf = memoryview(raw.numpy())
    with zf.open(member) as f:
        got = 0
        while got < nbytes:
            n = f.readinto(buf[got:])
            if not n:
                break
            got += n
        if got != nbytes or f.read(1):  # reading to the end also checks the CRC
            raise ModelFileError(f"{path}: corrupt file: tensor {name!r} is truncated")
    return raw.view(DTYPES[dtype]).reshape(shape)


def check_inputs_spec(spec: Any, program: dict, path: str) -> None:
    """The header's description of the example inputs (``load(path, model=...)`` builds
    zeros from it) must describe the graph's tensor inputs, within ``MAX_INPUT_BYTES``."""
    if not isinstance(spec, dict):
        return  # None, or corrupt: the caller's conversion reports that
    items = list(spec.get("args") or []) + list((spec.get("kwargs") or {}).values())
    mine: Counter = Counter()
    total = 0
    for s in items:
        t = s.get("tensor") if isinstance(s, dict) else None
        if t is None:
            continue
        if not isinstance(t, dict):
            raise ModelFileError(f"{path}: corrupt file: bad input description")
        dtype, shape = t.get("dtype"), t.get("shape")
        if dtype not in DTYPES or not isinstance(shape, list) or len(shape) > 32:
            raise ModelFileError(f"{path}: corrupt file: bad input description")
        if not all(is_int(d) and 0 <= d < _MAX_DIM for d in shape):
            raise UnsafeFileError(f"{path}: refused: an example input of shape {shape[:8]}")
        total += _nbytes(dtype, shape)
        mine[(dtype, tuple(shape))] += 1
    if total > MAX_INPUT_BYTES:
        raise UnsafeFileError(
            f"{path}: refused: its example inputs take {total} bytes, more than "
            f"{MAX_INPUT_BYTES >> 20} MiB: pass example_inputs= to load(path, model=...)"
        )
    if mine != Counter(declared_inputs(program)):
        raise UnsafeFileError(
            f"{path}: refused: the stored example inputs are not the graph's inputs"
        )


# ------------------------------------------------------------------------------------------
# the program (torch.export's JSON), before torch's deserializer sees it
# ------------------------------------------------------------------------------------------

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_FQN_PART = re.compile(r"[A-Za-z0-9_]+\Z")
_TARGETS = frozenset(serialized_name(n) for n in ALLOWED_OPS)
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
_INPUT_KINDS = {"user_input", "parameter", "buffer", "tensor_constant", "constant_input"}
# outputs that write back: only into the model's own buffers, never into the caller's inputs
_OUTPUT_KINDS = {"user_output", "buffer_mutation"}


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
                try:
                    obj[k] = parse_shape_expr(v)  # the only form that reaches sympy
                except ShapeExprError as e:
                    raise Unsafe(str(e)) from None
                continue
            if k in _NAME_KEYS:
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
    elif is_int(obj) and not -_MAX_INT <= obj < _MAX_INT:
        raise Unsafe(f"the integer {str(obj)[:30]}... (out of range)")


def _check_treespec(spec: Any, types_needed: bool) -> None:
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
            if types_needed and known is not None and t not in known:
                raise Unregistered(t)
        children = node.get("children_spec") or []
        if not isinstance(children, list) or len(stack) + len(children) > 100_000:
            raise ValueError("bad tree spec")
        stack.extend(children)


def _tensor_names(arg: Any) -> set[str]:
    """Names of the tensors an argument / output of a node refers to."""
    out: set[str] = set()
    stack = [arg]
    while stack:
        a = stack.pop()
        if isinstance(a, dict):
            t = a.get("as_tensor")
            if isinstance(t, dict) and isinstance(t.get("name"), str):
                out.add(t["name"])
            stack.extend(v for k, v in a.items() if k != "as_tensor")
        elif isinstance(a, list):
            stack.extend(a)
    return out


def _operator(target: str) -> Any:
    """The OpOverload an (allowed) JSON target names, or None for a Python operator."""
    if not target.startswith("torch.ops."):
        return None
    op: Any = torch.ops
    for part in target.split(".")[2:]:
        op = getattr(op, part)
    return op


def _check_input_writes(gm: dict) -> None:
    """No node writes into a tensor the caller passed, or into a view of one (in-place ops
    on the model's own buffers and intermediates are fine)."""
    of_inputs: set[str] = set()
    for spec in gm.get("signature", {}).get("input_specs") or []:
        if "user_input" in spec:
            of_inputs |= _tensor_names(spec["user_input"])
    for node in gm["graph"]["nodes"]:
        args = {i.get("name"): _tensor_names(i.get("arg")) for i in node.get("inputs") or []}
        op = _operator(node["target"])
        if op is None:
            aliases = node["target"] == "_operator.getitem"
        else:
            for a in op._schema.arguments:
                if a.alias_info is not None and a.alias_info.is_write:
                    if args.get(a.name, set()) & of_inputs:
                        raise Unsafe(
                            f"a write into its inputs ({node.get('name')}: {node['target']})"
                        )
            aliases = any(r.alias_info is not None for r in op._schema.returns)
        if aliases and any(v & of_inputs for v in args.values()):
            of_inputs |= _tensor_names(node.get("outputs"))


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


def check_program(d: Any, types_needed: bool = True) -> dict:
    """Checks the program JSON (see the module doc), re-writes its shape expressions and
    drops what loading never needs. Raises :class:`Unsafe`, :class:`Unregistered` (a container
    type not registered here; only with ``types_needed``) or ValueError / KeyError /
    TypeError / AttributeError for a malformed program."""
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
    if graph.get("sym_float_values"):
        raise Unsafe("symbolic floats")
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
        if not isinstance(target, str) or target not in _TARGETS:
            raise Unsafe(f"the operator {str(target)[:80]!r}, not in pxcompile/serialize_ops.py")
    for key in ("tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values"):
        for name in (graph.get(key) or {}).keys():
            _check_ident(name, "a value name")
    sig = gm.get("signature") or {}
    for spec in sig.get("input_specs") or []:
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in _INPUT_KINDS:
            raise Unsafe(f"an input of kind {str(spec)[:40]}")
    for spec in sig.get("output_specs") or []:
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in _OUTPUT_KINDS:
            kind = str(next(iter(spec), None) if isinstance(spec, dict) else None)[:40]
            why = " (a write into its inputs)" if "input" in kind else ""
            raise Unsafe(f"an output of kind {kind!r}{why}")
    for name, rng in (d.get("range_constraints") or {}).items():
        if not SYMBOL.match(name):
            raise Unsafe(f"the shape symbol {name[:40]!r}")
        for v in (rng or {}).values():
            if v is not None and not (is_int(v) and -_MAX_INT <= v < _MAX_INT):
                raise Unsafe(f"the shape range {str(rng)[:60]}")
    for entry in gm.get("module_call_graph") or []:
        sig = entry.get("signature") if isinstance(entry, dict) else None
        if isinstance(sig, dict):
            for name in sig.get("forward_arg_names") or []:
                _check_ident(name, "an argument name")
            for key in ("in_spec", "out_spec"):
                if not isinstance(sig.get(key), str):
                    raise ValueError("bad tree spec")
                _check_treespec(json.loads(sig[key]), types_needed)
    for type_name, fields in (gm.get("treespec_namedtuple_fields") or {}).items():
        check_fqn(type_name, "type name")
        for f in (fields or {}).get("field_names") or []:
            _check_ident(f, "a field name")
    _walk(d)
    _check_input_writes(gm)
    strip_metadata(d)
    d["guards_code"] = []
    return d


def _tensor_meta(graph: dict, name: str) -> tuple[str, list]:
    """(dtype, sizes) of a graph value, sizes as the JSON gives them."""
    meta = (graph.get("tensor_values") or {}).get(name)
    if not isinstance(meta, dict) or meta.get("dtype") not in _SCHEMA_DTYPES:
        raise Unsafe(f"the tensor input {name!r} of an unsupported type")
    if meta.get("layout", _STRIDED) != _STRIDED or not isinstance(meta.get("sizes"), list):
        raise Unsafe(f"the tensor input {name!r} of an unsupported layout")
    return _SCHEMA_DTYPES[meta["dtype"]], meta["sizes"]


def declared_tensors(program: dict) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """name -> (kind, dtype, shape) of each parameter, buffer and constant the graph takes, as
    the header names them (kind ``constant``: tensor constants and non-persistent buffers).
    Their shapes must be static. Raises :class:`Unsafe`."""
    gm = program["graph_module"]
    graph = gm["graph"]
    out: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for spec in gm.get("signature", {}).get("input_specs") or []:
        kind, body = next(iter(spec.items()))
        if kind == "parameter":
            name, header_kind = body["parameter_name"], "parameter"
        elif kind == "buffer":
            persistent = body.get("persistent", True) is not False
            name, header_kind = body["buffer_name"], "buffer" if persistent else "constant"
        elif kind == "tensor_constant":
            name, header_kind = body["tensor_constant_name"], "constant"
        else:
            continue
        dtype, sizes = _tensor_meta(graph, body["arg"]["name"])
        shape = []
        for s in sizes:
            v = s.get("as_int") if isinstance(s, dict) and len(s) == 1 else None
            if not is_int(v) or not 0 <= v < _MAX_DIM:
                raise Unsafe(f"the tensor {name!r} of a non-constant shape")
            shape.append(v)
        if name in out and out[name] != (header_kind, dtype, tuple(shape)):
            raise Unsafe(f"the tensor {name!r} twice")
        out[name] = (header_kind, dtype, tuple(shape))
    return out


def declared_inputs(program: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of each tensor the caller passes, a dynamic size as its example value."""
    gm = program["graph_module"]
    out = []
    for spec in gm.get("signature", {}).get("input_specs") or []:
        kind, body = next(iter(spec.items()))
        arg = body.get("arg") if kind == "user_input" else None
        if not isinstance(arg, dict) or "as_tensor" not in arg:
            continue
        dtype, sizes = _tensor_meta(gm["graph"], arg["as_tensor"]["name"])
        shape = []
        for s in sizes:
            if isinstance(s, dict) and "as_expr" in s:
                s = (s["as_expr"] or {}).get("hint") or {}
            shape.append(s.get("as_int") if isinstance(s, dict) else None)
        out.append((dtype, tuple(shape)))
    return out


# ------------------------------------------------------------------------------------------
# the graph, after torch's deserializer built it
# ------------------------------------------------------------------------------------------


def op_name(target: Any) -> str:
    """The name :mod:`pxcompile.serialize_ops` lists ``target`` under."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__name__', target)}"


def check_fx_graph(graph: fx.Graph, where: str, error: type[PxError]) -> None:
    """Every node of the (deserialized or exported) graph calls an allowed operator."""
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op != "call_function":
            raise error(f"{where}: the graph has a {node.op} node ({node.target})")
        name = op_name(node.target)
        if name not in ALLOWED_OPS:
            raise error(
                f"{where}: the graph calls {name}, which a model file may not call "
                "(pxcompile/serialize_ops.py lists the operators it may)"
            )
