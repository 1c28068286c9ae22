"""The three dtypes an adapter's factors may have (spec §2): names in files ⇄ torch dtypes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import FormatError

if TYPE_CHECKING:
    import torch


def dtype_name(dtype: torch.dtype) -> str:
    import torch

    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    if dtype not in names:
        raise FormatError(
            f"dtype {dtype} is not allowed in an adapter (f32, f16, bf16)",
            code="dtype",
            hint="cast the factors with .float(), .half() or .bfloat16()",
        )
    return names[dtype]


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[name]
