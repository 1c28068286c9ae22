"""The fused training passes (loratool/training/kernel.c) against the torch paths they replace.

Per instruction set this CPU has (``LORATOOL_TRAIN_KERNEL=base|v3|v4``, one process each):
SwiGLU's two gradients are the torch version's bit for bit, in bf16 and in fp32 (σ comes from
torch; the rest is the same fp32 operations in the same order), on data with zeros, huge and
tiny gates. The attention softmax (bf16 only) is not bitwise torch's (its own e^x), nor is
RMSNorm (its sums in another order), so they are held to the torch path's accuracy: in bf16 the
same values but for a few 1-ulp roundings, and in both dtypes outputs and gradients as close to
an fp64 reference as the torch path's.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from cpu import isa_levels

from loratool.stream import byte_view
from loratool.training import attention, recompute

ROOT = Path(__file__).resolve().parents[1]


SHAPES = ((300, 1536), (7, 3), (1, 1))


def _grads(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, kernel: str) -> tuple:
    os.environ["LORATOOL_TRAIN_KERNEL"] = kernel
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    recompute.SwiGLU.apply(g, u).backward(grad)
    return g.grad, u.grad


def check_all(isa: str) -> None:
    from loratool.training import kernel

    assert kernel.isa == isa, kernel.isa
    torch.manual_seed(0)
    for dtype, shape in itertools.product((torch.bfloat16, torch.float32), SHAPES):
        gate = (torch.randn(shape) * 4).to(dtype)
        flat = gate.view(-1)
        specials = torch.tensor([0.0, -0.0, 100.0, -100.0, 1e-30, -60.0, 3e38])
        flat[: min(flat.numel(), 7)] = specials[: min(flat.numel(), 7)].to(dtype)
        up = torch.randn(shape).to(dtype)
        grad = torch.randn(shape).to(dtype)
        want = _grads(gate, up, grad, "0")
        got = _grads(gate, up, grad, isa)
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
        for w, x in zip(want, got, strict=True):
            assert x.dtype == dtype and x.shape == w.shape
            assert torch.equal(x.view(bits), w.view(bits)), (isa, dtype, shape)
    check_attention(isa)
    check_norm(isa)


def _attention(xs: tuple[torch.Tensor, ...], spans: Any, grad: torch.Tensor, switch: str) -> list:
    os.environ["LORATOOL_TRAIN_KERNEL"] = switch
    q, k, v = (x.detach().clone().requires_grad_() for x in xs)
    out = attention.ShortAttention.apply(q, k, v, spans, 0.125)
    out.backward(grad.to(out.dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


def check_attention(isa: str) -> None:
    from loratool.training import kernel

    torch.manual_seed(0)
    for n in (1, 2, 7, 129, 300):  # the softmax rows and their gradients, against torch's in fp32
        s = (torch.randn(6, n, n) * 20).to(torch.bfloat16)
        dp = torch.randn(6, n, n).to(torch.bfloat16)
        future = torch.ones(n, n, dtype=torch.bool).triu(1)
        pf = torch.softmax((s.float() * 0.125).masked_fill(future, float("-inf")), -1)
        want_ds = (pf * (dp.float() - (pf * dp.float()).sum(-1, keepdim=True))).bfloat16()
        p, p2, ds = (torch.empty_like(s) for _ in range(3))
        kernel.attention_probs(byte_view(s), byte_view(p), n, 0.125)
        kernel.attention_grads(byte_view(s), byte_view(dp), byte_view(p2), byte_view(ds), n, 0.125)
        ulps = (p.view(torch.int16).int() - pf.bfloat16().view(torch.int16).int()).abs()
        assert (
            torch.equal(p, p2) and int(ulps.max()) <= 1 and float((ulps > 0).float().mean()) < 1e-3
        )
        assert not p[:, future].any() and not ds[:, future].any()  # zero above the diagonal
        torch.testing.assert_close(ds.float(), want_ds.float(), atol=1e-5, rtol=1e-2)
        c = s.clone()  # in place: the same
        kernel.attention_probs(byte_view(c), byte_view(c), n, 0.125)
        assert torch.equal(c, p)
    t = 300  # ShortAttention through the pass and through torch, grouped heads, ragged documents
    spans = (((0, 1), (1, 130), (130, 300)), ((0, 77),))
    xs = tuple((torch.randn(2, t, h, 16) * 2).to(torch.bfloat16).transpose(1, 2) for h in (6, 2, 2))
    grad = torch.randn(2, t, 6, 16)
    ref = _attention(tuple(x.double() for x in xs), spans, grad, "0")
    torch_path, fused = _attention(xs, spans, grad, "0"), _attention(xs, spans, grad, isa)
    for r, a, b in zip(ref, torch_path, fused, strict=True):
        err_torch, err_fused = ((x.double() - r).abs() for x in (a, b))
        assert float(err_fused.max()) <= 1.5 * float(err_torch.max()), isa
        assert float(err_fused.mean()) <= 1.1 * float(err_torch.mean()), isa


def _norm(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, switch: str) -> list:
    os.environ["LORATOOL_TRAIN_KERNEL"] = switch
    xx = x.detach().clone().requires_grad_()
    y = recompute.RMSNorm.apply(xx, w, 1e-5)
    y.backward(g.to(y.dtype))
    return [y.detach(), xx.grad]


def check_norm(isa: str) -> None:
    torch.manual_seed(0)
    shapes = ((3, 576), (2, 5, 1), (1, 7))
    for dtype, shape in itertools.product((torch.bfloat16, torch.float32), shapes):
        x = (torch.randn(shape) * 3).to(dtype)
        x.view(-1)[0] = 0.0
        w = (torch.randn(shape[-1]) + 1).to(dtype)
        g = torch.randn(shape).to(dtype)
        ref = _norm(x.double(), w.double(), g.double(), "0")
        for r, a, b in zip(ref, _norm(x, w, g, "0"), _norm(x, w, g, isa), strict=True):
            assert a.dtype == b.dtype == dtype
            err_torch, err_fused = ((t.double() - r).abs() for t in (a, b))
            if dtype == torch.float32:  # both a few ulps from fp64: hold the pass to 4 of them
                ulp = torch.finfo(torch.float32).eps * float(r.abs().max())
                assert float(err_fused.max()) <= 4 * ulp, (isa, shape)
                continue
            assert float(err_fused.max()) <= 1.5 * float(err_torch.max()) + 1e-6, (isa, shape)
            assert float(err_fused.mean()) <= 1.1 * float(err_torch.mean()) + 1e-7, (isa, shape)
            assert float((a != b).float().mean()) < 0.01  # the same bf16 values, nearly all


def _built() -> None:
    try:
        from loratool.training import kernel  # noqa: F401
    except ImportError:
        if shutil.which("cc") or shutil.which("gcc"):
            pytest.fail("loratool.training.kernel is not built though a C compiler is here")
        pytest.skip("no C compiler: the kernel is not built (the torch path runs)")


@pytest.mark.parametrize("isa", isa_levels())
def test_kernels_match_the_torch_paths(isa: str) -> None:
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
    f = torch.zeros(8)  # fp32: every buffer of one length, sig's too
    with pytest.raises(ValueError, match="one length"):
        kernel.swiglu_backward(
            raw(f), raw(f), raw(f), raw(torch.zeros(16)), raw(f.clone()), raw(f.clone()), 4
        )
    with pytest.raises(ValueError, match="one length"):  # bf16 buffers read as fp32
        kernel.swiglu_backward(raw(a), raw(a), raw(a), raw(s), raw(a.clone()), raw(a.clone()), 4)
    with pytest.raises(ValueError, match="itemsize"):
        kernel.swiglu_backward(raw(f), raw(f), raw(f), raw(f), raw(f.clone()), raw(f.clone()), 8)


def test_other_dtypes_take_the_torch_path() -> None:
    _built()
    x, w = torch.zeros(4, 4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    assert recompute.fused_kernel(x, x, x) is None  # fp64: the torch path
    assert recompute._norm_kernel(x, w) is None
    mixed = torch.zeros(4, 4, dtype=torch.bfloat16)
    assert recompute.fused_kernel(x.float(), mixed, mixed) is None  # dtypes that differ
    assert recompute._norm_kernel(x.float(), w.bfloat16()) is None
    assert recompute.fused_kernel(x.float(), x.float(), x.float()) is not None  # fp32: the pass
    assert recompute._norm_kernel(x.float(), w.float()) is not None


def test_documents_to_1024_tokens_take_the_fused_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 on the CPU with the pass built: a 580-token document goes through ShortAttention
    (past SHORT_DOCUMENT, within FUSED_SHORT_DOCUMENT), with SDPA's result."""
    _built()
    monkeypatch.delenv("LORATOOL_TRAIN_KERNEL", raising=False)
    seen: list[Any] = []
    real = attention.ShortAttention.apply

    def spy(*args: Any) -> Any:
        seen.append(args[3])
        return real(*args)

    monkeypatch.setattr(attention.ShortAttention, "apply", spy)
    torch.manual_seed(0)
    t, spans = 600, (((0, 20), (20, 600)),)
    assert attention.SHORT_DOCUMENT < 580 <= attention.FUSED_SHORT_DOCUMENT
    q, k, v = (torch.randn(1, t, 4, 16).to(torch.bfloat16).transpose(1, 2) for _ in range(3))
    with attention.packed_segments(spans):
        with torch.enable_grad():
            fused, _ = attention.packed_attention(torch.nn.Module(), q, k, v, None, scaling=0.25)
        with torch.no_grad():  # no ShortAttention without gradients: SDPA per document
            sdpa, _ = attention.packed_attention(torch.nn.Module(), q, k, v, None, scaling=0.25)
    assert seen == [spans]
    torch.testing.assert_close(fused.float(), sdpa.float(), atol=2e-2, rtol=2e-2)


def test_attention_kernel_refuses_bad_buffers() -> None:
    _built()
    from loratool.training import kernel

    s = torch.zeros(2, 5, 5, dtype=torch.bfloat16)
    raw = byte_view
    with pytest.raises(ValueError, match=r"\[k, n, n\]"):
        kernel.attention_probs(raw(s), raw(s.clone()), 4, 0.5)  # not whole [n, n] blocks
    with pytest.raises(ValueError, match=r"\[k, n, n\]"):
        kernel.attention_probs(raw(s), raw(s[:1].clone()), 5, 0.5)
    with pytest.raises(ValueError, match="overlaps"):
        kernel.attention_grads(raw(s), raw(s), raw(s), raw(s.clone()), 5, 0.5)  # dS over S


def test_norm_kernel_refuses_bad_buffers_and_leaves_trained_weights_to_torch() -> None:
    _built()
    from loratool.training import kernel

    x, w, r = (
        torch.zeros(4, 8, dtype=torch.bfloat16),
        torch.ones(8, dtype=torch.bfloat16),
        torch.zeros(4),
    )
    raw = byte_view
    with pytest.raises(ValueError, match="rows, d"):
        kernel.rms_norm(raw(x), raw(w[:4]), raw(x.clone()), raw(r), 8, 1e-5)
    with pytest.raises(ValueError, match="rows, d"):
        kernel.rms_norm(raw(x), raw(w), raw(x.clone()), raw(r[:2]), 8, 1e-5)
    with pytest.raises(ValueError, match="overlaps"):
        kernel.rms_norm(raw(x), raw(w), raw(x), raw(r), 8, 1e-5)
    with pytest.raises(ValueError, match="rows, d"):  # a bf16 weight with fp32 rows
        kernel.rms_norm(raw(x.float()), raw(w), raw(x.float()), raw(r), 8, 1e-5, 4)
    with pytest.raises(ValueError, match="itemsize"):
        kernel.rms_norm_backward(raw(x), raw(w), raw(r), raw(x), raw(x.clone()), 8, 3)
    wt = torch.ones(8, dtype=torch.bfloat16, requires_grad=True)  # a trained weight: torch's
    xx = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    recompute.RMSNorm.apply(xx, wt, 1e-5).sum().backward()
    assert wt.grad is not None and xx.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_pass_leaves_the_weight_resizable(dtype: torch.dtype) -> None:
    """FSDP frees a gathered parameter by resizing its storage to 0 after the layer's forward; a
    numpy export of the weight (``byte_view``) would make that raise."""
    _built()
    w = torch.ones(8, dtype=dtype)
    x = torch.randn(4, 8, dtype=dtype, requires_grad=True)
    assert recompute._norm_kernel(x, w) is not None  # the pass, not torch's ops
    recompute.RMSNorm.apply(x, w, 1e-5).sum().backward()
    w.untyped_storage().resize_(0)
