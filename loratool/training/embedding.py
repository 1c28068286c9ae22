"""The embedding trainer: contrastive LoRA training of sentence encoders on query/passage pairs.

``train_embedding(config, temperature=...)`` is ``loratool train --task embedding``. It takes the
same ``TrainConfig`` as the causal-LM trainer and shares its run (``session``: LoRA injection,
the learning-rate schedule, metrics lines, events, checkpoints in the same atomic, pickle-free
layout, resume). What differs is the data (``{"query", "positive"[, "negative"]}`` pairs, read
by ``loratool.retrieval``), the forward (the encoder's sentence-transformers pooling and
normalisation) and the loss (``contrastive``):

    L = −1/B · Σᵢ log softmax_j( sim(qᵢ, cⱼ) / τ )[j = i],   c = positives ∥ hard negatives

with every other row's positive and every row's hard negatives as negatives for query i
(sentence-transformers' MultipleNegativesRankingLoss; τ = 0.05 is its scale 20). Candidates
that are the same text as query i's positive, or another row's positive for the same query
text, are masked: they are not negatives, only duplicates.

A step contrasts ``batch_size × grad_accum`` pairs; with ``grad_accum > 1`` in micro-batches with
gradient caching (one big batch at the memory of one micro-batch and one extra forward pass).

The frozen encoder stays fp32; under bf16 (``--dtype auto`` on AMX/AVX512-BF16 CPUs and CUDA) the
matmuls run under autocast. Under ``torchrun`` a step's ``batch_size × grad_accum × processes``
pairs are split between the processes, whose embeddings are all-gathered (``contrastive``): each
process sees every in-batch and hard negative of the step, and the summed gradients are those
of one process with the whole batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, ClassVar

import torch
import torch.nn.functional as F

from .. import lora
from .. import retrieval as R
from ..adapter import Adapter
from ..errors import UsageError
from . import data as D
from . import state as S
from .config import TrainConfig
from .contrastive import (
    Chunk,
    PairPlan,
    cached_backward,
    duplicates,
    gather_rows,
    holdout,
    info_nce,
    share,
    sum_gradients,
)
from .events import OnEvent, StepStats, TrainEvent, TrainResult, write_line
from .runtime import (
    autocast,
    dtype_name,
    end_processes,
    init_dist,
    library_versions,
    resolve_device,
    resolve_dtype,
)
from .session import Session

__all__ = [
    "DEFAULT_TEMPERATURE",
    "EMBEDDING_DEFAULTS",
    "PairPlan",
    "duplicates",
    "embedding_config",
    "holdout",
    "info_nce",
    "train_embedding",
]

TASK = "embedding"
DEFAULT_TEMPERATURE = 0.05  # sentence-transformers' MultipleNegativesRankingLoss scale = 20
# Defaults of `loratool train --task embedding` where they differ from the causal-LM trainer's:
# BERT's attention and MLP projections (PEFT's usual choice for encoders), a batch big enough to
# give 31 in-batch negatives, and the 256-token limit sentence-transformers trains MiniLM with.
# lr and epochs: the best 3-seed mean of benchmarks/retrieval_sweep.py on a family-held-out part
# of the train split (tables: fixtures/data/retrieval/README.md; the test split unused).
EMBEDDING_DEFAULTS: dict[str, Any] = {
    "targets": "query,key,value,dense",
    "batch_size": 32,
    "seq_len": 256,
    "lr": 1e-3,
    "epochs": 2.0,
    "warmup": 0.1,
}
# Texts per forward pass: length-sorted groups this small waste little on padding, and rows
# enough keep the CPU's matmuls efficient. With --grad-accum > 1 also at most --batch-size.
CHUNK_ROWS = 16
# Settings a resumed run must share with its checkpoint (besides the data and the batch size).
FIXED_ON_RESUME = ("targets", "rank", "alpha", "rslora", "seed", "seq_len", "temperature")
RESUME_RULES = S.ResumeRules(
    fixed=FIXED_ON_RESUME,
    task=TASK,
    batches="{old} pairs a step over {old_n}; now {new} over {new_n}",
    batches_hint="resume with the same --batch-size × --grad-accum and --eval-split",
    settings_hint=None,
)


class _EmbeddingTrainer(Session):
    save_last: ClassVar[bool] = False
    resume_rules: ClassVar[S.ResumeRules] = RESUME_RULES

    def __init__(
        self,
        config: TrainConfig,
        temperature: float,
        on_event: OnEvent | None,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        super().__init__(config, on_event, should_stop, init_dist(config.device))
        self.temperature = temperature
        self.eval_result: tuple[float, R.RetrievalMetrics] | None = None

    def hyperparameters(self) -> dict[str, Any]:
        hp = self.config.hyperparameters()
        hp.pop("packing", None)  # pairs are never packed
        hp["temperature"] = self.temperature
        return dict(sorted(hp.items()))

    # -- set-up ----------------------------------------------------------------------------------

    def prepare(self) -> None:
        c = self.config
        self.device = resolve_device(c.device, self.dist)
        self.dtype = resolve_dtype(c.dtype, self.device)
        # Data first: a bad line should fail in a second, before the model loads.
        self.pairs = R.read_pairs(c.data)
        self.eval_pairs: list[R.Pair] = []
        if c.eval_data:
            self.eval_pairs = R.read_pairs(c.eval_data)
        elif c.eval_split:
            self.pairs, self.eval_pairs = holdout(self.pairs, c.eval_split, c.seed)

        self.encoder = R.load_encoder(c.model, device=self.device, revision=c.revision)
        self.seq_len = min(c.seq_len, self.encoder.max_length)
        if self.seq_len < c.seq_len:
            self.emit(
                TrainEvent(
                    "info",
                    message=f"--seq-len {c.seq_len} is above the encoder's limit; "
                    f"using {self.seq_len}",
                )
            )
        self._warn_truncated(self.pairs)
        self.setup_lora(self.encoder.model)

        world = self.dist.world
        wanted = c.batch_size * c.grad_accum * world
        if len(self.pairs) < world:
            raise UsageError(
                f"only {len(self.pairs)} pairs for {world} processes", code="bad-value"
            )
        self.plan = PairPlan(len(self.pairs), wanted, c.seed)
        if self.plan.global_rows < wanted:
            procs = " × processes" if world > 1 else ""
            self.warn(
                f"only {len(self.pairs)} pairs: every step contrasts all of them "
                f"(not --batch-size × --grad-accum{procs} = {wanted})"
            )
        self.set_length(self.plan.steps_per_epoch)
        self.meta = {
            "task": TASK,
            "data_sha256": D.file_sha256(c.data),
            "eval_sha256": D.file_sha256(c.eval_data) if c.eval_data else None,
            "num_rows": len(self.pairs),
            "global_rows": self.plan.global_rows,
            "world_size": world,
            "hyperparameters": self.hyperparameters(),
            "dtype": dtype_name(self.dtype),
        }

    def start_message(self) -> str:
        negatives = sum(len(p.negatives) for p in self.pairs)
        procs = f" over {self.dist.world} processes" if self.dist.world > 1 else ""
        return (
            f"{len(self.pairs)} pairs"
            + (f" with {negatives} hard negatives" if negatives else "")
            + f", {self.plan.global_rows} pairs a step{procs}, {self.plan.steps_per_epoch} "
            "steps per "
            f"epoch, {self.total} steps, ≤{self.seq_len} tokens a text, "
            f"{dtype_name(self.dtype)} on {self.device}"
        )

    def _warn_truncated(self, pairs: list[R.Pair]) -> None:
        texts = [t for p in pairs for t in (p.query, p.positive, *p.negatives)]
        owners = [p.line for p in pairs for _ in range(2 + len(p.negatives))]
        ids = self.encoder.tokenizer(texts, truncation=False, verbose=False)["input_ids"]
        lines = sorted({line for line, x in zip(owners, ids, strict=True) if len(x) > self.seq_len})
        if lines:
            self.warn(
                f"{len(lines)} pairs have texts longer than {self.seq_len} tokens; "
                f"they are truncated, as sentence-transformers does (lines "
                f"{D.line_ranges(lines[:50])}{', ...' if len(lines) > 50 else ''})"
            )

    # -- one step --------------------------------------------------------------------------------

    def _chunks(self, texts: Sequence[str]) -> list[Chunk]:
        """``texts`` as padded micro-batches of similar length: (indices into texts, batch).

        Each text's embedding depends only on its own tokens (the attention and pooling masks
        hide padding), so grouping by length changes no result and cuts the padding a step
        computes on, about half of it on docstring passages.
        """
        enc = self.encoder.tokenizer(list(texts), truncation=True, max_length=self.seq_len)
        lengths = [len(ids) for ids in enc["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: (-lengths[i], i))
        rows = min(CHUNK_ROWS, self.config.batch_size)
        out = []
        for start in range(0, len(order), rows):
            idx = order[start : start + rows]
            features = {key: [enc[key][i] for i in idx] for key in enc}
            out.append((idx, dict(self.encoder.tokenizer.pad(features, return_tensors="pt"))))
        return out

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            return self.encoder.embed(batch).float()

    def train_step(self) -> StepStats:
        """One optimizer step on the step's pairs (this process's share of them, all negatives)."""
        rows = [self.pairs[i] for i in self.plan.rows(self.step)]
        # The whole step's candidates, as one process orders them: positives, then negatives.
        candidates = [r.positive for r in rows] + [n for r in rows for n in r.negatives]
        mask = duplicates(rows, candidates).to(self.device)
        mine = rows[share(len(rows), self.dist)]
        nq = len(mine)
        texts = [r.query for r in mine] + [r.positive for r in mine]
        texts += [n for r in mine for n in r.negatives]
        chunks = self._chunks(texts)
        n_tokens = sum(int(batch["attention_mask"].sum()) for _, batch in chunks)
        if self.dist.world > 1:
            n_tokens = int(self.reduce(torch.tensor([n_tokens], dtype=torch.float64))[0])
        where = torch.tensor([i for idx, _ in chunks for i in idx], device=self.device)

        def loss_of(embeddings: torch.Tensor) -> torch.Tensor:
            # Rows back in text order: queries, positives, negatives; then every process's.
            ordered = torch.empty_like(embeddings).index_copy(0, where, embeddings)
            q, pos, neg = ordered[:nq], ordered[nq : 2 * nq], ordered[2 * nq :]
            q, pos, neg = (gather_rows(t, self.dist) for t in (q, pos, neg))
            return info_nce(
                q,
                torch.cat([pos, neg]),
                temperature=self.temperature,
                config=self.encoder.config,
                duplicate=mask,
            )

        if self.config.grad_accum == 1:
            loss = loss_of(torch.cat([self._forward(batch) for _, batch in chunks]))
            loss.backward()
        else:
            loss = cached_backward(chunks, self._forward, loss_of, self.device)
        sum_gradients(list(self.params.values()), self.dist)
        value = float(loss.detach())
        return StepStats(value, n_tokens, self.clip_and_step(value))

    # -- evaluation ------------------------------------------------------------------------------

    @property
    def has_eval(self) -> bool:
        return bool(self.eval_pairs)

    def evaluate(self, metrics: IO[str] | None) -> float:
        """Full-corpus InfoNCE loss and retrieval metrics on held-out pairs (fp32, no dropout)."""
        pairs, step = self.eval_pairs, self.step
        corpus, relevant = R.corpus_of(pairs)
        enc = self.encoder
        q = R.encode(enc, [p.query for p in pairs], batch_size=64, max_length=self.seq_len)
        k = R.encode(enc, corpus, batch_size=64, max_length=self.seq_len)
        scores = R.similarity(q, k, enc.config)
        loss = float(F.cross_entropy(scores / self.temperature, torch.tensor(relevant)))
        result = R.metrics_from_ranks(R.ranks_of(scores, relevant), len(corpus))
        if metrics is not None:
            doc = {"step": step, "eval_loss": loss}
            doc.update({f"eval_{k}": v for k, v in result.to_json().items()})
            write_line(metrics, doc)
        self.emit(TrainEvent("eval", step=step, total_steps=self.total, eval_loss=loss))
        self.emit(
            TrainEvent(
                "info",
                step=step,
                message=f"step {step}: eval recall@1 {result.recall[1]:.4f}, "
                f"recall@10 {result.recall[10]:.4f}, MRR {result.mrr:.4f} "
                f"({result.queries} queries, {result.corpus} passages)",
            )
        )
        self.eval_result = (loss, result)
        return loss

    # -- the result ------------------------------------------------------------------------------

    def finish(self, interrupted: bool) -> TrainResult:
        final = self.losses[-1] if self.losses else None
        if interrupted:
            return TrainResult(
                None,
                self.step,
                self.total,
                final,
                None,
                self.tokens,
                interrupted=True,
                checkpoint=self.last_ckpt,
                losses=self.losses,
            )
        adapter = self._adapter()
        output = self.deliver(adapter)
        return TrainResult(
            output,
            self.step,
            self.total,
            final,
            self.eval_loss,
            self.tokens,
            adapter=adapter,
            losses=self.losses,
        )

    def _adapter(self) -> Adapter:
        c = self.config
        hub_id = lora.hub_id_for(c.model)
        training: dict[str, Any] = {
            "task": TASK,
            "base_model": hub_id or Path(c.model).name,
            "data": {
                "file": Path(c.data).name,
                "sha256": self.meta["data_sha256"],
                "pairs": len(self.pairs),
            },
            "hyperparameters": self.hyperparameters(),
            "sentence_config": self.encoder.config.to_json(),
            "steps": self.step,
            "epochs": round(self.step / self.plan.steps_per_epoch, 4),
            "final_loss": self.losses[-1] if self.losses else None,
            "tokens": self.tokens,
            "precision": dtype_name(self.dtype),
            "processes": self.dist.world,
            "versions": library_versions(),
        }
        if self.eval_result is not None:
            loss, result = self.eval_result
            training["eval"] = {
                "loss": loss,
                **result.to_json(),
                "file": Path(c.eval_data).name if c.eval_data else None,
                "sha256": self.meta["eval_sha256"],
                "pairs": len(self.eval_pairs),
            }
        revision = getattr(self.model.config, "_commit_hash", None) if hub_id else None
        return lora.extract_adapter(
            self.model, hub_id=hub_id, revision=revision, provenance={"training": training}
        )


def embedding_config(**settings: Any) -> TrainConfig:
    """A ``TrainConfig`` with the embedding defaults under ``settings`` (for library callers)."""
    config = dataclasses.replace(TrainConfig(), **{**EMBEDDING_DEFAULTS, **settings})
    config.validate()
    return config


def train_embedding(
    config: TrainConfig,
    *,
    temperature: float | None = None,
    on_event: OnEvent | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train a LoRA adapter for a sentence encoder as ``config`` says; write it to ``config.output``.

    ``temperature`` defaults to ``config.temperature`` if the config has one, else 0.05. The
    same contract as ``loratool.training.train``: progress to ``on_event``, ``should_stop``
    polled after every step (a resumable checkpoint, ``TrainResult.interrupted``), UsageError
    for bad settings, BadDataError for bad lines (all of them), TrainingError for a non-finite
    loss. ``config.packing`` is ignored; ``grad_accum`` enlarges the contrastive batch (GradCache).
    """
    config.validate()
    if temperature is None:  # a TrainConfig that grew a temperature field carries it
        given = getattr(config, "temperature", None)
        temperature = DEFAULT_TEMPERATURE if given is None else float(given)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise UsageError(f"--temperature must be positive, got {temperature}", code="bad-value")
    trainer = _EmbeddingTrainer(config, temperature, on_event, should_stop)
    result = None
    try:
        result = trainer.run()
        return result
    finally:
        end_processes(trainer.dist, trainer, result)
