"""Merge records in the shards' metadata: built by merge, read and matched by unmerge.

Provenance: every output shard's ``__metadata__`` gets ``loratool.merges``, a JSON list of merge
records (adapters by content digest, weights, dtype changes, product precision, sidecar, round
trip counts); ``unmerge`` undoes the last record only when its adapters and weights match.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from ..checkpoint import Checkpoint
from ..errors import CompatibilityError, FormatError
from ..format import canonical_json
from .inputs import Input
from .plan import FLOATS
from .report import TargetReport

RECORDS_KEY = "loratool.merges"  # shard metadata: JSON list of merge records, oldest first


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


def record_id(record: Mapping[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k not in ("id", "roundtrip")}
    return "sha256:" + hashlib.sha256(canonical_json(body).encode()).hexdigest()


def shard_metadata_with(
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


def roundtrip_stats(reports: Mapping[str, TargetReport]) -> dict[str, int]:
    return {
        "elements": sum(r.roundtrip_off for r in reports.values()),
        "tensors": sum(1 for r in reports.values() if r.roundtrip_off),
        "max_ulp": max((r.roundtrip_max_ulp for r in reports.values()), default=0),
    }


def tool_version() -> str:
    from .. import __version__

    return __version__


def match_record(
    records: list[dict[str, Any]],
    inputs: list[Input],
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


def restore_dtypes(top: Mapping[str, Any], where: str) -> dict[str, str]:
    changes = top.get("dtype_changes", {})
    if not isinstance(changes, dict) or not all(
        isinstance(k, str) and v in FLOATS for k, v in changes.items()
    ):
        raise FormatError(
            "merge record has invalid dtype_changes", code="bad-merge-record", where=where
        )
    return dict(changes)


def unmerge_record(inputs: list[Input]) -> dict[str, Any]:
    return {
        "op": "unmerge",
        "tool": f"loratool {tool_version()}",
        "adapters": [i.entry() for i in inputs],
    }
