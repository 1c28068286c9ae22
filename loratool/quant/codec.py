"""NF4 with double quantisation (QLoRA, Dettmers et al. 2023) and row-wise int8, in plain torch.

NF4 stores a weight as 4-bit indices into the 16-value NormalFloat code book (quantiles of a
standard normal, with an exact zero), one absmax scaler per block of 64 consecutive elements of the
row-major flattened weight. The scalers are quantised again ("double quantisation"): their mean is
subtracted, and each block of 256 of them becomes int8 with one fp32 factor. That is 4 + 8/64 +
32/(64·256) ≈ 4.127 bits a weight, 0.258× its bf16 bytes — the layout of torchao's ``NF4Tensor``
and the values of bitsandbytes' ``nf4`` code book, so both dequantise our codes the same way
(tests/test_qlora.py checks it), except that we pad a ragged last block where torchao refuses
the tensor (``numel`` must divide by 64·256 there: SmolLM2's 576×576 ``q_proj`` does not).

int8 is one absmax scale per output row, symmetric (``round(127·w/absmax_row)``): 0.5× bf16 bytes.

Everything is computed in fp32 whatever the weight's dtype, so quantising the same values gives
the same bytes in the trainer and in ``merge --onto-quantized``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NF4 = "nf4"
INT8 = "int8"
SCHEMES = (NF4, INT8)
BLOCK = 64  # elements per absmax scaler (QLoRA's and torchao's default)
SCALER_BLOCK = 256  # scalers per int8 factor in the double quantisation (QLoRA's choice)

# The NormalFloat-4 code book: QLoRA's Appendix E values, as bitsandbytes and torchao store them.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


@dataclass
class Packed:
    """A quantised weight: the tensors it keeps and what it takes to read them back.

    nf4: ``data`` uint8 ``[ceil(n/64)·32]`` (two codes a byte, the first in the high nibble),
    ``scalers`` int8 ``[ceil(n/64)]``, ``factors`` fp32 ``[ceil(blocks/256)]``, ``mean`` fp32
    ``[1]``. int8: ``data`` int8 ``[out, in]``, ``scalers`` fp32 ``[out]`` (absmax/127),
    ``factors`` and ``mean`` empty.
    """

    scheme: str
    shape: tuple[int, ...]
    data: torch.Tensor
    scalers: torch.Tensor
    factors: torch.Tensor
    mean: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "data": self.data,
            "scalers": self.scalers,
            "factors": self.factors,
            "mean": self.mean,
        }

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def _code(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -x.numel() % multiple
    return torch.nn.functional.pad(x, (0, extra)) if extra else x


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 scalers → (int8 codes, fp32 factor per block of 256, fp32 mean ``[1]``), as torchao.

    Centred on their mean, each block's scalers are scaled by ``256 / (2·max|s − mean|)`` and
    rounded to int8 (torchao's ``double_quantize_scalers``); a ragged last block is padded with
    the mean, which quantises to 0 and never widens its block's range.
    """
    mean = absmax.mean().reshape(1)
    centred = _pad_to(absmax - mean, SCALER_BLOCK).view(-1, SCALER_BLOCK)
    peak = centred.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    factors = 256.0 / (2.0 * peak)
    q = (centred * factors[:, None]).round().clamp(-128, 127).to(torch.int8)
    return q.view(-1)[: absmax.numel()].contiguous(), factors, mean


def dequantize_scalers(q: torch.Tensor, factors: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    n = q.numel()
    blocks = _pad_to(q.float(), SCALER_BLOCK).view(-1, SCALER_BLOCK)
    return (blocks / factors[:, None]).view(-1)[:n] + mean


def quantize(weight: torch.Tensor, scheme: str = NF4) -> Packed:
    """Quantise a 2-D weight (any float dtype) with ``scheme`` (``nf4`` or ``int8``)."""
    w = weight.detach().float()
    shape = tuple(weight.shape)
    if scheme == INT8:
        rows = w.reshape(shape[0], -1)
        scale = rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
        data = (rows / scale[:, None]).round().clamp(-127, 127).to(torch.int8).reshape(shape)
        empty = torch.empty(0, dtype=torch.float32, device=w.device)
        return Packed(INT8, shape, data, scale, empty, empty.clone())
    if scheme != NF4:
        raise ValueError(f"unknown quantisation scheme {scheme!r}")
    blocks = _pad_to(w.reshape(-1), BLOCK).view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    # Normalise by the exact absmax (torchao and bitsandbytes do), then the nearest code: the
    # code book is sorted, so nearest = how many midpoints lie below (ties go to the lower code,
    # as argmin's first minimum does in torchao).
    normed = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    code = _code(w.device)
    idx = torch.bucketize(normed, (code[1:] + code[:-1]) / 2).to(torch.uint8).view(-1)
    data = (idx[0::2] << 4) | idx[1::2]
    scalers, factors, mean = double_quantize(absmax)
    return Packed(NF4, shape, data.contiguous(), scalers, factors, mean)


def dequantize(
    p: Packed | dict[str, torch.Tensor],
    dtype: torch.dtype = torch.bfloat16,
    *,
    shape: tuple[int, ...] | None = None,
    scheme: str | None = None,
) -> torch.Tensor:
    """The weight a packed one stands for, in ``dtype`` (products in fp32, one rounding)."""
    if isinstance(p, Packed):
        t, shape, scheme = p.tensors(), p.shape, p.scheme
    else:
        t = p
    assert shape is not None and scheme is not None
    if scheme == INT8:
        return (t["data"].float() * t["scalers"][:, None]).to(dtype).view(shape)
    data = t["data"]
    # One lookup per byte: a [256, 2] table of both nibbles' codes (3× faster than shifting).
    values = torch.index_select(_pair_table(data.device), 0, data.int()).view(-1, BLOCK)
    absmax = dequantize_scalers(t["scalers"], t["factors"], t["mean"])
    n = 1
    for d in shape:
        n *= d
    return (values * absmax[:, None]).view(-1)[:n].to(dtype).view(shape)


def _pair_table(device: torch.device) -> torch.Tensor:
    code = _code(device)
    i = torch.arange(256, device=device)
    return torch.stack((code[i >> 4], code[i & 0x0F]), dim=1)


def packed_nbytes(shape: tuple[int, ...], scheme: str) -> int:
    """Bytes a weight of ``shape`` takes quantised with ``scheme`` (for reports and benchmarks)."""
    n = 1
    for d in shape:
        n *= d
    if scheme == INT8:
        return n + 4 * shape[0]
    blocks = -(-n // BLOCK)
    return blocks * BLOCK // 2 + blocks + 4 * -(-blocks // SCALER_BLOCK) + 4


def describe(scheme: str) -> dict[str, object]:
    """The provenance of a scheme: block sizes and code book, as the adapter records them."""
    if scheme == INT8:
        return {"scheme": INT8, "granularity": "per-row absmax", "bits": 8}
    return {
        "scheme": NF4,
        "bits": 4,
        "block_size": BLOCK,
        "double_quant": {"scaler_block_size": SCALER_BLOCK, "dtype": "int8", "centred": "mean"},
        "layout": "torchao NF4Tensor (ragged last blocks padded)",
    }
