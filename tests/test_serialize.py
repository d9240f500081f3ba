"""pxcompile.save / pxcompile.load: exact round trips, a dynamic batch, a trainable module,
rebuilding onto the dense architecture, no pickle, and one-line errors for bad files."""

from __future__ import annotations

import copy
import json
import pickle
import zipfile

import pytest
import torch
import torch.nn.functional as F
from hf_zoo import greedy_loop, sparsified, tiny_gpt2, tiny_llama, token_ids
from models_zoo import CausalSDPA
from torch import fx, nn

import pxcompile
from pxcompile import serialize as S
from pxcompile.errors import ModelFileError, PlanError, PxError
from pxcompile.layers import PixelflyLinear


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))


class Block(nn.Module):
    def __init__(self, d: int = 256, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        y = self.ln1(x)

        def heads(z):
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(
            heads(self.q(y)), heads(self.k(y)), heads(self.v(y)), is_causal=True
        )
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def block() -> nn.Module:
    torch.manual_seed(0)
    return Block()


def compiled(make, x):
    # scratch init: the weights' values don't matter here, and it skips the SVDs
    gm = pxcompile.sparsify(make(), 0.3, block=32, example_inputs=(x,), init="scratch")
    assert any(isinstance(m, PixelflyLinear) for m in gm.modules())
    return gm.eval()


@pytest.fixture(scope="module")
def saved_mlp(tmp_path_factory):
    x = torch.randn(64, 256)
    gm = compiled(mlp, x)
    path = tmp_path_factory.mktemp("px") / "mlp.pxc"
    pxcompile.save(gm, path, example_inputs=(x,))
    return gm, path, x


def patterns(plan) -> list:
    return [(lp.name, lp.pattern) for lp in plan.layers]


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


def rewrite_entry(src, dst, entry, edit) -> None:
    """Copy the archive ``src`` to ``dst`` with ``entry``'s bytes passed through ``edit``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, edit(data) if info.filename == entry else data)


# ------------------------------------------------------------------------------ round trips


def test_mlp_round_trip_is_exact_and_batch_is_dynamic(saved_mlp):
    gm, path, x = saved_mlp
    m = pxcompile.load(path)
    assert isinstance(m, S.LoadedModel) and not m.training
    assert m.pxcompile_dynamic_batch
    with torch.no_grad():
        assert torch.equal(m(x), gm(x))
        for b in (1, 2, 5, 129):
            xb = torch.randn(b, 256)
            assert torch.equal(m(xb), gm(xb))
    assert patterns(m.pxcompile_plan) == patterns(gm.pxcompile_plan)
    assert m.pxcompile_layers == gm.pxcompile_layers
    # the sparse layers are single op calls in a graph of aten ops
    targets = {str(n.target) for n in m.graph.nodes if n.op == "call_function"}
    assert "pxcompile.pixelfly_linear.default" in targets


def test_transformer_block_round_trip(tmp_path):
    x = torch.randn(3, 16, 256)
    gm = compiled(block, x)
    path = tmp_path / "block.pxc"
    pxcompile.save(gm, path, example_inputs=(x,))
    m = pxcompile.load(path)
    assert m.pxcompile_dynamic_batch
    with torch.no_grad():
        assert torch.equal(m(x), gm(x))
        x2 = torch.randn(5, 16, 256)
        assert torch.equal(m(x2), gm(x2))
    # rebuilt onto a fresh dense block: real PixelflyLinear layers, same outputs
    r = pxcompile.load(path, model=Block())
    assert isinstance(r, fx.GraphModule) and not r.training
    assert sum(isinstance(mod, PixelflyLinear) for mod in r.modules()) == len(gm.pxcompile_layers)
    with torch.no_grad():
        assert torch.equal(r(x2), gm(x2))


def test_save_leaves_the_module_alone(tmp_path):
    x = torch.randn(8, 256)
    gm = pxcompile.sparsify(mlp(), 0.3, block=32, example_inputs=(x,), init="scratch")
    gm.train()
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    pxcompile.save(gm, tmp_path / "m.pxc", example_inputs=(x,))
    assert gm.training
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    assert sum(isinstance(mod, PixelflyLinear) for mod in gm.modules()) == 2


def test_static_batch_when_example_batch_is_one(tmp_path):
    x = torch.randn(1, 256)
    gm = compiled(mlp, torch.randn(8, 256))
    pxcompile.save(gm, tmp_path / "m.pxc", example_inputs=(x,))
    m = pxcompile.load(tmp_path / "m.pxc")
    assert not m.pxcompile_dynamic_batch
    with torch.no_grad():
        assert torch.equal(m(x), gm(x))


def test_plain_module_with_tied_weights(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.b.weight = self.a.weight
            self.register_buffer("scale", torch.tensor(2.0))

        def forward(self, x):
            return self.b(self.a(x)) * self.scale

    m = Tied().eval()
    x = torch.randn(3, 8)
    pxcompile.save(m, tmp_path / "t.pxc", example_inputs=x)
    t = pxcompile.load(tmp_path / "t.pxc")
    assert t.pxcompile_plan is None
    assert t.a.weight is t.b.weight
    assert set(t.state_dict()) == set(m.state_dict())
    with torch.no_grad():
        assert torch.equal(t(x), m(x))


def test_stored_example_inputs_are_used(tmp_path):
    x = torch.randn(4, 256)
    gm = compiled(mlp, x)
    assert gm.pxcompile_example_inputs == (x,)  # sparsify keeps them for save
    del gm.pxcompile_example_inputs
    with pytest.raises(PxError) as e:
        pxcompile.save(gm, tmp_path / "m.pxc")
    assert "example_inputs" in one_line(e)
    gm.pxcompile_example_inputs = (x,)
    pxcompile.save(gm, tmp_path / "m.pxc")
    with torch.no_grad():
        assert torch.equal(pxcompile.load(tmp_path / "m.pxc")(x), gm(x))


# ------------------------------------------------------------------------------ nn.Module


def test_loaded_model_is_a_trainable_module(saved_mlp):
    gm, path, x = saved_mlp
    m = pxcompile.load(path)
    assert m.train() is m and m.training
    assert m.eval() is m and not m.training
    params = dict(m.named_parameters())
    assert set(params) == {n for n, _ in gm.named_parameters()}
    assert all(p.requires_grad for p in params.values())
    assert set(m.state_dict()) == set(gm.state_dict())

    # gradients match the compiled module's exactly
    ref = copy.deepcopy(gm)
    ref(x).pow(2).mean().backward()
    m(x).pow(2).mean().backward()
    for n, p in ref.named_parameters():
        assert torch.equal(params[n].grad, p.grad), n

    # and a few optimizer steps lower the loss
    m.zero_grad()
    m.train()
    target = torch.randn(64, 256)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = F.mse_loss(m(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # a loaded model's weights can be put back into the compiled module by name
    gm2 = copy.deepcopy(gm)
    gm2.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.equal(gm2(x), m(x))


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # torch deep-copying a TreeSpec
def test_loaded_model_can_be_saved_again(saved_mlp, tmp_path):
    gm, path, x = saved_mlp
    m = pxcompile.load(path)
    pxcompile.save(m, tmp_path / "again.pxc", example_inputs=(x,))
    m2 = pxcompile.load(tmp_path / "again.pxc")
    assert m2.pxcompile_dynamic_batch and m2.pxcompile_layers == m.pxcompile_layers
    assert patterns(m2.pxcompile_plan) == patterns(gm.pxcompile_plan)
    with torch.no_grad():
        xb = torch.randn(3, 256)
        assert torch.equal(m2(xb), gm(xb))


def test_rebuild_onto_dense_model(saved_mlp, tmp_path):
    gm, path, x = saved_mlp
    dense = mlp()
    r = pxcompile.load(path, model=dense)
    assert isinstance(r.get_submodule("0"), PixelflyLinear)
    assert isinstance(dense[0], nn.Linear)  # the user's model is left alone
    with torch.no_grad():
        assert torch.equal(r(x), gm(x))
    assert patterns(r.pxcompile_plan) == patterns(gm.pxcompile_plan)

    wrong = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    with pytest.raises(PlanError) as e:
        pxcompile.load(path, model=wrong)
    assert str(path) in one_line(e)


def test_op_registration():
    torch.manual_seed(0)
    layer = PixelflyLinear(64, 128, pxcompile.PatternSpec(4, 2, 8, 4))
    from pxcompile.ops import spec_args

    x = torch.randn(6, 64, requires_grad=True)
    args = (x, layer.blocks, layer.lowrank_u, layer.lowrank_v, layer.bias, *spec_args(layer))
    torch.library.opcheck(torch.ops.pxcompile.pixelfly_linear.default, args)
    with torch.no_grad():
        assert torch.equal(torch.ops.pxcompile.pixelfly_linear(*args), layer(x))


def test_op_with_a_padded_pattern():
    """A padded layer's op call carries its padded sides (issue #12.3); an unpadded one's is
    the six ints it always was (files saved before padding existed still load)."""
    from pxcompile.ops import PixelflyOp, spec_args

    torch.manual_seed(0)
    layer = PixelflyLinear(50, 60, pxcompile.PatternSpec(4, 1, 8, 2, padded_out=64, padded_in=64))
    assert spec_args(layer)[6:] == (64, 64)
    assert len(spec_args(PixelflyLinear(64, 128, pxcompile.PatternSpec(4, 2, 8, 4)))) == 6
    x = torch.randn(6, 50, requires_grad=True)
    args = (x, layer.blocks, layer.lowrank_u, layer.lowrank_v, layer.bias, *spec_args(layer))
    torch.library.opcheck(torch.ops.pxcompile.pixelfly_linear.default, args)
    op = PixelflyOp(layer)
    y, want = op(x), layer(x)
    assert y.shape == (6, 60) and torch.equal(y, want) and "padded_in=64" in repr(op)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, layer.blocks, layer.lowrank_u], g)
    ref = torch.autograd.grad(want, [x, layer.blocks, layer.lowrank_u], g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(op.dense_weight(), layer.dense_weight())


# ------------------------------------------------------------------------------ safety


def test_file_has_no_pickle_and_loads_without_it(saved_mlp, monkeypatch):
    gm, path, x = saved_mlp
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        header = json.loads(zf.read("pxcompile.json"))
        json.loads(zf.read("program.json"))
    assert not any(n.endswith((".pkl", ".pt", ".pth")) for n in names)
    assert set(names) == {"pxcompile.json", "program.json"} | {
        t["entry"] for t in header["tensors"] if "entry" in t
    }

    def no(*a, **k):
        raise AssertionError("loading must not unpickle")

    for mod, name in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, name, no)
    m = pxcompile.load(path)
    with torch.no_grad():
        assert torch.equal(m(x), gm(x))


@pytest.mark.parametrize(
    "old,new",
    [
        ("torch.ops.aten.gelu.default", "torch.ops.evil.gelu.default"),
        ("torch.ops.aten.gelu.default", "builtins.exec"),
        ("torch.ops.aten.gelu.default", "torch.ops.aten.gelu.__call__"),
        ("torch.ops.aten.gelu.default", "torch.load"),
        ("torch.ops.aten.gelu.default", "#evil:op"),
    ],
)
def test_foreign_ops_are_refused(saved_mlp, tmp_path, old, new):
    _, path, _ = saved_mlp
    bad = tmp_path / "bad.pxc"
    rewrite_entry(path, bad, "program.json", lambda b: b.replace(old.encode(), new.encode()))
    with pytest.raises(S.UnsafeFileError) as e:
        pxcompile.load(bad)
    assert "refused" in one_line(e)


def test_code_in_expressions_names_and_guards_is_refused(saved_mlp, tmp_path):
    _, path, _ = saved_mlp
    flag = tmp_path / "pwned"

    def edits(d):
        # sympy evaluates shape expressions: code there must never run
        tv = d["graph_module"]["graph"]["tensor_values"]
        sym = next(v for v in tv.values() if "as_expr" in v["sizes"][0])
        yield lambda: sym["sizes"][0]["as_expr"].update(
            expr_str=f"__import__('pathlib').Path({str(flag)!r}).touch()"
        )
        yield lambda: sym["sizes"][0]["as_expr"].update(expr_str="Symbol.__class__")
        yield lambda: d.update(guards_code=[f"open({str(flag)!r}, 'w')"])
        # names end up in generated Python source
        sig = d["graph_module"]["module_call_graph"][0]["signature"]
        yield lambda: sig.update(forward_arg_names=["x=open('x')"])
        node = d["graph_module"]["graph"]["nodes"][0]
        yield lambda: node.update(name="a; import os")
        spec = d["graph_module"]["signature"]["input_specs"][0]
        yield lambda: spec["parameter"].update(parameter_name="0.__class__")

    with zipfile.ZipFile(path) as zf:
        n_edits = sum(1 for _ in edits(json.loads(zf.read("program.json"))))
    for i in range(n_edits):
        with zipfile.ZipFile(path) as zf:
            d = json.loads(zf.read("program.json"))
        list(edits(d))[i]()
        bad = tmp_path / f"bad{i}.pxc"
        rewrite_entry(path, bad, "program.json", lambda b, d=d: json.dumps(d).encode())
        with pytest.raises(S.UnsafeFileError) as e:
            pxcompile.load(bad)
        one_line(e)
    assert not flag.exists()


# ------------------------------------------------------------------------------ errors


def test_bad_files_give_one_line_errors(saved_mlp, tmp_path):
    _, path, _ = saved_mlp
    data = path.read_bytes()

    with pytest.raises(ModelFileError) as e:
        pxcompile.load(tmp_path / "missing.pxc")
    assert "no such file" in one_line(e)

    text = tmp_path / "model.yaml"
    text.write_text("not: a model\n")
    with pytest.raises(ModelFileError) as e:
        pxcompile.load(text)
    assert "not a pxcompile model file" in one_line(e)

    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("data.pkl", b"\x80\x04K\x01.")
    with pytest.raises(ModelFileError) as e:
        pxcompile.load(other)
    assert "not a pxcompile model file" in one_line(e)

    for cut in (len(data) // 2, len(data) - 10, 100):
        short = tmp_path / f"short{cut}.pxc"
        short.write_bytes(data[:cut])
        with pytest.raises(ModelFileError) as e:
            pxcompile.load(short)
        one_line(e)

    # a flipped byte in a tensor: the CRC catches it
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("tensors/0")
    flipped = bytearray(data)
    at = info.header_offset + 30 + len(info.filename) + len(info.extra) + 5
    flipped[at] ^= 0xFF
    bad = tmp_path / "flipped.pxc"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ModelFileError) as e:
        pxcompile.load(bad)
    assert "corrupt" in one_line(e)

    # damaged JSON, a tensor of the wrong size, a newer format
    for entry, edit in (
        ("program.json", lambda b: b[: len(b) // 2]),
        ("tensors/1", lambda b: b[:-4]),
        ("pxcompile.json", lambda b: b.replace(b'"version": 1', b'"version": 99')),
        ("pxcompile.json", lambda b: b.replace(b'"dtype": "float32"', b'"dtype": "object"')),
        ("pxcompile.json", lambda b: b.replace(b'"format": "pxcompile-model"', b'"format": "x"')),
    ):
        bad = tmp_path / "edited.pxc"
        rewrite_entry(path, bad, entry, edit)
        with pytest.raises(ModelFileError) as e:
            pxcompile.load(bad)
        one_line(e)

    # outputs of a container type nobody registered here: say what to import
    bad = tmp_path / "unregistered.pxc"
    rewrite_entry(
        path,
        bad,
        "program.json",
        lambda b: b.replace(b'builtins.tuple\\"', b'mylib.outputs.Output\\"', 1),
    )
    with pytest.raises(ModelFileError) as e:
        pxcompile.load(bad)
    assert "import mylib.outputs" in one_line(e)


def test_models_a_file_could_not_hold_are_refused_at_save(tmp_path):
    class Cond(nn.Module):
        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda x: x + 1, lambda x: x - 1, (x,))

    with pytest.raises(S.ExportError) as e:
        pxcompile.save(Cond(), tmp_path / "c.pxc", example_inputs=(torch.randn(3, 4),))
    one_line(e)
    assert not (tmp_path / "c.pxc").exists()


def test_unexportable_model_gives_one_line_error(tmp_path):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(256, 256)

        def forward(self, x):
            y = self.lin(x)
            return y.nonzero() if y.sum() > 0 else y  # data-dependent output shape

    with pytest.raises(S.ExportError) as e:
        pxcompile.save(Branchy(), tmp_path / "b.pxc", example_inputs=(torch.randn(4, 256),))
    one_line(e)
    assert not (tmp_path / "b.pxc").exists()


def test_pixelfly_attention_round_trips_as_an_op(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 2048, 64)
    gm = pxcompile.sparsify(nn.Sequential(CausalSDPA(), CausalSDPA()), 0.3, example_inputs=(x,))
    assert gm.pxcompile_plan.sparse_attention_layers
    path = tmp_path / "att.pxc"
    pxcompile.save(gm, path)
    loaded = pxcompile.load(path)
    ops = {str(n.target) for n in loaded.graph.nodes if n.op == "call_function"}
    assert "pxcompile.pixelfly_attention.default" in ops
    with torch.no_grad():
        assert torch.allclose(loaded(x), gm.eval()(x), atol=1e-5, rtol=1e-5)
    # the op's backward (recompute + autograd) matches the module's
    a, b = x[:1].clone().requires_grad_(), x[:1].clone().requires_grad_()
    loaded(a).pow(2).sum().backward()
    gm(b).pow(2).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-4, rtol=1e-3)


def test_hugging_face_model_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=128, n_head=2, n_positions=64, vocab_size=128,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 128, (2, 64))
    inputs = {"input_ids": ids, "use_cache": False}
    gm = pxcompile.sparsify(model, 0.3, example_inputs=inputs)
    path = tmp_path / "gpt2.pxc"
    pxcompile.save(gm, path)  # the rewrite wrapped the model (fx can't trace it)
    loaded = pxcompile.load(path)
    assert loaded.pxcompile_dynamic_batch
    with torch.no_grad():
        want = gm(**inputs).logits
        got = loaded(**inputs)
        got = got["logits"] if isinstance(got, dict) else got.logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_save_to_a_directory_is_a_one_line_error_before_the_export(tmp_path, monkeypatch):
    """Issue #11.5: save(gm, DIRECTORY) raised IsADirectoryError, after the whole export."""

    def no_export(*a, **k):
        raise AssertionError("exported before the path was checked")

    monkeypatch.setattr(S, "_export", no_export)
    for bad in (tmp_path, tmp_path / "file" / "m.px"):
        (tmp_path / "file").write_text("x")
        with pytest.raises(PxError) as ei:
            pxcompile.save(nn.Linear(8, 8), bad, torch.randn(2, 8))
        assert str(ei.value).startswith(f"save: {bad}: ") and "\n" not in str(ei.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ------------------------------------------------------------------ Hugging Face causal LMs


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    """A tiny GPT-2 with its default config (use_cache=True), sparsified and saved."""
    model = tiny_gpt2()
    gm = sparsified(model)
    path = tmp_path_factory.mktemp("px") / "gpt2.px"
    pxcompile.save(gm, path)  # failed before: "Found DynamicCache in output"
    return model, gm, path


@pytest.mark.slow
def test_hugging_face_causal_lm_with_default_config_saves_and_generates(saved_gpt2):
    model, gm, path = saved_gpt2
    with zipfile.ZipFile(path) as zf:
        header = json.loads(zf.read(S.HEADER))
    assert header["hf"]["class"] == "GPT2LMHeadModel" and header["hf"]["causal_lm"]
    assert header["hf"]["config"]["n_embd"] == 64  # JSON, no code
    loaded = pxcompile.load(path)
    assert isinstance(loaded, S.LoadedCausalLM) and loaded.pxcompile_dynamic_batch
    assert type(loaded.config) is type(model.config)
    assert loaded.config.to_dict() == model.config.to_dict()
    assert loaded.device == torch.device("cpu") and loaded.main_input_name == "input_ids"
    prompt = token_ids(1, 6)
    want = gm.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(want, greedy_loop(gm, prompt, 8))
    assert torch.equal(loaded.generate(prompt, max_new_tokens=8), want)
    batch = token_ids(2, 5, seed=7)
    assert torch.equal(loaded.generate(batch, max_new_tokens=4), greedy_loop(gm, batch, 4))
    # rebuilt onto the dense architecture: a sparsified HF model again, generate included
    rebuilt = pxcompile.load(path, model=tiny_gpt2())
    assert torch.equal(rebuilt.generate(prompt, max_new_tokens=8, do_sample=False), want)


@pytest.mark.slow
def test_saved_causal_lm_runs_on_growing_sequences(saved_gpt2):
    # the causal mask's stride is seq**2: the shape grammar admits small powers (issue #10.4)
    _, gm, path = saved_gpt2
    loaded = pxcompile.load(path)
    assert loaded.pxcompile_dynamic_seq
    prompt = token_ids(1, 12)
    out = loaded.generate(prompt, max_new_tokens=10)  # 22 tokens: past the example's 16
    assert torch.equal(out, greedy_loop(gm, prompt, 10))


@pytest.mark.slow
def test_saved_gpt2_with_a_fixed_length_generates_within_it(saved_gpt2):
    _, gm, path = saved_gpt2
    loaded = pxcompile.load(path)
    loaded.pxcompile_dynamic_seq = False  # what save falls back to when export can't do better
    prompt = token_ids(1, 6)
    assert torch.equal(loaded.generate(prompt, max_new_tokens=10), greedy_loop(gm, prompt, 10))
    with pytest.raises(PxError) as e:
        loaded.generate(prompt, max_new_tokens=12)  # the last step would run 17 tokens
    assert "fixed length of 16" in one_line(e)


@pytest.mark.slow
def test_hugging_face_llama_saves_with_use_cache_and_generates(tmp_path):
    gm = sparsified(tiny_llama())
    path = tmp_path / "llama.px"
    inputs = {"input_ids": token_ids(), "use_cache": True}  # a cache can't be saved: False
    pxcompile.save(gm, path, example_inputs=inputs)
    loaded = pxcompile.load(path)
    assert isinstance(loaded, S.LoadedCausalLM) and loaded.config.model_type == "llama"
    prompt = token_ids(1, 6)
    want = gm.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(want, greedy_loop(gm, prompt, 8))
    assert torch.equal(loaded.generate(prompt, max_new_tokens=8), want)


def test_plain_model_file_has_no_hugging_face_entry(saved_mlp):
    _, path, _ = saved_mlp
    with zipfile.ZipFile(path) as zf:
        assert "hf" not in json.loads(zf.read(S.HEADER))
    m = pxcompile.load(path)
    assert type(m) is S.LoadedModel and not hasattr(m, "generate")
