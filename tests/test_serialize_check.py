"""pxcompile.serialize_check: what ``pxcompile.load`` checks before a file's content reaches
torch, sympy or memory. Each issue-#11 finding is a file ``pxcompile.save`` wrote, edited
programmatically; the fuzz test mutates saved files and loads each mutant in a child process
with a memory limit and a timeout."""

from __future__ import annotations

import io
import json
import os
import sys
import warnings
import zipfile
import zlib

import pytest
import torch
from torch import nn

import pxcompile
from pxcompile import serialize as S
from pxcompile import serialize_check as C
from pxcompile.errors import ModelFileError
from pxcompile.serialize_ops import ALLOWED_OPS, NEVER_OPS, serialized_name
from pxcompile.shape_expr import parse_shape_expr

# ------------------------------------------------------------------------------ helpers


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.GELU()).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A plain two-op model saved with a dynamic batch (shape expressions in its graph)."""
    x = torch.randn(4, 8)
    path = tmp_path_factory.mktemp("px") / "tiny.px"
    pxcompile.save(tiny(), path, example_inputs=(x,))
    return path, x


def members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def write(dst, entries, compress=None, lie=None) -> None:
    """Writes ``entries`` (name -> bytes) as a zip; JSON members deflated like save does,
    ``compress`` names more members to deflate; ``lie`` (name -> size) makes the central
    directory claim that size for a member."""
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in entries.items():
            deflate = name.endswith(".json") or name in (compress or ())
            zf.writestr(name, data, zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
        for info in zf.filelist:  # written to the central directory when the archive closes
            if lie and info.filename in lie:
                info.file_size = info.compress_size = lie[info.filename]


def edited(path, dst, program=None, header=None, **kw):
    """A copy of ``path`` with its program / header JSON passed through the given editors."""
    entries = members(path)
    for name, edit in (("program.json", program), ("pxcompile.json", header)):
        if edit is not None:
            d = json.loads(entries[name])
            edit(d)
            entries[name] = json.dumps(d).encode()
    write(dst, entries, **kw)
    return dst


def node(target, name, inputs, outputs=None) -> dict:
    return {
        "target": target,
        "inputs": [{"name": n, "arg": a, "kind": k} for n, a, k in inputs],
        "outputs": outputs or [{"as_tensor": {"name": name}}],
        "metadata": {},
        "is_hop_single_tensor_return": None,
        "name": name,
    }


def uint8_meta(n: int) -> dict:
    return {
        "dtype": 1,
        "sizes": [{"as_int": n}],
        "requires_grad": False,
        "device": {"type": "cpu", "index": None},
        "strides": [{"as_int": 1}],
        "storage_offset": {"as_int": 0},
        "layout": 7,
    }


# ------------------------------------------------------------------------------ finding 1: ops


def from_file_attack(target: str, shared: bool):
    """The issue's attack: the graph's first nodes map ``target`` (shared=True: and write 'A'
    bytes into it through an in-place copy_; shared=False: and return its bytes)."""

    def edit(d):
        g = d["graph_module"]["graph"]
        ff = node(
            "torch.ops.aten.from_file.default",
            "ff",
            [
                ("filename", {"as_string": target}, 1),
                ("shared", {"as_bool": shared}, 1),
                ("size", {"as_int": 63}, 1),
                ("dtype", {"as_scalar_type": 1}, 2),
            ],
        )
        fill = node(
            "torch.ops.aten.full.default",
            "fl",
            [
                ("size", {"as_ints": [63]}, 1),
                ("fill_value", {"as_int": 65}, 1),
                ("dtype", {"as_scalar_type": 1}, 2),
            ],
        )
        copy = node(
            "torch.ops.aten.copy_.default",
            "cp",
            [("self", {"as_tensor": {"name": "ff"}}, 1), ("src", {"as_tensor": {"name": "fl"}}, 1)],
        )
        g["nodes"][:0] = [ff, fill, copy] if shared else [ff]
        for n in ("ff", "fl", "cp"):
            g["tensor_values"][n] = uint8_meta(63)
        if not shared:  # the model's output is the file's bytes
            g["outputs"] = [{"as_tensor": {"name": "ff"}}]
            spec = d["graph_module"]["signature"]["output_specs"][0]["user_output"]
            spec["arg"] = {"as_tensor": {"name": "ff"}}

    return edit


@pytest.mark.parametrize("shared", [True, False])
def test_finding1_from_file_is_refused(saved, tmp_path, shared):
    path, x = saved
    victim = tmp_path / "victim.pth"
    if not shared:
        victim.write_bytes(b"secret" * 20)
    bad = edited(path, tmp_path / "bad.px", program=from_file_attack(str(victim), shared))
    with pytest.raises(S.UnsafeFileError) as e:
        pxcompile.load(bad)
    assert "aten.from_file.default" in one_line(e)
    assert victim.exists() == (not shared)


@pytest.mark.parametrize("op", sorted(NEVER_OPS))
def test_finding1_dangerous_ops_are_refused(saved, tmp_path, op):
    path, _ = saved

    def swap(d):
        d["graph_module"]["graph"]["nodes"][0]["target"] = f"torch.ops.{op}"

    with pytest.raises(S.UnsafeFileError) as e:
        pxcompile.load(edited(path, tmp_path / "bad.px", program=swap))
    assert "refused" in one_line(e)


def aten_ops() -> list[str]:
    """Every overload torch registers in the aten namespace, named like serialize_ops."""
    out = set()
    for n in torch._C._dispatch_get_all_op_names():
        if n.startswith("aten::"):
            base, _, overload = n[len("aten::") :].partition(".")
            out.add(f"aten.{base}.{overload or 'default'}")
    return sorted(out)


def test_finding1_every_aten_op_outside_the_list_is_refused(saved):
    path, _ = saved
    raw = members(path)["program.json"]
    ops = aten_ops()
    assert len(ops) > 2000
    allowed = []
    for op in ops:
        d = json.loads(raw)
        d["graph_module"]["graph"]["nodes"][0]["target"] = f"torch.ops.{op}"
        try:
            C.check_program(d)
            allowed.append(op)
        except C.Unsafe as e:
            assert op in str(e)
    assert set(allowed) == {op for op in ops if op in ALLOWED_OPS}
    # a namespace alone, another namespace, Python callables: refused too
    for target in ("torch.ops.aten", "torch.ops.prims.add.default", "builtins.open", "os.system"):
        d = json.loads(raw)
        d["graph_module"]["graph"]["nodes"][0]["target"] = target
        with pytest.raises(C.Unsafe):
            C.check_program(d)


def test_writes_into_the_callers_inputs_are_refused(saved, tmp_path):
    path, x = saved

    def add_into_input(d):  # input.add_(input) before the first op
        g = d["graph_module"]["graph"]
        first = g["nodes"][0]["inputs"][0]["arg"]["as_tensor"]["name"]
        g["nodes"].insert(
            0,
            node(
                "torch.ops.aten.add_.Tensor",
                "inplace",
                [
                    ("self", {"as_tensor": {"name": first}}, 1),
                    ("other", {"as_tensor": {"name": first}}, 1),
                ],
            ),
        )
        g["tensor_values"]["inplace"] = g["tensor_values"][first]

    with pytest.raises(S.UnsafeFileError) as e:
        pxcompile.load(edited(path, tmp_path / "bad.px", program=add_into_input))
    assert "write into its inputs" in one_line(e)

    def mutation_output(d):
        spec = d["graph_module"]["signature"]["output_specs"][0]
        spec["user_input_mutation"] = {
            "arg": spec.pop("user_output")["arg"],
            "user_input_name": "x",
        }

    with pytest.raises(S.UnsafeFileError) as e:
        pxcompile.load(edited(path, tmp_path / "bad2.px", program=mutation_output))
    assert "write into its inputs" in one_line(e)

    class AddsIntoItsInput(nn.Module):
        def forward(self, x):
            x.add_(1)
            return x * 2

    # save never writes a file load would refuse
    with pytest.raises(S.ExportError) as e:
        pxcompile.save(AddsIntoItsInput(), tmp_path / "m.px", example_inputs=(x,))
    assert "write into its inputs" in one_line(e)
    assert not (tmp_path / "m.px").exists()


# ------------------------------------------------------------------------------ finding 2: expressions


def set_first_expr(expr: str):
    def edit(d):
        for meta in d["graph_module"]["graph"]["tensor_values"].values():
            for s in meta["sizes"]:
                if "as_expr" in s:
                    s["as_expr"]["expr_str"] = expr
                    return
        raise AssertionError("no shape expression in the program")

    return edit


def test_finding2_float_with_huge_precision_is_refused_at_once(saved, tmp_path):
    path, _ = saved
    bad = edited(path, tmp_path / "bad.px", program=set_first_expr("Float('1.5', 100000000)"))
    with pytest.raises(S.UnsafeFileError) as e:
        pxcompile.load(bad)
    assert "shape expression" in one_line(e)


def test_finding2_sympy_never_parses_text_from_the_file(saved, tmp_path, monkeypatch):
    import sympy

    path, x = saved
    odd = "  Symbol( 's77' ,integer=True,positive=True ) "

    def respace(d):  # the same expressions, written differently: still loads, same model
        for meta in d["graph_module"]["graph"]["tensor_values"].values():
            for s in meta["sizes"]:
                if "as_expr" in s:
                    name = s["as_expr"]["expr_str"].split("'")[1]
                    s["as_expr"]["expr_str"] = odd.replace("s77", name)

    seen: list[str] = []
    real = sympy.sympify

    def spy(a, *args, **kwargs):
        if isinstance(a, str):
            seen.append(a)
        return real(a, *args, **kwargs)

    monkeypatch.setattr(sympy, "sympify", spy)
    m = pxcompile.load(edited(path, tmp_path / "respaced.px", program=respace))
    assert seen and all(s.startswith("Symbol('s") and "  " not in s for s in seen), seen
    assert all(parse_shape_expr(s) == s for s in seen)  # our own canonical text
    with torch.no_grad():
        assert torch.equal(m(x), tiny()(x))


# ------------------------------------------------------------------------------ finding 3: sizes


def test_finding3_zip64_size_claims_are_not_trusted(saved, tmp_path, monkeypatch):
    path, _ = saved
    big = 1 << 45
    sizes = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: sizes.append(a) or real_empty(*a, **k))

    def header(d):  # the header claims a 2**45-byte tensor...
        d["tensors"][0].update(dtype="uint8", shape=[big])

    def program(d):  # ... and so does the graph: only the archive can tell
        spec = d["graph_module"]["signature"]["input_specs"][0]["parameter"]
        d["graph_module"]["graph"]["tensor_values"][spec["arg"]["name"]] = uint8_meta(big)

    for i, edits in enumerate(({"header": header}, {"header": header, "program": program})):
        bad = edited(path, tmp_path / f"big{i}.px", lie={"tensors/0": big}, **edits)
        assert bad.stat().st_size < 30_000
        with pytest.raises(S.UnsafeFileError) as e:
            pxcompile.load(bad)
        assert "refused" in one_line(e)
    assert not any(a and isinstance(a[0], int) and a[0] >= 1 << 30 for a in sizes)


def test_finding3_compressed_and_undeclared_tensors_are_refused(saved, tmp_path):
    path, _ = saved
    n = 16 << 20  # a small deflate bomb: 16 MiB of zeros in about 16 KB

    def header(d):
        d["tensors"].append(
            {"name": "bomb", "kind": "buffer", "dtype": "uint8", "shape": [n], "entry": "tensors/9"}
        )

    entries = members(path)
    entries["tensors/9"] = bytes(n)
    d = json.loads(entries["pxcompile.json"])
    header(d)
    entries["pxcompile.json"] = json.dumps(d).encode()
    bad = tmp_path / "bomb.px"
    write(bad, entries, compress={"tensors/9"})
    assert bad.stat().st_size < 100_000
    with pytest.raises(S.UnsafeFileError) as e:
        pxcompile.load(bad)
    assert "'bomb' is not an input of the graph" in one_line(e)

    # a tensor the graph does declare, stored compressed: refused before it is inflated
    with pytest.raises(S.UnsafeFileError) as e:
        pxcompile.load(edited(path, tmp_path / "deflated.px", compress={"tensors/0"}))
    assert "compressed" in one_line(e)


def test_finding3_header_and_graph_must_agree(saved, tmp_path):
    path, _ = saved
    cases = [
        (lambda d: d["tensors"][0].update(shape=[4, 16]), "in the header"),
        (lambda d: d["tensors"][0].update(dtype="float64"), "in the header"),
        (lambda d: d["tensors"][0].update(kind="buffer"), "in the header"),
        (lambda d: d["tensors"].pop(), "no data for tensor"),
        (lambda d: d["tensors"].append(dict(d["tensors"][0], name="extra")), "not an input"),
        (lambda d: d["tensors"][1].update(entry="tensors/0"), "no data"),
    ]
    for i, (edit, msg) in enumerate(cases):
        with pytest.raises(ModelFileError) as e:
            pxcompile.load(edited(path, tmp_path / f"h{i}.px", header=edit))
        assert msg in one_line(e), i


def test_finding3_stored_input_description_is_bounded(tmp_path):
    x = torch.randn(4, 64)
    gm = pxcompile.sparsify(
        nn.Sequential(nn.Linear(64, 64), nn.GELU()), 0.5, block=16, example_inputs=(x,)
    )
    path = tmp_path / "m.px"
    pxcompile.save(gm, path, example_inputs=(x,))
    dense = nn.Sequential(nn.Linear(64, 64), nn.GELU())
    pxcompile.load(path, model=dense)  # the stored description builds the trace's inputs

    def huge(d):
        d["inputs"]["args"][0]["tensor"]["shape"] = [1 << 30, 1 << 30]

    def other(d):
        d["inputs"]["args"][0]["tensor"]["shape"] = [5, 64]

    for edit, msg in ((huge, "MiB"), (other, "not the graph's inputs")):
        bad = edited(path, tmp_path / "bad.px", header=edit)
        with pytest.raises(S.UnsafeFileError) as e:
            pxcompile.load(bad, model=dense)
        assert msg in one_line(e)
        pxcompile.load(bad, model=dense, example_inputs=(x,))  # given inputs: fine


def test_json_members_are_read_with_a_cap(saved, tmp_path, monkeypatch):
    path, x = saved
    # the sizes the archive states for JSON members are not what is trusted
    bad = edited(path, tmp_path / "lie.px", lie={"program.json": 1})
    with pytest.raises(ModelFileError):
        pxcompile.load(bad)
    monkeypatch.setattr(S, "MAX_PROGRAM_BYTES", 1000)
    with pytest.raises(S.UnsafeFileError) as e:
        pxcompile.load(path)
    assert "program.json is larger than" in one_line(e)


def test_archive_oddities_are_refused(saved, tmp_path):
    path, _ = saved
    entries = members(path)
    dup = tmp_path / "dup.px"
    with zipfile.ZipFile(dup, "w") as zf, pytest.warns(UserWarning):
        for name, data in list(entries.items()) + [("tensors/0", entries["tensors/0"])]:
            zf.writestr(name, data)
    with pytest.raises(ModelFileError) as e:
        pxcompile.load(dup)
    assert "twice" in one_line(e)
    # a plan with YAML aliases (a small text, a huge structure)
    with pytest.raises(ModelFileError):
        pxcompile.load(
            edited(path, tmp_path / "yaml.px", header=lambda d: d.update(plan="a: &x [1]\nb: *x\n"))
        )


# ------------------------------------------------------------------------------ fuzzing


FUZZ_EXAMPLES = int(os.environ.get("PXCOMPILE_FUZZ_EXAMPLES", "40"))
FUZZ_TIMEOUT = float(os.environ.get("PXCOMPILE_FUZZ_TIMEOUT", "30"))
FUZZ_MEMORY = 2 << 30  # address space one load may add to the child's
LINUX = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the fuzz children read /proc, use forkserver"
)


def fuzz_child(path: str, x: torch.Tensor, want: torch.Tensor, conn) -> None:
    """Runs in a fresh child: limits memory, loads ``path``, reports what happened."""
    import resource
    import traceback

    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) << 10
    resource.setrlimit(resource.RLIMIT_AS, (vm + FUZZ_MEMORY, resource.RLIM_INFINITY))
    torch.set_num_threads(1)
    try:
        m = pxcompile.load(path)
    except ModelFileError as e:  # UnsafeFileError included
        conn.send(("refused", type(e).__name__, str(e)))
        return
    except BaseException:
        conn.send(("error", "", traceback.format_exc()))
        return
    ops = {C.op_name(n.target) for n in m.graph.nodes if n.op == "call_function"}
    try:  # a loaded mutant is a program of allowed ops: it may compute something else or fail
        with torch.no_grad():
            same = torch.equal(m(x), want)
    except Exception:
        same = False
    conn.send(("loaded", sorted(ops - ALLOWED_OPS), same))


@pytest.fixture(scope="module")
def fuzz_bases(tmp_path_factory):
    """Valid files of a few models: (bytes, example input, output)."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("fuzz")
    out = {}

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.b.weight = self.a.weight
            self.register_buffer("scale", torch.tensor(2.0))
            self.register_buffer("shift", torch.ones(8), persistent=False)

        def forward(self, x):
            return self.b(self.a(x)).softmax(-1) * self.scale + self.shift

    x = torch.randn(4, 64)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    gm = pxcompile.sparsify(mlp, 0.3, block=16, example_inputs=(x,), init="scratch").eval()
    for name, model, xi in (("tied", Tied().eval(), torch.randn(3, 8)), ("mlp", gm, x)):
        path = d / f"{name}.px"
        pxcompile.save(model, path, example_inputs=(xi,))
        with torch.no_grad():
            out[name] = (path.read_bytes(), xi, model(xi))
    return out


def _pick(doc, seeds):
    """A (container, key) reached by walking ``doc`` along ``seeds``."""
    parent, key = None, None
    node = doc
    for s in seeds:
        if isinstance(node, dict) and node:
            k = list(node)[s % len(node)]
        elif isinstance(node, list) and node:
            k = s % len(node)
        else:
            break
        parent, key, node = node, k, node[k]
    return parent, key


INTERESTING_INTS = [
    0,
    1,
    -1,
    2,
    7,
    63,
    1 << 31,
    1 << 32,
    1 << 45,
    (1 << 63) - 1,
    1 << 63,
    -(1 << 63),
]
INTERESTING_STRINGS = [
    "torch.ops.aten.from_file.default",
    "Float('1.5', 100000000)",
    "Pow(Integer(10), Integer(1000000000))",
    "Symbol('s0', integer=True)",
    "__import__('os')",
    "tensors/0",
    "float32",
    "uint8",
    "x",
    "0.weight",
    "",
]


def _mutate(base: bytes, muts: list) -> bytes:
    zin = zipfile.ZipFile(io.BytesIO(base))
    entries = [[i.filename, zin.read(i), i.filename.endswith(".json")] for i in zin.infolist()]
    docs = {n: json.loads(b) for n, b, _ in entries if n.endswith(".json")}
    lies = {}
    for kind, *a in muts:
        try:
            if kind == "json":
                member, seeds, action, value = a
                parent, key = _pick(docs[member], seeds)
                if parent is None:
                    continue
                if action == "delete":
                    del parent[key]
                elif action == "duplicate" and isinstance(parent, list):
                    parent.insert(key, json.loads(json.dumps(parent[key])))
                else:
                    parent[key] = value
            elif kind == "target":
                nodes = docs["program.json"]["graph_module"]["graph"]["nodes"]
                nodes[a[0] % len(nodes)]["target"] = a[1]
            elif kind == "size":
                where, seed, value = a
                if where == "header":
                    t = docs["pxcompile.json"]["tensors"]
                    info = t[seed % len(t)]
                    if info.get("shape"):
                        info["shape"][seed % len(info["shape"])] = value
                else:
                    metas = list(
                        docs["program.json"]["graph_module"]["graph"]["tensor_values"].values()
                    )
                    meta = metas[seed % len(metas)]
                    field = ("sizes", "strides")[seed % 2]
                    if meta[field]:
                        meta[field][seed % len(meta[field])] = {"as_int": value}
            elif kind == "expr":
                graph = docs["program.json"]["graph_module"]["graph"]
                found = [
                    s["as_expr"]
                    for meta in graph["tensor_values"].values()
                    for s in meta["sizes"] + meta["strides"]
                    if "as_expr" in s
                ]
                if found:
                    found[a[0] % len(found)]["expr_str"] = a[1]
            elif kind == "member":
                action, seed = a
                i = seed % len(entries)
                if action == "drop":
                    entries.pop(i)
                elif action == "duplicate":
                    entries.append(list(entries[i]))
                elif action == "rename":
                    entries[i][0] = ["tensors/0", "tensors/99", "program.json", "x"][seed % 4]
                elif action == "compress":
                    entries[i][2] = not entries[i][2]
                elif action == "truncate":
                    entries[i][1] = entries[i][1][: seed % (len(entries[i][1]) + 1)]
                elif action == "append":
                    entries[i][1] = entries[i][1] + bytes(seed % 64 + 1)
            elif kind == "lie":
                lies[a[0] % len(entries)] = a[1]
        except (KeyError, TypeError, IndexError, AttributeError, ZeroDivisionError):
            continue  # an earlier edit removed what this one edits: skip it
    for e in entries:
        if e[0] in docs:
            e[1] = json.dumps(docs[e[0]]).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names on purpose
        for name, data, deflate in entries:
            zf.writestr(name, data, zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
        for i, size in lies.items():
            if i < len(zf.filelist):
                zf.filelist[i].file_size = zf.filelist[i].compress_size = size
    return out.getvalue()


def _strategies():
    from hypothesis import strategies as st

    seeds = st.lists(st.integers(0, 1 << 20), min_size=1, max_size=14)
    values = st.one_of(
        st.none(),
        st.booleans(),
        st.sampled_from(INTERESTING_INTS),
        st.integers(-(1 << 70), 1 << 70),
        st.floats(allow_nan=False),
        st.sampled_from(INTERESTING_STRINGS),
        st.text(max_size=12),
        st.lists(st.sampled_from(INTERESTING_INTS), max_size=3),
        st.just({}),
        st.builds(lambda v: {"as_int": v}, st.sampled_from(INTERESTING_INTS)),
    )
    targets = st.one_of(
        st.sampled_from([f"torch.ops.{op}" for op in aten_ops()]),
        st.sampled_from(sorted(serialized_name(op) for op in ALLOWED_OPS)),
        st.sampled_from(["builtins.exec", "torch.load", "_operator.pow", "#evil:op", "math.pow"]),
    )
    exprs = st.one_of(
        st.sampled_from(INTERESTING_STRINGS),
        st.text(alphabet="s0123()+-*/%, 'MaxInteger", max_size=40),
    )
    mutation = st.one_of(
        st.tuples(
            st.just("json"),
            st.sampled_from(["pxcompile.json", "program.json"]),
            seeds,
            st.sampled_from(["set", "set", "delete", "duplicate"]),
            values,
        ),
        st.tuples(st.just("target"), st.integers(0, 1000), targets),
        st.tuples(
            st.just("size"),
            st.sampled_from(["header", "program"]),
            st.integers(0, 1000),
            st.sampled_from(INTERESTING_INTS),
        ),
        st.tuples(st.just("expr"), st.integers(0, 1000), exprs),
        st.tuples(
            st.just("member"),
            st.sampled_from(["drop", "duplicate", "rename", "compress", "truncate", "append"]),
            st.integers(0, 1000),
        ),
        st.tuples(st.just("lie"), st.integers(0, 100), st.sampled_from(INTERESTING_INTS[3:10])),
    )
    return st.sampled_from(["tied", "mlp"]), st.lists(mutation, min_size=1, max_size=3)


def _run_child(path, x, want):
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "pxcompile.serialize", __name__])
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=fuzz_child, args=(str(path), x, want, send), daemon=True)
    p.start()
    send.close()
    try:
        if recv.poll(FUZZ_TIMEOUT):
            try:
                return recv.recv()
            except EOFError:
                pass
        else:
            p.kill()
            return ("hang", "", f"no answer in {FUZZ_TIMEOUT} s")
    finally:
        p.join(10)
        recv.close()
    return ("crash", "", f"the child died (exit code {p.exitcode})")


@pytest.mark.slow
@LINUX
def test_fuzz_mutated_files_load_equal_or_are_refused(fuzz_bases, tmp_path_factory):
    """Run longer before a release: PXCOMPILE_FUZZ_EXAMPLES=5000 python -m pytest -q
    tests/test_serialize_check.py -k fuzz (see the README's Security section)."""
    from hypothesis import HealthCheck, given, settings

    where = tmp_path_factory.mktemp("mutants")
    bases, mutations = _strategies()
    counts: dict[str, int] = {}

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        derandomize="PXCOMPILE_FUZZ_EXAMPLES" not in os.environ,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(bases, mutations)
    def check(base, muts):
        data, x, want = fuzz_bases[base]
        path = where / "mutant.px"
        path.write_bytes(_mutate(data, muts))
        result = _run_child(path, x, want)
        counts[result[0]] = counts.get(result[0], 0) + 1
        assert result[0] in ("refused", "loaded"), f"{result[0]}: {result[2]}"
        if result[0] == "loaded":
            assert not result[1], f"loaded a graph calling {result[1]}"
            # storing a JSON member compressed or not changes nothing: the same model
            if all(m[:2] == ("member", "compress") for m in muts):
                assert result[2], "a re-compressed file loaded to another model"

    check()
    print(f"fuzz: {counts}")
    assert counts.get("refused", 0) > 0


@pytest.mark.slow
@LINUX
def test_fuzz_harness_reports_loads_and_refusals(fuzz_bases, tmp_path):
    data, x, want = fuzz_bases["tied"]
    path = tmp_path / "same.px"
    path.write_bytes(_mutate(data, [("member", "compress", 1)]))  # program.json stored
    assert _run_child(path, x, want) == ("loaded", [], True)
    path.write_bytes(zlib.compress(data))
    assert _run_child(path, x, want)[:2] == ("refused", "ModelFileError")
