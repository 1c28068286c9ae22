"""A causal LM with its frozen linear layers quantised: in place, or streamed from the checkpoint.

Which layers: every ``nn.Linear`` of the model except the output head (targeted by LoRA or not),
as QLoRA and PEFT + bitsandbytes do; embeddings, norms and the head (often tied to the embedding)
keep the run's dtype. ``load_quantized`` never holds the dense model: it builds the module tree
without initialising it, then reads the checkpoint one tensor at a time, quantising each linear
weight as it arrives — peak memory is the quantised model plus one dense weight.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import codec
from .linear import QuantLinear

LIBRARY = "loratool.quant"


@dataclass
class QuantReport:
    """What was quantised, and the bytes of those weights before and after."""

    scheme: str
    source_dtype: str  # the dtype the weights had when quantised (what --onto-quantized repeats)
    modules: list[str] = field(default_factory=list)
    dense_bytes: int = 0  # the same weights in bf16
    packed_bytes: int = 0

    @property
    def ratio(self) -> float:
        return self.packed_bytes / self.dense_bytes if self.dense_bytes else 0.0

    def provenance(self) -> dict[str, Any]:
        """The adapter's ``provenance["training"]["quantization"]``: enough to redo it exactly."""
        return {
            **codec.describe(self.scheme),
            "source_dtype": self.source_dtype,
            "modules": list(self.modules),
            "library": LIBRARY,
            "version": _version(),
            "bytes": {"bf16": self.dense_bytes, "quantized": self.packed_bytes},
        }


def _version() -> str:
    try:
        return importlib.metadata.version("loratool")
    except importlib.metadata.PackageNotFoundError:  # a source tree without an install
        from .. import __version__

        return __version__


def dtype_label(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}.get(
        dtype, str(dtype)
    )


def quantizable(model: nn.Module) -> list[str]:
    """Names of the linear layers ``--quantize`` packs: every ``nn.Linear`` but the output head."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear) and m is not head
    ]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: nn.Module, scheme: str) -> QuantReport:
    """Replace the model's linear layers (not the head) by ``QuantLinear``s, one at a time."""
    names = quantizable(model)
    first = model.get_submodule(names[0]) if names else None
    dtype = first.weight.dtype if isinstance(first, nn.Linear) else torch.float32
    report = QuantReport(scheme, dtype_label(dtype))
    for name in names:
        lin = model.get_submodule(name)
        assert isinstance(lin, nn.Linear)
        q = QuantLinear.from_linear(lin, scheme)
        _replace(model, name, q)
        report.modules.append(name)
        report.dense_bytes += lin.weight.numel() * 2
        report.packed_bytes += q.nbytes
    return report


def load_quantized(
    model_dir: str | Path, *, dtype: torch.dtype, scheme: str, **config_kwargs: Any
) -> tuple[Any, QuantReport] | None:
    """The causal LM in ``model_dir`` with its linear layers quantised as they are read.

    None when the checkpoint's tensor names do not cover the model's (a model whose loading
    renames keys): the caller loads it whole and calls ``quantize_model`` instead.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from ..checkpoint import Checkpoint

    ckpt = Checkpoint(model_dir)
    config = AutoConfig.from_pretrained(model_dir, **config_kwargs)
    # Modules allocated but never initialised: untouched pages of torch.empty cost no memory.
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    state = model.state_dict()
    tied = {k for k in state if k not in ckpt.entries}
    head = model.get_output_embeddings()
    head_keys = {"lm_head.weight"} if head is not None else set()
    if tied - head_keys or (tied and not getattr(config, "tie_word_embeddings", False)):
        return None
    names = quantizable(model)
    report = QuantReport(scheme, dtype_label(dtype))
    quantized = set()
    for name in names:
        lin = model.get_submodule(name)
        assert isinstance(lin, nn.Linear)
        w = ckpt.read(name + ".weight").to(dtype)
        bias = ckpt.read(name + ".bias").to(dtype) if lin.bias is not None else None
        q = QuantLinear(codec.quantize(w, scheme), bias, compute_dtype=dtype)
        _replace(model, name, q)
        report.modules.append(name)
        report.dense_bytes += w.numel() * 2
        report.packed_bytes += q.nbytes
        quantized.update({name + ".weight", name + ".bias"})
        del w, bias, lin
    with torch.no_grad():
        for key, t in model.state_dict(keep_vars=True).items():
            if key in quantized or key.rsplit(".", 1)[0] in report.modules or key in tied:
                continue
            t.data = ckpt.read(key).to(t.dtype)
    if tied:
        model.tie_weights()
    model.config.use_cache = False
    return model, report
