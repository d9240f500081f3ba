"""Long Range Arena-style data built offline (figure 09).

* :func:`listops`: ListOps generated with the rules the LRA benchmark published (Tay et al.
  2021, after Nangia & Bowman 2018): nested lists of the operators ``MAX``, ``MIN``, ``MED``
  (median, rounded down) and ``SM`` (sum modulo 10) over the digits 0-9; a node is a leaf with
  probability 0.75 below the maximum depth (10), else an operator with 2 to 10 arguments;
  samples are kept when their length is within ``[min_len, max_len]`` tokens (LRA: 500-2000);
  the label is the value of the expression (10 classes). Tokens: the 4 operators, ``]``, the
  digits; the parentheses of LRA's text files carry nothing (they mark the tuple nesting of
  the generator) and are left out, as LRA's own length count leaves them out.
* :func:`source_classes`: byte-level text classification standing in for LRA's byte-level
  IMDb task: which of several Python standard library packages a window of ``length`` bytes of
  source comes from. Offline, long inputs, a label that depends on the whole window's content;
  files are split between train and test so no test window overlaps a training file.
"""

from __future__ import annotations

import hashlib
import random
import sysconfig
from pathlib import Path

import numpy as np
import torch

OPS = ("[MAX", "[MIN", "[MED", "[SM")
END = "]"
#: token ids: the operators 0-3, END 4, digits 5-14, padding 15
LISTOPS_VOCAB = {
    **{op: i for i, op in enumerate(OPS)},
    END: 4,
    **{str(d): 5 + d for d in range(10)},
}
LISTOPS_PAD = 15

#: the standard library packages text classification tells apart (each 200 kB or more of source
#: outside its tests)
PACKAGES = (
    "asyncio",
    "email",
    "idlelib",
    "importlib",
    "lib2to3",
    "multiprocessing",
    "tkinter",
    "xml",
)


def _tree(depth: int, max_depth: int, max_args: int, rng: random.Random) -> tuple[object, int]:
    """LRA's ``generate_tree``: (tree, length in tokens)."""
    r = rng.random() if depth < max_depth else 1.0
    if r > 0.25:
        return rng.randrange(10), 1
    n = rng.randint(2, max_args)
    args, length = [], 2
    for _ in range(n):
        t, n_tok = _tree(depth + 1, max_depth, max_args, rng)
        args.append(t)
        length += n_tok
    return (rng.choice(OPS), args), length


def _value(t: object) -> int:
    if isinstance(t, int):
        return t
    op, args = t  # type: ignore[misc]
    vals = [_value(a) for a in args]
    if op == "[MAX":
        return max(vals)
    if op == "[MIN":
        return min(vals)
    if op == "[MED":
        return int(np.median(vals))
    return sum(vals) % 10


def _tokens(t: object, out: list[int]) -> None:
    if isinstance(t, int):
        out.append(5 + t)
        return
    op, args = t  # type: ignore[misc]
    out.append(LISTOPS_VOCAB[op])
    for a in args:
        _tokens(a, out)
    out.append(LISTOPS_VOCAB[END])


def listops_expression(tokens: list[int]) -> str:
    """The text of a token sequence (padding dropped), e.g. ``[MAX 2 9 [MIN 4 7 ] 0 ]``."""
    names = {i: s for s, i in LISTOPS_VOCAB.items()}
    return " ".join(names[t] for t in tokens if t != LISTOPS_PAD)


def listops(
    n: int,
    seed: int,
    min_len: int = 500,
    max_len: int = 2000,
    pad_to: int = 2048,
    max_depth: int = 10,
    max_args: int = 10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` ListOps samples ``([n, pad_to]`` token ids padded with ``LISTOPS_PAD``, labels)."""
    if pad_to < max_len:
        raise ValueError(f"pad_to {pad_to} < max_len {max_len}")
    rng = random.Random(seed)
    x = torch.full((n, pad_to), LISTOPS_PAD, dtype=torch.long)
    y = torch.empty(n, dtype=torch.long)
    i = 0
    while i < n:
        t, length = _tree(1, max_depth, max_args, rng)
        if not min_len <= length <= max_len:
            continue
        toks: list[int] = []
        _tokens(t, toks)
        x[i, : len(toks)] = torch.tensor(toks)
        y[i] = _value(t)
        i += 1
    return x, y


def _split(name: str) -> str:
    return "test" if hashlib.sha1(name.encode()).digest()[0] < 64 else "train"  # ~25% test


def source_texts(packages: tuple[str, ...] = PACKAGES) -> dict[str, dict[str, bytes]]:
    """Per package, its ``*.py`` source (sorted files, bytes) for ``train`` and ``test`` (a
    file goes to test by a hash of its name, about a quarter of them)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: dict[str, dict[str, bytes]] = {}
    for pkg in packages:
        parts: dict[str, list[bytes]] = {"train": [], "test": []}
        for p in sorted((root / pkg).rglob("*.py")):
            if set(p.relative_to(root / pkg).parts[:-1]) & {"test", "tests", "idle_test"}:
                continue
            parts[_split(str(p.relative_to(root)))].append(p.read_bytes())
        if not parts["train"] or not parts["test"]:
            raise ValueError(f"standard library package {pkg!r} has too few files here")
        out[pkg] = {k: b"".join(v) for k, v in parts.items()}
    return out


def source_windows(
    texts: dict[str, dict[str, bytes]], split: str, n: int, length: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random windows of ``length`` bytes (classes uniform) from ``split``: (bytes as
    ids 0-255, package index)."""
    pkgs = list(texts)
    y = torch.randint(0, len(pkgs), (n,), generator=gen)
    x = torch.empty(n, length, dtype=torch.long)
    for i, c in enumerate(y.tolist()):
        data = texts[pkgs[c]][split]
        s = int(torch.randint(0, len(data) - length, (1,), generator=gen))
        x[i] = torch.from_numpy(
            np.frombuffer(data[s : s + length], dtype=np.uint8).astype(np.int64)
        )
    return x, y
