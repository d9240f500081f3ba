"""File writing that never leaves a half-written file behind: one file (``atomic_write*``) or
several, all or nothing (:class:`OutputSet`)."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from .errors import PxError


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then move the temporary file onto ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes 0600: give the file the old file's mode, else the usual one
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _mode_for(path: Path) -> int:
    """The mode a new version of ``path`` gets: the existing file's, else 0o666 less umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


class OutputSet:
    """Several output files written all or nothing.

    Every path is checked when the set is made, before the work that produces the files: the
    path is not a directory or some other non-regular file, its nearest existing ancestor is a
    directory this process can create files in, no two outputs are the same file, and no
    output is one of ``protect`` (the inputs). A bad path is a one-line :class:`PxError`.

    ``write_bytes``/``write`` put each file in a temporary file next to its target (creating
    missing parent directories); :meth:`commit` then moves them all into place. Leaving a
    ``with`` block by an exception, or :meth:`discard`, removes the temporary files and the
    directories made for them, so a failed command changes no existing file. A replaced file
    keeps its permission bits. Symbolic links are followed: the file they name is replaced.

    Example:
        >>> with OutputSet({"--plan-out": "p.yaml", "--masks-out": "m.npz"}) as out:  # doctest: +SKIP
        ...     out.write_bytes("p.yaml", plan_bytes)  # nothing is in place yet
        ...     out.write_bytes("m.npz", mask_bytes)
        >>> # both are in place now, or neither is
    """

    def __init__(
        self,
        paths: Mapping[str, str | os.PathLike | None] | Iterable[str | os.PathLike | None],
        protect: Iterable[str | os.PathLike | None] = (),
    ) -> None:
        items = paths.items() if isinstance(paths, Mapping) else ((None, p) for p in paths)
        self._targets: dict[str, Path] = {}  # as given -> the real path written
        self._labels: dict[Path, str] = {}
        self._staged: dict[Path, str] = {}  # real path -> its temporary file
        self._made_dirs: list[Path] = []
        guarded = [Path(os.path.realpath(p)) for p in protect if p]
        for label, p in items:
            if not p:
                continue
            shown = f"{label} {p}" if label else str(p)
            real = Path(os.path.realpath(p))
            for other, other_shown in self._labels.items():
                if other == real or _same_file(other, real):
                    raise PxError(f"{other_shown} and {shown} are the same file: give each its own")
            for g in guarded:
                if g == real or _same_file(g, real):
                    raise PxError(f"{shown}: would overwrite the input {g}: choose another path")
            _check_target(real, shown)
            self._targets[os.fspath(p)] = real
            self._labels[real] = shown

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()

    def _real(self, path: str | os.PathLike) -> Path:
        try:
            return self._targets[os.fspath(path)]
        except KeyError:
            raise ValueError(f"{path} is not one of this OutputSet's paths") from None

    def write_bytes(self, path: str | os.PathLike, data: bytes) -> None:
        self.write(path, lambda tmp: Path(tmp).write_bytes(data))

    def write_text(self, path: str | os.PathLike, text: str) -> None:
        self.write(path, lambda tmp: Path(tmp).write_text(text))

    def write(self, path: str | os.PathLike, write: Callable[[str], None]) -> None:
        """Call ``write(tmp_path)`` to produce ``path``'s new content; it goes into place on
        :meth:`commit`. An OS error is a one-line PxError; the other temporary files stay."""
        real = self._real(path)
        old = self._staged.pop(real, None)
        if old:
            _unlink(old)
        try:
            self._make_parents(real.parent)
            fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent)
            os.close(fd)
        except OSError as e:
            raise PxError(f"{self._labels[real]}: cannot write ({_why(e)})") from None
        try:
            write(tmp)
            # after the writer: it may have replaced the file (e.g. with its own atomic write)
            os.chmod(tmp, _mode_for(real))
        except BaseException as e:
            _unlink(tmp)
            if isinstance(e, OSError):
                raise PxError(f"{self._labels[real]}: cannot write ({_why(e)})") from None
            raise
        self._staged[real] = tmp

    def _make_parents(self, d: Path) -> None:
        missing = []
        while not d.exists():
            missing.append(d)
            d = d.parent
        for m in reversed(missing):
            m.mkdir()
            self._made_dirs.append(m)

    def commit(self) -> None:
        """Move every written file into place: all of them, or (on an OS error) none, with
        the files they were to replace put back."""
        done: list[tuple[Path, str | None]] = []  # target, backup of its old content
        try:
            for real, tmp in self._staged.items():
                backup = _backup(real)
                try:
                    os.replace(tmp, real)
                except BaseException:
                    if backup:
                        _unlink(backup)
                    raise
                done.append((real, backup))
        except OSError as e:
            for put, backup in reversed(done):
                if backup:
                    os.replace(backup, put)
                else:
                    _unlink(put)
            self.discard()
            raise PxError(f"{self._labels[real]}: cannot write ({_why(e)})") from None
        for _, backup in done:
            if backup:
                _unlink(backup)
        self._staged.clear()
        self._made_dirs.clear()

    def discard(self) -> None:
        """Remove the temporary files (and the directories made for them); no target changes."""
        for tmp in self._staged.values():
            _unlink(tmp)
        self._staged.clear()
        for d in reversed(self._made_dirs):
            try:
                d.rmdir()
            except OSError:
                pass  # not empty (someone else wrote there) or gone: leave it
        self._made_dirs.clear()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False  # one of them doesn't exist yet


def _check_target(real: Path, shown: str) -> None:
    """A bad output path fails before the work: see :class:`OutputSet`."""
    if real.is_dir():
        raise PxError(f"{shown}: is a directory")
    if real.exists() and not real.is_file():
        raise PxError(f"{shown}: not a regular file")
    d = real.parent
    while not d.exists():
        d = d.parent
    if not d.is_dir():
        raise PxError(f"{shown}: {d} is not a directory")
    try:  # the only reliable test (root passes os.access; read-only mounts, /proc, /sys)
        fd, probe = tempfile.mkstemp(prefix=".pxcompile-probe.", dir=d)
    except OSError as e:
        raise PxError(f"{shown}: cannot write in {d} ({_why(e)})") from None
    os.close(fd)
    _unlink(probe)


def _backup(real: Path) -> str | None:
    """A second name for ``real``'s current content (None if there is none), so that a
    failed commit can put it back."""
    if not real.exists():
        return None
    fd, backup = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".old", dir=real.parent)
    os.close(fd)
    os.unlink(backup)
    try:
        os.link(real, backup)  # a hard link: the old file stays in place meanwhile
    except OSError:
        shutil.copy2(real, backup)  # file systems without hard links
    return backup


def _unlink(p: str | Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass
