"""Tests for pxcompile.io: atomic writes never leave a half-written or temporary file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pxcompile.io import atomic_write, atomic_write_bytes, atomic_write_text


def names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_writes_text_and_bytes(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "héllo\n")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "a.txt").read_text() == "héllo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert names(tmp_path) == ["a.txt", "b.bin"]


def test_creates_parents_and_replaces(tmp_path):
    p = tmp_path / "x" / "y" / "out.yaml"
    atomic_write_text(p, "one")
    atomic_write_text(str(p), "two")
    assert p.read_text() == "two"
    assert names(p.parent) == ["out.yaml"]


def test_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "m.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.txt").stat().st_mode) == 0o644


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_leaves_no_temp_file_and_keeps_the_old_file(tmp_path, exc):
    target = tmp_path / "plan.yaml"
    target.write_text("original")
    seen = []

    def write(tmp: str) -> None:
        seen.append(tmp)
        Path(tmp).write_text("half-writ")
        raise exc

    with pytest.raises(type(exc)):
        atomic_write(target, write)
    assert target.read_text() == "original"
    assert names(tmp_path) == ["plan.yaml"]
    # the temporary file was in the target's directory and is gone
    assert Path(seen[0]).parent == tmp_path and not Path(seen[0]).exists()


def test_failure_on_a_new_file_creates_nothing(tmp_path):
    def write(tmp: str) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(tmp_path / "new.npz", write)
    assert names(tmp_path) == []


def test_writer_that_removes_its_temp_file(tmp_path):
    def write(tmp: str) -> None:
        os.unlink(tmp)
        raise ValueError("gone")

    with pytest.raises(ValueError):
        atomic_write(tmp_path / "x", write)
    assert names(tmp_path) == []


def test_target_is_a_directory(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "d", "x")
    assert names(tmp_path) == ["d"]
    assert names(tmp_path / "d") == []
