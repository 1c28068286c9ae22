"""Merge adapters into a base checkpoint and take them out again: streaming, exact, reversible.

``merge(base, adapters, out)`` writes ``W' = round(W + Σ wᵢ·ΔWᵢ)`` for every targeted weight and
copies everything else, shard for shard, tensor by tensor; ``unmerge`` subtracts the same deltas.

Numerics (``apply_delta``, one function for the CPU and CUDA):
  * ΔW = Σ wᵢ·scaleᵢ·Bᵢ·Aᵢ is one matrix product of the stacked factors (an exact sum of the
    adapters), in fp32 — or in fp64 rounded once to fp32, which gives the correctly rounded ΔW
    whatever the BLAS, device or thread count: used on CUDA (no TF32 either) and for reversible
    merges, whose sidecar must match what a later unmerge on any device computes;
  * ΔW is added in fp32 to the exact fp32 upcast of W and the sum is rounded once to the output
    dtype (fp64 throughout when the weight or the output is fp64), as PEFT does;
  * ``kind`` linear adds ΔW; conv1d (GPT-2 ``Conv1D``, stored [in, out]) and embedding add ΔWᵀ.

Fidelity, per targeted weight, from the rounded output: ``retained = ‖W'−W‖/‖ΔW‖`` and
``error = ‖(W'−W) − ΔW‖/‖ΔW‖`` (‖ΔW‖ exact in fp64 from the factors' r×r Gram matrices; the other
norms from fp32 dot products over blocks of rows, summed in fp64). A target is *lossy* when
``error > 0.10`` (LOSS_THRESHOLD); by the triangle inequality this includes every target whose
``retained`` is outside 0.9 … 1.1, and also one whose delta was rotated rather than shrunk.

Round trip: the merge also computes ``round_base(W' − ΔW)`` — the very operations ``unmerge``
performs — and counts the elements where it is not W, with the largest distance in units in the
last place of the base dtype (the number of representable values between the two; near zero a
small absolute error is many ULPs). The counts go into the output's metadata, so an unmerge
without a sidecar can say what it cannot restore. With ``reversible=True`` those elements' flat
indices and original bits go to a sidecar (``loratool-reversible.safetensors``), with the
SHA-256 of every original targeted tensor; unmerge puts them back and checks the hashes.

Provenance: every output shard's ``__metadata__`` gets ``loratool.merges``, a JSON list of merge
records (adapters by content digest, weights, dtype changes, product precision, sidecar, round
trip counts); ``unmerge`` undoes the last record only when its adapters and weights match.

Streaming: a reader thread ``pread``s the next targeted weights into reusable buffers (pinned on
CUDA, where it also uploads them on its own stream); worker threads, each running single-threaded
torch ops on its own tensor (on the CPU in cache-sized blocks of rows), compute and ``pwrite`` the
result at its planned offset, or ``copy_file_range`` untouched tensors file to file. Memory is
the runtime plus a few copies of the largest *targeted* weight (2 × workers + 1), whatever the
size of the model or of its shards; nothing is memory-mapped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import queue
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import constants as C
from ._io import atomic_dir, check_output
from .adapter import Adapter, Target
from .checkpoint import ALL_DTYPES, Checkpoint, Entry, safetensors_dtype_of
from .errors import CompatibilityError, FormatError, UsageError
from .format import TensorInfo, canonical_json
from .stream import (
    SafetensorsWriter,
    TensorSpec,
    aligned_order,
    byte_view,
    rewrite_metadata,
    write_index,
)

if TYPE_CHECKING:
    import torch

RECORDS_KEY = "loratool.merges"  # shard metadata: JSON list of merge records, oldest first
SIDECAR_NAME = "loratool-reversible.safetensors"
SIDECAR_FORMAT = "loratool.reversible"
SIDECAR_VERSION = "1.0"
LOSS_THRESHOLD = 0.10  # a target is lossy when ‖(W'−W) − ΔW‖ > 10% of ‖ΔW‖
DTYPES = {"keep": None, "f32": "F32", "bf16": "BF16", "f16": "F16"}
FLOATS = ("F64", "F32", "F16", "BF16")
# Exactly representable casts: these can be undone, so they are allowed with ``reversible``.
WIDENINGS = {("F16", "F32"), ("F16", "F64"), ("BF16", "F32"), ("BF16", "F64"), ("F32", "F64")}
# Weight files of other formats beside the safetensors: copying them would ship unmerged weights.
STALE_WEIGHTS = (
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".safetensors",
)
_BLOCK = 1 << 17  # elements per block of rows on the CPU: the fp32 temporaries stay in L2


# ---------------------------------------------------------------------------------------------
# Reports


@dataclass(frozen=True)
class ProgressEvent:
    """Sent after each tensor is handed to the writer: bytes of the current output shard done."""

    shard: str
    shard_index: int
    shards: int
    done: int
    total: int
    tensor: str


Progress = Callable[[ProgressEvent], None]


@dataclass
class TargetReport:
    """One merged (or unmerged) weight: how much of ΔW it holds and what an unmerge restores."""

    key: str
    modules: list[str]
    kind: str
    shape: tuple[int, ...]
    dtype: str  # output dtype
    delta_norm: float  # ‖ΔW‖ (signed sum of the applied deltas), fp32 blocks summed in fp64
    applied_norm: float  # ‖W' − W‖ from the rounded output
    error_norm: float  # ‖(W' − W) − ΔW‖
    roundtrip_off: int = 0  # merge: elements where round_base(W' − ΔW) ≠ W
    roundtrip_max_ulp: int = 0
    corrections: int = 0  # unmerge: elements put back from the sidecar
    verified: bool | None = None  # unmerge: the result's SHA-256 equals the recorded original

    @property
    def retained(self) -> float | None:
        if self.delta_norm == 0 or not math.isfinite(self.delta_norm):
            return None
        return self.applied_norm / self.delta_norm

    @property
    def error(self) -> float | None:
        if self.delta_norm == 0 or not math.isfinite(self.delta_norm):
            return None
        return self.error_norm / self.delta_norm

    @property
    def lossy(self) -> bool:
        e = self.error
        return e is not None and e > LOSS_THRESHOLD

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "modules": self.modules,
            "kind": self.kind,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "delta_norm": _finite(self.delta_norm),
            "retained": _finite(self.retained),
            "error": _finite(self.error),
            "lossy": self.lossy,
            "roundtrip_off": self.roundtrip_off,
            "roundtrip_max_ulp": self.roundtrip_max_ulp,
            "corrections": self.corrections,
            "verified": self.verified,
        }


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


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


@dataclass
class MergeReport:
    """What a merge or unmerge did; ``state_dict`` is the result when the input was one."""

    operation: str  # "merge" or "unmerge"
    base: str
    out: str | None
    adapters: list[dict[str, Any]]
    dtype: str
    device: str
    targets: list[TargetReport]
    record: dict[str, Any]  # the provenance record written (merge) or undone (unmerge)
    shards: list[str] = field(default_factory=list)
    base_bytes: int = 0
    out_bytes: int = 0
    sidecar_name: str | None = None
    sidecar_bytes: int = 0
    copied_files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    exact: str = "n/a"  # unmerge: "verified", "mismatch" or "unknown" (no sidecar)
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    sidecar: Sidecar | None = field(default=None, repr=False)

    @property
    def lossy(self) -> list[TargetReport]:
        return [t for t in self.targets if t.lossy]

    def summary(self) -> dict[str, Any]:
        d2 = sum(t.delta_norm**2 for t in self.targets)
        a2 = sum(t.applied_norm**2 for t in self.targets)
        e2 = sum(t.error_norm**2 for t in self.targets)
        rated = [t for t in self.targets if t.retained is not None]
        worst = max(rated, key=lambda t: t.error or 0.0, default=None)
        elements = sum(math.prod(t.shape) for t in self.targets)
        off = sum(t.roundtrip_off for t in self.targets)
        return {
            "targets": len(self.targets),
            "elements": elements,
            "lossy": len(self.lossy),
            "loss_threshold": LOSS_THRESHOLD,
            "retained": _finite(math.sqrt(a2 / d2)) if d2 > 0 else None,
            "error": _finite(math.sqrt(e2 / d2)) if d2 > 0 else None,
            "min_retained": _finite(min((t.retained or 0.0) for t in rated)) if rated else None,
            "max_retained": _finite(max((t.retained or 0.0) for t in rated)) if rated else None,
            "worst": None if worst is None else {"key": worst.key, "error": _finite(worst.error)},
            "roundtrip_off": off,
            "roundtrip_fraction": off / elements if elements else 0.0,
            "roundtrip_max_ulp": max((t.roundtrip_max_ulp for t in self.targets), default=0),
            "corrections": sum(t.corrections for t in self.targets),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "base": self.base,
            "out": self.out,
            "adapters": self.adapters,
            "dtype": self.dtype,
            "device": self.device,
            "shards": self.shards,
            "base_bytes": self.base_bytes,
            "out_bytes": self.out_bytes,
            "summary": self.summary(),
            "reversible": None
            if self.sidecar_name is None
            else {
                "sidecar": self.sidecar_name,
                "bytes": self.sidecar_bytes,
                "fraction_of_base": self.sidecar_bytes / self.base_bytes
                if self.base_bytes
                else None,
            },
            "exact": self.exact,
            "record": self.record,
            "copied_files": self.copied_files,
            "skipped_files": self.skipped_files,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
            "targets": [t.to_json() for t in self.targets],
        }


# ---------------------------------------------------------------------------------------------
# Inputs: the base (a checkpoint or a state dict) and the adapters


class MemoryCheckpoint(Checkpoint):
    """A state dict seen through ``Checkpoint``'s interface (names, shapes, resolve, check_fits)."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:  # no super(): nothing to parse
        self.path = Path("<state dict>")
        self.is_dir = False
        self.index = None
        self.shards = []
        self.shard_metadata = {}
        self.shard_tensors = {}
        self.state = state
        self.entries = {}
        for name, t in state.items():
            shape = tuple(int(d) for d in t.shape)
            info = TensorInfo(name, safetensors_dtype_of(t.dtype), shape, 0, 0)
            self.entries[name] = Entry(self.path, info, 0)

    def read(self, name: str) -> torch.Tensor:
        return self.state[name]


@dataclass
class _Input:
    adapter: Adapter
    name: str
    format: str
    weight: float
    file_sha256: str | None
    digest: str = ""  # filled by _digest, once the adapter is known to fit
    keys: dict[str, str] = field(default_factory=dict)  # target name -> base weight key

    def entry(self) -> dict[str, Any]:
        binding = self.adapter.binding()
        return {
            "name": self.name,
            "format": self.format,
            "digest": self.digest,
            "sha256": self.file_sha256,
            "fingerprint": binding.fingerprint,
            "hub_id": binding.hub_id,
            "targets": len(self.adapter.targets),
            "weight": self.weight,
        }


def adapter_digest(adapter: Adapter) -> str:
    """``sha256:`` over the canonical target manifest and every factor's name, dtype, shape, bytes.

    Independent of the file format: a PEFT directory and its loratool conversion (same dtype)
    have the same digest, so either can unmerge what the other merged. Raises ``FormatError``
    for NaN or Inf factors. Factors are read one target at a time and not kept.
    """
    import torch

    h = hashlib.sha256()
    h.update(
        canonical_json({n: adapter.targets[n].header() for n in sorted(adapter.targets)}).encode()
    )
    for name in sorted(adapter.targets):
        fresh = adapter.targets[name].replace()  # a copy: loading it leaves the adapter lazy
        for suffix, x in ((C.LORA_A_SUFFIX, fresh.lora_A), (C.LORA_B_SUFFIX, fresh.lora_B)):
            x = x.detach().cpu().contiguous()
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise FormatError(
                    f"tensor '{name}{suffix}' contains NaN or Inf",
                    code="non-finite",
                    where=adapter.path,
                    hint="the adapter is broken; nothing was written",
                )
            h.update(f"{name}{suffix}:{safetensors_dtype_of(x.dtype)}:{list(x.shape)}\n".encode())
            if x.numel():
                h.update(byte_view(x))
    return "sha256:" + h.hexdigest()


def _open_inputs(
    adapters: Sequence[str | os.PathLike[str] | Adapter], weights: Sequence[float] | None
) -> list[_Input]:
    from .format import data_sha256
    from .sources import open_adapter

    if not adapters:
        raise UsageError("no adapters given", hint="name at least one ADAPTER")
    if weights is not None and len(weights) != len(adapters):
        raise UsageError(
            f"{len(weights)} weights for {len(adapters)} adapters",
            code="weights",
            hint="give one --weight per adapter, in the same order, or none (all 1.0)",
        )
    inputs = []
    for i, a in enumerate(adapters):
        w = 1.0 if weights is None else float(weights[i])
        if not math.isfinite(w):
            raise UsageError(f"weight {w} is not finite", code="weights")
        if isinstance(a, Adapter):
            name = Path(a.path).name if a.path else f"adapter[{i}]"
            inputs.append(_Input(a, name, "memory", w, a.sha256))
            continue
        opened = open_adapter(a)
        file_sha = None
        if opened.header is not None:  # a loratool file: check its integrity hash first
            file_sha = opened.adapter.sha256
            if data_sha256(opened.header) != file_sha:
                raise FormatError(
                    "tensor data does not match the recorded sha256",
                    code="integrity",
                    where=opened.path,
                    hint="the file was corrupted; fetch or export it again",
                )
        if opened.adapter.path is None:
            opened.adapter.path = opened.path
        name = Path(opened.path).name or str(a)
        inputs.append(_Input(opened.adapter, name, opened.format, w, file_sha))
    return inputs


def _digest(inputs: list[_Input]) -> None:
    """Read every factor once: content digests for provenance, and NaN/Inf refused."""
    for inp in inputs:
        inp.digest = adapter_digest(inp.adapter)


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda but no CUDA device is available",
            code="no-cuda",
            hint="use --device cpu or auto",
        )
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}", code="device", hint="auto, cpu or cuda")
    return device


# ---------------------------------------------------------------------------------------------
# Planning: which weights change, into which dtype


@dataclass
class _Job:
    key: str
    in_dtype: str
    out_dtype: str
    shape: tuple[int, ...]
    terms: list[tuple[Target, float]] = field(default_factory=list)  # (target, signed weight)

    @property
    def targeted(self) -> bool:
        return bool(self.terms)


def _plan(
    base: Checkpoint,
    inputs: list[_Input],
    *,
    sign: float,
    out_dtype: Callable[[str, str], str],
    force: bool,
) -> dict[str, _Job]:
    """Check every adapter against the base (before anything is written) and plan each tensor."""
    jobs = {
        name: _Job(name, e.info.dtype, out_dtype(name, e.info.dtype), e.info.shape)
        for name, e in base.entries.items()
    }
    for inp in inputs:
        inp.keys = base.check_fits(inp.adapter, force=force)
        seen: dict[str, str] = {}
        for tname, key in inp.keys.items():
            if key in seen:
                raise CompatibilityError(
                    f"targets '{seen[key]}' and '{tname}' of {inp.name} both resolve to '{key}'",
                    code="duplicate-target",
                    where=str(base.path),
                )
            seen[key] = tname
            job = jobs[key]
            if job.in_dtype not in FLOATS:
                raise CompatibilityError(
                    f"'{key}' is {job.in_dtype}; only F64/F32/F16/BF16 weights can take a delta",
                    code="unsupported-dtype",
                    where=str(base.path),
                    hint="dequantize the base first",
                )
            job.terms.append((inp.adapter.targets[tname], sign * inp.weight))
    return jobs


def _dtype_rule(dtype: str) -> Callable[[str, str], str]:
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}", code="dtype", hint="keep, f32, bf16 or f16")
    target = DTYPES[dtype]

    def rule(name: str, current: str) -> str:
        return target if target is not None and current in FLOATS else current

    return rule


# ---------------------------------------------------------------------------------------------
# The arithmetic, shared by every device


def _int_view(dtype: torch.dtype) -> torch.dtype:
    import torch

    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


def _ordered(bits: torch.Tensor) -> torch.Tensor:
    """Sign-magnitude float bits → integers in the floats' order (±0 → 0): ULPs are differences."""
    import torch

    x = bits.to(torch.int64)
    mag = x & ((1 << (bits.element_size() * 8 - 1)) - 1)
    return torch.where(x < 0, -mag, mag)


def _factors(job: _Job, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """L ``[rows, Σr]`` and R ``[Σr, cols]`` with ``L @ R`` the update of the stored weight.

    Linear: rows = out, so L = w·s·B, R = A. Conv1D and embedding store ``[in, out]``: L = w·s·Aᵀ,
    R = Bᵀ. Stacking the adapters' factors makes one product the exact sum of their deltas. The
    factors are upcast exactly and scaled in fp64, then given in ``dtype`` (fp64 or fp32).
    """
    import torch

    left, right = [], []
    for t, weight in job.terms:
        fresh = t.replace()  # loads this target's factors only; they are dropped after the job
        a = fresh.lora_A.detach().to(device=device, dtype=torch.float64)
        b = fresh.lora_B.detach().to(device=device, dtype=torch.float64)
        coef = weight * t.scale
        if t.kind == C.KIND_LINEAR:
            left.append(b * coef)
            right.append(a)
        else:
            left.append(a.t() * coef)
            right.append(b.t())
    return (
        torch.cat(left, 1).to(dtype).contiguous(),
        torch.cat(right, 0).to(dtype).contiguous(),
    )


@dataclass
class _Result:
    sums: list[float]  # ‖ΔW‖² (exact, from the factors), ‖W'−W‖², ‖W'−W−ΔW‖²
    off: int = 0
    max_ulp: int = 0
    index: torch.Tensor | None = None  # flat indices where the round trip misses (CPU)
    value: torch.Tensor | None = None  # the original values there (CPU, base dtype)


def apply_delta(
    W: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    out: torch.Tensor,
    *,
    roundtrip: bool = False,
    collect: bool = False,
) -> _Result:
    """``out ← round(W + left @ right)`` on W's device, with the fidelity sums.

    ``left @ right`` is formed in the factors' dtype (fp64 products are rounded once to fp32),
    added in fp32 (fp64 when W or out is fp64) to the exactly upcast W, and the sum is rounded
    once into ``out``'s dtype. On the CPU this runs over blocks of rows small enough for the
    temporaries to stay in cache; on a GPU in one block. With ``roundtrip`` it also computes
    ``round_W(out − left @ right)`` — the very operations unmerge performs — and counts
    (``collect``: gathers) the elements where that differs from W's bits.
    """
    import torch

    rows, cols = W.shape
    dev = W.device
    cdt = torch.float64 if torch.float64 in (W.dtype, out.dtype) else torch.float32
    step = rows if dev.type != "cpu" else max(1, _BLOCK // max(cols, 1))
    step = max(1, min(step, rows))

    scratch = _scratch(dev) if dev.type == "cpu" else None

    def buf(slot: str, dtype: torch.dtype) -> torch.Tensor:
        n = step * cols * dtype.itemsize
        if scratch is None:
            return torch.empty(step, cols, dtype=dtype, device=dev)
        if slot not in scratch or scratch[slot].numel() < n:
            scratch[slot] = torch.empty(max(n, _BLOCK * 8), dtype=torch.uint8)
        return scratch[slot][:n].view(dtype).view(step, cols)

    prod = buf("prod", left.dtype)
    d = prod if left.dtype == cdt else buf("d", cdt)
    w, r = buf("w", cdt), buf("r", cdt)
    r2 = buf("r2", cdt) if roundtrip else None
    back = buf("back", W.dtype) if roundtrip else None
    sums: list[list[torch.Tensor]] = [[], []]  # fp32 block dots, summed in fp64 at the end
    res = _Result([0.0, 0.0, 0.0])
    idx_parts: list[torch.Tensor] = []
    val_parts: list[torch.Tensor] = []
    for i in range(0, rows, step):
        k = min(step, rows - i)
        wb, ob, dd, ww, rr = W[i : i + k], out[i : i + k], d[:k], w[:k], r[:k]
        torch.mm(left[i : i + k], right, out=prod[:k])
        if dd.data_ptr() != prod.data_ptr():
            dd.copy_(prod[:k])  # the one rounding of the product, fp64 → fp32
        rv = rr.view(-1)
        ww.copy_(wb)  # exact upcast (mixed-dtype arithmetic is slow on the CPU)
        torch.add(ww, dd, out=rr)  # one fp32 add
        ob.copy_(rr)  # the one rounding to the output dtype
        rr.copy_(ob)
        if r2 is not None and back is not None:
            bb = back[:k]
            torch.sub(rr, dd, out=r2[:k])  # what unmerge computes, then its rounding
            bb.copy_(r2[:k])
            _misses(bb, wb, i * cols, res, idx_parts if collect else None, val_parts)
        rr.sub_(ww)  # W' − W, exact in the common case (Sterbenz)
        sums[0].append(torch.dot(rv, rv))
        rr.sub_(dd)
        sums[1].append(torch.dot(rv, rv))
    # ‖L·R‖² = Σ (LᵀL) ∘ (RRᵀ): exact in fp64 from the r×r Gram matrices, no dense pass
    l64, r64 = left.double(), right.double()
    norms = [((l64.t() @ l64) * (r64 @ r64.t())).sum()]
    if rows:
        norms += [torch.stack(x).double().sum() for x in sums]
    else:
        norms += [torch.zeros((), dtype=torch.float64, device=dev)] * 2
    res.sums = torch.stack(norms).tolist()
    if idx_parts:
        res.index = torch.cat(idx_parts)
        res.value = torch.cat(val_parts)
    return res


def _scratch(device: torch.device) -> dict[str, torch.Tensor]:
    """This thread's reusable block buffers: no allocation (page faults) per tensor on the CPU."""
    cache: dict[str, torch.Tensor] | None = getattr(_local, "scratch", None)
    if cache is None:
        cache = _local.scratch = {}
    return cache


def _misses(
    got: torch.Tensor,
    want: torch.Tensor,
    start: int,
    res: _Result,
    idx_parts: list[torch.Tensor] | None,
    val_parts: list[torch.Tensor],
) -> None:
    """Count the elements whose bits differ (and their max ULP distance); gather them if asked.

    On the CPU in numpy (few calls per block: per-call overhead dominates torch here), on a GPU
    in torch; the ULP distance is the difference of the bits read as sign-magnitude integers.
    """
    import torch

    ints = _int_view(want.dtype)
    g, w = got.view(ints).reshape(-1), want.view(ints).reshape(-1)
    if g.device.type == "cpu":
        import numpy as np

        gn, wn = g.numpy(), w.numpy()
        # Same-sign pairs: the ULP distance is the difference of the bit patterns, which fits
        # their own width; opposite signs (rare: the value crossed zero) wrap, and are redone.
        diff = np.subtract(gn, wn)
        count = int(np.count_nonzero(diff))
        if not count:
            return
        res.off += count
        if int(np.bitwise_xor(gn, wn).min()) < 0:
            at = np.flatnonzero(np.bitwise_xor(gn, wn) < 0)
            mask = (1 << (8 * wn.itemsize - 1)) - 1
            span = (gn[at].astype(np.int64) & mask) + (wn[at].astype(np.int64) & mask)
            res.max_ulp = max(res.max_ulp, int(span.max()))
            diff[at] = 0
        res.max_ulp = max(res.max_ulp, int(diff.max()), -int(diff.min()))
        if idx_parts is not None:
            flat = np.flatnonzero(gn != wn)
            idx_parts.append(torch.from_numpy(flat + start))
            val_parts.append(torch.from_numpy(wn[flat]).view(want.dtype))
        return
    flat_t = (g != w).nonzero().squeeze(1)
    if not flat_t.numel():
        return
    gt, wt = g[flat_t], w[flat_t]
    res.off += int(flat_t.numel())
    res.max_ulp = max(res.max_ulp, int((_ordered(gt) - _ordered(wt)).abs().max()))
    if idx_parts is not None:
        idx_parts.append((flat_t + start).cpu())
        val_parts.append(wt.view(want.dtype).cpu())


def _check_finite(job: _Job, W: torch.Tensor, out: torch.Tensor, res: _Result, where: str) -> None:
    """Non-finite sums mean a NaN/Inf somewhere: find where and refuse (the temp output goes)."""
    import torch

    if all(math.isfinite(x) for x in res.sums):
        return
    if not bool(torch.isfinite(W).all()):
        raise FormatError(
            f"base weight '{job.key}' contains NaN or Inf",
            code="non-finite",
            where=where,
            hint="the base checkpoint is broken; nothing was written",
        )
    if not bool(torch.isfinite(out).all()):
        raise CompatibilityError(
            f"'{job.key}' overflows {job.out_dtype} after adding ΔW",
            code="non-finite-result",
            where=where,
            hint="merge into a wider dtype (--dtype f32 or bf16)",
        )
    res.sums = [x if math.isfinite(x) else math.inf for x in res.sums]  # huge but finite values


def _target_report(job: _Job, res: _Result, names: dict[str, list[str]]) -> TargetReport:
    kinds = sorted({t.kind for t, _ in job.terms})
    return TargetReport(
        key=job.key,
        modules=names.get(job.key, []),
        kind=kinds[0] if len(kinds) == 1 else "+".join(kinds),
        shape=job.shape,
        dtype=job.out_dtype,
        delta_norm=math.sqrt(res.sums[0]),
        applied_norm=math.sqrt(res.sums[1]),
        error_norm=math.sqrt(res.sums[2]),
        roundtrip_off=res.off,
        roundtrip_max_ulp=res.max_ulp,
    )


def _as2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)


# ---------------------------------------------------------------------------------------------
# Buffers and the pipeline


class _Pool:
    """A fixed set of byte buffers (pinned for CUDA); ``get`` blocks, which bounds memory.

    ``close`` wakes every waiter with an error, so a failure anywhere cannot leave a thread
    waiting for a buffer that will never come back.
    """

    def __init__(self, n: int, nbytes: int, *, pin: bool) -> None:
        import torch

        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        self._closed = threading.Event()
        for _ in range(n):
            self._free.put(torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin))

    def get(self) -> torch.Tensor:
        while True:
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                if self._closed.is_set():
                    raise RuntimeError("buffer pool closed") from None

    def close(self) -> None:
        self._closed.set()

    def put(self, buf: torch.Tensor) -> None:
        self._free.put(buf)


def _view(buf: torch.Tensor, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    from .checkpoint import torch_dtype_of

    n = math.prod(shape) * ALL_DTYPES[dtype]
    return buf[:n].view(torch_dtype_of(dtype)).view(shape)


@dataclass
class _Context:
    """Everything the streaming loop needs besides the jobs."""

    device: str
    precise: bool  # the product of the factors in fp64 (device-independent) rather than fp32
    names: dict[str, list[str]]  # base key -> adapter module names
    roundtrip: bool  # merge: measure what unmerge would restore
    collect: bool  # merge, reversible: keep the missed elements
    hash_in: bool  # merge, reversible: SHA-256 of the original weights
    hash_out: bool  # unmerge, reversible: SHA-256 of the restored weights
    corrections: Callable[[str], tuple[torch.Tensor, torch.Tensor] | None]
    progress: Progress | None
    where: str


@dataclass
class _Outcome:
    reports: dict[str, TargetReport] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    sidecar_parts: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    spool: _Spool | None = None


def _compute(
    job: _Job, W: torch.Tensor, out: torch.Tensor, ctx: _Context, outcome: _Outcome
) -> None:
    """Apply one job's delta (W and out already on the compute device) and record its report."""
    import torch

    left, right = _factors(job, ctx.device, torch.float64 if ctx.precise else torch.float32)
    res = apply_delta(
        _as2d(W), left, right, _as2d(out), roundtrip=ctx.roundtrip, collect=ctx.collect
    )
    _check_finite(job, W, out, res, ctx.where)
    rep = _target_report(job, res, ctx.names)
    fix = ctx.corrections(job.key)
    if fix is not None:
        idx, val = fix
        n = out.numel()
        if (
            idx.dim() != 1
            or idx.shape != val.shape
            or val.dtype != out.dtype
            or idx.is_floating_point()
            or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n))
        ):
            raise FormatError(
                f"the sidecar's corrections for '{job.key}' do not fit it",
                code="bad-sidecar",
                where=ctx.where,
            )
        ints = _int_view(out.dtype)
        flat = out.view(-1).view(ints)
        flat[idx.to(out.device, dtype=torch.int64)] = val.to(out.device).view(ints)
        rep.corrections = int(idx.numel())
    outcome.reports[job.key] = rep
    if res.index is not None and res.value is not None:
        if outcome.spool is not None:
            outcome.spool.add(job.key, res.index, res.value)
        else:
            outcome.sidecar_parts.append((job.key, res.index, res.value))


def _sha256(t: torch.Tensor) -> str:

    t = t.detach().cpu().contiguous().reshape(-1)
    h = hashlib.sha256()
    if t.numel():
        h.update(byte_view(t))
    return h.hexdigest()


def _encode_corrections(
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


def _decode_corrections(
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


class _Spool:
    """Sidecar payload streamed to a scratch file as it is found, so memory stays flat."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self.pos = 0
        self.items: list[tuple[TensorSpec, int]] = []
        self.lock = threading.Lock()

    def add(self, key: str, index: torch.Tensor, value: torch.Tensor) -> None:
        for spec_name, t in _encode_corrections(key, index, value).items():
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


def _stream_files(
    base: Checkpoint,
    jobs: dict[str, _Job],
    tmp: Path,
    ctx: _Context,
    outcome: _Outcome,
    metadata_for: Callable[[Path], dict[str, str]],
    out_name: Callable[[Path], str],
    *,
    reserve: int = 0,
) -> dict[str, int]:
    """Write every shard of ``base`` into ``tmp`` with ``jobs`` applied; returns bytes per shard.

    A reader thread ``pread``s targeted weights ahead (on CUDA it also uploads them, on its own
    stream, so uploads overlap compute); worker threads apply the delta and ``pwrite`` the result
    at its planned offset, or copy untouched tensors file to file. Each worker runs single-threaded
    torch ops on its own tensor: parallel without fine-grained OpenMP synchronisation. Buffers
    come from fixed pools, which bounds memory at a few copies of the largest targeted weight.
    """
    import torch

    cuda = ctx.device == "cuda"
    workers = _workers()
    order = [name for shard in base.shards for name in base.shard_tensors[shard]]
    targeted = [name for name in order if jobs[name].targeted]
    biggest_in = max((_nbytes(jobs[n], jobs[n].in_dtype) for n in targeted), default=1)
    biggest_out = max((_nbytes(jobs[n], jobs[n].out_dtype) for n in targeted), default=1)
    in_pool = _Pool(workers + 1, biggest_in, pin=cuda)
    out_pool = _Pool(workers, biggest_out, pin=cuda)
    upload = torch.cuda.Stream() if cuda else None

    def read(name: str) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
        buf = in_pool.get()
        size = _nbytes(jobs[name], jobs[name].in_dtype)
        base.read_into(name, byte_view(buf[:size]))
        digest = hashlib.sha256(byte_view(buf[:size])).hexdigest() if ctx.hash_in else None
        W = _view(buf, jobs[name].in_dtype, jobs[name].shape)
        if upload is None:
            return W, buf, digest
        with torch.cuda.stream(upload):
            Wd = W.to(ctx.device, non_blocking=True)
        upload.synchronize()  # only this thread waits; the pinned buffer is free again
        in_pool.put(buf)
        return Wd, None, digest

    def process(
        w: SafetensorsWriter,
        job: _Job,
        W: torch.Tensor,
        buf: torch.Tensor | None,
        obuf: torch.Tensor,
    ) -> None:
        try:
            out = _view(obuf, job.out_dtype, job.shape)
            if cuda:
                stream = _thread_stream()
                with torch.cuda.stream(stream):
                    od = torch.empty(job.shape, dtype=out.dtype, device=ctx.device)
                    _compute(job, W, od, ctx, outcome)
                    out.copy_(od, non_blocking=True)
                stream.synchronize()  # this worker waits for its download; the other computes
            else:
                _compute(job, W, out, ctx, outcome)
            if buf is not None:
                in_pool.put(buf)
                buf = None
            w.write(job.key, out)
            if ctx.hash_out:
                outcome.hashes[job.key] = _sha256(out)
        finally:
            if buf is not None:
                in_pool.put(buf)
            out_pool.put(obuf)

    reader = ThreadPoolExecutor(1, thread_name_prefix="loratool-read")
    pool = ThreadPoolExecutor(workers, thread_name_prefix="loratool-merge")
    fds = {shard: os.open(shard, os.O_RDONLY) for shard in base.shards}
    reads: deque[Future[tuple[torch.Tensor, torch.Tensor | None, str | None]]] = deque()
    upcoming = iter(targeted)

    def read_ahead() -> None:
        while len(reads) < 2:
            name = next(upcoming, None)
            if name is None:
                return
            reads.append(reader.submit(read, name))

    sizes: dict[str, int] = {}
    open_shards: deque[tuple[SafetensorsWriter, list[Future[None]]]] = deque()
    try:
        read_ahead()
        for si, shard in enumerate(base.shards):
            names = base.shard_tensors[shard]
            specs = aligned_order([TensorSpec(n, jobs[n].out_dtype, jobs[n].shape) for n in names])
            fname = out_name(shard)
            w = SafetensorsWriter(tmp / fname, specs, metadata_for(shard), reserve=reserve)
            total, done = w.size - len(w.head), 0
            tasks: list[Future[None]] = []
            open_shards.append((w, tasks))
            for name in names:
                job = jobs[name]
                if job.targeted:
                    W, buf, digest = reads.popleft().result()
                    read_ahead()
                    if digest is not None:
                        outcome.hashes[name] = digest
                    obuf = out_pool.get()  # blocks while every worker is busy: bounded memory
                    tasks.append(pool.submit(process, w, job, W, buf, obuf))
                    del W, buf
                elif job.out_dtype == job.in_dtype:
                    e = base.entries[name]
                    tasks.append(
                        pool.submit(w.copy_from, name, fds[shard], e.data_start + e.info.begin)
                    )
                else:
                    tasks.append(pool.submit(_cast, w, base, name, job))
                done += _nbytes(job, job.out_dtype)
                if ctx.progress is not None:
                    ctx.progress(ProgressEvent(fname, si, len(base.shards), done, total, name))
                while len(open_shards) > 1 and all(t.done() for t in open_shards[0][1]):
                    _finish(*open_shards.popleft())  # an earlier shard, fully submitted
            sizes[fname] = w.size
        while open_shards:
            _finish(*open_shards.popleft())
    finally:
        in_pool.close()
        out_pool.close()
        pool.shutdown(wait=True, cancel_futures=True)
        reader.shutdown(wait=True, cancel_futures=True)
        for fd in fds.values():
            os.close(fd)
    return sizes


def _finish(w: SafetensorsWriter, tasks: list[Future[None]]) -> None:
    for t in tasks:
        t.result()  # re-raises a worker's error
    w.close()


def _workers() -> int:
    """Compute threads: one per usable core, at least 2 (so I/O overlaps) and at most 4 (each
    holds two weight-sized buffers; memory-bound work gains little from more)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 2
    return max(2, min(cores, 4))


_local = threading.local()


def _thread_stream() -> Any:
    """This worker thread's own CUDA stream (created once)."""
    import torch

    stream = getattr(_local, "stream", None)
    if stream is None:
        stream = _local.stream = torch.cuda.Stream()
    return stream


def _nbytes(job: _Job, dtype: str) -> int:
    return math.prod(job.shape) * ALL_DTYPES[dtype]


def _cast(w: SafetensorsWriter, base: Checkpoint, name: str, job: _Job) -> None:
    """Copy an untouched tensor into another float dtype, a few MB at a time."""
    import torch

    from .checkpoint import torch_dtype_of

    size_in, size_out = ALL_DTYPES[job.in_dtype], ALL_DTYPES[job.out_dtype]
    n = math.prod(job.shape)
    chunk = max(1, (8 << 20) // size_in)
    buf = bytearray(min(n, chunk) * size_in)
    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        view = memoryview(buf)[: k * size_in]
        base.read_into(name, view, offset=start * size_in)
        x = torch.frombuffer(view, dtype=torch_dtype_of(job.in_dtype))
        w.write_part(name, start * size_out, x.to(torch_dtype_of(job.out_dtype)))


def _copy_other_files(base: Checkpoint, dest: Path, skip: set[str]) -> tuple[list[str], list[str]]:
    """Copy config, tokenizer and the like; leave weights of other formats (they'd be stale)."""
    copied: list[str] = []
    skipped: list[str] = []
    if not base.is_dir:
        return copied, skipped
    for f in base.other_files():
        rel = f.relative_to(base.path)
        if any(p.startswith(".") for p in rel.parts[:-1]):  # .git/, .cache/ (download state)
            continue
        r = rel.as_posix()
        if r in skip:
            continue
        if f.name.lower().endswith(STALE_WEIGHTS) and not f.name.startswith("loratool-reversible"):
            skipped.append(r)
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
        copied.append(r)
    return copied, skipped


# ---------------------------------------------------------------------------------------------
# Provenance


def read_records(ckpt: Checkpoint) -> list[dict[str, Any]]:
    """The merge records of a checkpoint (every shard must carry the same list)."""
    raw = {ckpt.shard_metadata[s].get(RECORDS_KEY) for s in ckpt.shards}
    if len(raw) > 1:
        raise FormatError(
            "shards carry different merge records",
            code="bad-merge-record",
            where=str(ckpt.path),
            hint="the checkpoint was assembled from different merges",
        )
    text = raw.pop() if raw else None
    if text is None:
        return []
    try:
        records = json.loads(text)
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError("not a list of objects")
    except ValueError as e:
        raise FormatError(
            f"unreadable {RECORDS_KEY} ({e})", code="bad-merge-record", where=str(ckpt.path)
        ) from None
    return records


def _record_id(record: Mapping[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k not in ("id", "roundtrip")}
    return "sha256:" + hashlib.sha256(canonical_json(body).encode()).hexdigest()


def _shard_metadata(
    meta: Mapping[str, str], records: list[dict[str, Any]], *, add_format: bool
) -> dict[str, str]:
    out = dict(meta)
    if records:
        out[RECORDS_KEY] = canonical_json(records)
    else:
        out.pop(RECORDS_KEY, None)
    if add_format:
        out.setdefault("format", "pt")  # transformers 4.x refuses shards whose metadata lacks it
    return out


def _roundtrip_stats(reports: Mapping[str, TargetReport]) -> dict[str, int]:
    return {
        "elements": sum(r.roundtrip_off for r in reports.values()),
        "tensors": sum(1 for r in reports.values() if r.roundtrip_off),
        "max_ulp": max((r.roundtrip_max_ulp for r in reports.values()), default=0),
    }


# ---------------------------------------------------------------------------------------------
# merge


def merge(
    base: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    out: str | os.PathLike[str] | None = None,
    *,
    weights: Sequence[float] | None = None,
    dtype: str = "keep",
    device: str = "auto",
    reversible: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> MergeReport:
    """Merge ``adapters`` (weighted) into ``base`` and write the result to ``out``.

    ``base`` is a checkpoint directory, a ``.safetensors`` file, or a state dict; for a state dict
    nothing is written and the merged tensors come back in ``report.state_dict`` (untouched
    tensors are the input's own objects), and ``reversible`` puts the sidecar in
    ``report.sidecar``. Every compatibility check runs before anything is written; ``force``
    accepts a differing base fingerprint and replaces an existing ``out``.
    """

    with _one_thread():
        return _merge(
            base,
            adapters,
            out,
            weights=weights,
            dtype=dtype,
            device=device,
            reversible=reversible,
            force=force,
            progress=progress,
        )


def _merge(
    base: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    out: str | os.PathLike[str] | None,
    *,
    weights: Sequence[float] | None,
    dtype: str,
    device: str,
    reversible: bool,
    force: bool,
    progress: Progress | None,
) -> MergeReport:
    import torch

    started = time.perf_counter()
    if isinstance(base, Mapping):
        if out is not None:
            raise UsageError("a state-dict merge returns its result; out must be None")
        return _merge_memory(
            base,
            adapters,
            weights=weights,
            dtype=dtype,
            device=device,
            reversible=reversible,
            force=force,
            started=started,
        )
    if out is None:
        raise UsageError("no output path", hint="pass -o OUT")
    base_path, out_path = Path(base), Path(out)
    _check_paths(base_path, out_path, force=force)
    rule = _dtype_rule(dtype)
    dev = _resolve_device(device)
    ckpt = Checkpoint(base_path)
    inputs = _open_inputs(adapters, weights)
    jobs = _plan(ckpt, inputs, sign=1.0, out_dtype=rule, force=force)
    if reversible:
        _check_reversible_dtypes(jobs)
    _digest(inputs)
    changes = {k: j.in_dtype for k, j in jobs.items() if j.out_dtype != j.in_dtype}
    previous = read_records(ckpt)
    add_format = not any("format" in m for m in ckpt.shard_metadata.values())
    sidecar_name = (
        _sidecar_name(out_path if not ckpt.is_dir else None, len(previous) + 1)
        if reversible
        else None
    )
    record: dict[str, Any] = {
        "op": "merge",
        "tool": f"loratool {_version()}",
        "adapters": [i.entry() for i in inputs],
        "dtype": dtype,
        "dtype_changes": changes,
        "product": _product(dev, reversible),
        "reversible": sidecar_name,
        "format_added": add_format,
    }
    record["id"] = _record_id(record)
    records = [*previous, record]
    names = _module_names(inputs)
    ctx = _Context(
        dev,
        record["product"] == "fp64",
        names,
        roundtrip=True,
        collect=reversible,
        hash_in=reversible,
        hash_out=False,
        corrections=lambda key: None,
        progress=progress,
        where=str(base_path),
    )

    def metadata(shard: Path) -> dict[str, str]:
        return _shard_metadata(ckpt.shard_metadata[shard], records, add_format=add_format)

    outcome = _Outcome()
    namer = _namer(ckpt, out_path)
    report = MergeReport(
        "merge",
        str(base_path),
        str(out_path),
        record["adapters"],
        dtype,
        dev,
        [],
        record,
        sidecar_name=sidecar_name,
    )
    with (
        torch.inference_mode(),
        _output(out_path, directory=ckpt.is_dir, force=force) as dest,
    ):
        spool_dir = dest if ckpt.is_dir else out_path.parent
        if reversible:
            fd, spool_path = tempfile.mkstemp(
                prefix=f".{out_path.name}.", suffix=".spool", dir=spool_dir
            )
            os.close(fd)
            os.unlink(spool_path)
            outcome.spool = _Spool(Path(spool_path))
        try:
            sizes = _stream_files(ckpt, jobs, dest, ctx, outcome, metadata, namer, reserve=512)
            record["roundtrip"] = _roundtrip_stats(outcome.reports)
            for shard in ckpt.shards:  # the final record, with the round-trip counts
                rewrite_metadata(dest / namer(shard), metadata(shard))
            if outcome.spool is not None and sidecar_name is not None:
                sidecar = Sidecar({}, outcome.hashes, record["id"])
                target = dest / sidecar_name if ckpt.is_dir else out_path.parent / sidecar_name
                report.sidecar_bytes = _write_sidecar_file(
                    outcome.spool, target, sidecar.metadata(), force=force
                )
        finally:
            if outcome.spool is not None:
                outcome.spool.close()
        if ckpt.is_dir:
            _write_layout(ckpt, dest, jobs)
            report.copied_files, report.skipped_files = _copy_other_files(ckpt, dest, set())
    report.targets = [outcome.reports[k] for k in sorted(outcome.reports)]
    report.shards = list(sizes)
    report.base_bytes = sum(os.path.getsize(s) for s in ckpt.shards)
    report.out_bytes = sum(sizes.values())
    report.seconds = time.perf_counter() - started
    _add_warnings(report)
    return report


def _merge_memory(
    state: Mapping[str, torch.Tensor],
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    *,
    weights: Sequence[float] | None,
    dtype: str,
    device: str,
    reversible: bool,
    force: bool,
    started: float,
) -> MergeReport:
    import torch

    rule = _dtype_rule(dtype)
    dev = _resolve_device(device)
    ckpt = MemoryCheckpoint(state)
    inputs = _open_inputs(adapters, weights)
    jobs = _plan(ckpt, inputs, sign=1.0, out_dtype=rule, force=force)
    if reversible:
        _check_reversible_dtypes(jobs)
    _digest(inputs)
    record: dict[str, Any] = {
        "op": "merge",
        "tool": f"loratool {_version()}",
        "adapters": [i.entry() for i in inputs],
        "dtype": dtype,
        "dtype_changes": {k: j.in_dtype for k, j in jobs.items() if j.out_dtype != j.in_dtype},
        "product": _product(dev, reversible),
        "reversible": "memory" if reversible else None,
    }
    record["id"] = _record_id(record)
    ctx = _Context(
        dev,
        record["product"] == "fp64",
        _module_names(inputs),
        roundtrip=True,
        collect=reversible,
        hash_in=reversible,
        hash_out=False,
        corrections=lambda key: None,
        progress=None,
        where="<state dict>",
    )
    outcome = _Outcome()
    with torch.inference_mode():
        result = _memory_loop(ckpt, jobs, ctx, outcome)
    record["roundtrip"] = _roundtrip_stats(outcome.reports)
    report = MergeReport(
        "merge",
        "<state dict>",
        None,
        record["adapters"],
        dtype,
        dev,
        [outcome.reports[k] for k in sorted(outcome.reports)],
        record,
        state_dict=result,
    )
    if reversible:
        tensors: dict[str, torch.Tensor] = {}
        for key, idx, val in outcome.sidecar_parts:
            tensors.update(_encode_corrections(key, idx, val))
        report.sidecar = Sidecar(tensors, outcome.hashes, record["id"])
        report.sidecar_name = "memory"
        report.sidecar_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    report.base_bytes = sum(t.numel() * t.element_size() for t in state.values())
    report.seconds = time.perf_counter() - started
    _add_warnings(report)
    return report


def _memory_loop(
    ckpt: MemoryCheckpoint, jobs: dict[str, _Job], ctx: _Context, outcome: _Outcome
) -> dict[str, torch.Tensor]:
    from .checkpoint import torch_dtype_of

    result: dict[str, torch.Tensor] = {}
    for name, job in jobs.items():
        W = ckpt.state[name]
        if not job.targeted:
            result[name] = (
                W if job.out_dtype == job.in_dtype else W.to(torch_dtype_of(job.out_dtype))
            )
            continue
        if ctx.hash_in:
            outcome.hashes[name] = _sha256(W)
        Wd = W.detach().to(ctx.device).contiguous()
        out = _empty(job.shape, job.out_dtype, ctx.device)
        _compute(job, Wd, out, ctx, outcome)
        if ctx.hash_out:
            outcome.hashes[name] = _sha256(out)
        result[name] = out.to(W.device)
    return result


def _empty(shape: tuple[int, ...], dtype: str, device: str) -> torch.Tensor:
    import torch

    from .checkpoint import torch_dtype_of

    return torch.empty(shape, dtype=torch_dtype_of(dtype), device=device)


def _product(device: str, reversible: bool) -> str:
    """The precision of ΔW's matrix product, recorded so unmerge repeats it exactly.

    fp64 (rounded once to fp32: the correctly rounded ΔW on any BLAS, device or thread count) on
    CUDA — where it is free and sidesteps TF32 — and whenever a sidecar must match bit for bit
    across devices; a plain fp32 product on the CPU otherwise, where fp64 costs about 2×.
    """
    return "fp64" if reversible or device == "cuda" else "fp32"


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread for our CPU work: the reader and writer threads use the other cores,
    and OpenMP regions over small blocks collapse when a shared machine is oversubscribed
    (measured here: 10× slower with 2 threads at load 8 on 2 cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_paths(base: Path, out: Path, *, force: bool) -> None:
    check_output(out, force=force)
    b, o = base.resolve(), out.resolve()
    if o == b or b in o.parents or o in b.parents:
        raise UsageError(
            f"output '{out}' overlaps the input '{base}'",
            code="output-overlaps",
            hint="write to a new path next to it",
        )


def _check_reversible_dtypes(jobs: Mapping[str, _Job]) -> None:
    for job in jobs.values():
        if job.out_dtype != job.in_dtype and (job.in_dtype, job.out_dtype) not in WIDENINGS:
            raise UsageError(
                f"--reversible with a narrowing --dtype "
                f"({job.in_dtype} → {job.out_dtype} for '{job.key}')",
                code="not-reversible",
                hint="a narrowing cast discards bits no compact sidecar restores; "
                "keep the dtype or widen it",
            )


def _sidecar_name(out_file: Path | None, depth: int) -> str:
    stem = (
        SIDECAR_NAME
        if depth == 1
        else SIDECAR_NAME.replace(".safetensors", f"-{depth}.safetensors")
    )
    return stem if out_file is None else f"{out_file.stem}.{stem}"


def _module_names(inputs: list[_Input]) -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for inp in inputs:
        for tname, key in inp.keys.items():
            names.setdefault(key, [])
            if tname not in names[key]:
                names[key].append(tname)
    return names


def _version() -> str:
    from . import __version__

    return __version__


@contextlib.contextmanager
def _output(out: Path, *, directory: bool, force: bool) -> Iterator[Path]:
    """A temp sibling directory renamed to ``out``; for a single-file base, a temp dir whose one
    file is renamed to ``out``."""
    if directory:
        with atomic_dir(out, force=force) as tmp:
            yield tmp
        return
    check_output(out, force=force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        produced = tmp / out.name
        with open(produced, "rb") as f:
            os.fsync(f.fileno())
        os.replace(produced, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _namer(ckpt: Checkpoint, out: Path) -> Callable[[Path], str]:
    """Output file name per shard: the shard's own name, or ``out``'s for a single-file base."""
    if ckpt.is_dir:
        return lambda shard: shard.name
    return lambda shard: out.name


def _write_layout(ckpt: Checkpoint, dest: Path, jobs: Mapping[str, _Job]) -> None:
    """index.json for a sharded base: the same weight map, ``total_size`` of the new data."""
    if ckpt.index is None:
        return
    total = sum(_nbytes(j, j.out_dtype) for j in jobs.values())
    meta = ckpt.index.get("metadata")
    weight_map = ckpt.index.get("weight_map")
    assert isinstance(weight_map, dict)
    write_index(
        dest, weight_map, total_size=total, metadata=meta if isinstance(meta, dict) else None
    )


def _write_sidecar_file(
    spool: _Spool, target: Path, metadata: Mapping[str, str], *, force: bool
) -> int:
    if target.exists():
        if not force:
            check_output(target, force=False)
        target.unlink()
    tmp = target.with_name(f".{target.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    size = spool.write_sidecar(tmp, metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return size


def _add_warnings(report: MergeReport) -> None:
    lossy = report.lossy
    if lossy:
        worst = max(lossy, key=lambda t: t.error or 0.0)
        report.warnings.append(
            f"{len(lossy)} of {len(report.targets)} targets lose more than "
            f"{LOSS_THRESHOLD:.0%} of ΔW to {worst.dtype} rounding (worst: '{worst.key}', "
            f"error {worst.error:.1%}); merge with --dtype f32 to keep them"
        )


# ---------------------------------------------------------------------------------------------
# unmerge


def unmerge(
    merged: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    out: str | os.PathLike[str] | None = None,
    *,
    weights: Sequence[float] | None = None,
    device: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
    record: Mapping[str, Any] | None = None,
    sidecar: Sidecar | None = None,
) -> MergeReport:
    """Subtract ``adapters`` from ``merged``: the inverse of ``merge``.

    For a checkpoint, the last merge record in its metadata must list exactly these adapters
    (by content digest; order does not matter) — their weights, order, original dtypes and the
    reversible sidecar come from it. Otherwise a ``CompatibilityError``, unless ``force``: then
    the adapters are subtracted with ``weights`` (default 1.0) and the record is kept, with an
    unmerge record added. For a state dict pass the merge's ``record`` and ``sidecar``
    (``MergeReport.record``, ``MergeReport.sidecar``) to get the same checks and exactness.
    """
    with _one_thread():
        return _unmerge(
            merged,
            adapters,
            out,
            weights=weights,
            device=device,
            force=force,
            progress=progress,
            record=record,
            sidecar=sidecar,
        )


def _unmerge(
    merged: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    out: str | os.PathLike[str] | None,
    *,
    weights: Sequence[float] | None,
    device: str,
    force: bool,
    progress: Progress | None,
    record: Mapping[str, Any] | None,
    sidecar: Sidecar | None,
) -> MergeReport:
    import torch

    started = time.perf_counter()
    memory = isinstance(merged, Mapping)
    if memory and out is not None:
        raise UsageError("a state-dict unmerge returns its result; out must be None")
    if not memory and out is None:
        raise UsageError("no output path", hint="pass -o OUT")
    dev = _resolve_device(device)
    if isinstance(merged, Mapping):
        ckpt: Checkpoint = MemoryCheckpoint(merged)
        where = "<state dict>"
        records = [dict(record)] if record is not None else []
    else:
        out_path = Path(out)  # type: ignore[arg-type]
        _check_paths(Path(merged), out_path, force=force)
        ckpt = Checkpoint(merged)
        where = str(merged)
        records = read_records(ckpt)
    inputs = _open_inputs(adapters, weights)
    _plan(ckpt, inputs, sign=-1.0, out_dtype=lambda name, cur: cur, force=force)  # fits?
    _digest(inputs)
    top, matched = _match_record(records, inputs, weights is not None, where=where, force=force)
    restore = _restore_dtypes(top, where) if matched and top else {}
    jobs = _plan(
        ckpt, inputs, sign=-1.0, out_dtype=lambda name, cur: restore.get(name, cur), force=force
    )

    side = _open_sidecar(ckpt, top, sidecar, matched=matched, memory=memory, force=force)
    remaining = records[:-1] if matched else [*records, _unmerge_record(inputs)]
    recorded = top.get("product") if matched and top else None
    precise = dev == "cuda" or recorded == "fp64" or (recorded is None and side is not None)
    ctx = _Context(
        dev,
        precise,
        _module_names(inputs),
        roundtrip=False,
        collect=False,
        hash_in=False,
        hash_out=side is not None,
        corrections=side.corrections if side else lambda k: None,
        progress=progress,
        where=where,
    )
    outcome = _Outcome()
    undone = dict(top) if matched and top else _unmerge_record(inputs)
    report = MergeReport(
        "unmerge",
        where,
        None if memory else str(out),
        [i.entry() for i in inputs],
        "restore" if restore else "keep",
        dev,
        [],
        undone,
    )
    if isinstance(ckpt, MemoryCheckpoint):
        with torch.inference_mode():
            report.state_dict = _memory_loop(ckpt, jobs, ctx, outcome)
        report.base_bytes = sum(t.numel() * t.element_size() for t in ckpt.state.values())
    else:
        out_path = Path(out)  # type: ignore[arg-type]
        drop_format = bool(matched and top and top.get("format_added") and not remaining)

        def metadata(shard: Path) -> dict[str, str]:
            meta = _shard_metadata(
                ckpt.shard_metadata[shard], remaining, add_format=bool(remaining)
            )
            if drop_format:
                meta.pop("format", None)
            return meta

        skip = {top["reversible"]} if matched and top and top.get("reversible") else set()
        with (
            torch.inference_mode(),
            _output(out_path, directory=ckpt.is_dir, force=force) as dest,
        ):
            sizes = _stream_files(ckpt, jobs, dest, ctx, outcome, metadata, _namer(ckpt, out_path))
            if ckpt.is_dir:
                _write_layout(ckpt, dest, jobs)
                report.copied_files, report.skipped_files = _copy_other_files(ckpt, dest, skip)
        report.shards = list(sizes)
        report.base_bytes = sum(os.path.getsize(s) for s in ckpt.shards)
        report.out_bytes = sum(sizes.values())
    report.targets = [outcome.reports[k] for k in sorted(outcome.reports)]
    if side is not None:
        for t in report.targets:
            want = side.sha256.get(t.key)
            t.verified = want is not None and outcome.hashes.get(t.key) == want
        report.exact = "verified" if all(t.verified for t in report.targets) else "mismatch"
        if report.exact == "mismatch":
            bad = [t.key for t in report.targets if not t.verified]
            report.warnings.append(
                f"{len(bad)} weights differ from the original after applying the sidecar "
                f"(e.g. '{bad[0]}')"
            )
    else:
        report.exact = "unknown"
        rt = top.get("roundtrip") if matched and top else None
        if isinstance(rt, dict) and rt.get("elements"):
            report.warnings.append(
                f"not bit-exact: the merge measured {rt['elements']:,} elements in "
                f"{rt.get('tensors', '?')} weights that come back up to {rt.get('max_ulp', '?')} "
                "ULP off the base (merge with --reversible to restore it exactly)"
            )
    report.seconds = time.perf_counter() - started
    return report


def _match_record(
    records: list[dict[str, Any]],
    inputs: list[_Input],
    explicit_weights: bool,
    *,
    where: str,
    force: bool,
) -> tuple[dict[str, Any] | None, bool]:
    """The last merge record, and whether ``inputs`` are exactly its adapters; reorders and weights
    ``inputs`` as recorded when they are."""
    top = records[-1] if records else None
    if top is None or top.get("op") != "merge":
        if force:
            return top, False
        raise CompatibilityError(
            "no loratool merge is recorded as the last change to this checkpoint",
            code="no-merge-record",
            where=where,
            hint="unmerge undoes loratool merges; "
            "pass --force to subtract the adapters anyway (weight 1)",
        )
    recorded = [(a.get("digest"), float(a.get("weight", 1.0))) for a in top.get("adapters", [])]
    given = [(i.digest, i.weight) for i in inputs]
    same = sorted(d for d, _ in recorded) == sorted(i.digest for i in inputs)
    if same and explicit_weights:
        same = sorted(recorded, key=str) == sorted(given, key=str)
    if same:
        pool = list(inputs)
        ordered = []
        for digest, weight in recorded:
            inp = next(i for i in pool if i.digest == digest)
            pool.remove(inp)
            inp.weight = weight
            ordered.append(inp)
        inputs[:] = ordered
        return top, True
    if force:
        for inp in inputs:
            for digest, weight in recorded:
                if inp.digest == digest and not explicit_weights:
                    inp.weight = weight
        return top, False
    names = ", ".join(f"{a.get('name')} ×{a.get('weight')}" for a in top.get("adapters", []))
    raise CompatibilityError(
        f"these adapters are not the ones last merged into this checkpoint ({names})",
        code="merge-mismatch",
        where=where,
        hint="pass exactly the adapters (and weights) of the last merge, "
        "or --force to subtract them anyway",
    )


def _restore_dtypes(top: Mapping[str, Any], where: str) -> dict[str, str]:
    changes = top.get("dtype_changes", {})
    if not isinstance(changes, dict) or not all(
        isinstance(k, str) and v in FLOATS for k, v in changes.items()
    ):
        raise FormatError(
            "merge record has invalid dtype_changes", code="bad-merge-record", where=where
        )
    return dict(changes)


def _unmerge_record(inputs: list[_Input]) -> dict[str, Any]:
    return {
        "op": "unmerge",
        "tool": f"loratool {_version()}",
        "adapters": [i.entry() for i in inputs],
    }


class _SidecarSource:
    """Corrections for unmerge: from a sidecar file (read per tensor) or a ``Sidecar``."""

    def __init__(
        self, sha256: dict[str, str], fetch: Callable[[str], torch.Tensor], names: set[str]
    ) -> None:
        self.sha256 = sha256
        self._fetch = fetch
        self._names = names

    def corrections(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return _decode_corrections(key, self._names, self._fetch)


def _open_sidecar(
    ckpt: Checkpoint,
    top: dict[str, Any] | None,
    given: Sidecar | None,
    *,
    matched: bool,
    memory: bool,
    force: bool,
) -> _SidecarSource | None:
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
        return _SidecarSource(sc.sha256, sc.tensors.__getitem__, set(sc.tensors))
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
    return _SidecarSource(sha, side.read, set(side.entries))
