"""pxcompile.hf: a sparsified Hugging Face model keeps its public API (ModelView: generate,
config, device...), model files keep the config, and the generate loop of loaded models."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_zoo import greedy_loop, sparsified, tiny_gpt2, tiny_llama, token_ids
from torch import fx, nn

from pxcompile import hf
from pxcompile.errors import ModelFileError, PxError
from pxcompile.layers import PixelflyLinear


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------
# ModelView on its own (no transformers)
# ------------------------------------------------------------------------------------------


class Inner(nn.Module):
    greeting = "hello"

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self._secret = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def twice(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self(x)


def view_of(inner: nn.Module) -> hf.ModelView:
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_module("model", (x,)))
    root = nn.Module()
    root.model = inner
    return hf.ModelView(root, g, class_name="InnerPixelfly")


def test_model_view_resolves_unknown_public_attributes_on_the_wrapped_model():
    inner = Inner()
    v = view_of(inner)
    assert isinstance(v, fx.GraphModule) and isinstance(v, hf.ModelView)
    x = torch.randn(2, 4)
    assert torch.equal(v.twice(x), inner.twice(x))  # a method of the wrapped model
    assert v.greeting == "hello" and "twice" in dir(v)
    assert v.fc is inner.fc  # submodules of the wrapped model
    # its own attributes stay its own; private names are not looked up inside
    assert v.training is True and v.forward.__self__ is v
    with pytest.raises(AttributeError):
        _ = v._secret
    with pytest.raises(AttributeError, match="nothing_here"):
        _ = v.nothing_here


def test_model_view_deep_copies_as_a_model_view():
    v = view_of(Inner())
    c = copy.deepcopy(v)
    assert isinstance(c, hf.ModelView) and isinstance(c, fx.GraphModule)
    assert c.model is not v.model and c.greeting == "hello"
    x = torch.randn(2, 4)
    assert torch.equal(c.twice(x), v.twice(x))


def test_model_view_save_pretrained_points_to_pxcompile_save():
    v = view_of(Inner())
    for fn in (v.save_pretrained, v.push_to_hub):
        with pytest.raises(PxError) as e:
            fn("somewhere")
        assert "pxcompile.save" in one_line(e)


# ------------------------------------------------------------------------------------------
# the generate loop (no transformers)
# ------------------------------------------------------------------------------------------


def counting_lm(vocab: int = 8):
    """Logits that make token (last + 1) % vocab the most likely one, and record each call."""
    calls = []

    def fn(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        calls.append((ids.clone(), None if mask is None else mask.clone()))
        nxt = (ids + 1) % vocab
        return torch.nn.functional.one_hot(nxt, vocab).float() * 5.0

    return fn, calls


def test_generate_is_greedy_and_reruns_the_whole_sequence():
    fn, calls = counting_lm()
    ids = torch.tensor([[0, 1], [5, 6]])
    out = hf.generate(fn, ids, max_new_tokens=3)
    assert out.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 0, 1]]
    assert [c[0].shape[1] for c in calls] == [2, 3, 4]  # no KV cache: full sequences


def test_generate_stops_at_eos_and_pads_finished_rows():
    fn, _ = counting_lm()
    ids = torch.tensor([[1], [5]])
    out = hf.generate(fn, ids, max_new_tokens=5, eos_token_id=3, pad_token_id=7)
    assert out.tolist() == [[1, 2, 3, 7, 7, 7], [5, 6, 7, 0, 1, 2]]
    out = hf.generate(fn, torch.tensor([[1]]), max_new_tokens=5, eos_token_id=[9, 3])
    assert out.tolist() == [[1, 2, 3]]  # every row finished: stop early


def test_generate_extends_the_attention_mask():
    fn, calls = counting_lm()
    mask = torch.tensor([[0, 1]])
    hf.generate(fn, torch.tensor([[4, 1]]), max_new_tokens=2, attention_mask=mask)
    assert calls[-1][1].tolist() == [[0, 1, 1]]


def test_generate_samples_within_top_k_reproducibly():
    fn, _ = counting_lm()
    ids = torch.tensor([[0, 1]])
    greedy = hf.generate(fn, ids, max_new_tokens=4)
    top1 = hf.generate(fn, ids, max_new_tokens=4, do_sample=True, top_k=1)
    assert torch.equal(top1, greedy)
    a = hf.generate(
        fn, ids, 6, do_sample=True, temperature=50.0, generator=torch.Generator().manual_seed(3)
    )
    b = hf.generate(
        fn, ids, 6, do_sample=True, temperature=50.0, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(a, b) and not torch.equal(a, hf.generate(fn, ids, 6))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"input_ids": torch.tensor([1, 2])},
        {"max_new_tokens": -1},
        {"max_new_tokens": 2.5},
        {"do_sample": True, "temperature": 0.0},
        {"top_k": 0},
        {"attention_mask": torch.ones(1, 3)},
    ],
)
def test_generate_rejects_bad_arguments_in_one_line(kwargs):
    fn, _ = counting_lm()
    args = {"input_ids": torch.tensor([[1, 2]])} | kwargs
    with pytest.raises(PxError) as e:
        hf.generate(fn, **args)
    assert one_line(e).startswith("generate: ")


# ------------------------------------------------------------------------------------------
# model files: what is stored about a Hugging Face model
# ------------------------------------------------------------------------------------------


def test_stored_config_dtype_must_name_a_dtype():
    # transformers turns a config's dtype string into getattr(torch, dtype)
    bad = {"hf": {"model_type": "gpt2", "config": {"n_layer": 2, "dtype": "load"}}}
    with pytest.raises(ModelFileError) as e:
        hf.read_hf_header(bad, "m.px")
    assert "dtype" in one_line(e)
    nested = {"hf": {"config": {"text_config": {"torch_dtype": "save"}}}}
    with pytest.raises(ModelFileError):
        hf.read_hf_header(nested, "m.px")
    with pytest.raises(ModelFileError):
        hf.read_hf_header({"hf": {"config": "not a dict"}}, "m.px")
    with pytest.raises(ModelFileError):  # keys become the config's attributes
        hf.read_hf_header({"hf": {"config": {"a": {"__dict__": {}}}}}, "m.px")
    assert hf.read_hf_header({}, "m.px") is None
    ok = {"hf": {"model_type": "gpt2", "config": {"dtype": "float32"}}}
    assert hf.read_hf_header(ok, "m.px") is ok["hf"]


def test_config_round_trips_through_the_header():
    model = tiny_gpt2()
    info = hf.hf_header(model)
    assert info["class"] == "GPT2LMHeadModel" and info["causal_lm"] is True
    assert info["main_input_name"] == "input_ids"
    config = hf.config_from_header(info, "m.px")
    assert type(config) is type(model.config)
    assert config.to_dict() == model.config.to_dict()
    unknown = hf.config_from_header({"model_type": "no-such-type", "config": {"a": 1}}, "m.px")
    assert unknown.a == 1  # a plain PretrainedConfig


# ------------------------------------------------------------------------------------------
# a sparsified Hugging Face model is still a Hugging Face model
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2():
    model = tiny_gpt2()
    return model, sparsified(model)


@pytest.mark.slow
def test_sparsified_gpt2_keeps_the_hugging_face_api(gpt2):
    model, gm = gpt2
    assert isinstance(gm, fx.GraphModule) and isinstance(gm, hf.ModelView)
    assert gm.config is gm.model.config and gm.config.to_dict() == model.config.to_dict()
    assert gm.generation_config is gm.model.generation_config
    assert gm.device == torch.device("cpu") and gm.dtype == torch.float32
    assert gm.main_input_name == "input_ids" and gm.can_generate()
    assert gm.get_input_embeddings() is gm.model.transformer.wte
    with pytest.raises(PxError) as e:
        gm.save_pretrained("out")
    assert "pxcompile.save" in one_line(e)


@pytest.mark.slow
def test_sparsified_gpt2_generates_with_its_sparse_layers(gpt2):
    _, gm = gpt2
    layer = next(m for m in gm.modules() if isinstance(m, PixelflyLinear))
    calls = []
    hook = layer.register_forward_hook(lambda *a: calls.append(1))
    try:
        prompt = token_ids(1, 6)
        out = gm.generate(prompt, max_new_tokens=8, do_sample=False)
    finally:
        hook.remove()
    assert calls  # generate ran the compiled model's layers
    assert out.shape == (1, 14)
    assert torch.equal(out, greedy_loop(gm, prompt, 8))
    assert torch.equal(copy.deepcopy(gm).generate(prompt, max_new_tokens=8, do_sample=False), out)


@pytest.mark.slow
def test_sparsified_gpt2_fine_tunes(gpt2):
    _, gm = gpt2
    gm = copy.deepcopy(gm)
    ids = token_ids(2, 16, seed=5)
    with torch.no_grad():
        before = gm(input_ids=ids, labels=ids).loss.item()
    gm.train()
    opt = torch.optim.AdamW(gm.parameters(), lr=1e-2)
    for _ in range(4):
        loss = gm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    sparse = [m for m in gm.modules() if isinstance(m, PixelflyLinear)]
    assert all(p.grad is not None for m in sparse for p in m.parameters())
    gm.eval()
    with torch.no_grad():
        after = gm(input_ids=ids, labels=ids).loss.item()
    assert after < before


@pytest.mark.slow
def test_sparsified_llama_keeps_the_hugging_face_api_and_generates():
    model = tiny_llama()
    gm = sparsified(model)
    assert isinstance(gm, hf.ModelView)
    assert gm.config.model_type == "llama" and gm.device == torch.device("cpu")
    assert type(gm.model).__name__ == "LlamaForCausalLM"  # gm.model: the wrapped model
    prompt = token_ids(1, 6)
    out = gm.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, greedy_loop(gm, prompt, 6))
    ids = token_ids(2, 16, seed=5)
    opt = torch.optim.AdamW(gm.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = gm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
