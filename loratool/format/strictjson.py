"""Strict JSON for headers and metadata: no duplicate keys, no NaN, canonical output (spec §5)."""

from __future__ import annotations

import json
from typing import Any

from ..errors import FormatError


def fail(code: str, message: str, where: str, hint: str | None = None) -> FormatError:
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
        raise fail("duplicate-key", f"{what} has the key '{e}' twice", where) from None
    except (ValueError, RecursionError) as e:
        raise fail(code, f"{what} is not valid JSON ({e})", where) from None


def canonical_json(value: Any) -> str:
    """Spec §5: sorted keys, no whitespace, UTF-8, shortest round-trip floats."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
