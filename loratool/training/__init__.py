"""``loratool train``'s library: LoRA fine-tuning of causal LMs and sentence encoders.

``train(TrainConfig(...), on_event=...)`` runs a causal-LM training (``loop``);
``embedding.train_embedding`` a contrastive one for sentence encoders (``--task embedding``).
Both are a ``session.Session``: the step loop, metrics lines, events (``events``), checkpoints
and resume (``state``) are written once. The parts: ``config`` (settings, config files),
``data`` (jsonl records, loss masks, packing, batches), ``plan`` (batch order and learning-rate
schedule), ``runtime`` (processes, device, precision, model loading), ``attention``
(per-document attention for packed rows), ``loss`` (chunked cross-entropy) and ``contrastive``
(InfoNCE, pair batches, GradCache). Importing this package imports torch (``import loratool``
does not).
"""

from __future__ import annotations

from .config import TrainConfig, build_config, read_config_file
from .data import BadDataError
from .loop import TrainEvent, TrainResult, train

__all__ = [
    "BadDataError",
    "TrainConfig",
    "TrainEvent",
    "TrainResult",
    "build_config",
    "read_config_file",
    "train",
]
