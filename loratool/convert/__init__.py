"""Convert adapters between loratool, PEFT, kohya and GGUF; read diffusers LoRA files too.

Importing this package registers its readers in ``loratool.sources.READERS`` (PEFT folders,
diffusers files, kohya files, then a last reader that names the formats loratool knows), so
every command that opens an ADAPTER with ``open_adapter`` accepts them. Nothing here imports
torch until tensors are read or written.

    convert(src, dst, to="loratool"|"peft"|"kohya"|"gguf", dtype=None, base=None, force=False)
    detect(path) -> "loratool" | "peft" | "kohya" | "diffusers"
    peft.read_peft / peft.write_peft, kohya.read_kohya / kohya.write_kohya, gguf.write_gguf
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .core import DTYPES, KNOWN, TARGET_FORMATS, convert, detect, unknown_format

if TYPE_CHECKING:
    from ..sources import Opened

__all__ = ["DTYPES", "KNOWN", "TARGET_FORMATS", "convert", "detect"]


def _unknown(path: str) -> Opened | None:
    """The last reader: nothing matched, so say what the path is and which formats we read."""
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


def _register() -> None:
    from .. import sources
    from .diffusers import open_diffusers
    from .kohya import open_kohya
    from .peft import open_peft

    for reader in (open_peft, open_diffusers, open_kohya):
        if reader not in sources.READERS:
            sources.READERS.append(reader)
    # Keep the catch-all last, also when another module registered readers after ours.
    if _unknown in sources.READERS:
        sources.READERS.remove(_unknown)
    sources.READERS.append(_unknown)


_register()
