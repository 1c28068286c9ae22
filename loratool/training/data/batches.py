"""Documents to tensors: pack them into rows (best-fit decreasing) and make padded batches.

``pack`` places whole documents into rows of at most ``seq_len`` tokens; ``Batch`` gives each
document position ids that restart at 0, which transformers turns into a block-diagonal causal
mask, so packed documents never attend to each other.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .tokens import IGNORE, Doc

if TYPE_CHECKING:
    import torch

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
