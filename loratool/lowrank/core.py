"""The QR core: exact SVDs of s·B·A from the factors, batched for the operations; spectra.

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

**Numerical zeros.** σ ≤ 2·√R·ε·Σ_j ‖c_j B_j‖_F‖A_j‖_F (ε = 2⁻²³, c_j the coefficient of block j) —
below the rounding error of the computation itself — are set to 0. A target whose σ are all zero
(B all zeros right after initialisation, alpha 0, or X − X) is a *zero target*: it is kept, with both
factors exactly zero, at rank K under ``rank=K`` and at max(1, min_rank) under the other rules; the
report marks it and warns. Nothing divides by zero and nothing writes NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..adapter import Target
from ..errors import FormatError
from .rules import Rule

if TYPE_CHECKING:
    import torch

EPS32 = 2.0**-23  # fp32 unit roundoff (the compute precision)
BATCH_BYTES = 256 << 20  # cap on the stacked factors of one batch


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

    from .shapes import dense_factors, matrix_factors

    if target.lowrank:
        a, b = matrix_factors(target)  # conv kernels flattened
        _, s, _ = factor_svd(b, a, target.scale, dtype=torch.float64)
    else:  # LoHa/LoKr: the SVD of their dense ΔW
        a, b = dense_factors(target)
        _, s, _ = factor_svd(b, a, 1.0, dtype=torch.float64)
    return Spectrum([float(x) for x in s])


# ---------------------------------------------------------------------------------------------
# The batched QR core


@dataclass
class CoreJob:
    """One ΔW = scale · B @ A to factor, with B's column blocks already multiplied by their weights."""

    name: str
    B: torch.Tensor  # [m, R] fp32
    A: torch.Tensor  # [R, n] fp32
    scale: float  # applied to the r×r core (one rounding instead of m·R)
    out_scale: float  # the scale the new factors are written for (reduce: the old one; else 1)
    bound: float  # Σ_j |scale·c_j|·‖B_j‖_F‖A_j‖_F ≥ ‖ΔW‖_F: sets the numerical-zero floor


@dataclass
class Solved:
    sv: list[float]  # every singular value of ΔW, descending, numerical zeros set to 0
    k: int
    B: torch.Tensor  # [m, k] fp32: out_scale · B @ A is the rank-k truncation of ΔW
    A: torch.Tensor  # [k, n] fp32
    zero: bool


def solve(jobs: Sequence[CoreJob], rule: Rule | None, *, device: str) -> dict[str, Solved]:
    """Top-k SVD factors of every job, same-shaped jobs stacked into one batched QR core.

    ``rule=None`` keeps everything up to min(m, n, R) (exact: ΔW has no more rank than that).
    """
    import torch

    groups: dict[tuple[int, int, int], list[CoreJob]] = {}
    for j in jobs:
        groups.setdefault((j.B.shape[0], j.A.shape[1], j.B.shape[1]), []).append(j)
    out: dict[str, Solved] = {}
    for (m, n, R), group in groups.items():
        per_job = 3 * 4 * (m + n) * R  # inputs, Householder copies, the kept columns
        step = max(1, BATCH_BYTES // per_job)
        for start in range(0, len(group), step):
            out.update(_solve_batch(group[start : start + step], rule, m, n, R, device, torch))
    return out


def _solve_batch(
    jobs: Sequence[CoreJob], rule: Rule | None, m: int, n: int, R: int, device: str, torch: Any
) -> dict[str, Solved]:
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
        j.name: Solved(
            sv=sv,
            k=k,
            B=new_b[i, :, :k].contiguous(),
            A=new_a[i, :k, :].contiguous(),
            zero=zero,
        )
        for i, (j, sv, k, zero) in enumerate(zip(jobs, svs, ks, zeros, strict=True))
    }


def factors32(t: Target, where: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A target's (A, B) in fp32, refusing non-finite values and shapes that disagree."""
    import torch

    from .shapes import fan_in, matrix_factors

    a, b = matrix_factors(t)  # a Conv2d LoRA's kernel flattened: A [r, in·kh·kw]
    if tuple(a.shape) != (t.rank, fan_in(t)) or tuple(b.shape) != (t.out_features, t.rank):
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
