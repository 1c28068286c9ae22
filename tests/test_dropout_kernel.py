"""Dropout's compiled pass (loratool/lora/kernel.c) against the numpy mask and masked_fill.

``dropped`` draws the mask from the seed's PCG64 stream and zeroes in one pass; with the pass
turned off (``LORATOOL_TRAIN_KERNEL=0``) it is ``dropout_mask`` and ``masked_fill``. Both must
give the same bits, for every dtype the pass takes, lengths around its chunk and word sizes,
a new tensor, one zeroed in place, and both at once; and a training step the same gradients.
"""

from __future__ import annotations

import pytest
import torch

from loratool import lora
from loratool.lora import layer
from loratool.lora.layer import dropout_mask, dropped
from loratool.stream import byte_view

kernel = pytest.importorskip("loratool.lora.kernel", reason="the C pass was not built")
CPU = torch.device("cpu")


def _bits(t: torch.Tensor) -> bytes:
    return bytes(byte_view(t.contiguous()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 4096), (7, 1001), (1, 4097 * 3)])
def test_the_pass_gives_the_numpy_masks_zeros(
    dtype: torch.dtype, shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    for seed, p in ((0, 0.05), (12345, 0.5), (2**62 - 1, 1.0), (7, 1e-9)):
        x = torch.randn(shape).to(dtype)
        x.view(-1)[0] = -0.0
        other = torch.randn(shape).to(dtype)
        mask = dropout_mask(torch.Size(shape), p, CPU, seed)
        got, inplace = dropped(x, p, seed, in_place=other.clone()), other.clone()
        assert dropped(None, p, seed, in_place=inplace) is None
        assert _bits(got) == _bits(x.masked_fill(mask, 0.0)), (seed, p)
        assert _bits(inplace) == _bits(other.masked_fill(mask, 0.0)), (seed, p)
        both = other.clone()
        assert _bits(dropped(x, p, seed, in_place=both)) == _bits(got)
        assert _bits(both) == _bits(inplace)
        monkeypatch.setenv("LORATOOL_TRAIN_KERNEL", "0")  # the torch path: the same bits
        assert _bits(dropped(x, p, seed)) == _bits(got)
        monkeypatch.delenv("LORATOOL_TRAIN_KERNEL")


def test_the_pass_is_used_and_refuses_bad_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.ones(4, 8, dtype=torch.bfloat16)
    assert layer._dropout_kernel(x, x) is kernel
    assert layer._dropout_kernel(x, x.t()) is None  # not contiguous: the torch path
    assert layer._dropout_kernel(x, torch.ones(4, 8)) is None  # another dtype
    monkeypatch.setenv("LORATOOL_TRAIN_KERNEL", "0")
    assert layer._dropout_kernel(x, x) is None
    buf = byte_view(x)
    with pytest.raises(ValueError, match="one length"):
        kernel.dropout(1, 2, 3, 4, 100, 2, buf, byte_view(torch.ones(5, 8, dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match="2, 4 or 8"):
        kernel.dropout(1, 2, 3, 4, 100, 3, buf, buf)
    with pytest.raises(ValueError, match="overlaps"):
        kernel.dropout(1, 2, 3, 4, 100, 2, byte_view(x.view(-1)[:16]), byte_view(x.view(-1)[8:24]))


def test_a_step_with_dropout_has_the_torch_paths_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused LoRA function's forward and backward through the pass and through torch."""
    base = torch.nn.Linear(64, 48).requires_grad_(False)
    used: list[bool] = []
    pick = layer._dropout_kernel

    def spy(*ts: torch.Tensor | None) -> object:
        found = pick(*ts)  # type: ignore[arg-type]
        used.append(found is not None)
        return found

    monkeypatch.setattr(layer, "_dropout_kernel", spy)

    def grads(switch: str) -> list[torch.Tensor]:
        monkeypatch.setenv("LORATOOL_TRAIN_KERNEL", switch)
        torch.manual_seed(3)
        layer_ = lora.LoraLayer(base, rank=4, alpha=8, dropout=0.3).train()
        torch.nn.init.normal_(layer_.lora_B)
        x = torch.randn(2, 37, 64, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer_(x)
        y.float().square().sum().backward()
        assert x.grad is not None and layer_.lora_A.grad is not None
        return [y.detach(), x.grad, layer_.lora_A.grad, layer_.lora_B.grad]

    want = grads("0")
    assert used == [False, False]  # forward, backward
    for w, got in zip(want, grads("1"), strict=True):
        assert torch.equal(w, got)
    assert used[2:] == [True, True]
