"""Training data: read and validate jsonl, tokenise with loss masks, pack into rows, make batches.

Three record shapes, one per line (other keys, such as ``id``, are ignored):

* ``{"text": str}``: loss on every token; a text longer than ``seq_len`` is cut into windows.
* ``{"prompt": str, "completion": str}``: loss on the completion (and the end-of-sequence token)
  only. Prompt and completion are tokenised separately, so the completion starts on a token
  boundary exactly as it does when the model generates it after the prompt. Both may instead be
  lists of chat messages (TRL's conversational prompt-completion form).
* ``{"messages": [{"role", "content"}, ...]}``: rendered with the tokenizer's chat template; loss
  on assistant turns only. The mask comes from rendering growing prefixes of the conversation:
  the text that ``messages[:i+1]`` adds to ``messages[:i]`` (split at the generation prompt for an
  assistant turn) is turn ``i``'s, so no template-specific markers are needed.

Every bad line is collected (all of them, with line numbers) and reported in one ``BadDataError``
before any training starts; nothing is skipped silently. Blank lines carry no record and are
allowed. ``pack`` places whole documents into rows of at most ``seq_len`` tokens (best-fit
decreasing); ``Batch`` gives each document position ids that restart at 0, which transformers turns
into a block-diagonal causal mask, so packed documents never attend to each other.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import TrainingError, UsageError

if TYPE_CHECKING:
    import torch

IGNORE = -100  # target id of positions without loss (PyTorch's cross-entropy convention)
MAX_REPORTED = 20  # problems spelled out in the error message; all are listed in .problems


class BadDataError(TrainingError):
    """The data file has bad lines; ``problems`` lists every one as (line number, reason)."""

    default_code = "bad-data"

    def __init__(self, path: str, problems: list[tuple[int, str]]) -> None:
        self.problems = problems
        shown = "; ".join(f"line {n}: {why}" for n, why in problems[:MAX_REPORTED])
        more = len(problems) - MAX_REPORTED
        lines = _ranges([n for n, _ in problems])
        super().__init__(
            f"{len(problems)} bad line{'s' if len(problems) != 1 else ''} (lines {lines}): "
            f"{shown}" + (f"; and {more} more" if more > 0 else ""),
            where=path,
            hint='each line must be one JSON object: {"text"}, {"prompt", "completion"} '
            'or {"messages": [{"role", "content"}, ...]}; fix or remove the lines listed',
        )


def _ranges(numbers: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    out: list[str] = []
    for n in sorted(set(numbers)):
        if out and out[-1].split("-")[-1] == str(n - 1):
            out[-1] = out[-1].split("-")[0] + f"-{n}"
        else:
            out.append(str(n))
    return ", ".join(out)


@dataclass
class Record:
    """One validated line: its number, its shape and the fields that shape uses."""

    line: int
    kind: str  # "text" | "prompt_completion" | "chat"
    text: str = ""
    prompt: str = ""
    completion: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Doc:
    """A tokenised document: input ids and, per position, the id to predict there (or IGNORE)."""

    line: int
    ids: list[int]
    targets: list[int]

    @property
    def num_targets(self) -> int:
        return sum(t != IGNORE for t in self.targets)


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


# -- tokenisation --------------------------------------------------------------------------------


@dataclass
class Tokenized:
    docs: list[Doc]
    truncated: list[int]  # line numbers of prompt/completion or chat records cut to seq_len
    split: int  # number of extra windows long texts were cut into


def _render(tokenizer: Any, messages: list[dict[str, str]], *, gen: bool) -> str:
    clean = [{k: v for k, v in m.items() if k != "_train"} for m in messages]
    text = tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=gen)
    if not isinstance(text, str):
        raise ValueError("the chat template did not render to text")
    return text


def chat_segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, trained)`` pieces whose concatenation is the whole.

    Raises ValueError when the template renders a prefix of the conversation differently from the
    start of the whole (some templates rewrite earlier turns), since no mask can be derived then.
    """
    trained = (
        (lambda m: m.get("_train") == "1")
        if any("_train" in m for m in messages)
        else (lambda m: m["role"] == "assistant")
    )
    segments: list[tuple[str, bool]] = []
    prev = ""
    for i, msg in enumerate(messages):
        if trained(msg):
            head = _render(tokenizer, messages[:i], gen=True) if i else ""
            if i and not head.startswith(prev):
                raise ValueError(f"the chat template renders turn {i} inconsistently")
            segments.append((head[len(prev) :], False))
            prev = head if i else prev
        full = _render(tokenizer, messages[: i + 1], gen=False)
        if not full.startswith(prev):
            raise ValueError(
                f"the chat template does not render messages[:{i}] as a prefix of messages[:{i + 1}]"
            )
        segments.append((full[len(prev) :], trained(msg)))
        prev = full
    return [(t, m) for t, m in segments if t]


def _ids(tokenizer: Any, texts: list[str], *, special: bool) -> list[list[int]]:
    if not texts:
        return []
    out = tokenizer(texts, add_special_tokens=special)["input_ids"]
    return [list(x) for x in out]


def _doc(line: int, ids: list[int], trained: list[bool]) -> Doc:
    # The target at position t is the next token, when that token is trained on.
    targets = [ids[t + 1] if trained[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return Doc(line, ids, targets)


def tokenize(records: Sequence[Record], tokenizer: Any, *, seq_len: int, path: str) -> Tokenized:
    """Tokenise every record with its loss mask; a BadDataError lists records with no loss left."""
    if seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2, got {seq_len}", code="bad-seq-len")
    eos = tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else []
    problems: list[tuple[int, str]] = []
    pieces: list[tuple[int, list[tuple[str, bool, bool]]]] = []  # line, (text, trained, special)
    for r in records:
        if r.kind == "text":
            pieces.append((r.line, [(r.text, True, True)]))
        elif r.kind == "prompt_completion":
            pieces.append((r.line, [(r.prompt, False, True), (r.completion, True, False)]))
        else:
            if not getattr(tokenizer, "chat_template", None):
                raise TrainingError(
                    "the tokenizer has no chat template, but the data has 'messages' records",
                    code="no-chat-template",
                    where=path,
                    hint="use {text} or {prompt, completion} records, or a chat model",
                )
            try:
                segs = chat_segments(tokenizer, r.messages)
            except Exception as e:  # jinja raises its own errors for bad roles and the like
                problems.append((r.line, f"chat template failed: {e}"))
                continue
            pieces.append((r.line, [(t, m, False) for t, m in segs]))
    if problems:
        raise BadDataError(path, problems)

    # One batched call per kind of piece: the fast tokenizer works through them in parallel.
    flat = [(i, j, p) for i, (_, ps) in enumerate(pieces) for j, p in enumerate(ps)]
    with_special = [k for k, (_, _, p) in enumerate(flat) if p[2]]
    without = [k for k, (_, _, p) in enumerate(flat) if not p[2]]
    ids_of: dict[int, list[int]] = {}
    for group, special in ((with_special, True), (without, False)):
        texts = [flat[k][2][0] for k in group]
        ids_of.update(zip(group, _ids(tokenizer, texts, special=special), strict=True))

    docs: list[Doc] = []
    truncated: list[int] = []
    split = 0
    k = 0
    for (line, ps), r in zip(pieces, records, strict=True):
        ids: list[int] = []
        trained: list[bool] = []
        for _text, train, _special in ps:
            piece = ids_of[k]
            k += 1
            ids += piece
            trained += [train] * len(piece)
        if r.kind != "chat" and eos_ids:
            ids += eos_ids  # the model learns to stop after a text or a completion
            trained.append(True)
        if r.kind == "text" and len(ids) > seq_len:
            # Windows overlap by one token, so every next-token prediction is made exactly once.
            for s in range(0, len(ids) - 1, seq_len - 1):
                docs.append(_doc(line, ids[s : s + seq_len], trained[s : s + seq_len]))
                split += s > 0
            continue
        if len(ids) > seq_len:
            ids, trained = ids[:seq_len], trained[:seq_len]
            truncated.append(line)
        doc = _doc(line, ids, trained)
        if doc.num_targets == 0:
            problems.append(
                (line, f"no trained token within --seq-len {seq_len} (the prompt fills it)")
            )
            continue
        docs.append(doc)
    if problems:
        raise BadDataError(path, problems)
    return Tokenized(docs, truncated, split)


# -- packing and batches -------------------------------------------------------------------------


def pack(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Documents (by index) grouped into rows of at most ``seq_len`` tokens, best-fit decreasing.

    Deterministic: ties are broken by document index. Rows list their documents in index order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), kept sorted
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, row = free.pop(at)
            rows[row].append(i)
            if space - n > 0:
                bisect.insort(free, (space - n, row))
        else:
            rows.append([i])
            if seq_len - n > 0:
                bisect.insort(free, (seq_len - n, len(rows) - 1))
    return [sorted(r) for r in rows]


@dataclass
class Batch:
    """One micro-batch: ``[B, T]`` tensors; ``attention_mask`` is None for packed rows."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    attention_mask: torch.Tensor | None
    tokens: int  # non-padding input tokens
    num_targets: int  # positions with a loss term
    segments: tuple[tuple[tuple[int, int], ...], ...] | None = None  # packed: documents per row

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device, non_blocking=True),
            self.position_ids.to(device, non_blocking=True),
            self.targets.to(device, non_blocking=True),
            None if self.attention_mask is None else self.attention_mask.to(device),
            self.tokens,
            self.num_targets,
            self.segments,
        )


def make_batch(docs: Sequence[Doc], rows: Sequence[Sequence[int]], *, packed: bool) -> Batch:
    """Rows of documents as one right-padded batch.

    Packed: every document's positions restart at 0, and so do the padding's, which makes the
    padding one more block that no document attends to. Unpacked: one document per row and a 2-D
    padding mask.
    """
    import torch

    width = max(sum(len(docs[d].ids) for d in row) for row in rows)
    b = len(rows)
    ids = torch.zeros(b, width, dtype=torch.long)
    pos = torch.zeros(b, width, dtype=torch.long)
    tgt = torch.full((b, width), IGNORE, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.long)
    tokens = 0
    segments = []
    for i, row in enumerate(rows):
        at = 0
        spans = []
        for d in row:
            doc = docs[d]
            n = len(doc.ids)
            ids[i, at : at + n] = torch.tensor(doc.ids)
            tgt[i, at : at + n] = torch.tensor(doc.targets)
            pos[i, at : at + n] = torch.arange(n)
            spans.append((at, at + n))
            at += n
        mask[i, :at] = 1
        pos[i, at:] = torch.arange(width - at)
        tokens += at
        segments.append(tuple(spans))
    padded = tokens < b * width
    attention = None if packed or not padded else mask
    n_targets = int((tgt != IGNORE).sum())
    return Batch(ids, pos, tgt, attention, tokens, n_targets, tuple(segments) if packed else None)


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
