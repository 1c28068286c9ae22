"""Trained parts beyond the factors (spec 1.1 §3.5–3.6): base biases, whole modules, token rows.

PEFT's vocabulary, with PEFT's forward maths, so an adapter trained here and written as PEFT's
files computes the same outputs under ``PeftModel``:

* ``bias="lora_only"``/``"all"`` (loralib's ``mark_only_lora_as_trainable``): a LoRA layer's base
  bias trains through its ``bias_delta`` (``LoraLayer``); with ``all``, every other module with a
  bias is wrapped in ``BiasShift`` (``y = base(x) + δ``). Both keep the frozen bias and learn the
  difference, which is what the file stores (feature / kind ``bias``).
* ``modules_to_save``: a trained copy replaces the module, as PEFT's ``ModulesToSaveWrapper`` does
  (a tied partner keeps the original); the file stores its weight and bias (kind ``full``).
* ``trainable_token_indices``: ``TokenRows`` holds the new values of some embedding rows and looks
  tokens up in ``W.index_copy(0, ids, rows)`` (PEFT's ``TrainableTokensLayer``); an output head
  tied to the embedding sees the same rows (``TiedRows``), as PEFT's tied adapter (kind ``tokens``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SAVED_FLAG = "_loratool_saved"  # set on a modules_to_save copy; its original is kept beside it


class BiasShift(nn.Module):
    """``x ↦ base(x) + δ`` around a frozen module whose bias adds along the last dimension.

    Exact for ``nn.Linear``, transformers' ``Conv1D`` and ``nn.LayerNorm``: their output is
    ``f(x) + b`` with ``b`` broadcast over the last dimension, so ``f(x) + (b + δ)`` is this.
    """

    TYPES = ("Linear", "Conv1D", "LayerNorm")

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        bias = base.bias
        assert isinstance(bias, torch.Tensor)
        self.base = base
        self.bias_delta = nn.Parameter(torch.zeros(bias.shape[-1], device=bias.device))

    @classmethod
    def fits(cls, module: nn.Module) -> bool:
        bias = getattr(module, "bias", None)
        return (
            isinstance(bias, torch.Tensor)
            and bias.dim() == 1
            and type(module).__name__ in cls.TYPES
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out: torch.Tensor = self.base(x, *args, **kwargs)
        return out + self.bias_delta.to(out.dtype)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base, name)  # weight, eps, normalized_shape, ...


def saved_copy(module: nn.Module) -> nn.Module:
    """PEFT's ``modules_to_save``: a trainable deep copy; the original stays (for ``remove``)."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(True)
    object.__setattr__(twin, SAVED_FLAG, [module])  # a list: not registered as a submodule
    return twin


def saved_original(module: nn.Module) -> nn.Module | None:
    """The module a ``saved_copy`` replaced, or None for any other module."""
    kept = getattr(module, SAVED_FLAG, None)
    return kept[0] if isinstance(kept, list) else None


class TokenRows(nn.Module):
    """An embedding whose rows ``indices`` are trainable values (PEFT ``TrainableTokensLayer``).

    ``token_values`` starts as a copy of those rows, so the layer first computes what the base
    did. The lookup uses ``W.index_copy(0, indices, token_values)``: the new rows replace the old,
    which is what PEFT computes and what the file stores (spec §3.6 ``tokens``).
    """

    def __init__(self, base: nn.Embedding, indices: list[int]) -> None:
        super().__init__()
        self.base = base
        w = base.weight
        self.register_buffer(
            "token_indices",
            torch.tensor(indices, dtype=torch.long, device=w.device),
            persistent=False,
        )
        self.token_values = nn.Parameter(w.detach()[self.indices].clone().float())

    @property
    def indices(self) -> torch.Tensor:
        idx = self.token_indices
        assert isinstance(idx, torch.Tensor)
        return idx

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_copy(0, self.indices, self.token_values.to(weight.dtype))

    @property
    def weight(self) -> torch.Tensor:
        return self.merged_weight(self.base.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        out = F.embedding(
            x,
            self.weight,
            padding_idx=b.padding_idx,
            max_norm=b.max_norm,
            norm_type=b.norm_type,
            scale_grad_by_freq=b.scale_grad_by_freq,
            sparse=b.sparse,
        )
        scale = getattr(b, "embed_scale", None)  # Gemma-style scaled embeddings, as PEFT
        return out if scale is None else out * scale.to(out.dtype)


class TiedRows(nn.Module):
    """An output head tied to a ``TokenRows`` embedding: ``F.linear(x, W')``, the same new rows."""

    def __init__(self, base: nn.Linear, rows: TokenRows) -> None:
        super().__init__()
        self.base = base
        self._rows = [rows]  # not a submodule: the parameters belong to the embedding's layer

    @property
    def rows(self) -> TokenRows:
        return self._rows[0]

    @property
    def weight(self) -> torch.Tensor:
        return self.rows.merged_weight(self.base.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.base.bias)
