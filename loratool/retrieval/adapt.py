"""Applying an adapter to an encoder in memory: base + adapter exactly, no merged copy written."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import CompatibilityError

if TYPE_CHECKING:
    from torch import nn

    from ..adapter import Adapter

# -- applying an adapter in memory ---------------------------------------------------------------


def _resolve(name: str, modules: dict[str, nn.Module]) -> str | None:
    """The module ``name`` is, tolerating a wrapper prefix on either side (``bert.``, ``0.``)."""
    if name in modules:
        return name
    hits = [m for m in modules if m and (m.endswith("." + name) or name.endswith("." + m))]
    return hits[0] if len(hits) == 1 else None


def apply_adapter(model: nn.Module, adapter: Adapter) -> int:
    """Inject LoRA layers for ``adapter``'s targets and load its factors: base + adapter, exactly.

    Target names may carry or lack a wrapper prefix the model does not (an adapter trained on
    ``BertForSequenceClassification`` names ``bert.encoder...``, ``BertModel`` has
    ``encoder...``); a unique match is used. Targets with different rank, alpha or scale rule are
    injected group by group. Raises ``CompatibilityError`` when a target is not a module of
    ``model`` or its shape differs. Returns the number of adapted modules.
    """
    from ..adapter import Adapter as AdapterClass
    from ..lora import inject, kind_of, load_factors

    modules = dict(model.named_modules())
    targets = []
    for t in adapter.targets.values():
        name = _resolve(t.name, modules)
        if name is None:
            raise CompatibilityError(
                f"target '{t.name}' is not a module of the model",
                code="missing-module",
                hint="is this the encoder the adapter was trained on?",
            )
        module = modules[name]
        weight = getattr(module, "weight", None)
        shape = tuple(weight.shape) if weight is not None else ()
        if kind_of(module) != t.kind or shape != tuple(t.weight_shape):
            raise CompatibilityError(
                f"target '{t.name}' expects a {t.kind} weight {list(t.weight_shape)} but the "
                f"model has {type(module).__name__} {list(shape)}",
                code="shape-mismatch",
                hint="the adapter was made for a different base model",
            )
        # Renamed targets take their tensors along: a lazy loader would look up the new name.
        targets.append(
            t if name == t.name else t.replace(name=name, lora_A=t.lora_A, lora_B=t.lora_B)
        )
    groups: dict[tuple[int, float, str], list[str]] = {}
    for t in targets:
        groups.setdefault((t.rank, t.alpha, t.scale_rule), []).append(t.name)
    for (rank, alpha, rule), names in groups.items():
        inject(model, targets=names, rank=rank, alpha=alpha, rslora=rule == "rslora")
    load_factors(model, AdapterClass(targets={t.name: t for t in targets}))
    return len(targets)
