"""One planned weight at a time: apply its delta, check, correct, report; the state-dict loop."""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import FormatError
from ..stream import byte_view
from .delta import (
    DeltaBlocks,
    DeltaResult,
    apply_delta,
    as2d,
    check_finite,
    delta_factors,
    target_report,
)
from .dense import compute_dense, needs_dense
from .inputs import MemoryCheckpoint
from .plan import Job
from .report import Progress, TargetReport
from .sidecar import Spool
from .ulp import int_view

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
        left, right = delta_factors(
            job, ctx.device, torch.float64 if ctx.precise else torch.float32
        )
        res = apply_delta(
            as2d(W), left, right, as2d(out), roundtrip=ctx.roundtrip, collect=ctx.collect
        )
    check_finite(job, W, out, res, ctx.where)
    record(job, res, out, ctx, outcome)


def record(
    job: Job, res: DeltaResult, out: torch.Tensor | None, ctx: Context, outcome: Outcome
) -> None:
    """File one finished job's report (and its sidecar part), after applying the sidecar's
    corrections to ``out``: ``None`` for a weight already streamed out block by block, which
    the pipeline does only where there are none (merges, and unmerges without a sidecar)."""
    import torch

    rep = target_report(job, res, ctx.names)
    fix = ctx.corrections(job.key)
    if fix is not None:
        if out is None:
            raise RuntimeError(f"'{job.key}': corrections for a weight streamed in blocks")
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


def compute_in_blocks(
    job: Job,
    read: Callable[[memoryview, int], None],
    write: Callable[[int, torch.Tensor | memoryview], None],
    reread: Callable[[], tuple[torch.Tensor, bytes]],
    ctx: Context,
    outcome: Outcome,
) -> None:
    """A CPU low-rank job one block of rows at a time: ``read(bytes, offset)`` fills a block
    from the base weight, ``write(offset, block)`` stores its result (offsets in bytes into the
    tensor), ``reread()`` gives the whole base weight and result bytes, only to tell a NaN/Inf in
    the base from an overflow. No sidecar corrections here (``record``).

    A block (a few hundred KB) is still in this core's cache when it is written out, so the
    weight's bytes cross memory once in and once out, as in a copy, and memory holds a few
    blocks, not the weight: a 7B model merges in the memory of a small one. The blocks are
    ``apply_delta``'s, so the bits and the sums are the same. Reading and writing several
    blocks per call was measured slower (1 MB: 3.5× the write's system CPU, out of cache).
    """
    import torch

    from ..checkpoint import torch_dtype_of

    left, right = delta_factors(job, "cpu", torch.float64 if ctx.precise else torch.float32)
    rows = job.shape[0] if len(job.shape) > 1 else 1
    cols = math.prod(job.shape) // max(rows, 1)
    in_dt, out_dt = torch_dtype_of(job.in_dtype), torch_dtype_of(job.out_dtype)
    cpu = torch.device("cpu")
    blocks = DeltaBlocks(
        left, right, in_dt, out_dt, cpu, roundtrip=ctx.roundtrip, collect=ctx.collect
    )
    wbuf = _block_buffer("in", blocks.step * cols, in_dt)
    obuf = wbuf if in_dt == out_dt else _block_buffer("out", blocks.step * cols, out_dt)
    digest = hashlib.sha256() if ctx.hash_in else None
    if blocks.raw and wbuf is obuf:  # the fused pass, in place, on byte slices
        raw = byte_view(wbuf)  # sliced per block: no tensor views
        size = in_dt.itemsize
        for i in range(0, rows, blocks.step):
            k = min(blocks.step, rows - i)
            view = raw[: k * cols * size]
            read(view, i * cols * size)
            if digest is not None:
                digest.update(view)
            blocks.add_bytes(i, k, view, view)
            write(i * cols * size, view)
        _finish_blocks(job, blocks.result(), digest, reread, out_dt, ctx, outcome)
        return
    for i in range(0, rows, blocks.step):
        k = min(blocks.step, rows - i)
        wb, ob = wbuf[: k * cols].view(k, cols), obuf[: k * cols].view(k, cols)
        read(byte_view(wb), i * cols * in_dt.itemsize)
        if digest is not None:
            digest.update(byte_view(wb))
        blocks.add(i, wb, ob)  # in place when the dtype stays
        write(i * cols * out_dt.itemsize, ob)
    _finish_blocks(job, blocks.result(), digest, reread, out_dt, ctx, outcome)


def _finish_blocks(
    job: Job,
    res: DeltaResult,
    digest: Any,
    reread: Callable[[], tuple[torch.Tensor, bytes]],
    out_dt: torch.dtype,
    ctx: Context,
    outcome: Outcome,
) -> None:
    """A blockwise job's end: its input digest, the non-finite check, its report."""
    import torch

    if digest is not None:
        outcome.hashes[job.key] = digest.hexdigest()
    if not all(math.isfinite(x) for x in res.sums):
        W, data = reread()
        out = torch.frombuffer(bytearray(data), dtype=out_dt).view(job.shape)
        check_finite(job, W, out, res, ctx.where)
    record(job, res, None, ctx, outcome)


_local = threading.local()  # per thread: its block buffers (_block_buffer)


def _block_buffer(slot: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's reusable buffer of ``n`` elements (no allocation, no page faults, per job)."""
    import torch

    bufs: dict[str, torch.Tensor] | None = getattr(_local, "blocks", None)
    if bufs is None:
        bufs = _local.blocks = {}
    nbytes = n * dtype.itemsize
    if slot not in bufs or bufs[slot].numel() < nbytes:
        bufs[slot] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
    return bufs[slot][:nbytes].view(dtype)


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
        W = ckpt.state[job.read_key]
        if not job.targeted:
            result[name] = (
                W if job.out_dtype == job.in_dtype else W.to(torch_dtype_of(job.out_dtype))
            )
            continue
        if ctx.hash_in:
            outcome.hashes[name] = sha256_of(W)
        Wd = W.detach().to(ctx.device).contiguous()
        out = _empty(job.out_shape, job.out_dtype, ctx.device)
        compute_job(job, Wd, out, ctx, outcome)
        if ctx.hash_out:
            outcome.hashes[name] = sha256_of(out)
        result[name] = out.to(W.device)
    return result


def _empty(shape: tuple[int, ...], dtype: str, device: str) -> torch.Tensor:
    import torch

    from ..checkpoint import torch_dtype_of

    return torch.empty(shape, dtype=torch_dtype_of(dtype), device=device)
