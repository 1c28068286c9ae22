"""Training data in: read and validate jsonl records, every bad line reported at once.

Three record shapes, one per line (other keys, such as ``id``, are ignored):

* ``{"text": str}``: loss on every token; a text longer than ``seq_len`` is cut into windows.
* ``{"prompt": str, "completion": str}``: loss on the completion (and the end-of-sequence token)
  only. Both may instead be lists of chat messages (TRL's conversational prompt-completion form).
* ``{"messages": [{"role", "content"}, ...]}``: rendered with the tokenizer's chat template; loss
  on assistant turns only.

Every bad line is collected (all of them, with line numbers) and reported in one ``BadDataError``
before any training starts; nothing is skipped silently. Blank lines carry no record and are
allowed. How records become token ids and loss masks is ``tokens``; rows and batches, ``batches``.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Any

from ...errors import TrainingError, UsageError
from ...retrieval.jsonl import MAX_REPORTED, BadDataError, jsonl_rows, line_ranges

__all__ = [
    "MAX_REPORTED",
    "BadDataError",
    "Record",
    "file_sha256",
    "holdout",
    "jsonl_rows",
    "line_ranges",
    "parse_record",
    "read_jsonl",
]


@dataclass
class Record:
    """One validated line: its number, its shape and the fields that shape uses."""

    line: int
    kind: str  # "text" | "prompt_completion" | "chat"
    text: str = ""
    prompt: str = ""
    completion: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- reading and validation ----------------------------------------------------------------------


def _messages(value: Any, what: str) -> tuple[list[dict[str, str]] | None, str | None]:
    if not isinstance(value, list) or not value:
        return None, f"'{what}' must be a non-empty list of messages"
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return None, f"{what}[{i}] is not an object"
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            return None, f"{what}[{i}] has no 'role' string"
        if not isinstance(content, str):
            return None, f"{what}[{i}] ('{role}') has no 'content' string"
        out.append({**m, "role": role, "content": content})
    return out, None


def parse_record(obj: Any, line: int) -> Record:
    """One decoded JSON value as a Record, or ValueError saying what is wrong with it."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    shapes = [k for k in ("text", "prompt", "messages") if k in obj]
    if "completion" in obj and "prompt" not in obj:
        raise ValueError("'completion' without 'prompt'")
    if not shapes:
        keys = ", ".join(sorted(obj)[:5]) or "none"
        raise ValueError(f"no 'text', 'prompt'/'completion' or 'messages' key (keys: {keys})")
    if len(shapes) > 1:
        raise ValueError(f"ambiguous record: has both {shapes[0]!r} and {shapes[1]!r}")
    if shapes[0] == "text":
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise ValueError("'text' must be a non-empty string")
        return Record(line, "text", text=obj["text"])
    if shapes[0] == "messages":
        msgs, why = _messages(obj["messages"], "messages")
        if msgs is None:
            raise ValueError(why)
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError("no assistant turn: nothing to train on")
        return Record(line, "chat", messages=msgs)
    prompt, completion = obj["prompt"], obj.get("completion")
    if completion is None:
        raise ValueError("'prompt' without 'completion'")
    if isinstance(prompt, list) or isinstance(completion, list):
        p, why = _messages(prompt, "prompt")
        if p is None:
            raise ValueError(why)
        c, why = _messages(completion, "completion")
        if c is None:
            raise ValueError(why)
        if not any(m["role"] == "assistant" for m in c):
            raise ValueError("the completion has no assistant turn")
        return Record(line, "chat", messages=p + [{**m, "_train": "1"} for m in c])
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ValueError("'prompt' and 'completion' must both be strings (or message lists)")
    if not completion:
        raise ValueError("'completion' is empty: nothing to train on")
    return Record(line, "prompt_completion", prompt=prompt, completion=completion)


def read_jsonl(path: str | os.PathLike[str]) -> list[Record]:
    """Every record of a jsonl file, or a BadDataError naming every bad line."""
    records: list[Record] = []
    problems: list[tuple[int, str]] = []
    try:
        f = open(path, "rb")  # noqa: SIM115  (closed by the with below; the open may fail)
    except OSError as e:
        raise UsageError(
            f"cannot read data file: {e.strerror}", code="no-data", where=str(path)
        ) from None
    with f:
        for n, obj in jsonl_rows(f, problems):
            try:
                records.append(parse_record(obj, n))
            except ValueError as e:
                problems.append((n, str(e)))
    if problems:
        raise BadDataError(str(path), problems)
    if not records:
        raise TrainingError("the data file has no records", code="empty-data", where=str(path))
    return records


def holdout(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Split off ``fraction`` of the records (at least one) for evaluation, seeded."""
    import random

    if not 0.0 < fraction < 1.0:
        raise UsageError(f"--eval-split must be in (0, 1), got {fraction}", code="bad-eval-split")
    n_eval = max(1, math.floor(len(records) * fraction))
    if n_eval >= len(records):
        raise UsageError(
            f"--eval-split {fraction} leaves no training records ({len(records)} in all)",
            code="bad-eval-split",
        )
    picked = set(random.Random(seed).sample(range(len(records)), n_eval))
    train = [r for i, r in enumerate(records) if i not in picked]
    evals = [r for i, r in enumerate(records) if i in picked]
    return train, evals
