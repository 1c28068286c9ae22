"""Reading an adapter file: the validated header first, tensors lazily, data checks on demand."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import constants as C
from ..adapter import Adapter
from ..dtypes import torch_dtype
from .container import TensorInfo, parse_container, read_head
from .header import adapter_from_tensors
from .strictjson import fail

if TYPE_CHECKING:
    import torch


@dataclass
class Header:
    """Everything ``read_header`` learns without reading tensor data."""

    path: str
    file_bytes: int
    header_bytes: int  # N, the JSON header's length including padding
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    adapter: Adapter = field(repr=False)

    @property
    def data_start(self) -> int:
        return C.HEADER_LENGTH_BYTES + self.header_bytes


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse and validate the header (rules 1–20); no tensor data is read and torch is not imported."""
    p = os.fspath(path)
    head, size = read_head(p)
    n, tensors, meta = parse_container(head, size, p)
    adapter = adapter_from_tensors(tensors, meta, p)
    header = Header(p, size, n, tensors, meta, adapter)
    for t in adapter.targets.values():
        t._loader = _Loader(header)
    return header


class _Loader:
    """Reads one tensor's bytes on demand (lazily) from a validated file."""

    def __init__(self, header: Header) -> None:
        self.header = header

    def __call__(self, name: str) -> torch.Tensor:
        import torch

        info = self.header.tensors[name]
        with open(self.header.path, "rb") as f:
            f.seek(self.header.data_start + info.begin)
            buf = bytearray(f.read(info.end - info.begin))
        if len(buf) != info.end - info.begin:
            raise fail(
                "truncated", f"tensor '{name}' ends past the end of the file", self.header.path
            )
        if not buf:
            return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        return torch.frombuffer(buf, dtype=torch_dtype(info.dtype)).reshape(info.shape)


def load(path: str | os.PathLike[str], *, verify: bool = False) -> Adapter:
    """Open an adapter; tensors load lazily on first use. ``verify`` also checks rules 21–22."""
    header = read_header(path)
    if verify:
        check_data(header)
    return header.adapter


def data_sha256(header: Header) -> str:
    h = hashlib.sha256()
    with open(header.path, "rb") as f:
        f.seek(header.data_start)
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_data(header: Header) -> None:
    """Rules 21–22: the integrity hash matches and every value is finite."""
    import torch

    actual = data_sha256(header)
    if actual != header.adapter.sha256:
        raise fail(
            "integrity",
            f"tensor data hashes to {actual[:12]}… but the header records {str(header.adapter.sha256)[:12]}…",
            header.path,
            "the file was corrupted in transit or on disk; fetch or export it again",
        )
    for t in header.adapter.targets.values():
        for name, x in ((f"{t.name}.{p}", t.part(p)) for p in t.parts()):
            if not bool(torch.isfinite(x).all()):
                raise fail("non-finite", f"tensor '{name}' contains NaN or Inf", header.path)
