"""``torch.nn.Conv2d`` LoRA (kohya LoCon, PEFT Conv2d): A ``[r, in, kh, kw]``, B ``[out, r, 1, 1]``.

The down projection is a convolution with the layer's own kernel, the up projection a 1×1
convolution, so ΔW is the matrix product over the flattened kernel::

    ΔW[o, i, y, x] = scale · Σ_p B[o, p] · A[p, i, y, x]     (B·A with A as [r, in·kh·kw])

which is how PEFT (``Conv2d.get_delta_weight``), kohya (``merge_conv``) and diffusers merge it.
The header carries ``kernel: [kh, kw]`` (spec §3.2); ``in_features`` is the input channel count,
so the stored weight is ``[out, in, kh, kw]`` and a base whose kernel differs is refused by
shape. LyCORIS' Tucker form (``lora_mid [r, r, kh, kw]`` between a 1×1 ``lora_down`` and
``lora_up``) is read into this form exactly: A = mid ×₂ down, the same rank (convert/lycoris).

DoRA on a conv (§3.5) normalises per output channel, over ``in·kh·kw`` (PEFT's
``_get_weight_norm`` for Conv2d: ``dim=(1, 2, 3)``): ``from_stored`` gives the weight as that
matrix, so features.py's DoRA rule applies unchanged. Plain conv LoRA merges through the
stacked product like Linear (several adapters on one weight sum exactly); DoRA densely.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from .. import constants as C
from .base import Kind

if TYPE_CHECKING:
    import torch

    from ..adapter import Target
    from .base import Bad

KERNEL = "kernel"
MAX_KERNEL = 64  # bounds a hostile header; real kernels are 1×1 to 7×7


def coded(bad: Bad, code: str, why: str) -> Exception:
    """The bad-target error ``bad`` builds (it names the file), under its own rule's code."""
    error = bad(why)
    error.code = code  # type: ignore[attr-defined]
    return error


def read_kernel(entry: Mapping[str, Any], bad: Bad, *, required: bool = True) -> tuple[int, ...]:
    """``kernel: [kh, kw]``: two integers in 1..MAX_KERNEL (absent, when optional: ()).

    Rule 27 (``bad-kernel``, spec §3.8).
    """
    raw = entry.get(KERNEL)
    if raw is None and not required:
        return ()
    if (
        not isinstance(raw, list)
        or len(raw) != 2
        or not all(isinstance(k, int) and not isinstance(k, bool) for k in raw)
        or not all(1 <= k <= MAX_KERNEL for k in raw)
    ):
        why = f"kernel must be [kh, kw] with integers in 1..{MAX_KERNEL}, got {raw!r}"
        raise coded(bad, "bad-kernel", why)
    return tuple(raw)


class Conv2d(Kind):
    """LoRA on ``nn.Conv2d`` (groups 1): kohya LoCon and PEFT's Conv2d layer."""

    name: ClassVar[str] = "conv2d"
    label: ClassVar[str] = "Conv2d"
    dense: ClassVar[bool] = False  # not a matmul layer: all-linear and the trainer skip it
    in_kohya: ClassVar[bool] = True
    in_gguf: ClassVar[bool] = False
    accepts: ClassVar[frozenset[str]] = frozenset({C.FEATURE_DORA})
    entry_fields: ClassVar[tuple[str, ...]] = (*C.TARGET_FIELDS, KERNEL)

    def wraps(self, module: Any) -> bool:
        from torch import nn

        return isinstance(module, nn.Conv2d) and module.groups == 1

    def read_entry(self, entry: Mapping[str, Any], bad: Bad) -> dict[str, Any]:
        return {KERNEL: read_kernel(entry, bad)}

    def entry(self, t: Target) -> dict[str, Any]:
        out = super().entry(t)
        out[KERNEL] = list(t.fields[KERNEL])
        return out

    def kernel(self, t: Target) -> tuple[int, int]:
        kh, kw = t.fields[KERNEL]
        return int(kh), int(kw)

    def parts(self, t: Target) -> dict[str, tuple[int, ...]]:
        kh, kw = self.kernel(t)
        shapes: dict[str, tuple[int, ...]] = {
            C.PART_A: (t.rank, t.in_features, kh, kw),
            C.PART_B: (t.out_features, t.rank, 1, 1),
        }
        if C.FEATURE_DORA in t.features:
            shapes[C.PART_MAGNITUDE] = (t.out_features,)
        return shapes

    def bound(self, t: Target) -> tuple[str, tuple[int, ...]]:
        return ".weight", (t.out_features, t.in_features, *self.kernel(t))

    def features(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return int(shape[1]), int(shape[0])

    def fan_in(self, t: Target) -> int:
        return t.in_features * math.prod(self.kernel(t))

    # -- ΔW ------------------------------------------------------------------------------------

    def matrix(self, t: Target) -> tuple[torch.Tensor, torch.Tensor]:
        """(A ``[r, in·kh·kw]``, B ``[out, r]``): the factors as matrices (views, no copy)."""
        return t.lora_A.reshape(t.rank, -1), t.lora_B.reshape(t.out_features, t.rank)

    def dense_delta(self, t: Target, dtype: torch.dtype, device: Any = "cpu") -> torch.Tensor:
        """``scale·B·A`` shaped like the weight ``[out, in, kh, kw]``, in ``dtype``."""
        a, b = (x.detach().to(device=device, dtype=dtype) for x in self.matrix(t))
        return ((b * t.scale) @ a).reshape(self.bound(t)[1])

    def stored_factors(
        self, lora_A: torch.Tensor, lora_B: torch.Tensor, coef: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(coef·B [out, r], A [r, in·kh·kw])``: their product is ΔW on the weight seen as
        ``[out, in·kh·kw]`` (the merge's stacked product views a conv weight that way)."""
        return lora_B.reshape(lora_B.shape[0], -1) * coef, lora_A.reshape(lora_A.shape[0], -1)

    def from_stored(self, weight: torch.Tensor) -> torch.Tensor:
        """A conv weight (or difference) as the matrix ``[out, in·kh·kw]`` (a view): ΔW's and
        DoRA's per-output-channel norm's orientation."""
        return weight.reshape(weight.shape[0], -1) if weight.dim() == 4 else weight

    def needs_dense(self, t: Target) -> bool:
        return C.FEATURE_DORA in t.features  # plain conv LoRA stacks like Linear

    def exact_inverse(self, t: Target) -> bool:
        return C.FEATURE_DORA not in t.features

    def touches_bias(self, t: Target) -> bool:
        return False

    def refusal(self, op: str, t: Target) -> str | None:
        why = CONV_REFUSALS.get(op)
        if why is not None:
            return f"{self.name}: {why}"
        return super().refusal(op, t)


CONV_REFUSALS = {
    "gguf": "llama.cpp LoRA adapters have no convolutions",
    "attach": "the training and serving layers adapt Linear layers only; merge the adapter",
    "serve": "the server adapts Linear layers only; merge the adapter into the base",
}
