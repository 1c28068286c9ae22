"""Temporary paths that are recognisably ours, an owner lock per output, and crash clean-up.

Every atomic output (``loratool._io``) is built in a sibling ``.NAME.loratool-XXXXXXXX.tmp``
(and an existing output moved aside to ``.NAME.loratool-XXXXXXXX.old`` during a forced
replace) while its writer holds ``.loratool.NAME.owner``: a small JSON file with the pid,
command and start time, locked with ``flock`` for as long as the writer lives. The kernel drops
that lock when the process dies, however it dies (SIGKILL, OOM killer, power loss), so:

- a second writer of the same output finds the lock held and refuses (``OutputBusyError``):
  two ``merge -o X`` at once cannot interleave into X;
- any later writer in the same folder finds the lock free with an owner file still there, knows
  its process is gone, removes that output's temporaries and, when the kill landed between
  "move the old output aside" and "rename the new one in", puts the old output back.

The lock is taken with the usual flock-then-check-inode dance, so a file unlinked by a
finishing owner between our ``open`` and our ``flock`` is never mistaken for a free lock. Where
a filesystem has no ``flock`` (some network mounts), a pid check on the same host stands in.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OutputBusyError

log = logging.getLogger(__name__)

OWNER_PREFIX = ".loratool."
OWNER_SUFFIX = ".owner"
_TEMP_KINDS = ("tmp", "old")


def owner_path(out: Path) -> Path:
    return out.parent / f"{OWNER_PREFIX}{out.name}{OWNER_SUFFIX}"


def _temp_re(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.loratool-[0-9a-f]{{8}}\.(?:tmp|old)$")


def temp_name(out: Path, kind: str = "tmp") -> Path:
    """A fresh temporary sibling name for ``out`` in our pattern (not created)."""
    assert kind in _TEMP_KINDS
    return out.parent / f".{out.name}.loratool-{secrets.token_hex(4)}.{kind}"


def leftovers_of(out: Path) -> list[Path]:
    """Our temporaries beside ``out`` (whatever their state), sorted by name."""
    pattern = _temp_re(out.name)
    try:
        names = os.listdir(out.parent)
    except OSError:
        return []
    return sorted(out.parent / n for n in names if pattern.match(n))


def _owner_doc(out: Path, command: str | None) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": (command or " ".join(sys.argv))[:500],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "output": out.name,
    }


def _read_doc(fd: int) -> dict[str, Any]:
    """The owner file's JSON, or {} when empty or unreadable (a writer killed mid-write)."""
    try:
        raw = os.pread(fd, 4096, 0)
        doc = json.loads(raw.decode("utf-8")) if raw else {}
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _pid_alive(doc: dict[str, Any]) -> bool:
    """Fallback liveness test when flock is unavailable: same host and the pid exists."""
    pid = doc.get("pid")
    if not isinstance(pid, int) or doc.get("host") != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _try_lock(path: Path) -> tuple[int | None, dict[str, Any]]:
    """Open and lock ``path`` (creating it); (fd, previous contents) or (None, live owner's doc)."""
    for _ in range(20):  # bounded: each retry means a finishing owner unlinked the file
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            doc = _read_doc(fd)
            os.close(fd)
            return None, doc
        except OSError as e:  # no flock here (ENOLCK, EOPNOTSUPP...): fall back to the pid
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                os.close(fd)
                raise
            doc = _read_doc(fd)
            if doc and _pid_alive(doc) and doc.get("pid") != os.getpid():
                os.close(fd)
                return None, doc
            return fd, doc
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, _read_doc(fd)
        os.close(fd)  # the owner finished and unlinked it under us: take a fresh one
    raise OSError(errno.EAGAIN, f"could not lock {path}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _recover(out: Path, previous: dict[str, Any]) -> list[Path]:
    """Clean up after a dead writer of ``out``: restore a moved-aside output, drop temporaries."""
    found = leftovers_of(out)
    if not out.exists():
        for old in found:
            inner = old / "x"
            if old.name.endswith(".old") and (inner.exists() or inner.is_symlink()):
                os.replace(inner, out)  # killed between "move aside" and "rename in": undo
                log.warning("restored '%s' moved aside by a killed run", out)
                break
    for path in found:
        _remove(path)
    if found:
        log.warning(
            "removed %d leftover temporary path(s) of '%s' from a killed run (pid %s, %s)",
            len(found),
            out.name,
            previous.get("pid", "?"),
            previous.get("command", "?"),
        )
    return found


def sweep(folder: Path, *, skip: str | None = None) -> list[Path]:
    """Clean up after every dead writer in ``folder`` (their owner file's lock is free)."""
    removed: list[Path] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for n in names:
        if not (n.startswith(OWNER_PREFIX) and n.endswith(OWNER_SUFFIX)):
            continue
        target = n[len(OWNER_PREFIX) : -len(OWNER_SUFFIX)]
        if not target or target == skip:
            continue
        path = folder / n
        fd, doc = _try_lock(path)
        if fd is None:
            continue  # alive: not ours to touch
        try:
            removed += _recover(folder / target, doc)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        finally:
            os.close(fd)
    return removed


@dataclass
class Claim:
    """The right to write one output: its owner lock, and the temporaries made under it."""

    out: Path
    fd: int
    removed: list[Path] = field(default_factory=list)

    def temp_dir(self) -> Path:
        for _ in range(100):
            path = temp_name(self.out)
            try:
                path.mkdir(mode=0o755)
                return path
            except FileExistsError:
                continue
        raise FileExistsError(f"no free temporary name beside {self.out}")

    def temp_file(self) -> tuple[int, Path]:
        for _ in range(100):
            path = temp_name(self.out)
            try:
                return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), path
            except FileExistsError:
                continue
        raise FileExistsError(f"no free temporary name beside {self.out}")

    def aside_dir(self) -> Path:
        path = temp_name(self.out, "old")
        path.mkdir(mode=0o755)
        return path


@contextlib.contextmanager
def claim(out: Path, *, command: str | None = None) -> Iterator[Claim]:
    """Own ``out`` for the block: refuse a live writer of it, clean up after dead ones beside it."""
    lock = owner_path(out)
    fd, previous = _try_lock(lock)
    if fd is None:
        raise OutputBusyError(
            f"output '{out}' is being written by another loratool process "
            f"(pid {previous.get('pid', '?')}, started {previous.get('started', '?')}: "
            f"{previous.get('command', '?')})",
            hint="wait for it to finish, or write to another path",
        )
    try:
        # While we hold the lock no one else may make temporaries for ``out``, so any there
        # are a dead writer's (whether or not it lived long enough to fill its owner file).
        got = Claim(out, fd, _recover(out, previous))
        got.removed += sweep(out.parent, skip=out.name)
        doc = json.dumps(_owner_doc(out, command)).encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, doc, 0)
        yield got
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()  # unlink while still locked, so no one takes a doomed file
        os.close(fd)
