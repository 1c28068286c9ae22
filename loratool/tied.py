"""Tied output heads: a base whose ``lm_head`` shares the input embedding's weight.

transformers saves such a model (``tie_word_embeddings: true``) without ``lm_head.weight``; PEFT
still names ``lm_head`` as a module (``modules_to_save=["lm_head"]``), whose base weight is then
the embedding's. Pure: the key names and config.json only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

EMBEDDING_LEAVES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "shared")
HEAD = "lm_head"


def read_config(path: Path) -> dict[str, Any]:
    """config.json beside a checkpoint (its folder, or the folder of its one file); {} if none."""
    folder = path if path.is_dir() else path.parent
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def embedding_key(keys: Iterable[str]) -> str | None:
    """The one input-embedding weight among ``keys`` (None if none or several)."""
    hits = [
        k for k in keys if k.endswith(".weight") and k[:-7].rsplit(".", 1)[-1] in EMBEDDING_LEAVES
    ]
    return hits[0] if len(hits) == 1 else None


def tied_embedding(path: Path, keys: Iterable[str]) -> str | None:
    """The input embedding's key where config.json ties the output head to it and no head
    weight is stored, else None."""
    keys = list(keys)
    if not path.exists() or read_config(path).get("tie_word_embeddings") is not True:
        return None
    if any(k[:-7].rsplit(".", 1)[-1] == HEAD for k in keys if k.endswith(".weight")):
        return None
    return embedding_key(keys)
