"""Exact low-rank algebra on adapter factors: the QR-core SVD and the spectra built on it.

For ΔW = s·B·A with B ``[m, r]`` and A ``[r, n]``: thin QR of B and of Aᵀ, then an SVD of the
r×r core R_b·R_aᵀ. ΔW = (Q_b U)·diag(s·S)·(Q_a V)ᵀ exactly, at O((m+n)r² + r³) instead of the
O(mn·min(m, n)) of a dense SVD of the product, which this module never forms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .adapter import Target


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
