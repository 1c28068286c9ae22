"""Which rows every micro-batch of every step takes, and the learning-rate schedule.

Both are pure functions of the settings and the step number, which is what lets a checkpoint
resume exactly with nothing but the step count: the data position is the step.
"""

from __future__ import annotations

import math

import torch

from . import data as D
from .config import TrainConfig
from .runtime import Dist


def lr_factor(step: int, *, schedule: str, warmup: int, total: int) -> float:
    """transformers' get_{cosine,linear,constant}_schedule_with_warmup, at optimizer step ``step``."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


class Plan:
    """Which rows every micro-batch of every step takes, on this process.

    Documents are packed into rows once; each epoch visits the rows in a seeded random order.
    Step ``s`` takes rows ``[s·G, (s+1)·G)`` of its epoch's order (G = global rows per step);
    micro-batch ``m`` of rank ``r`` takes the ``(m·world + r)``-th slice of ``batch_size`` rows.
    """

    def __init__(self, docs: list[D.Doc], config: TrainConfig, dist: Dist) -> None:
        self.docs = docs
        self.packed = config.packing
        lengths = [len(d.ids) for d in docs]
        self.rows = (
            D.pack(lengths, config.seq_len) if self.packed else [[i] for i in range(len(docs))]
        )
        self.batch_size = config.batch_size
        self.accum = config.grad_accum
        self.dist = dist
        self.global_rows = config.batch_size * config.grad_accum * dist.world
        self.steps_per_epoch = math.ceil(len(self.rows) / self.global_rows)
        self.seed = config.seed
        self._order: tuple[int, list[int]] | None = None
        # How full the rows are: the share of row positions that hold tokens, not padding.
        self.fill = sum(lengths) / max(1, len(self.rows) * config.seq_len)

    def order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.rows), generator=g).tolist())
        return self._order[1]

    def step_rows(self, step: int) -> list[list[list[int]]]:
        """This process's micro-batches for global step ``step`` (0-based), as rows of doc ids."""
        epoch, i = divmod(step, self.steps_per_epoch)
        chunk = self.order(epoch)[i * self.global_rows : (i + 1) * self.global_rows]
        out = []
        for m in range(self.accum):
            k = m * self.dist.world + self.dist.rank
            rows = chunk[k * self.batch_size : (k + 1) * self.batch_size]
            if rows:
                out.append([self.rows[r] for r in rows])
        return out

    def batches(self, step: int) -> list[D.Batch]:
        return [D.make_batch(self.docs, rows, packed=self.packed) for rows in self.step_rows(step)]
