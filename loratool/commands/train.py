"""``loratool train``: flags and config file in, an adapter out, with progress on stderr."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from ..console import info, print_error, stderr_console, warn
from ..errors import EXIT_INTERRUPTED, LoratoolError

if TYPE_CHECKING:
    from ..training import TrainEvent


def _warmup(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise click.BadParameter("a number of steps, or a fraction of all steps below 1") from None
    return x


@click.command("train")
@click.option("--model", help="Base model: a local Hugging Face directory or a Hub id.")
@click.option("--data", help="Training data, jsonl: {text}, {prompt, completion} or {messages}.")
@click.option("-o", "--output", help="Adapter file to write (loratool format).")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="YAML or TOML file whose keys are these flags' names; flags override it.",
)
@click.option(
    "--task",
    type=click.Choice(["causal-lm", "embedding"]),
    default="causal-lm",
    show_default=True,
    help="causal-lm: next-token loss on {text}, {prompt, completion} or {messages}; embedding: "
    "contrastive loss for a sentence encoder on {query, positive[, negative]} pairs.",
)
@click.option(
    "--temperature",
    type=float,
    help="--task embedding: InfoNCE temperature [0.05, sentence-transformers' scale 20].",
)
@click.option("--revision", help="Hub revision of --model (branch, tag or commit).")
@click.option(
    "--targets",
    help="Modules to adapt: comma-separated name suffixes, or all-linear [all-linear; "
    "--task embedding: query,key,value,dense].",
)
@click.option("--rank", type=int, help="LoRA rank r [16].")
@click.option("--alpha", type=float, help="LoRA alpha; scale = alpha/r [2 × rank].")
@click.option("--dropout", type=float, help="Dropout on the LoRA input [0].")
@click.option("--rslora", is_flag=True, default=None, help="Scale by alpha/√r (rsLoRA).")
@click.option(
    "--dora",
    is_flag=True,
    default=None,
    help="DoRA: train a magnitude per output row too (PEFT use_dora; Linear/Conv1D targets).",
)
@click.option(
    "--lora-bias",
    is_flag=True,
    default=None,
    help="A trained bias on each LoRA B (PEFT lora_bias; not with --dora).",
)
@click.option(
    "--bias",
    type=click.Choice(["none", "lora_only", "all"]),
    help="Biases that train too (PEFT bias): the adapted modules' (lora_only), or every "
    "one (all); stored as differences from the base's [none].",
)
@click.option(
    "--modules-to-save",
    help="Modules trained whole and saved in the adapter (PEFT modules_to_save): "
    "comma-separated name suffixes, e.g. lm_head or score.",
)
@click.option(
    "--trainable-tokens",
    help="Token ids whose input-embedding rows train (PEFT trainable_token_indices), "
    "comma-separated; a tied output head follows.",
)
@click.option(
    "--lr", type=float, help="Peak learning rate of AdamW [2e-4; --task embedding: 1e-3]."
)
@click.option("--weight-decay", type=float, help="AdamW weight decay [0].")
@click.option("--max-grad-norm", type=float, help="Gradient clipping norm, 0 for none [1.0].")
@click.option("--epochs", type=float, help="Passes over the data [1; --task embedding: 2].")
@click.option("--max-steps", type=int, help="Optimizer steps; overrides --epochs.")
@click.option(
    "--batch-size",
    type=int,
    help="Rows per micro-batch per process [4; --task embedding: 32 pairs].",
)
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step [1].")
@click.option(
    "--seq-len",
    type=int,
    help="Tokens per row; longer records are cut [1024; --task embedding: 256].",
)
@click.option(
    "--packing/--no-packing",
    default=None,
    help="Pack documents into rows of --seq-len; each attends only to itself [packing].",
)
@click.option(
    "--warmup",
    type=str,
    help="Warm-up: steps if ≥ 1, else a fraction of all steps [0; --task embedding: 0.1].",
)
@click.option(
    "--schedule",
    type=click.Choice(["cosine", "linear", "constant"]),
    help="Learning-rate schedule after warm-up [cosine].",
)
@click.option("--eval-data", help="Held-out jsonl to report an evaluation loss on.")
@click.option("--eval-split", type=float, help="Fraction of --data to hold out for evaluation.")
@click.option("--eval-every", type=int, help="Steps between evaluations; 0: at the end [0].")
@click.option(
    "--grad-checkpointing",
    is_flag=True,
    default=None,
    help="Recompute activations in backward: less memory, ~30% slower.",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "f32", "bf16"]),
    help="bf16: frozen weights in bf16, compute under autocast, LoRA and AdamW in fp32; "
    "auto: bf16 where the device does it natively (CUDA, AVX512-BF16/AMX CPUs) [auto].",
)
@click.option(
    "--quantize",
    type=click.Choice(["nf4", "int8"]),
    help="QLoRA: keep the frozen linear weights 4-bit NF4 (double-quantised, ~0.26x bf16) or int8, "
    "dequantised per layer into --dtype; LoRA and AdamW stay fp32.",
)
@click.option(
    "--fsdp",
    is_flag=True,
    default=None,
    help="Under torchrun: shard the frozen base across the processes (FSDP2), one layer gathered "
    "at a time; works with --quantize.",
)
@click.option("--device", help="cpu, cuda, cuda:N, mps or auto [auto].")
@click.option("--seed", type=int, help="Seed of the LoRA init, data order and dropout [0].")
@click.option("--save-every", type=int, help="Checkpoint every N steps; 0: only on Ctrl-C [500].")
@click.option(
    "--checkpoint-dir", help="Where checkpoints go [<output stem>-checkpoints beside the output]."
)
@click.option("--keep-checkpoints", type=int, help="How many recent checkpoints to keep [2].")
@click.option(
    "--resume",
    is_flag=False,
    flag_value="latest",
    default=None,
    help="Continue from a checkpoint directory; alone: the latest in --checkpoint-dir.",
)
@click.option("--metrics", help="Write JSON lines (step, loss, lr, tokens, elapsed_s) here.")
@click.option("--force", is_flag=True, default=None, help="Replace existing outputs.")
@click.option("-q", "--quiet", is_flag=True, help="No progress, only errors.")
@click.pass_context
def command(
    ctx: click.Context,
    config_file: str | None,
    quiet: bool,
    task: str,
    temperature: float | None,
    **flags: Any,
) -> None:
    """Train a LoRA adapter (causal LM, or sentence encoder with --task embedding) in loratool format.

    \b
    loratool train --model HuggingFaceTB/SmolLM2-135M-Instruct --data facts.jsonl -o facts.safetensors
    torchrun --nproc-per-node 2 -m loratool train --config run.yaml

    Exit codes: 2 bad flags or config, 6 bad data or a non-finite loss, 130 interrupted (a
    checkpoint was saved; run again with --resume).
    """
    from ..training import build_config, read_config_file, train

    given = {
        k: v
        for k, v in flags.items()
        if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE
    }
    if "warmup" in given:
        given["warmup"] = _warmup(given["warmup"])
    file_values = read_config_file(config_file) if config_file else {}
    if temperature is not None and task != "embedding":
        raise click.UsageError("--temperature goes with --task embedding")
    from ..training.embedding import EMBEDDING_DEFAULTS, train_embedding

    defaults = EMBEDDING_DEFAULTS if task == "embedding" else {}
    config = build_config({**defaults, **file_values}, given)
    if task == "embedding" and (config.quantize or config.fsdp):
        raise click.UsageError("--quantize and --fsdp go with --task causal-lm")

    import os

    main = int(os.environ.get("RANK", "0")) == 0
    reporter = _Reporter(quiet=quiet or not main)
    try:
        with _stop_on_signals() as should_stop, reporter:
            if task == "embedding":
                result = train_embedding(
                    config, temperature=temperature, on_event=reporter, should_stop=should_stop
                )
            else:
                result = train(config, on_event=reporter, should_stop=should_stop)
    except LoratoolError as e:
        if not main:  # rank 0 says it; the others only exit with the code
            ctx.exit(e.exit_code)
        if e.code == "bad-data" and hasattr(e, "problems"):
            for line, why in e.problems:
                info(f"  line {line}: {why}")
        print_error(e)
        ctx.exit(e.exit_code)
    if result.interrupted:
        if main:
            info(
                f"interrupted after step {result.steps}/{result.total_steps}; "
                f"checkpoint saved to {result.checkpoint}"
            )
            info("continue with the same command and --resume")
        ctx.exit(EXIT_INTERRUPTED)


@contextmanager
def _stop_on_signals() -> Iterator[Callable[[], bool]]:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second SIGINT aborts."""
    requested: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested.append(signum)
        if sys.stderr.isatty():
            sys.stderr.write("\nstopping after this step (Ctrl-C again to abort)...\n")

    try:
        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: no handler, the loop handles KeyboardInterrupt
        yield lambda: False
        return
    try:
        yield lambda: bool(requested)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _fmt_time(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "?"
    s = int(seconds)
    return (
        f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


class _Reporter:
    """Turns TrainEvents into a rich bar (TTY) or a plain line every ~10 s (elsewhere)."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.bar: Any = None
        self.task: Any = None
        self.last_line = 0.0

    def __enter__(self) -> _Reporter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __call__(self, e: TrainEvent) -> None:
        if self.quiet:
            return
        if e.kind in ("info", "warning"):
            (warn if e.kind == "warning" else info)(e.message)
        elif e.kind == "start":
            info(e.message)
            if self.tty:
                self._start_bar(e)
        elif e.kind == "step":
            self._step(e)
        elif e.kind == "eval":
            self._line(f"step {e.step}: eval loss {e.eval_loss:.4f}")
        elif e.kind == "checkpoint":
            self._line(f"step {e.step}: checkpoint {e.path}")
        elif e.kind == "done":
            self.__exit__()
            loss = f"{e.loss:.4f}" if e.loss is not None else "?"
            ev = f", eval loss {e.eval_loss:.4f}" if e.eval_loss is not None else ""
            info(f"done: {e.step} steps, {e.tokens:,} tokens, loss {loss}{ev} -> {e.path}")

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text, markup=False, highlight=False)
        else:
            info(text)

    def _start_bar(self, e: TrainEvent) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.bar = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            console=stderr_console(),
            transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task(
            "train", total=e.total_steps, completed=e.step, loss="-", tps="-", eta="?"
        )

    def _step(self, e: TrainEvent) -> None:
        loss = f"{e.loss:.4f}" if e.loss is not None else "?"
        tps = f"{e.tokens_per_s:,.0f}" if e.tokens_per_s else "?"
        if self.bar is not None:
            self.bar.update(self.task, completed=e.step, loss=loss, tps=tps, eta=_fmt_time(e.eta_s))
            return
        now = time.monotonic()
        if now - self.last_line >= 10.0 or e.step == e.total_steps or e.step == 1:
            self.last_line = now
            info(
                f"step {e.step}/{e.total_steps}  loss {loss}  lr {e.lr:.3g}  {tps} tok/s  "
                f"elapsed {_fmt_time(e.elapsed_s)}  ETA {_fmt_time(e.eta_s)}"
            )
