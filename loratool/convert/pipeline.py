"""A diffusers pipeline folder seen as one checkpoint: ``unet.…``, ``text_encoder.…`` weights.

``convert --base`` on an SD/SDXL/Flux pipeline folder (``model_index.json`` beside ``unet/`` or
``transformer/`` and the text encoders) binds an adapter that spans components — kohya files
hold ``lora_unet_…`` and ``lora_te…`` modules side by side — to all of them at once: each
component is opened as a ``Checkpoint`` and its weights are named ``<component>.<key>``, which
is how diffusers LoRA files name modules. Read-only: merge writes one model folder at a time
(``unet/``, ``transformer/``), or a single-file checkpoint that holds them all.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..checkpoint import Checkpoint, Entry
from .sd_names import pipeline_components


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
