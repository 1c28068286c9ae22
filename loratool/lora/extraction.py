"""Reading LoRA layers back off a model: ``extract_adapter``, and ``remove`` (optionally merging)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter import Adapter, Target
from ..errors import UsageError
from .injection import lora_layers, set_module

SOURCE_FILE = "loratool_source.json"  # written beside a model's weights: {"hub_id": ..., ...}


def hub_id_for(name_or_path: str | os.PathLike[str] | None) -> str | None:
    """The Hub id a model loaded from ``name_or_path`` binds to, or None; never a local path.

    A local directory gives the ``hub_id`` of its ``loratool_source.json`` if it has one; a name
    that is not a local path and looks like ``owner/name`` is taken as a Hub id.
    """
    if not name_or_path:
        return None
    path = Path(name_or_path)
    if path.exists():
        try:
            record = json.loads((path / SOURCE_FILE).read_text())
        except (OSError, ValueError):
            return None
        hub = record.get("hub_id") if isinstance(record, dict) else None
        return hub if isinstance(hub, str) and hub else None
    text = str(name_or_path)
    return text if re.fullmatch(r"[\w.-]+/[\w.-]+", text) else None


def extract_adapter(
    model: nn.Module,
    *,
    hub_id: str | None = None,
    revision: str | None = None,
    provenance: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Adapter:
    """The injected LoRA layers as a ``loratool.Adapter`` (factors copied to CPU in ``dtype``).

    ``hub_id`` defaults to what the model was loaded from (``config._name_or_path`` through
    ``hub_id_for``), so a model from a fixture directory binds to its recorded Hub id.
    """
    if hub_id is None:
        config = getattr(model, "config", None)
        hub_id = hub_id_for(getattr(config, "_name_or_path", None))
    targets = [
        Target.from_factors(
            name,
            layer.lora_A.detach().to("cpu", dtype).contiguous(),
            layer.lora_B.detach().to("cpu", dtype).contiguous(),
            alpha=layer.alpha,
            scale_rule=layer.scale_rule,
            kind=layer.kind,
        )
        for name, layer in lora_layers(model)
    ]
    if not targets:
        raise UsageError("the model has no LoRA layers", code="no-targets", hint="call inject()")
    return Adapter.from_targets(targets, hub_id=hub_id, revision=revision, provenance=provenance)


def remove(model: nn.Module, *, merge: bool = False) -> int:
    """Put the base modules back in place of the LoRA layers; with ``merge``, add ΔW first.

    The merge adds ``s·B@A`` computed in fp32 and cast to the weight's dtype. Returns how many
    layers were removed. Parameters keep their ``requires_grad`` as ``inject`` left them (frozen).
    """
    found = list(lora_layers(model))
    for name, layer in found:
        if merge:
            with torch.no_grad():
                w = layer.weight
                w.copy_((w.float() + layer.delta_weight().to(w.device)).to(w.dtype))
        set_module(model, name, layer.base)
    return len(found)
