"""Loading a user's model file: ``model.py`` defines ``model`` (an ``nn.Module`` or a function
returning one) and ``example_inputs`` (a tuple, a tensor, a dict, or a function returning one).

Every failure is a one-line :class:`~pxcompile.errors.ModelFileError` naming the file and the
cause (the file raised, a name is missing, the inputs don't fit the model).
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelFileError


def _where(path: Path, exc: BaseException) -> str:
    """``path:LINE`` of the deepest frame of the user's file in the traceback."""
    line = None
    for fr in traceback.extract_tb(exc.__traceback__):
        if Path(fr.filename).resolve() == path.resolve():
            line = fr.lineno
    return f"{path}:{line}" if line else str(path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def load_model_file(
    path: str | Path, model_name: str = "model", inputs_name: str = "example_inputs"
) -> tuple[nn.Module, Any]:
    """Import ``path`` and return ``(model, example_inputs)``, checked to run together."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    mod_name = f"_pxcompile_user_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses and pickling look modules up here
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    except SystemExit as e:
        raise ModelFileError(f"{path}: exited (SystemExit {e.code}) while loading") from None
    except Exception as e:
        raise ModelFileError(f"{_where(path, e)}: raised {_first_line(e)}") from None
    finally:
        sys.path.pop(0)

    def get(name: str, what: str) -> Any:
        if not hasattr(module, name):
            flag = "--model" if what == "model" else "--inputs"
            raise ModelFileError(
                f"{path}: defines no {name!r} ({what}; choose another name with {flag})"
            )
        obj = getattr(module, name)
        if callable(obj) and not isinstance(obj, nn.Module):
            try:
                obj = obj()
            except Exception as e:
                raise ModelFileError(
                    f"{_where(path, e)}: {name}() raised {_first_line(e)}"
                ) from None
        return obj

    model = get(model_name, "model")
    if not isinstance(model, nn.Module):
        raise ModelFileError(
            f"{path}: {model_name!r} must be an nn.Module or a function returning one, "
            f"got {type(model).__name__}"
        )
    inputs = get(inputs_name, "inputs")
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    if not isinstance(inputs, tuple | dict | torch.Tensor):
        raise ModelFileError(
            f"{path}: {inputs_name!r} must be a tuple, a tensor or a dict of inputs "
            f"(or a function returning one), got {type(inputs).__name__}"
        )
    check_inputs(model, inputs, str(path))
    return model, inputs


def check_inputs(model: nn.Module, inputs: Any, where: str) -> None:
    """Run the model once on the inputs (state put back): a clear error now beats a confusing
    trace failure."""
    from .errors import TraceError
    from .inputs import check_inputs as check

    try:
        check(model, inputs, where)
    except TraceError as e:
        raise ModelFileError(str(e)) from None
