"""Atomic file and directory output: owned temp sibling, fsync, rename; never clobber without force.

Every command that writes goes through these helpers, so a crash or a refused input leaves either
the old path untouched or nothing at all, never a partial file. The temporaries are marked as
ours and locked by their writer (``loratool.leftovers``): the next writer beside them removes
those of a killed run, and a second live writer of the same output is refused. A write that
runs out of space or quota anywhere inside these helpers becomes one ``DiskFullError`` after
the temporaries are gone and any previous output is back in place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import DiskFullError, OutputExistsError, UsageError
from .leftovers import Claim, claim

# ENOSPC: device full; EDQUOT: quota; EFBIG: a file over the filesystem's or RLIMIT_FSIZE's limit.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# Libraries that wrap the OSError in their own type (safetensors' Rust writer, tokenizers) still
# print the OS error; "(os error 28)" is Rust's std::io::Error formatting.
_DISK_FULL_TEXT = re.compile(
    rf"os error (?:{errno.ENOSPC}|{errno.EDQUOT}|{errno.EFBIG})\b"
    r"|No space left on device|Disk quota exceeded|File too large"
)
_WHAT = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this filesystem or the file-size limit (ulimit -f)",
}


def check_output(path: str | os.PathLike[str], *, force: bool) -> Path:
    """Refuse an existing output unless ``force``; call before doing any expensive work."""
    out = Path(path)
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputExistsError(
            f"output '{out}' already exists",
            hint="pass --force to replace it, or choose another path",
        )
    if not out.parent.exists():
        raise UsageError(f"folder '{out.parent}' does not exist", hint="create it first")
    return out


def disk_full_errno(exc: BaseException) -> int | None:
    """The disk-full errno behind ``exc`` (itself, its cause or context, or its text), or None."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen and len(seen) < 20:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return e.errno
        m = _DISK_FULL_TEXT.search(str(e))
        if m:
            text = m.group(0)
            if "quota" in text or str(errno.EDQUOT) in text:
                return errno.EDQUOT
            if "large" in text or str(errno.EFBIG) in text:
                return errno.EFBIG
            return errno.ENOSPC
        e = e.__cause__ or e.__context__
    return None


def disk_full_error(code: int, out: Path) -> DiskFullError:
    return DiskFullError(
        f"{_WHAT.get(code, 'disk full')} while writing '{out}'",
        hint=f"free space in '{out.parent}' or write elsewhere; nothing partial was left behind",
    )


def ensure_space(folder: str | os.PathLike[str], nbytes: int, *, out: Path | None = None) -> None:
    """Refuse up front when ``folder``'s filesystem has fewer than ``nbytes`` free bytes.

    A best-effort early answer (other writers may fill the disk meanwhile); the atomic helpers
    still turn a late ENOSPC into the same error.
    """
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < nbytes:
        target = out or Path(folder)
        raise DiskFullError(
            f"'{target}' needs {nbytes / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free",
            hint=f"free space in '{folder}' or write elsewhere",
        )


@contextlib.contextmanager
def _owned(out: Path, *, force: bool) -> Iterator[Claim]:
    """Claim ``out`` (lock + leftover clean-up) and translate disk-full failures inside."""
    try:
        with claim(out) as c:
            check_output(out, force=force)  # again: another writer may have finished meanwhile
            yield c
    except Exception as e:
        code = disk_full_errno(e)
        if code is None:
            raise
        raise disk_full_error(code, out) from None


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
    with _owned(out, force=force) as c:
        fd, tmp = c.temp_file()
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


def _fsync_tree(root: Path) -> None:
    for top, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(top, name), "rb") as f:
                os.fsync(f.fileno())


def _swap_in(c: Claim, tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and put back on failure."""
    old = None
    if out.exists() or out.is_symlink():
        old = c.aside_dir()
        os.replace(out, old / "x")
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old / "x", out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a temp sibling directory to fill; it becomes ``path`` only if the block succeeds.

    An existing ``path`` (with ``force``) is moved aside first and removed after the rename, so
    at every instant either the old or the new directory is complete at ``path`` (or, after a
    kill in between, moved aside where the next writer beside it puts it back).
    """
    out = check_output(path, force=force)
    with _owned(out, force=force) as c:
        tmp = c.temp_dir()
        try:
            yield tmp
            _fsync_tree(tmp)
            _swap_in(c, tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file_in_dir(path: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a temp sibling directory in which to write the file ``<dir>/<name of path>``.

    For writers that need a folder of scratch files beside one output file (a single-file merge
    and its sidecar): only that file is renamed to ``path``; everything else goes with the dir.
    """
    out = check_output(path, force=force)
    with _owned(out, force=force) as c:
        tmp = c.temp_dir()
        try:
            yield tmp
            produced = tmp / out.name
            with open(produced, "rb") as f:
                os.fsync(f.fileno())
            _swap_in(c, produced, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
