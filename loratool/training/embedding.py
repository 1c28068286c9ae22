"""Contrastive LoRA training of sentence encoders: InfoNCE over in-batch and hard negatives.

``train_embedding(config, temperature=...)`` is ``loratool train --task embedding``. It takes the
same ``TrainConfig`` as the causal-LM trainer and reuses its machinery: LoRA injection
(``loratool.lora``), the learning-rate schedule, devices and precision (``loop``), checkpoints in
the same atomic, pickle-free layout (``state``), the same ``TrainEvent`` progress, metrics lines
and ``TrainResult``. What differs is the data (``{"query", "positive"[, "negative"]}`` pairs,
read by ``loratool.retrieval``), the forward (the encoder's sentence-transformers pooling and
normalisation) and the loss:

    L = −1/B · Σᵢ log softmax_j( sim(qᵢ, cⱼ) / τ )[j = i],   c = positives ∥ hard negatives

with every other row's positive and every row's hard negatives as negatives for query i
(sentence-transformers' MultipleNegativesRankingLoss; τ = 0.05 is its scale 20). Candidates
that are the same text as query i's positive, or another row's positive for the same query
text, are masked: they are not negatives, only duplicates.

One optimizer step contrasts ``batch_size × grad_accum`` pairs. With ``grad_accum > 1`` the step
is computed in micro-batches of ``batch_size`` sentences with gradient caching (Gao et al. 2021,
"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"; sentence-transformers'
CachedMultipleNegativesRankingLoss): embeddings of the whole step are computed without a graph,
the loss and its gradient with respect to them are taken on the full batch, then each
micro-batch is re-run with its RNG state restored and back-propagates its slice of that gradient.
The result equals one big batch (the pool of negatives does not shrink) at the memory cost of
one micro-batch and one extra forward pass.

The frozen encoder stays fp32; under bf16 (``--dtype auto`` on AMX/AVX512-BF16 CPUs and CUDA) the
matmuls run under autocast. One process only: in-batch negatives across processes would need
an all-gather of embeddings, which this trainer does not do (it says so under torchrun).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, cast

import torch
import torch.nn.functional as F

from .. import lora
from .. import retrieval as R
from .._io import check_output
from ..adapter import Adapter
from ..errors import TrainingError, UsageError
from . import data as D
from . import state as S
from .config import TrainConfig
from .loop import Dist, OnEvent, TrainEvent, TrainResult, lr_factor, resolve_device, resolve_dtype

TASK = "embedding"
DEFAULT_TEMPERATURE = 0.05  # sentence-transformers' MultipleNegativesRankingLoss scale = 20
# Defaults of `loratool train --task embedding` where they differ from the causal-LM trainer's:
# BERT's attention and MLP projections (PEFT's usual choice for encoders), a batch big enough to
# give 31 in-batch negatives, and the 256-token limit sentence-transformers trains MiniLM with.
EMBEDDING_DEFAULTS: dict[str, Any] = {
    "targets": "query,key,value,dense",
    "batch_size": 32,
    "seq_len": 256,
    "lr": 1e-4,
    "warmup": 0.1,
}
# Settings a resumed run must share with its checkpoint (besides the data and the batch size).
# Texts per forward pass: length-sorted groups this small waste little on padding, and rows
# enough keep the CPU's matmuls efficient. With --grad-accum > 1 also at most --batch-size.
CHUNK_ROWS = 16
FIXED_ON_RESUME = ("targets", "rank", "alpha", "rslora", "seed", "seq_len", "temperature")


# -- the loss ------------------------------------------------------------------------------------


def info_nce(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    *,
    temperature: float,
    config: R.SentenceConfig,
    duplicate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean InfoNCE of ``queries`` [B, d] against ``candidates`` [B + N, d]; row i's positive is i.

    ``duplicate`` [B, B + N] marks candidates that are not negatives of row i (masked out).
    Computed in fp32 whatever the embeddings' dtype.
    """
    scores = R.similarity(queries.float(), candidates.float(), config) / temperature
    if duplicate is not None:
        scores = scores.masked_fill(duplicate, float("-inf"))
    labels = torch.arange(queries.shape[0], device=scores.device)
    return F.cross_entropy(scores, labels)


def duplicates(rows: Sequence[R.Pair], candidates: Sequence[str]) -> torch.Tensor:
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


def holdout(pairs: list[R.Pair], fraction: float, seed: int) -> tuple[list[R.Pair], list[R.Pair]]:
    """The causal-LM trainer's seeded ``--eval-split`` on pairs."""
    train, held = D.holdout(cast("list[Any]", pairs), fraction, seed)
    return cast("list[R.Pair]", train), cast("list[R.Pair]", held)


# -- the run -------------------------------------------------------------------------------------


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class _EmbeddingTrainer:
    def __init__(
        self,
        config: TrainConfig,
        temperature: float,
        on_event: OnEvent | None,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.config = config
        self.temperature = temperature
        self.on_event = on_event
        self.should_stop = should_stop or (lambda: False)

    def emit(self, event: TrainEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def hyperparameters(self) -> dict[str, Any]:
        hp = self.config.hyperparameters()
        hp.pop("packing", None)  # pairs are never packed
        hp["temperature"] = self.temperature
        return dict(sorted(hp.items()))

    # -- setup ---------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        c = self.config
        output = Path(c.output)
        check_output(output, force=c.force)
        root = c.checkpoint_root()
        saved = self._find_resume(root)
        if saved is None and S.list_checkpoints(root):
            if not c.force:
                raise UsageError(
                    f"checkpoints of an earlier run are in '{root}'",
                    code="output-exists",
                    hint="pass --resume to continue that run, or --force to start over",
                )
            S.remove_all(root)
        if c.metrics and saved is None:
            check_output(c.metrics, force=c.force)

        device = resolve_device(c.device, Dist())
        dtype = resolve_dtype(c.dtype, device)
        self.device, self.dtype = device, dtype

        # Data first: a bad line should fail in a second, before the model loads.
        pairs = R.read_pairs(c.data)
        eval_pairs: list[R.Pair] = []
        if c.eval_data:
            eval_pairs = R.read_pairs(c.eval_data)
        elif c.eval_split:
            pairs, eval_pairs = holdout(pairs, c.eval_split, c.seed)

        encoder = R.load_encoder(c.model, device=device, revision=c.revision)
        self.encoder = encoder
        self.seq_len = min(c.seq_len, encoder.max_length)
        if self.seq_len < c.seq_len:
            self.emit(
                TrainEvent(
                    "info",
                    message=f"--seq-len {c.seq_len} is above the encoder's limit; "
                    f"using {self.seq_len}",
                )
            )
        self._warn_truncated(pairs)

        torch.manual_seed(c.seed)  # the LoRA init
        report = lora.inject(
            encoder.model,
            targets=c.targets,
            rank=c.rank,
            alpha=c.lora_alpha,
            dropout=c.dropout,
            rslora=c.rslora,
        )
        self.emit(
            TrainEvent("info", message=f"LoRA on {len(report.modules)} modules: {report.summary()}")
        )
        if c.grad_checkpointing:
            enable = getattr(encoder.model, "gradient_checkpointing_enable", None)
            if not callable(enable) or not getattr(
                encoder.model, "supports_gradient_checkpointing", False
            ):
                raise UsageError(
                    f"{type(encoder.model).__name__} does not support gradient checkpointing",
                    code="bad-value",
                )
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        encoder.model.train()
        params = lora.lora_parameters(encoder.model)
        self.names, self.params = list(params), list(params.values())
        self.optimizer = torch.optim.AdamW(
            self.params, lr=c.lr, weight_decay=c.weight_decay, betas=(0.9, 0.999), eps=1e-8
        )

        plan = PairPlan(len(pairs), c.batch_size * c.grad_accum, c.seed)
        if plan.global_rows < c.batch_size * c.grad_accum:
            self.emit(
                TrainEvent(
                    "warning",
                    message=f"only {len(pairs)} pairs: every step contrasts all of them "
                    f"(not --batch-size × --grad-accum = {c.batch_size * c.grad_accum})",
                )
            )
        total = c.max_steps or max(1, math.ceil(c.epochs * plan.steps_per_epoch))
        warmup = int(c.warmup) if c.warmup >= 1 else math.ceil(c.warmup * total)
        data_sha = D.file_sha256(c.data)
        eval_sha = D.file_sha256(c.eval_data) if c.eval_data else None
        self.meta = {
            "task": TASK,
            "data_sha256": data_sha,
            "eval_sha256": eval_sha,
            "num_rows": len(pairs),
            "global_rows": plan.global_rows,
            "world_size": 1,
            "hyperparameters": self.hyperparameters(),
            "dtype": _precision(dtype),
        }

        step, tokens, elapsed0 = 0, 0, 0.0
        losses: list[float] = []
        if saved is not None:
            step, tokens, elapsed0, losses = self._restore(saved, data_sha, plan)
            self.emit(TrainEvent("info", message=f"resumed from {saved.path} at step {step}"))

        negatives = sum(len(p.negatives) for p in pairs)
        self.emit(
            TrainEvent(
                "start",
                step=step,
                total_steps=total,
                message=(
                    f"{len(pairs)} pairs"
                    + (f" with {negatives} hard negatives" if negatives else "")
                    + f", {plan.global_rows} pairs a step, {plan.steps_per_epoch} steps per "
                    f"epoch, {total} steps, ≤{self.seq_len} tokens a text, "
                    f"{_precision(dtype)} on {device}"
                ),
            )
        )
        return self._loop(
            pairs, eval_pairs, plan, total, warmup, step, tokens, elapsed0, losses, root, saved
        )

    def _warn_truncated(self, pairs: list[R.Pair]) -> None:
        texts = [t for p in pairs for t in (p.query, p.positive, *p.negatives)]
        owners = [p.line for p in pairs for _ in range(2 + len(p.negatives))]
        ids = self.encoder.tokenizer(texts, truncation=False, verbose=False)["input_ids"]
        lines = sorted({line for line, x in zip(owners, ids, strict=True) if len(x) > self.seq_len})
        if lines:
            self.emit(
                TrainEvent(
                    "warning",
                    message=f"{len(lines)} pairs have texts longer than {self.seq_len} tokens; "
                    f"they are truncated, as sentence-transformers does (lines "
                    f"{D.line_ranges(lines[:50])}{', ...' if len(lines) > 50 else ''})",
                )
            )

    # -- the loop ------------------------------------------------------------------------------

    def _loop(
        self,
        pairs: list[R.Pair],
        eval_pairs: list[R.Pair],
        plan: PairPlan,
        total: int,
        warmup: int,
        step: int,
        tokens: int,
        elapsed0: float,
        losses: list[float],
        root: Path,
        saved: S.Saved | None,
    ) -> TrainResult:
        c = self.config
        metrics: IO[str] | None = None
        if c.metrics:
            metrics = open(c.metrics, "a" if saved is not None else "w", encoding="utf-8")  # noqa: SIM115
        last_ckpt = S.latest(root)
        eval_result: tuple[float, R.RetrievalMetrics] | None = None
        start = time.perf_counter()
        start_tokens, first_step = tokens, step
        interrupted = False
        try:
            while step < total:
                lr = c.lr * lr_factor(step, schedule=c.schedule, warmup=warmup, total=total)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                rows = [pairs[i] for i in plan.rows(step)]
                loss, n_tokens, grad_norm = self._step(rows, step)
                step += 1
                tokens += n_tokens
                losses.append(loss)
                elapsed = elapsed0 + time.perf_counter() - start
                run_s = time.perf_counter() - start
                tps = (tokens - start_tokens) / run_s if run_s > 0 else None
                eta = run_s / (step - first_step) * (total - step)
                row = {
                    "step": step,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": tokens,
                    "epoch": round(step / plan.steps_per_epoch, 4),
                    "elapsed_s": round(elapsed, 3),
                    "tokens_per_s": None if tps is None else round(tps, 1),
                }
                if metrics is not None:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                self.emit(
                    TrainEvent(
                        "step",
                        step=step,
                        total_steps=total,
                        loss=loss,
                        lr=lr,
                        grad_norm=grad_norm,
                        tokens=tokens,
                        tokens_per_s=tps,
                        elapsed_s=elapsed,
                        eta_s=eta,
                    )
                )
                if eval_pairs and c.eval_every and step % c.eval_every == 0 and step < total:
                    eval_result = self._evaluate(eval_pairs, step, total, metrics)
                stop = self.should_stop()
                if stop or (c.save_every and step % c.save_every == 0 and step < total):
                    last_ckpt = self._save(root, step, tokens, elapsed, losses)
                if stop:
                    interrupted = True
                    break
        except KeyboardInterrupt:
            # Only without the command's signal handler (library use): the step in flight is
            # dropped, the state of the last completed step is saved.
            if step == 0:
                raise
            self.optimizer.zero_grad(set_to_none=True)
            elapsed = elapsed0 + time.perf_counter() - start
            last_ckpt = self._save(root, step, tokens, elapsed, losses)
            interrupted = True
        except TrainingError as e:
            if e.code == "non-finite-loss":
                e.hint = (
                    f"the last good checkpoint is {last_ckpt}; resume from it with a lower "
                    "--lr (or --max-grad-norm)"
                    if last_ckpt
                    else "no checkpoint was saved before it (see --save-every); try a lower --lr"
                )
            raise
        finally:
            if metrics is not None and (interrupted or step < total):
                metrics.close()
                metrics = None

        final = losses[-1] if losses else None
        if interrupted:
            return TrainResult(
                None,
                step,
                total,
                final,
                None,
                tokens,
                interrupted=True,
                checkpoint=last_ckpt,
                losses=losses,
            )
        try:
            if eval_pairs:
                eval_result = self._evaluate(eval_pairs, step, total, metrics)
        finally:
            if metrics is not None:
                metrics.close()
        adapter = self._adapter(step, tokens, losses, eval_result, plan, len(pairs), eval_pairs)
        adapter.save(c.output, force=c.force)
        self.emit(
            TrainEvent(
                "done",
                step=step,
                total_steps=total,
                loss=final,
                tokens=tokens,
                eval_loss=eval_result[0] if eval_result else None,
                path=str(c.output),
            )
        )
        return TrainResult(
            Path(c.output),
            step,
            total,
            final,
            eval_result[0] if eval_result else None,
            tokens,
            adapter=adapter,
            losses=losses,
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _chunks(self, texts: Sequence[str]) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
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
        with self._autocast():
            return self.encoder.embed(batch).float()

    def _step(self, rows: list[R.Pair], step: int) -> tuple[float, int, float]:
        """One optimizer step on ``rows``: (loss, non-padding tokens, gradient norm before clipping)."""
        queries = [r.query for r in rows]
        candidates = [r.positive for r in rows] + [n for r in rows for n in r.negatives]
        texts = queries + candidates
        mask = duplicates(rows, candidates).to(self.device)
        chunks = self._chunks(texts)
        n_tokens = sum(int(batch["attention_mask"].sum()) for _, batch in chunks)
        where = torch.tensor([i for idx, _ in chunks for i in idx], device=self.device)

        def loss_of(embeddings: torch.Tensor) -> torch.Tensor:
            # Rows back in text order: queries first, then candidates.
            ordered = torch.empty_like(embeddings).index_copy(0, where, embeddings)
            return info_nce(
                ordered[: len(queries)],
                ordered[len(queries) :],
                temperature=self.temperature,
                config=self.encoder.config,
                duplicate=mask,
            )

        if self.config.grad_accum == 1:
            loss = loss_of(torch.cat([self._forward(batch) for _, batch in chunks]))
            loss.backward()
        else:
            loss = self._cached_backward(chunks, loss_of)
        value = float(loss.detach())
        if not math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(
                f"the loss became {value} at step {step + 1}; stopping", code="non-finite-loss"
            )
        clip = self.config.max_grad_norm or float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(
                f"the gradient became {norm} at step {step + 1}; stopping", code="non-finite-loss"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value, n_tokens, norm

    def _cached_backward(
        self,
        chunks: list[tuple[list[int], dict[str, torch.Tensor]]],
        loss_of: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The step's loss, back-propagated one micro-batch at a time (GradCache)."""
        states, reps = [], []
        with torch.no_grad():
            for _, batch in chunks:
                states.append(_rng_state(self.device))  # dropout must draw the same twice
                reps.append(self._forward(batch))
        after = _rng_state(self.device)
        cached = torch.cat(reps).requires_grad_()
        loss = loss_of(cached)
        loss.backward()
        assert cached.grad is not None
        grads = cached.grad.split([len(idx) for idx, _ in chunks])
        for (_, batch), state, grad in zip(chunks, states, grads, strict=True):
            _set_rng(state, self.device)
            # d loss/d params = Σ (d loss/d embedding) · (d embedding/d params): a surrogate.
            torch.sum(self._forward(batch) * grad).backward()
        _set_rng(after, self.device)
        return loss.detach()

    # -- evaluation ----------------------------------------------------------------------------

    def _evaluate(
        self, pairs: list[R.Pair], step: int, total: int, metrics: IO[str] | None
    ) -> tuple[float, R.RetrievalMetrics]:
        """Full-corpus InfoNCE loss and retrieval metrics on held-out pairs (fp32, no dropout)."""
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
            metrics.write(json.dumps(doc) + "\n")
            metrics.flush()
        self.emit(TrainEvent("eval", step=step, total_steps=total, eval_loss=loss))
        self.emit(
            TrainEvent(
                "info",
                step=step,
                message=f"step {step}: eval recall@1 {result.recall[1]:.4f}, "
                f"recall@10 {result.recall[10]:.4f}, MRR {result.mrr:.4f} "
                f"({result.queries} queries, {result.corpus} passages)",
            )
        )
        return loss, result

    # -- checkpoints ---------------------------------------------------------------------------

    def _save(
        self, root: Path, step: int, tokens: int, elapsed: float, losses: list[float]
    ) -> Path:
        opt: dict[str, torch.Tensor] = {}
        for name, p in zip(self.names, self.params, strict=True):
            st = self.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    opt[f"{name}.{key}"] = st[key].detach().cpu()
            if "step" in st:
                opt[f"{name}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
        rng = {"rank0.cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["rank0.cuda"] = torch.cuda.get_rng_state(self.device)
        path = S.save(
            root,
            step=step,
            adapter=lora.extract_adapter(
                self.encoder.model, hub_id=lora.hub_id_for(self.config.model)
            ),
            optimizer=opt,
            rng=rng,
            keep=self.config.keep_checkpoints,
            state={**self.meta, "tokens": tokens, "elapsed_s": elapsed, "losses": losses},
        )
        self.emit(TrainEvent("checkpoint", step=step, path=str(path)))
        return path

    def _find_resume(self, root: Path) -> S.Saved | None:
        c = self.config
        if not c.resume:
            return None
        if c.resume == "latest":
            path = S.latest(root)
            if path is None:
                raise TrainingError(
                    f"no checkpoint to resume in '{root}'",
                    code="no-checkpoint",
                    hint="run without --resume, or pass a checkpoint directory",
                )
        else:
            path = Path(c.resume)
            if path.is_dir() and not (path / "state.json").exists():
                found = S.latest(path)  # the folder holding step-N directories
                if found is not None:
                    path = found
        return S.load(path)

    def _restore(
        self, saved: S.Saved, data_sha: str, plan: PairPlan
    ) -> tuple[int, int, float, list[float]]:
        st, where = saved.state, str(saved.path)
        if st.get("task") != TASK:
            raise TrainingError(
                "the checkpoint is from a causal-LM run, not --task embedding",
                code="resume-mismatch",
                where=where,
            )
        if st.get("data_sha256") != data_sha:
            raise TrainingError(
                "the data file differs from the one this checkpoint trained on",
                code="resume-mismatch",
                where=where,
            )
        if st.get("num_rows") != plan.n or st.get("global_rows") != plan.global_rows:
            raise TrainingError(
                f"the batches differ from the checkpoint's ({st.get('global_rows')} pairs a step "
                f"over {st.get('num_rows')}; now {plan.global_rows} over {plan.n})",
                code="resume-mismatch",
                where=where,
                hint="resume with the same --batch-size × --grad-accum and --eval-split",
            )
        old, now = st.get("hyperparameters", {}), self.hyperparameters()
        bad = [k for k in FIXED_ON_RESUME if old.get(k) != now.get(k)]
        if bad:
            raise TrainingError(
                f"the checkpoint was trained with other {', '.join(bad)}",
                code="resume-mismatch",
                where=where,
            )
        changed = [k for k in now if k not in FIXED_ON_RESUME and old.get(k) != now.get(k)]
        if changed:
            self.emit(TrainEvent("warning", message=f"resuming with changed {', '.join(changed)}"))
        with torch.no_grad():
            for name, p in zip(self.names, self.params, strict=True):
                if name not in saved.factors:
                    raise TrainingError(
                        f"the checkpoint has no '{name}'", code="resume-mismatch", where=where
                    )
                p.copy_(saved.factors[name].to(p.device, p.dtype))
        for name, p in zip(self.names, self.params, strict=True):
            if f"{name}.exp_avg" in saved.optimizer:
                self.optimizer.state[p] = {
                    "step": saved.optimizer[f"{name}.step"].reshape(()).clone(),
                    "exp_avg": saved.optimizer[f"{name}.exp_avg"].to(p.device),
                    "exp_avg_sq": saved.optimizer[f"{name}.exp_avg_sq"].to(p.device),
                }
        if "rank0.cpu" in saved.rng:
            torch.set_rng_state(saved.rng["rank0.cpu"])
        if self.device.type == "cuda" and "rank0.cuda" in saved.rng:
            torch.cuda.set_rng_state(saved.rng["rank0.cuda"], self.device)
        return (
            int(st["step"]),
            int(st.get("tokens", 0)),
            float(st.get("elapsed_s", 0.0)),
            [float(x) for x in st.get("losses", [])],
        )

    # -- the adapter ---------------------------------------------------------------------------

    def _adapter(
        self,
        step: int,
        tokens: int,
        losses: list[float],
        eval_result: tuple[float, R.RetrievalMetrics] | None,
        plan: PairPlan,
        n_pairs: int,
        eval_pairs: list[R.Pair],
    ) -> Adapter:
        import transformers

        from .. import __version__

        c = self.config
        hub_id = lora.hub_id_for(c.model)
        training: dict[str, Any] = {
            "task": TASK,
            "base_model": hub_id or Path(c.model).name,
            "data": {
                "file": Path(c.data).name,
                "sha256": D.file_sha256(c.data),
                "pairs": n_pairs,
            },
            "hyperparameters": self.hyperparameters(),
            "sentence_config": self.encoder.config.to_json(),
            "steps": step,
            "epochs": round(step / plan.steps_per_epoch, 4),
            "final_loss": losses[-1] if losses else None,
            "tokens": tokens,
            "precision": _precision(self.dtype),
            "processes": 1,
            "versions": {
                "loratool": __version__,
                "torch": torch.__version__.split("+")[0],
                "transformers": transformers.__version__,
            },
        }
        if eval_result is not None:
            loss, result = eval_result
            training["eval"] = {
                "loss": loss,
                **result.to_json(),
                "file": Path(c.eval_data).name if c.eval_data else None,
                "sha256": D.file_sha256(c.eval_data) if c.eval_data else None,
                "pairs": len(eval_pairs),
            }
        revision = getattr(self.encoder.model.config, "_commit_hash", None) if hub_id else None
        return lora.extract_adapter(
            self.encoder.model, hub_id=hub_id, revision=revision, provenance={"training": training}
        )


def _precision(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "f32"


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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError(
            "--task embedding runs in one process",
            code="unsupported",
            hint="run it without torchrun; use --grad-accum for a bigger contrastive batch",
        )
    return _EmbeddingTrainer(config, temperature, on_event, should_stop).run()
