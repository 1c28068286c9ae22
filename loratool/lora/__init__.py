"""The LoRA layer and its injection into a torch model: inject, attach, extract, remove.

``LoraLayer`` (``layer``) wraps a frozen module of any registered kind (loratool/kinds: Linear,
transformers ``Conv1D``, Embedding) and computes ``x ↦ W0·x + s·B(A(dropout(x)))`` with the
factors in the adapter format's orientation (spec §3), so ``extract_adapter`` hands them to
``loratool.Adapter`` as they are. ``A`` starts Kaiming-uniform (a=√5) and ``B`` at zero, as in
PEFT, so an injected model computes exactly what the base model did. Dense layers with a frozen
base run as one autograd function (``FusedLora``), dropout included.

``inject`` adds fresh layers by PEFT's target rules (for training), ``attach`` puts a saved
``Adapter``'s factors on a model (to use it unmerged) (``injection``); ``extract_adapter`` reads
the layers back as an ``Adapter`` and ``remove`` takes them out again, optionally merging ΔW into
the weights (``extraction``).

This package imports torch at the top: ``import loratool`` never imports it (it is not re-exported).
"""

from __future__ import annotations

from .attaching import attach
from .extraction import SOURCE_FILE, extract_adapter, hub_id_for, remove
from .injection import (
    ALL_LINEAR,
    InjectionReport,
    inject,
    load_factors,
    lora_layers,
    lora_parameters,
    parse_targets,
    select_modules,
    set_module,
)
from .layer import FusedLora, LoraLayer, kind_of

__all__ = [
    "ALL_LINEAR",
    "SOURCE_FILE",
    "FusedLora",
    "InjectionReport",
    "LoraLayer",
    "attach",
    "extract_adapter",
    "hub_id_for",
    "inject",
    "kind_of",
    "load_factors",
    "lora_layers",
    "lora_parameters",
    "parse_targets",
    "remove",
    "select_modules",
    "set_module",
]
