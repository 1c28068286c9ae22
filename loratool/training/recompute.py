"""Lean autograd for the cheap ops of a decoder layer: RMSNorm and SwiGLU keep less for backward.

What a training step costs in memory is what autograd keeps alive between forward and backward.
transformers' ``LlamaRMSNorm`` upcasts its input to fp32 and autograd keeps that fp32 copy (4 bytes
per element of a bf16 activation), and ``act(gate) * up`` keeps the gate, ``act(gate)`` and up.
The two functions here compute the same forward, op for op, but save only what is needed to
recompute the rest in backward, an elementwise pass that costs nothing next to the matmuls:

- ``rms_norm``: the input in its own dtype and ``1/rms`` per row (4 bytes); backward recomputes
  ``x̂ = x/rms`` and applies ``∂x = (w∂y − x̂·mean(w∂y·x̂))/rms`` in fp32.
- ``swiglu``: gate and up; ``silu(gate)`` is recomputed in backward.

Per token and layer of SmolLM2-135M (hidden 576, intermediate 1536, bf16) that is 2·1152 bytes
fewer for the norms and 3072 fewer for the MLP. ``lean(model)`` switches every RMSNorm and SwiGLU
MLP that it recognises, after checking on a probe that the switched module computes what the
original does; anything else (Gemma's ``1 + w`` norm, GELU MLPs) keeps its own forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..native import compiled
from ..stream import byte_view


class RMSNorm(torch.autograd.Function):
    """``w ⊙ (x/rms(x)).to(x.dtype)`` (Llama's order of casts); saves x and 1/rms only.

    For bf16 or fp32 on the CPU both ways are one compiled pass per row (``kernel.c``: the same
    formula in fp32, its sums in another order); else the torch ops below."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        fused = _norm_kernel(x, weight)
        if fused is not None:
            y = torch.empty_like(x)
            rstd = torch.empty(*x.shape[:-1], 1, dtype=torch.float32)
            views = (byte_view(t) for t in (x, _own(weight), y, rstd))
            fused.rms_norm(*views, x.shape[-1], eps, x.element_size())
            ctx.save_for_backward(x, weight, rstd)
            return y
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> Any:
        x, weight, rstd = ctx.saved_tensors
        fused = _norm_kernel(x, weight, grad_y) if rstd.dtype == torch.float32 else None
        if fused is not None and not ctx.needs_input_grad[1]:
            gx = torch.empty_like(x)
            views = (byte_view(t) for t in (x, _own(weight), rstd, grad_y, gx))
            fused.rms_norm_backward(*views, x.shape[-1], x.element_size())
            return gx, None, None
        xhat = x.float() * rstd  # fp32, as in forward
        gw = grad_y.float() * weight.float()
        # ∂/∂x of x·r with r = (mean x² + ε)^-½: r·(g − x̂·mean(g·x̂)).
        gx = (gw - xhat * (gw * xhat).mean(-1, keepdim=True)) * rstd
        grad_w = None
        if ctx.needs_input_grad[1]:
            dims = tuple(range(grad_y.dim() - 1))
            grad_w = (grad_y.float() * xhat.to(x.dtype).float()).sum(dims).to(weight.dtype)
        return gx.to(x.dtype), grad_w, None


class SwiGLU(torch.autograd.Function):
    """``silu(gate) * up``; saves gate and up, recomputes ``silu(gate)`` in backward, in fp32:
    for bf16 or fp32 on the CPU, σ by torch and the rest in one compiled pass (``kernel.c``),
    else in torch: the same bits either way."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        gate, up = ctx.saved_tensors
        fused = fused_kernel(grad, gate, up)
        if fused is not None and all(ctx.needs_input_grad[:2]):
            sig = torch.sigmoid(gate.float())
            dg, du = torch.empty_like(gate), torch.empty_like(up)
            views = (byte_view(t) for t in (grad, gate, up, sig, dg, du))
            fused.swiglu_backward(*views, gate.element_size())
            return dg, du
        wide = torch.promote_types(gate.dtype, torch.float32)  # fp32, or fp64 for fp64
        g = gate.to(wide)
        sig = torch.sigmoid(g)
        gf = grad.to(wide)
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            # silu'(g) = σ(g)·(1 + g·(1 − σ(g)))
            grad_gate = (gf * up.to(wide) * sig * (1.0 + g * (1.0 - sig))).to(gate.dtype)
        if ctx.needs_input_grad[1]:
            grad_up = (gf * (g * sig)).to(up.dtype)
        return grad_gate, grad_up


_KERNEL_DTYPES = (torch.bfloat16, torch.float32)  # the passes' element types


def _own(weight: torch.Tensor) -> torch.Tensor:
    """A copy of a norm's weight (one row) for ``byte_view``: its numpy export marks a tensor's
    storage as never resizable, and FSDP frees a gathered parameter by resizing its storage to 0
    after the layer's forward (the pass on the parameter itself failed every ``--fsdp`` run)."""
    return weight.detach().clone()


def _norm_kernel(x: torch.Tensor, weight: torch.Tensor, *more: torch.Tensor) -> Any:
    """The compiled RMSNorm (``kernel.c``) for contiguous bf16 or fp32 CPU rows and a weight of
    their width and dtype, or None (the torch ops): not built, other tensors,
    ``LORATOOL_TRAIN_KERNEL=0``."""
    ts = (x, weight, *more)
    if x.device.type != "cpu" or not x.numel() or x.dim() < 1 or weight.shape != x.shape[-1:]:
        return None
    if x.dtype not in _KERNEL_DTYPES:
        return None
    if any(t.dtype != x.dtype or t.device != x.device or not t.is_contiguous() for t in ts):
        return None
    if any(t.shape != x.shape for t in more):
        return None
    return compiled("loratool.training.kernel", "LORATOOL_TRAIN_KERNEL")


def fused_kernel(*ts: torch.Tensor) -> Any:
    """The compiled SwiGLU backward (``kernel.c``) for contiguous bf16 or fp32 CPU tensors of one
    shape and dtype, or None: not built, other tensors, or ``LORATOOL_TRAIN_KERNEL=0``."""
    first = ts[0]
    if first.device.type != "cpu" or first.dtype not in _KERNEL_DTYPES or not first.numel():
        return None
    if any(t.dtype != first.dtype or t.shape != first.shape or not t.is_contiguous() for t in ts):
        return None
    return compiled("loratool.training.kernel", "LORATOOL_TRAIN_KERNEL")


def _norm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():  # nothing is saved without gradients: the class's own
        out0: torch.Tensor = type(self).forward(self, hidden_states)
        return out0
    out: torch.Tensor = RMSNorm.apply(hidden_states, self.weight, float(self.variance_epsilon))
    return out


def _mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        out0: torch.Tensor = type(self).forward(self, x)
        return out0
    h: torch.Tensor = SwiGLU.apply(self.gate_proj(x), self.up_proj(x))
    out: torch.Tensor = self.down_proj(h)
    return out


def _is_norm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (
        type(m).__name__.endswith("RMSNorm")
        and isinstance(w, torch.Tensor)
        and w.dim() == 1
        and isinstance(getattr(m, "variance_epsilon", None), float)
    )


def _is_swiglu(m: nn.Module) -> bool:
    # transformers' ACT2FN["silu"] is its own SiLUActivation; the probe checks the formula.
    act = type(getattr(m, "act_fn", None)).__name__
    return act in ("SiLU", "SiLUActivation") and all(
        hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj")
    )


def _same(original: Any, lean: Any, probe: torch.Tensor) -> bool:
    """Whether ``lean`` computes ``original``'s output and input gradient on ``probe``."""
    outs = []
    for fn in (original, lean):
        x = probe.clone().requires_grad_(True)
        with torch.enable_grad():
            y = fn(x)
            weights = torch.linspace(-1, 1, y.shape[-1], device=y.device)
            # autograd.grad, not backward: nothing accumulates into the model's parameters.
            (g,) = torch.autograd.grad((y.float() * weights).sum(), x)
        outs.append((y.detach().float(), g.float()))
    (y0, g0), (y1, g1) = outs
    # Relative to the largest element: bf16 rounds the two backward formulas differently.
    tol = 2e-2 if probe.dtype != torch.float32 else 1e-4

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool((a - b).abs().max() <= tol * b.abs().max().clamp_min(1e-6))

    return close(y1, y0) and close(g1, g0)


def lean(model: nn.Module) -> dict[str, int]:
    """Switch the model's RMSNorm and SwiGLU modules to the lean functions; counts by kind.

    One probe per module class decides (the original class's forward against the lean one, on a
    small input in the module's dtype); modules of a class that fails the probe are left alone.
    """
    verdict: dict[tuple[type, str], bool] = {}
    counts = {"rms_norm": 0, "swiglu": 0}
    for m in model.modules():
        for kind, test, forward in (
            ("rms_norm", _is_norm, _norm_forward),
            ("swiglu", _is_swiglu, _mlp_forward),
        ):
            if not test(m):
                continue
            key = (type(m), kind)
            if key not in verdict:
                verdict[key] = _probe(m, forward)
            if verdict[key]:
                m.forward = types.MethodType(forward, m)
                counts[kind] += 1
    return counts


def _probe(m: nn.Module, forward: Any) -> bool:
    """Whether ``forward`` matches the class's own on a small input like the module's inputs."""
    # Width and dtype of the input are those of the frozen weight (LoRA factors are fp32).
    up = getattr(m, "up_proj", None)
    weight = getattr(up if isinstance(up, nn.Module) else m, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
        return False  # e.g. a quantised base whose weight is packed
    width = int(getattr(up, "in_features", 0) or weight.shape[-1])
    gen = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(2, 3, width, generator=gen).to(weight.device, weight.dtype)
    try:
        return _same(lambda x: type(m).forward(m, x), lambda x: forward(m, x), probe)
    except (RuntimeError, TypeError, AttributeError):
        return False
