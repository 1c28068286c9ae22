"""Merge a low-rank update into a weight in place, and take it out again bit for bit.

``merge_inplace(W, L, R)`` makes ``W ← round(W + L@R)`` and returns the ``Corrections`` that
``unmerge_inplace`` needs to give back W's exact bits: the elements where ``round(W' − L@R)``
is not W (rounding destroyed information there: where ΔW is large next to W, up to ~1% of a
weight for random r=16 adapters on SmolLM2 in fp32), as (flat index, W's original bits). Both directions cost about one pass over W:

* ΔW = L@R is formed in fp32 (fp64 for an fp64 weight) from factors the caller caches in fp32 on
  W's device, block of rows by block of rows (on the CPU the temporaries stay in cache; on a GPU
  one block), and never stored: unmerge forms the same product again. That is the same fp32
  ``mm`` on the same factors, the same block shapes and the same scratch buffers, which BLAS
  (MKL, OpenBLAS, cuBLAS) computes bit-identically within a process; a checksum of W's bits
  (the sum of their integer view) is kept anyway and checked after the unmerge, so a product
  that ever did differ raises instead of leaving a silently different base.
* ``W' = round(W + ΔW)``: ΔW added in fp32 to the exact upcast of W, rounded once to W's dtype
  (as PEFT and ``loratool merge`` do). The check ``round(W' − ΔW) == W`` compares bits through
  an integer view, so −0/+0 and NaN payloads count too.
* Unmerge: ``W ← round(W' − ΔW)``, the very operations the check ran, then the corrections are
  scattered back. A non-finite W' is always a miss (W was finite), so finiteness is checked on
  the misses only.

``loratool.merging.apply_delta`` does the on-disk equivalent with fp64 factors and fidelity sums
(a sidecar must match an unmerge on any device or BLAS); in memory, in one process, the fp32
product suffices and is several times cheaper.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import CompatibilityError

if TYPE_CHECKING:
    import torch

_BLOCK = 1 << 18  # elements per block of rows on the CPU: 1 MiB of fp32 per temporary


@dataclass
class Corrections:
    """What ``unmerge_inplace`` writes back: W's original bits where the round trip misses."""

    index: list[torch.Tensor]  # per block of rows: flat indices into W (int32 if W allows)
    bits: list[torch.Tensor]  # per block: W's original bits there, as W's integer view
    checksum: int  # Σ of W's bits as integers (int64, wrapping): checked after the unmerge

    @property
    def size(self) -> int:
        return sum(int(i.numel()) for i in self.index)


class RestoreError(RuntimeError):
    """The base weight did not come back bit for bit: a bug (a product that differed), not input."""


def int_view(dtype: torch.dtype) -> torch.dtype:
    import torch

    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


_local = threading.local()


def _buf(slot: str, shape: tuple[int, int], dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    """A reusable scratch tensor: the same memory for every block (no page faults, and the
    product is written to the same addresses in both directions)."""
    import torch

    if dev.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=dev)
    cache: dict[str, torch.Tensor] | None = getattr(_local, "scratch", None)
    if cache is None:
        cache = _local.scratch = {}
    n = shape[0] * shape[1] * dtype.itemsize
    if slot not in cache or cache[slot].numel() < n:
        cache[slot] = torch.empty(max(n, _BLOCK * 8), dtype=torch.uint8)
    return cache[slot][:n].view(dtype).view(shape)


def _plan(W: torch.Tensor) -> tuple[int, int, int, torch.dtype]:
    import torch

    if W.dim() != 2:
        raise CompatibilityError(
            f"in-place merge wants a 2-D weight, got shape {tuple(W.shape)}",
            code="unsupported-kind",
            hint="use the adapter unmerged",
        )
    if not W.is_contiguous():
        raise CompatibilityError(
            "in-place merge wants a contiguous weight",
            code="unsupported-kind",
            hint="use the adapter unmerged",
        )
    rows, cols = W.shape
    step = rows if W.device.type != "cpu" else max(1, min(rows, _BLOCK // max(cols, 1)))
    cdt = torch.float64 if W.dtype == torch.float64 else torch.float32
    return rows, cols, max(step, 1), cdt


def _checksum(bits: torch.Tensor) -> torch.Tensor:
    """Σ of a block's bits, wrapping: read as int64 words where the block allows (no upcast copy,
    a third of a switch otherwise); the same blocks, so the same choice, in both directions."""
    import torch

    bits = bits.reshape(-1)  # a contiguous block: a view
    if (
        bits.numel() * bits.element_size() % 8 == 0
        and bits.storage_offset() * bits.element_size() % 8 == 0
    ):
        return bits.view(torch.int64).sum()
    return bits.sum(dtype=torch.int64)


def _where_differ(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Flat indices (int64) where two integer views differ: numpy's flatnonzero on the CPU (60×
    faster than ``Tensor.nonzero`` there, single-threaded), ``nonzero`` on a GPU."""
    import torch

    mask = torch.ne(got, want, out=_buf("mask", (1, got.numel()), torch.bool, got.device)[0])
    if mask.device.type == "cpu":
        import numpy as np

        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.nonzero().squeeze(1)


@contextlib.contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread on the CPU, in both directions.

    Why: the blocks are small, and OpenMP regions over small blocks collapse when a shared
    machine is oversubscribed (measured here, 2 cores at load 10: one SmolLM2 switch 20 s with
    2 threads; see benchmarks/serve.py for the figure with one). And the product is then formed
    by the same single-threaded kernel both ways, whatever the caller's thread setting.
    """
    import torch

    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def merge_inplace(
    W: torch.Tensor, left: torch.Tensor, right: torch.Tensor, *, where: str
) -> Corrections:
    """``W ← round(W + left @ right)`` in place; the corrections that undo it exactly.

    ``left`` [rows, r] and ``right`` [r, cols] are fp32 (or fp64) on W's device. A non-finite
    result raises ``CompatibilityError`` with W unchanged.
    """
    with one_thread(W.device):
        return _merge(W, left, right, where)


def _merge(W: torch.Tensor, left: torch.Tensor, right: torch.Tensor, where: str) -> Corrections:
    import torch

    rows, cols, step, cdt = _plan(W)
    dev, ints = W.device, int_view(W.dtype)
    idx_dtype = torch.int32 if W.numel() < 2**31 else torch.int64
    idx_parts: list[torch.Tensor] = []
    bit_parts: list[torch.Tensor] = []
    total = torch.zeros((), dtype=torch.int64, device=dev)
    for i in range(0, rows, step):
        k = min(step, rows - i)
        wb = W[i : i + k]
        d = _delta(left, right, i, k, cdt)
        new = _buf("new", (k, cols), W.dtype, dev)
        back = _buf("back", (k, cols), W.dtype, dev)
        if W.dtype == cdt:
            torch.add(wb, d, out=new)  # the one rounding of W + ΔW
            torch.sub(new, d, out=back)  # what unmerge will compute
        else:
            r = _buf("r", (k, cols), cdt, dev)
            r.copy_(wb)  # exact upcast
            r.add_(d)
            new.copy_(r)  # the one rounding to W's dtype
            r.copy_(new)
            r.sub_(d)
            back.copy_(r)  # unmerge's rounding
        wbits = wb.view(ints).view(-1)
        total += _checksum(wbits)
        miss = _where_differ(back.view(ints).view(-1), wbits)
        if miss.numel():
            bad = ~torch.isfinite(new.view(-1)[miss]) & torch.isfinite(wb.reshape(-1)[miss])
            if bool(bad.any()):
                _restore(W, left, right, idx_parts, bit_parts, cdt, rows=i)
                raise CompatibilityError(
                    f"merging into '{where}' gives NaN or Inf",
                    code="non-finite-result",
                    hint="use the adapter unmerged, or a wider dtype",
                )
        idx_parts.append((miss + i * cols).to(idx_dtype))  # one part per block, maybe empty
        bit_parts.append(wbits[miss])  # W's bits there, before the block is overwritten
        wb.copy_(new)
    return Corrections(idx_parts, bit_parts, int(total))


def unmerge_inplace(
    W: torch.Tensor, left: torch.Tensor, right: torch.Tensor, fix: Corrections, *, where: str
) -> None:
    """``W ← round(W − left @ right)``, then W's original bits at the misses: the base again."""
    rows, _, _, cdt = _plan(W)
    with one_thread(W.device):
        total = _restore(
            W,
            left,
            right,
            fix.index,
            fix.bits,
            cdt,
            rows=rows,
        )
    if total != fix.checksum:
        raise RestoreError(
            f"'{where}' did not come back bit for bit after unmerging (its checksum differs): "
            "the fp32 product differed between calls; reload the base model"
        )


def _delta(
    left: torch.Tensor, right: torch.Tensor, i: int, k: int, cdt: torch.dtype
) -> torch.Tensor:
    """ΔW for rows i..i+k, always into the same scratch: the same bits in both directions."""
    import torch

    cols = right.shape[1]
    d = torch.mm(left[i : i + k], right, out=_buf("d", (k, cols), left.dtype, left.device))
    if d.dtype != cdt:  # an fp64 weight with fp32 factors: exact upcast
        d = _buf("d64", (k, cols), cdt, left.device).copy_(d)
    return d


def _restore(
    W: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    idx_parts: list[torch.Tensor],
    bit_parts: list[torch.Tensor],
    cdt: torch.dtype,
    *,
    rows: int,
) -> int:
    """Unmerge the first ``rows`` rows block by block; the checksum of what came back."""
    import torch

    cols = W.shape[1]
    _, _, step, _ = _plan(W)
    ints = int_view(W.dtype)
    flat = W.view(ints).view(-1)
    total = torch.zeros((), dtype=torch.int64, device=W.device)
    blocks = zip(range(0, rows, step), idx_parts, bit_parts, strict=True)
    for i, index, bits in blocks:
        k = min(step, rows - i)
        wb = W[i : i + k]
        d = _delta(left, right, i, k, cdt)
        if W.dtype == cdt:
            wb.sub_(d)
        else:
            r = _buf("r", (k, cols), cdt, W.device)
            r.copy_(wb)
            r.sub_(d)
            wb.copy_(r)
        if index.numel():
            flat[index.long()] = bits
        total += _checksum(wb.view(ints))
    return int(total)
