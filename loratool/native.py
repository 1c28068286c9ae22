"""The optional compiled passes (``loratool/*/kernel.c``, sharing ``native.h``), when built.

setuptools builds them where a C compiler is present (``pyproject.toml``); each caller keeps a
torch path with the same arithmetic for when one is missing, turned off by its environment
switch (``LORATOOL_MERGE_KERNEL=0``, ``LORATOOL_TRAIN_KERNEL=0``), or given other dtypes.
"""

from __future__ import annotations

import importlib
import os
from typing import Any


def compiled(module: str, switch: str) -> Any:
    """The extension ``module``, or None when it is not built or ``switch`` is set to 0."""
    if os.environ.get(switch, "1") == "0":
        return None
    try:
        return importlib.import_module(module)
    except ImportError:
        return None
