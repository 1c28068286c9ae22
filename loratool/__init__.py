"""loratool: train, store, inspect, merge, reduce and share LoRA adapters in one specified format.

The core (this package's top level) imports no torch, click or rich; operations that need them
are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .adapter import Adapter, BaseBinding, Target, fingerprint
from .errors import (
    CompatibilityError,
    FormatError,
    HubError,
    LoratoolError,
    TrainingError,
    UsageError,
)
from .format import load, read_header, save, verify

__version__ = "0.1.0"

# Public operations, imported lazily: name -> module that defines it.
_LAZY = {
    "merge": "loratool.merging",
    "unmerge": "loratool.merging",
    "reduce_rank": "loratool.lowrank",
    "combine": "loratool.lowrank",
    "extract": "loratool.lowrank",
    "push": "loratool.hub",
    "pull": "loratool.hub",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loratool' has no attribute {name!r}")


__all__ = [
    "Adapter",
    "BaseBinding",
    "CompatibilityError",
    "FormatError",
    "HubError",
    "LoratoolError",
    "Target",
    "TrainingError",
    "UsageError",
    "combine",
    "extract",
    "fingerprint",
    "load",
    "merge",
    "pull",
    "push",
    "read_header",
    "reduce_rank",
    "save",
    "unmerge",
    "verify",
]
