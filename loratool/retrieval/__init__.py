"""Sentence embeddings and retrieval scores: pairs data, pooling per the encoder's config, recall@k, MRR.

An encoder is a transformers model plus the sentence-transformers files beside it; loratool
computes what sentence-transformers computes from them (``sentence``) without depending on that
package. Retrieval evaluation follows sentence-transformers' ``InformationRetrievalEvaluator`` on
a pairs file: the corpus is every distinct positive, a query's one relevant passage is its own
positive. Ranks are pessimistic on ties (a passage scoring exactly as the relevant one counts as
ranked above it), so an encoder that maps everything to one vector scores badly, not randomly well.

The parts: ``pairs`` (the jsonl data), ``sentence`` (pooling, normalisation, similarity),
``encoder`` (loading and batched encoding), ``adapt`` (an adapter applied in memory),
``metrics`` (ranks, recall@k, MRR), ``report`` (``eval-retrieval``'s before/after), ``mine``
(hard negatives ranked by an encoder, for ``mine-negatives``) and ``jsonl``
(the line reader and ``BadDataError``, shared with the trainer, which imports this package).
torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

from .adapt import apply_adapter
from .encoder import Encoder, Progress, encode, load_encoder
from .metrics import KS, RetrievalMetrics, evaluate, metrics_from_ranks, ranks_of
from .mine import MiningReport, mine_negatives
from .pairs import PAIRS_HINT, Pair, corpus_of, read_pairs
from .report import RetrievalReport, evaluate_retrieval
from .sentence import (
    POOLING_KEYS,
    SIMILARITIES,
    SUPPORTED_POOLING,
    SentenceConfig,
    pool,
    sentence_config,
    similarity,
)

__all__ = [
    "KS",
    "PAIRS_HINT",
    "POOLING_KEYS",
    "SIMILARITIES",
    "SUPPORTED_POOLING",
    "Encoder",
    "MiningReport",
    "Pair",
    "Progress",
    "RetrievalMetrics",
    "RetrievalReport",
    "SentenceConfig",
    "apply_adapter",
    "corpus_of",
    "encode",
    "evaluate",
    "evaluate_retrieval",
    "load_encoder",
    "metrics_from_ranks",
    "mine_negatives",
    "pool",
    "ranks_of",
    "read_pairs",
    "sentence_config",
    "similarity",
]
