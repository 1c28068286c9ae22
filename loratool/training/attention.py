"""Attention over packed rows, document by document: no cross-document work, no mask.

A packed row of ``seq_len`` tokens holding documents of lengths ``n₁, n₂, …`` needs only the
causal triangles ``Σ nᵢ²/2`` of attention scores, but SDPA with a block-diagonal mask computes
the whole ``seq_len²`` square (masking disables the causal fast path) and expands grouped
key/value heads. This attention function, registered with transformers' ``AttentionInterface``,
runs ``scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` on each document's slice
instead: the varlen idea of flash-attention, in plain PyTorch, on any device. With rows of ~5
documents it does ~10× less attention work than the masked square.

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

NAME = "loratool_packed"
SHORT_DOCUMENT = 192  # tokens; up to this, CPU attention runs as plain matmuls (see below)
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
    result = query.new_zeros(b, t, h, d)
    for i, row in enumerate(segments):
        for start, end in row:
            # On CPUs the flash kernel's fixed costs dominate short documents: its backward
            # takes ~2x the plain matmul-softmax-matmul below ~200 tokens (measured, bf16).
            short = cpu and end - start <= SHORT_DOCUMENT
            with sdpa_kernel(SDPBackend.MATH) if short else contextlib.nullcontext():
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
