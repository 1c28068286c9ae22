"""The merge's fused C pass (loratool/merging/kernel.c) against the torch calls it replaces.

Every instruction set this CPU has (``LORATOOL_MERGE_KERNEL=base|v3|v4``, one process each: the
choice is made at import) must give the torch path's bits, round-trip misses, ULP distances and
gathered corrections exactly, and its fidelity sums to ~1e-6, for bf16 and fp32, in place and
not, on data with subnormals, signed zeros, values that cross zero, overflow and NaN.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cpu import isa_levels

from loratool.merging import delta, ulp
from loratool.stream import byte_view

ROOT = Path(__file__).resolve().parents[1]


def _kernel_or_skip() -> object:
    try:
        from loratool.merging import kernel
    except ImportError:
        if shutil.which("cc") or shutil.which("gcc"):
            pytest.fail("loratool.merging.kernel is not built though a C compiler is here")
        pytest.skip("no C compiler: the kernel is not built (the torch path runs)")
    return kernel


def _weights(dtype: torch.dtype, rows: int, cols: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.02
    flat = W.view(-1)
    n = flat.numel()
    specials = torch.tensor([1e-40, -3e-39, 0.0, -0.0, 1e-45, 3.0e38, -3.3e38, 1e-3, -1e-3])
    flat[: min(n, specials.numel())] = specials[: min(n, specials.numel())]
    W = W.to(dtype)
    L = torch.randn(rows, 16, generator=g) * 0.01
    R = torch.randn(16, cols, generator=g) * 0.01
    if rows > 2:  # a row whose ΔW pushes values across zero and into overflow
        L[1] *= 400.0
        L[2, :] = 0.0
        L[2, 0] = 1e37
    return W, L, R


def _fuses_product() -> bool:
    try:
        from loratool.merging import kernel
    except ImportError:
        return False
    return kernel.fuses_product


def _merge(W, L, R, *, roundtrip, collect, inplace, fused):  # type: ignore[no-untyped-def]
    W = W.clone()
    out = W if inplace else torch.empty_like(W)
    os.environ["LORATOOL_MERGE_KERNEL"] = os.environ.get("KERNEL_ISA", "1") if fused else "0"
    # where the kernel also makes the product (v3), the torch path sums it in the same order
    sequential = not fused and not collect and _fuses_product()
    b = delta.DeltaBlocks(
        L,
        R,
        W.dtype,
        W.dtype,
        torch.device("cpu"),
        roundtrip=roundtrip,
        collect=collect,
        sequential=sequential,
    )
    assert b.lowrank == (fused and not collect and _fuses_product())
    assert (b.kernel is not None) == fused
    for i in range(0, W.shape[0], b.step):
        k = min(b.step, W.shape[0] - i)
        b.add(i, W[i : i + k], out[i : i + k])
    return out, b.result()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = ulp.int_view(a.dtype)
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def check_all() -> None:
    """Compare the two paths over every case (run once per instruction set)."""
    for dtype in (torch.bfloat16, torch.float32):
        for rows, cols, seed in ((300, 1000, 0), (37, 3000, 1), (1, 5, 2), (5, 1, 3)):
            W, L, R = _weights(dtype, rows, cols, seed)
            for roundtrip, collect in ((True, True), (True, False), (False, False)):
                for inplace in (True, False):
                    args = {"roundtrip": roundtrip, "collect": collect, "inplace": inplace}
                    want, rw = _merge(W, L, R, fused=False, **args)
                    got, rg = _merge(W, L, R, fused=True, **args)
                    case = f"{dtype} {rows}x{cols} {args}"
                    assert _same_bits(want, got), case
                    assert (rg.off, rg.max_ulp) == (rw.off, rw.max_ulp), case
                    for x, y in zip(rw.sums, rg.sums, strict=True):
                        if torch.isfinite(torch.tensor(x)):
                            assert abs(x - y) <= 2e-6 * abs(x) + 1e-30, (case, rw.sums, rg.sums)
                        else:
                            assert not torch.isfinite(torch.tensor(y)), (case, rw.sums, rg.sums)
                    if collect:
                        assert rw.index is not None and rg.index is not None, case
                        assert torch.equal(rw.index, rg.index), case
                        assert rw.value is not None and rg.value is not None, case
                        assert _same_bits(rw.value, rg.value), case
    # a NaN in the base makes the sums non-finite on both paths (the merge then refuses)
    W, L, R = _weights(torch.bfloat16, 40, 64, 4)
    W[3, 7] = float("nan")
    _, rg = _merge(W, L, R, roundtrip=True, collect=False, inplace=True, fused=True)
    assert not all(torch.isfinite(torch.tensor(rg.sums[1:])))


@pytest.mark.parametrize("isa", isa_levels())
def test_kernel_matches_the_torch_path(isa: str) -> None:
    _kernel_or_skip()
    env = {**os.environ, "KERNEL_ISA": isa, "LORATOOL_MERGE_KERNEL": isa}
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from loratool.merging import kernel; "
        "assert kernel.isa == sys.argv[2], kernel.isa; import test_merge_kernel as t; t.check_all()"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "tests"), isa],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]


def test_kernel_refuses_bad_buffers() -> None:
    kernel = _kernel_or_skip()
    w = torch.zeros(8, dtype=torch.bfloat16)
    d = torch.zeros(8)
    raw = byte_view
    with pytest.raises(ValueError, match="sizes"):
        kernel.merge_block(raw(w), raw(d[:4]), raw(w), 2, True)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="itemsize"):
        kernel.merge_block(raw(w), raw(d), raw(w), 3, True)  # type: ignore[attr-defined]
    big = torch.zeros(16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="overlap"):
        kernel.merge_block(raw(big[:8]), raw(d), raw(big[4:12]), 2, True)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="index needs"):
        kernel.merge_block(raw(w), raw(d), raw(w), 2, True, raw(d))  # type: ignore[attr-defined]


def test_kernel_off_switch_runs_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORATOOL_MERGE_KERNEL", "0")
    b = delta.DeltaBlocks(
        torch.zeros(4, 2), torch.zeros(2, 8), torch.bfloat16, torch.bfloat16, torch.device("cpu")
    )
    assert b.kernel is None


def test_fused_product_refuses_bad_buffers() -> None:
    kernel = _kernel_or_skip()
    if not kernel.fuses_product:  # type: ignore[attr-defined]
        pytest.skip(f"the product is fused at v3 only; this CPU runs {kernel.isa}")  # type: ignore[attr-defined]
    raw = byte_view
    w = torch.zeros(3, 40, dtype=torch.bfloat16)
    left, right = torch.zeros(3, 4), torch.zeros(4, 40)
    packed = delta.pack_right(right)
    assert packed.shape == (2, 4, 32)  # 40 columns: two groups of 32, the second padded
    lowrank = kernel.merge_lowrank  # type: ignore[attr-defined]
    assert lowrank(raw(w), raw(left), raw(packed), raw(w), 2, 4, 40, True) == (0.0, 0.0, 0, 0)
    with pytest.raises(ValueError, match="sizes"):
        lowrank(raw(w), raw(left), raw(right), raw(w), 2, 4, 40, True)  # R not packed
    with pytest.raises(ValueError, match="sizes"):
        lowrank(raw(w), raw(left[:2]), raw(packed), raw(w), 2, 4, 40, True)
    with pytest.raises(ValueError, match="sizes"):
        lowrank(raw(w[:, :20]), raw(left), raw(packed), raw(w[:, 20:]), 2, 4, 40, True)
    with pytest.raises(ValueError, match="itemsize"):
        lowrank(raw(w), raw(left), raw(packed), raw(w), 3, 4, 40, True)
    flat = torch.zeros(240, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="overlap"):
        lowrank(raw(flat[:120]), raw(left), raw(packed), raw(flat[60:180]), 2, 4, 40, True)


def test_sequential_product_is_the_product() -> None:
    """The fused product's torch twin: L·R summed over k in order, each product rounded and
    added; the same as a float64 product to fp32 rounding, and exactly that order."""
    g = torch.Generator().manual_seed(5)
    L, R = torch.randn(37, 16, generator=g), torch.randn(16, 300, generator=g)
    out = torch.empty(37, 300)
    delta.sequential_product(L, R, out)
    exact = (L.double() @ R.double()).float()
    assert torch.allclose(out, exact, rtol=1e-5, atol=1e-5)
    want = L[:, 0:1] * R[0]
    for k in range(1, 16):
        want = want + L[:, k : k + 1] * R[k]
    assert torch.equal(out, want)
