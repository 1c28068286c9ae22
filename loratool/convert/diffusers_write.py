"""Write diffusers LoRA files: what ``save_lora_weights`` writes and ``load_lora_weights`` reads.

One safetensors file; keys ``<component>.<module>.lora_A.weight``/``lora_B.weight`` (Linear
``[r, in]``/``[out, r]``, Conv2d ``[r, in, kh, kw]``/``[out, r, 1, 1]``), and the PEFT config of
each component flattened into ``__metadata__["lora_adapter_metadata"]`` as
``"<component>.<field>"`` (``_pack_dict_with_prefix``), so every module keeps its exact scale
through ``rank_pattern``/``alpha_pattern`` — without it diffusers would assume alpha = rank.
diffusers loads LoRA pairs only: LoHa, LoKr and 1.1 features are refused (convert --to kohya
or --to peft keeps them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .. import constants as C
from .. import kinds
from ..adapter import Adapter
from ..errors import UsageError
from . import naming
from .diffusers import METADATA_KEY
from .sd_names import COMPONENTS

_FLUX_ROOTS = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder", "proj_out")


def _component(name: str, default: str) -> tuple[str, str]:
    head, _, rest = name.partition(".")
    return (head, rest) if head in COMPONENTS and rest else (default, name)


def diffusers_state(adapter: Adapter) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors and the ``__metadata__`` of the diffusers file for ``adapter``."""
    from .peft_write import peft_config

    targets = list(adapter.targets.values())
    for t in targets:
        if naming.is_kohya_name(t.name):
            raise UsageError(
                f"module names like '{t.name}' are kohya names, not module paths",
                code="needs-base",
                hint="pass --base BASE_MODEL_FOLDER to map them to the base's module paths",
            )
        if t.kind not in (C.KIND_LINEAR, C.KIND_CONV2D) or t.features:
            why = kinds.get(t.kind).refusal("diffusers", t) or f"{t.kind}: not a LoRA pair"
            raise UsageError(
                f"target '{t.name}': {why}",
                code="unsupported-kind",
                hint="convert --to kohya (LyCORIS) or --to peft keeps it",
            )
    default = "transformer" if any(t.name.startswith(_FLUX_ROOTS) for t in targets) else "unet"
    groups: dict[str, dict[str, Any]] = {}
    for t in targets:
        component, module = _component(t.name, default)
        groups.setdefault(component, {})[module] = t.replace(name=module)
    tensors: dict[str, Any] = {}
    packed: dict[str, Any] = {}
    for component, sub in sorted(groups.items()):
        part = Adapter.from_targets(sub.values())
        cfg = peft_config(part, base_model=None)
        for key, value in cfg.items():
            if value is not None:
                packed[f"{component}.{key}"] = value
        for module, t in sub.items():
            tensors[f"{component}.{module}.lora_A.weight"] = t.lora_A
            tensors[f"{component}.{module}.lora_B.weight"] = t.lora_B
    meta = {"format": "pt", METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
    return tensors, meta


def write_diffusers(adapter: Adapter, path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write a diffusers LoRA file atomically."""
    from .._io import atomic_write, check_output
    from ._st import st_bytes

    check_output(path, force=force)
    tensors, meta = diffusers_state(adapter)
    return atomic_write(path, [st_bytes(tensors, meta)], force=force)
