"""What an adapter path is: open it the way every command does, or say what it is instead.

``detect`` names the format; ``open_unknown`` is the last reader ``sources`` tries (nothing
matched: it names what the path looks like and the formats loratool reads).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import FormatError

if TYPE_CHECKING:
    from ..sources import Opened

KNOWN = (
    "loratool adapter files, PEFT folders (adapter_config.json + adapter_model.safetensors, or "
    "a Hub cache layout), kohya LoRA files (lora_down/lora_up/alpha), diffusers LoRA files "
    "(PEFT keys, lora_adapter_metadata) and llama.cpp GGUF LoRA adapters"
)


def unknown_format(path: str, seen: str) -> FormatError:
    return FormatError(
        f"not an adapter loratool reads: {seen}",
        code="unknown-format",
        where=path,
        hint=f"loratool reads {KNOWN}",
    )


def open_unknown(path: str) -> Opened | None:
    """The last reader (``sources.FALLBACK_READER``): say what the path is and what we read."""
    p = Path(path)
    if p.is_dir():
        raise unknown_format(
            path, "a folder with no adapter_config.json or adapter_model.safetensors"
        )
    from ._st import open_st

    st = open_st(path)
    first = sorted(st.tensors)[:1]
    seen = f"a safetensors file with {len(st.tensors)} tensors named like no LoRA format"
    if first:
        seen += f" (first: '{first[0]}')"
    raise unknown_format(os.fspath(path), seen)


def _sniff(path: str) -> str | None:
    """What a file that is not safetensors seems to be; None when it looks like safetensors."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = os.path.getsize(path)
    except OSError:
        return None
    if head[:4] == b"GGUF":
        return "a GGUF file that is not a llama.cpp LoRA adapter"
    if len(head) == 9:
        (n,) = struct.unpack("<Q", head[:8])
        if n <= size and head[8:9] == b"{":
            return None
    return "a file that is neither safetensors nor GGUF"


def open_source(path: str | os.PathLike[str]) -> Opened:
    """``sources.open_adapter``, with a clear error naming the known formats."""
    from ..sources import open_adapter

    p = os.fspath(path)
    try:
        return open_adapter(p)
    except FormatError as e:
        if e.code in ("truncated", "header-too-large", "header-json") and Path(p).is_file():
            seen = _sniff(p)
            if seen is not None:
                raise unknown_format(p, seen) from None
        raise


def detect(path: str | os.PathLike[str]) -> str:
    """The format of ``path``: "loratool", "peft", "kohya" or "diffusers" (or FormatError)."""
    return open_source(path).format
