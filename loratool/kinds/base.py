"""What every adapter kind defines: the base-weight layout, ΔW's landing, the layer's maths, names.

A ``Kind`` is a stateless object; one instance per kind lives in ``loratool.kinds.REGISTRY``.
Factors are always ``A [r, in]`` and ``B [out, r]`` (spec §3); a kind whose base weight is stored
the other way round (``[in, out]``) sets ``transposed`` and everything below follows from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch


class Kind:
    """One layer kind. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    label: ClassVar[str]  # the layer's name in messages ("Linear", "Conv1D", "Embedding")
    # The base stores its weight [in, out] (Conv1D, Embedding) rather than [out, in] (Linear).
    transposed: ClassVar[bool] = False
    # Input is a dense vector (matmul layers); False for lookups by token id.
    dense: ClassVar[bool] = True
    # PEFT's tensor names for the two factors, after '<prefix><module>.'.
    peft_names: ClassVar[tuple[str, str]] = ("lora_A.weight", "lora_B.weight")
    # kohya's LoRA network holds this kind (lora_down/lora_up on nn.Linear weights).
    in_kohya: ClassVar[bool] = False
    # llama.cpp's LoRA adapters (Llama-family GGUF bases) have this layer.
    in_gguf: ClassVar[bool] = True
    # llama.cpp gathers lora_a rows by token id for embeddings (llm_build_inp_embd).
    gguf_a_transposed: ClassVar[bool] = False

    # -- the base weight ---------------------------------------------------------------------

    def weight_shape(self, in_features: int, out_features: int) -> tuple[int, int]:
        """Shape of ``M.weight`` as the base model stores it (spec §3.2)."""
        return (in_features, out_features) if self.transposed else (out_features, in_features)

    def features(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """``(in_features, out_features)`` of a stored weight of this kind."""
        rows, cols = int(shape[0]), int(shape[1])
        return (rows, cols) if self.transposed else (cols, rows)

    def wraps(self, module: Any) -> bool:
        """Whether this kind adapts the torch module ``module``."""
        return False

    # -- ΔW on the stored weight ---------------------------------------------------------------

    def stored_factors(
        self, lora_A: torch.Tensor, lora_B: torch.Tensor, coef: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` with ``left @ right == coef·B·A`` in the stored orientation.

        Linear: ``(coef·B, A)``; a transposed kind: ``(coef·Aᵀ, Bᵀ)``. Stacking several targets'
        factors side by side makes one product the exact sum of their updates (loratool/merging).
        """
        if self.transposed:
            return lora_A.t() * coef, lora_B.t()
        return lora_B * coef, lora_A

    def to_stored(self, delta: torch.Tensor) -> torch.Tensor:
        """A ΔW ``[out, in]`` in the orientation of the stored weight (a view, no copy)."""
        return delta.mT if self.transposed else delta

    def from_stored(self, weight: torch.Tensor) -> torch.Tensor:
        """A stored-orientation tensor (a weight difference, say) as ``[out, in]`` (a view)."""
        return weight.mT if self.transposed else weight

    # -- the training layer --------------------------------------------------------------------

    def init_factors(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """PEFT's initialisation: A Kaiming-uniform (a=√5), B zero, so ΔW starts at 0."""
        import math

        from torch import nn

        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        nn.init.zeros_(lora_B)

    def down(self, base: Any, x: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
        """``A·x`` for this kind's input: the r-wide intermediate of the LoRA branch."""
        import torch.nn.functional as F

        return F.linear(x, lora_A)

    def __repr__(self) -> str:
        return f"<kind {self.name}>"
