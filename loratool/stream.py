"""Streaming safetensors output: the header is planned up front, then tensors land one at a time.

A safetensors header names every tensor's dtype, shape and byte range, so it can be written
before any data exists; ``SafetensorsWriter`` does that and then accepts each tensor, whole or in
parts, at its planned offset (``os.pwrite``), in any order. Nothing is buffered beyond what the
caller hands over, so writing a multi-GB shard costs the memory of one tensor, and copying an
untouched tensor from another safetensors file costs none (``copy_file_range``, in the kernel).
``close`` checks that every byte of every tensor was written exactly once.

Also here: ``aligned_order`` (widest dtype first, so every tensor starts aligned to its element
size, as the safetensors library lays files out), ``plan_shards`` / ``shard_names`` (Hugging Face
``model-0000k-of-0000n.safetensors`` sharding) and ``write_index`` (the ``index.json``).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .checkpoint import ALL_DTYPES, INDEX_NAME
from .errors import FormatError

if TYPE_CHECKING:
    import torch

# Pages written are handed to the kernel's write-back as soon as a tensor is complete
# (POSIX_FADV_DONTNEED starts write-back of dirty pages and drops clean ones), so the final fsync
# of an atomic output finds little left to do, and a multi-GB output does not crowd the page
# cache of a shared machine. It never affects our resident memory: nothing here maps files.
_ADVISE = hasattr(os, "posix_fadvise")
_COPY_CHUNK = 64 << 20  # bytes per copy_file_range / fallback read when copying a tensor


@dataclass(frozen=True)
class TensorSpec:
    """What the header says about one tensor: name, safetensors dtype name, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * ALL_DTYPES[self.dtype]


def aligned_order(specs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """``specs`` stably sorted widest element first: every tensor then starts aligned to its size.

    The order of equally wide tensors is kept, so a file that was already laid out this way (as
    the safetensors library writes them) keeps its order exactly.
    """
    return sorted(specs, key=lambda s: -ALL_DTYPES[s.dtype])


def plan_header(
    specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None, *, reserve: int = 0
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The 8-byte length plus the space-padded JSON header, and each tensor's data offsets.

    Tensors are laid out contiguously in the order given (see ``aligned_order``); the header is
    padded to a multiple of 8 bytes so the data section starts 8-byte aligned, after ``reserve``
    extra spaces that let ``rewrite_metadata`` grow the metadata in place later (JSON allows
    trailing whitespace; the safetensors library pads its own headers the same way).
    """
    doc: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise FormatError("safetensors metadata must map strings to strings", code="metadata")
        doc["__metadata__"] = dict(metadata)
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for s in specs:
        if s.name in offsets or s.name == "__metadata__":
            raise FormatError(f"tensor '{s.name}' planned twice", code="duplicate-key")
        if s.dtype not in ALL_DTYPES:
            raise FormatError(f"tensor '{s.name}' has unknown dtype {s.dtype!r}", code="dtype")
        offsets[s.name] = (pos, pos + s.nbytes)
        doc[s.name] = {
            "dtype": s.dtype,
            "shape": list(s.shape),
            "data_offsets": [pos, pos + s.nbytes],
        }
        pos += s.nbytes
    header = _encode(doc, len(_encode(doc, 0)) + reserve)
    return struct.pack("<Q", len(header)) + header, offsets


def _encode(doc: Mapping[str, Any], at_least: int) -> bytes:
    """Compact JSON padded with spaces to ``at_least`` bytes, then to a multiple of 8."""
    header = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header += b" " * max(0, at_least - len(header))
    return header + b" " * (-len(header) % 8)


def rewrite_metadata(path: str | os.PathLike[str], metadata: Mapping[str, str]) -> None:
    """Replace a finished file's ``__metadata__`` in place, within its header's padding.

    Tensor entries and data are untouched; raises ``ValueError`` when the new header would not
    fit (reserve more with ``SafetensorsWriter(..., reserve=)``).
    """
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        doc = json.loads(f.read(n))
        new: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        new.update((k, v) for k, v in doc.items() if k != "__metadata__")
        header = _encode(new, n)
        if len(header) != n:
            raise ValueError(f"{path}: new metadata needs {len(header) - n} more header bytes")
        f.seek(8)
        f.write(header)


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (any dtype, bf16 included)."""
    import torch

    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    array: Any = flat.view(torch.uint8).numpy()  # numpy's stubs do not say it is a Buffer
    return memoryview(array).cast("B")


def _buffer(data: Any) -> memoryview:
    """A flat byte view of ``data``: bytes-like, or a CPU torch tensor (no copy when contiguous)."""
    if isinstance(data, bytes | bytearray | memoryview):
        return memoryview(data).cast("B")
    import torch

    if not isinstance(data, torch.Tensor):
        raise TypeError(f"cannot write {type(data).__name__}")
    t = data.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return byte_view(t.contiguous())


class SafetensorsWriter:
    """Write one safetensors file whose header is known before its data.

    ``path`` is created exclusively (it must not exist); write into a temporary location and
    rename it (``loratool._io``) to make the output atomic. Every tensor must be written in full,
    once, before ``close``; partial writes of one tensor may come in any order.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: Sequence[TensorSpec],
        metadata: Mapping[str, str] | None = None,
        *,
        reserve: int = 0,
        drop_cache: bool = True,
    ) -> None:
        self.path = Path(path)
        self.specs = {s.name: s for s in specs}
        self.head, self.offsets = plan_header(specs, metadata, reserve=reserve)
        self.size = len(self.head) + sum(s.nbytes for s in specs)
        self._todo = {s.name: s.nbytes for s in specs}
        self._parts: dict[str, list[tuple[int, int]]] = {}  # byte ranges written so far
        self._copy_range = hasattr(os, "copy_file_range")
        self._drop_cache = drop_cache and _ADVISE
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            self._pwrite(memoryview(self.head), 0)
            os.ftruncate(self.fd, self.size)
            _reserve(self.fd, self.size)
        except BaseException:
            self._abort()
            raise

    # -- writing --------------------------------------------------------------------------------

    def _pwrite(self, view: memoryview, pos: int) -> None:
        assert self.fd is not None, "writer is closed"
        while view:
            n = os.pwrite(self.fd, view, pos)
            if n <= 0:
                raise OSError(f"{self.path}: write returned {n}")
            view, pos = view[n:], pos + n

    def _span(self, name: str, offset: int, nbytes: int) -> int:
        """Absolute file position for bytes [offset, offset+nbytes) of tensor ``name``."""
        if name not in self.offsets:
            raise KeyError(f"tensor '{name}' is not in this file's header")
        begin, end = self.offsets[name]
        if offset < 0 or begin + offset + nbytes > end:
            raise ValueError(
                f"tensor '{name}': bytes {offset}..{offset + nbytes} "
                f"outside its {end - begin} bytes"
            )
        if nbytes:
            _claim(self._parts.setdefault(name, []), offset, offset + nbytes, name)
        return len(self.head) + begin + offset

    def _done(self, name: str, pos: int, nbytes: int) -> None:
        self._todo[name] -= nbytes
        if self._drop_cache and self._todo[name] == 0:
            begin, end = self.offsets[name]
            with contextlib.suppress(OSError):
                assert self.fd is not None
                os.posix_fadvise(
                    self.fd, len(self.head) + begin, end - begin, os.POSIX_FADV_DONTNEED
                )

    def write(self, name: str, data: torch.Tensor | bytes | bytearray | memoryview) -> None:
        """All of tensor ``name``'s bytes (a tensor must already be in the header's dtype)."""
        self.write_part(name, 0, data)
        if self._todo[name]:
            raise ValueError(f"tensor '{name}': {self._todo[name]} bytes short")

    def write_part(
        self, name: str, offset: int, data: torch.Tensor | bytes | bytearray | memoryview
    ) -> None:
        """Bytes of tensor ``name`` starting ``offset`` bytes into it."""
        self._check_dtype(name, data)
        view = _buffer(data)
        pos = self._span(name, offset, len(view))
        self._pwrite(view, pos)
        self._done(name, pos, len(view))

    def copy_from(
        self, name: str, src_fd: int, src_pos: int, *, offset: int = 0, nbytes: int | None = None
    ) -> None:
        """Copy tensor bytes straight from another file (``copy_file_range``: no user memory)."""
        if nbytes is None:
            nbytes = self._todo[name]
        pos = self._span(name, offset, nbytes)
        assert self.fd is not None, "writer is closed"
        left, src, dst = nbytes, src_pos, pos
        while left:
            n = -1
            if self._copy_range:
                try:
                    n = os.copy_file_range(src_fd, self.fd, min(left, _COPY_CHUNK), src, dst)
                except OSError:  # e.g. across file systems on older kernels: copy by hand
                    self._copy_range = False
            if n < 0:
                n = self._copy_slow(src_fd, src, dst, min(left, _COPY_CHUNK))
            if n <= 0:
                raise FormatError(
                    f"tensor '{name}': source ended {left} bytes early", code="truncated"
                )
            left, src, dst = left - n, src + n, dst + n
        self._done(name, pos, nbytes)

    def _copy_slow(self, src_fd: int, src: int, dst: int, n: int) -> int:
        data = os.pread(src_fd, n, src)
        self._pwrite(memoryview(data), dst)
        return len(data)

    def read_back(self, name: str) -> bytes:
        """The bytes written so far for tensor ``name`` (for a rare error path's diagnosis)."""
        assert self.fd is not None, "writer is closed"
        begin, end = self.offsets[name]
        return os.pread(self.fd, end - begin, len(self.head) + begin)

    def _check_dtype(self, name: str, data: Any) -> None:
        if isinstance(data, bytes | bytearray | memoryview):
            return  # raw bytes: the size check is all we can do
        from .checkpoint import safetensors_dtype_of

        spec = self.specs.get(name)
        if spec is not None and safetensors_dtype_of(data.dtype) != spec.dtype:
            raise ValueError(f"tensor '{name}' is {data.dtype} but the header says {spec.dtype}")

    # -- finishing ------------------------------------------------------------------------------

    @property
    def missing(self) -> list[str]:
        return [name for name, left in self._todo.items() if left]

    def close(self) -> int:
        """Check completeness and close; returns the file size. The caller fsyncs (atomic_dir)."""
        if self.fd is None:
            return self.size
        missing = self.missing
        if missing:
            self._abort()
            raise ValueError(
                f"{self.path.name}: {len(missing)} tensors not written, e.g. '{missing[0]}'"
            )
        fd, self.fd = self.fd, None
        os.close(fd)
        return self.size

    def abort(self) -> None:
        """Close without the completeness check (the file is abandoned); safe to call twice.

        A caller that drops a writer on an error must call this (or use ``with``): the open
        descriptor would otherwise keep the deleted file's blocks allocated, which on a full
        disk is exactly the space the user needs back.
        """
        self._abort()

    def _abort(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            self._abort()


def _reserve(fd: int, size: int) -> None:
    """Allocate the file's blocks now: a full disk fails here, before any tensor is computed
    (``ENOSPC``/``EDQUOT``/``EFBIG``, which ``loratool._io`` reports as disk-full), not midway;
    and the blocks come out contiguous. Filesystems without ``fallocate`` just skip it."""
    if not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


def _claim(parts: list[tuple[int, int]], a: int, b: int, name: str) -> None:
    """Add byte range [a, b) to ``parts`` (sorted, disjoint, touching ranges joined) or refuse
    an overlap: O(log n) per part, so a weight written in thousands of blocks stays cheap."""
    i = bisect.bisect_left(parts, (a, a))
    if (i and parts[i - 1][1] > a) or (i < len(parts) and parts[i][0] < b):
        raise ValueError(f"tensor '{name}': bytes {a}..{b} written twice")
    if i and parts[i - 1][1] == a:  # extends the range before (the usual, sequential case)
        a = parts[i - 1][0]
        i -= 1
        del parts[i]
    if i < len(parts) and parts[i][0] == b:
        b = parts[i][1]
        del parts[i]
    parts.insert(i, (a, b))


# -- sharding -------------------------------------------------------------------------------------


def shard_names(n: int, *, prefix: str = "model", suffix: str = "safetensors") -> list[str]:
    """Hugging Face shard names: ``model.safetensors`` for one, else ``model-00001-of-0000n...``."""
    if n == 1:
        return [f"{prefix}.{suffix}"]
    return [f"{prefix}-{i:05d}-of-{n:05d}.{suffix}" for i in range(1, n + 1)]


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy split in the given order, as ``save_pretrained(max_shard_size=...)`` does.

    A tensor larger than ``max_shard_bytes`` gets a shard of its own.
    """
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards if shards[0] else []


def write_index(
    directory: str | os.PathLike[str],
    weight_map: Mapping[str, str],
    *,
    total_size: int,
    metadata: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> Path:
    """Write ``<shard prefix>.safetensors.index.json`` (or ``name``): the weight map, total_size."""
    meta = {**(metadata or {}), "total_size": int(total_size)}
    doc = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
    heads = {f.split("-00")[0].removesuffix(".safetensors") for f in weight_map.values()}
    name = name or (f"{heads.pop()}.safetensors.index.json" if len(heads) == 1 else INDEX_NAME)
    path = Path(directory) / name
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path
