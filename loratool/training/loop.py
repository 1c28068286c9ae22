"""The training loop: load the base, inject LoRA, run optimizer steps, checkpoint, resume, DDP.

One optimizer step sees ``batch_size × grad_accum × world_size`` rows. The loss is the mean
next-token CE over every target token of the step, across micro-batches and processes: each
micro-batch adds ``CE sum / global target count`` to the gradients, so any split of the same rows
over processes and micro-batches gives the same step (transformers' Trainer does the same since
4.46). Under ``torchrun`` every process reads and packs all the data and takes its share of each
step's rows; the LoRA gradients (a few MB) are summed with one all-reduce per step, which is all
DDP would do here, without its hooks on a model that is 99% frozen. Only rank 0 writes or reports.

Library code: progress goes to ``on_event``; Ctrl-C is seen through ``should_stop`` (the command
installs the signal handler), which ends the run with a resumable checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from .. import lora
from .._io import check_output
from ..adapter import Adapter
from ..errors import TrainingError, UsageError
from . import data as D
from . import runtime as R
from . import state as S
from .attention import packed_segments, use_packed_attention
from .config import TrainConfig
from .loss import HeadLoss
from .plan import Plan, lr_factor
from .runtime import Dist, resolve_device, resolve_dtype

# Shared with the embedding trainer (training/embedding.py), which imports them from here.
__all__ = [
    "Dist",
    "OnEvent",
    "TrainEvent",
    "TrainResult",
    "lr_factor",
    "resolve_device",
    "resolve_dtype",
    "train",
]


@dataclass
class TrainEvent:
    """A report from the loop; ``kind`` is start, step, eval, checkpoint, info, warning or done."""

    kind: str
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    tokens: int = 0
    tokens_per_s: float | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None
    eval_loss: float | None = None
    message: str = ""
    path: str | None = None


@dataclass
class TrainResult:
    """How the run ended; ``adapter`` is what was written to ``output`` (None if interrupted)."""

    output: Path | None
    steps: int
    total_steps: int
    final_loss: float | None
    eval_loss: float | None
    tokens: int
    interrupted: bool = False
    checkpoint: Path | None = None
    adapter: Adapter | None = None
    losses: list[float] = field(default_factory=list)
    model: Any = None  # the trained model, LoRA layers in place (e.g. to generate right away)


OnEvent = Callable[[TrainEvent], None]


# -- the run -------------------------------------------------------------------------------------


class _Trainer:
    """One run: ``run()`` prepares, loops over steps, and finishes (or checkpoints and stops)."""

    def __init__(
        self, config: TrainConfig, on_event: OnEvent | None, should_stop: Callable[[], bool] | None
    ) -> None:
        self.config = config
        self._on_event = on_event
        self.should_stop = should_stop or (lambda: False)
        self.dist = R.init_dist(config.device)
        self.step = self.tokens = self.targets = 0
        self.elapsed0 = 0.0
        self.losses: list[float] = []
        self.eval_loss: float | None = None

    def emit(self, event: TrainEvent) -> None:
        if self.dist.main and self._on_event is not None:
            self._on_event(event)

    def warn(self, message: str) -> None:
        self.emit(TrainEvent("warning", message=message))

    def run(self) -> TrainResult:
        saved = self._check_outputs()
        self._prepare()
        if saved is not None:
            self._resume(saved)
        elif self.dist.world > 1:
            import torch.distributed as dist

            for p in self.params.values():  # the same seed gave the same init; make it certain
                dist.broadcast(p.data, src=0)
        metrics = None
        if self.config.metrics and self.dist.main:
            mode = "a" if saved is not None else "w"
            metrics = open(self.config.metrics, mode, encoding="utf-8")  # noqa: SIM115
        try:
            interrupted = self._loop(metrics)
            if not interrupted and self.eval_plan is not None:
                self.eval_loss = self._evaluate(metrics)
        finally:
            if metrics is not None:
                metrics.close()
        return self._finish(interrupted)

    # -- set-up ----------------------------------------------------------------------------------

    def _check_outputs(self) -> S.Saved | None:
        """Refuse to clobber before any expensive work; find the checkpoint to resume, if any."""
        c = self.config
        check_output(c.output, force=c.force)
        self.root = c.checkpoint_root()
        saved = self._find_resume()
        if saved is None and S.list_checkpoints(self.root):
            if not c.force:
                raise UsageError(
                    f"checkpoints of an earlier run are in '{self.root}'",
                    code="output-exists",
                    hint="pass --resume to continue that run, or --force to start over",
                )
            if self.dist.main:
                S.remove_all(self.root)
        if c.metrics and saved is None:
            check_output(c.metrics, force=c.force)
        self.last_ckpt = S.latest(self.root)
        return saved

    def _find_resume(self) -> S.Saved | None:
        c = self.config
        if not c.resume:
            return None
        if c.resume == "latest":
            path = S.latest(self.root)
            if path is None:
                raise TrainingError(
                    f"no checkpoint to resume in '{self.root}'",
                    code="no-checkpoint",
                    hint="run without --resume, or pass a checkpoint directory",
                )
        else:
            path = Path(c.resume)
            if path.is_dir() and not (path / "state.json").exists():
                path = S.latest(path) or path  # the folder that holds step-N directories
        return S.load(path)

    def _prepare(self) -> None:
        c = self.config
        self.device = R.resolve_device(c.device, self.dist)
        self.dtype = R.resolve_dtype(c.dtype, self.device)
        # Data first: a bad line fails in a second, before the model loads.
        records = D.read_jsonl(c.data)
        eval_records: list[D.Record] = []
        if c.eval_data:
            eval_records = D.read_jsonl(c.eval_data)
        elif c.eval_split:
            records, eval_records = D.holdout(records, c.eval_split, c.seed)
        self.n_records, self.n_eval = len(records), len(eval_records)
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
        torch.manual_seed(c.seed)  # the LoRA init: the same on every process
        report = lora.inject(
            model,
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
            _enable_checkpointing(model)
        model.train()
        body, head = R.body_and_head(model)
        vocab = int(model.config.vocab_size)
        self.packed_attention = c.packing and use_packed_attention(model)
        if c.packing and not R.check_packing_isolation(body, vocab, self.device):
            self.warn(
                f"{type(model).__name__} does not keep packed documents apart by position ids; "
                "training without packing"
            )
            c.packing = False
        self.model, self.body = model, body
        self.head_loss = HeadLoss(head, model.config, self.dtype)
        self.params = lora.lora_parameters(model)
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()),
            lr=c.lr,
            weight_decay=c.weight_decay,
            betas=(0.9, 0.999),
            eps=1e-8,
        )
        self.plan = Plan(tok.docs, c, self.dist)
        self.eval_plan = Plan(evals.docs, c, self.dist) if evals else None
        self.total = c.max_steps or max(1, math.ceil(c.epochs * self.plan.steps_per_epoch))
        self.warmup = int(c.warmup) if c.warmup >= 1 else math.ceil(c.warmup * self.total)
        self.meta: dict[str, Any] = {
            "data_sha256": D.file_sha256(c.data),
            "eval_sha256": D.file_sha256(c.eval_data) if c.eval_data else None,
            "num_rows": len(self.plan.rows),
            "global_rows": self.plan.global_rows,
            "world_size": self.dist.world,
            "hyperparameters": c.hyperparameters(),
            "dtype": R.dtype_name(self.dtype),
        }

    def _resume(self, saved: S.Saved) -> None:
        changed = S.check_resumable(saved, self.meta)
        if changed:
            self.warn(f"resuming with changed {', '.join(changed)}")
        S.restore(saved, self.optimizer, self.params)
        st = saved.state
        key = f"rank{self.dist.rank}"
        if f"{key}.cpu" in saved.rng and st.get("world_size") == self.dist.world:
            torch.set_rng_state(saved.rng[f"{key}.cpu"])
            if self.device.type == "cuda" and f"{key}.cuda" in saved.rng:
                torch.cuda.set_rng_state(saved.rng[f"{key}.cuda"], self.device)
        else:
            self.warn("another number of processes than the checkpoint's: dropout draws differ")
        self.step = int(st["step"])
        self.tokens = int(st.get("tokens", 0))
        self.targets = int(st.get("target_tokens", 0))
        self.elapsed0 = float(st.get("elapsed_s", 0.0))
        self.losses = [float(x) for x in st.get("losses", [])]
        self.emit(TrainEvent("info", message=f"resumed from {saved.path} at step {self.step}"))

    # -- the loop --------------------------------------------------------------------------------

    def _loop(self, metrics: IO[str] | None) -> bool:
        """Run steps until the total; True if stopped early (with a checkpoint saved)."""
        c, plan, total = self.config, self.plan, self.total
        packed = f" (packed, {plan.fill:.0%} full)" if plan.packed else ""
        procs = f" × {self.dist.world} processes" if self.dist.world > 1 else ""
        self.emit(
            TrainEvent(
                "start",
                step=self.step,
                total_steps=total,
                message=(
                    f"{len(plan.docs)} documents in {len(plan.rows)} rows of ≤{c.seq_len} tokens"
                    f"{packed}, {plan.steps_per_epoch} steps per epoch, {total} steps, "
                    f"{R.dtype_name(self.dtype)} on {self.device}{procs}"
                ),
            )
        )
        start = time.perf_counter()
        first_step, first_tokens = self.step, self.tokens
        try:
            while self.step < total:
                lr = c.lr * lr_factor(
                    self.step, schedule=c.schedule, warmup=self.warmup, total=total
                )
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss, n_tokens, n_targets, norm = self._step(plan.batches(self.step))
                self.step += 1
                self.tokens += n_tokens
                self.targets += n_targets
                self.losses.append(loss)
                run_s = time.perf_counter() - start
                tps = (self.tokens - first_tokens) / run_s if run_s > 0 else None
                event = TrainEvent(
                    "step",
                    step=self.step,
                    total_steps=total,
                    loss=loss,
                    lr=lr,
                    grad_norm=norm,
                    tokens=self.tokens,
                    tokens_per_s=tps,
                    elapsed_s=self.elapsed0 + run_s,
                    eta_s=run_s / (self.step - first_step) * (total - self.step),
                )
                if metrics is not None:
                    _write(
                        metrics,
                        {
                            "step": self.step,
                            "loss": loss,
                            "lr": lr,
                            "grad_norm": norm,
                            "tokens": self.tokens,
                            "target_tokens": self.targets,
                            "epoch": round(self.step / plan.steps_per_epoch, 4),
                            "elapsed_s": round(event.elapsed_s, 3),
                            "tokens_per_s": None if tps is None else round(tps, 1),
                        },
                    )
                self.emit(event)
                periodic = c.eval_every and self.step % c.eval_every == 0
                if self.eval_plan and periodic and self.step < total:  # the last one is after
                    self.eval_loss = self._evaluate(metrics)
                stop = self._agree(self.should_stop())
                if stop or (c.save_every and (self.step % c.save_every == 0 or self.step == total)):
                    self._save(self.elapsed0 + time.perf_counter() - start)
                if stop:
                    return True
        except KeyboardInterrupt:
            # Only without the command's signal handler (library use, one process): the step in
            # flight is dropped and the state after the last completed step is saved.
            if self.dist.world > 1 or self.step == first_step:
                raise
            self.optimizer.zero_grad(set_to_none=True)
            self._save(self.elapsed0 + time.perf_counter() - start)
            return True
        except TrainingError as e:
            if e.code == "non-finite-loss":
                e.hint = (
                    f"the last good checkpoint is {self.last_ckpt}; resume from it with a lower "
                    "--lr (or --max-grad-norm)"
                    if self.last_ckpt
                    else "no checkpoint was saved before it (see --save-every); try a lower --lr"
                )
            raise
        self.elapsed0 += time.perf_counter() - start
        return False

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

    def _step(self, batches: list[D.Batch]) -> tuple[float, int, int, float]:
        """One optimizer step; returns (mean loss, tokens, target tokens, gradient norm)."""
        counts = self._reduce(
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
        params = list(self.params.values())
        if self.dist.world > 1:  # sum the LoRA gradients of all processes in one all-reduce
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = self._reduce(torch.cat([g.reshape(-1) for g in grads]))
            at = 0
            for p in params:
                p.grad = flat[at : at + p.numel()].view_as(p)
                at += p.numel()
        loss_mean = float(self._reduce(loss_sum)) / n_targets
        clip = self.config.max_grad_norm or float("inf")  # 0: report the norm, do not clip
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        for what, value in (("loss", loss_mean), ("gradient norm", norm)):
            if not math.isfinite(value):
                self.optimizer.zero_grad(set_to_none=True)
                raise TrainingError(
                    f"the {what} became {value} at step {self.step + 1}; stopping",
                    code="non-finite-loss",
                )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_mean, n_tokens, n_targets, norm

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.dist.world == 1:
            return t
        moved = t.to(self.device) if self.device.type == "cuda" else t
        self.dist.sum_(moved)
        return moved.to(t.device)

    def _agree(self, flag: bool) -> bool:
        """Whether any process wants to stop (every process stops at the same step)."""
        if self.dist.world == 1:
            return flag
        return bool(self._reduce(torch.tensor([1.0 if flag else 0.0]))[0] > 0)

    @torch.no_grad()
    def _evaluate(self, metrics: IO[str] | None) -> float:
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
            sums = self._reduce(sums)
        finally:
            self.model.train()
        value = float(sums[0] / sums[1]) if sums[1] else float("nan")
        if metrics is not None:
            _write(metrics, {"step": self.step, "eval_loss": value})
        self.emit(TrainEvent("eval", step=self.step, total_steps=self.total, eval_loss=value))
        return value

    # -- checkpoints and the result --------------------------------------------------------------

    def _rng(self) -> dict[str, torch.Tensor]:
        """Every process's RNG states, gathered (a collective: all processes call it)."""
        states = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.dist.world == 1:
            return {f"rank0.{k}": v for k, v in states.items()}
        import torch.distributed as dist

        out: dict[str, torch.Tensor] = {}
        for k, v in states.items():
            local = v.to(self.device) if self.device.type == "cuda" else v
            parts = [torch.empty_like(local) for _ in range(self.dist.world)]
            dist.all_gather(parts, local)
            out.update({f"rank{r}.{k}": part.cpu() for r, part in enumerate(parts)})
        return out

    def _save(self, elapsed: float) -> None:
        rng = self._rng()
        if self.dist.main:
            adapter = lora.extract_adapter(self.model, hub_id=lora.hub_id_for(self.config.model))
            state = {
                **self.meta,
                "tokens": self.tokens,
                "target_tokens": self.targets,
                "elapsed_s": elapsed,
                "losses": self.losses,
                # Both follow from the step alone; recorded for people reading the checkpoint.
                "data_position": dict(
                    zip(
                        ("epoch", "step_in_epoch"),
                        divmod(self.step, self.plan.steps_per_epoch),
                        strict=True,
                    )
                ),
                "schedule": {
                    "name": self.config.schedule,
                    "warmup_steps": self.warmup,
                    "total_steps": self.total,
                    "next_lr": self.config.lr
                    * lr_factor(
                        self.step,
                        schedule=self.config.schedule,
                        warmup=self.warmup,
                        total=self.total,
                    ),
                },
            }
            path = S.save(
                self.root,
                step=self.step,
                adapter=adapter,
                rng=rng,
                state=state,
                optimizer=S.optimizer_tensors(self.optimizer, self.params),
                keep=self.config.keep_checkpoints,
            )
            self.emit(TrainEvent("checkpoint", step=self.step, path=str(path)))
        self.last_ckpt = S.step_dir(self.root, self.step)
        self.dist.barrier()

    def _finish(self, interrupted: bool) -> TrainResult:
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
        result.output = Path(self.config.output)
        if self.dist.main:
            result.adapter.save(result.output, force=self.config.force)
            self.emit(
                TrainEvent(
                    "done",
                    step=self.step,
                    total_steps=self.total,
                    loss=final,
                    tokens=self.tokens,
                    eval_loss=self.eval_loss,
                    path=str(result.output),
                )
            )
        self.dist.barrier()
        return result

    def _adapter(self) -> Adapter:
        """The trained factors with the base binding and provenance["training"]."""
        import transformers

        from .. import __version__

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
            "versions": {
                "loratool": __version__,
                "torch": torch.__version__.split("+")[0],
                "transformers": transformers.__version__,
            },
        }
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


def _write(f: IO[str], row: dict[str, Any]) -> None:
    f.write(json.dumps(row) + "\n")
    f.flush()


def _enable_checkpointing(model: Any) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UsageError(
            f"{type(model).__name__} does not support gradient checkpointing", code="bad-value"
        )
    # Non-reentrant: works with frozen inputs, no enable_input_require_grads hack needed.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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
    try:
        return trainer.run()
    finally:
        if trainer.dist.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
