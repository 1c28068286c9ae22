"""The loratool layer of the header (spec §3–4, rules 10–20): targets, base binding, tensors."""

from __future__ import annotations

import math
import re
from typing import Any

from .. import constants as C
from ..adapter import Adapter, BaseBinding, Target
from ..errors import FormatError
from .container import TensorInfo
from .strictjson import fail, strict_loads

_VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def adapter_from_tensors(
    tensors: dict[str, TensorInfo], meta: dict[str, str], where: str
) -> Adapter:
    marker = meta.get(C.FORMAT_KEY)
    if marker != C.FORMAT_MARKER:
        raise fail(
            "not-loratool",
            "not a loratool adapter (no 'loratool.format' marker)",
            where,
            "`loratool convert` reads PEFT, kohya and diffusers files into this format",
        )
    version = meta.get(C.VERSION_KEY, "")
    m = _VERSION_RE.match(version)
    if not m or int(m.group(1)) != C.SUPPORTED_MAJOR:
        raise fail(
            "unsupported-version",
            f"format version {version!r} is not supported (this loratool reads {C.SUPPORTED_MAJOR}.x)",
            where,
            "upgrade loratool",
        )
    for key in C.REQUIRED_KEYS:
        if key not in meta:
            raise fail("metadata-missing", f"required metadata key '{key}' is missing", where)

    raw_targets = strict_loads(
        meta[C.TARGETS_KEY], code="metadata-json", what=f"'{C.TARGETS_KEY}'", where=where
    )
    if not isinstance(raw_targets, dict):
        raise fail("metadata-json", f"'{C.TARGETS_KEY}' must be a JSON object", where)
    if not raw_targets:
        raise fail("no-targets", "the adapter has no targets", where)
    if len(raw_targets) > C.MAX_TARGETS:
        raise fail("bad-target", f"{len(raw_targets)} targets (limit {C.MAX_TARGETS})", where)
    targets = {name: check_target(name, entry, where) for name, entry in raw_targets.items()}

    raw_base = strict_loads(
        meta[C.BASE_KEY], code="metadata-json", what=f"'{C.BASE_KEY}'", where=where
    )
    base = _base(raw_base, where)
    sha = meta[C.SHA256_KEY]
    if not _SHA256_RE.match(sha):
        raise fail("metadata-json", f"'{C.SHA256_KEY}' must be 64 lowercase hex digits", where)
    provenance: dict[str, Any] = {}
    if C.PROVENANCE_KEY in meta:
        provenance = strict_loads(
            meta[C.PROVENANCE_KEY], code="metadata-json", what=f"'{C.PROVENANCE_KEY}'", where=where
        )
        if not isinstance(provenance, dict):
            raise fail("metadata-json", f"'{C.PROVENANCE_KEY}' must be a JSON object", where)

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
        raise fail(
            "fingerprint-mismatch",
            "the base fingerprint does not match the targets' names and shapes",
            where,
            "the header was edited by hand or by a broken tool; re-export the adapter",
        )
    return adapter


_NAME_RE = re.compile(r"^[^.\s]+(\.[^.\s]+)*$")


def check_target(name: str, entry: Any, where: str) -> Target:
    def bad(why: str) -> FormatError:
        return fail("bad-target", f"target '{name}': {why}", where)

    if not _NAME_RE.match(name) or name.endswith((C.LORA_A_SUFFIX, C.LORA_B_SUFFIX)):
        raise bad("not a module path (dot-separated, no spaces, no empty parts)")
    if not isinstance(entry, dict):
        raise bad("entry must be a JSON object")
    missing = [f for f in C.TARGET_FIELDS if f not in entry]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    rank, alpha = entry["rank"], entry["alpha"]
    if not (is_int(rank) and 1 <= rank <= C.MAX_RANK):
        raise bad(f"rank must be an integer in 1..{C.MAX_RANK}, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise bad(f"alpha must be a finite number, got {alpha!r}")
    for key in ("in_features", "out_features"):
        if not (is_int(entry[key]) and 1 <= entry[key] <= C.MAX_DIM):
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
        raise fail(
            "metadata-json", f"'{C.BASE_KEY}' must be an object with a string 'fingerprint'", where
        )
    for key in ("hub_id", "revision"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise fail("metadata-json", f"'{C.BASE_KEY}.{key}' must be a string or null", where)
    extra = {k: v for k, v in raw.items() if k not in C.BASE_FIELDS}
    return BaseBinding(raw["fingerprint"], raw.get("hub_id"), raw.get("revision"), extra)


def _match_tensors(targets: dict[str, Target], tensors: dict[str, TensorInfo], where: str) -> None:
    expected: dict[str, tuple[Target, tuple[int, int]]] = {}
    for t in targets.values():
        expected[t.name + C.LORA_A_SUFFIX] = (t, (t.rank, t.in_features))
        expected[t.name + C.LORA_B_SUFFIX] = (t, (t.out_features, t.rank))
    for name in tensors:
        if name not in expected:
            raise fail(
                "orphan-tensor", f"tensor '{name}' belongs to no target in '{C.TARGETS_KEY}'", where
            )
    for name, (t, shape) in expected.items():
        info = tensors.get(name)
        if info is None:
            raise fail("missing-tensor", f"target '{t.name}' has no tensor '{name}'", where)
        if info.shape != shape:
            raise fail(
                "shape-mismatch",
                f"tensor '{name}' has shape {list(info.shape)} but target '{t.name}' "
                f"(rank {t.rank}, in {t.in_features}, out {t.out_features}) needs {list(shape)}",
                where,
            )
    for t in targets.values():
        a, b = tensors[t.name + C.LORA_A_SUFFIX], tensors[t.name + C.LORA_B_SUFFIX]
        if a.dtype != b.dtype:
            raise fail(
                "dtype-mismatch",
                f"target '{t.name}': lora_A is {a.dtype} but lora_B is {b.dtype}",
                where,
            )
        t.dtype = a.dtype
