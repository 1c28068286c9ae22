"""The loratool layer of the header (spec §3–4, rules 10–20, 23–26): targets, features, binding,
tensors. Every kind is validated the same way: its ``parts`` say which tensors it owns."""

from __future__ import annotations

import math
import re
from typing import Any

from .. import constants as C
from .. import kinds
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

    requires = _requires(meta, where)
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

    used = kinds.requirements(targets.values())
    if requires != used:
        raise fail(
            "requires-mismatch",
            f"'{C.REQUIRES_KEY}' lists {requires} but the targets use {used}",
            where,
            "the header was edited by hand or by a broken tool; re-export the adapter",
        )
    _match_tensors(targets, tensors, where)
    known = set(C.KNOWN_KEYS)
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
    kind_name = entry.get("kind")
    if kind_name not in C.KINDS or kind_name not in kinds.REGISTRY:
        if "kind" not in entry:
            raise bad("missing kind")
        raise bad(f"kind must be one of {', '.join(C.KINDS)}, got {kind_name!r}")
    kind = kinds.get(kind_name)
    missing = [f for f in kind.entry_fields if f not in entry]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    common: dict[str, Any] = {}
    if "rank" in kind.entry_fields:
        rank, alpha = entry["rank"], entry["alpha"]
        if not (is_int(rank) and 1 <= rank <= C.MAX_RANK):
            raise bad(f"rank must be an integer in 1..{C.MAX_RANK}, got {rank!r}")
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not math.isfinite(alpha)
        ):
            raise bad(f"alpha must be a finite number, got {alpha!r}")
        common.update(rank=rank, alpha=float(alpha))
    for key in ("in_features", "out_features"):
        if key in kind.entry_fields:
            if not (is_int(entry[key]) and 1 <= entry[key] <= C.MAX_DIM):
                raise bad(f"{key} must be an integer in 1..{C.MAX_DIM}, got {entry[key]!r}")
            common[key] = entry[key]
    if "scale_rule" in kind.entry_fields:
        if entry["scale_rule"] not in C.SCALE_RULES:
            raise bad(
                f"scale_rule must be one of {', '.join(C.SCALE_RULES)}, got {entry['scale_rule']!r}"
            )
        common["scale_rule"] = entry["scale_rule"]
    features = _features(name, entry, kind, where)
    fields = kind.read_entry(entry, bad)
    t = Target(name, kind=kind_name, features=features, fields=fields, **common)
    if not kind.lowrank and "in_features" not in kind.entry_fields:
        first = next(iter(kind.parts(t).values()))  # dims for reports: out = the first dim
        t.out_features = first[0]
        t.in_features = math.prod(first[1:]) if len(first) > 1 else 1
    return t


def _features(name: str, entry: dict[str, Any], kind: kinds.Kind, where: str) -> list[str]:
    """§3.5: ``features`` is a non-empty sorted list of distinct names the kind accepts."""
    if "features" not in entry:
        return []
    raw = entry["features"]
    if (
        not isinstance(raw, list)
        or not raw
        or not all(isinstance(f, str) for f in raw)
        or raw != sorted(set(raw))
    ):
        raise fail(
            "bad-feature",
            f"target '{name}': features must be a non-empty sorted list of distinct names",
            where,
        )
    for f in raw:
        if f not in C.FEATURES:
            raise fail(
                "unsupported-feature",
                f"target '{name}' uses feature '{f}', which this loratool does not know",
                where,
                "upgrade loratool; applying the adapter without it would be wrong",
            )
        if f not in kind.accepts:
            raise fail(
                "bad-feature",
                f"target '{name}': a {kind.name} target cannot carry '{f}' "
                f"(it accepts {', '.join(sorted(kind.accepts)) or 'none'})",
                where,
            )
    if C.FEATURE_DORA in raw and C.FEATURE_LORA_BIAS in raw:
        raise fail(
            "bad-feature",
            f"target '{name}': dora and lora_bias together (PEFT refuses it: the bias would "
            "escape the magnitude's scaling)",
            where,
        )
    return list(raw)


def _requires(meta: dict[str, str], where: str) -> list[str]:
    """§4.1 (1.1): ``loratool.requires`` is a sorted list of distinct names this reader knows."""
    if C.REQUIRES_KEY not in meta:
        return []
    raw = strict_loads(
        meta[C.REQUIRES_KEY], code="metadata-json", what=f"'{C.REQUIRES_KEY}'", where=where
    )
    if (
        not isinstance(raw, list)
        or not all(isinstance(x, str) for x in raw)
        or raw != sorted(set(raw))
    ):
        raise fail(
            "metadata-json", f"'{C.REQUIRES_KEY}' must be a sorted list of distinct names", where
        )
    for x in raw:
        if x not in C.REQUIRABLE:
            raise fail(
                "unsupported-feature",
                f"the file requires '{x}', which this loratool does not know",
                where,
                "upgrade loratool; applying the adapter without it would be wrong",
            )
    return list(raw)


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
    expected: dict[str, tuple[Target, tuple[int, ...]]] = {}
    for t in targets.values():
        for part, shape in t.parts().items():
            expected[f"{t.name}.{part}"] = (t, shape)
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
            dims = (
                f"(rank {t.rank}, in {t.in_features}, out {t.out_features})"
                if t.lowrank
                else f"(kind {t.kind})"
            )
            raise fail(
                "shape-mismatch",
                f"tensor '{name}' has shape {list(info.shape)} but target '{t.name}' "
                f"{dims} needs {list(shape)}",
                where,
            )
    for t in targets.values():
        parts = list(t.parts())
        first = tensors[f"{t.name}.{parts[0]}"]
        for part in parts[1:]:
            other = tensors[f"{t.name}.{part}"]
            if other.dtype != first.dtype:
                raise fail(
                    "dtype-mismatch",
                    f"target '{t.name}': {parts[0]} is {first.dtype} but {part} is {other.dtype}",
                    where,
                )
        t.dtype = first.dtype
