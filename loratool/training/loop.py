"""The causal-LM trainer: next-token loss over packed jsonl documents, on one process or many.

One optimizer step sees ``batch_size × grad_accum × world_size`` rows. The loss is the mean
next-token CE over every target token of the step, across micro-batches and processes: each
micro-batch adds ``CE sum / global target count`` to the gradients, so any split of the same rows
over processes and micro-batches gives the same step (transformers' Trainer does the same since
4.46). Under ``torchrun`` every process reads and packs all the data and takes its share of each
step's rows; the LoRA gradients (a few MB) are summed with one all-reduce per step, which is all
DDP would do here, without its hooks on a model that is 99% frozen. Only rank 0 writes or reports.

The loop itself, checkpoints and resume are ``session``'s, shared with the embedding trainer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from .. import lora
from ..adapter import Adapter
from ..errors import TrainingError, UsageError
from . import data as D
from . import runtime as R
from .attention import packed_segments, use_packed_attention
from .config import TrainConfig
from .events import OnEvent, StepStats, TrainEvent, TrainResult, write_line
from .loss import HeadLoss
from .plan import Plan, lr_factor
from .recompute import lean
from .session import Session

__all__ = ["TrainEvent", "TrainResult", "train"]


class _Trainer(Session):
    """One causal-LM run: ``run()`` prepares, loops over steps, and finishes (or checkpoints)."""

    def __init__(
        self, config: TrainConfig, on_event: OnEvent | None, should_stop: Callable[[], bool] | None
    ) -> None:
        super().__init__(config, on_event, should_stop, R.init_dist(config.device))

    def prepare(self) -> None:
        c = self.config
        self.device = R.resolve_device(c.device, self.dist)
        self.dtype = R.resolve_dtype(c.dtype, self.device)
        if c.fsdp and self.dist.world < 2:
            raise UsageError(
                "--fsdp shards the base across processes, and this run has one",
                code="bad-value",
                hint="torchrun --nproc-per-node N -m loratool train ... --fsdp",
            )
        # Data first: a bad line fails in a second, before the model loads.
        records = D.read_jsonl(c.data)
        eval_records: list[D.Record] = []
        if c.eval_data:
            eval_records = D.read_jsonl(c.eval_data)
        elif c.eval_split:
            records, eval_records = D.holdout(records, c.eval_split, c.seed)
        self.n_records, self.n_eval = len(records), len(eval_records)
        self.quantization = None
        if c.quantize:
            from . import qlora

            model, tokenizer, self.quantization = qlora.load(c, self.dtype)
        else:
            model, tokenizer = R.load_model(c, self.dtype)
        tok = D.tokenize(records, tokenizer, seq_len=c.seq_len, path=c.data)
        evals = (
            D.tokenize(eval_records, tokenizer, seq_len=c.seq_len, path=c.eval_data or c.data)
            if eval_records
            else None
        )
        if tok.truncated:
            shown = D.line_ranges(tok.truncated[:50]) + (", ..." if len(tok.truncated) > 50 else "")
            self.warn(
                f"{len(tok.truncated)} records longer than --seq-len {c.seq_len} were cut to it "
                f"(lines {shown})"
            )

        model.to(self.device)
        self.setup_lora(model)
        # RMSNorm and SwiGLU keep only their inputs for backward (recompute.py): ~25% less memory.
        lean(model)
        body, head = R.body_and_head(model)
        if c.fsdp:
            from .sharding import shard

            done = shard(model, body, head, self.device)
            self.emit(
                TrainEvent(
                    "info",
                    message=f"FSDP: {done['units']} units over {self.dist.world} processes; this "
                    f"one holds {done['local_bytes']:,} of the base's {done['base_bytes']:,} bytes "
                    f"(the output head's {done['head_bytes']:,} whole)",
                )
            )
        vocab = int(model.config.vocab_size)
        self.packed_attention = c.packing and use_packed_attention(model)
        if c.packing and not R.check_packing_isolation(body, vocab, self.device):
            self.warn(
                f"{type(model).__name__} does not keep packed documents apart by position ids; "
                "training without packing"
            )
            c.packing = False
        self.body = body
        self.head_loss = HeadLoss(head, model.config, self.dtype)
        self.plan = Plan(tok.docs, c, self.dist)
        self.eval_plan = Plan(evals.docs, c, self.dist) if evals else None
        self.set_length(self.plan.steps_per_epoch)
        self.meta = {
            "data_sha256": D.file_sha256(c.data),
            "eval_sha256": D.file_sha256(c.eval_data) if c.eval_data else None,
            "num_rows": len(self.plan.rows),
            "global_rows": self.plan.global_rows,
            "world_size": self.dist.world,
            "hyperparameters": c.hyperparameters(),
            "dtype": R.dtype_name(self.dtype),
        }

    def start_message(self) -> str:
        c, plan = self.config, self.plan
        packed = f" (packed, {plan.fill:.0%} full)" if plan.packed else ""
        procs = f" × {self.dist.world} processes" if self.dist.world > 1 else ""
        return (
            f"{len(plan.docs)} documents in {len(plan.rows)} rows of ≤{c.seq_len} tokens"
            f"{packed}, {plan.steps_per_epoch} steps per epoch, {self.total} steps, "
            f"{R.dtype_name(self.dtype)} on {self.device}{procs}"
        )

    # -- one step --------------------------------------------------------------------------------

    def _loss_sum(self, batch: D.Batch, *, backward_scale: float | None = None) -> torch.Tensor:
        """Summed CE of one micro-batch (fp32); only positions with a target reach the head.

        With ``backward_scale``, also back-propagates ``loss × backward_scale``: inside the same
        packed-attention context, which activation checkpointing's recomputation needs too.
        """
        b = batch.to(self.device)
        with packed_segments(b.segments if self.packed_attention else None):
            with R.autocast(self.device, self.dtype):
                hidden = self.body(
                    input_ids=b.input_ids,
                    position_ids=b.position_ids,
                    attention_mask=b.attention_mask,
                    use_cache=False,
                )[0]
                flat = b.targets.reshape(-1)
                keep = (flat != D.IGNORE).nonzero().squeeze(1)
                h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
                loss = self.head_loss(h, flat.index_select(0, keep))
            if backward_scale is not None:
                (loss * backward_scale).backward()
        return loss

    def train_step(self) -> StepStats:
        """One optimizer step on this process's micro-batches of the step's rows."""
        batches = self.plan.batches(self.step)
        counts = self.reduce(
            torch.tensor(
                [sum(b.num_targets for b in batches), sum(b.tokens for b in batches)],
                dtype=torch.float64,
            )
        )
        n_targets, n_tokens = int(counts[0]), int(counts[1])
        if n_targets == 0:
            raise TrainingError(f"step {self.step + 1} has no target tokens", code="no-targets")
        loss_sum = torch.zeros((), dtype=torch.float64)
        for batch in batches:
            # The mean over the whole step's targets, on every process.
            loss = self._loss_sum(batch, backward_scale=1.0 / n_targets)
            loss_sum += loss.detach().double().cpu()
        for _ in range(self._fillers(len(batches))):  # --fsdp: weightless, to gather in step
            self._loss_sum(self._filler(self.plan), backward_scale=0.0)
        params = list(self.params.values())
        if self.dist.world > 1:  # sum the LoRA gradients of all processes in one all-reduce
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = self.reduce(torch.cat([g.reshape(-1) for g in grads]))
            at = 0
            for p in params:
                p.grad = flat[at : at + p.numel()].view_as(p)
                at += p.numel()
        loss_mean = float(self.reduce(loss_sum)) / n_targets
        norm = self.clip_and_step(loss_mean)
        return StepStats(loss_mean, n_tokens, norm, targets=n_targets)

    def _fillers(self, n: int) -> int:
        """--fsdp: forwards this process runs beyond its ``n`` so all run as many (FSDP gathers
        every layer in each one, and a gather needs every process)."""
        if not self.config.fsdp:
            return 0
        from .sharding import fillers

        return fillers(n)

    @staticmethod
    def _filler(plan: Plan) -> D.Batch:
        return D.make_batch(plan.docs, [plan.rows[0]], packed=plan.packed)

    @property
    def has_eval(self) -> bool:
        return self.eval_plan is not None

    @torch.no_grad()
    def evaluate(self, metrics: IO[str] | None) -> float:
        plan = self.eval_plan
        assert plan is not None
        self.model.eval()
        try:
            sums = torch.zeros(2, dtype=torch.float64)
            rows = list(range(len(plan.rows)))[self.dist.rank :: self.dist.world]
            for s in range(0, len(rows), self.config.batch_size):
                chunk = [plan.rows[r] for r in rows[s : s + self.config.batch_size]]
                batch = D.make_batch(plan.docs, chunk, packed=plan.packed)
                sums[0] += float(self._loss_sum(batch))
                sums[1] += batch.num_targets
            for _ in range(self._fillers(-(-len(rows) // self.config.batch_size))):
                self._loss_sum(self._filler(plan))
            sums = self.reduce(sums)
        finally:
            self.model.train()
        value = float(sums[0] / sums[1]) if sums[1] else float("nan")
        if metrics is not None:
            write_line(metrics, {"step": self.step, "eval_loss": value})
        self.emit(TrainEvent("eval", step=self.step, total_steps=self.total, eval_loss=value))
        return value

    # -- checkpoints and the result --------------------------------------------------------------

    def checkpoint_extra(self) -> dict[str, Any]:
        c = self.config
        return {
            "target_tokens": self.targets,
            # Both follow from the step alone; recorded for people reading the checkpoint.
            "data_position": dict(
                zip(
                    ("epoch", "step_in_epoch"), divmod(self.step, self.steps_per_epoch), strict=True
                )
            ),
            "schedule": {
                "name": c.schedule,
                "warmup_steps": self.warmup,
                "total_steps": self.total,
                "next_lr": c.lr
                * lr_factor(self.step, schedule=c.schedule, warmup=self.warmup, total=self.total),
            },
        }

    def finish(self, interrupted: bool) -> TrainResult:
        final = self.losses[-1] if self.losses else None
        result = TrainResult(
            None,
            self.step,
            self.total,
            final,
            self.eval_loss,
            self.tokens,
            interrupted=interrupted,
            checkpoint=self.last_ckpt,
            losses=self.losses,
            model=self.model,
        )
        if interrupted:
            self.dist.barrier()
            return result
        result.adapter = self._adapter()
        result.output = self.deliver(result.adapter)
        self.dist.barrier()
        return result

    def _adapter(self) -> Adapter:
        """The trained factors with the base binding and provenance["training"]."""
        c, plan = self.config, self.plan
        hub_id = lora.hub_id_for(c.model)  # never a local path
        training: dict[str, Any] = {
            "base_model": hub_id or Path(c.model).name,
            "data": {
                "file": Path(c.data).name,
                "sha256": self.meta["data_sha256"],
                "records": self.n_records,
                "documents": len(plan.docs),
                "rows": len(plan.rows),
            },
            "hyperparameters": c.hyperparameters(),
            "steps": self.step,
            "epochs": round(self.step / plan.steps_per_epoch, 4),
            "final_loss": self.losses[-1] if self.losses else None,
            "tokens": self.tokens,
            "target_tokens": self.targets,
            "precision": R.dtype_name(self.dtype),
            "processes": self.dist.world,
            "versions": R.library_versions(),
        }
        if self.quantization is not None:
            training["quantization"] = self.quantization.provenance()
        if c.fsdp:
            training["fsdp"] = True
        if self.eval_loss is not None and math.isfinite(self.eval_loss):
            training["eval"] = {
                "loss": self.eval_loss,
                "records": self.n_eval,
                "file": Path(c.eval_data).name if c.eval_data else None,
                "sha256": self.meta["eval_sha256"],
            }
        # The exact commit when the model came from the Hub cache; never for a local directory.
        local = Path(c.model).exists()
        revision = None if local or not hub_id else R.hub_commit(hub_id, c.revision)
        return lora.extract_adapter(
            self.model, hub_id=hub_id, revision=revision, provenance={"training": training}
        )


def train(
    config: TrainConfig,
    *,
    on_event: OnEvent | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train a LoRA adapter as ``config`` says and write it to ``config.output``.

    ``on_event`` receives progress (rank 0 only); ``should_stop`` is polled after every step and
    ends the run with a resumable checkpoint when it returns True (``TrainResult.interrupted``).
    Raises UsageError for bad settings, BadDataError for bad data (every bad line at once), and
    TrainingError when the loss stops being finite.
    """
    config.validate()
    config = dataclasses.replace(config)  # the run may adjust it (packing); the caller's stays
    trainer = _Trainer(config, on_event, should_stop)
    result = None
    try:
        result = trainer.run()
        return result
    finally:
        R.end_processes(trainer.dist, trainer, result)
