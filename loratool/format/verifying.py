"""``verify``: every rule of the spec on one file, as a report rather than an exception."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import FormatError
from .reader import check_data, read_header
from .writer import to_bytes


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
        needs = header.adapter.requires
        if needs:  # spec 1.1: the header check above held rules 23-26 for these too
            parts = sum(len(t.parts()) for t in header.adapter.targets.values())
            checks.append(
                Check(
                    "features",
                    True,
                    f"rules 23-26 hold: requires {', '.join(needs)}; {parts} tensor parts, "
                    "each with its kind's shape",
                )
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
