"""The coverage sweep (issue #10): real third-party architectures built from tiny configs with
random weights (tests/sweep_zoo.py), each checked by tests/coverage_check.py: every weight GEMM
sparse or dense for a fixed-list reason, outputs and gradients equal to the masked-dense
reference, a training step lowers the loss, save/load round-trips, the original untouched.
``python docs/coverage.py`` writes the same rows to docs/coverage.md."""

from __future__ import annotations

import pytest
import torch
from coverage_check import (
    NO_PATTERN,
    POLICY_TYPE,
    TIED,
    UNDER_MIN_BLOCKS,
    check_model,
    reason_category,
)
from sweep_zoo import ARCHS, BY_NAME
from torch import nn

from pxcompile import api

# Models failing for a gap other work is closing: name -> the gap, as a strict xfail (the
# marker must go when the fix lands). Empty: every model passes.
KNOWN_GAPS: dict[str, str] = {}


def _param(name: str):
    why = KNOWN_GAPS.get(name)
    marks = [pytest.mark.slow]
    if why:
        marks.append(pytest.mark.xfail(reason=why, strict=True))
    return pytest.param(name, marks=marks)


@pytest.mark.parametrize("name", [_param(a.name) for a in ARCHS])
def test_every_eligible_gemm_is_sparse_and_verified(name, tmp_path):
    arch = BY_NAME[name]
    pytest.importorskip(arch.library)
    model, inputs = arch.build()
    row = check_model(model, inputs, save_dir=str(tmp_path))
    assert row.sparse, "nothing was sparsified"
    assert row.verified, f"{name}:\n  " + "\n  ".join(row.problems)
    assert row.eligible_fraction == 1.0


class _Reasons(nn.Module):
    """One layer per fixed-list reason, and one sparse layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 256)
        self.mlp = nn.Linear(256, 256)
        self.tied_a = nn.Linear(256, 256)
        self.tied_b = nn.Linear(256, 256)
        self.tied_b.weight = self.tied_a.weight
        self.small = nn.Linear(256, 64)  # 2 blocks of 32 on its short side
        self.odd = nn.Linear(64, 200)
        self.odd2 = nn.Linear(200, 256)  # 200 is no multiple of 32
        self.head = nn.Linear(256, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tied_b(self.tied_a(self.mlp(self.emb(ids))))
        return self.head(h + self.odd2(self.odd(self.small(h))))


def test_dense_reasons_map_onto_the_fixed_list():
    # The plan's own wording for each fixed-list reason: fails if that wording drifts.
    ids = torch.randint(0, 64, (2, 16))
    plan = api.plan(_Reasons(), 0.3, 32, example_inputs=(ids,), policy={"pad": "never"})
    cats = {lp.name: reason_category(lp.reason) for lp in plan.layers if not lp.sparse}
    assert plan["mlp"].sparse
    assert cats == {
        "tied_a": TIED,
        "tied_b": TIED,
        "small": UNDER_MIN_BLOCKS,
        "odd": UNDER_MIN_BLOCKS,
        "odd2": NO_PATTERN,
        "head": POLICY_TYPE,
    }
    # pad: auto (the default) lays a pattern on 200 padded to a size one fits
    padded = api.plan(_Reasons(), 0.3, 32, example_inputs=(ids,))["odd2"]
    assert padded.sparse and padded.padding.startswith("padded in 200->")
    for reason, cat in [
        ("no butterfly pattern fits 256x256 at block 32 within density [0.05, 0.9]", NO_PATTERN),
        ("no pattern keeps 0.500 or more (the sparsest a larger mlp layer can have)", NO_PATTERN),
        ("used functionally (F.linear on a parameter) in a model fx cannot trace", None),
        ("T5DenseActDense.forward reads wo.weight itself", None),
        ("kept dense by rule 'x'", None),
    ]:
        assert reason_category(reason) == cat, reason
