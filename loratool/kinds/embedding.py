"""``torch.nn.Embedding``: weight ``[num_embeddings, dim]``, so ``in`` is the vocabulary and the
LoRA branch is a lookup of ``Aᵀ`` rows by token id (PEFT's ``lora_embedding_A/B``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from .. import constants as C
from .base import Kind

if TYPE_CHECKING:
    import torch


class Embedding(Kind):
    name: ClassVar[str] = C.KIND_EMBEDDING
    label: ClassVar[str] = "Embedding"
    transposed: ClassVar[bool] = True
    dense: ClassVar[bool] = False
    peft_names: ClassVar[tuple[str, str]] = ("lora_embedding_A", "lora_embedding_B")
    gguf_a_transposed: ClassVar[bool] = True
    # PEFT refuses lora_bias on embeddings, an embedding has no bias, and its DoRA (PEFT's
    # DoraEmbeddingLayer) does not scale the base rows: no feature until someone needs one.
    accepts: ClassVar[frozenset[str]] = frozenset()

    def wraps(self, module: Any) -> bool:
        from torch import nn

        return isinstance(module, nn.Embedding)

    def init_factors(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        # PEFT's embedding init: A zero, B normal. A lookup in a Kaiming-uniform A of fan-in
        # num_embeddings would be ~0 anyway, and ids take no dropout.
        from torch import nn

        nn.init.zeros_(lora_A)
        nn.init.normal_(lora_B)

    def down(self, base: Any, x: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        return F.embedding(x, lora_A.t(), base.padding_idx, base.max_norm, base.norm_type)
