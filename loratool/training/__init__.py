"""``loratool train``'s library: LoRA fine-tuning of causal LMs from jsonl data.

``train(TrainConfig(...), on_event=...)`` runs a whole training (``loop``). The parts: ``config``
(settings, config files), ``data`` (jsonl, masks, packing, batches), ``plan`` (batch order and
learning-rate schedule), ``runtime`` (processes, device, precision, model loading),
``attention`` (per-document attention for packed rows), ``loss`` (chunked cross-entropy) and
``state`` (checkpoints). Importing this package imports torch (``import loratool`` does not).
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
