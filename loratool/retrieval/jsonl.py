"""jsonl files read line by line, every bad line collected and reported in one error.

Shared by every jsonl reader (retrieval pairs here, causal-LM records in ``loratool.training``),
so a bad line is reported the same way everywhere and none is skipped silently. It lives here,
below the trainer, because the trainer imports retrieval and not the other way round.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from ..errors import TrainingError

MAX_REPORTED = 20  # problems spelled out in the error message; all are listed in .problems


class BadDataError(TrainingError):
    """The data file has bad lines; ``problems`` lists every one as (line number, reason)."""

    default_code = "bad-data"

    def __init__(self, path: str, problems: list[tuple[int, str]]) -> None:
        self.problems = problems
        shown = "; ".join(f"line {n}: {why}" for n, why in problems[:MAX_REPORTED])
        more = len(problems) - MAX_REPORTED
        lines = line_ranges([n for n, _ in problems])
        super().__init__(
            f"{len(problems)} bad line{'s' if len(problems) != 1 else ''} (lines {lines}): "
            f"{shown}" + (f"; and {more} more" if more > 0 else ""),
            where=path,
            hint='each line must be one JSON object: {"text"}, {"prompt", "completion"} '
            'or {"messages": [{"role", "content"}, ...]}; fix or remove the lines listed',
        )


def line_ranges(numbers: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    out: list[str] = []
    for n in sorted(set(numbers)):
        if out and out[-1].split("-")[-1] == str(n - 1):
            out[-1] = out[-1].split("-")[0] + f"-{n}"
        else:
            out.append(str(n))
    return ", ".join(out)


def jsonl_rows(
    lines: Iterable[bytes], problems: list[tuple[int, str]]
) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for each non-blank line; undecodable lines go to ``problems``.

    Shared by every jsonl reader (causal-LM records, retrieval pairs), so a bad line is reported
    the same way everywhere and none is skipped silently.
    """
    for n, raw in enumerate(lines, 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append((n, f"not UTF-8 (byte {e.start})"))
            continue
        if not text.strip():
            continue
        try:
            yield n, json.loads(text)
        except ValueError as e:
            problems.append((n, f"not valid JSON ({getattr(e, 'msg', e)})"))
