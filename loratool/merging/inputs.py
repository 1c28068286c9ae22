"""Inputs of a merge: the base (a checkpoint or a state dict), the adapters opened and digested."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter
from ..checkpoint import Checkpoint, Entry, safetensors_dtype_of
from ..errors import FormatError, UsageError
from ..format import TensorInfo, canonical_json
from ..stream import byte_view

if TYPE_CHECKING:
    import torch


class MemoryCheckpoint(Checkpoint):
    """A state dict seen through ``Checkpoint``'s interface (names, shapes, resolve, check_fits)."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:  # no super(): nothing to parse
        self.path = Path("<state dict>")
        self.is_dir = False
        self.index = None
        self.shards = []
        self.shard_metadata = {}
        self.shard_tensors = {}
        self.state = state
        self.entries = {}
        for name, t in state.items():
            shape = tuple(int(d) for d in t.shape)
            info = TensorInfo(name, safetensors_dtype_of(t.dtype), shape, 0, 0)
            self.entries[name] = Entry(self.path, info, 0)

    def read(self, name: str) -> torch.Tensor:
        return self.state[name]


@dataclass
class Input:
    adapter: Adapter
    name: str
    format: str
    weight: float
    file_sha256: str | None
    digest: str = ""  # filled by digest_inputs, once the adapter is known to fit
    keys: dict[str, str] = field(default_factory=dict)  # target name -> base weight key

    def entry(self) -> dict[str, Any]:
        binding = self.adapter.binding()
        return {
            "name": self.name,
            "format": self.format,
            "digest": self.digest,
            "sha256": self.file_sha256,
            "fingerprint": binding.fingerprint,
            "hub_id": binding.hub_id,
            "targets": len(self.adapter.targets),
            "weight": self.weight,
        }


def adapter_digest(adapter: Adapter) -> str:
    """``sha256:`` over the canonical target manifest and every factor's name, dtype, shape, bytes.

    Independent of the file format: a PEFT directory and its loratool conversion (same dtype)
    have the same digest, so either can unmerge what the other merged. Raises ``FormatError``
    for NaN or Inf factors. Factors are read one target at a time and not kept.
    """
    import torch

    h = hashlib.sha256()
    h.update(
        canonical_json({n: adapter.targets[n].header() for n in sorted(adapter.targets)}).encode()
    )
    for name in sorted(adapter.targets):
        fresh = adapter.targets[name].replace()  # a copy: loading it leaves the adapter lazy
        for suffix, x in ((f".{p}", fresh.part(p)) for p in fresh.parts()):  # 1.0: A then B
            x = x.detach().cpu().contiguous()
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise FormatError(
                    f"tensor '{name}{suffix}' contains NaN or Inf",
                    code="non-finite",
                    where=adapter.path,
                    hint="the adapter is broken; nothing was written",
                )
            h.update(f"{name}{suffix}:{safetensors_dtype_of(x.dtype)}:{list(x.shape)}\n".encode())
            if x.numel():
                h.update(byte_view(x))
    return "sha256:" + h.hexdigest()


def open_inputs(
    adapters: Sequence[str | os.PathLike[str] | Adapter], weights: Sequence[float] | None
) -> list[Input]:
    from ..format import data_sha256
    from ..sources import open_adapter

    if not adapters:
        raise UsageError("no adapters given", hint="name at least one ADAPTER")
    if weights is not None and len(weights) != len(adapters):
        raise UsageError(
            f"{len(weights)} weights for {len(adapters)} adapters",
            code="weights",
            hint="give one --weight per adapter, in the same order, or none (all 1.0)",
        )
    inputs = []
    for i, a in enumerate(adapters):
        w = 1.0 if weights is None else float(weights[i])
        if not math.isfinite(w):
            raise UsageError(f"weight {w} is not finite", code="weights")
        if isinstance(a, Adapter):
            name = Path(a.path).name if a.path else f"adapter[{i}]"
            inputs.append(Input(a, name, "memory", w, a.sha256))
            continue
        opened = open_adapter(a)
        file_sha = None
        if opened.header is not None:  # a loratool file: check its integrity hash first
            file_sha = opened.adapter.sha256
            if data_sha256(opened.header) != file_sha:
                raise FormatError(
                    "tensor data does not match the recorded sha256",
                    code="integrity",
                    where=opened.path,
                    hint="the file was corrupted; fetch or export it again",
                )
        if opened.adapter.path is None:
            opened.adapter.path = opened.path
        name = Path(opened.path).name or str(a)
        inputs.append(Input(opened.adapter, name, opened.format, w, file_sha))
    return inputs


def digest_inputs(inputs: list[Input]) -> None:
    """Read every factor once: content digests for provenance, and NaN/Inf refused."""
    for inp in inputs:
        inp.digest = adapter_digest(inp.adapter)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda but no CUDA device is available",
            code="no-cuda",
            hint="use --device cpu or auto",
        )
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}", code="device", hint="auto, cpu or cuda")
    return device
