"""Hard negatives mined by an encoder: for each query, the most similar passages that are not its own.

``mine_negatives(encoder, pairs, k=...)`` embeds every query and the corpus (the distinct
positives of the pairs, as ``eval-retrieval`` builds it, plus any ``extra`` passages), ranks the
corpus for each query by the encoder's own similarity, and gives each pair the ``k`` best-ranked
passages that are not relevant to it. Not relevant means: not its positive, not the positive of
another pair with the same query text (both are answers to it), not the query text itself, and
not already one of its negatives (existing negatives are kept, first). This is
sentence-transformers' ``mine_hard_negatives`` with ``range_min = skip`` and an absolute
``margin``: a candidate scoring within ``margin`` of the positive, or above it, is taken for an
unlabelled positive and passed over (Moreira et al. 2024, "NV-Retriever: Improving text
embedding models with effective hard-negative mining", use such a margin against false
negatives).

Mining uses the base encoder by default: the negatives are the passages the untrained model
confuses with the answer, which is what the contrastive loss can learn from most.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..errors import UsageError
from .encoder import Encoder, Progress, encode
from .pairs import Pair, corpus_of
from .sentence import similarity

# Queries scored against the corpus at a time: bounds the [rows, corpus] score matrix.
SCORE_ROWS = 1024


@dataclass(frozen=True)
class MiningReport:
    """What mining found: pairs, negatives added, and how hard they are."""

    pairs: int
    corpus: int
    added: int
    short: int  # pairs that got fewer than k new negatives (a small or near-duplicate corpus)
    mean_rank: float  # mean rank of the chosen negatives in the query's ranking (1 = top)
    positive_top1: float  # fraction of queries whose positive the miner ranks first

    def to_json(self) -> dict[str, float | int]:
        return {
            "pairs": self.pairs,
            "corpus": self.corpus,
            "negatives_added": self.added,
            "pairs_short": self.short,
            "mean_negative_rank": self.mean_rank,
            "positive_top1": self.positive_top1,
        }


def check_settings(*, k: int, skip: int, margin: float | None) -> None:
    """UsageError for settings ``mine_negatives`` refuses (callers check before loading a model)."""
    if k < 1:
        raise UsageError(f"-k must be at least 1, got {k}", code="bad-value")
    if skip < 0:
        raise UsageError(f"--skip must be 0 or more, got {skip}", code="bad-value")
    if margin is not None and not math.isfinite(margin):
        raise UsageError(f"--margin must be a finite number, got {margin}", code="bad-value")


def mine_negatives(
    encoder: Encoder,
    pairs: Sequence[Pair],
    *,
    k: int,
    skip: int = 0,
    margin: float | None = None,
    extra: Sequence[str] = (),
    batch_size: int = 64,
    max_length: int | None = None,
    progress: Progress | None = None,
) -> tuple[list[Pair], MiningReport]:
    """``pairs`` with up to ``k`` mined negatives appended to each; and a report.

    ``skip`` passes over the first that many non-relevant candidates (sentence-transformers'
    ``range_min``); ``margin`` (a similarity difference) drops candidates scoring above
    ``sim(query, positive) − margin``. Deterministic: ties go to the earlier corpus passage.
    """
    import torch

    check_settings(k=k, skip=skip, margin=margin)
    corpus, relevant = corpus_of(pairs)
    seen = set(corpus)
    corpus += [t for t in dict.fromkeys(extra) if t not in seen]
    position = {text: i for i, text in enumerate(corpus)}
    answers: dict[str, set[int]] = {}
    for p, r in zip(pairs, relevant, strict=True):
        answers.setdefault(p.query, set()).add(r)

    queries = list(dict.fromkeys(p.query for p in pairs))
    q_vec = encode(encoder, queries, batch_size=batch_size, max_length=max_length)
    c_vec = encode(encoder, corpus, batch_size=batch_size, max_length=max_length)
    q_row = {q: i for i, q in enumerate(queries)}
    # Each query's whole ranking once, best first; ties by corpus position (a stable sort).
    rankings: list[list[int]] = []
    scores_of: list[torch.Tensor] = []
    for start in range(0, len(queries), SCORE_ROWS):
        s = similarity(q_vec[start : start + SCORE_ROWS], c_vec, encoder.config)
        order = torch.sort(s, dim=1, descending=True, stable=True).indices
        rankings += order.tolist()
        scores_of += list(s)

    out: list[Pair] = []
    added = short = top1 = 0
    rank_sum = 0
    for p, r in zip(pairs, relevant, strict=True):
        row = q_row[p.query]
        ranking, scores = rankings[row], scores_of[row]
        top1 += ranking[0] == r
        ceiling = float(scores[r]) - margin if margin is not None else math.inf
        banned = set(answers[p.query]) | {position[n] for n in p.negatives if n in position}
        if p.query in position:
            banned.add(position[p.query])
        chosen: list[str] = []
        passed = 0
        for rank, j in enumerate(ranking, start=1):
            if j in banned or corpus[j] in p.negatives or float(scores[j]) > ceiling:
                continue
            if passed < skip:
                passed += 1
                continue
            chosen.append(corpus[j])
            rank_sum += rank
            if len(chosen) == k:
                break
        short += len(chosen) < k
        added += len(chosen)
        out.append(replace(p, negatives=(*p.negatives, *chosen)))
    report = MiningReport(
        pairs=len(pairs),
        corpus=len(corpus),
        added=added,
        short=short,
        mean_rank=rank_sum / added if added else 0.0,
        positive_top1=top1 / len(pairs) if pairs else 0.0,
    )
    return out, report
