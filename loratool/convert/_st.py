"""Safetensors plumbing shared by the converters: validated headers, lazy reads, bytes out.

Headers go through the same container checks as loratool files (``format.parse_container``:
bounded size, strict JSON, offsets that tile the data exactly), so a hostile PEFT or kohya file
is refused before any tensor byte is read. Tensors are read one at a time into private buffers.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import constants as C
from ..errors import FormatError
from ..format import TensorInfo, parse_container, read_head

if TYPE_CHECKING:
    import torch

# Factors may be f32/f16/bf16 (what loratool stores); kohya's 0-d alpha is sometimes f64.
SOURCE_DTYPES: dict[str, int] = {**C.DTYPE_SIZES, "F64": 8}


@dataclass
class StFile:
    """A validated safetensors file: header entries, metadata, and where the data starts."""

    path: str
    file_bytes: int
    data_start: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    def raw(self, name: str) -> bytes:
        info = self.tensors[name]
        size = info.end - info.begin
        with open(self.path, "rb") as f:
            f.seek(self.data_start + info.begin)
            buf = f.read(size)
        if len(buf) != size:
            raise FormatError(
                f"tensor '{name}' ends past the end of the file", code="truncated", where=self.path
            )
        return buf

    def read(self, name: str) -> torch.Tensor:
        """One tensor in its stored dtype, in a private writable buffer."""
        import torch

        from ..checkpoint import torch_dtype_of

        info = self.tensors[name]
        dtype = torch_dtype_of(info.dtype)
        buf = bytearray(self.raw(name))
        if not buf:
            return torch.empty(info.shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)

    def scalar(self, name: str) -> float:
        """A one-element float tensor's value, decoded without torch (kohya's ``alpha``)."""
        info = self.tensors[name]
        if math.prod(info.shape) != 1:
            raise FormatError(
                f"tensor '{name}' should hold one value but has shape {list(info.shape)}",
                code="bad-tensor",
                where=self.path,
            )
        raw = self.raw(name)
        if info.dtype == "F32":
            (value,) = struct.unpack("<f", raw)
        elif info.dtype == "F64":
            (value,) = struct.unpack("<d", raw)
        elif info.dtype == "F16":
            (value,) = struct.unpack("<e", raw)
        else:  # BF16: the top half of an f32
            (value,) = struct.unpack("<f", b"\x00\x00" + raw)
        return float(value)

    def data_sha256(self) -> str:
        import hashlib

        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            f.seek(self.data_start)
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()


def open_st(path: str | os.PathLike[str]) -> StFile:
    """Parse and validate a safetensors header (no tensor data read, no torch imported)."""
    from .. import limits

    p = os.fspath(path)
    head, size = read_head(p)
    limits.check_adapter_bytes(size, what="the adapter file", where=p)
    n, tensors, meta = parse_container(head, size, p, dtypes=SOURCE_DTYPES)
    # A target has two factors (and kohya an alpha, PEFT an embedding copy): bound the tensors.
    limits.check_targets(len(tensors) // 2, where=p)
    return StFile(p, size, C.HEADER_LENGTH_BYTES + n, tensors, meta)


def read_json(path: str | os.PathLike[str], *, what: str, code: str = "bad-config") -> Any:
    """A small JSON file, bounded and strict (no NaN, no duplicate keys)."""
    from .. import limits
    from ..format import strict_loads

    p = os.fspath(path)
    limit = limits.max_json_bytes()
    try:
        limits.check_json_bytes(os.path.getsize(p), what=what, where=p)
        with open(p, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise FormatError(f"cannot read {what} ({e.strerror})", code=code, where=p) from None
    limits.check_json_bytes(len(raw), what=what, where=p)  # it grew since the stat
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise FormatError(f"{what} is not UTF-8", code=code, where=p) from None
    limits.check_json(text, what=what, where=p)
    return strict_loads(text, code=code, what=what, where=p)


def st_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The file ``safetensors.torch.save`` writes (its tensor order is what kohya hashes)."""
    from safetensors.torch import save

    return save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=metadata)


def json_text(value: Any) -> str:
    """Readable, deterministic JSON for config files we write."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
