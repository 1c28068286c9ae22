"""Records to documents: tokenise with loss masks, chat turns included, cut to ``seq_len``.

Prompt and completion are tokenised separately, so the completion starts on a token boundary
exactly as it does when the model generates it after the prompt. A chat record's mask comes from
rendering growing prefixes of the conversation: the text that ``messages[:i+1]`` adds to
``messages[:i]`` (split at the generation prompt for an assistant turn) is turn ``i``'s, so no
template-specific markers are needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import TrainingError, UsageError
from .records import BadDataError, Record

IGNORE = -100  # target id of positions without loss (PyTorch's cross-entropy convention)


@dataclass
class Doc:
    """A tokenised document: input ids and, per position, the id to predict there (or IGNORE)."""

    line: int
    ids: list[int]
    targets: list[int]

    @property
    def num_targets(self) -> int:
        return sum(t != IGNORE for t in self.targets)


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
