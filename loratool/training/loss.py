"""Next-token cross-entropy through the output head, in chunks, never holding [tokens, vocab].

Only positions that carry a loss term reach the head (completion-only and chat data skip the
prompt's logits entirely), and those go through in blocks of at most ``BLOCK_ELEMENTS`` logits
for the matmuls (big enough for them to run near the machine's peak), each block's softmax in
chunks of at most ``CHUNK_ELEMENTS`` (small enough for its fp32 temporaries to stay in cache).
For a frozen head (the usual case: tied or plain ``lm_head``, not adapted) ``LinearCrossEntropy``
computes the gradient with respect to the hidden states during the forward pass, chunk by chunk
(``softmax − onehot`` times ``W``), so the backward pass is one multiply and the logits are never
recomputed: the same trick as Liger's fused linear cross-entropy, in plain PyTorch. A head with
trainable parameters (a LoRA on ``lm_head``) or a logit transform (soft-capping, logit scale)
takes the general path: each chunk under activation checkpointing, recomputed in backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 1 << 22  # softmax: 4M logits, 16 MB in fp32 per chunk, whatever the vocabulary
BLOCK_ELEMENTS = 1 << 24  # matmuls: 16M logits, 32 MB in bf16 per block


def chunk_rows(vocab: int) -> int:
    """Rows per chunk: a power of two, 16..4096, with ``rows × vocab ≤ CHUNK_ELEMENTS``."""
    rows = 16
    while rows * 2 * vocab <= CHUNK_ELEMENTS and rows < 4096:
        rows *= 2
    return rows


def block_rows(vocab: int) -> int:
    """Rows per matmul block: a power-of-two multiple of ``chunk_rows``, at most 4096, with
    ``rows × vocab ≤ BLOCK_ELEMENTS`` where that allows more than one chunk. On SmolLM2 (49,152
    tokens) 256 rows, not 64: the head's two matmuls ran at 55-80% of the bf16 peak in chunks,
    and the loss takes 25% less time in blocks (the same bits: each row's product is the same)."""
    rows = chunk_rows(vocab)
    while rows * 2 * vocab <= BLOCK_ELEMENTS and rows < 4096:
        rows *= 2
    return rows


class LinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(h_i·Wᵀ + b, t_i)`` in fp32, with ∂/∂h computed in the forward pass.

    ``W`` and ``b`` are frozen (no gradient is produced for them). Matmuls run in
    ``compute_dtype`` (bf16 under mixed precision); softmax, log and the sum run in fp32.
    """

    @staticmethod
    def forward(
        ctx: Any,
        h: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        n, vocab = h.shape[0], weight.shape[0]
        rows, block = chunk_rows(vocab), block_rows(vocab)
        need_grad = ctx.needs_input_grad[0]
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h) if need_grad else None
        with torch.autocast(h.device.type, enabled=False):
            for b in range(0, n, block):
                logits = h[b : b + block].to(compute_dtype) @ w.t()
                if bias is not None:
                    logits = logits + bias.to(compute_dtype)
                for s in range(0, logits.shape[0], rows):
                    tc = targets[b + s : b + s + rows]
                    # fp32 softmax read straight from the (bf16) logits: one pass in, one out.
                    p = torch.softmax(logits[s : s + rows], dim=-1, dtype=torch.float32)
                    picked = p.gather(1, tc[:, None]).squeeze(1)
                    # -log p_t in fp32; p_t underflows only past a logit gap of ~87 nats.
                    total += -torch.log(picked.clamp_min(torch.finfo(torch.float32).tiny)).sum()
                    if grad is not None:  # softmax − onehot, over the logits it was read from
                        p.scatter_add_(1, tc[:, None], torch.full_like(picked[:, None], -1.0))
                        logits[s : s + rows] = p
                    del p
                if grad is not None:
                    grad[b : b + block] = (logits @ w).to(h.dtype)
                del logits
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None


def _transform(config: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Logit transforms some heads apply after the matmul (Gemma 2 soft-capping, Cohere scale)."""
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    if not cap and scale in (None, 1.0):
        return None

    def apply(logits: torch.Tensor) -> torch.Tensor:
        if scale not in (None, 1.0):
            logits = logits * scale
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return apply


class HeadLoss:
    """Summed next-token CE of hidden states ``h`` ``[N, H]`` against ``targets`` ``[N]``."""

    def __init__(self, head: nn.Module, config: Any, compute_dtype: torch.dtype) -> None:
        self.head = head
        self.compute_dtype = compute_dtype
        self.transform = _transform(config)
        weight = getattr(head, "weight", None)
        trainable = any(p.requires_grad for p in head.parameters())
        self.fast = (
            isinstance(head, nn.Linear)
            and isinstance(weight, torch.Tensor)
            and not trainable
            and self.transform is None
        )

    def __call__(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if h.shape[0] == 0:
            return h.sum() * 0.0  # keeps the graph connected for a batch without targets
        if self.fast:
            assert isinstance(self.head, nn.Linear)
            return LinearCrossEntropy.apply(
                h, self.head.weight, self.head.bias, targets, self.compute_dtype
            )
        rows = chunk_rows(_vocab(self.head))  # checkpointed: the chunk is all there is at once
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], rows):
            total = total + checkpoint(
                self._chunk, h[s : s + rows], targets[s : s + rows], use_reentrant=False
            )
        return total

    def _chunk(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(h)
        if self.transform is not None:
            logits = self.transform(logits)
        return F.cross_entropy(logits.float(), targets, reduction="sum")


def _vocab(head: nn.Module) -> int:
    w = getattr(head, "weight", None)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) else 32768
