"""Tests for pxcompile.io: atomic writes never leave a half-written or temporary file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pxcompile.errors import PxError
from pxcompile.io import OutputSet, atomic_write, atomic_write_bytes, atomic_write_text


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


# -- OutputSet: several outputs, all or nothing ----------------------------------------------
def test_atomic_write_keeps_an_existing_files_mode(tmp_path):
    p = tmp_path / "secret.px"
    p.write_text("old")
    p.chmod(0o600)
    atomic_write_text(p, "new")
    assert p.read_text() == "new" and stat.S_IMODE(p.stat().st_mode) == 0o600


def test_output_set_moves_everything_into_place_at_commit(tmp_path):
    (tmp_path / "plan.yaml").write_text("old plan")
    with OutputSet({"--plan-out": tmp_path / "plan.yaml", "-o": tmp_path / "sub" / "m.px"}) as out:
        out.write_text(tmp_path / "plan.yaml", "new plan")
        out.write_bytes(tmp_path / "sub" / "m.px", b"model")
        assert (tmp_path / "plan.yaml").read_text() == "old plan"  # nothing in place yet
        assert not (tmp_path / "sub" / "m.px").exists()
    assert (tmp_path / "plan.yaml").read_text() == "new plan"
    assert (tmp_path / "sub" / "m.px").read_bytes() == b"model"
    assert names(tmp_path) == ["plan.yaml", "sub"] and names(tmp_path / "sub") == ["m.px"]


@pytest.mark.parametrize("exc", [RuntimeError("later step failed"), KeyboardInterrupt()])
def test_output_set_failure_changes_no_existing_file(tmp_path, exc):
    keep = tmp_path / "keep.px"
    keep.write_bytes(b"precious")
    keep.chmod(0o640)
    with pytest.raises(type(exc)):
        with OutputSet([keep, tmp_path / "new" / "deep" / "plan.yaml"]) as out:
            out.write_bytes(keep, b"replacement")
            out.write_text(tmp_path / "new" / "deep" / "plan.yaml", "plan")
            raise exc
    assert keep.read_bytes() == b"precious" and stat.S_IMODE(keep.stat().st_mode) == 0o640
    assert names(tmp_path) == ["keep.px"]  # no temporary file, no directory made for it


def test_output_set_keeps_modes_and_follows_links(tmp_path):
    real = tmp_path / "real.yaml"
    real.write_text("old")
    real.chmod(0o600)
    link = tmp_path / "link.yaml"
    link.symlink_to(real)
    with OutputSet([link]) as out:
        out.write_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new"
    assert stat.S_IMODE(real.stat().st_mode) == 0o600
    old = os.umask(0o022)
    try:
        with OutputSet([tmp_path / "fresh.yaml"]) as out:
            out.write_text(tmp_path / "fresh.yaml", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "fresh.yaml").stat().st_mode) == 0o644


def test_output_set_checks_every_path_first(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "in.py").write_text("model")
    cases = {
        "is a directory": {"-o": tmp_path / "dir"},
        "is not a directory": {"-o": tmp_path / "file" / "x.px"},
        "not a regular file": {"-o": "/dev/null"},
        "cannot write in /proc": {"--plan-out": "/proc/x/plan.yaml"},
        "are the same file": {"--plan-out": tmp_path / "a", "--masks-out": f"{tmp_path}/./a"},
        "would overwrite the input": {"-o": tmp_path / "in.py"},
    }
    for needle, paths in cases.items():
        with pytest.raises(PxError) as ei:
            OutputSet(paths, protect=[tmp_path / "in.py"])
        msg = str(ei.value)
        assert needle in msg and "\n" not in msg, msg
    with pytest.raises(PxError, match=r"^--plan-out .*/a and --masks-out .*/a are the same"):
        OutputSet({"--plan-out": tmp_path / "a", "--masks-out": tmp_path / "a"})
    (tmp_path / "l").symlink_to(tmp_path / "a")
    with pytest.raises(PxError, match="same file"):
        OutputSet([tmp_path / "a", tmp_path / "l"])
    assert names(tmp_path) == ["dir", "file", "in.py", "l"]  # the checks wrote nothing


def test_output_set_commit_failure_puts_everything_back(tmp_path, monkeypatch):
    first, second = tmp_path / "a.yaml", tmp_path / "b.npz"
    first.write_text("old a")
    out = OutputSet([first, second])
    out.write_text(first, "new a")
    out.write_text(second, "new b")
    real_replace = os.replace

    def flaky(src, dst):
        if str(dst) == str(second):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(PxError, match=r"b\.npz: cannot write \(No space left on device\)"):
        out.commit()
    monkeypatch.setattr(os, "replace", real_replace)
    assert first.read_text() == "old a" and names(tmp_path) == ["a.yaml"]


def test_output_set_write_error_is_one_line(tmp_path):
    out = OutputSet([tmp_path / "x.bin"])

    def full(tmp: str) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(PxError, match=r"x\.bin: cannot write \(No space left on device\)"):
        out.write(tmp_path / "x.bin", full)
    out.discard()
    assert names(tmp_path) == []
    with pytest.raises(ValueError):
        out.write_text(tmp_path / "other", "not declared")
