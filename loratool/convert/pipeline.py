"""Image bases for ``convert --base``: a pipeline folder as one checkpoint, kohya names, Flux.

``convert --base`` on an SD/SDXL/Flux pipeline folder (``model_index.json`` beside ``unet/`` or
``transformer/`` and the text encoders) binds an adapter that spans components — kohya files
hold ``lora_unet_…`` and ``lora_te…`` modules side by side — to all of them at once: each
component is opened as a ``Checkpoint`` and its weights are named ``<component>.<key>``, which
is how diffusers LoRA files name modules. Read-only: merge writes one model folder at a time
(``unet/``, ``transformer/``), or a single-file checkpoint that holds them all.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..adapter import Adapter
from ..checkpoint import Checkpoint, Entry
from . import naming, sd_names
from .flux import split_bfl
from .sd_names import is_pipeline, pipeline_components

__all__ = [
    "PipelineCheckpoint",
    "base_modules",
    "image_base",
    "is_pipeline",
    "kohya_resolver",
    "split_flux",
]


class PipelineCheckpoint(Checkpoint):
    """The weights of every model component of a pipeline folder, prefixed by component."""

    def __init__(self, path: str | os.PathLike[str]) -> None:  # no super(): components parse
        self.path = Path(path)
        self.is_dir = True
        self.index = None
        self.index_name = ""
        self.components = {
            name: Checkpoint(p) for name, p in pipeline_components(self.path).items()
        }
        self.shards = [s for c in self.components.values() for s in c.shards]
        self.entries: dict[str, Entry] = {}
        self.shard_metadata = {}
        self.shard_tensors = {}
        for name, ckpt in self.components.items():
            self.shard_metadata.update(ckpt.shard_metadata)
            for shard, keys in ckpt.shard_tensors.items():
                self.shard_tensors[shard] = [f"{name}.{k}" for k in keys]
            for key, entry in ckpt.entries.items():
                self.entries[f"{name}.{key}"] = entry

    def resolve(self, module: str, suffix: str = ".weight") -> str | None:
        """``<component>.<module>`` resolved inside that component (its own prefix rules)."""
        component, _, rest = module.partition(".")
        ckpt = self.components.get(component)
        if ckpt is None or not rest:
            return None
        key = ckpt.resolve(rest, suffix)
        return None if key is None else f"{component}.{key}"


# -- binding an adapter to an image base (convert --base) ------------------------------


def base_modules(ckpt: Checkpoint, *, conv: bool = False) -> list[str]:
    """Module paths of the base's 2-D (and with ``conv`` 4-D) weights; a single-file SD
    checkpoint's under their diffusers names only, so one weight never matches twice."""
    dims = (2, 4) if conv else (2,)
    aliases = ckpt.aliases()
    named = set(aliases.values())
    keys = [k for k, e in ckpt.entries.items() if len(e.info.shape) in dims and k not in named]
    keys += [k for k, v in aliases.items() if len(ckpt.shape(v)) in dims]
    return [k[: -len(".weight")] for k in keys if k.endswith(".weight")]


def image_base(ckpt: Checkpoint) -> bool:
    """A diffusers model folder, a pipeline folder or an SD single file: image-model names."""
    from ..checkpoint import DIFFUSERS_INDEX_NAME, DIFFUSERS_SINGLE_NAME

    names = {p.name for p in ckpt.shards}
    return (
        isinstance(ckpt, PipelineCheckpoint)
        or bool(ckpt.aliases())
        or DIFFUSERS_SINGLE_NAME in names
        or ckpt.index_name == DIFFUSERS_INDEX_NAME
    )


def kohya_resolver(ckpt: Checkpoint) -> Callable[[str], str]:
    """kohya name → module path: per component for image bases (sd_names), else naming's."""
    if not image_base(ckpt):
        index = naming.kohya_index(base_modules(ckpt))

        def plain(name: str) -> str:  # LyCORIS' bare-model names resolve at merge time
            if name.startswith("lycoris_"):
                return name
            return naming.resolve_kohya(name, index, where=str(ckpt.path))

        return plain
    if isinstance(ckpt, PipelineCheckpoint):
        indexes = {
            c: sd_names.underscored_index(base_modules(sub, conv=True))
            for c, sub in ckpt.components.items()
        }
    else:
        indexes = {"": sd_names.underscored_index(base_modules(ckpt, conv=True))}

    def resolve(name: str) -> str:
        component, module = sd_names.resolve(name, indexes, where=str(ckpt.path))
        return f"{component}.{module}" if component else module

    return resolve


def split_flux(adapter: Adapter, ckpt: Checkpoint, notes: list[str]) -> Adapter:
    """kohya Flux files name BFL's fused layers: split them onto diffusers' (convert/flux.py)."""

    if isinstance(ckpt, PipelineCheckpoint):
        sub = ckpt.components.get("transformer")
        return adapter if sub is None else split_bfl(adapter, sub, notes, "transformer.")
    return split_bfl(adapter, ckpt, notes)
