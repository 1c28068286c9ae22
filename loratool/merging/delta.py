"""ΔW arithmetic for every device: the factors, the once-rounded add, fidelity, round-trip misses.

Numerics (``apply_delta``, one function for the CPU and CUDA):
  * ΔW = Σ wᵢ·scaleᵢ·Bᵢ·Aᵢ is one matrix product of the stacked factors (an exact sum of the
    adapters), in fp32 (the BLAS's, or on an AVX2 CPU the fused pass's: summed over k in
    order, ``sequential_product`` — its last bit is not the BLAS's) — or in fp64 rounded once
    to fp32, which gives the correctly rounded ΔW whatever the BLAS, device or thread count:
    used on CUDA (no TF32 either) and for reversible merges, whose sidecar must match what a
    later unmerge on any device computes;
  * ΔW is added in fp32 to the exact fp32 upcast of W and the sum is rounded once to the output
    dtype (fp64 throughout when the weight or the output is fp64), as PEFT does;
  * ``kind`` linear adds ΔW; conv1d (GPT-2 ``Conv1D``, stored [in, out]) and embedding add ΔWᵀ.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import kinds
from ..errors import CompatibilityError, FormatError
from ..native import compiled
from ..stream import byte_view
from .plan import Job
from .report import TargetReport
from .ulp import misses

if TYPE_CHECKING:
    import torch


_BLOCK = 1 << 17  # elements per block of rows on the CPU: the fp32 temporaries stay in L2
# With the product fused into the pass there are no block-sized temporaries (their buffers are
# never touched, so never resident), and fewer, larger blocks cost less: a 0.85B merge's CPU
# measured 3.2 s here against 3.45 s at 1 << 17 (and 4.2 s at 1 << 16, 4.0 s at 1 << 20).
_FUSED_BLOCK = 1 << 18


def delta_factors(job: Job, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """L ``[rows, Σr]`` and R ``[Σr, cols]`` with ``L @ R`` the update of the stored weight.

    The target's kind says how (``Kind.stored_factors``): for Linear rows = out, so L = w·s·B,
    R = A; Conv1D and embedding store ``[in, out]``: L = w·s·Aᵀ, R = Bᵀ. Stacking the adapters' factors makes one product the exact sum of their deltas. The
    factors are upcast exactly and scaled in fp64, then given in ``dtype`` (fp64 or fp32).
    """
    import torch

    left, right = [], []
    for t, weight in job.terms:
        fresh = t.replace()  # loads this target's factors only; they are dropped after the job
        a = fresh.lora_A.detach().to(device=device, dtype=torch.float64)
        b = fresh.lora_B.detach().to(device=device, dtype=torch.float64)
        lhs, rhs = kinds.get(t.kind).stored_factors(a, b, weight * t.scale)
        left.append(lhs)
        right.append(rhs)
    return (
        torch.cat(left, 1).to(dtype).contiguous(),
        torch.cat(right, 0).to(dtype).contiguous(),
    )


@dataclass
class DeltaResult:
    sums: list[float]  # ‖ΔW‖² (exact, from the factors), ‖W'−W‖², ‖W'−W−ΔW‖²
    off: int = 0
    max_ulp: int = 0
    index: torch.Tensor | None = None  # flat indices where the round trip misses (CPU)
    value: torch.Tensor | None = None  # the original values there (CPU, base dtype)


def apply_delta(
    W: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    out: torch.Tensor,
    *,
    roundtrip: bool = False,
    collect: bool = False,
) -> DeltaResult:
    """``out ← round(W + left @ right)`` on W's device, with the fidelity sums.

    ``left @ right`` is formed in the factors' dtype (fp64 products are rounded once to fp32),
    added in fp32 (fp64 when W or out is fp64) to the exactly upcast W, and the sum is rounded
    once into ``out``'s dtype. On the CPU this runs over blocks of rows small enough for the
    temporaries to stay in cache; on a GPU in one block. With ``roundtrip`` it also computes
    ``round_W(out − left @ right)`` — the very operations unmerge performs — and counts
    (``collect``: gathers) the elements where that differs from W's bits.
    """
    rows = W.shape[0]
    blocks = DeltaBlocks(
        left, right, W.dtype, out.dtype, W.device, roundtrip=roundtrip, collect=collect
    )
    for i in range(0, rows, blocks.step):
        k = min(blocks.step, rows - i)
        blocks.add(i, W[i : i + k], out[i : i + k])
    return blocks.result()


class DeltaBlocks:
    """``apply_delta`` one block of rows at a time, in any order, with the sums kept across.

    The streaming pipeline reads, merges and writes a weight block by block through this, so a
    weight never has to be in memory whole; ``step`` (rows per block) is the same as
    ``apply_delta``'s, so both give the same bits and the same sums.
    """

    def __init__(
        self,
        left: torch.Tensor,
        right: torch.Tensor,
        w_dtype: torch.dtype,
        out_dtype: torch.dtype,
        device: torch.device,
        *,
        roundtrip: bool = False,
        collect: bool = False,
        sequential: bool = False,
    ) -> None:
        import torch

        rows, cols = left.shape[0], right.shape[1]
        self.left, self.right, self.cols, self.device = left, right, cols, device
        self.cdt = torch.float64 if torch.float64 in (w_dtype, out_dtype) else torch.float32
        # the fused C pass (kernel.c) where it is built and fits: one pass instead of ~13 calls
        self.kernel = _kernel(device, w_dtype, out_dtype)
        # the product made in the pass too (kernel.fuses_product: v3), for fp32 factors
        self.lowrank = (
            self.kernel is not None
            and getattr(self.kernel, "fuses_product", False)
            and left.dtype == torch.float32
            and not collect
        )
        block = _FUSED_BLOCK if self.lowrank else _BLOCK
        step = rows if device.type != "cpu" else max(1, block // max(cols, 1))
        self.step = max(1, min(step, rows))
        self._scratch = _scratch(device) if device.type == "cpu" else None
        self.prod = self._buf("prod", left.dtype)
        self.d = self.prod if left.dtype == self.cdt else self._buf("d", self.cdt)
        self.w, self.r = self._buf("w", self.cdt), self._buf("r", self.cdt)
        self.r2 = self._buf("r2", self.cdt) if roundtrip else None
        self.back = self._buf("back", w_dtype) if roundtrip else None
        self.w_dtype, self.collect = w_dtype, collect
        self.sums: list[list[torch.Tensor]] = [[], []]  # fp32 block dots, summed in fp64 at the end
        # add_bytes can run: the fused pass on an fp32 product, nothing to gather
        self.raw = self.kernel is not None and not collect and self.d is self.prod
        self._prod_bytes = byte_view(self.prod) if self.raw else memoryview(b"")
        # the torch path's product summed as the fused product sums it (its twin, for tests)
        self.sequential = sequential
        if self.lowrank:
            self._left_bytes = byte_view(left)
            self._packed_right = pack_right(right)
            self._packed = byte_view(self._packed_right)
        self.fused = [0.0, 0.0]  # its fp64 sums
        self.res = DeltaResult([0.0, 0.0, 0.0])
        self.idx_parts: list[torch.Tensor] = []
        self.val_parts: list[torch.Tensor] = []

    def _buf(self, slot: str, dtype: torch.dtype) -> torch.Tensor:
        import torch

        n = self.step * self.cols * dtype.itemsize
        if self._scratch is None:
            return torch.empty(self.step, self.cols, dtype=dtype, device=self.device)
        scratch = self._scratch
        if slot not in scratch or scratch[slot].numel() < n:
            scratch[slot] = torch.empty(max(n, _BLOCK * 8), dtype=torch.uint8)
        return scratch[slot][:n].view(dtype).view(self.step, self.cols)

    def add(self, i: int, wb: torch.Tensor, ob: torch.Tensor) -> None:
        """``ob ← round(wb + left[i:i+k] @ right)`` for the ``k = len(wb)`` rows from row ``i``.

        ``ob`` may be ``wb`` itself (merging in place): the block is upcast before its result
        overwrites it, and the round-trip check compares against a copy.
        """
        import torch

        k = wb.shape[0]
        if self.lowrank:
            self._lowrank(i, k, byte_view(wb), byte_view(ob), wb.element_size())
            return
        prod, dd, ww, rr = self.prod, self.d[:k], self.w[:k], self.r[:k]
        if self.sequential:
            sequential_product(self.left[i : i + k], self.right, prod[:k])
        else:
            torch.mm(self.left[i : i + k], self.right, out=prod[:k])
        if dd.data_ptr() != prod.data_ptr():
            dd.copy_(prod[:k])  # the one rounding of the product, fp64 → fp32
        if self.kernel is not None and wb.numel():
            self._fused(i, wb, dd, ob)
            return
        rv = rr.view(-1)
        ww.copy_(wb)  # exact upcast (mixed-dtype arithmetic is slow on the CPU)
        if self.back is not None and ob.data_ptr() == wb.data_ptr() and wb.numel():
            wb = self._buf("orig", self.w_dtype)[:k].copy_(wb)  # W's bits, before ob overwrites
        torch.add(ww, dd, out=rr)  # one fp32 add
        ob.copy_(rr)  # the one rounding to the output dtype
        rr.copy_(ob)
        if self.r2 is not None and self.back is not None:
            bb = self.back[:k]
            torch.sub(rr, dd, out=self.r2[:k])  # what unmerge computes, then its rounding
            bb.copy_(self.r2[:k])
            parts = self.idx_parts if self.collect else None
            off, top = misses(bb, wb, i * self.cols, parts, self.val_parts)
            self.res.off += off
            self.res.max_ulp = max(self.res.max_ulp, top)
        rr.sub_(ww)  # W' − W, exact in the common case (Sterbenz)
        self.sums[0].append(torch.dot(rv, rv))
        rr.sub_(dd)
        self.sums[1].append(torch.dot(rv, rv))

    def add_bytes(self, i: int, k: int, wb: memoryview, ob: memoryview) -> None:
        """``add`` for the fused pass over raw bytes (``kernel`` set, no gathering): the block's
        ``k`` rows in ``wb`` and out to ``ob`` (may be ``wb``), without a tensor view per block.
        The same calls as ``add``; the streaming loop's ~6,500 blocks a 0.85B merge spent a
        fifth of their Python time making views and byte views."""
        import torch

        assert self.raw and self.kernel is not None
        n = k * self.cols
        if n == 0:
            return
        if self.lowrank:
            self._lowrank(i, k, wb, ob, len(wb) // n)
            return
        torch.mm(
            self.left[i : i + k], self.right, out=self.prod if k == self.step else self.prod[:k]
        )
        s1, s2, off, ulp, _ = self.kernel.merge_block(
            wb, self._prod_bytes[: 4 * n], ob, len(wb) // n, self.back is not None
        )
        self.fused[0] += s1
        self.fused[1] += s2
        self.res.off += off
        self.res.max_ulp = max(self.res.max_ulp, ulp)

    def _lowrank(self, i: int, k: int, wb: memoryview, ob: memoryview, itemsize: int) -> None:
        """Rows ``i:i+k``, the product made in the fused pass (``merge_lowrank``)."""
        if not len(wb):
            return
        r = self.left.shape[1]
        s1, s2, off, ulp = self.kernel.merge_lowrank(
            wb,
            self._left_bytes[4 * r * i : 4 * r * (i + k)],
            self._packed,
            ob,
            itemsize,
            r,
            self.cols,
            self.back is not None,
        )
        self.fused[0] += s1
        self.fused[1] += s2
        self.res.off += off
        self.res.max_ulp = max(self.res.max_ulp, ulp)

    def _fused(self, i: int, wb: torch.Tensor, dd: torch.Tensor, ob: torch.Tensor) -> None:
        """``add``'s elementwise part as one C pass (``kernel.c``): the same bits and misses."""
        import torch

        idx = val = tmp = None
        if self.collect and self.back is not None:
            idx = self._buf("idx", torch.int64).view(-1)
            val = self._buf("val", self.w_dtype).view(-1)
            tmp = self._buf("tmp", torch.int64).view(-1)  # twice a block of fp32 (or bf16)
        s1, s2, off, ulp, got = self.kernel.merge_block(
            byte_view(wb),
            byte_view(dd),
            byte_view(ob),
            wb.element_size(),
            self.back is not None,
            None if idx is None else byte_view(idx),
            None if val is None else byte_view(val),
            i * self.cols,
            None if tmp is None else byte_view(tmp),
        )
        self.fused[0] += s1
        self.fused[1] += s2
        self.res.off += off
        self.res.max_ulp = max(self.res.max_ulp, ulp)
        if got and idx is not None and val is not None:
            self.idx_parts.append(idx[:got].clone())
            self.val_parts.append(val[:got].clone())

    def result(self) -> DeltaResult:
        """The sums (in block order: call once every block is added) and the gathered misses."""
        import torch

        # ‖L·R‖² = Σ (LᵀL) ∘ (RRᵀ): exact in fp64 from the r×r Gram matrices, no dense pass
        l64, r64 = self.left.double(), self.right.double()
        norms = [((l64.t() @ l64) * (r64 @ r64.t())).sum()]
        if self.kernel is not None:
            norms += [torch.tensor(x, dtype=torch.float64) for x in self.fused]
        elif self.sums[0]:
            norms += [torch.stack(x).double().sum() for x in self.sums]
        else:
            norms += [torch.zeros((), dtype=torch.float64, device=self.device)] * 2
        res = self.res
        res.sums = torch.stack(norms).tolist()
        if self.idx_parts:
            res.index = torch.cat(self.idx_parts)
            res.value = torch.cat(self.val_parts)
        return res


def sequential_product(left: torch.Tensor, right: torch.Tensor, out: torch.Tensor) -> None:
    """``out ← left @ right`` summed as the fused pass sums it (kernel.c, rows2_product_avx2):
    over k in order from 0, each product rounded in the factors' dtype and then added."""
    import torch

    torch.mul(left[:, :1], right[:1], out=out)
    for k in range(1, left.shape[1]):
        out.add_(left[:, k : k + 1] * right[k : k + 1])


def pack_right(right: torch.Tensor) -> torch.Tensor:
    """R ``[r, cols]`` (fp32) as the fused pass reads it: ``[⌈cols/32⌉, r, 32]``, zero-padded, so
    each step of its sum reads 32 contiguous columns of one row of R."""
    import torch.nn.functional as F

    r, cols = right.shape
    groups = (cols + 31) // 32
    padded = F.pad(right, (0, groups * 32 - cols))
    return padded.view(r, groups, 32).permute(1, 0, 2).contiguous()


_local = threading.local()  # per thread: its CPU scratch buffers (_scratch)


def _kernel(device: torch.device, w_dtype: torch.dtype, out_dtype: torch.dtype) -> Any:
    """The compiled ``kernel`` module for a CPU block of bf16 or fp32 that keeps its dtype, or
    None: not built (no C compiler at install), another dtype or device, or turned off with
    ``LORATOOL_MERGE_KERNEL=0`` (the torch calls then run the same arithmetic; ``base`` or
    ``v3`` name a narrower instruction set than the CPU's, for the tests)."""
    import torch

    if device.type != "cpu" or w_dtype != out_dtype:
        return None
    if w_dtype not in (torch.bfloat16, torch.float32):
        return None
    return compiled("loratool.merging.kernel", "LORATOOL_MERGE_KERNEL")


def _scratch(device: torch.device) -> dict[str, torch.Tensor]:
    """This thread's reusable block buffers: no allocation (page faults) per tensor on the CPU."""
    cache: dict[str, torch.Tensor] | None = getattr(_local, "scratch", None)
    if cache is None:
        cache = _local.scratch = {}
    return cache


def check_finite(
    job: Job, W: torch.Tensor, out: torch.Tensor, res: DeltaResult, where: str
) -> None:
    """Non-finite sums mean a NaN/Inf somewhere: find where and refuse (the temp output goes)."""
    import torch

    if all(math.isfinite(x) for x in res.sums):
        return
    if not bool(torch.isfinite(W).all()):
        raise FormatError(
            f"base weight '{job.key}' contains NaN or Inf",
            code="non-finite",
            where=where,
            hint="the base checkpoint is broken; nothing was written",
        )
    if not bool(torch.isfinite(out).all()):
        raise CompatibilityError(
            f"'{job.key}' overflows {job.out_dtype} after adding ΔW",
            code="non-finite-result",
            where=where,
            hint="merge into a wider dtype (--dtype f32 or bf16)",
        )
    res.sums = [x if math.isfinite(x) else math.inf for x in res.sums]  # huge but finite values


def target_report(job: Job, res: DeltaResult, names: dict[str, list[str]]) -> TargetReport:
    kinds = sorted({t.kind for t, _ in job.terms})
    return TargetReport(
        key=job.key,
        modules=names.get(job.key, []),
        kind=kinds[0] if len(kinds) == 1 else "+".join(kinds),
        shape=job.shape,
        dtype=job.out_dtype,
        delta_norm=math.sqrt(res.sums[0]),
        applied_norm=math.sqrt(res.sums[1]),
        error_norm=math.sqrt(res.sums[2]),
        roundtrip_off=res.off,
        roundtrip_max_ulp=res.max_ulp,
    )


def as2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)
