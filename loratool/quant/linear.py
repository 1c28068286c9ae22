"""``QuantLinear``: a frozen ``nn.Linear`` whose weight is kept NF4 (or int8) and dequantised per use.

    y = x·deq(W₄)ᵀ + b,   deq in the compute dtype (bf16 under ``--dtype bf16``), one layer at a time

It *is* an ``nn.Linear`` (the kind registry's ``linear`` wraps it, ``all-linear`` selects it,
``in_features``/``out_features`` are set), so ``LoraLayer`` adapts it like any linear layer and
the adapter it trains is an ordinary ``linear`` target. Its forward runs one autograd function that
saves only the input: backward dequantises the weight again for ``∂L/∂x`` instead of keeping every
layer's dense weight alive from forward to backward (torchao's ``linear_nf4`` does the same).

The packed tensors are frozen ``nn.Parameter``s, not buffers, so ``fully_shard`` (FSDP2) shards them
across processes like any other parameter and gathers them for the layer's forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import codec

PARTS = ("data", "scalers", "factors", "mean")


class QuantLinear(nn.Linear):
    """A frozen linear layer with a quantised weight; ``weight`` dequantises on every access."""

    quantized = True  # LoraLayer takes its plain path: this module's autograd keeps W₄ packed

    def __init__(
        self,
        packed: codec.Packed,
        bias: torch.Tensor | None,
        *,
        compute_dtype: torch.dtype,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a dense weight
        self.out_features, self.in_features = packed.shape
        self.scheme = packed.scheme
        self.compute_dtype = compute_dtype
        for name, t in packed.tensors().items():
            self.register_parameter("q_" + name, nn.Parameter(t, requires_grad=False))
        self.register_parameter(
            "bias", None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, scheme: str, *, compute_dtype: torch.dtype | None = None
    ) -> QuantLinear:
        w = linear.weight
        return cls(
            codec.quantize(w, scheme),
            linear.bias,
            compute_dtype=compute_dtype or w.dtype,
        )

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, "q_" + name) for name in PARTS}

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return codec.dequantize(
            self.packed_tensors(),
            dtype or self.compute_dtype,
            shape=(self.out_features, self.in_features),
            scheme=self.scheme,
        )

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The dequantised weight, for code that reads ``module.weight`` (a fresh tensor each time)."""
        return self.dequantized()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.packed_tensors().values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = _QuantMatmul.apply(x, self, *self.packed_tensors().values())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme}"


class _QuantMatmul(torch.autograd.Function):
    """``x·deq(W)ᵀ``, saving only ``x``: the dense weight lives for one matmul each way.

    The packed tensors are passed as inputs (not read off the module in backward) so that autograd
    keeps the ones FSDP gathered for this forward; they need no gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: QuantLinear, *packed: torch.Tensor) -> Any:
        dev = x.device.type
        cd = (
            torch.get_autocast_dtype(dev)
            if torch.is_autocast_enabled(dev)
            else module.compute_dtype
        )
        parts = dict(zip(PARTS, packed, strict=True))
        shape = (module.out_features, module.in_features)
        with torch.autocast(dev, enabled=False):
            w = codec.dequantize(parts, cd, shape=shape, scheme=module.scheme)
            y = F.linear(x.to(cd), w)
        ctx.save_for_backward(*packed)
        ctx.meta = (shape, module.scheme, cd, x.dtype)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> Any:
        shape, scheme, cd, x_dtype = ctx.meta
        parts = dict(zip(PARTS, ctx.saved_tensors, strict=True))
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = codec.dequantize(parts, cd, shape=shape, scheme=scheme)
            grad_x = (grad_y.to(cd) @ w).to(x_dtype)
        return (grad_x, None, *([None] * len(PARTS)))
