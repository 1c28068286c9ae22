"""``attach``: a saved adapter put on a model unmerged, every part ``inject`` can make.

The inverse of ``extract_adapter``: LoRA targets become ``LoraLayer``s holding their factors (and
DoRA's magnitude, a bias delta), the spec 1.1 kinds become ``inject``'s layers for them
(``extras``). What no layer computes exactly (the image kinds) is refused by the
kind's rule, never dropped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import constants as C
from .. import kinds
from ..adapter import Adapter
from ..errors import UsageError
from .extras import BiasShift, TokenRows, saved_copy
from .injection import InjectionReport, set_module, wrap_tokens
from .layer import LoraLayer, kind_of


def attach(model: nn.Module, adapter: Adapter) -> InjectionReport:
    """Put a saved adapter on a model, unmerged: each LoRA target in a LoraLayer holding its
    factors (its own rank, alpha, scale rule; DoRA's magnitude, a LoRA bias, a bias delta), and the
    spec 1.1 kinds as ``inject`` makes them (a ``full`` module as a replaced copy, ``tokens`` as
    new rows, a ``bias`` as a shifted bias). Anything the layers cannot compute exactly (the
    image kinds) is refused by the kind's rule, never dropped. Tensors are copied in fp32 to
    the device of the weight they adapt; the rest of the model is frozen as ``inject`` leaves it.
    """
    for t in adapter.targets.values():
        why = _attach_refusal(t)
        if why is not None:
            raise UsageError(
                f"target '{t.name}': {why}",
                code="unsupported-feature",
                hint="merge the adapter into the base instead",
            )
    for p in model.parameters():
        p.requires_grad_(False)
    kinds: dict[str, int] = {}
    for name, t in adapter.targets.items():
        base = _module_of(model, name)
        if not t.lowrank:
            _attach_whole(model, name, base, t)
            kinds[t.kind] = kinds.get(t.kind, 0) + 1
            continue
        kind = kind_of(base)
        w = getattr(base, "weight", None)
        if kind != t.kind or not isinstance(w, torch.Tensor) or tuple(w.shape) != t.weight_shape:
            raise UsageError(
                f"module '{name}' is not a {t.kind} of shape {list(t.weight_shape)}",
                code="shape-mismatch",
            )
        layer = LoraLayer(
            base,
            rank=t.rank,
            alpha=t.alpha,
            rslora=t.scale_rule == C.SCALE_RSLORA,
            dora=C.FEATURE_DORA in t.features,
            train_bias=C.FEATURE_BIAS in t.features,
            lora_bias=C.FEATURE_LORA_BIAS in t.features,
        )
        if C.FEATURE_BIAS in t.features and layer.bias_delta is None:
            raise UsageError(f"module '{name}' has no bias for the adapter's bias delta")
        with torch.no_grad():
            layer.lora_A.copy_(t.lora_A)
            layer.lora_B.copy_(t.lora_B)
            for part in (C.PART_MAGNITUDE, C.PART_BIAS_DELTA, C.PART_LORA_BIAS):
                param = getattr(layer, part)
                if param is not None:
                    param.copy_(t.part(part))
        kinds[t.kind] = kinds.get(t.kind, 0) + 1
        set_module(model, name, layer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return InjectionReport(
        modules=list(adapter.targets), trainable_params=trainable, all_params=total, kinds=kinds
    )


def _attach_refusal(t: object) -> str | None:
    from ..adapter import Target

    assert isinstance(t, Target)
    if t.lowrank and t.kind in C.KINDS_10:
        return None
    if t.kind in (C.KIND_FULL, C.KIND_TOKENS, C.KIND_BIAS):
        if t.kind == C.KIND_FULL and t.fields.get("base_rows") is not None:
            return "full: a grown vocabulary resizes the module; merge the adapter"
        return None
    return kinds.get(t.kind).refusal("attach", t) or f"{t.kind}: not applied unmerged"


def _module_of(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise UsageError(
            f"the model has no module '{name}'",
            code="missing-module",
            hint="the adapter was made for another base model",
        ) from None


def _attach_whole(model: nn.Module, name: str, base: nn.Module, t: Any) -> None:
    """A ``full``, ``tokens`` or ``bias`` target as ``inject``'s layers, holding its values."""
    with torch.no_grad():
        if t.kind == C.KIND_FULL:
            twin = saved_copy(base)
            own = dict(twin.named_parameters(recurse=False))
            for part in t.parts():
                if part not in own or tuple(own[part].shape) != tuple(t.part(part).shape):
                    raise UsageError(f"module '{name}' has no {part} of the adapter's shape")
                own[part].copy_(t.part(part))
            set_module(model, name, twin)
        elif t.kind == C.KIND_TOKENS:
            if not isinstance(base, nn.Embedding) or base.num_embeddings != t.in_features:
                raise UsageError(f"module '{name}' is not an Embedding of {t.in_features} rows")
            wrap_tokens(model, {name: list(t.fields["indices"])})
            rows = model.get_submodule(name)
            assert isinstance(rows, TokenRows)
            rows.token_values.copy_(t.part(C.PART_TOKEN_VALUES))
        else:
            if not BiasShift.fits(base):
                raise UsageError(f"module '{name}' has no bias the adapter's delta adds to")
            shift = BiasShift(base)
            shift.bias_delta.copy_(t.part(C.PART_BIAS_DELTA))
            set_module(model, name, shift)
