"""Dense kinds: ``torch.nn.Linear`` (weight ``[out, in]``) and transformers' GPT-2 ``Conv1D``
(weight stored ``[in, out]``, ``y = x @ W + b``)."""

from __future__ import annotations

from typing import Any, ClassVar

from .. import constants as C
from .base import Kind


class Linear(Kind):
    """``nn.Linear``; the only kind kohya's LoRA network (lora_down/lora_up) holds."""

    name: ClassVar[str] = C.KIND_LINEAR
    label: ClassVar[str] = "Linear"
    in_kohya: ClassVar[bool] = True
    accepts: ClassVar[frozenset[str]] = frozenset(C.FEATURES)

    def wraps(self, module: Any) -> bool:
        from torch import nn

        return isinstance(module, nn.Linear)


class Conv1D(Kind):
    """transformers' ``Conv1D`` (GPT-2): PEFT sets ``fan_in_fan_out`` for it."""

    name: ClassVar[str] = C.KIND_CONV1D
    label: ClassVar[str] = "Conv1D"
    in_gguf: ClassVar[bool] = False  # GPT-2-style bases are not Llama: llama.cpp has no such LoRA
    transposed: ClassVar[bool] = True
    accepts: ClassVar[frozenset[str]] = frozenset(C.FEATURES)  # DoRA norms per output, as PEFT

    def wraps(self, module: Any) -> bool:
        # Matched by class name so that loratool never imports transformers for this test.
        return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None
