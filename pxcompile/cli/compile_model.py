"""``pxcompile MODEL.py``: trace, plan, rewrite, verify and save a model file; a model built
from its config without weights (``hf:``, ``timm:``, ``torchvision:``) is traced and planned."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from ..errors import PxError
from ..report import make_console
from .common import finish, plan_model

# A rewrite whose outputs differ from the masked-dense reference by more than this (relative
# to the largest output) is a bug, not rounding.
VERIFY_TOLERANCE = 1e-3


@contextlib.contextmanager
def progress_status(enabled: bool = True) -> Iterator:
    """A spinner on stderr with the current step; yields a ``progress(msg)`` callback."""
    console = make_console(stderr=True)
    if not enabled or not console.is_terminal:
        yield lambda msg: None
        return
    with console.status("starting") as status:
        yield lambda msg: status.update(msg)


def compile_model_file(args: argparse.Namespace) -> int:
    from .. import api
    from ..model_specs import load_model, source_name
    from ..passes.trace import is_meta_model

    err = make_console(stderr=True)
    with progress_status(not args.json) as progress:
        progress(f"loading {args.input}")
        model, inputs = load_model(args.input, args.model, args.inputs)
        progress("tracing")
        traced = api.trace(model, inputs, name=source_name(args.input), progress=progress)
        plan = plan_model(args, model, traced)
    if is_meta_model(model):  # built from its config: nothing to rewrite or run
        rc = finish(args, plan)
        if not args.json:
            err.print(
                f"not verified: {args.input} is built from its config without weights (meta "
                "device), so it is planned only: compile the model with its weights and --plan",
                highlight=False,
            )
        return rc
    with progress_status(not args.json) as progress:
        progress("rewriting")
        gm = api.apply(model, plan, inputs, traced=traced, init=args.init, progress=progress)
        progress("verifying against the masked-dense reference")
        diff = api.verify(model, gm, traced, inputs)
        extra_files = {}
        if args.output:
            progress(f"exporting {args.output}")
            extra_files[args.output] = _saved_bytes(gm, inputs)
    if diff > VERIFY_TOLERANCE:
        raise PxError(
            f"internal error: the rewrite differs from the masked-dense reference by {diff:.2e}"
        )
    errors = gm.pxcompile_init_errors
    cols = {"init err": {k: f"{v:.3f}" for k, v in errors.items()}} if errors else None
    rc = finish(args, plan, extra_files, extra_columns=cols)
    if not args.json:
        err.print(f"init: {gm.pxcompile_init} ({gm.pxcompile_init_reason})", highlight=False)
        err.print(
            f"verified: max relative output difference vs masked-dense reference {diff:.1e}"
            + (f"; wrote {args.output}" if args.output else ""),
            highlight=False,
        )
    return rc


def _saved_bytes(gm, inputs) -> bytes:
    """The saved model, in memory: outputs are written only once everything succeeded."""
    import tempfile
    from pathlib import Path

    from .. import serialize

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "model.px"
        serialize.save(gm, p, inputs)
        return p.read_bytes()
