"""Open any adapter loratool understands and say what it was: the one entry point for readers.

``open_adapter`` returns an ``Opened``: the adapter (tensors lazy), the source format's name and,
for loratool files, the parsed container header. The loratool reader needs no torch, so
``inspect`` stays fast.

This module owns the dispatch and imports no operation package: the readers of other formats
are named here by format (``READERS``, "module:function") and imported only when a path is not
a loratool file; a path with a scheme goes to the opener named for it (``OPENERS``: ``hf://``
reads the header by HTTP range requests, loratool/hub/remote.py), so reading a local file never
imports the Hub package. Those packages import this one (for ``Opened``), never the reverse.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .adapter import Adapter
from .format import Header, read_header

LORATOOL = "loratool"


@dataclass
class Opened:
    adapter: Adapter
    format: str  # "loratool", "peft", "kohya", "diffusers", ...
    path: str
    file_bytes: int
    header: Header | None = None  # only for loratool files


# A reader takes a path and returns an Opened when the path is in its format, or None when it is
# not (so the next reader is tried). It raises FormatError when the path is its format but broken.
Reader = Callable[[str], "Opened | None"]

# Tried in this order after the loratool reader.
READERS: dict[str, str] = {
    "gguf": "loratool.convert.gguf_read:open_gguf",
    "peft": "loratool.convert.peft_read:open_peft",
    "diffusers": "loratool.convert.diffusers:open_diffusers",
    "kohya": "loratool.convert.kohya:open_kohya",
}
# A file starting with these bytes goes straight to that format's reader (a GGUF file would
# otherwise read as a safetensors header of absurd length and stop there).
MAGIC: dict[bytes, str] = {b"GGUF": "gguf"}
# The last reader: nothing matched, so it raises the error that says what the path is.
FALLBACK_READER = "loratool.convert.detect:open_unknown"
# scheme prefix -> opener (path -> Opened); imported only for such paths.
OPENERS: dict[str, str] = {"hf://": "loratool.hub.remote:open_remote_header"}


def open_adapter(path: str | os.PathLike[str]) -> Opened:
    """Open a loratool file, or any format a registered reader recognises."""
    from .errors import FormatError

    p = os.fspath(path)
    for scheme, opener in OPENERS.items():
        if p.startswith(scheme):
            opened: Opened = _resolve(opener)(p)
            return opened
    magic = _magic(p)
    if magic is not None:
        found = _resolve(READERS[magic])(p)
        if found is not None:
            return found
    try:
        header = read_header(p)
        return Opened(header.adapter, LORATOOL, p, header.file_bytes, header)
    except FormatError as e:
        if e.code not in ("not-loratool", "not-a-file"):
            raise
        first = e
    for reader in _readers():
        found = reader(p)
        if found is not None:
            return found
    raise first


def _magic(path: str) -> str | None:
    """The format whose magic bytes open the file at ``path``, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(max(map(len, MAGIC)))
    except OSError:
        return None
    return next((fmt for m, fmt in MAGIC.items() if head.startswith(m)), None)


def _readers() -> list[Reader]:
    """The registered readers, imported now (kept out of the fast path); missing ones skipped."""
    readers: list[Reader] = []
    for spec in (*READERS.values(), FALLBACK_READER):
        try:
            readers.append(_resolve(spec))
        except ImportError:
            continue
    return readers


def _resolve(spec: str) -> Callable[..., Any]:
    """The function a "module:function" spec names."""
    import importlib

    module, _, name = spec.partition(":")
    fn: Callable[..., Any] = getattr(importlib.import_module(module), name)
    return fn
