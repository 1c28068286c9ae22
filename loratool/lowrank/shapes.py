"""Targets as matrices for the low-rank algebra: Conv2d LoRA flattened, LoHa/LoKr densified.

The QR core works on ``B [out, r]`` and ``A [r, n]``. A Conv2d LoRA is exactly that with the
kernel flattened into n = in·kh·kw (the kind's ``matrix``), so reduce-rank, combine, extract and
``inspect --stats`` treat it like a Linear one and fold the result back into ``[r, in, kh, kw]``
/ ``[out, r, 1, 1]``. LoHa and LoKr are not low-rank pairs: reduce-rank replaces each with a plain
LoRA of the same ΔW — its dense SVD (``[out, in·kh·kw]``, small for image layers), then the
same rule — so the output is the best rank-k approximation of what the file applies, as a
Linear or Conv2d LoRA (the report says ``dense-svd``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import constants as C
from .. import kinds
from ..adapter import Target

if TYPE_CHECKING:
    import torch

DENSE_KINDS = (C.KIND_LOHA, C.KIND_LOKR)


def matrix_factors(t: Target) -> tuple[torch.Tensor, torch.Tensor]:
    """(A ``[r, n]``, B ``[out, r]``) of a LoRA target; conv factors flattened (views)."""
    kind = kinds.get(t.kind)
    matrix = getattr(kind, "matrix", None)
    return matrix(t) if matrix is not None else (t.lora_A, t.lora_B)


def fan_in(t: Target) -> int:
    kind = kinds.get(t.kind)
    f = getattr(kind, "fan_in", None)
    return int(f(t)) if f is not None else t.in_features


def dense_factors(t: Target) -> tuple[torch.Tensor, torch.Tensor]:
    """(A = Vᵀ ``[p, n]``, B = U·diag(S) ``[out, p]``) with B·A = ΔW exactly up to fp64 rounding."""
    import torch

    delta = kinds.get(t.kind).dense_delta(t, torch.float64)  # type: ignore[attr-defined]
    u, s, vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1), full_matrices=False)
    return vh.to(torch.float32), (u * s).to(torch.float32)


def lora_like(
    t: Target,
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    alpha: float,
    scale_rule: str,
    dtype: torch.dtype,
) -> Target:
    """A LoRA target of rank ``A.shape[0]`` in ``t``'s place: conv2d when ``t`` has a kernel."""
    k = int(A.shape[0])
    kernel = tuple(t.fields.get("kernel") or ())
    if t.kind == C.KIND_CONV2D or kernel:
        return Target(
            t.name,
            rank=k,
            alpha=alpha,
            in_features=t.in_features,
            out_features=t.out_features,
            scale_rule=scale_rule,
            kind=C.KIND_CONV2D,
            dtype=t.dtype,
            fields={"kernel": kernel},
            lora_A=A.to(dtype).reshape(k, t.in_features, *kernel).contiguous(),
            lora_B=B.to(dtype).reshape(t.out_features, k, 1, 1).contiguous(),
        )
    kind = t.kind if t.kind in C.KINDS_10 else C.KIND_LINEAR
    return Target.from_factors(
        t.name, A.to(dtype), B.to(dtype), alpha=alpha, scale_rule=scale_rule, kind=kind
    )
