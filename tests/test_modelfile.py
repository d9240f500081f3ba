"""Loading model files: every failure is one line naming the file and the cause."""

from __future__ import annotations

import textwrap

import pytest
import torch

from pxcompile.errors import ModelFileError
from pxcompile.modelfile import load_model_file

HEADER = "import torch\nfrom torch import nn\n"


def write(tmp_path, body: str, name: str = "m.py"):
    p = tmp_path / name
    p.write_text(HEADER + textwrap.dedent(body))
    return p


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_module_and_tuple(tmp_path):
    p = write(tmp_path, "model = nn.Linear(4, 2)\nexample_inputs = (torch.randn(3, 4),)\n")
    model, inputs = load_model_file(p)
    assert isinstance(model, nn.Linear) if (nn := torch.nn) else False
    assert isinstance(inputs, tuple)


def test_factories_and_other_names(tmp_path):
    p = write(
        tmp_path,
        """
        def build():
            return nn.Linear(4, 2)
        def inputs():
            return [torch.randn(3, 4)]
        """,
    )
    model, inputs = load_model_file(p, "build", "inputs")
    assert isinstance(inputs, tuple) and model(*inputs).shape == (3, 2)


def test_file_that_raises(tmp_path):
    p = write(tmp_path, "x = 1\nraise ValueError('broken on purpose')\n")
    with pytest.raises(ModelFileError) as e:
        load_model_file(p)
    assert one_line(e) == f"{p}:4: raised ValueError: broken on purpose"


def test_missing_model_and_inputs(tmp_path):
    p = write(tmp_path, "example_inputs = (torch.randn(3, 4),)\n")
    with pytest.raises(ModelFileError) as e:
        load_model_file(p)
    assert "defines no 'model'" in one_line(e) and "--model" in str(e.value)
    p = write(tmp_path, "model = nn.Linear(4, 2)\n", "n.py")
    with pytest.raises(ModelFileError) as e:
        load_model_file(p)
    assert "defines no 'example_inputs'" in one_line(e)


def test_wrong_types(tmp_path):
    p = write(tmp_path, "model = 3\nexample_inputs = (torch.randn(3, 4),)\n")
    with pytest.raises(ModelFileError, match="must be an nn.Module"):
        load_model_file(p)
    p = write(tmp_path, "model = nn.Linear(4, 2)\nexample_inputs = 'x'\n", "n.py")
    with pytest.raises(ModelFileError, match="must be a tuple"):
        load_model_file(p)


def test_inputs_that_do_not_fit(tmp_path):
    p = write(tmp_path, "model = nn.Linear(4, 2)\nexample_inputs = (torch.randn(3, 5),)\n")
    with pytest.raises(ModelFileError) as e:
        load_model_file(p)
    assert one_line(e).startswith(f"{p}: the model fails on its example inputs: RuntimeError:")


def test_factory_that_raises(tmp_path):
    p = write(tmp_path, "def model():\n    raise KeyError('nope')\nexample_inputs = ()\n")
    with pytest.raises(ModelFileError, match=r"model\(\) raised KeyError"):
        load_model_file(p)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        load_model_file(tmp_path / "absent.py")
