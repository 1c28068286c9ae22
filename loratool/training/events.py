"""What a run reports: progress events, the result, one step's numbers, metrics lines."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..adapter import Adapter


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
    model: Any = None  # the trained model, LoRA layers in place (e.g. to generate right away);
    # None after a multi-process run, whose sharded model holds the process group (end_processes)


OnEvent = Callable[[TrainEvent], None]


@dataclass
class StepStats:
    """What one optimizer step did."""

    loss: float
    tokens: int  # non-padding input tokens
    grad_norm: float  # before clipping
    targets: int | None = None  # tokens with a loss term, where the trainer counts them


def write_line(f: IO[str], row: dict[str, Any]) -> None:
    """One metrics line, flushed: a crash loses no step that was reported."""
    f.write(json.dumps(row) + "\n")
    f.flush()
