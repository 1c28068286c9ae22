"""The ``loratool`` command line: a thin click layer over the library, with one error boundary.

Commands live one per module in ``loratool/commands`` and are imported only when run, so
``loratool inspect`` never pays for torch or transformers. User mistakes (``LoratoolError`` and
click's usage errors) print one line and a hint on stderr and exit with a documented code.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from .console import print_error
from .errors import EXIT_INTERRUPTED, LoratoolError

# name -> (module in loratool.commands, one-line help). Order is the order of `loratool --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("inspect", "Summarise an adapter: base binding, targets, sizes, integrity."),
    "verify": ("verify", "Check an adapter against every rule of the spec and its integrity hash."),
    "convert": ("convert", "Convert between loratool, PEFT, kohya and GGUF adapters."),
    "merge": ("merge", "Merge adapters into a base checkpoint, streaming tensor by tensor."),
    "unmerge": ("unmerge", "Take merged adapters back out of a checkpoint."),
    "reduce-rank": ("reduce_rank", "Shrink an adapter's rank exactly (QR core, no dense SVD)."),
    "combine": ("combine", "Exact weighted sum of adapters, optionally at a lower rank."),
    "extract": ("extract", "Extract a LoRA from the difference of two checkpoints."),
    "train": ("train", "Train a LoRA adapter on a jsonl data set."),
    "eval-retrieval": (
        "eval_retrieval",
        "Recall@k and MRR of a sentence encoder, with or without an adapter.",
    ),
    "mine-negatives": (
        "mine_negatives",
        "Add hard negatives to retrieval pairs, ranked by an encoder (the base by default).",
    ),
    "push": ("push", "Upload an adapter to the Hugging Face Hub with a model card and PEFT files."),
    "pull": ("pull", "Download and verify an adapter from the Hugging Face Hub."),
    "generate": ("generate", "Generate text from a base model with adapters on it."),
    "serve": ("serve", "Serve a base and its adapters over an OpenAI-compatible HTTP API."),
}


def _available(name: str) -> bool:
    module = COMMANDS[name][0]
    return importlib.util.find_spec(f"loratool.commands.{module}") is not None


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if _available(name)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS or not _available(cmd_name):
            return None
        module = importlib.import_module(f"loratool.commands.{COMMANDS[cmd_name][0]}")
        command: click.Command = module.command
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LoratoolError as e:
            print_error(e)
            ctx.exit(e.exit_code)
        except OSError as e:
            # A full disk outside the atomic helpers (the Hugging Face cache during pull, say):
            # one line and exit 7. Any other OSError is a bug and keeps its traceback.
            from ._io import disk_full_errno, disk_full_error

            code = disk_full_errno(e)
            if code is None:
                raise
            err = disk_full_error(code, Path(e.filename or "."))
            print_error(err)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            print_error(
                LoratoolError("interrupted", code="interrupted", hint="run the command again")
            )
            ctx.exit(EXIT_INTERRUPTED)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="loratool")
def cli() -> None:
    """loratool: train, store, inspect, merge, reduce and share LoRA adapters.

    Exit codes: 0 ok, 2 usage, 3 invalid file, 4 adapter does not fit the base,
    5 Hub or network, 6 training failed, 7 disk full, 130 interrupted.
    """


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; the process ends with it."""
    # numpy's OpenBLAS starts a thread per core that spins a while on import; loratool does no
    # numpy linear algebra (torch has its own BLAS), so one thread saves 0.1 s of CPU a command.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    with _one_shot_collector():
        cli.main(args=argv, prog_name="loratool")


@contextlib.contextmanager
def _one_shot_collector() -> Iterator[None]:
    """The cyclic garbage collector tuned for a process that runs one command and ends.

    Importing torch makes about a million objects and none is garbage, yet at the default
    threshold (700 allocations) the collector walks them hundreds of times: 0.15 s of CPU per
    command. A first-generation threshold of 50,000 still collects cycles throughout a long
    training run or server. At exit the interpreter walks every object once more (0.3 s with
    torch loaded); freezing them first skips that walk, and the OS takes the memory back.
    """
    threshold = gc.get_threshold()
    gc.set_threshold(50_000, *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.freeze()
