"""Attention over packed rows, document by document: no cross-document work, no mask.

A packed row of ``seq_len`` tokens holding documents of lengths ``n₁, n₂, …`` needs only the
causal triangles ``Σ nᵢ²/2`` of attention scores, but SDPA with a block-diagonal mask computes
the whole ``seq_len²`` square (masking disables the causal fast path) and expands grouped
key/value heads. This attention function, registered with transformers' ``AttentionInterface``,
runs ``scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` on each document's slice
instead: the varlen idea of flash-attention, in plain PyTorch, on any device. With rows of ~5
documents it does ~10× less attention work than the masked square.

On a CPU, documents of up to ``SHORT_DOCUMENT`` tokens go through ``ShortAttention`` instead
(plain matmul-softmax-matmul, the probabilities recomputed in backward rather than kept); up to
``FUSED_SHORT_DOCUMENT`` for bf16 where its softmax is the compiled pass (``kernel.c``), which
takes half the flash kernel's time at every length to 512 (measured, forward and backward).

The document boundaries come from the batch (``packed_segments``); outside that context, or when
the query is not the whole row (generation with a cache), it is transformers' SDPA unchanged.
Positions after the last document (row padding) get a zero attention output: nothing reads them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F

from ..native import compiled
from ..stream import byte_view

NAME = "loratool_packed"
SHORT_DOCUMENT = 192  # tokens; up to this, CPU attention runs as plain matmuls (see below)
FUSED_SHORT_DOCUMENT = 1024  # the same with the compiled softmax: [heads, n, n] bf16 temporaries
Segments = tuple[tuple[tuple[int, int], ...], ...]  # per row: (start, end) of each document

_segments: ContextVar[Segments | None] = ContextVar("loratool_packed_segments", default=None)


@contextlib.contextmanager
def packed_segments(segments: Segments | None) -> Iterator[None]:
    """Within this block, attention of a model using ``NAME`` stays inside these documents."""
    token = _segments.set(segments)
    try:
        yield
    finally:
        _segments.reset(token)


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: q ``[B, H, T, D]``, k/v ``[B, Hkv, T, D]`` -> ``[B, T, H, D]``."""
    segments = _segments.get()
    if segments is None or query.shape[2] != key.shape[2] or kwargs.get("softcap") is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        out: tuple[torch.Tensor, None] = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        return out
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, t, d = query.shape
    gqa = key.shape[1] != h
    cpu = query.device.type == "cpu"
    # On CPUs the flash kernel's fixed costs dominate short documents: its backward takes ~2x
    # the plain matmul-softmax-matmul below ~200 tokens (measured, bf16), or to 1024 with the
    # compiled softmax. Those documents go through ShortAttention together; the longer ones
    # through SDPA's flash kernel.
    limit = FUSED_SHORT_DOCUMENT if _fused(query) is not None else SHORT_DOCUMENT
    short = tuple(tuple((s, e) for s, e in row if cpu and e - s <= limit) for row in segments)
    lean = any(short) and dropout == 0.0 and torch.is_grad_enabled()
    if lean:
        scale = scaling if scaling is not None else d**-0.5
        result = ShortAttention.apply(query, key, value, short, scale)
    else:
        result = query.new_zeros(b, t, h, d)
    for i, row in enumerate(segments):
        for start, end in row:
            is_short = cpu and end - start <= limit
            if lean and is_short:
                continue
            with sdpa_kernel(SDPBackend.MATH) if is_short else contextlib.nullcontext():
                o = F.scaled_dot_product_attention(
                    query[i : i + 1, :, start:end],
                    key[i : i + 1, :, start:end],
                    value[i : i + 1, :, start:end],
                    dropout_p=dropout,
                    is_causal=True,
                    scale=scaling,
                    enable_gqa=gqa,
                )
            result[i, start:end] = o[0].transpose(0, 1)
    return result, None


class ShortAttention(torch.autograd.Function):
    """Causal attention of each listed document, keeping only q, k and v for backward.

    SDPA's math path on a CPU upcasts bf16 to fp32 and autograd keeps the fp32 copies and the
    ``[heads, n, n]`` probabilities of every document: ~6 KB per token and layer at n≈190 on
    SmolLM2. Here backward recomputes the probabilities (one ``q·kᵀ`` per document, ~3% of a
    layer's matmuls at that length) as flash attention does. Scores and products run in the
    input dtype (bf16 under autocast, fp32 accumulation inside the matmul); softmax and its
    gradient run in fp32. Grouped key/value heads are expanded per document, and their
    gradients summed back over the group. Output ``[B, T, H, D]``, zero outside the documents.
    """

    @staticmethod
    def forward(
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        spans: Segments,
        scale: float,
    ) -> torch.Tensor:
        b, h, t, d = query.shape
        hkv = key.shape[1]
        out = query.new_zeros(b, t, h, d)
        fused = _fused(query)
        for i, row in enumerate(spans):
            for start, end in row:
                q, k, v = (x[i, :, start:end] for x in (query, key, value))
                if fused is not None:  # grouped heads stacked, the softmax one C pass in place
                    n = end - start
                    p = q.reshape(hkv, -1, d) @ k.transpose(1, 2)  # [kv, group·n, n]
                    fused.attention_probs(byte_view(p), byte_view(p), n, scale)
                    out[i, start:end] = (p @ v).view(h, n, d).transpose(0, 1)
                    continue
                p = _probs(q, _expand(k, h), scale).to(v.dtype)
                out[i, start:end] = (p @ _expand(v, h)).transpose(0, 1)
        ctx.save_for_backward(query, key, value)
        ctx.spans, ctx.scale = spans, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        query, key, value = ctx.saved_tensors
        h, hkv = query.shape[1], key.shape[1]
        gq, gk, gv = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
        fused = _fused(query)
        for i, row in enumerate(ctx.spans):
            for start, end in row:
                q, k, v = (x[i, :, start:end] for x in (query, key, value))
                go = grad[i, start:end].transpose(0, 1).to(v.dtype)  # [H, n, D]
                if fused is not None:  # grouped: k and v as they are, their gradients summed
                    n, d = end - start, q.shape[-1]  # over the group inside the matmuls
                    qg, gog = q.reshape(hkv, -1, d), go.reshape(hkv, -1, d)
                    p, dp = qg @ k.transpose(1, 2), gog @ v.transpose(1, 2)
                    views = (byte_view(p), byte_view(dp))  # P over S and dS over dP, in C
                    fused.attention_grads(*views, *views, n, ctx.scale)
                    gq[i, :, start:end] = ((dp @ k) * ctx.scale).view(h, n, d)
                    gk[i, :, start:end] = (dp.transpose(1, 2) @ qg) * ctx.scale
                    gv[i, :, start:end] = p.transpose(1, 2) @ gog
                    continue
                ke, ve = _expand(k, h), _expand(v, h)
                dp = go @ ve.transpose(1, 2)  # in v's dtype
                p = _probs(q, ke, ctx.scale)  # [H, n, n], fp32
                gve = p.to(v.dtype).transpose(1, 2) @ go
                # softmax backward: ds = p ⊙ (dp − Σ_j p·dp) in fp32 (or wider), rounded once
                # into q's dtype by the multiply itself (each op upcasts dp exactly)
                dev = dp.sub((p * dp).sum(-1, keepdim=True))
                ds = torch.mul(dev, p, out=torch.empty_like(dp, dtype=q.dtype))
                gq[i, :, start:end] = (ds @ ke) * ctx.scale
                gke = (ds.transpose(1, 2) @ q) * ctx.scale
                gk[i, :, start:end] = _reduce(gke, hkv)
                gv[i, :, start:end] = _reduce(gve, hkv)
        return gq, gk, gv, None, None


def _fused(query: torch.Tensor) -> Any:
    """The compiled softmax passes (``training/kernel.c``) for bf16 CPU attention, or None: not
    built, another dtype or device, or ``LORATOOL_TRAIN_KERNEL=0`` (the torch ops then)."""
    if query.device.type != "cpu" or query.dtype != torch.bfloat16:
        return None
    return compiled("loratool.training.kernel", "LORATOOL_TRAIN_KERNEL")


def _expand(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[Hkv, n, D]`` -> ``[H, n, D]``: query head j reads key/value head j // (H/Hkv)."""
    return x if x.shape[0] == heads else x.repeat_interleave(heads // x.shape[0], dim=0)


def _reduce(g: torch.Tensor, hkv: int) -> torch.Tensor:
    """The gradient of ``_expand``: sum each group of query heads back onto its kv head."""
    h, n, d = g.shape
    return g if h == hkv else g.view(hkv, h // hkv, n, d).sum(1)


def _probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax of ``q·kᵀ·scale`` in fp32 (fp64 for fp64 inputs), ``[H, n, n]``.

    The upcast, the scale and the mask are one add onto the product, ``bias + scale·qkᵀ`` with
    the bias −∞ above the diagonal and 0 elsewhere: the values of upcasting, scaling and
    masking in three passes, in one."""
    n = q.shape[1]
    bias = _future(n, torch.promote_types(q.dtype, torch.float32), q.device)
    return torch.softmax(torch.add(bias, q @ k.transpose(1, 2), alpha=scale), dim=-1)


_FUTURE: dict[tuple[int, torch.dtype, str], torch.Tensor] = {}


def _future(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[n, n]``: −∞ above the diagonal (positions a query must not see), else 0; made once
    per n."""
    key = (n, dtype, str(device))
    bias = _FUTURE.get(key)
    if bias is None:
        if len(_FUTURE) > 512:
            _FUTURE.clear()
        future = torch.ones(n, n, dtype=torch.bool, device=device).triu(1)
        bias = torch.zeros(n, n, dtype=dtype, device=device).masked_fill_(future, float("-inf"))
        _FUTURE[key] = bias
    return bias


def _packed_mask(*args: Any, **kwargs: Any) -> Any:
    """No mask is built for packed rows; otherwise the SDPA mask, as for ``sdpa``."""
    if _segments.get() is not None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def use_packed_attention(model: Any) -> bool:
    """Switch ``model`` to this attention; False if the model cannot take a custom one."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, _packed_mask)
    try:
        model.set_attn_implementation(NAME)
    except (AttributeError, ValueError, TypeError, ImportError):
        return False
    return bool(getattr(model.config, "_attn_implementation", None) == NAME)
