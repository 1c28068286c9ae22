"""``--quantize nf4|int8``: the base loaded with its linear layers quantised (QLoRA).

A local checkpoint, or a Hub model already in the cache, is streamed: each linear weight is
quantised as it is read, so the dense model is never in memory (``quant.load_quantized``). A
model whose tensor names differ from its modules' (one transformers renames on load) is loaded
whole in the run's dtype and quantised in place, which peaks at the dense size once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError
from ..quant import QuantReport, load_quantized, quantize_model
from . import runtime as R
from .config import TrainConfig


def _local_dir(config: TrainConfig) -> Path | None:
    """The directory holding ``--model``'s files: itself, or its Hub cache snapshot."""
    p = Path(config.model)
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        found = snapshot_download(config.model, revision=config.revision, local_files_only=True)
    except Exception:  # not cached, not a repo id: the whole-model path says why
        return None
    return Path(found)


def load(config: TrainConfig, dtype: torch.dtype) -> tuple[Any, Any, QuantReport]:
    """(model, tokenizer, what was quantised) for a ``--quantize`` run."""
    assert config.quantize is not None
    where = _local_dir(config)
    loaded = None
    if where is not None:
        from transformers import AutoTokenizer

        kwargs: dict[str, Any] = {"revision": config.revision} if config.revision else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(config.model, **kwargs)
            try:
                loaded = load_quantized(where, dtype=dtype, scheme=config.quantize)
            except FormatError:  # no safetensors weights to stream: load it whole below
                loaded = None
        except (OSError, ValueError, KeyError) as e:
            raise R.load_error(config.model, e) from None
    if loaded is not None:
        model, report = loaded
        return model, tokenizer, report
    model, tokenizer = R.load_model(config, dtype)
    return model, tokenizer, quantize_model(model, config.quantize)
