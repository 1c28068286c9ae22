"""Convert adapters between loratool, PEFT, kohya and GGUF; read diffusers LoRA files too.

Its readers (PEFT folders, diffusers files, kohya files, then a last reader that names the
formats loratool knows) are listed by name in ``loratool.sources.READERS`` and imported by it
only when a path is not a loratool file, so every command that opens an ADAPTER with
``open_adapter`` accepts them. Nothing here imports torch until tensors are read or written.

    convert(src, dst, to="loratool"|"peft"|"kohya"|"gguf", dtype=None, base=None, force=False)
    detect(path) -> "loratool" | "peft" | "kohya" | "diffusers"
    peft.read_peft / peft.write_peft, kohya.read_kohya / kohya.write_kohya, gguf.write_gguf

Imports point one way: cli → commands → operations (convert, hub, merging, lowrank, training)
→ format (format, sources, checkpoint) → adapter → constants/errors. This package imports
``sources`` (for ``Opened`` and ``open_adapter``) and the format layer, never ``hub``;
``sources`` names our readers as strings and imports them lazily, so it does not import us;
``hub`` imports ``sources`` and ``convert.peft`` (the PEFT twin of a push), never the reverse.

One job per module:

- ``core``: ``convert`` and binding to a base; ``detect``: ``detect`` and the catch-all reader;
- ``peft_config`` / ``peft_keys`` / ``peft_read`` / ``peft_write``: PEFT folders (``peft``
  re-exports their public names);
- ``diffusers``, ``kohya``, ``gguf``: one format each; ``naming``: module names across formats;
- ``_st``: safetensors headers and lazy tensor reads; ``check``: ``verify`` for other formats.
"""

from __future__ import annotations

# The format modules are part of the API (``loratool.convert.peft.read_peft``); none imports torch.
from . import diffusers, gguf, kohya, peft
from .core import DTYPES, TARGET_FORMATS, convert
from .detect import KNOWN, detect

__all__ = [
    "DTYPES",
    "KNOWN",
    "TARGET_FORMATS",
    "convert",
    "detect",
    "diffusers",
    "gguf",
    "kohya",
    "peft",
]
