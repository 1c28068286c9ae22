"""SwiGLU's fused backward (loratool/training/kernel.c) against the torch path it replaces.

Per instruction set this CPU has (``LORATOOL_TRAIN_KERNEL=base|v3|v4``, one process each), both
gradients are the torch version's bit for bit (σ comes from torch; the rest is the same fp32
operations in the same order), on data with zeros, huge and tiny gates.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loratool.stream import byte_view
from loratool.training import recompute

ROOT = Path(__file__).resolve().parents[1]


def _grads(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, kernel: str) -> tuple:
    os.environ["LORATOOL_TRAIN_KERNEL"] = kernel
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    recompute.SwiGLU.apply(g, u).backward(grad)
    return g.grad, u.grad


def check_all(isa: str) -> None:
    from loratool.training import kernel

    assert kernel.isa == isa, kernel.isa
    torch.manual_seed(0)
    for shape in ((300, 1536), (7, 3), (1, 1)):
        gate = (torch.randn(shape) * 4).to(torch.bfloat16)
        flat = gate.view(-1)
        specials = torch.tensor([0.0, -0.0, 100.0, -100.0, 1e-30, -60.0, 3e38])
        flat[: min(flat.numel(), 7)] = specials[: min(flat.numel(), 7)].to(torch.bfloat16)
        up = torch.randn(shape).to(torch.bfloat16)
        grad = torch.randn(shape).to(torch.bfloat16)
        want = _grads(gate, up, grad, "0")
        got = _grads(gate, up, grad, isa)
        for w, x in zip(want, got, strict=True):
            assert x.dtype == torch.bfloat16 and x.shape == w.shape
            assert torch.equal(x.view(torch.int16), w.view(torch.int16)), (isa, shape)


def _isas() -> list[str]:
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    isas = ["base"]
    if all(f in flags for f in ("avx2", "fma", "bmi2")):
        isas.append("v3")
        if all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq")):
            isas.append("v4")
    return isas


def _built() -> None:
    try:
        from loratool.training import kernel  # noqa: F401
    except ImportError:
        if shutil.which("cc") or shutil.which("gcc"):
            pytest.fail("loratool.training.kernel is not built though a C compiler is here")
        pytest.skip("no C compiler: the kernel is not built (the torch path runs)")


@pytest.mark.parametrize("isa", _isas())
def test_swiglu_kernel_matches_the_torch_path(isa: str) -> None:
    _built()
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_train_kernel as t; "
        "t.check_all(sys.argv[2])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "tests"), isa],
        env={**os.environ, "LORATOOL_TRAIN_KERNEL": isa},
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]


def test_swiglu_kernel_refuses_bad_buffers() -> None:
    _built()
    from loratool.training import kernel

    a = torch.zeros(8, dtype=torch.bfloat16)
    s = torch.zeros(8)
    raw = byte_view
    with pytest.raises(ValueError, match="one length"):
        kernel.swiglu_backward(raw(a), raw(a), raw(a), raw(s), raw(a[:4]), raw(a.clone()))
    with pytest.raises(ValueError, match="one length"):
        kernel.swiglu_backward(raw(a), raw(a), raw(a), raw(a), raw(a.clone()), raw(a.clone()))
    with pytest.raises(ValueError, match="overlaps"):
        kernel.swiglu_backward(raw(a), raw(a), raw(a), raw(s), raw(a), raw(a.clone()))


def test_other_dtypes_take_the_torch_path() -> None:
    x = torch.zeros(4, 4)
    assert recompute.fused_kernel(x, x, x) is None  # fp32: the torch path
