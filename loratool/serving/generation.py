"""The decode loop: a batch of prompts, greedy or sampled per row, streamed token by token.

``generate`` left-pads the prompts, runs one forward over them (the prefill) and then one forward
per new token with the key/value cache, with position ids counted from each row's first real
token, so a padded row computes what it would alone (up to the rounding of other matmul shapes).
Each row has its own ``Sampling``: temperature 0 is greedy (argmax), otherwise softmax at that
temperature, nucleus-filtered by ``top_p``, drawn from the row's own seeded generator, so a
seeded request gives the same tokens whatever else shares its batch. ``on_token(i, id)`` is
called for every new token of row i and may return False to stop that row (a stop string, a
client gone). ``TextStream`` turns token ids into text deltas without splitting a UTF-8 character.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .batched import MultiLora

OnToken = Callable[[int, int], bool]


@dataclass(frozen=True)
class Sampling:
    """How one row picks its tokens. ``seed`` None: fresh randomness."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Row:
    """One prompt to continue: token ids, how to sample, and which adapter (None: the base)."""

    prompt: list[int]
    sampling: Sampling = field(default_factory=Sampling)
    adapter: str | None = None


@dataclass
class Finished:
    tokens: list[int]
    finish_reason: str  # "stop" (end of sequence, or on_token said so) or "length"


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _pick(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> int:
    import torch

    if s.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < s.top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def generate(
    model: nn.Module,
    rows: Sequence[Row],
    *,
    eos_ids: set[int],
    pad_id: int,
    on_token: OnToken | None = None,
    multi: MultiLora | None = None,
) -> list[Finished]:
    """Continue every row; see the module docstring. The model is used as it is (eval, no grad)."""
    import torch

    device = next(model.parameters()).device
    width = max(len(r.prompt) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt, dtype=torch.int64)
        mask[i, width - len(r.prompt) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    gens: list[torch.Generator | None] = []
    for r in rows:
        g = None
        if r.sampling.temperature > 0:
            g = torch.Generator(device="cpu")
            g.manual_seed(r.sampling.seed if r.sampling.seed is not None else g.seed())
        gens.append(g)
    out = [Finished([], "length") for _ in rows]
    live = [r.sampling.max_new_tokens > 0 for r in rows]
    extra: dict[str, Any] = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    ctx = multi.rows([r.adapter for r in rows]) if multi is not None else nullcontext()
    with torch.no_grad(), ctx:
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **extra)
        while any(live):
            logits = res.logits[:, -1, :].float().cpu()
            nxt = [pad_id] * len(rows)
            for i, r in enumerate(rows):
                if not live[i]:
                    continue
                tok = _pick(logits[i], r.sampling, gens[i])
                nxt[i] = tok
                if tok in eos_ids:
                    live[i], out[i].finish_reason = False, "stop"
                    continue
                out[i].tokens.append(tok)
                if on_token is not None and on_token(i, tok) is False:
                    live[i], out[i].finish_reason = False, "stop"
                elif len(out[i].tokens) >= r.sampling.max_new_tokens:
                    live[i] = False
            if not any(live):
                break
            step = torch.tensor(nxt, dtype=torch.int64, device=device).view(-1, 1)
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)
            pos = mask.sum(-1, keepdim=True) - 1
            res = model(
                input_ids=step,
                attention_mask=mask,
                position_ids=pos,
                past_key_values=res.past_key_values,
                use_cache=True,
                **extra,
            )
    return out


class TextStream:
    """Token ids in, text deltas out: holds back a delta that ends inside a UTF-8 character."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        full: str = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if full.endswith("\ufffd"):
            return ""  # the rest of the character comes with the next token
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text = full
        return delta


def eos_ids_of(model: nn.Module, tokenizer: Any) -> set[int]:
    """The ids that end a sequence: the generation config's and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    if isinstance(getattr(tokenizer, "eos_token_id", None), int):
        ids.add(tokenizer.eos_token_id)
    return ids


def pad_id_of(tokenizer: Any, eos_ids: set[int]) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if isinstance(pad, int):
        return pad
    return min(eos_ids) if eos_ids else 0
