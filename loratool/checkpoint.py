"""Base checkpoints, read header-first and tensor by tensor: one file or a sharded HF directory.

A ``Checkpoint`` validates every shard's safetensors header (the same container rules as adapters,
with every safetensors dtype allowed), maps tensor names to shards, and reads one tensor at a
time with ``os.pread`` into a private buffer, so resident memory stays at one tensor rather than
a memory-mapped shard. It also resolves an adapter's module names against the checkpoint's keys
and computes the base fingerprint (spec §4.3) that binds adapters to it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import kinds, tied
from .adapter import Adapter, fingerprint
from .errors import CompatibilityError, FormatError
from .format import TensorInfo, is_pickle, parse_container, read_head

if TYPE_CHECKING:
    import torch

# Every dtype the safetensors format defines, with its element size in bytes.
ALL_DTYPES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# diffusers model folders (unet/, transformer/, vae/) name their weights differently; the index
# and the shards follow the same Hugging Face rules (diffusers.utils.constants).
DIFFUSERS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_SINGLE_NAME = "diffusion_pytorch_model.safetensors"
LAYOUTS = ((INDEX_NAME, SINGLE_NAME), (DIFFUSERS_INDEX_NAME, DIFFUSERS_SINGLE_NAME))


@dataclass(frozen=True)
class Entry:
    shard: Path
    info: TensorInfo
    data_start: int  # absolute offset of the shard's data section


def torch_dtype_of(name: str) -> torch.dtype:
    import torch

    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    }  # fmt: skip
    return table[name]


def safetensors_dtype_of(dtype: torch.dtype) -> str:
    for name in ALL_DTYPES:
        if torch_dtype_of(name) == dtype:
            return name
    raise FormatError(f"dtype {dtype} has no safetensors name", code="dtype")


class Checkpoint:
    """A base model's weights: ``path`` is a HF directory or a single ``.safetensors`` file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.is_dir = self.path.is_dir()
        self.index: dict[str, object] | None = None  # the parsed index.json of a sharded dir
        self.index_name = INDEX_NAME  # its file name (diffusers folders use their own)
        self._aliases: dict[str, str] | None = None  # module weight → key (single-file SD)
        self.shards = self._find_shards()
        self.entries: dict[str, Entry] = {}
        self.shard_metadata: dict[Path, dict[str, str]] = {}
        self.shard_tensors: dict[Path, list[str]] = {}
        for shard in self.shards:
            head, size = read_head(str(shard))
            n, tensors, meta = parse_container(head, size, str(shard), dtypes=ALL_DTYPES)
            self.shard_metadata[shard] = meta
            self.shard_tensors[shard] = sorted(tensors, key=lambda k: tensors[k].begin)
            for name, info in tensors.items():
                if name in self.entries:
                    raise FormatError(
                        f"tensor '{name}' appears in two shards",
                        code="duplicate-key",
                        where=str(shard),
                    )
                self.entries[name] = Entry(shard, info, 8 + n)

    def _find_shards(self) -> list[Path]:
        p = self.path
        if not p.exists():
            raise FormatError(
                "no such file or directory", code="not-found", where=str(p), hint="check the path"
            )
        if not p.is_dir():
            if is_pickle(p):
                raise FormatError(
                    "pickle checkpoints are never loaded", code="pickle", where=str(p),
                    hint="save the model with safetensors (save_pretrained(..., safe_serialization=True))",
                )  # fmt: skip
            return [p]
        for index_name, single_name in LAYOUTS:
            shards = self._layout_shards(p / index_name, p / single_name)
            if shards is not None:
                return shards
        pickles = [f.name for f in p.iterdir() if is_pickle(f)]
        hint = (
            f"found only pickle weights ({', '.join(sorted(pickles))}); re-save them with safetensors"
            if pickles
            else f"expected {SINGLE_NAME} or {DIFFUSERS_SINGLE_NAME} (or their index.json)"
        )
        raise FormatError(
            "no safetensors weights in this directory", code="not-found", where=str(p), hint=hint
        )

    def _layout_shards(self, index: Path, single: Path) -> list[Path] | None:
        """The shards an index lists, the single weights file, or None when neither is here."""
        if index.exists():
            try:
                doc = json.loads(index.read_text())
                weight_map = doc["weight_map"]
                names = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise FormatError(
                    f"unreadable index ({e})", code="bad-index", where=str(index)
                ) from None
            self.index, self.index_name = doc, index.name
            shards = []
            for name in names:
                if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
                    raise FormatError(
                        f"shard name {name!r} is not a plain file name",
                        code="bad-index",
                        where=str(index),
                    )
                if not (index.parent / name).exists():
                    raise FormatError(
                        f"shard '{name}' listed in the index is missing",
                        code="bad-index",
                        where=str(index),
                    )
                shards.append(index.parent / name)
            return shards
        if single.exists():
            return [single]
        return None

    # -- names and shapes ---------------------------------------------------------------------

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].info.shape

    def dtype(self, name: str) -> str:
        return self.entries[name].info.dtype

    def resolve(self, module: str, suffix: str = ".weight") -> str | None:
        """The key of ``module``'s weight (``suffix``: ``.bias`` for spec 1.1's bias-only
        targets) here, tolerating a wrapper prefix on either side.

        HF checkpoints sometimes drop or add the model's base prefix (``transformer.``,
        ``model.``, ``bert.``) relative to module paths; a unique match is accepted.
        """
        exact = module + suffix
        if exact in self.entries:
            return exact
        alias = self.aliases().get(exact)
        if alias is not None:
            return alias
        if module.startswith(("lora_", "lycoris_")):  # a kohya name: its one underscored match
            from .layouts import kohya_index, kohya_key

            cache = self.__dict__.setdefault("_kohya", {})  # per suffix, built once
            if suffix not in cache:
                cache[suffix] = kohya_index([*self.entries, *self.aliases()], suffix)
            hit = kohya_key(module, cache[suffix])
            if hit is not None:
                return self.aliases().get(hit, hit)
        candidates = {k for k in self.entries if k.endswith("." + exact)}
        parts = module.split(".", 1)
        if len(parts) == 2 and parts[1] + suffix in self.entries:
            candidates.add(parts[1] + suffix)
        if not candidates and suffix == ".weight" and module.rsplit(".", 1)[-1] == tied.HEAD:
            return tied.tied_embedding(self.path, self.entries)  # a tied head: the embedding's
        return candidates.pop() if len(candidates) == 1 else None

    def aliases(self) -> dict[str, str]:
        """diffusers weight names → keys, for an original SD single-file checkpoint (else {})."""
        if getattr(self, "_aliases", None) is None:  # subclasses may skip __init__
            from .layouts import is_single_file_sd, unet_aliases

            keys = self.entries.keys()
            self._aliases = unet_aliases(keys) if is_single_file_sd(keys) else {}
        assert self._aliases is not None
        return self._aliases

    def fingerprint_for(self, adapter: Adapter) -> str:
        """Spec §4.3 fingerprint of this base over the adapter's target names (as the adapter names them)."""
        pairs = []
        for t in adapter.targets.values():
            key = self.resolve(t.name, t.weight_name[len(t.name) :])
            pairs.append((t.weight_name, self.shape(key) if key else ()))
        return fingerprint(pairs)

    def check_fits(self, adapter: Adapter, *, force: bool = False) -> dict[str, str]:
        """Map each target to its weight key, or raise ``CompatibilityError`` naming the first misfit.

        With ``force`` a differing fingerprint is accepted, but missing modules and wrong shapes
        never are (the add would fail or silently broadcast).
        """
        keys: dict[str, str] = {}
        for t in sorted(adapter.targets.values(), key=lambda t: t.name):
            key = self.resolve(t.name, t.weight_name[len(t.name) :])  # M.bias for bias-only kinds
            if key is None:
                raise CompatibilityError(
                    f"target '{t.name}' has no weight in the base",
                    code="missing-module",
                    where=str(self.path),
                    hint="is this the base model the adapter was trained on?",
                )
            fit = getattr(kinds.get(t.kind), "fit_shape", None)  # LoHa/LoKr convs: the kernel
            if fit is not None:
                fit(t, tuple(self.shape(key)))
            if tuple(self.shape(key)) != tuple(t.weight_shape):
                raise CompatibilityError(
                    f"target '{t.name}' expects weight shape {list(t.weight_shape)} but '{key}' is {list(self.shape(key))}",
                    code="shape-mismatch",
                    where=str(self.path),
                    hint="the adapter was made for a different base model",
                )
            keys[t.name] = key
        recorded = adapter.binding().fingerprint
        if not force and recorded != self.fingerprint_for(adapter):
            raise CompatibilityError(
                "the base's fingerprint differs from the adapter's binding",
                code="fingerprint-mismatch",
                where=str(self.path),
                hint="pass --force to apply it anyway",
            )
        return keys

    # -- data ---------------------------------------------------------------------------------

    def read_bytes(self, name: str) -> bytearray:
        e = self.entries[name]
        buf = bytearray(e.info.end - e.info.begin)
        self.read_into(name, memoryview(buf))
        return buf

    def read_into(
        self, name: str, out: memoryview, *, offset: int = 0, fd: int | None = None
    ) -> None:
        """Fill ``out`` with bytes ``offset .. offset + len(out)`` of tensor ``name`` (pread).

        ``out`` may be any writable buffer, e.g. pinned memory a GPU copies from. ``fd``: the
        tensor's shard already open (``shard_of``), for a caller reading it in many blocks.
        """
        e = self.entries[name]
        size = len(out)
        if offset < 0 or offset + size > e.info.end - e.info.begin:
            raise ValueError(f"bytes {offset}..{offset + size} are outside tensor '{name}'")
        if fd is None:
            with open(e.shard, "rb", buffering=0) as f:
                _pread(e, name, out, offset, f.fileno())
        else:
            _pread(e, name, out, offset, fd)

    def shard_of(self, name: str) -> Path:
        """The file that holds tensor ``name``."""
        return self.entries[name].shard

    def read(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype, in a private (not memory-mapped) buffer."""
        import torch

        info = self.entries[name].info
        buf = self.read_bytes(name)
        if not buf:
            return torch.empty(info.shape, dtype=torch_dtype_of(info.dtype))
        return torch.frombuffer(buf, dtype=torch_dtype_of(info.dtype)).reshape(info.shape)

    def other_files(self) -> Iterable[Path]:
        """Non-weight files of a checkpoint directory (config, tokenizer, ...), top level and below."""
        if not self.is_dir:
            return []
        skip = {*self.shards, self.path / self.index_name}
        return sorted(f for f in self.path.rglob("*") if f.is_file() and f not in skip)


def _pread(e: Entry, name: str, out: memoryview, offset: int, fd: int) -> None:
    pos, size = 0, len(out)
    while pos < size:
        got = os.preadv(fd, [out[pos:]], e.data_start + e.info.begin + offset + pos)
        if got <= 0:
            raise FormatError(
                f"tensor '{name}' ends past the end of the file",
                code="truncated",
                where=str(e.shard),
            )
        pos += got
