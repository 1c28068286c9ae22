"""Float bits as integers: ULP distances and the round-trip compare of the merge's torch path."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def int_view(dtype: torch.dtype) -> torch.dtype:
    import torch

    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


def ordered(bits: torch.Tensor) -> torch.Tensor:
    """Sign-magnitude float bits → integers in the floats' order (±0 → 0): ULPs are differences."""
    import torch

    x = bits.to(torch.int64)
    mag = x & ((1 << (bits.element_size() * 8 - 1)) - 1)
    return torch.where(x < 0, -mag, mag)


def misses(
    got: torch.Tensor,
    want: torch.Tensor,
    start: int,
    idx_parts: list[torch.Tensor] | None,
    val_parts: list[torch.Tensor],
) -> tuple[int, int]:
    """(How many elements' bits differ, their max ULP distance); gathered too if asked.

    On the CPU in numpy (few calls per block: per-call overhead dominates torch here), on a GPU
    in torch; the ULP distance is the difference of the bits read as sign-magnitude integers.
    """
    import torch

    ints = int_view(want.dtype)
    g, w = got.view(ints).reshape(-1), want.view(ints).reshape(-1)
    if g.device.type == "cpu":
        import numpy as np

        gn, wn = g.numpy(), w.numpy()
        # Same-sign pairs: the ULP distance is the difference of the bit patterns, which fits
        # their own width; opposite signs (rare: the value crossed zero) wrap, and are redone.
        diff = np.subtract(gn, wn)
        count = int(np.count_nonzero(diff))
        if not count:
            return 0, 0
        top = 0
        signs = np.bitwise_xor(gn, wn)  # negative where the signs differ
        if int(signs.min()) < 0:
            at = np.flatnonzero(signs < 0)
            mask = (1 << (8 * wn.itemsize - 1)) - 1
            span = (gn[at].astype(np.int64) & mask) + (wn[at].astype(np.int64) & mask)
            top = int(span.max())
            diff[at] = 0
        top = max(top, int(diff.max()), -int(diff.min()))
        if idx_parts is not None:
            flat = np.flatnonzero(gn != wn)
            idx_parts.append(torch.from_numpy(flat + start))
            val_parts.append(torch.from_numpy(wn[flat]).view(want.dtype))
        return count, top
    flat_t = (g != w).nonzero().squeeze(1)
    if not flat_t.numel():
        return 0, 0
    gt, wt = g[flat_t], w[flat_t]
    if idx_parts is not None:
        idx_parts.append((flat_t + start).cpu())
        val_parts.append(wt.view(want.dtype).cpu())
    return int(flat_t.numel()), int((ordered(gt) - ordered(wt)).abs().max())
