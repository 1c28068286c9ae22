"""Open any adapter loratool understands and say what it was: the one entry point for readers.

``open_adapter`` returns an ``Opened``: the adapter (tensors lazy), the source format's name and,
for loratool files, the parsed container header. Readers for other formats register in ``READERS``
(see loratool/convert); the loratool reader needs no torch, so ``inspect`` stays fast.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

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
READERS: list[Reader] = []


def open_adapter(path: str | os.PathLike[str]) -> Opened:
    """Open a loratool file, or any format a registered reader recognises."""
    from .errors import FormatError

    p = os.fspath(path)
    if p.startswith("hf://"):
        # hf://REPO_ID[@REV]/FILE: the header by HTTP range requests (loratool/hub/remote.py); the Hub
        # client is imported only for such paths.
        from .hub import open_remote_header

        return open_remote_header(p)
    try:
        header = read_header(p)
        return Opened(header.adapter, LORATOOL, p, header.file_bytes, header)
    except FormatError as e:
        if e.code not in ("not-loratool", "not-a-file"):
            raise
        first = e
    _load_readers()
    for reader in READERS:
        opened = reader(p)
        if opened is not None:
            return opened
    raise first


def _load_readers() -> None:
    """Import the converters that register readers (kept out of the fast path)."""
    import contextlib

    with contextlib.suppress(ImportError):
        import loratool.convert  # noqa: F401  (registers its readers on import)
