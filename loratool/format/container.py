"""The safetensors container layer (spec §2, rules 1–9): bounded header, entries, offsets."""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import constants as C
from .strictjson import fail, strict_loads

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_PICKLE_HINT = (
    "pickle files can run code when loaded and loratool never opens them; "
    "convert it to safetensors with the tool that made it"
)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of the safetensors header; offsets are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def is_pickle(path: str | os.PathLike[str], first_bytes: bytes = b"") -> bool:
    """A pickle or torch zip, by suffix or by magic bytes (pickle protocol 2-5 opcode, zip 'PK').

    The magic test alone is ambiguous (a safetensors header length can start with 0x80), so
    ``parse_container`` applies it only to files that are not a well-formed safetensors container.
    """
    if str(path).lower().endswith(PICKLE_SUFFIXES):
        return True
    return (
        first_bytes[:1] == b"\x80" and first_bytes[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    ) or (first_bytes[:4] == b"PK\x03\x04")


def _looks_like_safetensors(head: bytes, file_bytes: int) -> bool:
    if len(head) < C.HEADER_LENGTH_BYTES + 1:
        return False
    (n,) = struct.unpack("<Q", head[: C.HEADER_LENGTH_BYTES])
    return C.HEADER_LENGTH_BYTES + n <= file_bytes and head[8:9] == b"{"


def parse_container(
    head: bytes, file_bytes: int, where: str, *, dtypes: Mapping[str, int] = C.DTYPE_SIZES
) -> tuple[int, dict[str, TensorInfo], dict[str, str]]:
    """Validate a safetensors header given the file's first bytes (at least 8 + N of them).

    ``dtypes`` maps the dtype names allowed to their element sizes: adapters allow f32/f16/bf16,
    base checkpoints (loratool/checkpoint.py) every safetensors dtype.
    """
    if str(where).lower().endswith(PICKLE_SUFFIXES) or (
        is_pickle(where, head) and not _looks_like_safetensors(head, file_bytes)
    ):
        raise fail("pickle", "this is a pickle file, not safetensors", where, _PICKLE_HINT)
    if file_bytes < C.HEADER_LENGTH_BYTES or len(head) < C.HEADER_LENGTH_BYTES:
        raise fail(
            "truncated", f"file has {file_bytes} bytes, too short for a safetensors header", where
        )
    (n,) = struct.unpack("<Q", head[: C.HEADER_LENGTH_BYTES])
    if n > C.MAX_HEADER_BYTES:
        raise fail(
            "header-too-large", f"header claims {n} bytes (limit {C.MAX_HEADER_BYTES})", where
        )
    if C.HEADER_LENGTH_BYTES + n > file_bytes or len(head) < C.HEADER_LENGTH_BYTES + n:
        raise fail(
            "truncated", f"header claims {n} bytes but the file has only {file_bytes}", where
        )
    raw = head[C.HEADER_LENGTH_BYTES : C.HEADER_LENGTH_BYTES + n]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(
            "header-json", f"header is not UTF-8 ({e.reason} at byte {e.start})", where
        ) from None
    doc = strict_loads(text, code="header-json", what="the header", where=where)
    if not isinstance(doc, dict):
        raise fail("header-json", "the header is not a JSON object", where)

    meta = doc.pop(C.METADATA_KEY, {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise fail("metadata-type", f"'{C.METADATA_KEY}' must map strings to strings", where)

    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        tensors[name] = _tensor_info(name, entry, where, dtypes)
    data_bytes = file_bytes - C.HEADER_LENGTH_BYTES - n
    _check_offsets(tensors, data_bytes, where)
    return n, tensors, meta


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _tensor_info(name: str, entry: Any, where: str, dtypes: Mapping[str, int]) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise fail(
            "tensor-entry", f"tensor '{name}' needs exactly dtype, shape and data_offsets", where
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not (
        isinstance(shape, list)
        and len(shape) <= 8
        and all(_is_int(d) and 0 <= d <= C.MAX_DIM for d in shape)
    ):
        raise fail("tensor-entry", f"tensor '{name}' has an invalid shape {shape!r}", where)
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_int(o) and o >= 0 for o in offsets)
    ):
        raise fail("tensor-entry", f"tensor '{name}' has invalid data_offsets {offsets!r}", where)
    if not isinstance(dtype, str) or dtype not in dtypes:
        raise fail(
            "dtype",
            f"tensor '{name}' has dtype {dtype!r}; allowed: {', '.join(dtypes)}",
            where,
            "convert the adapter with --dtype f32|f16|bf16",
        )
    begin, end = offsets
    expected = math.prod(shape) * dtypes[dtype]
    if end - begin != expected:
        raise fail(
            "data-offsets",
            f"tensor '{name}' spans {end - begin} bytes but {dtype}{shape} needs {expected}",
            where,
        )
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _check_offsets(tensors: dict[str, TensorInfo], data_bytes: int, where: str) -> None:
    """safetensors' rule: tensors tile the data section exactly, no overlap, no hole, no tail."""
    pos = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != pos:
            what = (
                "overlaps the previous tensor"
                if info.begin < pos
                else f"leaves a hole at byte {pos}"
            )
            raise fail("data-offsets", f"tensor '{info.name}' {what}", where)
        pos = info.end
    if pos != data_bytes:
        raise fail(
            "data-offsets", f"tensors cover {pos} bytes of a {data_bytes}-byte data section", where
        )


def read_head(path: str) -> tuple[bytes, int]:
    """The first 8 + N bytes (bounded), and the file size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            first = f.read(C.HEADER_LENGTH_BYTES)
            if len(first) == C.HEADER_LENGTH_BYTES:
                (n,) = struct.unpack("<Q", first)
                if n <= min(C.MAX_HEADER_BYTES, size - C.HEADER_LENGTH_BYTES):
                    first += f.read(n)
    except IsADirectoryError:
        raise fail("not-a-file", "is a directory, not an adapter file", path) from None
    except FileNotFoundError:
        raise fail("not-found", "no such file", path, "check the path") from None
    except PermissionError:
        raise fail("not-found", "permission denied", path) from None
    return first, size
