"""The maths and the limits of spec 1.1's per-target features (§3.5): DoRA, lora_bias, bias deltas.

Every function takes a target and computes in the dtype it is given (fp32 or fp64: callers upcast
the base exactly and round once at the end, spec §3.5), so merge and its round-trip check share
one definition. ``FEATURE_REFUSALS`` is the spec's table (§3.7) of what each operation cannot do
exactly with a feature; operations ask ``Kind.refusal`` and raise it as their error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import constants as C

if TYPE_CHECKING:
    import torch

    from ..adapter import Target
    from .base import Kind


def lowrank_delta(t: Target, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``scale·B·A`` in ``[out, in]``, the factors upcast exactly, the product in ``dtype``."""
    from . import get

    dense = getattr(get(t.kind), "dense_delta", None)
    if dense is not None:  # conv2d: ΔW shaped like the weight [out, in, kh, kw]
        return dense(t, dtype, device)
    a = t.lora_A.detach().to(device=device, dtype=dtype)
    b = t.lora_B.detach().to(device=device, dtype=dtype)
    return (b * t.scale) @ a


def dora_norm(kind: Kind, V: torch.Tensor) -> torch.Tensor:
    """‖V‖ per output row (over the input dimension) of a stored-orientation V: PEFT's norm."""
    import torch

    return torch.linalg.vector_norm(kind.from_stored(V), dim=1)


def dora_scale(kind: Kind, t: Target, norm: torch.Tensor, ndim: int = 2) -> torch.Tensor:
    """``m / ‖V‖`` shaped to broadcast over the stored weight (rows for Linear, columns else;
    output channels of an ``ndim``-d conv weight)."""
    m = t.part(C.PART_MAGNITUDE).detach().to(device=norm.device, dtype=norm.dtype)
    f = m / norm
    if kind.transposed:
        return f.unsqueeze(0)
    return f.reshape(-1, *([1] * (ndim - 1)))


def dora_merge(
    kind: Kind, t: Target, W: torch.Tensor, delta: torch.Tensor, coef: float
) -> torch.Tensor:
    """DoRA's merged weight ``m ⊙ V/‖V‖``, ``V = W + coef·ΔW`` (coef is 1: plan refuses others)."""
    V = W + coef * delta
    return dora_scale(kind, t, dora_norm(kind, V), V.dim()) * V


def dora_unmerge(
    kind: Kind, t: Target, W: torch.Tensor, delta: torch.Tensor, norm: torch.Tensor
) -> torch.Tensor:
    """The inverse of ``dora_merge`` given the pre-merge norms ‖V‖ (the reversible sidecar's)."""
    return W / dora_scale(kind, t, norm.to(W.dtype), W.dim()) - delta


def bias_delta(t: Target, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """What merging adds to ``M.bias``: ``scale·lora_bias + bias_delta`` (absent parts are 0)."""
    import torch

    out = torch.zeros(t.out_features, dtype=dtype, device=device)
    if C.FEATURE_LORA_BIAS in t.features:
        out += t.part(C.PART_LORA_BIAS).detach().to(device=device, dtype=dtype) * t.scale
    if C.FEATURE_BIAS in t.features:
        out += t.part(C.PART_BIAS_DELTA).detach().to(device=device, dtype=dtype)
    return out


_NO_KOHYA = "kohya LoRA files hold no {what}"
# feature -> op -> why the op refuses it (spec §3.7). Ops absent here handle the feature exactly.
FEATURE_REFUSALS: dict[str, dict[str, str]] = {
    C.FEATURE_DORA: {
        "combine": "DoRA magnitudes do not add: a weighted sum of DoRA adapters has no exact form",
        "gguf": "llama.cpp LoRA adapters have no DoRA magnitude",
        "diffusers": "diffusers files carry DoRA only through PEFT; convert --to peft",
        "serve": "the server applies plain LoRA only; merge the adapter into the base",
    },
    C.FEATURE_LORA_BIAS: {
        "kohya": _NO_KOHYA.format(what="bias on lora_up"),
        "gguf": "llama.cpp LoRA adapters have no bias",
        "diffusers": "diffusers LoRA files have no lora_B bias; convert --to peft",
        "serve": "the server applies no LoRA bias; merge the adapter into the base",
    },
    C.FEATURE_BIAS: {
        "kohya": _NO_KOHYA.format(what="bias deltas"),
        "gguf": "llama.cpp LoRA adapters have no bias deltas",
        "diffusers": "diffusers LoRA files have no bias deltas; convert --to peft",
        "serve": "the server applies no bias deltas; merge the adapter into the base",
    },
}


def feature_refusal(op: str, t: Target) -> str | None:
    """The first reason one of ``t``'s features stops ``op``, or None."""
    for feature in sorted(t.features):
        why = FEATURE_REFUSALS.get(feature, {}).get(op)
        if why is not None:
            return f"{feature}: {why}"
    return None
