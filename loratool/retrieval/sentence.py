"""What sentence-transformers computes, read from an encoder's files: pooling, normalisation, similarity.

``SentenceConfig`` reads ``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``
and ``config_sentence_transformers.json``; ``pool`` and ``similarity`` compute the same pooling
(cls / max / mean / mean_sqrt_len / lasttoken, concatenated in its order when several are set),
the same L2 ``Normalize`` and the same similarity function, without depending on that package.
A model without ``modules.json`` gets mean pooling and normalisation, the common choice.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import HubError, UsageError

if TYPE_CHECKING:
    import torch

# sentence-transformers' pooling keys, in the order its Pooling module concatenates them.
POOLING_KEYS = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}
SUPPORTED_POOLING = ("cls", "max", "mean", "mean_sqrt_len", "lasttoken")
SIMILARITIES = ("cosine", "dot")

# -- the encoder's sentence-transformers configuration -------------------------------------------


@dataclass(frozen=True)
class SentenceConfig:
    """How token states become one sentence vector, and how vectors are compared."""

    pooling: tuple[str, ...] = ("mean",)
    normalize: bool = True
    max_seq_length: int | None = None
    similarity: str = "cosine"
    source: str = "default (no modules.json)"

    def to_json(self) -> dict[str, Any]:
        return {
            "pooling": list(self.pooling),
            "normalize": self.normalize,
            "max_seq_length": self.max_seq_length,
            "similarity": self.similarity,
            "source": self.source,
        }


def _model_file(
    model: str | os.PathLike[str], name: str, revision: str | None = None
) -> Path | None:
    """``name`` inside a local model dir, or from the Hub cache for a Hub id; None when absent."""
    local = Path(model)
    if local.is_dir():
        path = local / name
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(str(model), name, revision=revision))
    except EntryNotFoundError:
        return None
    except LocalEntryNotFoundError:
        return None  # offline and never fetched: the model itself will fail to load if missing
    except Exception as e:  # network, auth, missing repo
        raise HubError(f"cannot read {name} of '{model}': {e}", where=str(model)) from e


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path.name}: {e}", code="bad-model", where=str(path)) from e


def sentence_config(model: str | os.PathLike[str], revision: str | None = None) -> SentenceConfig:
    """The encoder's pooling, normalisation, length and similarity from its sentence-transformers files.

    Refuses a ``modules.json`` with modules loratool cannot reproduce (e.g. a ``Dense``
    projection), rather than silently computing other embeddings than sentence-transformers does.
    """
    modules_path = _model_file(model, "modules.json", revision)
    max_len = None
    bert_cfg = _model_file(model, "sentence_bert_config.json", revision)
    if bert_cfg is not None:
        raw = _read_json(bert_cfg).get("max_seq_length")
        max_len = int(raw) if isinstance(raw, int) and raw > 0 else None
    similarity = "cosine"
    st_cfg = _model_file(model, "config_sentence_transformers.json", revision)
    if st_cfg is not None:
        similarity = _read_json(st_cfg).get("similarity_fn_name") or "cosine"
        if similarity not in SIMILARITIES:
            raise UsageError(
                f"similarity function '{similarity}' is not supported",
                code="unsupported-encoder",
                where=str(model),
                hint=f"supported: {', '.join(SIMILARITIES)}",
            )
    if modules_path is None:
        return SentenceConfig(max_seq_length=max_len, similarity=similarity)

    modules = _read_json(modules_path)
    if not isinstance(modules, list):
        raise UsageError("modules.json is not a list", code="bad-model", where=str(modules_path))
    pooling: tuple[str, ...] = ()
    normalize = False
    for entry in modules:
        kind = str(entry.get("type", "")).rsplit(".", 1)[-1] if isinstance(entry, dict) else ""
        if kind == "Transformer":
            continue
        if kind == "Normalize":
            normalize = True
        elif kind == "Pooling":
            sub = str(entry.get("path") or "")
            cfg_path = _model_file(model, f"{sub}/config.json" if sub else "config.json", revision)
            if cfg_path is None:
                raise UsageError(
                    f"pooling config '{sub}/config.json' is missing",
                    code="bad-model",
                    where=str(model),
                )
            pooling = _pooling_modes(_read_json(cfg_path), where=str(cfg_path))
        else:
            raise UsageError(
                f"sentence-transformers module '{entry.get('type') if isinstance(entry, dict) else entry}'"
                " is not supported",
                code="unsupported-encoder",
                where=str(modules_path),
                hint="loratool computes Transformer + Pooling (+ Normalize) encoders",
            )
    if not pooling:
        raise UsageError(
            "modules.json has no Pooling module",
            code="unsupported-encoder",
            where=str(modules_path),
        )
    return SentenceConfig(pooling, normalize, max_len, similarity, source="modules.json")


def _pooling_modes(cfg: Any, *, where: str) -> tuple[str, ...]:
    if not isinstance(cfg, dict):
        raise UsageError("pooling config is not an object", code="bad-model", where=where)
    modes = tuple(mode for mode, key in POOLING_KEYS.items() if cfg.get(key))
    if not modes and isinstance(cfg.get("pooling_mode"), str):
        modes = (cfg["pooling_mode"].removesuffix("_tokens"),)
    bad = [m for m in modes if m not in SUPPORTED_POOLING]
    if bad or not modes:
        raise UsageError(
            f"pooling mode {', '.join(bad) or '(none)'} is not supported",
            code="unsupported-encoder",
            where=where,
            hint=f"supported: {', '.join(SUPPORTED_POOLING)}",
        )
    return modes


# -- encoding ------------------------------------------------------------------------------------


def pool(hidden: torch.Tensor, mask: torch.Tensor, config: SentenceConfig) -> torch.Tensor:
    """Sentence vectors ``[batch, dim·modes]`` from token states ``[batch, seq, dim]``, in fp32."""
    import torch
    import torch.nn.functional as F

    h = hidden.float()
    m = mask.to(h.dtype).unsqueeze(-1)  # [batch, seq, 1]
    parts = []
    for mode in config.pooling:
        if mode == "cls":
            parts.append(h[:, 0])
        elif mode == "max":
            parts.append(h.masked_fill(m == 0, -1e9).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len"):
            total = (h * m).sum(dim=1)
            count = m.sum(dim=1).clamp(min=1e-9)
            parts.append(total / (count if mode == "mean" else count.sqrt()))
        elif mode == "lasttoken":
            # The last non-padding token of each row, for left or right padding alike.
            positions = torch.arange(mask.shape[1], device=mask.device)
            last = (positions * mask.long()).argmax(dim=1)
            parts.append(h[torch.arange(h.shape[0], device=h.device), last])
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return F.normalize(out, p=2, dim=-1) if config.normalize else out


def similarity(a: torch.Tensor, b: torch.Tensor, config: SentenceConfig) -> torch.Tensor:
    """``[len(a), len(b)]`` scores: cosine (sentence-transformers' default) or dot product."""
    import torch.nn.functional as F

    if config.similarity == "cosine" and not config.normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return a @ b.T
