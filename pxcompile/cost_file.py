"""Cost-model files: a :class:`~pxcompile.passes.mapping.CalibratedCost` fitted to one machine
(``pxcompile calibrate -o FILE``), as plain YAML or JSON that ``--cost-model FILE`` reads.

    kind: calibrated            # the CalibratedCost formula (the only kind so far)
    name: calibrated:myhost     # how plans and reports name it
    move: 180.5                 # dense-FLOP equivalents per gathered element
    per_block: 420.0            # ... per kept block
    lowrank: 2.1                # the low-rank term costs this many times its FLOPs
    group_move: 70.0            # the grouped kernel, per element read and written (optional)
    fuse_move: 100.0            # ... its fused low-rank term, per narrow-side element (optional)
    fit: {points: 24, rms_log_error: 0.07, ...}   # how it was measured (not read back)

Every value is checked on load; a bad file is a one-line error naming the file and the key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from .errors import PxError
from .passes.mapping import COST_MODELS, CalibratedCost, CostModel

KIND = "calibrated"
PARAMS = ("move", "per_block", "lowrank", "group_move", "fuse_move")
#: Files written before the grouped kernel (or its fused low rank) lack these: the shipped
#: value is used.
OPTIONAL = ("group_move", "fuse_move")
MAX_FILE_BYTES = 1 << 20


class CostModelError(PxError):
    """A cost-model name or file that can't be used."""


def to_data(model: CalibratedCost, fit: dict[str, Any] | None = None) -> dict[str, Any]:
    """The file's plain data for ``model`` (``fit``: how it was measured, for people)."""
    d: dict[str, Any] = {"kind": KIND, "name": model.name}
    d.update({k: float(getattr(model, k)) for k in PARAMS})
    if fit:
        d["fit"] = fit
    return d


def dumps(model: CalibratedCost, fit: dict[str, Any] | None = None) -> str:
    return yaml.safe_dump(to_data(model, fit), sort_keys=False)


def from_data(data: Any, source: str) -> CalibratedCost:
    """Validate plain data read from ``source`` and build the cost model."""
    if not isinstance(data, dict):
        raise CostModelError(f"{source}: expected a mapping with kind, move, per_block, lowrank")
    unknown = set(data) - {"kind", "name", "fit", *PARAMS}
    if unknown:
        raise CostModelError(f"{source}: unknown key {sorted(unknown, key=str)[0]!r}")
    if data.get("kind") != KIND:
        raise CostModelError(f"{source}: 'kind' must be {KIND!r}, got {data.get('kind')!r}")
    kw: dict[str, Any] = {}
    for k in PARAMS:
        if k not in data:
            if k in OPTIONAL:
                continue
            raise CostModelError(f"{source}: missing {k!r}")
        v = data[k]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise CostModelError(f"{source}: {k!r} must be a finite number, got {v!r}")
        if v < 0 or (k == "lowrank" and v == 0) or v > 1e9:
            raise CostModelError(f"{source}: {k!r} must be in {_range(k)}, got {v!r}")
        kw[k] = float(v)
    name = data.get("name", f"file:{Path(source).name}")
    if not isinstance(name, str) or not name or len(name) > 200 or not name.isprintable():
        raise CostModelError(f"{source}: 'name' must be a short printable string")
    if "fit" in data and not isinstance(data["fit"], dict):
        raise CostModelError(f"{source}: 'fit' must be a mapping")
    return CalibratedCost(name=name, **kw)


def _range(k: str) -> str:
    return "(0, 1e9]" if k == "lowrank" else "[0, 1e9]"


def load(path: str | Path) -> CalibratedCost:
    """Read a cost-model file (YAML, or JSON, which is YAML too)."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_FILE_BYTES:
            raise CostModelError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
        text = p.read_text()
    except FileNotFoundError:
        raise CostModelError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CostModelError(f"{path}: cannot read ({type(e).__name__})") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        what = "JSON" if p.suffix == ".json" else "YAML"
        raise CostModelError(
            f"{path}: invalid {what} ({getattr(e, 'problem', None) or e})"
        ) from None
    return from_data(data, str(path))


def resolve(spec: str | None, where: str = "--cost-model") -> CostModel:
    """A cost model by registered name (``calibrated-cpu``, ``flops+blocks``, ...) or from a
    file; None gives the default (``calibrated-cpu``)."""
    if spec is None or spec == "":
        return COST_MODELS["calibrated-cpu"]
    if spec in COST_MODELS:
        return COST_MODELS[spec]
    if Path(spec).exists():
        return load(spec)
    names = ", ".join(sorted(COST_MODELS))
    raise CostModelError(
        f"{where} {spec}: neither a cost model ({names}) nor a file "
        "(pxcompile calibrate -o FILE writes one)"
    )
