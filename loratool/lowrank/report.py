"""What the low-rank operations report: per-target rows, a size summary, provenance entries."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..adapter import Adapter
from .rules import Rule


@dataclass
class TargetReport:
    """What happened to one target."""

    name: str
    old_rank: int  # input rank (combine: sum of the inputs' ranks; extract: min(in, out))
    new_rank: int
    retained_energy: float  # Σ_{i≤k} σ_i² / Σ σ_i² (1.0 for a zero target)
    largest_dropped_sv: float | None  # σ_{k+1}; 0.0 when nothing was dropped; None if unknown
    sv_max: float  # σ_1 of the input ΔW
    norm: float  # ‖ΔW‖_F of the input
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    zero: bool = False
    method: str = "qr-core"  # "qr-core", "concat" (combine, exact), "exact-svd", "randomized"
    # ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F, from the dropped σ (or, for a randomized SVD, the residual itself)
    # rather than sqrt(1 − retained), which would cancel catastrophically near 1.
    relative_error: float = 0.0
    # DoRA (spec 1.1): the relative error of the whole merged update m ⊙ V/‖V‖ − W (needs the
    # base), where relative_error is the low-rank part's; None when not computed
    update_error: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "old_rank": self.old_rank,
            "new_rank": self.new_rank,
            "retained_energy": self.retained_energy,
            "relative_error": self.relative_error,
            "largest_dropped_sv": self.largest_dropped_sv,
            "sv_max": self.sv_max,
            "norm": self.norm,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "zero": self.zero,
            "method": self.method,
            **({} if self.update_error is None else {"update_error": self.update_error}),
        }


@dataclass
class LowRankReport:
    """Per-target outcome of reduce-rank, combine or extract, with a size summary."""

    operation: str  # "reduce-rank", "combine", "extract"
    rule: Rule | None
    targets: list[TargetReport] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # extract: {name, reason}
    warnings: list[str] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        return sum(t.params_before for t in self.targets)

    @property
    def params_after(self) -> int:
        return sum(t.params_after for t in self.targets)

    @property
    def bytes_before(self) -> int:
        return sum(t.bytes_before for t in self.targets)

    @property
    def bytes_after(self) -> int:
        return sum(t.bytes_after for t in self.targets)

    @property
    def min_retained_energy(self) -> float:
        return min((t.retained_energy for t in self.targets), default=1.0)

    def to_json(self) -> dict[str, Any]:
        before, after = self.bytes_before, self.bytes_after
        return {
            "operation": self.operation,
            "rule": None if self.rule is None else self.rule.to_json(),
            "summary": {
                "targets": len(self.targets),
                "zero_targets": sum(t.zero for t in self.targets),
                "params_before": self.params_before,
                "params_after": self.params_after,
                "bytes_before": before,
                "bytes_after": after,
                "bytes_saved": before - after,
                "size_ratio": after / before if before else 1.0,
                "min_retained_energy": self.min_retained_energy,
                "max_relative_error": max((t.relative_error for t in self.targets), default=0.0),
            },
            "targets": [t.to_json() for t in self.targets],
            "skipped": list(self.skipped),
            "warnings": list(self.warnings),
        }


def report_row(
    name: str,
    sv: Sequence[float],
    k: int,
    *,
    old_rank: int,
    m: int,
    n: int,
    bytes_in: int,
    bytes_out: int,
    params_before: int,
    zero: bool,
    method: str,
    total_sq: float | None = None,
    complete: bool = True,
    residual_sq: float | None = None,
) -> TargetReport:
    """``total_sq``: the exact ‖ΔW‖_F² when known apart from ``sv`` (extract);
    ``complete=False``: ``sv`` are only the leading values, so σ_{k+1} may be unknown and
    ``residual_sq`` = ‖ΔW − ΔW_k‖_F² must be given."""
    total = sum(s * s for s in sv) if total_sq is None else total_sq
    kept = sum(s * s for s in sv[:k])
    if residual_sq is None:
        residual_sq = sum(s * s for s in sv[k:])
    dropped: float | None = sv[k] if k < len(sv) else (0.0 if complete else None)
    if zero:
        dropped = 0.0
    return TargetReport(
        name=name,
        old_rank=old_rank,
        new_rank=k,
        retained_energy=1.0 if zero or total == 0.0 else min(1.0, kept / total),
        largest_dropped_sv=dropped,
        sv_max=sv[0] if sv else 0.0,
        norm=math.sqrt(total),
        params_before=params_before,
        params_after=k * (m + n),
        bytes_before=bytes_in,
        bytes_after=k * (m + n) * bytes_out,
        zero=zero,
        method=method,
        relative_error=0.0 if zero or total == 0.0 else math.sqrt(residual_sq / total),
    )


def with_operation(provenance: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """``provenance`` with ``entry`` appended to its ``operations`` list."""
    out = dict(provenance)
    ops = out.get("operations")
    out["operations"] = [*(ops if isinstance(ops, list) else []), entry]
    return out


def source_entry(adapter: Adapter) -> dict[str, Any]:
    return {
        "file": os.path.basename(adapter.path) if adapter.path else None,
        "sha256": adapter.sha256,
    }
