"""The reversible sidecar: what rounding destroyed, encoded, spooled, written and read back.

Round trip: the merge also computes ``round_base(W' − ΔW)`` — the very operations ``unmerge``
performs — and counts the elements where it is not W, with the largest distance in units in the
last place of the base dtype (the number of representable values between the two; near zero a
small absolute error is many ULPs). The counts go into the output's metadata, so an unmerge
without a sidecar can say what it cannot restore. With ``reversible=True`` those elements' flat
indices and original bits go to a sidecar (``loratool-reversible.safetensors``), with the
SHA-256 of every original targeted tensor; unmerge puts them back and checks the hashes.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._io import atomic_file_in_dir
from ..checkpoint import Checkpoint, safetensors_dtype_of
from ..errors import CompatibilityError, FormatError
from ..format import canonical_json
from ..stream import SafetensorsWriter, TensorSpec, aligned_order, byte_view

if TYPE_CHECKING:
    import torch


SIDECAR_NAME = "loratool-reversible.safetensors"

SIDECAR_FORMAT = "loratool.reversible"

SIDECAR_VERSION = "1.0"


@dataclass
class Sidecar:
    """What rounding destroyed in a reversible merge: per weight, flat indices and original bits.

    ``tensors`` holds, for every weight with at least one such element, ``<key>.value`` (the
    original values, in the base's dtype) and their ascending flat indices as ``<key>.gaps``
    (U16 differences, the first counted from -1) or, when some gap does not fit, ``<key>.index``
    (I32, or I64 past 2³¹ elements); ``sha256`` is the hex SHA-256 of every targeted weight's
    original bytes, which unmerge checks its result against.
    """

    tensors: dict[str, torch.Tensor]
    sha256: dict[str, str]
    merge_id: str

    def metadata(self) -> dict[str, str]:
        return {
            "loratool.format": SIDECAR_FORMAT,
            "loratool.version": SIDECAR_VERSION,
            "loratool.merge": self.merge_id,
            "loratool.sha256s": canonical_json(self.sha256),
        }


def encode_corrections(
    key: str, index: torch.Tensor, value: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Sidecar tensors for one weight: ``<key>.value`` (the original bits, in its dtype) and the
    ascending flat indices, as ``<key>.gaps`` (U16 differences, the first from -1: 2 bytes per
    entry, used whenever every gap fits) or else ``<key>.index`` (I32, or I64 past 2³¹)."""
    import torch

    gaps = torch.diff(index, prepend=index.new_tensor([-1]))
    if int(gaps.max()) < 2**16:
        return {key + ".gaps": gaps.to(torch.uint16), key + ".value": value}
    wide = torch.int32 if int(index.max()) < 2**31 else torch.int64
    return {key + ".index": index.to(wide), key + ".value": value}


def decode_corrections(
    key: str, names: set[str] | Mapping[str, Any], fetch: Callable[[str], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    import torch

    if key + ".gaps" in names:
        index = fetch(key + ".gaps").to(torch.int64).cumsum(0) - 1
    elif key + ".index" in names:
        index = fetch(key + ".index").to(torch.int64)
    else:
        return None
    return index, fetch(key + ".value")


class Spool:
    """Sidecar payload streamed to a scratch file as it is found, so memory stays flat."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self.pos = 0
        self.items: list[tuple[TensorSpec, int]] = []
        self.lock = threading.Lock()

    def add(self, key: str, index: torch.Tensor, value: torch.Tensor) -> None:
        for spec_name, t in encode_corrections(key, index, value).items():
            spec = TensorSpec(spec_name, safetensors_dtype_of(t.dtype), (int(t.numel()),))
            data = byte_view(t.contiguous())
            with self.lock:
                pos = self.pos
                self.pos += len(data)
                self.items.append((spec, pos))
            while data:
                n = os.pwrite(self.fd, data, pos)
                data, pos = data[n:], pos + n

    def write_sidecar(self, path: Path, metadata: Mapping[str, str]) -> int:
        specs = aligned_order([s for s, _ in self.items])
        where = {s.name: pos for s, pos in self.items}
        with SafetensorsWriter(path, specs, metadata) as w:
            for s in specs:
                w.copy_from(s.name, self.fd, where[s.name])
        return w.size

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def sidecar_file_name(out_file: Path | None, depth: int) -> str:
    stem = (
        SIDECAR_NAME
        if depth == 1
        else SIDECAR_NAME.replace(".safetensors", f"-{depth}.safetensors")
    )
    return stem if out_file is None else f"{out_file.stem}.{stem}"


def write_sidecar_file(
    spool: Spool, target: Path, metadata: Mapping[str, str], *, force: bool
) -> int:
    """Write the sidecar atomically at ``target`` (an owned temp beside it, then a rename)."""
    with atomic_file_in_dir(target, force=force) as tmp:
        return spool.write_sidecar(tmp / target.name, metadata)


class SidecarSource:
    """Corrections for unmerge: from a sidecar file (read per tensor) or a ``Sidecar``."""

    def __init__(
        self, sha256: dict[str, str], fetch: Callable[[str], torch.Tensor], names: set[str]
    ) -> None:
        self.sha256 = sha256
        self._fetch = fetch
        self._names = names

    def corrections(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return decode_corrections(key, self._names, self._fetch)


def open_sidecar(
    ckpt: Checkpoint,
    top: dict[str, Any] | None,
    given: Sidecar | None,
    *,
    matched: bool,
    memory: bool,
    force: bool,
) -> SidecarSource | None:
    if not matched or top is None or not top.get("reversible"):
        return None
    if memory:
        if given is None:
            if force:
                return None
            raise CompatibilityError(
                "the merge was reversible but no sidecar was given",
                code="missing-sidecar",
                hint="pass sidecar=report.sidecar, or force=True to unmerge without it",
            )
        sc = given
        if sc.merge_id != top.get("id"):
            raise CompatibilityError(
                "the sidecar belongs to another merge", code="sidecar-mismatch"
            )
        return SidecarSource(sc.sha256, sc.tensors.__getitem__, set(sc.tensors))
    folder = ckpt.path if ckpt.is_dir else ckpt.path.parent
    path = folder / str(top["reversible"])
    if not path.exists():
        if force:
            return None
        raise CompatibilityError(
            f"the merge was reversible but its sidecar '{path.name}' is missing",
            code="missing-sidecar",
            where=str(ckpt.path),
            hint="put the sidecar back beside the weights, "
            "or pass --force to unmerge without it (not bit-exact)",
        )
    side = Checkpoint(path)
    meta = side.shard_metadata[side.shards[0]]
    if meta.get("loratool.format") != SIDECAR_FORMAT or meta.get("loratool.merge") != top.get("id"):
        raise CompatibilityError(
            f"'{path.name}' is not the sidecar of this checkpoint's last merge",
            code="sidecar-mismatch",
            where=str(path),
        )
    try:
        sha = json.loads(meta.get("loratool.sha256s", "{}"))
    except ValueError:
        raise FormatError(
            "unreadable sidecar hashes", code="bad-sidecar", where=str(path)
        ) from None
    return SidecarSource(sha, side.read, set(side.entries))
