"""The in-memory adapter: plain dataclasses for the whole file and its base binding.

``Target`` (one adapted module) and the scale and fingerprint rules live in loratool/target.py
and are re-exported here, where code has always imported them from.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import constants as C
from . import kinds
from .target import Target, TensorLoader, alpha_for, fingerprint, scale_for, weight_shape

if TYPE_CHECKING:
    import torch

__all__ = [
    "Adapter",
    "BaseBinding",
    "Target",
    "TensorLoader",
    "alpha_for",
    "fingerprint",
    "install_writer",
    "scale_for",
    "weight_shape",
]

# The writer lives a layer above this module (loratool/format) and installs itself here when it
# is imported (``import loratool`` always imports it), so the dataclass never imports the code
# that serialises it: dependencies point one way, format → adapter.
_writer: Callable[..., None] | None = None


def install_writer(writer: Callable[..., None]) -> None:
    """Called once by ``loratool.format``: the function ``Adapter.save`` delegates to."""
    global _writer
    _writer = writer


@dataclass
class BaseBinding:
    """Which base model the adapter belongs to (spec §4.3)."""

    fingerprint: str
    hub_id: str | None = None
    revision: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept on round trips

    def header(self) -> dict[str, Any]:
        return {
            **self.extra,
            "fingerprint": self.fingerprint,
            "hub_id": self.hub_id,
            "revision": self.revision,
        }


@dataclass
class Adapter:
    """A whole adapter file: targets by module name, base binding, provenance, other metadata."""

    targets: dict[str, Target]
    base: BaseBinding | None = None  # None: derived from the targets (no hub id) when saved
    provenance: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)  # keys loratool does not know, kept
    version: str = C.FORMAT_VERSION
    path: str | None = None  # where it was read from, if anywhere
    sha256: str | None = None  # the integrity hash recorded in the file, if read from one

    @classmethod
    def from_targets(
        cls,
        targets: Iterable[Target],
        *,
        hub_id: str | None = None,
        revision: str | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> Adapter:
        ts = {t.name: t for t in targets}
        adapter = cls(targets=ts, provenance=dict(provenance or {}))
        adapter.base = BaseBinding(adapter.computed_fingerprint(), hub_id=hub_id, revision=revision)
        return adapter

    def computed_fingerprint(self) -> str:
        return fingerprint((t.weight_name, t.weight_shape) for t in self.targets.values())

    def binding(self) -> BaseBinding:
        """The base binding, with the fingerprint always matching the targets."""
        fp = self.computed_fingerprint()
        if self.base is None:
            return BaseBinding(fp)
        return BaseBinding(fp, self.base.hub_id, self.base.revision, dict(self.base.extra))

    @property
    def total_params(self) -> int:
        return sum(t.num_params for t in self.targets.values())

    @property
    def dtypes(self) -> list[str]:
        return sorted({t.dtype for t in self.targets.values()})

    def save(self, path: str | os.PathLike[str], *, force: bool = False) -> None:
        """Write this adapter in canonical bytes (spec §5), atomically."""
        if _writer is None:  # pragma: no cover - loratool/__init__ always imports the format
            raise RuntimeError("loratool.format is not imported")
        _writer(self, path, force=force)

    @property
    def requires(self) -> list[str]:
        """The 1.1 features and kinds this adapter uses (``loratool.requires``, §4.1); empty
        when a 1.0 reader reads it and the writer writes version 1.0."""
        return kinds.requirements(self.targets.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{'<module>.<part>': tensor}`` for every target: ``lora_A``/``lora_B`` for 1.0
        targets, plus or instead the parts of §3.5–3.6."""
        out: dict[str, torch.Tensor] = {}
        for t in self.targets.values():
            if t.plain:
                out[t.name + C.LORA_A_SUFFIX] = t.lora_A
                out[t.name + C.LORA_B_SUFFIX] = t.lora_B
                continue
            for part in t.parts():
                out[f"{t.name}.{part}"] = t.part(part)
        return out
