"""``loratool eval-retrieval``: recall@k and MRR of a sentence encoder, before and after an adapter."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

from ..console import emit_json, stderr_console, warn

if TYPE_CHECKING:
    from ..retrieval import RetrievalReport

ROWS = (
    ("recall@1", "recall@1"),
    ("recall@5", "recall@5"),
    ("recall@10", "recall@10"),
    ("MRR", "mrr"),
    ("MRR@10", "mrr@10"),
)


@click.command("eval-retrieval")
@click.option("--model", required=True, help="Sentence encoder: a local directory or a Hub id.")
@click.option(
    "--adapter",
    help="Adapter to evaluate on top of the model (loratool, PEFT or any format convert reads).",
)
@click.option(
    "--data",
    required=True,
    type=click.Path(dir_okay=False),
    help='jsonl of {"query", "positive"}; the corpus is every distinct positive.',
)
@click.option("--batch-size", type=int, default=64, show_default=True, help="Texts per forward.")
@click.option("--revision", help="Hub revision of --model.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--skip-base", is_flag=True, help="With --adapter: do not evaluate the base alone.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def command(
    model: str,
    adapter: str | None,
    data: str,
    batch_size: int,
    revision: str | None,
    device: str,
    skip_base: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Recall@1/5/10 and MRR of --model on --data, with and without --adapter.

    Each query's relevant passage is its own positive; the corpus holds every distinct
    positive of the file. Scores use the encoder's sentence-transformers pooling, normalisation
    and similarity. The table goes to stderr; --json prints one document on stdout.

    \b
    loratool eval-retrieval --model sentence-transformers/all-MiniLM-L6-v2 --data test.jsonl
    loratool eval-retrieval --model ./minilm --adapter docs.safetensors --data test.jsonl --json
    """
    from ..errors import UsageError
    from ..retrieval import evaluate_retrieval

    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}", code="bad-value")
    if skip_base and adapter is None:
        raise UsageError("--skip-base needs --adapter", code="bad-value")
    with _bar(quiet=quiet or as_json) as progress:
        report = evaluate_retrieval(
            model,
            data,
            adapter=adapter,
            include_base=not skip_base,
            batch_size=batch_size,
            device=None if device == "auto" else device,
            revision=revision,
            progress=progress,
        )
    for message in report.warnings:
        warn(message)
    if as_json:
        emit_json(report.to_json())
    else:
        _render(report)


@contextmanager
def _bar(*, quiet: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A transient rich bar per phase on a TTY; nothing elsewhere (the run is short)."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    tasks: dict[str, Any] = {}
    with Progress(
        TextColumn("encoding {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=stderr_console(),
        transient=True,
    ) as bar:

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        yield update


def _render(report: RetrievalReport) -> None:
    from rich.table import Table

    doc = report.to_json()
    console = stderr_console()
    cfg = report.config
    console.print(
        f"[bold]{report.model}[/bold] on {report.data}: {doc['queries']} queries, "
        f"{doc['corpus']} passages; {'+'.join(cfg.pooling)} pooling"
        f"{', normalised' if cfg.normalize else ''}, {cfg.similarity}, "
        f"≤{cfg.max_seq_length or '?'} tokens ({cfg.source})"
    )
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("metric")
    columns: list[tuple[str, dict[str, Any]]] = []
    if report.base is not None:
        columns.append(("base", doc["base"]))
    if report.adapted is not None:
        columns.append(("+ adapter", doc["adapter"]))
    for title, _ in columns:
        table.add_column(title, justify="right")
    if "delta" in doc:
        table.add_column("Δ", justify="right")
    for label, key in ROWS:
        cells = [f"{values[key]:.4f}" for _, values in columns]
        if "delta" in doc:
            d = doc["delta"][key]
            cells.append(f"[{'green' if d > 0 else 'red' if d < 0 else 'default'}]{d:+.4f}[/]")
        table.add_row(label, *cells)
    console.print(table)
    if report.adapter:
        console.print(f"adapter: {report.adapter} ({report.adapter_format})", markup=False)
