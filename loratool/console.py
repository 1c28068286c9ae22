"""Everything that prints for people: error lines, tables, progress. Only the CLI imports this.

People's output goes to stderr, data (``--json``) to stdout. Progress is one wrapper chosen in one
place: a rich bar on a TTY, periodic plain lines elsewhere, nothing under ``--json``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .errors import LoratoolError

if TYPE_CHECKING:
    from rich.console import Console

T = TypeVar("T")


def print_error(e: LoratoolError) -> None:
    """``error[code]: where: message`` and ``hint: ...`` on stderr, one line each."""
    click.secho(f"error[{e.code}]: {printable(str(e))}", fg="red", err=True)
    if e.hint:
        click.echo(f"hint: {printable(e.hint)}", err=True)


def printable(text: str) -> str:
    """``text`` with control characters escaped: a hostile tensor or module name in a message
    cannot break the one-line error format or send terminal escape codes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def warn(message: str) -> None:
    click.secho(f"warning: {message}", fg="yellow", err=True)


def info(message: str) -> None:
    click.echo(message, err=True)


def stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def stdout_console() -> Console:
    from rich.console import Console

    # Off a terminal rich assumes 80 columns and would fold the table; data lines stay whole.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def emit_json(doc: Any) -> None:
    """The one JSON document a ``--json`` command prints, on stdout."""
    import json

    click.echo(json.dumps(doc, indent=2, sort_keys=False, allow_nan=False))


def progress(
    items: Iterable[T], *, total: int | None, label: str, quiet: bool = False
) -> Iterator[T]:
    """Iterate ``items`` with a rich bar on a TTY, a plain line every ~10 s otherwise."""
    if quiet:
        yield from items
        return
    if sys.stderr.isatty():
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=stderr_console(),
            transient=True,
        ) as bar:
            task = bar.add_task(label, total=total)
            for item in items:
                yield item
                bar.advance(task)
        return
    last = time.monotonic()
    for i, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= 10.0:
            last = now
            info(f"{label}: {i}/{total if total is not None else '?'}")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
