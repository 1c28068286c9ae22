"""Writing an adapter file in canonical bytes (spec §5): the same content, the same file."""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .. import constants as C
from .._io import atomic_write
from ..adapter import Adapter, Target, install_writer
from ..dtypes import dtype_name
from ..errors import FormatError
from .header import check_target
from .strictjson import canonical_json

if TYPE_CHECKING:
    import torch


def _tensor_bytes(x: torch.Tensor) -> bytes:
    import torch

    x = x.detach().to("cpu").contiguous()
    if x.numel() == 0:
        return b""
    return (
        x.reshape(-1).view(torch.uint8).numpy().tobytes()
    )  # native order: little-endian (x86, arm)


def _validate_for_write(adapter: Adapter) -> None:
    import torch

    if not adapter.targets:
        raise FormatError("the adapter has no targets", code="no-targets")
    for name, t in adapter.targets.items():
        if name != t.name:
            raise FormatError(
                f"target stored under '{name}' is named '{t.name}'", code="bad-target"
            )
        check_target(name, t.header(), "<adapter>")  # the same field checks the reader applies
        if "pending" in t.fields:  # e.g. a PEFT tokens target before convert --base
            raise FormatError(f"target '{name}': {t.fields['pending']}", code="needs-base")
        if t.plain:
            a, b = t.lora_A, t.lora_B
            if tuple(a.shape) != (t.rank, t.in_features) or tuple(b.shape) != (
                t.out_features,
                t.rank,
            ):
                raise FormatError(
                    f"target '{name}': lora_A {list(a.shape)} / lora_B {list(b.shape)} do not "
                    f"match rank {t.rank}, in {t.in_features}, out {t.out_features}",
                    code="shape-mismatch",
                )
            if a.dtype != b.dtype:
                raise FormatError(
                    f"target '{name}': lora_A is {a.dtype}, lora_B is {b.dtype}",
                    code="dtype-mismatch",
                )
        tensors = t.tensors()
        for part, shape in t.parts().items():  # §3.5–3.6 parts, the same rules
            x = tensors[part]
            if tuple(x.shape) != shape:
                raise FormatError(
                    f"target '{name}': {part} is {list(x.shape)}, its kind needs {list(shape)}",
                    code="shape-mismatch",
                )
        if len({x.dtype for x in tensors.values()}) > 1:
            got = ", ".join(f"{p} {x.dtype}" for p, x in tensors.items())
            raise FormatError(f"target '{name}' mixes dtypes: {got}", code="dtype-mismatch")
        for x in tensors.values():
            dtype_name(x.dtype)
            if not bool(torch.isfinite(x).all()):
                raise FormatError(f"target '{name}' has NaN or Inf values", code="non-finite")


def serialize(adapter: Adapter) -> list[bytes]:
    """The canonical file as chunks: 8-byte length, padded header, then tensor data."""
    _validate_for_write(adapter)
    tensors = adapter.state_dict()
    # Widest dtype first, then by name: every tensor is aligned to its element size (spec §5).
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    entries: dict[str, Any] = {}
    blobs: list[bytes] = []
    pos = 0
    sha = hashlib.sha256()
    for name in order:
        blob = _tensor_bytes(tensors[name])
        entries[name] = {
            "dtype": dtype_name(tensors[name].dtype),
            "shape": list(tensors[name].shape),
            "data_offsets": [pos, pos + len(blob)],
        }
        pos += len(blob)
        sha.update(blob)
        blobs.append(blob)

    meta = dict(adapter.metadata)
    requires = adapter.requires  # §4.1: 1.1 only when a feature needs it; 1.0 bytes otherwise
    meta.pop(C.REQUIRES_KEY, None)
    if requires:
        meta[C.REQUIRES_KEY] = canonical_json(requires)
    meta.update(
        {
            C.FORMAT_KEY: C.FORMAT_MARKER,
            C.VERSION_KEY: C.FORMAT_VERSION_11 if requires else C.FORMAT_VERSION,
            C.TARGETS_KEY: canonical_json({n: t.header() for n, t in adapter.targets.items()}),
            C.BASE_KEY: canonical_json(adapter.binding().header()),
            C.SHA256_KEY: sha.hexdigest(),
        }
    )
    if adapter.provenance:
        meta[C.PROVENANCE_KEY] = canonical_json(adapter.provenance)
    else:
        meta.pop(C.PROVENANCE_KEY, None)
    entries[C.METADATA_KEY] = meta
    header = canonical_json(entries).encode("utf-8")
    header += b" " * (-len(header) % C.HEADER_ALIGNMENT)
    return [struct.pack("<Q", len(header)), header, *blobs]


def to_bytes(adapter: Adapter) -> bytes:
    return b"".join(serialize(adapter))


def save(adapter: Adapter, path: str | os.PathLike[str], *, force: bool = False) -> None:
    """Validate, then write canonical bytes atomically; refuses an existing path without ``force``."""
    from .._io import check_output

    check_output(path, force=force)  # fail before serialising a large adapter
    chunks = serialize(adapter)
    atomic_write(path, chunks, force=force)


def iter_targets(adapter: Adapter) -> Iterator[Target]:
    """Targets in name order, the order reports and writers use."""
    for name in sorted(adapter.targets):
        yield adapter.targets[name]


install_writer(save)
