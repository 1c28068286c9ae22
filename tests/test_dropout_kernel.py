"""Dropout's compiled pass (loratool/lora/kernel.c) against the numpy mask and masked_fill.

``dropped`` draws the mask from the seed's SplitMix64 counter stream and zeroes in one pass;
with the pass turned off (``LORATOOL_TRAIN_KERNEL=0``) it is ``dropout_mask`` (numpy) and
``masked_fill``. Both must give the same bits, for every dtype the pass takes, lengths around
its chunk and word sizes, a new tensor, one zeroed in place, and both at once, on every
instruction set the CPU has (``LORATOOL_TRAIN_KERNEL=base|v3|v4``, one process each); and a
training step the same gradients. The masks themselves: p of the elements drop, in every lane
of a word, independently of the neighbour and of the next seed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from cpu import isa_levels

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
        kernel.dropout(1, 100, 2, buf, byte_view(torch.ones(5, 8, dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match="2, 4 or 8"):
        kernel.dropout(1, 100, 3, buf, buf)
    with pytest.raises(ValueError, match="overlaps"):
        kernel.dropout(1, 100, 2, byte_view(x.view(-1)[:16]), byte_view(x.view(-1)[8:24]))


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


CHECK = """
import sys, torch
from loratool.lora import kernel
from loratool.lora.layer import dropout_mask, dropped
assert kernel.isa == sys.argv[1], kernel.isa
for shape in ((1, 1), (3, 5), (7, 1001), (2, 4096 * 3 + 5)):
    x = torch.randn(shape).to(torch.bfloat16)
    for seed in (0, 2**62 - 1):
        want = x.masked_fill(dropout_mask(torch.Size(shape), 0.3, torch.device("cpu"), seed), 0.0)
        assert torch.equal(dropped(x, 0.3, seed).view(torch.int16), want.view(torch.int16))
"""


@pytest.mark.parametrize("isa", isa_levels())
def test_every_instruction_set_gives_the_numpy_masks(isa: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHECK, isa],
        env={**os.environ, "LORATOOL_TRAIN_KERNEL": isa},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_masks_drop_p_independently_of_place_and_seed() -> None:
    n, p = 1 << 22, 0.05
    m = dropout_mask(torch.Size([n]), p, CPU, seed=12345).double()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(float(m.mean()) - p) < 5 * sigma
    for lane in range(4):  # each 16-bit lane of a word
        assert abs(float(m[lane::4].mean()) - p) < 5 * 2 * sigma
    both = float((m[1:] * m[:-1]).mean())  # neighbours: p² if independent
    assert abs(both - p * p) < 5 * (p * p / n) ** 0.5
    nxt = dropout_mask(torch.Size([n]), p, CPU, seed=12346).double()  # the next seed: unrelated
    assert abs(float((m * nxt).mean()) - p * p) < 5 * (p * p / n) ** 0.5
