"""Read, validate and write loratool adapter files (spec/adapter-format.md, v1).

The reader bounds and checks the whole header before it touches tensor data, and raises only
``FormatError`` with the spec's rule code; nothing here imports torch until a tensor is needed.
The writer produces canonical bytes: the same content always gives the same file (spec §5).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import constants as C
from ._io import atomic_write
from .adapter import Adapter, BaseBinding, Target
from .errors import FormatError

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_PICKLE_HINT = (
    "pickle files can run code when loaded and loratool never opens them; "
    "convert it to safetensors with the tool that made it"
)
_VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of the safetensors header; offsets are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


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


def _fail(code: str, message: str, where: str, hint: str | None = None) -> FormatError:
    return FormatError(message, code=code, where=where, hint=hint)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def strict_loads(text: str, *, code: str, what: str, where: str) -> Any:
    """Strict JSON: no duplicate keys (readers would disagree on which wins), no NaN/Infinity."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except _DuplicateKey as e:
        raise _fail("duplicate-key", f"{what} has the key '{e}' twice", where) from None
    except (ValueError, RecursionError) as e:
        raise _fail(code, f"{what} is not valid JSON ({e})", where) from None


def canonical_json(value: Any) -> str:
    """Spec §5: sorted keys, no whitespace, UTF-8, shortest round-trip floats."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


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


# ---------------------------------------------------------------------------------------------
# Container: the safetensors layer (spec §2, rules 1–9)


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
        raise _fail("pickle", "this is a pickle file, not safetensors", where, _PICKLE_HINT)
    if file_bytes < C.HEADER_LENGTH_BYTES or len(head) < C.HEADER_LENGTH_BYTES:
        raise _fail(
            "truncated", f"file has {file_bytes} bytes, too short for a safetensors header", where
        )
    (n,) = struct.unpack("<Q", head[: C.HEADER_LENGTH_BYTES])
    if n > C.MAX_HEADER_BYTES:
        raise _fail(
            "header-too-large", f"header claims {n} bytes (limit {C.MAX_HEADER_BYTES})", where
        )
    if C.HEADER_LENGTH_BYTES + n > file_bytes or len(head) < C.HEADER_LENGTH_BYTES + n:
        raise _fail(
            "truncated", f"header claims {n} bytes but the file has only {file_bytes}", where
        )
    raw = head[C.HEADER_LENGTH_BYTES : C.HEADER_LENGTH_BYTES + n]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(
            "header-json", f"header is not UTF-8 ({e.reason} at byte {e.start})", where
        ) from None
    doc = strict_loads(text, code="header-json", what="the header", where=where)
    if not isinstance(doc, dict):
        raise _fail("header-json", "the header is not a JSON object", where)

    meta = doc.pop(C.METADATA_KEY, {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _fail("metadata-type", f"'{C.METADATA_KEY}' must map strings to strings", where)

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
        raise _fail(
            "tensor-entry", f"tensor '{name}' needs exactly dtype, shape and data_offsets", where
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not (
        isinstance(shape, list)
        and len(shape) <= 8
        and all(_is_int(d) and 0 <= d <= C.MAX_DIM for d in shape)
    ):
        raise _fail("tensor-entry", f"tensor '{name}' has an invalid shape {shape!r}", where)
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_int(o) and o >= 0 for o in offsets)
    ):
        raise _fail("tensor-entry", f"tensor '{name}' has invalid data_offsets {offsets!r}", where)
    if not isinstance(dtype, str) or dtype not in dtypes:
        raise _fail(
            "dtype",
            f"tensor '{name}' has dtype {dtype!r}; allowed: {', '.join(dtypes)}",
            where,
            "convert the adapter with --dtype f32|f16|bf16",
        )
    begin, end = offsets
    expected = math.prod(shape) * dtypes[dtype]
    if end - begin != expected:
        raise _fail(
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
            raise _fail("data-offsets", f"tensor '{info.name}' {what}", where)
        pos = info.end
    if pos != data_bytes:
        raise _fail(
            "data-offsets", f"tensors cover {pos} bytes of a {data_bytes}-byte data section", where
        )


# ---------------------------------------------------------------------------------------------
# loratool layer (spec §3–4, rules 10–20)


def adapter_from_tensors(tensors: dict[str, TensorInfo], meta: dict[str, str], where: str) -> Adapter:
    marker = meta.get(C.FORMAT_KEY)
    if marker != C.FORMAT_MARKER:
        raise _fail(
            "not-loratool",
            "not a loratool adapter (no 'loratool.format' marker)",
            where,
            "`loratool convert` reads PEFT, kohya and diffusers files into this format",
        )
    version = meta.get(C.VERSION_KEY, "")
    m = _VERSION_RE.match(version)
    if not m or int(m.group(1)) != C.SUPPORTED_MAJOR:
        raise _fail(
            "unsupported-version",
            f"format version {version!r} is not supported (this loratool reads {C.SUPPORTED_MAJOR}.x)",
            where,
            "upgrade loratool",
        )
    for key in C.REQUIRED_KEYS:
        if key not in meta:
            raise _fail("metadata-missing", f"required metadata key '{key}' is missing", where)

    raw_targets = strict_loads(
        meta[C.TARGETS_KEY], code="metadata-json", what=f"'{C.TARGETS_KEY}'", where=where
    )
    if not isinstance(raw_targets, dict):
        raise _fail("metadata-json", f"'{C.TARGETS_KEY}' must be a JSON object", where)
    if not raw_targets:
        raise _fail("no-targets", "the adapter has no targets", where)
    if len(raw_targets) > C.MAX_TARGETS:
        raise _fail("bad-target", f"{len(raw_targets)} targets (limit {C.MAX_TARGETS})", where)
    targets = {name: _target(name, entry, where) for name, entry in raw_targets.items()}

    raw_base = strict_loads(meta[C.BASE_KEY], code="metadata-json", what=f"'{C.BASE_KEY}'", where=where)
    base = _base(raw_base, where)
    sha = meta[C.SHA256_KEY]
    if not _SHA256_RE.match(sha):
        raise _fail("metadata-json", f"'{C.SHA256_KEY}' must be 64 lowercase hex digits", where)
    provenance: dict[str, Any] = {}
    if C.PROVENANCE_KEY in meta:
        provenance = strict_loads(
            meta[C.PROVENANCE_KEY], code="metadata-json", what=f"'{C.PROVENANCE_KEY}'", where=where
        )
        if not isinstance(provenance, dict):
            raise _fail("metadata-json", f"'{C.PROVENANCE_KEY}' must be a JSON object", where)

    _match_tensors(targets, tensors, where)
    known = {C.FORMAT_KEY, C.VERSION_KEY, C.TARGETS_KEY, C.BASE_KEY, C.SHA256_KEY, C.PROVENANCE_KEY}
    adapter = Adapter(
        targets=targets,
        base=base,
        provenance=provenance,
        metadata={k: v for k, v in meta.items() if k not in known},
        version=version,
        path=where,
        sha256=sha,
    )
    if base.fingerprint != adapter.computed_fingerprint():
        raise _fail(
            "fingerprint-mismatch",
            "the base fingerprint does not match the targets' names and shapes",
            where,
            "the header was edited by hand or by a broken tool; re-export the adapter",
        )
    return adapter


_NAME_RE = re.compile(r"^[^.\s]+(\.[^.\s]+)*$")


def _target(name: str, entry: Any, where: str) -> Target:
    def bad(why: str) -> FormatError:
        return _fail("bad-target", f"target '{name}': {why}", where)

    if not _NAME_RE.match(name) or name.endswith((C.LORA_A_SUFFIX, C.LORA_B_SUFFIX)):
        raise bad("not a module path (dot-separated, no spaces, no empty parts)")
    if not isinstance(entry, dict):
        raise bad("entry must be a JSON object")
    missing = [f for f in C.TARGET_FIELDS if f not in entry]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    rank, alpha = entry["rank"], entry["alpha"]
    if not (_is_int(rank) and 1 <= rank <= C.MAX_RANK):
        raise bad(f"rank must be an integer in 1..{C.MAX_RANK}, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise bad(f"alpha must be a finite number, got {alpha!r}")
    for key in ("in_features", "out_features"):
        if not (_is_int(entry[key]) and 1 <= entry[key] <= C.MAX_DIM):
            raise bad(f"{key} must be an integer in 1..{C.MAX_DIM}, got {entry[key]!r}")
    if entry["kind"] not in C.KINDS:
        raise bad(f"kind must be one of {', '.join(C.KINDS)}, got {entry['kind']!r}")
    if entry["scale_rule"] not in C.SCALE_RULES:
        raise bad(
            f"scale_rule must be one of {', '.join(C.SCALE_RULES)}, got {entry['scale_rule']!r}"
        )
    return Target(
        name,
        rank=rank,
        alpha=float(alpha),
        in_features=entry["in_features"],
        out_features=entry["out_features"],
        scale_rule=entry["scale_rule"],
        kind=entry["kind"],
    )


def _base(raw: Any, where: str) -> BaseBinding:
    if not isinstance(raw, dict) or not isinstance(raw.get("fingerprint"), str):
        raise _fail(
            "metadata-json", f"'{C.BASE_KEY}' must be an object with a string 'fingerprint'", where
        )
    for key in ("hub_id", "revision"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise _fail("metadata-json", f"'{C.BASE_KEY}.{key}' must be a string or null", where)
    extra = {k: v for k, v in raw.items() if k not in C.BASE_FIELDS}
    return BaseBinding(raw["fingerprint"], raw.get("hub_id"), raw.get("revision"), extra)


def _match_tensors(targets: dict[str, Target], tensors: dict[str, TensorInfo], where: str) -> None:
    expected: dict[str, tuple[Target, tuple[int, int]]] = {}
    for t in targets.values():
        expected[t.name + C.LORA_A_SUFFIX] = (t, (t.rank, t.in_features))
        expected[t.name + C.LORA_B_SUFFIX] = (t, (t.out_features, t.rank))
    for name in tensors:
        if name not in expected:
            raise _fail(
                "orphan-tensor", f"tensor '{name}' belongs to no target in '{C.TARGETS_KEY}'", where
            )
    for name, (t, shape) in expected.items():
        info = tensors.get(name)
        if info is None:
            raise _fail("missing-tensor", f"target '{t.name}' has no tensor '{name}'", where)
        if info.shape != shape:
            raise _fail(
                "shape-mismatch",
                f"tensor '{name}' has shape {list(info.shape)} but target '{t.name}' "
                f"(rank {t.rank}, in {t.in_features}, out {t.out_features}) needs {list(shape)}",
                where,
            )
    for t in targets.values():
        a, b = tensors[t.name + C.LORA_A_SUFFIX], tensors[t.name + C.LORA_B_SUFFIX]
        if a.dtype != b.dtype:
            raise _fail(
                "dtype-mismatch",
                f"target '{t.name}': lora_A is {a.dtype} but lora_B is {b.dtype}",
                where,
            )
        t.dtype = a.dtype


# ---------------------------------------------------------------------------------------------
# Reading


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
        raise _fail("not-a-file", "is a directory, not an adapter file", path) from None
    except FileNotFoundError:
        raise _fail("not-found", "no such file", path, "check the path") from None
    except PermissionError:
        raise _fail("not-found", "permission denied", path) from None
    return first, size


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
            raise _fail(
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
        raise _fail(
            "integrity",
            f"tensor data hashes to {actual[:12]}… but the header records {str(header.adapter.sha256)[:12]}…",
            header.path,
            "the file was corrupted in transit or on disk; fetch or export it again",
        )
    for t in header.adapter.targets.values():
        for name, x in ((t.name + C.LORA_A_SUFFIX, t.lora_A), (t.name + C.LORA_B_SUFFIX, t.lora_B)):
            if not bool(torch.isfinite(x).all()):
                raise _fail("non-finite", f"tensor '{name}' contains NaN or Inf", header.path)


# ---------------------------------------------------------------------------------------------
# Writing (spec §5: canonical bytes)


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
        _target(name, t.header(), "<adapter>")  # the same field checks the reader applies
        a, b = t.lora_A, t.lora_B
        if tuple(a.shape) != (t.rank, t.in_features) or tuple(b.shape) != (t.out_features, t.rank):
            raise FormatError(
                f"target '{name}': lora_A {list(a.shape)} / lora_B {list(b.shape)} do not match "
                f"rank {t.rank}, in {t.in_features}, out {t.out_features}",
                code="shape-mismatch",
            )
        if a.dtype != b.dtype:
            raise FormatError(
                f"target '{name}': lora_A is {a.dtype}, lora_B is {b.dtype}", code="dtype-mismatch"
            )
        dtype_name(a.dtype)
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
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
    meta.update(
        {
            C.FORMAT_KEY: C.FORMAT_MARKER,
            C.VERSION_KEY: C.FORMAT_VERSION,
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
    from ._io import check_output

    check_output(path, force=force)  # fail before serialising a large adapter
    chunks = serialize(adapter)
    atomic_write(path, chunks, force=force)


def iter_targets(adapter: Adapter) -> Iterator[Target]:
    """Targets in name order, the order reports and writers use."""
    for name in sorted(adapter.targets):
        yield adapter.targets[name]


# ---------------------------------------------------------------------------------------------
# verify: every rule, plus the canonical-bytes check


@dataclass
class Check:
    rule: str
    ok: bool
    detail: str


@dataclass
class VerifyReport:
    path: str
    checks: list[Check]
    error: FormatError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(c.ok for c in self.checks)


def verify(path: str | os.PathLike[str]) -> VerifyReport:
    """Run every spec rule on a file; returns a report instead of raising for rule failures."""
    p = os.fspath(path)
    checks: list[Check] = []
    try:
        header = read_header(p)
        checks.append(
            Check("header", True, f"rules 1-20 hold ({len(header.adapter.targets)} targets)")
        )
        check_data(header)
        checks.append(Check("integrity", True, f"sha256 {header.adapter.sha256}"))
        checks.append(Check("non-finite", True, "all values finite"))
    except FormatError as e:
        return VerifyReport(p, checks, e)
    with open(p, "rb") as f:
        canonical = f.read() == to_bytes(header.adapter)
    # Not a rule (spec §5 binds writers, not readers), so reported but not failed.
    checks.append(
        Check(
            "canonical",
            True,
            "bytes are canonical" if canonical else "valid but not canonical bytes",
        )
    )
    return VerifyReport(p, checks)
