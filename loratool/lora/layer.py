"""``LoraLayer``: a frozen base module plus ``s·B·A``, with one fused autograd path for dense kinds.

    x ↦ W0·x + s·B(A(dropout(x))),   s = α/r (standard) or α/√r (rsLoRA, Kalajdzievski 2023)

``A`` ``[r, in]`` and ``B`` ``[out, r]`` are in the ``nn.Linear`` orientation of the adapter format
(spec §3) for every kind; the kind (loratool/kinds) says how the base stores its weight, how the
factors start and how ``A`` meets the input (a matmul, or a lookup of ``Aᵀ`` rows for embeddings).
The factors stay fp32 whatever the base dtype: under bf16 autocast the matmuls run in bf16 while
the weights, their gradients and the optimizer state keep fp32 precision.

Spec 1.1 (§3.5), each as PEFT computes it: ``dora`` adds a magnitude ``m`` (``y = (m/‖V‖) ⊙
(W + s·B·A)·x + b``, ‖V‖ held constant in backward, DoRA §4.3; the plain autograd path),
``lora_bias`` a bias on B (``+ s·b_B``), ``train_bias`` a trained difference ``δ`` on the frozen
base bias (``+ δ``, PEFT ``bias="lora_only"``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import constants as C
from .. import kinds
from ..adapter import scale_for
from ..native import compiled
from ..stream import byte_view


def kind_of(module: nn.Module) -> str | None:
    """The name of the kind that adapts ``module`` (loratool.kinds), or None."""
    kind = kinds.of_module(module)
    return None if kind is None else kind.name


class LoraLayer(nn.Module):
    """``x ↦ W0x + (α/r)·B(A(dropout(x))))`` around a frozen base module of a registered kind.

    Dense kinds (Linear, Conv1D) with a frozen base run as one autograd function (``FusedLora``),
    dropout included. An embedding takes token ids: no dropout, and A starts at zero with B
    normal, as PEFT does (``Kind.init_factors``).
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        dora: bool = False,
        train_bias: bool = False,
        lora_bias: bool = False,
    ) -> None:
        super().__init__()
        kind = kinds.of_module(base)
        if kind is None:
            raise TypeError(f"cannot wrap {type(base).__name__}")
        if dora and C.FEATURE_DORA not in kind.accepts:
            raise TypeError(f"DoRA is defined for Linear and Conv1D, not {kind.label}")
        if dora and lora_bias:
            raise TypeError("DoRA and a LoRA bias exclude each other (spec §3.5, as PEFT)")
        w = base.weight
        assert isinstance(w, torch.Tensor)
        self.base = base
        self.kind_spec = kind
        self.kind = kind.name
        self.in_features, self.out_features = kind.features(tuple(w.shape))
        self.rank = rank
        self.alpha = float(alpha)
        self.scale_rule = C.SCALE_RSLORA if rslora else C.SCALE_STANDARD
        self.scale = scale_for(self.alpha, rank, self.scale_rule)
        # Dropout 0 is no module at all: not even an identity call per forward.
        self.dropout = nn.Dropout(dropout) if dropout > 0 and kind.dense else None
        dev = w.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, device=dev))
        # Spec 1.1 §3.5: DoRA's magnitude (PEFT's lora_magnitude_vector) and a trained base bias,
        # kept as a difference so the file stores what it changed (feature ``bias``).
        self.magnitude = nn.Parameter(torch.empty(self.out_features, device=dev)) if dora else None
        has_bias = isinstance(getattr(base, "bias", None), torch.Tensor)
        self.bias_delta = (
            nn.Parameter(torch.zeros(self.out_features, device=dev))
            if train_bias and has_bias
            else None
        )
        # PEFT's lora_bias: a bias on B, inside the scaled branch (y += s·(B A x + b_B)).
        self.lora_bias = (
            nn.Parameter(torch.zeros(self.out_features, device=dev)) if lora_bias else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.kind_spec.init_factors(self.lora_A, self.lora_B)
        if self.magnitude is not None:  # PEFT's dora_init: ‖W + s·B·A‖ per output row
            with torch.no_grad():
                self.magnitude.copy_(self.weight_norm())
        for extra in (self.bias_delta, self.lora_bias):
            if extra is not None:
                with torch.no_grad():
                    extra.zero_()

    def weight_norm(self) -> torch.Tensor:
        """‖W + s·B·A‖ of each output row (over the input dimension), fp32, outside autograd."""
        with torch.no_grad():
            w = self.kind_spec.from_stored(self.weight).float()
            v = w + (self.lora_B.float() * self.scale) @ self.lora_A.float()
            return torch.linalg.vector_norm(v, dim=1)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight, for code that looks at ``module.weight``."""
        w = self.base.weight
        assert isinstance(w, torch.Tensor)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._dora(x) if self.magnitude is not None else self._lora(x)
        if self.lora_bias is not None:
            y = y + (self.lora_bias * self.scale).to(y.dtype)
        return y if self.bias_delta is None else y + self.bias_delta.to(y.dtype)

    def _dora(self, x: torch.Tensor) -> torch.Tensor:
        """PEFT's DoRA layer: ``W x + b + (m/‖V‖ − 1)·W·drop(x) + (m/‖V‖)·s·B A drop(x)``.

        That is ``(m/‖V‖) ⊙ (W + s·B·A)·x + b`` without dropout; ‖V‖ is held constant (no
        gradient), as DoRA's §4.3 and PEFT do, so only m, A and B learn. With dropout the base
        term of the correction sees the dropped input, exactly as PEFT's ``DoraLinearVariant``.
        """
        assert self.magnitude is not None
        out = self.base(x)
        if x.dtype != self.lora_A.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)
        f = self.magnitude / self.weight_norm()
        if self.dropout is not None and self.training:
            x = self.dropout(x)
            w = self.kind_spec.from_stored(self.weight)
            base_out = F.linear(x, w.to(x.dtype))
        else:
            bias = getattr(self.base, "bias", None)
            base_out = out if bias is None else out - bias
        lora = F.linear(F.linear(x, self.lora_A) * self.scale, self.lora_B)
        return out + ((f - 1) * base_out + f * lora).to(out.dtype)

    def _lora(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.kind_spec
        drop = self.dropout
        # nn.Dropout is fused; any other module put in its place takes the plain autograd path.
        # So does a quantised base (loratool/quant): its own autograd keeps the weight packed,
        # where the fused path would save every layer's dequantised weight for backward.
        fusable = kind.dense and not getattr(self.base, "quantized", False)
        base_w = self.base.weight if fusable else None
        if (
            base_w is not None
            and not base_w.requires_grad
            and (drop is None or type(drop) is nn.Dropout)
        ):
            p = drop.p if drop is not None and self.training else 0.0
            bias = getattr(self.base, "bias", None)
            y: torch.Tensor = FusedLora.apply(
                x, base_w, bias, self.lora_A, self.lora_B, self.scale, kind.transposed, p
            )
            return y
        out = self.base(x)
        if kind.dense:
            if x.dtype != self.lora_A.dtype and not torch.is_autocast_enabled(x.device.type):
                x = x.to(self.lora_A.dtype)  # a bf16 base outside autocast: the factors are fp32
            x = x if self.dropout is None else self.dropout(x)
        h = kind.down(self.base, x, self.lora_A)
        # Scale the r-wide intermediate, not the out-wide result: r ≪ out elements to multiply.
        delta = F.linear(h * self.scale, self.lora_B)
        return out + delta.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``s·B@A`` in fp32, oriented like the base weight as it is stored (spec §3.2)."""
        d = (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scale
        return self.kind_spec.to_stored(d)

    def merged_weight(self) -> torch.Tensor:
        """The stored weight with this layer merged, fp32: ``W + ΔW``, or DoRA's ``m ⊙ V/‖V‖``."""
        v = self.weight.float() + self.delta_weight()
        if self.magnitude is None:
            return v
        f = self.magnitude.detach().float() / self.weight_norm()
        return v * (f.unsqueeze(0) if self.kind_spec.transposed else f.unsqueeze(1))

    def extra_repr(self) -> str:
        extra = ", dora" if self.magnitude is not None else ""
        extra += ", bias" if self.bias_delta is not None else ""
        extra += ", lora_bias" if self.lora_bias is not None else ""
        return f"kind={self.kind}, rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:.4g}{extra}"


class FusedLora(torch.autograd.Function):
    """``y = x·W0ᵀ (+ b) + drop(x)·Aᵀ·(s·B)ᵀ`` for a frozen W0, one accumulate in place of an add.

    Autograd on the plain expression writes ``[tokens, out]`` twice in forward (base, then the sum)
    and ``[tokens, in]`` twice in backward; here the low-rank product is accumulated into the base
    result by ``addmm_`` (BLAS beta=1) both ways. Saved for backward: the input in the compute
    dtype (the caller's tensor, which q/k/v share; backward recomputes the dropped copy), the
    r-wide ``drop(x)·Aᵀ``, and with dropout not even the mask: a seed, from which backward draws
    it again (``nn.Dropout`` plus autograd would keep x, the mask and the dropped copy).
    Matmuls run in the autocast dtype when autocast is on (bf16); gradients of A and B come back in
    the factors' dtype (fp32), as autocast would give them. Dropout follows ``nn.Dropout``:
    inverted scaling by 1/(1-p) (folded into A), a fresh mask per call (``dropout_mask``) whose
    seed comes from torch's generator.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scale: float,
        transposed: bool,
        p: float = 0.0,
    ) -> torch.Tensor:
        dev = x.device.type
        cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        with torch.autocast(dev, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(cd)
            w = weight.to(cd)
            wt = w if transposed else w.t()  # Conv1D stores [in, out]
            a = lora_A.to(cd)
            bs = (lora_B * scale).to(cd)
            y = x2 @ wt if bias is None else torch.addmm(bias.to(cd), x2, wt)
            seed = None
            xd = x2
            if p > 0.0:  # 1/(1-p) goes into A (r×in), not into the [tokens, in] input
                seed = dropout_seed()
                xd = dropped(x2, p, seed)
                a = (lora_A * (1.0 / (1.0 - p))).to(cd)
            h = xd @ a.t()
            y.addmm_(h, bs.t())
        # The undropped input, not ``xd``: x2 is the caller's tensor (q/k/v share one), xd a copy;
        # the mask not at all: backward draws it again from its seed.
        ctx.save_for_backward(x2, h, w, a, bs)
        ctx.scale, ctx.transposed, ctx.x_dtype, ctx.p = scale, transposed, x.dtype, p
        ctx.seed = seed
        ctx.factor_dtypes = (lora_A.dtype, lora_B.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> Any:
        x2, h, w, a, bs = ctx.saved_tensors  # a: A/(1-p) with dropout
        seed, need_x, need_a = ctx.seed, ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(x2.dtype)
        gbs = g @ bs  # [T, r]
        grad_x = grad_a = grad_b = None
        through = gbs @ a if need_x and seed is not None else None  # dropped below, in place
        xd = x2  # the dropped input, as in forward, from the same seed (one mask for both)
        if seed is not None and (need_a or through is not None):
            xd = dropped(x2 if need_a else None, ctx.p, seed, in_place=through)
        if need_x:
            gx = g @ (w.t() if ctx.transposed else w)
            if through is None:
                gx.addmm_(gbs, a)
            else:
                gx.add_(through)
            grad_x = gx.view(*grad_y.shape[:-1], gx.shape[-1]).to(ctx.x_dtype)
        if need_a:
            grad_a = (gbs.t() @ xd).to(ctx.factor_dtypes[0])
            if seed is not None:
                grad_a *= 1.0 / (1.0 - ctx.p)
        if ctx.needs_input_grad[4]:
            grad_b = ((g.t() @ h) * ctx.scale).to(ctx.factor_dtypes[1])
        return grad_x, None, None, grad_a, grad_b, None, None, None


def dropout_seed() -> int:
    """A seed for one dropout mask, drawn from torch's CPU generator (so ``torch.manual_seed``
    and a resumed run's restored RNG state give the same masks)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def dropped(
    x: torch.Tensor | None, p: float, seed: int, *, in_place: torch.Tensor | None = None
) -> Any:
    """``x`` with dropout's zeros, as a new tensor (None for no ``x``), and ``in_place`` zeroed
    where ``x`` is, by one mask: ``dropout_mask(shape, p, device, seed)``, the same mask for both.

    On the CPU, where the compiled pass is built (``lora/kernel.c``; off with
    ``LORATOOL_TRAIN_KERNEL=0``), the mask is drawn and applied in one pass, 9× faster than the
    numpy mask and ``masked_fill``, with the same zeros; otherwise those two.
    """
    ref = x if x is not None else in_place
    assert ref is not None
    out = None if x is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    kernel = _dropout_kernel(ref, x, in_place)
    if kernel is None:
        mask = dropout_mask(ref.shape, p, ref.device, seed)
        if in_place is not None:
            in_place.masked_fill_(mask, 0.0)
        return None if x is None else x.masked_fill(mask, 0.0)
    pairs = [byte_view(t) for t in (x, out, in_place, in_place) if t is not None]
    kernel.dropout(seed, round(p * 65536), ref.element_size(), *pairs)
    return out


def _dropout_kernel(ref: torch.Tensor, *ts: torch.Tensor | None) -> Any:
    """The compiled dropout pass for contiguous CPU floats of one shape and dtype, or None."""
    fits = ref.device.type == "cpu" and ref.is_floating_point() and ref.element_size() in (2, 4, 8)
    for t in ts:
        if t is not None:
            same = t.shape == ref.shape and t.dtype == ref.dtype and t.device == ref.device
            fits = fits and same and t.is_contiguous()
    return compiled("loratool.lora.kernel", "LORATOOL_TRAIN_KERNEL") if fits else None


def dropout_mask(shape: torch.Size, p: float, device: torch.device, seed: int) -> torch.Tensor:
    """Where dropout zeroes (True with probability ``p``), the same for the same ``seed``.

    On the CPU from a counter-based stream, SplitMix64's outputs ``mix(seed + (k+1)·γ)`` (it
    passes BigCrush), in numpy: 16 random bits per element, the little-endian lanes of word
    ``i // 4``, against ``p`` rounded to a multiple of 2⁻¹⁶ (faster here than ``bernoulli_``,
    whose masks cost more than the layer's matmuls, and what ``lora/kernel.c`` draws without
    numpy); elsewhere ``bernoulli_`` on a generator of that device.
    """
    n = 1
    for d in shape:
        n *= d
    if device.type == "cpu":
        import numpy as np

        k = np.arange(1, (n + 3) // 4 + 1, dtype=np.uint64)
        z = np.uint64(seed) + k * np.uint64(0x9E3779B97F4A7C15)  # arrays wrap mod 2⁶⁴
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
        words = z.astype("<u8", copy=False).view("<u2")[:n]
        return torch.from_numpy(words < round(p * 65536)).view(shape)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(p, generator=gen)
