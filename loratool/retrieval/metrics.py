"""Retrieval metrics: ranks (pessimistic on ties), recall@k, MRR, and an encoder's score on pairs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from .encoder import Encoder, Progress, encode
from .pairs import Pair, corpus_of
from .sentence import similarity

if TYPE_CHECKING:
    import torch

KS = (1, 5, 10)

# -- metrics -------------------------------------------------------------------------------------


@dataclass
class RetrievalMetrics:
    """Recall@k and MRR over ``queries`` queries against a corpus of ``corpus`` passages."""

    recall: dict[int, float]
    mrr: float
    mrr_at_10: float
    queries: int
    corpus: int
    ranks: list[int] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            **{f"recall@{k}": self.recall[k] for k in sorted(self.recall)},
            "mrr": self.mrr,
            "mrr@10": self.mrr_at_10,
            "queries": self.queries,
            "corpus": self.corpus,
        }


def ranks_of(scores: torch.Tensor, relevant: Sequence[int]) -> list[int]:
    """1-based rank of each row's relevant column in ``scores`` [queries, corpus], ties counted above."""
    import torch

    rel = torch.as_tensor(list(relevant), dtype=torch.long)
    target = scores.gather(1, rel.unsqueeze(1))  # [queries, 1]
    # Every other column scoring >= the relevant one ranks above it (pessimistic on ties).
    at_least = (scores >= target).sum(dim=1) - 1
    return [int(r) + 1 for r in at_least]


def metrics_from_ranks(
    ranks: Sequence[int], corpus: int, ks: Sequence[int] = KS
) -> RetrievalMetrics:
    """Recall@k (share of queries whose passage ranks <= k), MRR (mean 1/rank) and MRR@10."""
    n = len(ranks)
    if n == 0:
        raise UsageError("no queries to evaluate", code="bad-data")
    recall = {k: sum(r <= k for r in ranks) / n for k in ks}
    mrr = math.fsum(1.0 / r for r in ranks) / n
    mrr10 = math.fsum(1.0 / r for r in ranks if r <= 10) / n
    return RetrievalMetrics(recall, mrr, mrr10, n, corpus, list(ranks))


def evaluate(
    encoder: Encoder,
    pairs: Sequence[Pair],
    *,
    batch_size: int = 64,
    progress: Progress | None = None,
) -> RetrievalMetrics:
    """Retrieval metrics of ``encoder`` on ``pairs``: corpus = distinct positives."""
    corpus, relevant = corpus_of(pairs)
    queries = [p.query for p in pairs]
    total = len(queries) + len(corpus)

    def step(offset: int) -> Progress | None:
        if progress is None:
            return None
        return lambda done, _n: progress(offset + done, total)

    q = encode(encoder, queries, batch_size=batch_size, progress=step(0))
    c = encode(encoder, corpus, batch_size=batch_size, progress=step(len(queries)))
    return metrics_from_ranks(ranks_of(similarity(q, c, encoder.config), relevant), len(corpus))
