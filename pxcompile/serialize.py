"""Save a compiled model to one file and load it back: ``pxcompile.save`` / ``pxcompile.load``.

    >>> gm = pxcompile.sparsify(model, 0.3, example_inputs=(x,))     # doctest: +SKIP
    >>> pxcompile.save(gm, "model.pxc", example_inputs=(x,))          # doctest: +SKIP
    >>> m = pxcompile.load("model.pxc")                               # doctest: +SKIP
    >>> torch.equal(m(x), gm.eval()(x))                               # doctest: +SKIP
    True

The file alone gives back a runnable module: it holds the graph, the plan and the weights.
Loading never unpickles anything and never runs code taken from the file. Loading needs
pxcompile (and a compatible torch) installed: the sparse layers are the custom operator
``torch.ops.pxcompile.pixelfly_linear`` (:mod:`pxcompile.ops`), whose code comes from the
installed pxcompile, never from the file.

What is saved
-------------
:func:`save` deep-copies the module, puts it in eval mode, stands each
:class:`~pxcompile.layers.PixelflyLinear` in for one call of the custom op (same parameters,
pattern as ints; Pixelfly attention likewise becomes ``pxcompile::pixelfly_attention``), and
exports it with :func:`torch.export.export`, the first (batch) dimension
of every tensor input dynamic (the example batch must be at least 2 for that; otherwise, or if
the model specialises on its batch, the graph is static and ``dynamic_batch`` is false). The
exported graph is therefore the module's computation *in eval mode*: dropout is off and
batch-norm uses its running statistics, whatever mode the loaded module is later put in.
Hugging Face models are exported with ``use_cache=False`` (no KV cache in the outputs) and keep
their config; a causal LM's sequence dimension (dimension 1 of its inputs) is dynamic too
(``dynamic_seq``), and the loaded model is a :class:`LoadedCausalLM` that generates.

File format (a zip archive, version 1)
--------------------------------------
* ``pxcompile.json``: the header: ``format`` (``"pxcompile-model"``), ``version``, the
  pxcompile and torch versions that wrote it, ``plan`` (the plan YAML, or null), ``layers``
  (GEMM name -> submodule path), ``inputs`` (the example inputs' structure: dtype and shape
  of each tensor, value of each plain scalar), ``dynamic_batch``, ``dynamic_seq``, for a
  Hugging Face model ``hf`` (``class``, ``model_type``, ``main_input_name``, ``causal_lm`` and
  ``config``, the config's ``to_dict()``: JSON only), ``byteorder`` and ``tensors``:
  one entry per tensor with its ``name``, ``kind`` (``parameter``, ``buffer`` or ``constant``),
  ``dtype``, ``shape``, ``requires_grad``, and either ``entry`` (the archive member holding its
  raw bytes, C-contiguous, in ``byteorder``) or ``alias`` (the name of the tensor it shares).
* ``program.json``: the exported program's graph in torch.export's JSON schema
  (``torch._export.serde``), node metadata left out.
* ``tensors/<i>``: raw tensor bytes, stored uncompressed.

Safety
------
A model file is untrusted input: :func:`load` treats it as hostile (the checks live in
:mod:`pxcompile.serialize_check`). It reads JSON and raw bytes only (``json``,
``yaml.safe_load`` without aliases, tensors filled from bytes): no ``pickle``, no
``torch.load``. Before anything is allocated or handed to torch:

* **Sizes.** The archive's stated sizes are checked against the file's real size; JSON members
  are decompressed with a cap (16 MiB header, 64 MiB program); the header's tensor list must
  match the graph's parameters, buffers and constants exactly (names, kinds, dtypes, static
  shapes), and each tensor's bytes must be an uncompressed member of exactly that size. So
  loading allocates at most what the graph declares and the file physically holds. The stored
  example-input description (``load(path, model=...)``) must describe the graph's inputs and
  stay under 256 MiB.
* **Operators.** Each graph node must call an operator of the reviewed list in
  :mod:`pxcompile.serialize_ops`, by exact overload: what pxcompile's exports of supported
  models emit (plus a few reviewed equivalents), never a whole namespace. Nothing that touches
  files, storage or raw memory, returns uninitialised memory or takes unchecked offsets. The
  graph may not write into its caller's inputs (or views of them); in-place updates of its own
  buffers are allowed.
* **Code.** Sub-graphs, operators as arguments, script objects, tokens and guard code are
  refused; every name must be an identifier and every parameter path a dotted one (names end
  up in generated Python source); every integer is below 2**63.
* **Shape expressions** are parsed by a small grammar of our own (bounded integers, shape
  symbols, ``+ - * // %``, max/min, comparisons, powers up to 8) and handed on re-written by
  us: no text from the file reaches sympy's parser. The module is built with ``ep.module(check_guards=False)``, so no
  guard code is generated either.

A file that fails a check raises :class:`UnsafeFileError`; a damaged one
:class:`~pxcompile.errors.ModelFileError`. ``tests/test_serialize_check.py`` fuzzes saved files
(see the README's Security section for a long run).

What this does *not* protect against: a file whose allowed operators are wired to compute
something else than the original model (the file is a program, if a restricted one: its
outputs can be anything, and its run time and memory grow with the sizes it computes with),
and a file whose weights are simply large. Treat model files like any other input.

Limitations
-----------
* The model must be exportable by ``torch.export`` (no data-dependent Python control flow,
  outputs a pytree of tensors) and may call only the operators of
  :mod:`pxcompile.serialize_ops` and the sparse layers (``save`` refuses others, naming them).
* The loaded module runs the graph as exported, in eval mode (see above), on the device the
  tensors are moved to; a graph that created tensors on a fixed device at export time keeps
  that device. Tensors are loaded on the CPU.
* Training through the loaded module works, but each sparse layer's backward recomputes its
  forward (see :mod:`pxcompile.ops`); for serious fine-tuning, rebuild onto the architecture
  with ``load(path, model=...)``, which gives back real PixelflyLinear layers.
* Inputs / outputs of library container types need the module defining the type imported
  before loading (loading imports nothing the file names; the error names it). For a file of a
  Hugging Face model, loading imports ``transformers.modeling_outputs`` itself (when
  transformers is installed), which defines the usual ``ModelOutput`` types.
* The graph is in torch.export's schema: a torch whose export schema has another major version
  refuses the file (the error says which torch wrote it).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import fx, nn
from torch.utils import _pytree as pytree

from .attention import PixelflyAttention
from .errors import ModelFileError, PlanError, PxError
from .hf import (
    LoadedCausalLMMixin,
    config_from_header,
    hf_header,
    hf_model_of,
    import_output_types,
    is_causal_lm,
    read_hf_header,
)
from .inputs import as_args
from .io import OutputSet, atomic_write
from .layers import PixelflyLinear
from .nn.weight import PixelflyWeight
from .ops import PixelflyAttentionOp, PixelflyOp
from .plans import Plan
from .serialize_check import DTYPE_NAMES as _DTYPE_NAMES
from .serialize_check import DTYPES as _DTYPES
from .serialize_check import (
    MAX_HEADER_BYTES,
    MAX_PROGRAM_BYTES,
    UnsafeFileError,
    archive_members,
    check_inputs_spec,
    declared_tensors,
    read_json,
    read_tensors,
)
from .serialize_check import Unregistered as _Unregistered
from .serialize_check import Unsafe as _Unsafe
from .serialize_check import check_fx_graph as _check_fx_graph
from .serialize_check import check_program as _check_program
from .serialize_check import is_int as _is_int
from .serialize_check import strip_metadata as _strip_metadata
from .version import __version__

__all__ = ["ExportError", "LoadedCausalLM", "LoadedModel", "UnsafeFileError", "load", "save"]

FORMAT = "pxcompile-model"
FORMAT_VERSION = 1
HEADER = "pxcompile.json"
PROGRAM = "program.json"


class ExportError(PxError):
    """A module could not be exported to a model file."""


# ------------------------------------------------------------------------------------------
# example inputs
# ------------------------------------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _input_spec(value: Any) -> dict | None:
    if isinstance(value, torch.Tensor):
        if value.dtype not in _DTYPE_NAMES:
            return None
        return {"tensor": {"dtype": _DTYPE_NAMES[value.dtype], "shape": list(value.shape)}}
    if value is None or isinstance(value, bool | int | float | str):
        return {"value": value}
    return None


def _inputs_spec(args: tuple, kwargs: dict) -> dict | None:
    a = [_input_spec(v) for v in args]
    k = {n: _input_spec(v) for n, v in kwargs.items()}
    if any(s is None for s in a) or any(s is None for s in k.values()):
        return None  # structure we do not describe: load(model=...) then needs inputs
    return {"args": a, "kwargs": k}


def _inputs_from_spec(spec: Any, path: str) -> Any:
    def one(s):
        if not isinstance(s, dict):
            raise ValueError
        if "tensor" in s:
            dtype = _DTYPES[s["tensor"]["dtype"]]
            shape = s["tensor"]["shape"]
            if not all(_is_int(d) and 0 <= d < 1 << 31 for d in shape):
                raise ValueError
            return torch.zeros(shape, dtype=dtype)
        v = s["value"]
        if v is not None and not isinstance(v, bool | int | float | str):
            raise ValueError
        return v

    if spec is None:
        raise PxError(
            f"{path}: the file does not describe its example inputs: pass example_inputs= "
            "to load(path, model=...)"
        )
    try:
        args = tuple(one(s) for s in spec["args"])
        kwargs = {str(n): one(s) for n, s in spec["kwargs"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ModelFileError(f"{path}: corrupt file: bad input description") from None
    return kwargs if kwargs and not args else args


# ------------------------------------------------------------------------------------------
# save
# ------------------------------------------------------------------------------------------


def _op_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` in eval mode, each PixelflyLinear (and PixelflyAttention
    submodule) stood in for by its op; Hugging Face attention calls the op when exporting."""
    m = copy.deepcopy(module)
    if isinstance(m, PixelflyLinear):
        return PixelflyOp(m).eval()
    ops: dict[int, PixelflyOp] = {}
    for name, sub in list(m.named_modules(remove_duplicate=False)):
        if isinstance(sub, PixelflyLinear):
            parent, _, child = name.rpartition(".")
            ops[id(sub)] = PixelflyOp(sub)
            setattr(m.get_submodule(parent), child, ops[id(sub)])
        elif isinstance(sub, PixelflyAttention) and name:
            parent, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent), child, PixelflyAttentionOp(sub))
    # A bare parameter the rewrite replaced is a PixelflyWeight attribute of its owner: it
    # must call the op too.
    for sub in m.modules():
        for key, val in list(vars(sub).items()):
            if isinstance(val, PixelflyWeight) and id(val.layer) in ops:
                sub.__dict__[key] = ops[id(val.layer)].weight_view(val.transposed)
    return m.eval()


def _dynamic_shapes(module: nn.Module, args: tuple, kwargs: dict, seq: bool = False) -> Any:
    """Dynamic batch (dimension 0) and, with ``seq``, sequence (dimension 1) of every tensor
    input of size >= 2 there (Dim.AUTO: export keeps static what the model specialises on)."""
    auto = getattr(torch.export.Dim, "AUTO", None)
    batch = auto or torch.export.Dim("batch")
    length = auto or torch.export.Dim("seq")

    def dims(v):
        if not isinstance(v, torch.Tensor) or v.dim() < 1:
            return None
        d = {0: batch} if v.shape[0] >= 2 else {}
        if seq and v.dim() >= 2 and v.shape[1] >= 2:
            d[1] = length
        return d or None

    try:  # by parameter name: also right for ``forward(*args, **kwargs)``
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return pytree.tree_map(dims, args) if not kwargs else None
    return {n: pytree.tree_map(dims, v) for n, v in bound.arguments.items()}


class _KeywordCall(nn.Module):
    """Calls a GraphModule that wraps a whole model (what the rewrite emits for models fx
    can't trace) with the caller's own arguments. torch.export binds a GraphModule's
    keyword inputs by position, which breaks on wrappers with many optional inputs (Hugging
    Face's ``forward``); through this shell it sees plain keyword calls. Parameters, buffers
    and submodules are the wrapped module's own tables, so the exported names are unchanged.
    ``fixed``: keyword arguments passed on every call without being inputs of the export
    (``use_cache=False`` for Hugging Face models)."""

    def __init__(self, target: nn.Module, fixed: dict[str, Any] | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_parameters", target._parameters)
        object.__setattr__(self, "_buffers", target._buffers)
        object.__setattr__(self, "_modules", target._modules)

        fixed = dict(fixed or {})

        def forward(*args: Any, **kwargs: Any) -> Any:
            return target(*args, **{**fixed, **kwargs})

        # the wrapped model's signature, so that dynamic shapes are given by input name
        forward.__signature__ = inspect.signature(target.forward)  # type: ignore[attr-defined]
        object.__setattr__(self, "forward", forward)


def _wraps_a_model(module: nn.Module) -> bool:
    if not isinstance(module, fx.GraphModule):
        return False
    calls = [n for n in module.graph.nodes if n.op not in ("placeholder", "output")]
    return len(calls) == 1 and calls[0].op == "call_module" and calls[0].target == "model"


def _export(
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    *,
    fixed: dict[str, Any] | None = None,
    seq: bool = False,
):
    """(exported program, dynamic batch?, dynamic sequence?). Tries a dynamic batch (and
    sequence, with ``seq``), then a dynamic batch only, then static shapes."""
    if fixed or (_wraps_a_model(module) and kwargs):
        module = _KeywordCall(module, fixed)
    tries = [_dynamic_shapes(module, args, kwargs, seq=True)] if seq else []
    tries += [_dynamic_shapes(module, args, kwargs), None]
    for k, shapes in enumerate(tries):
        try:
            ep = torch.export.export(module, args, kwargs, dynamic_shapes=shapes)
            break
        except Exception as e:
            if k == len(tries) - 1:
                msg = f"torch.export could not export the model: {_one_line(e)}"
                raise ExportError(msg) from e
    dynamic = dynamic_seq = False
    for spec, node in zip(ep.graph_signature.input_specs, ep.graph.find_nodes(op="placeholder")):
        val = node.meta.get("val")
        if spec.kind.name == "USER_INPUT" and isinstance(val, torch.Tensor) and val.dim() >= 1:
            dynamic |= isinstance(val.shape[0], torch.SymInt)
            dynamic_seq |= val.dim() >= 2 and isinstance(val.shape[1], torch.SymInt)
    return ep, dynamic, dynamic_seq


def save(module: nn.Module, path: str | Path, example_inputs: Any = None) -> None:
    """Write ``module`` (typically the GraphModule ``pxcompile.sparsify`` returns) to ``path``.

    ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of keyword inputs)
    drive the export; their first dimension is made dynamic (give a batch of at least 2).
    Without them, the inputs ``sparsify`` stored on the module (``pxcompile_example_inputs``)
    are used. The module itself is not changed (it is deep-copied and exported in eval mode).

    Hugging Face models are exported with ``use_cache=False`` (a KV cache is no tensor
    output; a ``use_cache`` in ``example_inputs`` is exported as False), the file keeps their
    config, and a causal LM's sequence dimension is dynamic too (give at least 2 tokens), so
    that the loaded model generates (see :class:`LoadedCausalLM`).

    Raises :class:`ExportError` if torch.export cannot capture the model, and
    :class:`~pxcompile.errors.PxError` without example inputs.
    """
    if not isinstance(module, nn.Module):
        raise PxError(f"save: expected an nn.Module, got {type(module).__name__}")
    OutputSet({"save:": path})  # a bad path (a directory, unwritable) fails before the export
    if example_inputs is None:
        example_inputs = getattr(module, "pxcompile_example_inputs", None)
    if example_inputs is None:
        raise PxError(
            f"save: {type(module).__name__} has no stored example inputs: pass example_inputs= "
            "(a tensor or a tuple of the forward's inputs)"
        )
    args, kwargs = as_args(example_inputs)
    plan = getattr(module, "pxcompile_plan", None)
    layers = getattr(module, "pxcompile_layers", None) or {}
    hf_model = hf_model_of(module)
    fixed: dict[str, Any] = {}
    if hf_model is not None and "use_cache" in inspect.signature(module.forward).parameters:
        if "use_cache" in kwargs:  # the user's own input stays one, with the value we can save
            kwargs["use_cache"] = False
        else:
            fixed["use_cache"] = False
    causal = hf_model is not None and is_causal_lm(hf_model)

    where = f"save: {type(module).__name__}"
    op_copy = _op_copy(module)
    for seq in (True, False) if causal else (False,):
        ep, dynamic, dynamic_seq = _export(op_copy, args, kwargs, fixed=fixed, seq=seq)
        try:  # never write a file that load() would refuse
            _check_fx_graph(ep.graph, where, ExportError)
            program = _program_json(ep)
            _check_program(json.loads(program))
            break
        except (_Unsafe, _Unregistered, ExportError) as e:
            if dynamic_seq:
                continue  # what the dynamic sequence adds is refused: a fixed length then
            if isinstance(e, ExportError):
                raise
            msg = f"{where}: the exported graph has {e}, which a model file may not"
            raise ExportError(msg) from e

    tensors: list[dict] = []
    blobs: list[tuple[str, torch.Tensor]] = []
    seen: dict[tuple, str] = {}
    params = set(ep.graph_signature.parameters)
    items = [(n, t, "parameter" if n in params else "buffer") for n, t in ep.state_dict.items()]
    items += [(n, t, "constant") for n, t in ep.constants.items()]
    for name, t, kind in items:
        if not isinstance(t, torch.Tensor):
            raise ExportError(f"save: {name!r} is a {type(t).__name__}, not a tensor")
        if t.dtype not in _DTYPE_NAMES or t.layout != torch.strided or t.is_quantized:
            raise ExportError(f"save: tensor {name!r} ({t.dtype}, {t.layout}) is not supported")
        info = {
            "name": name,
            "kind": kind,
            "dtype": _DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "requires_grad": bool(t.requires_grad),
        }
        key = (
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
            t.device,
        )
        if t.numel() and key in seen:  # tied weights stay tied
            info["alias"] = seen[key]
        else:
            seen[key] = name
            info["entry"] = f"tensors/{len(blobs)}"
            blobs.append((info["entry"], t))
        tensors.append(info)

    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "pxcompile_version": __version__,
        "torch_version": torch.__version__,
        "plan": plan.to_yaml() if isinstance(plan, Plan) else None,
        "layers": {str(k): str(v) for k, v in layers.items()},
        "inputs": _inputs_spec(args, kwargs),
        "dynamic_batch": dynamic,
        "dynamic_seq": dynamic_seq,
        "byteorder": sys.byteorder,
        "tensors": tensors,
    }
    if hf_model is not None:
        header["hf"] = hf_header(hf_model)

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w") as zf:
            zf.writestr(HEADER, json.dumps(header, indent=1), zipfile.ZIP_DEFLATED)
            zf.writestr(PROGRAM, program, zipfile.ZIP_DEFLATED)
            for entry, t in blobs:
                data = _tensor_bytes(t)
                info = zipfile.ZipInfo(entry, date_time=(1980, 1, 1, 0, 0, 0))
                info.file_size = data.nbytes  # lets zipfile switch to zip64 when it must
                with zf.open(info, "w") as f:
                    f.write(data)

    atomic_write(path, write)


def _program_json(ep) -> bytes:
    from torch._export.serde import serialize as serde

    try:
        art = serde.serialize(
            ep,
            serialize_state_dict=False,
            serialize_constants=False,
            serialize_example_inputs=False,
        )
    except TypeError:  # older torch: pickles the weights too; we keep only the graph
        art = serde.serialize(ep)
    except Exception as e:
        raise ExportError(f"save: could not serialize the exported graph: {_one_line(e)}") from e
    d = json.loads(art.exported_program)
    _strip_metadata(d)
    d["guards_code"] = []
    return json.dumps(d, separators=(",", ":")).encode()


# ------------------------------------------------------------------------------------------
# load
# ------------------------------------------------------------------------------------------


class LoadedModel(nn.Module):
    """A model loaded from a file: runs the stored graph; a plain ``nn.Module`` otherwise.

    ``parameters()``, ``state_dict()`` (same names as the saved module's), ``to()``,
    optimizers and ``loss.backward()`` work as usual. ``train()`` / ``eval()`` only set the
    flag: the graph is the one exported in eval mode, so dropout stays off and batch-norm
    keeps using its running statistics in either mode.

    Attributes: ``pxcompile_plan`` (the stored :class:`~pxcompile.plans.Plan`, or None),
    ``pxcompile_layers`` (GEMM name -> path of its sparse layer's parameters),
    ``pxcompile_dynamic_batch`` (whether the batch dimension is dynamic),
    ``pxcompile_dynamic_seq`` (the sequence dimension, for Hugging Face causal LMs), ``graph``,
    ``code``; for a Hugging Face model also ``config`` (a transformers config of the saved
    model's type; a dict without transformers) and ``main_input_name``.
    """

    def __init__(self, program: fx.GraphModule, plan: Plan | None, layers: dict, dynamic: bool):
        super().__init__()
        # share the program's parameter / buffer / submodule tables: names, ``to()`` and
        # ``load_state_dict`` act on the tensors the program runs with
        object.__setattr__(self, "_program", program)
        object.__setattr__(self, "_parameters", program._parameters)
        object.__setattr__(self, "_buffers", program._buffers)
        object.__setattr__(self, "_modules", program._modules)
        object.__setattr__(self, "_non_persistent_buffers_set", program._non_persistent_buffers_set)
        self.pxcompile_plan = plan
        self.pxcompile_layers = dict(layers)
        self.pxcompile_dynamic_batch = bool(dynamic)
        self.eval()

    def forward(self, *args, **kwargs):
        return self._program(*args, **kwargs)

    @property
    def graph(self) -> fx.Graph:
        return self._program.graph

    @property
    def code(self) -> str:
        return self._program.code

    def extra_repr(self) -> str:
        n = len(self.pxcompile_layers)
        return f"sparse_layers={n}, dynamic_batch={self.pxcompile_dynamic_batch}"


class LoadedCausalLM(LoadedCausalLMMixin, LoadedModel):
    """A Hugging Face causal LM loaded from a file: a :class:`LoadedModel` with ``config``,
    ``device`` and a ``generate`` of pxcompile's own (greedy or sampled, without KV cache:
    each new token reruns the whole sequence; see :meth:`pxcompile.hf.LoadedCausalLMMixin.generate`).
    """


def _one_line(e: BaseException) -> str:
    s = str(e).strip() or type(e).__name__
    s = s.splitlines()[0].strip()
    return s if len(s) <= 200 else s[:197] + "..."


def _read_header(zf: zipfile.ZipFile, path: str) -> dict:
    if HEADER not in zf.namelist():
        raise ModelFileError(f"{path}: not a pxcompile model file (no {HEADER})")
    header = read_json(zf, HEADER, path, MAX_HEADER_BYTES)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a pxcompile model file")
    v = header.get("version")
    if not _is_int(v) or v < 1:
        raise ModelFileError(f"{path}: corrupt file: bad format version {v!r}")
    if v > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: written by a newer pxcompile (format {v}; this one reads {FORMAT_VERSION})"
        )
    if header.get("byteorder") != sys.byteorder:
        raise ModelFileError(f"{path}: written on a {header.get('byteorder')}-endian machine")
    if not isinstance(header.get("tensors"), list) or not isinstance(
        header.get("layers", {}), dict
    ):
        raise ModelFileError(f"{path}: corrupt file: bad header")
    return header


def _deserialize(program: dict, tensors: dict[str, tuple[str, Any]], path: str):
    from torch._export.serde import serialize as serde

    state = {n: t for n, (k, t) in tensors.items() if k != "constant"}
    consts = {n: t for n, (k, t) in tensors.items() if k == "constant"}
    art = serde.SerializedArtifact(json.dumps(program).encode(), state, consts, b"")
    try:
        return serde.deserialize(art)
    except serde.SerializeError as e:
        msg = _one_line(e)
        if "version" in msg:
            raise ModelFileError(f"{path}: {msg} (written by torch {_torch_of(program)})") from None
        raise ModelFileError(f"{path}: corrupt file: {msg}") from None
    except Exception as e:
        raise ModelFileError(f"{path}: corrupt file: {_one_line(e)}") from None


def _torch_of(program: dict) -> str:
    return str(program.get("torch_version", "?"))


def load(path: str | Path, model: nn.Module | None = None, example_inputs: Any = None):
    """Load a model file written by :func:`save`.

    Without ``model``: a :class:`LoadedModel` that runs the stored graph (in eval mode).

    With ``model`` (the dense architecture the file was compiled from, e.g. a freshly built
    ``nn.Module``): the stored plan is applied to it (``pxcompile.api.apply(model, plan,
    example_inputs, init="scratch")``, on a copy) and the stored weights are loaded by name,
    giving back the same GraphModule ``sparsify`` would, with real PixelflyLinear layers.
    ``example_inputs`` drive that trace; by default, zeros shaped like the inputs the file was
    saved with. The result is in eval mode.

    Errors are :class:`~pxcompile.errors.PxError` subclasses with a one-line message:
    :class:`~pxcompile.errors.ModelFileError` for a missing, foreign, corrupt or too new
    file, :class:`UnsafeFileError` for one asking for what loading never does, and
    :class:`~pxcompile.errors.PlanError` for a ``model`` that does not match the file.
    """
    path = str(path)
    if not Path(path).is_file():
        raise ModelFileError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            return _load(f, path, model, example_inputs)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read: {_one_line(e)}") from None


def _load(f, path: str, model: nn.Module | None, example_inputs: Any):
    size = os.fstat(f.fileno()).st_size  # the sizes the archive claims are checked against it
    try:
        zf = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, ValueError, EOFError):
        f.seek(0)
        if f.read(4) == b"PK\x03\x04":  # a zip archive, cut short or damaged
            raise ModelFileError(
                f"{path}: corrupt or truncated file (unreadable archive)"
            ) from None
        raise ModelFileError(f"{path}: not a pxcompile model file (not a zip archive)") from None
    try:
        with zf:
            members = archive_members(zf, size, path)
            header = _read_header(zf, path)
            hf_info = read_hf_header(header, path)
            if hf_info is not None:
                import_output_types()  # its outputs are transformers' ModelOutput types
            plan = _read_plan(header, path)
            try:  # rebuilding onto a model never builds the stored inputs / outputs
                program = _check_program(
                    read_json(zf, PROGRAM, path, MAX_PROGRAM_BYTES), types_needed=model is None
                )
                declared = declared_tensors(program)
            except _Unsafe as e:
                raise UnsafeFileError(f"{path}: refused: the graph has {e}") from None
            except _Unregistered as e:
                mod = str(e).rpartition(".")[0] or str(e)
                raise ModelFileError(
                    f"{path}: the model's inputs or outputs are of type {e}, not registered "
                    f"with torch's pytree here: import {mod} before loading"
                ) from None
            tensors = read_tensors(zf, members, header, declared, size, path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error) as e:
        raise ModelFileError(f"{path}: corrupt file: {_one_line(e)}") from None
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise ModelFileError(f"{path}: corrupt file: {_one_line(e)}") from None
    if model is not None:
        return _rebuild(model, plan, header, program, tensors, example_inputs, path)
    ep = _deserialize(program, tensors, path)
    _check_fx_graph(ep.graph, f"{path}: refused", UnsafeFileError)
    try:
        gm = ep.module(check_guards=False)
    except TypeError:  # torch without the check_guards switch
        gm = ep.module()
    except Exception as e:
        raise ModelFileError(f"{path}: corrupt file: {_one_line(e)}") from None
    for attr in ("train", "eval"):  # ep.module() makes these raise; LoadedModel owns them
        gm.__dict__.pop(attr, None)
    layers = {str(k): str(v) for k, v in header.get("layers", {}).items()}
    causal = hf_info is not None and hf_info.get("causal_lm") is True
    loaded = (LoadedCausalLM if causal else LoadedModel)(
        gm, plan, layers, bool(header.get("dynamic_batch"))
    )
    loaded.pxcompile_dynamic_seq = header.get("dynamic_seq") is True
    if hf_info is not None:
        loaded.config = config_from_header(hf_info, path)
        loaded.main_input_name = hf_info.get("main_input_name", "input_ids")
        loaded.pxcompile_inputs = header.get("inputs")
    return loaded


def _read_plan(header: dict, path: str) -> Plan | None:
    text = header.get("plan")
    if text is None:
        return None
    if not isinstance(text, str):
        raise ModelFileError(f"{path}: corrupt file: bad plan")
    try:
        # anchors / aliases could make a small text a huge structure; plans never use them
        if any(isinstance(e, yaml.AliasEvent) for e in yaml.parse(text, Loader=yaml.SafeLoader)):
            raise UnsafeFileError(f"{path}: refused: the stored plan uses YAML aliases")
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ModelFileError(f"{path}: corrupt file: the stored plan is not YAML") from None
    try:
        return Plan.from_dict(data, f"{path} (stored plan)")
    except PlanError as e:
        raise ModelFileError(f"{path}: corrupt file: {_one_line(e)}") from None


def _rebuild(model, plan, header, program, tensors, example_inputs, path) -> fx.GraphModule:
    from . import api

    if plan is None:
        raise PlanError(f"{path}: the file has no plan to apply to a model")
    if example_inputs is None:
        check_inputs_spec(header.get("inputs"), program, path)
        example_inputs = _inputs_from_spec(header.get("inputs"), path)
    with torch.random.fork_rng(devices=[]):  # scratch init: leave the caller's RNG alone
        try:
            gm = api.apply(model, plan, example_inputs, init="scratch")
        except Exception as e:  # the user's model, run on the stored inputs, does not fit
            raise PlanError(
                f"{path}: the model does not match the stored plan: {_one_line(e)}"
            ) from None
    sd = gm.state_dict()
    stored = {n: t for n, (k, t) in tensors.items() if k != "constant"}
    missing = [n for n in sd if n not in stored]
    extra = [n for n in stored if n not in sd]
    if missing or extra:
        what = []
        if missing:
            what.append("the file lacks " + _names(missing))
        if extra:
            what.append("the model lacks " + _names(extra))
        raise PlanError(f"{path}: the model does not match the file: {'; '.join(what)}")
    for n, t in sd.items():
        s = stored[n]
        if tuple(s.shape) != tuple(t.shape) or s.dtype != t.dtype:
            raise PlanError(
                f"{path}: the model does not match the file: {n!r} is {tuple(t.shape)} "
                f"{t.dtype} in the model, {tuple(s.shape)} {s.dtype} in the file"
            )
    with torch.no_grad():
        for n, t in sd.items():
            t.copy_(stored[n])
    return gm.eval()


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:3])
    return shown + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
