"""PEFT LoRA directories: the format's public names, from the modules that do each job.

- ``peft_config``: the folder's file names and ``check_config`` (PEFT's config, refused features);
- ``peft_keys``: PEFT-style state dicts → Targets (shared with diffusers and kohya);
- ``peft_read``: ``locate``, ``read_peft``, ``open_peft`` (the ``sources`` reader);
- ``peft_write``: ``peft_config``, ``model_card``, ``write_peft``.

``loratool.convert.peft.read_peft`` / ``write_peft`` stay the documented entry points.
"""

from __future__ import annotations

from .peft_config import (
    CONFIG_NAME,
    FORMAT,
    KEY_PREFIX,
    PICKLE_NAMES,
    WEIGHTS_NAME,
    check_config,
)
from .peft_keys import (
    MAX_NAME_CHARS,
    KeyGroups,
    build_targets,
    check_module_name,
    factor_loader,
    group_keys,
    refuse_extras,
)
from .peft_read import locate, open_peft, read_peft, read_peft_folder
from .peft_write import model_card, peft_config, write_peft

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "KEY_PREFIX",
    "MAX_NAME_CHARS",
    "PICKLE_NAMES",
    "WEIGHTS_NAME",
    "KeyGroups",
    "build_targets",
    "check_config",
    "check_module_name",
    "factor_loader",
    "group_keys",
    "locate",
    "model_card",
    "open_peft",
    "peft_config",
    "read_peft",
    "read_peft_folder",
    "refuse_extras",
    "write_peft",
]
