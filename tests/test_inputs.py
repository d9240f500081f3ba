"""pxcompile.inputs: calling a model on example inputs, checking them, and its outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pxcompile.errors import TraceError
from pxcompile.inputs import as_args, call, check_inputs, output_tensors


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x, y=None):
        self.calls += 1
        out = self.lin(x)
        return {"out": out, "pair": (out, out * 2 if y is None else y)}


def test_inputs_as_a_tensor_a_tuple_or_a_dict():
    x = torch.randn(2, 4)
    assert as_args(x) == ((x,), {})
    assert as_args((x, x)) == ((x, x), {})
    assert as_args({"x": x}) == ((), {"x": x})
    m = Two()
    for inputs in (x, (x,), {"x": x}):
        assert output_tensors(call(m, inputs))[0].shape == (2, 3)


def test_output_tensors_walk_nested_outputs_in_order():
    m = Two()
    outs = output_tensors(m(torch.randn(2, 4)))
    assert len(outs) == 3 and torch.equal(outs[2], outs[0] * 2)
    assert output_tensors(["a", 3]) == []


def test_check_inputs_leaves_the_model_as_it_was_and_explains_a_misfit():
    m = Two().train()
    check_inputs(m, (torch.randn(2, 4),))
    assert m.calls.item() == 0 and m.training  # buffers and train flags put back
    with pytest.raises(TraceError, match=r"^m: the model fails on its example inputs: Runtime"):
        check_inputs(m, (torch.randn(2, 5),), "m")
    with pytest.raises(TraceError, match="example inputs are float64 but the model's param"):
        check_inputs(m, (torch.randn(2, 4, dtype=torch.float64),), "m")
