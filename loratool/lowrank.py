"""Exact low-rank algebra on adapters: reduce rank, combine, extract, and the spectra behind them.

**The QR core, and why it is exact.** For ΔW = s·B·A with B ``[m, R]`` and A ``[R, n]``, take thin QR
factorisations B = Q_b R_b and Aᵀ = Q_a R_a. Then ΔW = Q_b (s·R_b R_aᵀ) Q_aᵀ, and an SVD of the small
core s·R_b R_aᵀ = U S Vᵀ gives ΔW = (Q_b U) S (Q_a V)ᵀ. Q_b U and Q_a V have orthonormal columns, so
this *is* an SVD of ΔW: S are ΔW's singular values (QR and SVD are backward stable, so they carry
only fp32 rounding), and keeping the top k triplets is the best rank-k approximation in both the
Frobenius and the spectral norm (Eckart–Young). Cost O((m+n)R² + R³) instead of the O(mn·min(m, n))
of a dense SVD of B·A, which this module never forms. Q_b and Q_a stay in Householder form
(``geqrf``) and are applied with ``ormqr`` to the k kept columns only; same-shaped targets are
stacked and factorised as one batch.

**New factors** split √σ evenly: B' = ±Q_b U_k diag(√(σ/|s'|)), A' = diag(√(σ/|s'|)) V_kᵀ Q_aᵀ, so
s'·B'·A' is the rank-k truncation and both factors have the same scale (as training keeps them).
- ``reduce_rank`` keeps each target's scale rule and effective scale s: the new alpha is
  ``alpha_for(s, k, rule)`` — s·k (standard) or s·√k (rsLoRA) — kohya's resize convention, so an
  rsLoRA target stays rsLoRA with the same multiplier and tools that re-derive s from alpha agree.
- ``combine`` and ``extract`` write scale 1: standard rule, alpha = k, σ inside the factors.

**Rank rules** (σ_1 ≥ σ_2 ≥ …, k counted from 1; kohya's resize keeps one component more than its
own definitions for the dynamic rules — these are the definitions, exactly):
- ``rank=K``: k = K;
- ``energy=F``: smallest k with Σ_{i≤k} σ_i² / Σ σ_i² ≥ F, 0 < F ≤ 1;
- ``sv_fro=P``: smallest k with sqrt(Σ_{i≤k} σ_i²) / ‖ΔW‖_F ≥ P, 0 < P ≤ 1;
- ``sv_cumulative=P``: smallest k with Σ_{i≤k} σ_i / Σ σ_i ≥ P, 0 < P ≤ 1;
- ``sv_ratio=P``: keep every σ_i ≥ σ_1 / P, P ≥ 1.
*Ties*: a rule counts as met when it holds within a relative ``REL_TOL`` = 1e-6 (about 8 fp32 ulps,
above the rounding of σ computed from fp32 factors), so a threshold that is met exactly in exact
arithmetic keeps the smaller rank, and one missed by more than 1e-6 relative takes the next
component. Then k is clamped to [min_rank, max_rank] and capped at min(in, out, input rank): no
output rank exceeds what ΔW can have.

**Numerical zeros.** σ ≤ 2·√R·ε·Σ_j ‖c_j B_j‖_F‖A_j‖_F (ε = 2⁻²³, c_j the coefficient of block j) —
below the rounding error of the computation itself — are set to 0. A target whose σ are all zero
(B all zeros right after initialisation, alpha 0, or X − X) is a *zero target*: it is kept, with both
factors exactly zero, at rank K under ``rank=K`` and at max(1, min_rank) under the other rules; the
report marks it and warns. Nothing divides by zero and nothing writes NaN.

**Dtypes.** All algebra runs in fp32. ``reduce_rank`` keeps each target's dtype; ``combine`` writes
the widest input dtype (F32 when any input is F32, or when F16 and BF16 meet, since neither holds the
other); ``extract`` writes F32 unless asked otherwise.

**Extraction** takes D = finetuned − base per module (fp32, one module in memory at a time) and its
truncated SVD: an exact ``torch.linalg.svd`` when min(m, n) ≤ ``EXACT_MAX_SIDE`` (256, where it costs
milliseconds), when the sampled width l would exceed min(m, n)/4 (no saving left) or under
``sv_cumulative`` (which needs every σ for Σσ); otherwise a randomized range finder (Halko, Martinsson
& Tropp 2011, Alg. 4.4, as ``torch.svd_lowrank``) with l = k + max(16, k/4) samples, ``POWER_ITERS``
= 4 QR-orthonormalised power iterations and a fixed seed, so files are reproducible. Dynamic rules
start at l for k = min(max_rank, 64) and double until the rule is met inside the computed σ (energy
and sv_fro measure against the exact ‖D‖_F). The retained energy reported is ‖D_k‖²/‖D‖² of the
factors written, exact because D_k is an orthogonal projection of D.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import constants as C
from .adapter import Adapter, BaseBinding, Target, alpha_for
from .errors import CompatibilityError, FormatError, UsageError

if TYPE_CHECKING:
    import torch

    from .checkpoint import Checkpoint

Progress = Callable[[int, int, str], None]  # (done, total, target name), after each target

REL_TOL = 1e-6  # ties at a rule's threshold: see the module docstring
EPS32 = 2.0**-23  # fp32 unit roundoff (the compute precision)
BATCH_BYTES = 256 << 20  # cap on the stacked factors of one batch
EXACT_MAX_SIDE = 256  # extract: exact SVD at or below this min(m, n)
OVERSAMPLE = 16  # extract: randomized samples beyond k (at least; k/4 for large k)
POWER_ITERS = 4  # extract: power iterations of the range finder
DYNAMIC_START = 64  # extract: first k tried by dynamic rules without max_rank
SEED = 0  # extract: the range finder's random test matrix

RULE_FLAGS = {
    "rank": "--rank",
    "energy": "--energy",
    "sv_ratio": "--sv-ratio",
    "sv_cumulative": "--sv-cumulative",
    "sv_fro": "--sv-fro",
}
_RULE_HINT = "pass one of --rank K, --energy F, --sv-ratio P, --sv-cumulative P, --sv-fro P"


# ---------------------------------------------------------------------------------------------
# Spectra (inspect --stats / --plot)


def factor_svd(
    B: torch.Tensor, A: torch.Tensor, scale: float = 1.0, *, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``scale · B @ A`` from the factors: returns U ``[m, r]``, S ``[r]``, Vh ``[r, n]``.

    Computed in ``dtype`` (fp32 by default; fp64 for reports). Singular values are sorted
    descending and are non-negative; a negative scale is moved into U.
    """
    import torch

    dt = dtype or torch.float32
    qb, rb = torch.linalg.qr(B.to(dt))  # B = Q_b R_b, Q_b [m, r]
    qa, ra = torch.linalg.qr(A.to(dt).T)  # Aᵀ = Q_a R_a, Q_a [n, r]
    uc, s, vch = torch.linalg.svd(rb @ ra.T)  # the r×r core
    u = (qb @ uc) * (1.0 if scale >= 0 else -1.0)
    return u, s * abs(scale), vch @ qa.T


@dataclass
class Spectrum:
    """Singular values of a target's ΔW (scale included) and numbers derived from them."""

    singular_values: list[float]

    @property
    def frobenius(self) -> float:
        return math.sqrt(sum(s * s for s in self.singular_values))

    @property
    def numerical_rank(self) -> int:
        """σ_i above σ_max · r · 2⁻²³ (the fp32 rounding level of the factors)."""
        sv = self.singular_values
        if not sv or sv[0] == 0.0:
            return 0
        tol = sv[0] * len(sv) * 2.0**-23
        return sum(1 for s in sv if s > tol)

    @property
    def effective_rank(self) -> float:
        """exp of the entropy of σ/Σσ (Roy & Vetterli 2007); 0 for a zero delta."""
        total = sum(self.singular_values)
        if total == 0.0:
            return 0.0
        ps = [s / total for s in self.singular_values if s > 0.0]
        return math.exp(-sum(p * math.log(p) for p in ps))


def spectrum(target: Target) -> Spectrum:
    """Exact singular values of ``scale · B @ A`` via the QR core, in fp64."""
    import torch

    _, s, _ = factor_svd(target.lora_B, target.lora_A, target.scale, dtype=torch.float64)
    return Spectrum([float(x) for x in s])


# ---------------------------------------------------------------------------------------------
# Rank rules


@dataclass(frozen=True)
class Rule:
    """How many singular triplets to keep per target (definitions in the module docstring)."""

    name: str  # a key of RULE_FLAGS
    value: float
    max_rank: int | None = None
    min_rank: int | None = None

    def to_json(self) -> dict[str, Any]:
        value: float | int = int(self.value) if self.name == "rank" else self.value
        return {
            "name": self.name,
            "value": value,
            "max_rank": self.max_rank,
            "min_rank": self.min_rank,
        }

    def select(
        self,
        sv: Sequence[float],
        *,
        cap: int,
        total_sq: float | None = None,
        complete: bool = True,
    ) -> int | None:
        """k for descending ``sv`` (not all zero), clamped and capped at ``cap``.

        ``complete=False`` says ``sv`` are only the leading values (a randomized SVD):
        ``total_sq`` must then be the exact ‖ΔW‖_F², and None means "not reached yet".
        """
        k = self._raw(sv, total_sq, complete)
        if k is None:
            if self.max_rank is None or len(sv) < self.max_rank:
                return None
            k = self.max_rank  # the rule needs more than max_rank anyway
        if self.min_rank is not None:
            k = max(k, self.min_rank)
        if self.max_rank is not None:
            k = min(k, self.max_rank)
        return max(1, min(k, cap))

    def _raw(self, sv: Sequence[float], total_sq: float | None, complete: bool) -> int | None:
        v, keep = self.value, 1.0 - REL_TOL
        if self.name == "rank":
            return int(v)
        if self.name == "sv_ratio":  # σ_i ≥ σ_1 / P: a prefix, since σ is descending
            k = sum(1 for s in sv if s * v >= sv[0] * keep)
            return k if complete or k < len(sv) else None
        if self.name == "sv_cumulative":
            total = sum(sv)
            met = (c / total >= v * keep for c in itertools.accumulate(sv))
        else:
            total = sum(s * s for s in sv) if total_sq is None else total_sq
            cum = itertools.accumulate(s * s for s in sv)
            if self.name == "energy":
                met = (c / total >= v * keep for c in cum)
            else:  # sv_fro
                met = (math.sqrt(c) / math.sqrt(total) >= v * keep for c in cum)
        for k, ok in enumerate(met, 1):
            if ok:
                return k
        return len(sv) if complete else None

    def zero_rank(self, cap: int) -> int:
        """The rank a zero target keeps: K under ``rank``, else max(1, min_rank); capped."""
        k = int(self.value) if self.name == "rank" else max(1, self.min_rank or 1)
        return max(1, min(k, cap))


def make_rule(
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    sv_cumulative: float | None = None,
    sv_fro: float | None = None,
    max_rank: int | None = None,
    min_rank: int | None = None,
    required: bool = True,
) -> Rule | None:
    """Validate one rank rule and its bounds; raise ``UsageError`` on a bad combination."""
    values = {
        "rank": rank,
        "energy": energy,
        "sv_ratio": sv_ratio,
        "sv_cumulative": sv_cumulative,
        "sv_fro": sv_fro,
    }
    given = {k: v for k, v in values.items() if v is not None}
    if len(given) > 1:
        flags = " and ".join(RULE_FLAGS[k] for k in given)
        raise UsageError(
            f"{flags} are alternatives; give one", code="rule-conflict", hint=_RULE_HINT
        )
    for flag, bound in (("--max-rank", max_rank), ("--min-rank", min_rank)):
        if bound is not None and (
            isinstance(bound, bool) or not isinstance(bound, int) or bound < 1
        ):
            raise UsageError(f"{flag} must be a whole number ≥ 1, got {bound!r}", code="bad-rule")
    if not given:
        if max_rank is not None or min_rank is not None:
            raise UsageError(
                "--max-rank and --min-rank bound a dynamic rule, but none was given",
                code="no-rule",
                hint="add --energy F, --sv-ratio P, --sv-cumulative P or --sv-fro P (or use --rank K)",
            )
        if required:
            raise UsageError("no rank rule given", code="no-rule", hint=_RULE_HINT)
        return None
    name, value = next(iter(given.items()))
    flag = RULE_FLAGS[name]
    if name == "rank":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"--rank must be a whole number ≥ 1, got {value!r}", code="bad-rule")
        if max_rank is not None or min_rank is not None:
            raise UsageError(
                "--max-rank and --min-rank bound a dynamic rule; --rank K already fixes the rank",
                code="rule-conflict",
                hint="drop them, or use --energy/--sv-ratio/--sv-cumulative/--sv-fro",
            )
        return Rule(name, float(value))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number, got {value!r}", code="bad-rule")
    if name == "sv_ratio" and value < 1.0:
        raise UsageError(
            f"--sv-ratio must be ≥ 1 (keep σ ≥ σ_max / P), got {value}",
            code="bad-rule",
            hint="--sv-ratio 10 keeps singular values within a factor 10 of the largest",
        )
    if name != "sv_ratio" and not 0.0 < value <= 1.0:
        raise UsageError(
            f"{flag} is a fraction in (0, 1], got {value}",
            code="bad-rule",
            hint=f"e.g. {flag} 0.95",
        )
    if max_rank is not None and min_rank is not None and min_rank > max_rank:
        raise UsageError(f"--min-rank {min_rank} is above --max-rank {max_rank}", code="bad-rule")
    return Rule(name, float(value), max_rank, min_rank)


# ---------------------------------------------------------------------------------------------
# Reports


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


def _report_row(
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


# ---------------------------------------------------------------------------------------------
# The batched QR core


@dataclass
class _Job:
    """One ΔW = scale · B @ A to factor, with B's column blocks already multiplied by their weights."""

    name: str
    B: torch.Tensor  # [m, R] fp32
    A: torch.Tensor  # [R, n] fp32
    scale: float  # applied to the r×r core (one rounding instead of m·R)
    out_scale: float  # the scale the new factors are written for (reduce: the old one; else 1)
    bound: float  # Σ_j |scale·c_j|·‖B_j‖_F‖A_j‖_F ≥ ‖ΔW‖_F: sets the numerical-zero floor


@dataclass
class _Solved:
    sv: list[float]  # every singular value of ΔW, descending, numerical zeros set to 0
    k: int
    B: torch.Tensor  # [m, k] fp32: out_scale · B @ A is the rank-k truncation of ΔW
    A: torch.Tensor  # [k, n] fp32
    zero: bool


def _solve(jobs: Sequence[_Job], rule: Rule | None, *, device: str) -> dict[str, _Solved]:
    """Top-k SVD factors of every job, same-shaped jobs stacked into one batched QR core.

    ``rule=None`` keeps everything up to min(m, n, R) (exact: ΔW has no more rank than that).
    """
    import torch

    groups: dict[tuple[int, int, int], list[_Job]] = {}
    for j in jobs:
        groups.setdefault((j.B.shape[0], j.A.shape[1], j.B.shape[1]), []).append(j)
    out: dict[str, _Solved] = {}
    for (m, n, R), group in groups.items():
        per_job = 3 * 4 * (m + n) * R  # inputs, Householder copies, the kept columns
        step = max(1, BATCH_BYTES // per_job)
        for start in range(0, len(group), step):
            out.update(_solve_batch(group[start : start + step], rule, m, n, R, device, torch))
    return out


def _solve_batch(
    jobs: Sequence[_Job], rule: Rule | None, m: int, n: int, R: int, device: str, torch: Any
) -> dict[str, _Solved]:
    f32 = torch.float32
    N = len(jobs)
    B = torch.stack([j.B for j in jobs]).to(device=device, dtype=f32)  # [N, m, R]
    # Aᵀ as a view of the stacked A: already the column-major layout LAPACK's geqrf wants.
    At = torch.stack([j.A for j in jobs]).to(device=device, dtype=f32).mT  # [N, n, R]
    # Householder QR of B and Aᵀ; Q stays implicit (applied later by ormqr to k columns only).
    hb, tb = torch.geqrf(B)
    ha, ta = torch.geqrf(At)
    del B, At
    pb, pa = min(m, R), min(n, R)
    rb = hb[:, :pb, :].triu()  # R_b [N, pb, R]
    ra = ha[:, :pa, :].triu()  # R_a [N, pa, R]
    scales = torch.tensor([j.scale for j in jobs], dtype=f32, device=device)
    core = (rb @ ra.mT) * scales[:, None, None]  # s·R_b R_aᵀ [N, pb, pa]: ΔW = Q_b core Q_aᵀ
    u, s, vh = torch.linalg.svd(core, full_matrices=False)  # [N,pb,p], [N,p], [N,p,pa]
    cap = min(m, n, R)
    s_host = s.to("cpu", torch.float64).tolist()

    svs: list[list[float]] = []
    ks: list[int] = []
    zeros: list[bool] = []
    for j, row in zip(jobs, s_host, strict=True):
        floor = 2.0 * math.sqrt(R) * EPS32 * j.bound
        sv = [x if x > floor else 0.0 for x in row]
        zero = not sv or sv[0] == 0.0
        if zero:
            k = rule.zero_rank(cap) if rule is not None else 1
        elif rule is None:
            k = cap
        else:
            selected = rule.select(sv, cap=cap)
            assert selected is not None  # complete spectra always reach the rule
            k = selected
        svs.append(sv)
        ks.append(k)
        zeros.append(zero)

    kmax = max(ks)
    roots = torch.zeros(N, kmax, dtype=torch.float64)
    for i, (j, sv, k, zero) in enumerate(zip(jobs, svs, ks, zeros, strict=True)):
        if not zero:
            roots[i, :k] = torch.tensor(sv[:k], dtype=torch.float64).div(abs(j.out_scale)).sqrt()
    roots32 = roots.to(device=device, dtype=f32)
    signs = torch.tensor(
        [1.0 if j.out_scale >= 0 else -1.0 for j in jobs], dtype=f32, device=device
    )
    cb = torch.zeros(N, m, kmax, dtype=f32, device=device)
    cb[:, :pb, :] = u[:, :, :kmax] * (roots32 * signs[:, None])[:, None, :]
    ca = torch.zeros(N, n, kmax, dtype=f32, device=device)
    ca[:, :pa, :] = vh[:, :kmax, :].mT * roots32[:, None, :]
    new_b = torch.ormqr(hb, tb, cb).cpu()  # Q_b U_k diag(√σ/√|s'|)  [N, m, kmax]
    new_a = torch.ormqr(ha, ta, ca).mT.cpu()  # diag(√σ/√|s'|) V_kᵀ Q_aᵀ [N, kmax, n]
    return {
        j.name: _Solved(
            sv=sv,
            k=k,
            B=new_b[i, :, :k].contiguous(),
            A=new_a[i, :k, :].contiguous(),
            zero=zero,
        )
        for i, (j, sv, k, zero) in enumerate(zip(jobs, svs, ks, zeros, strict=True))
    }


def _factors32(t: Target, where: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A target's (A, B) in fp32, refusing non-finite values and shapes that disagree."""
    import torch

    a, b = t.lora_A, t.lora_B
    if tuple(a.shape) != (t.rank, t.in_features) or tuple(b.shape) != (t.out_features, t.rank):
        raise FormatError(
            f"target '{t.name}': lora_A {list(a.shape)} / lora_B {list(b.shape)} do not match "
            f"rank {t.rank}, in {t.in_features}, out {t.out_features}",
            code="shape-mismatch",
            where=where,
        )
    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    if not (bool(torch.isfinite(a32).all()) and bool(torch.isfinite(b32).all())):
        raise FormatError(
            f"target '{t.name}' has NaN or Inf values", code="non-finite", where=where
        )
    return a32, b32


def _operations(provenance: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """``provenance`` with ``entry`` appended to its ``operations`` list."""
    out = dict(provenance)
    ops = out.get("operations")
    out["operations"] = [*(ops if isinstance(ops, list) else []), entry]
    return out


def _source(adapter: Adapter) -> dict[str, Any]:
    return {
        "file": os.path.basename(adapter.path) if adapter.path else None,
        "sha256": adapter.sha256,
    }


# ---------------------------------------------------------------------------------------------
# reduce_rank


def reduce_rank(
    adapter: Adapter,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    sv_cumulative: float | None = None,
    sv_fro: float | None = None,
    max_rank: int | None = None,
    min_rank: int | None = None,
    device: str = "cpu",
) -> tuple[Adapter, LowRankReport]:
    """The best rank-k approximation of every target, k chosen by exactly one rule.

    Each target keeps its kind, scale rule, effective scale and dtype; alpha becomes
    ``alpha_for(scale, k, rule)``. The base binding, provenance (plus an ``operations`` entry)
    and unknown metadata are kept.
    """
    rule = make_rule(
        rank=rank,
        energy=energy,
        sv_ratio=sv_ratio,
        sv_cumulative=sv_cumulative,
        sv_fro=sv_fro,
        max_rank=max_rank,
        min_rank=min_rank,
    )
    assert rule is not None
    from .format import iter_targets, torch_dtype

    targets = list(iter_targets(adapter))
    jobs = []
    for t in targets:
        a, b = _factors32(t, adapter.path)
        s = t.scale
        jobs.append(_Job(t.name, b, a, s, s, abs(s) * float(b.norm()) * float(a.norm())))
    solved = _solve(jobs, rule, device=device)

    report = LowRankReport("reduce-rank", rule)
    new: dict[str, Target] = {}
    for t in targets:
        r = solved[t.name]
        dt = torch_dtype(t.dtype)
        new[t.name] = Target.from_factors(
            t.name,
            r.A.to(dt),
            r.B.to(dt),
            alpha=alpha_for(t.scale, r.k, t.scale_rule),
            scale_rule=t.scale_rule,
            kind=t.kind,
        )
        size = C.DTYPE_SIZES[t.dtype]
        report.targets.append(
            _report_row(
                t.name,
                r.sv,
                r.k,
                old_rank=t.rank,
                m=t.out_features,
                n=t.in_features,
                bytes_in=t.num_params * size,
                bytes_out=size,
                params_before=t.num_params,
                zero=r.zero,
                method="qr-core",
            )
        )
        if r.zero:
            report.warnings.append(
                f"target '{t.name}' is zero (ΔW = 0): kept at rank {r.k} with zero factors"
            )
    provenance = _operations(
        adapter.provenance,
        {"operation": "reduce-rank", "rule": rule.to_json(), "input": _source(adapter)},
    )
    out = Adapter(
        targets=new,
        base=adapter.binding(),
        provenance=provenance,
        metadata=dict(adapter.metadata),
    )
    return out, report


# ---------------------------------------------------------------------------------------------
# combine


def _widest_dtype(names: Iterable[str]) -> str:
    kinds = set(names)
    if len(kinds) == 1:
        return kinds.pop()
    return "F32"  # any F32 wins; F16 with BF16 needs F32 to hold both ranges and mantissas


def combine(
    adapters: Sequence[Adapter],
    *,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    sv_cumulative: float | None = None,
    sv_fro: float | None = None,
    max_rank: int | None = None,
    min_rank: int | None = None,
    device: str = "cpu",
) -> tuple[Adapter, LowRankReport]:
    """The exact weighted sum Σ w_i·ΔW_i per target (weights default to 1), optionally truncated.

    Per target, [w_1 s_1 B_1 | w_2 s_2 B_2 | …] against [A_1; A_2; …] *is* Σ w_i s_i B_i A_i, with
    each input's own scale s_i (alpha, rank and rsLoRA flag). Without a rule those concatenated
    factors are written as they are (scale 1), unless their rank exceeds min(in, out), where the
    QR core cuts them to min(in, out) without loss. With a rule, the QR core keeps the best rank-k
    approximation. Targets present in only some inputs are kept; a target whose shape or kind
    differs between inputs raises ``CompatibilityError``. The result binds to the inputs' common
    hub id (none, with a warning, when they differ); its provenance lists the inputs (file name,
    sha256, weight); the inputs' own provenance and unknown metadata are not carried over.
    """
    if not adapters:
        raise UsageError("combine needs at least one adapter", code="no-inputs")
    rule = make_rule(
        rank=rank,
        energy=energy,
        sv_ratio=sv_ratio,
        sv_cumulative=sv_cumulative,
        sv_fro=sv_fro,
        max_rank=max_rank,
        min_rank=min_rank,
        required=False,
    )
    if weights is None:
        weights = [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise UsageError(
            f"{len(weights)} weights for {len(adapters)} adapters",
            code="weights",
            hint="give --weight once per adapter, in the same order, or not at all (all 1)",
        )
    ws = [float(w) for w in weights]
    if not all(math.isfinite(w) for w in ws):
        raise UsageError("weights must be finite numbers", code="weights")

    import torch

    from .format import torch_dtype

    names = sorted({name for a in adapters for name in a.targets})
    jobs: list[_Job] = []
    info: dict[str, tuple[Target, int, str, list[int]]] = {}  # first target, R, dtype, inputs
    for name in names:
        parts = [(i, ws[i], a.targets[name]) for i, a in enumerate(adapters) if name in a.targets]
        first = parts[0][2]
        for i, _, t in parts[1:]:
            if (t.kind, t.in_features, t.out_features) != (
                first.kind,
                first.in_features,
                first.out_features,
            ):
                raise CompatibilityError(
                    f"target '{name}' is {first.kind} {first.out_features}×{first.in_features} in "
                    f"adapter 1 but {t.kind} {t.out_features}×{t.in_features} in adapter {i + 1}",
                    code="target-mismatch",
                    hint="the adapters were made for different base models",
                )
        bs, as_, bound = [], [], 0.0
        for i, w, t in parts:
            a, b = _factors32(t, adapters[i].path)
            c = w * t.scale  # this input's whole multiplier, moved into its B block
            bs.append(b * c)
            as_.append(a)
            bound += abs(c) * float(b.norm()) * float(a.norm())
        B, A = torch.cat(bs, dim=1), torch.cat(as_, dim=0)
        jobs.append(_Job(name, B, A, 1.0, 1.0, bound))
        dtype = _widest_dtype(t.dtype for _, _, t in parts)
        info[name] = (first, B.shape[1], dtype, [i for i, _, _ in parts])
    solved = _solve(jobs, rule, device=device)

    report = LowRankReport("combine", rule)
    new: dict[str, Target] = {}
    for job in jobs:
        first, total_rank, dtype, inputs = info[job.name]
        r = solved[job.name]
        m, n = first.out_features, first.in_features
        method = "qr-core"
        A_out, B_out, k = r.A, r.B, r.k
        if rule is None and not r.zero and total_rank <= min(m, n):
            A_out, B_out, k, method = (
                job.A,
                job.B,
                total_rank,
                "concat",
            )  # exact as is: no SVD rounding
        dt = torch_dtype(dtype)
        new[job.name] = Target.from_factors(
            job.name, A_out.to(dt), B_out.to(dt), alpha=float(k), kind=first.kind
        )
        params_before = sum(adapters[i].targets[job.name].num_params for i in inputs)
        bytes_before = sum(
            adapters[i].targets[job.name].num_params
            * C.DTYPE_SIZES[adapters[i].targets[job.name].dtype]
            for i in inputs
        )
        report.targets.append(
            _report_row(
                job.name,
                r.sv,
                k,
                old_rank=total_rank,
                m=m,
                n=n,
                bytes_in=bytes_before,
                bytes_out=C.DTYPE_SIZES[dtype],
                params_before=params_before,
                zero=r.zero,
                method=method,
            )
        )
        if r.zero:
            report.warnings.append(
                f"target '{job.name}' sums to zero: kept at rank {k} with zero factors"
            )

    hub_ids = {(a.base.hub_id, a.base.revision) for a in adapters if a.base and a.base.hub_id}
    hub_id, revision = (None, None)
    if len(hub_ids) == 1:
        hub_id, revision = next(iter(hub_ids))
    elif len(hub_ids) > 1:
        report.warnings.append(
            "the inputs name different base models ("
            + ", ".join(sorted(f"{h}@{v}" if v else str(h) for h, v in hub_ids))
            + "); the result records none"
        )
    provenance = {
        "operations": [
            {
                "operation": "combine",
                "rule": None if rule is None else rule.to_json(),
                "inputs": [{**_source(a), "weight": w} for a, w in zip(adapters, ws, strict=True)],
            }
        ]
    }
    out = Adapter(targets=new, provenance=provenance)
    out.base = BaseBinding(out.computed_fingerprint(), hub_id, revision)
    return out, report


# ---------------------------------------------------------------------------------------------
# extract

_EMBEDDING_NAMES = ("wte", "wpe", "shared", "relative_attention_bias")
_OUTPUT_NAMES = ("lm_head", "embed_out")  # output projections: excluded by all-linear
_CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
_CONV1D_NAMES = ("c_attn", "c_proj", "c_fc", "q_attn")  # transformers' Conv1D layers there


def _is_embedding(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return last not in _OUTPUT_NAMES and ("embed" in last or last in _EMBEDDING_NAMES)


def _is_output(module: str) -> bool:
    return module.rsplit(".", 1)[-1] in _OUTPUT_NAMES


def _conv1d_model(ckpt: Checkpoint) -> bool:
    """Whether the checkpoint's config says its 2-D c_attn/c_proj/c_fc weights are Conv1D [in, out]."""
    config = ckpt.path / "config.json" if ckpt.is_dir else ckpt.path.parent / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    return model_type in _CONV1D_MODEL_TYPES


def _hub_of(ckpt: Checkpoint) -> tuple[str | None, str | None]:
    """Hub id and revision recorded beside a base checkpoint (``loratool_source.json``), if any."""
    folder = ckpt.path if ckpt.is_dir else ckpt.path.parent
    try:
        doc = json.loads((folder / "loratool_source.json").read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(doc, dict):
        return None, None
    hub, rev = doc.get("hub_id"), doc.get("revision")
    return (hub if isinstance(hub, str) else None), (rev if isinstance(rev, str) else None)


@dataclass
class _Module:
    name: str
    base_key: str
    ft_key: str
    kind: str
    in_features: int
    out_features: int


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def _select_modules(
    base: Checkpoint, ft: Checkpoint, targets: str | Sequence[str] | None, warnings: list[str]
) -> list[_Module]:
    """The modules to extract, in the base's storage order (so reads sweep each shard once)."""
    candidates = [
        key[: -len(".weight")]
        for key in base.entries
        if key.endswith(".weight") and len(base.shape(key)) == 2
    ]
    if targets is None:
        wanted = ["all-linear"]
    elif isinstance(targets, str):
        wanted = [s.strip() for s in targets.split(",") if s.strip()]
    else:
        wanted = [s.strip() for s in targets if s.strip()]
    if not wanted:
        raise UsageError(
            "--targets is empty", code="no-targets", hint="e.g. --targets q_proj,v_proj"
        )
    chosen: set[str] = set()
    for suffix in wanted:
        if suffix == "all-linear":
            chosen.update(m for m in candidates if not _is_embedding(m) and not _is_output(m))
            continue
        hits = [m for m in candidates if m == suffix or m.endswith("." + suffix)]
        if not hits:
            raise UsageError(
                f"--targets '{suffix}' matches no 2-D weight in the base",
                code="no-match",
                where=str(base.path),
                hint="give module-name suffixes such as q_proj,v_proj, or all-linear",
            )
        chosen.update(hits)
    conv1d = _conv1d_model(base)
    order = {shard: i for i, shard in enumerate(base.shards)}

    def storage(m: str) -> tuple[int, int]:
        e = base.entries[m + ".weight"]
        return order[e.shard], e.info.begin

    out: list[_Module] = []
    for m in sorted(chosen, key=storage):
        bkey = m + ".weight"
        if base.dtype(bkey) not in _FLOAT_DTYPES:
            warnings.append(f"'{bkey}' is {base.dtype(bkey)}, not a float weight: skipped")
            continue
        fkey = ft.resolve(m)
        if fkey is None:
            warnings.append(f"'{bkey}' is not in the fine-tuned checkpoint: skipped")
            continue
        if tuple(ft.shape(fkey)) != tuple(base.shape(bkey)):
            raise CompatibilityError(
                f"'{bkey}' is {list(base.shape(bkey))} in the base but "
                f"{list(ft.shape(fkey))} in the fine-tuned checkpoint",
                code="shape-mismatch",
                where=str(ft.path),
                hint="extract needs two checkpoints of the same architecture",
            )
        if ft.dtype(fkey) not in _FLOAT_DTYPES:
            warnings.append(f"'{fkey}' is {ft.dtype(fkey)}, not a float weight: skipped")
            continue
        d0, d1 = base.shape(bkey)
        if _is_embedding(m):
            kind, n_in, n_out = C.KIND_EMBEDDING, d0, d1  # [num_embeddings, dim]
        elif conv1d and m.rsplit(".", 1)[-1] in _CONV1D_NAMES:
            kind, n_in, n_out = C.KIND_CONV1D, d0, d1  # Conv1D stores [in, out]
        else:
            kind, n_in, n_out = C.KIND_LINEAR, d1, d0
        out.append(_Module(m, bkey, fkey, kind, n_in, n_out))
    return out


def resolve_device(device: str) -> str:
    """``auto`` → cuda when available, else cpu; ``cuda`` without a GPU is a usage error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(
                "--device cuda: no CUDA device is available", code="no-gpu", hint="use --device cpu"
            )
        return device
    raise UsageError(f"unknown device {device!r}", code="bad-device", hint="auto, cpu or cuda")


def _randomized_svd(
    D: torch.Tensor, width: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko et al. 2011 Alg. 4.4: an orthonormal basis Q of D's range from D·Ω, refined by
    ``POWER_ITERS`` power iterations (re-orthonormalised each half-step, so small σ survive fp32),
    then an exact SVD of the small Qᵀ·D. Costs O(mn·width·(2·iters + 2))."""
    import torch

    n = D.shape[1]
    omega = torch.randn(n, width, generator=generator, device=D.device, dtype=D.dtype)
    q = torch.linalg.qr(D @ omega).Q
    for _ in range(POWER_ITERS):
        q = torch.linalg.qr(D.mT @ q).Q
        q = torch.linalg.qr(D @ q).Q
    u, s, vh = torch.linalg.svd(q.mT @ D, full_matrices=False)
    return q @ u, s, vh


def _truncated_svd(
    D: torch.Tensor, rule: Rule, norm: float, method: str
) -> tuple[torch.Tensor, list[float], torch.Tensor, int, str, bool]:
    """(U, σ list, Vh, k, method used, complete) of D, chosen as the module docstring says."""
    import torch

    m, n = D.shape
    side = min(m, n)
    floor = 2.0 * math.sqrt(side) * EPS32 * norm

    def floored(s: torch.Tensor) -> list[float]:
        return [x if x > floor else 0.0 for x in s.to("cpu", torch.float64).tolist()]

    exact = method == "exact" or (
        method == "auto" and (side <= EXACT_MAX_SIDE or rule.name == "sv_cumulative")
    )
    if not exact:
        gen = torch.Generator(device=D.device).manual_seed(SEED)
        if rule.name == "rank":
            k0 = min(int(rule.value), side)
        else:
            k0 = min(rule.max_rank or DYNAMIC_START, side)
        while True:
            width = min(side, k0 + max(OVERSAMPLE, k0 // 4))
            if method == "auto" and 4 * width > side:
                exact = True  # sampling this wide saves nothing over the exact SVD
                break
            u, s, vh = _randomized_svd(D, width, gen)
            sv = floored(s)
            complete = width == side  # Q spans all of D's range: these are all the σ
            k = rule.select(sv, cap=side, total_sq=norm * norm, complete=complete)
            if k is not None:
                return u, sv, vh, k, "randomized", complete
            k0 = min(2 * k0, side)
    u, s, vh = torch.linalg.svd(D, full_matrices=False)
    sv = floored(s)
    k = rule.select(sv, cap=side)
    assert k is not None
    return u, sv, vh, k, "exact-svd", True


def extract(
    base: str | os.PathLike[str] | Checkpoint,
    finetuned: str | os.PathLike[str] | Checkpoint,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    sv_cumulative: float | None = None,
    sv_fro: float | None = None,
    max_rank: int | None = None,
    min_rank: int | None = None,
    targets: str | Sequence[str] | None = None,
    device: str = "auto",
    dtype: str = "F32",
    method: str = "auto",
    hub_id: str | None = None,
    revision: str | None = None,
    progress: Progress | None = None,
) -> tuple[Adapter, LowRankReport]:
    """A LoRA whose ΔW per module is the truncated SVD of ``finetuned − base``.

    ``targets``: comma-separated module-name suffixes, or ``"all-linear"`` (the default: every
    2-D weight except embeddings and the output head ``lm_head``/``embed_out``). Modules are read
    one at a time (two tensors and their fp32 difference in memory). Unchanged modules are
    skipped. ``method``: ``auto`` (module docstring), ``exact`` or ``randomized``. The adapter is
    bound to ``base`` (``Checkpoint.fingerprint_for``), with ``hub_id``/``revision`` or those
    recorded in the base folder's ``loratool_source.json``.
    """
    import torch

    from .checkpoint import ALL_DTYPES, Checkpoint
    from .format import dtype_name, torch_dtype

    rule = make_rule(
        rank=rank,
        energy=energy,
        sv_ratio=sv_ratio,
        sv_cumulative=sv_cumulative,
        sv_fro=sv_fro,
        max_rank=max_rank,
        min_rank=min_rank,
    )
    assert rule is not None
    if method not in ("auto", "exact", "randomized"):
        raise UsageError(
            f"unknown SVD method {method!r}", code="bad-method", hint="auto, exact or randomized"
        )
    if method == "randomized" and rule.name == "sv_cumulative":
        raise UsageError(
            "--sv-cumulative needs every singular value (Σσ), which a randomized SVD does not give",
            code="rule-conflict",
            hint="use the exact SVD, or --energy/--sv-fro which measure against ‖D‖_F",
        )
    out_name = {"f32": "F32", "f16": "F16", "bf16": "BF16"}.get(dtype.lower(), dtype)
    if out_name not in C.DTYPE_SIZES:
        raise UsageError(f"unknown dtype {dtype!r}", code="bad-dtype", hint="f32, f16 or bf16")
    out_dtype = torch_dtype(out_name)
    dev = resolve_device(device)
    bc = base if isinstance(base, Checkpoint) else Checkpoint(base)
    fc = finetuned if isinstance(finetuned, Checkpoint) else Checkpoint(finetuned)

    report = LowRankReport("extract", rule)
    modules = _select_modules(bc, fc, targets, report.warnings)
    new: dict[str, Target] = {}
    for done, mod in enumerate(modules, 1):
        D = fc.read(mod.ft_key).to(dev, torch.float32)
        D.sub_(bc.read(mod.base_key).to(dev, torch.float32))
        if mod.kind != C.KIND_LINEAR:
            D = D.mT  # ΔW is [out, in]; Conv1D and Embedding weights are stored transposed
        if not bool(torch.isfinite(D).all()):
            raise FormatError(
                f"'{mod.ft_key}' minus the base has NaN or Inf values",
                code="non-finite",
                where=str(fc.path),
            )
        norm = float(torch.linalg.vector_norm(D))
        if norm == 0.0:
            report.skipped.append({"name": mod.name, "reason": "unchanged"})
        else:
            u, sv, vh, k, used, complete = _truncated_svd(D, rule, norm, method)
            root = torch.tensor(sv[:k], dtype=torch.float64).sqrt().to(dev, torch.float32)
            B = (u[:, :k] * root).to("cpu", out_dtype).contiguous()
            A = (root[:, None] * vh[:k]).to("cpu", out_dtype).contiguous()
            new[mod.name] = Target.from_factors(mod.name, A, B, alpha=float(k), kind=mod.kind)
            residual_sq = None
            if not complete:  # measure ‖D − D_k‖ itself: the σ beyond the sample are unknown
                D.sub_((u[:, :k] * torch.tensor(sv[:k], device=dev)) @ vh[:k])
                residual_sq = float(torch.linalg.vector_norm(D)) ** 2
            m, n = D.shape
            report.targets.append(
                _report_row(
                    mod.name,
                    sv,
                    k,
                    old_rank=min(m, n),
                    m=m,
                    n=n,
                    bytes_in=m * n * ALL_DTYPES[fc.dtype(mod.ft_key)],
                    bytes_out=C.DTYPE_SIZES[dtype_name(out_dtype)],
                    params_before=m * n,
                    zero=False,
                    method=used,
                    total_sq=norm * norm,
                    complete=complete,
                    residual_sq=residual_sq,
                )
            )
        del D
        if progress is not None:
            progress(done, len(modules), mod.name)
    if not new:
        raise UsageError(
            "the checkpoints do not differ in any selected module",
            code="no-difference",
            hint="check that FINETUNED is the fine-tuned model and --targets names changed modules",
        )
    if hub_id is None and revision is None:
        hub_id, revision = _hub_of(bc)
    provenance = {
        "operations": [
            {
                "operation": "extract",
                "rule": rule.to_json(),
                "base": {"path": bc.path.name, "hub_id": hub_id, "revision": revision},
                "finetuned": {"path": fc.path.name},
                "methods": sorted({t.method for t in report.targets}),
            }
        ]
    }
    adapter = Adapter(targets=new, provenance=provenance)
    adapter.base = BaseBinding(bc.fingerprint_for(adapter), hub_id, revision)
    return adapter, report


__all__ = [
    "LowRankReport",
    "Rule",
    "Spectrum",
    "TargetReport",
    "combine",
    "extract",
    "factor_svd",
    "make_rule",
    "reduce_rank",
    "spectrum",
]
