"""Retrieval data: ``{"query", "positive"[, "negative"]}`` jsonl pairs, and the corpus they imply."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TrainingError, UsageError
from .jsonl import BadDataError, jsonl_rows

PAIRS_HINT = (
    'each line must be {"query": str, "positive": str} with an optional "negative" (a string '
    "or a list of strings); fix or remove the lines listed"
)


# -- data ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One jsonl row: a query, its relevant passage and any hard negatives, with its line number."""

    query: str
    positive: str
    negatives: tuple[str, ...] = ()
    line: int = 0


def _row_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    for key in ("query", "positive"):
        if key not in row:
            return f"missing '{key}'"
        if not isinstance(row[key], str) or not row[key].strip():
            return f"'{key}' must be a non-empty string"
    if "negative" in row and "negatives" in row:
        return "give 'negative' or 'negatives', not both"
    neg = row.get("negative", row.get("negatives"))
    if neg is not None:
        items = neg if isinstance(neg, list) else [neg]
        if not items or not all(isinstance(n, str) and n.strip() for n in items):
            return "'negative' must be a non-empty string or a list of them"
    return None


def read_pairs(path: str | os.PathLike[str]) -> list[Pair]:
    """Every row of a ``{"query", "positive"[, "negative"]}`` jsonl file, or an error naming them.

    ``negative`` (or ``negatives``) is one hard negative or a list of them; other keys, such as
    ``id``, are ignored, as ``loratool train`` does for causal-LM data. Blank lines are allowed;
    every other bad line (not JSON, not an object, a missing or empty field) is reported with its
    line number in one ``BadDataError`` and nothing is returned: no row is skipped silently.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"data file '{p}' does not exist", code="no-data", hint="check the path")
    pairs: list[Pair] = []
    problems: list[tuple[int, str]] = []
    with p.open("rb") as f:
        for number, row in jsonl_rows(f, problems):
            problem = _row_problem(row)
            if problem:
                problems.append((number, problem))
                continue
            neg = row.get("negative", row.get("negatives"))
            negatives = tuple(neg) if isinstance(neg, list) else (neg,) if neg is not None else ()
            pairs.append(Pair(row["query"], row["positive"], negatives, number))
    if problems:
        error = BadDataError(str(p), problems)
        error.hint = PAIRS_HINT
        raise error
    if not pairs:
        raise TrainingError(
            "the data file holds no pairs", code="bad-data", where=str(p), hint=PAIRS_HINT
        )
    return pairs


def corpus_of(pairs: Sequence[Pair]) -> tuple[list[str], list[int]]:
    """(distinct positives in first-seen order, index of each pair's positive in them)."""
    index: dict[str, int] = {}
    relevant = []
    for p in pairs:
        relevant.append(index.setdefault(p.positive, len(index)))
    return list(index), relevant
