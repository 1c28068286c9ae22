"""One planned weight at a time: apply its delta, check, correct, report; the state-dict loop."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import FormatError
from ..stream import byte_view
from .delta import apply_delta, as2d, check_finite, delta_factors, int_view, target_report
from .dense import compute_dense, needs_dense
from .inputs import MemoryCheckpoint
from .plan import Job
from .report import Progress, TargetReport
from .sidecar import Spool

if TYPE_CHECKING:
    import torch


@dataclass
class Context:
    """Everything the streaming loop needs besides the jobs."""

    device: str
    precise: bool  # the product of the factors in fp64 (device-independent) rather than fp32
    names: dict[str, list[str]]  # base key -> adapter module names
    roundtrip: bool  # merge: measure what unmerge would restore
    collect: bool  # merge, reversible: keep the missed elements
    hash_in: bool  # merge, reversible: SHA-256 of the original weights
    hash_out: bool  # unmerge, reversible: SHA-256 of the restored weights
    corrections: Callable[[str], tuple[torch.Tensor, torch.Tensor] | None]
    progress: Progress | None
    where: str


@dataclass
class Outcome:
    reports: dict[str, TargetReport] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    sidecar_parts: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    spool: Spool | None = None


def compute_job(
    job: Job, W: torch.Tensor, out: torch.Tensor, ctx: Context, outcome: Outcome
) -> None:
    """Apply one job's delta (W and out already on the compute device) and record its report."""
    import torch

    if needs_dense(job):  # spec 1.1 features and whole tensors (dense.py)
        res = compute_dense(job, W, out, ctx, outcome)
    else:
        left, right = delta_factors(job, ctx.device, torch.float64 if ctx.precise else torch.float32)
        res = apply_delta(
            as2d(W), left, right, as2d(out), roundtrip=ctx.roundtrip, collect=ctx.collect
        )
    check_finite(job, W, out, res, ctx.where)
    rep = target_report(job, res, ctx.names)
    fix = ctx.corrections(job.key)
    if fix is not None:
        idx, val = fix
        n = out.numel()
        if (
            idx.dim() != 1
            or idx.shape != val.shape
            or val.dtype != out.dtype
            or idx.is_floating_point()
            or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n))
        ):
            raise FormatError(
                f"the sidecar's corrections for '{job.key}' do not fit it",
                code="bad-sidecar",
                where=ctx.where,
            )
        ints = int_view(out.dtype)
        flat = out.view(-1).view(ints)
        flat[idx.to(out.device, dtype=torch.int64)] = val.to(out.device).view(ints)
        rep.corrections = int(idx.numel())
    outcome.reports[job.key] = rep
    if res.index is not None and res.value is not None:
        if outcome.spool is not None:
            outcome.spool.add(job.key, res.index, res.value)
        else:
            outcome.sidecar_parts.append((job.key, res.index, res.value))


def sha256_of(t: torch.Tensor) -> str:

    t = t.detach().cpu().contiguous().reshape(-1)
    h = hashlib.sha256()
    if t.numel():
        h.update(byte_view(t))
    return h.hexdigest()


def memory_loop(
    ckpt: MemoryCheckpoint, jobs: dict[str, Job], ctx: Context, outcome: Outcome
) -> dict[str, torch.Tensor]:
    from ..checkpoint import torch_dtype_of

    result: dict[str, torch.Tensor] = {}
    for name, job in jobs.items():
        W = ckpt.state[name]
        if not job.targeted:
            result[name] = (
                W if job.out_dtype == job.in_dtype else W.to(torch_dtype_of(job.out_dtype))
            )
            continue
        if ctx.hash_in:
            outcome.hashes[name] = sha256_of(W)
        Wd = W.detach().to(ctx.device).contiguous()
        out = _empty(job.shape, job.out_dtype, ctx.device)
        compute_job(job, Wd, out, ctx, outcome)
        if ctx.hash_out:
            outcome.hashes[name] = sha256_of(out)
        result[name] = out.to(W.device)
    return result


def _empty(shape: tuple[int, ...], dtype: str, device: str) -> torch.Tensor:
    import torch

    from ..checkpoint import torch_dtype_of

    return torch.empty(shape, dtype=torch_dtype_of(dtype), device=device)
