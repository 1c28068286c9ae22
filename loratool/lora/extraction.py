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

from .. import constants as C
from ..adapter import Adapter, Target
from ..errors import UsageError
from .extras import SAVED_FLAG, BiasShift, TiedRows, TokenRows, saved_original
from .injection import set_module
from .layer import LoraLayer

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
    targets = extract_targets(model, dtype)
    if not targets:
        raise UsageError("the model has no LoRA layers", code="no-targets", hint="call inject()")
    return Adapter.from_targets(targets, hub_id=hub_id, revision=revision, provenance=provenance)


def _cpu(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.detach().to("cpu", dtype).contiguous()


def extract_targets(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[Target]:
    """Every trained part as a target, in model order: LoRA layers with their §3.5 features,
    and the §3.6 kinds (``bias``, ``full``, ``tokens``) the injection options added."""
    out: list[Target] = []
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            parts = {
                part: _cpu(p, dtype)
                for part in (C.PART_MAGNITUDE, C.PART_BIAS_DELTA, C.PART_LORA_BIAS)
                if (p := getattr(m, part)) is not None
            }
            out.append(
                Target.from_factors(
                    name,
                    _cpu(m.lora_A, dtype),
                    _cpu(m.lora_B, dtype),
                    alpha=m.alpha,
                    scale_rule=m.scale_rule,
                    kind=m.kind,
                    tensors=parts,
                )
            )
        elif isinstance(m, BiasShift):
            out.append(
                Target.whole(name, C.KIND_BIAS, {C.PART_BIAS_DELTA: _cpu(m.bias_delta, dtype)})
            )
        elif isinstance(m, TokenRows):
            out.append(
                Target.whole(
                    name,
                    C.KIND_TOKENS,
                    {C.PART_TOKEN_VALUES: _cpu(m.token_values, dtype)},
                    indices=m.indices.tolist(),
                    base_rows=m.base.num_embeddings,
                )
            )
        elif saved_original(m) is not None:
            own = {k: _cpu(p, dtype) for k, p in m.named_parameters(recurse=False)}
            out.append(Target.whole(name, C.KIND_FULL, own))
    return out


def _module(m: object) -> nn.Module:
    assert isinstance(m, nn.Module)
    return m


def remove(model: nn.Module, *, merge: bool = False) -> int:
    """Put the base modules back in place of the LoRA layers; with ``merge``, add ΔW first.

    The merge adds ``s·B@A`` computed in fp32 and cast to the weight's dtype (DoRA: ``m ⊙ V/‖V‖``,
    trained biases added, token rows written, saved copies kept); without it the originals come
    back. Returns how many layers were removed. Parameters keep their ``requires_grad`` as
    ``inject`` left them (frozen); a kept saved copy is frozen.
    """
    found = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer | BiasShift | TokenRows | TiedRows)
        or saved_original(m) is not None
    ]
    if merge:
        for name, m in found:
            if getattr(getattr(m, "base", None), "quantized", False):
                # Its weight is dequantised afresh on every read: adding ΔW to that copy would
                # change nothing, silently. Merge into the full-precision checkpoint instead.
                raise UsageError(
                    f"'{name}' wraps a quantised base layer, which cannot take ΔW in place",
                    code="quantized-merge",
                    hint="save the adapter and `loratool merge` it into the original checkpoint "
                    "(--onto-quantized for the quantised weights it trained against)",
                )
    with torch.no_grad():
        for name, m in found:
            if saved_original(m) is not None:
                if merge:  # the trained copy stays, as a plain frozen module
                    object.__delattr__(m, SAVED_FLAG)
                    m.requires_grad_(False)
                else:
                    set_module(model, name, _module(saved_original(m)))
                continue
            base = _module(m.base)
            if merge and isinstance(m, LoraLayer):
                w = m.weight
                w.copy_(m.merged_weight().to(w.device, w.dtype))
            delta = getattr(m, C.PART_BIAS_DELTA, None)
            lb = getattr(m, C.PART_LORA_BIAS, None)
            if merge and isinstance(lb, torch.Tensor):
                if not isinstance(base.bias, torch.Tensor):
                    raise UsageError(
                        f"'{name}' has a LoRA bias but no bias to merge it into (as PEFT)",
                        code="no-bias",
                    )
                lb = lb.detach().float() * m.scale
                delta = lb if not isinstance(delta, torch.Tensor) else delta.detach().float() + lb
            if merge and isinstance(delta, torch.Tensor):
                b = base.bias
                assert isinstance(b, torch.Tensor)
                b.copy_((b.float() + delta.detach().float()).to(b.dtype))
            if merge and isinstance(m, TokenRows):
                ew = base.weight
                assert isinstance(ew, torch.Tensor)
                ew.copy_(m.weight)  # a tied head shares this weight: it follows
            set_module(model, name, base)
    return len(found)
