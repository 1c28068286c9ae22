"""What every adapter kind defines: the base-weight layout, ΔW's landing, the layer's maths, names.

A ``Kind`` is a stateless object; one instance per kind lives in ``loratool.kinds.REGISTRY``.
Factors are always ``A [r, in]`` and ``B [out, r]`` (spec §3); a kind whose base weight is stored
the other way round (``[in, out]``) sets ``transposed`` and everything below follows from it.

Spec 1.1 (§3.5–3.6) lets a kind own tensors other than the two factors. What a target stores is
``parts(target)`` (part name → shape; the file holds ``M.<part>``), which is all the header
validation needs (rules 16–19 for any kind); ``entry_fields`` and ``read_entry``/``entry`` are its
header fields; ``bound`` is the base tensor it binds to (§4.3). How it changes the base is
``merge_weight``/``merge_bias`` (dense, fp32 or wider), used whenever ``needs_dense`` says the
factor path (``stored_factors``, one exact product for stacked plain LoRA) does not cover it;
``refusal(op, target)`` says what an operation must refuse, so nothing is silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from .. import constants as C

if TYPE_CHECKING:
    import torch

    from ..adapter import Target

    Bad = Callable[[str], Exception]  # builds the bad-target error for one message

# Operation names ``Kind.refusal`` is asked about (the commands and API calls that touch targets).
OPS = (
    "merge",
    "unmerge",
    "reduce-rank",
    "combine",
    "extract",
    "kohya",
    "gguf",
    "diffusers",
    "attach",
    "serve",
)


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
    # -- spec 1.1 ---------------------------------------------------------------------------------
    # The target stores lora_A/lora_B and ΔW = scale·B·A (every 1.0 kind); False for full tensors.
    lowrank: ClassVar[bool] = True
    # The §3.5 features a target of this kind may carry (field ``features``).
    accepts: ClassVar[frozenset[str]] = frozenset({C.FEATURE_LORA_BIAS, C.FEATURE_BIAS})
    # Fields its header entry MUST have (§4.2); 1.1 kinds name their own.
    entry_fields: ClassVar[tuple[str, ...]] = C.TARGET_FIELDS

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

    # -- spec 1.1: what a target of this kind stores, binds to and does ---------------------------

    def parts(self, t: Target) -> dict[str, tuple[int, ...]]:
        """Tensor part → shape; the file holds ``M.<part>`` for each, and nothing else (§3.2)."""
        shapes: dict[str, tuple[int, ...]] = {
            C.PART_A: (t.rank, t.in_features),
            C.PART_B: (t.out_features, t.rank),
        }
        for feature in t.features:
            shapes[FEATURE_PART[feature]] = (t.out_features,)
        return shapes

    def bound(self, t: Target) -> tuple[str, tuple[int, ...]]:
        """The base tensor the target binds to, by suffix and stored shape (§4.3 fingerprint)."""
        return ".weight", self.weight_shape(t.in_features, t.out_features)

    def read_entry(self, entry: Mapping[str, Any], bad: Bad) -> dict[str, Any]:
        """Validate the kind's own header fields (beyond §4.2's six); the Target's ``fields``."""
        return {}

    def entry(self, t: Target) -> dict[str, Any]:
        """The target's header entry (§4.2), 1.0 targets exactly as 1.0 wrote them."""
        out: dict[str, Any] = {
            "alpha": t.alpha,
            "in_features": t.in_features,
            "kind": t.kind,
            "out_features": t.out_features,
            "rank": t.rank,
            "scale_rule": t.scale_rule,
        }
        if t.features:
            out["features"] = sorted(t.features)
        return out

    def needs_dense(self, t: Target) -> bool:
        """Whether merging this target's weight needs the dense path (not one stacked product)."""
        return C.FEATURE_DORA in t.features

    def merge_weight(self, t: Target, W: torch.Tensor, coef: float) -> torch.Tensor:
        """The merged stored weight from ``W`` (fp32 or fp64, stored orientation), densely.

        Plain LoRA: ``W + coef·ΔW``; DoRA (§3.5): ``m ⊙ V/‖V‖_row`` with ``V = W + ΔW`` in the
        ``[out, in]`` orientation, the norm over the input dimension (PEFT's rule).
        """
        from .features import dora_merge, lowrank_delta

        delta = self.to_stored(lowrank_delta(t, W.dtype, W.device))
        if C.FEATURE_DORA in t.features:
            return dora_merge(self, t, W, delta, coef)
        return W + coef * delta

    def merge_bias(self, t: Target, b: torch.Tensor, coef: float) -> torch.Tensor:
        """The merged bias from ``b`` (fp32 or wider): ``b + coef·(scale·lora_bias + bias_delta)``."""
        from .features import bias_delta

        return b + coef * bias_delta(t, b.dtype, b.device)

    def exact_inverse(self, t: Target) -> bool:
        """Whether unmerge can undo this target from the merged tensor alone (a subtraction).

        DoRA's inverse needs the pre-merge norms and replacements the original values: both
        only from a reversible merge's sidecar.
        """
        return C.FEATURE_DORA not in t.features

    def touches_bias(self, t: Target) -> bool:
        """Whether merging this target changes ``M.bias`` too."""
        return bool({C.FEATURE_LORA_BIAS, C.FEATURE_BIAS} & set(t.features))

    def refusal(self, op: str, t: Target) -> str | None:
        """Why ``op`` (one of ``OPS``) cannot handle this target exactly, or None when it can.

        1.0 kinds refuse nothing here (each operation has its own checks); features refuse where
        the operation has no exact rule for them (spec §3.7's table).
        """
        from .features import feature_refusal

        return feature_refusal(op, t)

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


# The tensor part each §3.5 feature adds, all of shape [out].
FEATURE_PART = {
    C.FEATURE_DORA: C.PART_MAGNITUDE,
    C.FEATURE_LORA_BIAS: C.PART_LORA_BIAS,
    C.FEATURE_BIAS: C.PART_BIAS_DELTA,
}
