"""Contrastive learning's parts: InfoNCE with duplicate masking, pair batches, GradCache, gather.

``info_nce`` is sentence-transformers' MultipleNegativesRankingLoss; ``cached_backward`` is
gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"; sentence-transformers' CachedMultipleNegativesRankingLoss): embeddings of the
whole step are computed without a graph, the loss and its gradient with respect to them are
taken on the full batch, then each micro-batch is re-run with its RNG state restored and
back-propagates its slice of that gradient. The result equals one big batch (the pool of
negatives does not shrink) at the memory cost of one micro-batch and one extra forward pass.

Across processes (``torchrun``) each process embeds its share of the step's pairs and
``gather_rows`` brings every process's embeddings to every process, so each scores its queries
against all the step's candidates, as one process with the whole batch would. The gathered
copies are constants; the process's own rows stay the live tensors. Every process then computes
the same global loss L(e₁, …, e_W), and its backward yields ∂L/∂e_r · ∂e_r/∂θ for its own r
only; summing the LoRA gradients over processes (``sum_gradients``) gives
Σ_r ∂L/∂e_r · ∂e_r/∂θ = dL/dθ, the one-process gradient (the trick of sentence-transformers'
``gather_across_devices`` and of OpenCLIP's ``gather_with_grad=False`` + ``local_loss=False``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F

from ..retrieval import Pair, SentenceConfig, similarity
from .data import holdout as holdout_records
from .runtime import Dist

# A micro-batch of texts: (indices into the step's texts, the tokenizer's padded batch).
Chunk = tuple[list[int], dict[str, torch.Tensor]]


# -- the loss ------------------------------------------------------------------------------------


def info_nce(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    *,
    temperature: float,
    config: SentenceConfig,
    duplicate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean InfoNCE of ``queries`` [B, d] against ``candidates`` [B + N, d]; row i's positive is i.

    ``duplicate`` [B, B + N] marks candidates that are not negatives of row i (masked out).
    Computed in fp32 whatever the embeddings' dtype.
    """
    scores = similarity(queries.float(), candidates.float(), config) / temperature
    if duplicate is not None:
        scores = scores.masked_fill(duplicate, float("-inf"))
    labels = torch.arange(queries.shape[0], device=scores.device)
    return F.cross_entropy(scores, labels)


def duplicates(rows: Sequence[Pair], candidates: Sequence[str]) -> torch.Tensor:
    """[B, len(candidates)] True where candidate j is no negative of row i (j ≠ i).

    Candidate j duplicates row i when its text is row i's positive, or when it is the positive
    of another row with the same query (both are then relevant to that query).
    """
    b = len(rows)
    mask = torch.zeros(b, len(candidates), dtype=torch.bool)
    by_text: dict[str, list[int]] = {}
    for j, text in enumerate(candidates):
        by_text.setdefault(text, []).append(j)
    by_query: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_query.setdefault(row.query, []).append(i)
    for i, row in enumerate(rows):
        for j in by_text.get(row.positive, []):
            mask[i, j] = j != i
        for j in by_query[row.query]:
            if j != i:
                mask[i, j] = True
    return mask


# -- batches -------------------------------------------------------------------------------------


class PairPlan:
    """Which pairs every step takes: a seeded permutation per epoch, ``global_rows`` at a time.

    The permutation is the causal-LM trainer's (same seed formula), so the position in the data
    is a pure function of the step and resuming needs no cursor. The last incomplete batch of an
    epoch is dropped: a small batch is an easy, noisy contrastive problem, and the next epoch's
    order covers those pairs.
    """

    def __init__(self, n: int, global_rows: int, seed: int) -> None:
        self.n = n
        self.global_rows = min(global_rows, n)
        self.steps_per_epoch = max(1, n // self.global_rows)
        self.seed = seed
        self._order: tuple[int, list[int]] | None = None

    def order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._order[1]

    def rows(self, step: int) -> list[int]:
        epoch, i = divmod(step, self.steps_per_epoch)
        return self.order(epoch)[i * self.global_rows : (i + 1) * self.global_rows]


def holdout(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """The causal-LM trainer's seeded ``--eval-split`` on pairs."""
    train, held = holdout_records(cast("list[Any]", pairs), fraction, seed)
    return cast("list[Pair]", train), cast("list[Pair]", held)


# -- gradient caching ----------------------------------------------------------------------------


def rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_backward(
    chunks: Sequence[Chunk],
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
) -> torch.Tensor:
    """The step's loss, back-propagated one micro-batch at a time (GradCache)."""
    states, reps = [], []
    with torch.no_grad():
        for _, batch in chunks:
            states.append(rng_state(device))  # dropout must draw the same twice
            reps.append(forward(batch))
    after = rng_state(device)
    cached = torch.cat(reps).requires_grad_()
    loss = loss_of(cached)
    loss.backward()
    assert cached.grad is not None
    grads = cached.grad.split([len(idx) for idx, _ in chunks])
    for (_, batch), state, grad in zip(chunks, states, grads, strict=True):
        set_rng(state, device)
        # d loss/d params = Σ (d loss/d embedding) · (d embedding/d params): a surrogate.
        torch.sum(forward(batch) * grad).backward()
    set_rng(after, device)
    return loss.detach()


# -- several processes ---------------------------------------------------------------------------


def share(n: int, dist: Dist) -> slice:
    """This process's contiguous part of a step's ``n`` rows (sizes differ by at most one).

    Contiguous parts keep the gathered rows in the step's order, so the loss sums in the same
    order as one process's and the duplicate mask is the one-process mask.
    """
    return slice(n * dist.rank // dist.world, n * (dist.rank + 1) // dist.world)


def gather_rows(local: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Every process's ``local`` [n_r, d] concatenated in rank order; only ours keeps its graph.

    The row counts may differ (hard negatives per pair vary): they are exchanged first, the
    rows padded to the largest count for ``all_gather`` and cut back after.
    """
    if dist.world == 1:
        return local
    import torch.distributed as D

    count = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
    counts = [torch.zeros_like(count) for _ in range(dist.world)]
    D.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    most = max(sizes)
    if most == 0:
        return local
    padded = local.new_zeros((most, *local.shape[1:]))
    padded[: local.shape[0]] = local.detach()
    parts = [torch.empty_like(padded) for _ in range(dist.world)]
    D.all_gather(parts, padded)
    pieces = [part[:size] for part, size in zip(parts, sizes, strict=True)]
    pieces[dist.rank] = local  # the live rows: the gradient flows through these only
    return torch.cat(pieces)


def sum_gradients(params: Sequence[torch.nn.Parameter], dist: Dist) -> None:
    """Sum the parameters' gradients over the processes, in one all-reduce (a few MB of LoRA)."""
    if dist.world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = dist.sum_(torch.cat([g.reshape(-1) for g in grads]))
    at = 0
    for p in params:
        p.grad = flat[at : at + p.numel()].view_as(p).clone()
        at += p.numel()
