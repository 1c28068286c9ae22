"""A loaded sentence encoder: load it from a directory or the Hub, and encode texts in batches."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import HubError, UsageError
from .sentence import SentenceConfig, pool, sentence_config

if TYPE_CHECKING:
    import torch
    from torch import nn

Progress = Callable[[int, int], None]  # (done, total) sentences encoded


@dataclass
class Encoder:
    """A loaded sentence encoder: the transformers model, its tokenizer and its sentence config."""

    model: nn.Module
    tokenizer: Any
    config: SentenceConfig
    name: str
    max_length: int

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, Any]:
        return dict(
            self.tokenizer(
                list(texts),
                padding=True,
                truncation=True,
                max_length=max_length or self.max_length,
                return_tensors="pt",
            )
        )

    def embed(self, batch: dict[str, Any]) -> torch.Tensor:
        """Sentence vectors of a tokenized batch (with gradients if enabled)."""
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        out = self.model(**batch)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return pool(hidden, batch["attention_mask"], self.config)


def load_encoder(
    model: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    revision: str | None = None,
    with_pooler: bool = False,
) -> Encoder:
    """A transformers encoder from a local directory or a Hub id, in fp32 and eval mode.

    BERT-style models are loaded without their pooler head: sentence-transformers does not use
    it, so a LoRA target ``dense`` must not adapt it (it would get no gradient). ``with_pooler``
    keeps it, for adapters that target it.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    name = os.fspath(model)
    local = Path(name).is_dir()
    if not local and (Path(name).exists() or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)):
        raise UsageError(
            f"model '{name}' is neither a model directory nor a Hub id",
            code="no-model",
            hint="give a directory with config.json and weights, or owner/name",
        )
    config = sentence_config(name, revision)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "weights of the pooler not used" is the point, not news
    hf_logging.disable_progress_bar()  # the command draws its own progress
    try:
        where: dict[str, Any] = {"local_files_only": True} if local else {"revision": revision}
        try:
            net = AutoModel.from_pretrained(
                name, dtype=torch.float32, add_pooling_layer=with_pooler, **where
            )
        except TypeError:  # an architecture without a pooler switch
            net = AutoModel.from_pretrained(name, dtype=torch.float32, **where)
        tokenizer = AutoTokenizer.from_pretrained(name, **where)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not local and isinstance(e, OSError):
            raise HubError(f"cannot load model '{name}': {first}", where=name) from None
        raise UsageError(
            f"cannot load model '{name}': {first}",
            code="bad-model",
            hint="a local Hugging Face model directory, or a Hub id (cached, or reachable)",
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if device:
        net.to(device)
    net.eval()
    limits = [
        n
        for n in (
            config.max_seq_length,
            getattr(tokenizer, "model_max_length", None),
            getattr(net.config, "max_position_embeddings", None),
        )
        if isinstance(n, int) and 0 < n < 1_000_000
    ]
    return Encoder(net, tokenizer, config, name, min(limits) if limits else 512)


def encode(
    encoder: Encoder,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """``[len(texts), dim]`` fp32 sentence vectors on the CPU, in the order of ``texts``.

    Texts are batched longest first, as sentence-transformers does, so padding stays small.
    """
    import torch

    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}", code="bad-batch-size")
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    chunks: list[torch.Tensor] = []
    was_training = encoder.model.training
    encoder.model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = encoder.tokenize([texts[i] for i in idx], max_length)
                chunks.append(encoder.embed(batch).float().cpu())
                if progress:
                    progress(min(start + batch_size, len(order)), len(order))
    finally:
        encoder.model.train(was_training)
    if not chunks:
        return torch.empty(0, 0)
    vectors = torch.cat(chunks)
    out = torch.empty_like(vectors)
    out[torch.tensor(order)] = vectors
    return out
