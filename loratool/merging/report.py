"""Reports of a merge or unmerge: per-weight fidelity, the summary, progress events.

Fidelity, per targeted weight, from the rounded output: ``retained = ‖W'−W‖/‖ΔW‖`` and
``error = ‖(W'−W) − ΔW‖/‖ΔW‖`` (‖ΔW‖ exact in fp64 from the factors' r×r Gram matrices; the other
norms from fp32 dot products over blocks of rows, summed in fp64). A target is *lossy* when
``error > 0.10`` (LOSS_THRESHOLD); by the triangle inequality this includes every target whose
``retained`` is outside 0.9 … 1.1, and also one whose delta was rotated rather than shrunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .sidecar import Sidecar

if TYPE_CHECKING:
    import torch


LOSS_THRESHOLD = 0.10  # a target is lossy when ‖(W'−W) − ΔW‖ > 10% of ‖ΔW‖


@dataclass(frozen=True)
class ProgressEvent:
    """Sent after each tensor is handed to the writer: bytes of the current output shard done."""

    shard: str
    shard_index: int
    shards: int
    done: int
    total: int
    tensor: str


Progress = Callable[[ProgressEvent], None]


@dataclass
class TargetReport:
    """One merged (or unmerged) weight: how much of ΔW it holds and what an unmerge restores."""

    key: str
    modules: list[str]
    kind: str
    shape: tuple[int, ...]
    dtype: str  # output dtype
    delta_norm: float  # ‖ΔW‖ (signed sum of the applied deltas), fp32 blocks summed in fp64
    applied_norm: float  # ‖W' − W‖ from the rounded output
    error_norm: float  # ‖(W' − W) − ΔW‖
    roundtrip_off: int = 0  # merge: elements where round_base(W' − ΔW) ≠ W
    roundtrip_max_ulp: int = 0
    corrections: int = 0  # unmerge: elements put back from the sidecar
    verified: bool | None = None  # unmerge: the result's SHA-256 equals the recorded original

    @property
    def retained(self) -> float | None:
        if self.delta_norm == 0 or not math.isfinite(self.delta_norm):
            return None
        return self.applied_norm / self.delta_norm

    @property
    def error(self) -> float | None:
        if self.delta_norm == 0 or not math.isfinite(self.delta_norm):
            return None
        return self.error_norm / self.delta_norm

    @property
    def lossy(self) -> bool:
        e = self.error
        return e is not None and e > LOSS_THRESHOLD

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "modules": self.modules,
            "kind": self.kind,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "delta_norm": _finite(self.delta_norm),
            "retained": _finite(self.retained),
            "error": _finite(self.error),
            "lossy": self.lossy,
            "roundtrip_off": self.roundtrip_off,
            "roundtrip_max_ulp": self.roundtrip_max_ulp,
            "corrections": self.corrections,
            "verified": self.verified,
        }


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


@dataclass
class MergeReport:
    """What a merge or unmerge did; ``state_dict`` is the result when the input was one."""

    operation: str  # "merge" or "unmerge"
    base: str
    out: str | None
    adapters: list[dict[str, Any]]
    dtype: str
    device: str
    targets: list[TargetReport]
    record: dict[str, Any]  # the provenance record written (merge) or undone (unmerge)
    shards: list[str] = field(default_factory=list)
    base_bytes: int = 0
    out_bytes: int = 0
    sidecar_name: str | None = None
    sidecar_bytes: int = 0
    copied_files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    exact: str = "n/a"  # unmerge: "verified", "mismatch" or "unknown" (no sidecar)
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    sidecar: Sidecar | None = field(default=None, repr=False)

    @property
    def lossy(self) -> list[TargetReport]:
        return [t for t in self.targets if t.lossy]

    def summary(self) -> dict[str, Any]:
        d2 = sum(t.delta_norm**2 for t in self.targets)
        a2 = sum(t.applied_norm**2 for t in self.targets)
        e2 = sum(t.error_norm**2 for t in self.targets)
        rated = [t for t in self.targets if t.retained is not None]
        worst = max(rated, key=lambda t: t.error or 0.0, default=None)
        elements = sum(math.prod(t.shape) for t in self.targets)
        off = sum(t.roundtrip_off for t in self.targets)
        return {
            "targets": len(self.targets),
            "elements": elements,
            "lossy": len(self.lossy),
            "loss_threshold": LOSS_THRESHOLD,
            "retained": _finite(math.sqrt(a2 / d2)) if d2 > 0 else None,
            "error": _finite(math.sqrt(e2 / d2)) if d2 > 0 else None,
            "min_retained": _finite(min((t.retained or 0.0) for t in rated)) if rated else None,
            "max_retained": _finite(max((t.retained or 0.0) for t in rated)) if rated else None,
            "worst": None if worst is None else {"key": worst.key, "error": _finite(worst.error)},
            "roundtrip_off": off,
            "roundtrip_fraction": off / elements if elements else 0.0,
            "roundtrip_max_ulp": max((t.roundtrip_max_ulp for t in self.targets), default=0),
            "corrections": sum(t.corrections for t in self.targets),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "base": self.base,
            "out": self.out,
            "adapters": self.adapters,
            "dtype": self.dtype,
            "device": self.device,
            "shards": self.shards,
            "base_bytes": self.base_bytes,
            "out_bytes": self.out_bytes,
            "summary": self.summary(),
            "reversible": None
            if self.sidecar_name is None
            else {
                "sidecar": self.sidecar_name,
                "bytes": self.sidecar_bytes,
                "fraction_of_base": self.sidecar_bytes / self.base_bytes
                if self.base_bytes
                else None,
            },
            "exact": self.exact,
            "record": self.record,
            "copied_files": self.copied_files,
            "skipped_files": self.skipped_files,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
            "targets": [t.to_json() for t in self.targets],
        }


def add_warnings(report: MergeReport) -> None:
    lossy = report.lossy
    if lossy:
        worst = max(lossy, key=lambda t: t.error or 0.0)
        report.warnings.append(
            f"{len(lossy)} of {len(report.targets)} targets lose more than "
            f"{LOSS_THRESHOLD:.0%} of ΔW to {worst.dtype} rounding (worst: '{worst.key}', "
            f"error {worst.error:.1%}); merge with --dtype f32 to keep them"
        )
