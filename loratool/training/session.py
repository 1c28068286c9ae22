"""The run both trainers share: outputs and resume, the step loop, metrics lines, checkpoints.

``Session`` holds what every run has (settings, process group, optimizer, step and token
counts, losses) and does what every run does: refuse to clobber outputs, find the checkpoint to
resume, inject LoRA and build AdamW, set the learning rate of every step, write one metrics line
and one ``TrainEvent`` per step, evaluate every ``--eval-every`` steps, checkpoint every
``--save-every`` steps and on a stop request or Ctrl-C, and name the last good checkpoint when
the loss stops being finite. A trainer (``loop`` for causal LMs, ``embedding`` for sentence
encoders) says what one step, one evaluation and its checkpoint's extra state are.

Library code: progress goes to ``on_event``; Ctrl-C is seen through ``should_stop`` (the command
installs the signal handler), which ends the run with a resumable checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, ClassVar

import torch

from .. import lora
from .._io import check_output
from ..adapter import Adapter
from ..errors import TrainingError, UsageError
from . import state as S
from .config import TrainConfig
from .events import OnEvent, StepStats, TrainEvent, TrainResult, write_line
from .plan import lr_factor
from .runtime import Dist, enable_checkpointing


class Session:
    """One run's shared state and loop; a trainer fills in the hooks at the end of the class."""

    # Whether the last step is checkpointed too (with --save-every): the causal-LM trainer always
    # did, the embedding trainer never did (it writes the adapter); each keeps what it did.
    save_last: ClassVar[bool] = True
    resume_rules: ClassVar[S.ResumeRules] = S.CAUSAL_LM

    def __init__(
        self,
        config: TrainConfig,
        on_event: OnEvent | None,
        should_stop: Callable[[], bool] | None,
        dist: Dist,
    ) -> None:
        self.config = config
        self.on_event = on_event
        self.should_stop = should_stop or (lambda: False)
        self.dist = dist
        self.step = self.tokens = self.targets = 0
        self.elapsed0 = 0.0
        self.losses: list[float] = []
        self.eval_loss: float | None = None
        self.steps_per_epoch = self.total = self.warmup = 1
        self.meta: dict[str, Any] = {}
        self.model: Any = None
        self.params: dict[str, torch.nn.Parameter] = {}
        self.device = torch.device("cpu")

    def emit(self, event: TrainEvent) -> None:
        if self.dist.main and self.on_event is not None:
            self.on_event(event)

    def warn(self, message: str) -> None:
        self.emit(TrainEvent("warning", message=message))

    # -- the hooks a trainer fills in ------------------------------------------------------------

    def prepare(self) -> None:
        """Read the data, load the model, call ``setup_lora``, set ``total``, ``meta``..."""
        raise NotImplementedError

    def start_message(self) -> str:
        raise NotImplementedError

    def train_step(self) -> StepStats:
        """One optimizer step at ``self.step`` (not yet counted)."""
        raise NotImplementedError

    @property
    def has_eval(self) -> bool:
        raise NotImplementedError

    def evaluate(self, metrics: IO[str] | None) -> float:
        """The evaluation loss (also reported); called on every process."""
        raise NotImplementedError

    def checkpoint_extra(self) -> dict[str, Any]:
        """What this trainer's checkpoints hold beyond meta, tokens, elapsed time and losses."""
        return {}

    def finish(self, interrupted: bool) -> TrainResult:
        raise NotImplementedError

    # -- set-up ----------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        saved = self.check_outputs()
        self.prepare()
        if saved is not None:
            self.resume(saved)
        elif self.dist.world > 1:
            import torch.distributed as dist

            for p in self.params.values():  # the same seed gave the same init; make it certain
                dist.broadcast(p.data, src=0)
        self.emit(
            TrainEvent(
                "start", step=self.step, total_steps=self.total, message=self.start_message()
            )
        )
        metrics = None
        if self.config.metrics and self.dist.main:
            mode = "a" if saved is not None else "w"
            metrics = open(self.config.metrics, mode, encoding="utf-8")  # noqa: SIM115
        try:
            interrupted = self.run_steps(metrics)
            if not interrupted and self.has_eval:
                self.eval_loss = self.evaluate(metrics)
        finally:
            if metrics is not None:
                metrics.close()
        return self.finish(interrupted)

    def check_outputs(self) -> S.Saved | None:
        """Refuse to clobber before any expensive work; find the checkpoint to resume, if any."""
        c = self.config
        check_output(c.output, force=c.force)
        self.root = c.checkpoint_root()
        saved = S.find_resume(c.resume, self.root)
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

    def setup_lora(self, model: Any) -> None:
        """Seeded LoRA injection (the same init on every process), then AdamW on the factors."""
        c = self.config
        torch.manual_seed(c.seed)
        report = lora.inject(
            model,
            targets=c.targets,
            rank=c.rank,
            alpha=c.lora_alpha,
            dropout=c.dropout,
            rslora=c.rslora,
            **c.inject_options(),
        )
        self.emit(
            TrainEvent("info", message=f"LoRA on {len(report.modules)} modules: {report.summary()}")
        )
        if c.grad_checkpointing:
            enable_checkpointing(model)
        model.train()
        self.model = model
        self.params = lora.lora_parameters(model)
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()),
            lr=c.lr,
            weight_decay=c.weight_decay,
            betas=(0.9, 0.999),
            eps=1e-8,
        )

    def set_length(self, steps_per_epoch: int) -> None:
        c = self.config
        self.steps_per_epoch = steps_per_epoch
        self.total = c.max_steps or max(1, math.ceil(c.epochs * steps_per_epoch))
        self.warmup = int(c.warmup) if c.warmup >= 1 else math.ceil(c.warmup * self.total)

    def resume(self, saved: S.Saved) -> None:
        changed = S.check_resumable(saved, self.meta, self.resume_rules)
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

    def deliver(self, adapter: Adapter) -> Path:
        """Write the trained adapter to ``--output`` (rank 0) and report the run done."""
        out = Path(self.config.output)
        if self.dist.main:
            adapter.save(out, force=self.config.force)
            self.emit(
                TrainEvent(
                    "done",
                    step=self.step,
                    total_steps=self.total,
                    loss=self.losses[-1] if self.losses else None,
                    tokens=self.tokens,
                    eval_loss=self.eval_loss,
                    path=str(out),
                )
            )
        # Every process leaves together: one tearing its process group down while rank 0 still
        # writes could abort it at exit (gloo's threads, seen as SIGABRT on rank 1).
        self.dist.barrier()
        return out

    # -- the loop --------------------------------------------------------------------------------

    def run_steps(self, metrics: IO[str] | None) -> bool:
        """Run steps until the total; True if stopped early (with a checkpoint saved)."""
        c, total = self.config, self.total
        start = time.perf_counter()
        first_step, first_tokens = self.step, self.tokens
        try:
            while self.step < total:
                lr = c.lr * lr_factor(
                    self.step, schedule=c.schedule, warmup=self.warmup, total=total
                )
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                stats = self.train_step()
                self.step += 1
                self.tokens += stats.tokens
                self.targets += stats.targets or 0
                self.losses.append(stats.loss)
                run_s = time.perf_counter() - start
                tps = (self.tokens - first_tokens) / run_s if run_s > 0 else None
                event = TrainEvent(
                    "step",
                    step=self.step,
                    total_steps=total,
                    loss=stats.loss,
                    lr=lr,
                    grad_norm=stats.grad_norm,
                    tokens=self.tokens,
                    tokens_per_s=tps,
                    elapsed_s=self.elapsed0 + run_s,
                    eta_s=run_s / (self.step - first_step) * (total - self.step),
                )
                if metrics is not None:
                    row: dict[str, Any] = {
                        "step": self.step,
                        "loss": stats.loss,
                        "lr": lr,
                        "grad_norm": stats.grad_norm,
                        "tokens": self.tokens,
                    }
                    if stats.targets is not None:
                        row["target_tokens"] = self.targets
                    row["epoch"] = round(self.step / self.steps_per_epoch, 4)
                    row["elapsed_s"] = round(event.elapsed_s, 3)
                    row["tokens_per_s"] = None if tps is None else round(tps, 1)
                    write_line(metrics, row)
                self.emit(event)
                periodic = c.eval_every and self.step % c.eval_every == 0
                if self.has_eval and periodic and self.step < total:  # the last one is after
                    self.eval_loss = self.evaluate(metrics)
                stop = self.agree(self.should_stop())
                due = self.save_last if self.step == total else self.step % (c.save_every or 1) == 0
                if stop or (c.save_every and due):
                    self.save(self.elapsed0 + time.perf_counter() - start)
                if stop:
                    return True
        except KeyboardInterrupt:
            # Only without the command's signal handler (library use, one process): the step in
            # flight is dropped and the state after the last completed step is saved.
            if self.dist.world > 1 or self.step == first_step:
                raise
            self.optimizer.zero_grad(set_to_none=True)
            self.save(self.elapsed0 + time.perf_counter() - start)
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

    def clip_and_step(self, loss: float) -> float:
        """Clip the gradients, refuse a non-finite loss or norm, step AdamW; the norm before."""
        clip = self.config.max_grad_norm or float("inf")  # 0: report the norm, do not clip
        norm = float(torch.nn.utils.clip_grad_norm_(list(self.params.values()), clip))
        for what, value in (("loss", loss), ("gradient norm", norm)):
            if not math.isfinite(value):
                self.optimizer.zero_grad(set_to_none=True)
                raise TrainingError(
                    f"the {what} became {value} at step {self.step + 1}; stopping",
                    code="non-finite-loss",
                )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the processes (itself with one)."""
        if self.dist.world == 1:
            return t
        moved = t.to(self.device) if self.device.type == "cuda" else t
        self.dist.sum_(moved)
        return moved.to(t.device)

    def agree(self, flag: bool) -> bool:
        """Whether any process wants to stop (every process stops at the same step)."""
        if self.dist.world == 1:
            return flag
        return bool(self.reduce(torch.tensor([1.0 if flag else 0.0]))[0] > 0)

    # -- checkpoints -----------------------------------------------------------------------------

    def rng_states(self) -> dict[str, torch.Tensor]:
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

    def save(self, elapsed: float) -> None:
        rng = self.rng_states()
        if self.dist.main:
            adapter = lora.extract_adapter(self.model, hub_id=lora.hub_id_for(self.config.model))
            state = {
                **self.meta,
                "tokens": self.tokens,
                "elapsed_s": elapsed,
                "losses": self.losses,
                **self.checkpoint_extra(),
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
