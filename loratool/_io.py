"""Atomic file and directory output: temp sibling, fsync, rename; never clobber without force.

Every command that writes goes through these helpers, so a crash or a refused input leaves either
the old path untouched or nothing at all, never a partial file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import OutputExistsError, UsageError


def check_output(path: str | os.PathLike[str], *, force: bool) -> Path:
    """Refuse an existing output unless ``force``; call before doing any expensive work."""
    out = Path(path)
    if out.exists() and not force:
        raise OutputExistsError(
            f"output '{out}' already exists",
            hint="pass --force to replace it, or choose another path",
        )
    if not out.parent.exists():
        raise UsageError(f"folder '{out.parent}' does not exist", hint="create it first")
    return out


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(
    path: str | os.PathLike[str], chunks: Iterable[bytes], *, force: bool = False
) -> Path:
    """Write ``chunks`` to ``path`` through a temp file in the same folder, then rename it."""
    out = check_output(path, force=force)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(out.parent)
    return out


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a temp sibling directory to fill; it becomes ``path`` only if the block succeeds.

    An existing ``path`` (with ``force``) is moved aside first and removed after the rename, so
    at every instant either the old or the new directory is complete at ``path``.
    """
    out = check_output(path, force=force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "x")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
