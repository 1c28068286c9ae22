"""``loratool merge``: adapters into a base checkpoint, streamed, with a fidelity report."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import click

from ..console import emit_json, human_bytes, info, stderr_console, warn

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from ..merging import MergeReport, ProgressEvent, TargetReport


class ShardProgress:
    """The library's progress callback as a bar per shard on a TTY, a line every ~10 s elsewhere."""

    def __init__(self, label: str, *, quiet: bool) -> None:
        self.label = label
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self._bar: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._last = time.monotonic()

    def __enter__(self) -> ShardProgress:
        if self.tty and not self.quiet:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TimeRemainingColumn(),
                console=stderr_console(),
                transient=True,
            )
            self._bar.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(kind, exc, tb)

    def __call__(self, event: ProgressEvent) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            task = self._tasks.get(event.shard)
            if task is None:
                desc = f"{self.label} {event.shard} ({event.shard_index + 1}/{event.shards})"
                task = self._tasks[event.shard] = self._bar.add_task(desc, total=event.total)
            self._bar.update(task, completed=event.done)
            return
        now = time.monotonic()
        if now - self._last >= 10.0:
            self._last = now
            info(
                f"{self.label}: shard {event.shard_index + 1}/{event.shards} "
                f"{human_bytes(event.done)}/{human_bytes(event.total)}"
            )


WORST_ROWS = 5  # lossy weights listed, worst first, unless --all lists every weight


def _row(t: TargetReport, *, detail: bool = False) -> str:
    """One weight's line: how much of its ΔW the output holds; ``detail`` adds, for unmerge, what
    came back from the sidecar and whether the SHA-256 matches."""
    if t.retained is None or t.error is None:
        line = f"    {t.key}: ΔW is zero"
    else:
        line = f"    {t.key}: retained {t.retained:.3f}, error {t.error:.1%}"
    if detail and t.corrections:
        line += f", {t.corrections:,} elements from the sidecar"
    if detail and t.verified is not None:
        line += ", SHA-256 matches" if t.verified else ", SHA-256 DIFFERS"
    return line


def render(report: MergeReport, *, all_rows: bool = False) -> None:
    """The human summary on stderr: what went where, how much of ΔW survived, what unmerge gets.

    The lossy weights are listed worst first, at most ``WORST_ROWS``; ``all_rows`` lists every
    weight instead, in natural order (``layers.2`` before ``layers.10``).
    """
    from ..naturalsort import natural_key

    s = report.summary()
    verb = "merged" if report.operation == "merge" else "unmerged"
    names = ", ".join(f"{a['name']} ×{a['weight']:g}" for a in report.adapters)
    info(
        f"{verb} {names} {'into' if verb == 'merged' else 'from'} {s['targets']} weights: "
        f"{report.base} → {report.out}"
    )
    layout = f"{len(report.shards)} shard{'s' if len(report.shards) != 1 else ''}"
    info(
        f"  {layout}, {human_bytes(report.out_bytes)}, dtype {report.dtype}, "
        f"device {report.device}, {report.seconds:.1f} s"
    )
    if s["retained"] is not None:
        info(
            f"  ΔW retained {s['retained']:.4f} overall (per weight {s['min_retained']:.4f}–"
            f"{s['max_retained']:.4f}), relative error {s['error']:.2%}; {s['lossy']} of "
            f"{s['targets']} weights lose more than {s['loss_threshold']:.0%}"
        )
    if all_rows:
        for t in sorted(report.targets, key=lambda t: natural_key(t.key)):
            info(_row(t, detail=True))
    else:
        worst = sorted(report.lossy, key=lambda t: (-(t.error or 0.0), natural_key(t.key)))
        for t in worst[:WORST_ROWS]:
            info(_row(t))
        if len(worst) > WORST_ROWS:
            info(f"    … {len(worst) - WORST_ROWS} more lossy weights; --all to see every row")
    if report.operation == "merge":
        if s["roundtrip_off"]:
            info(
                f"  unmerge without a sidecar: {s['roundtrip_off']:,} elements "
                f"({s['roundtrip_fraction']:.2%}) come back up to {s['roundtrip_max_ulp']} ULP off"
            )
        else:
            info("  unmerge restores every element exactly, even without a sidecar")
        if report.sidecar_name:
            ratio = report.sidecar_bytes / report.base_bytes if report.base_bytes else 0.0
            info(
                f"  reversible sidecar {report.sidecar_name}: {human_bytes(report.sidecar_bytes)} "
                f"({ratio:.2%} of the base)"
            )
    elif report.exact == "verified":
        info(
            f"  bit-exact: {s['targets']} of {s['targets']} weights match the original's SHA-256 "
            f"({s['corrections']:,} elements restored from the sidecar)"
        )
    if report.skipped_files:
        stale = ", ".join(report.skipped_files)
        warn(f"not copied (weights in other formats would be stale): {stale}")
    for message in report.warnings:
        warn(message)


def as_json(report: MergeReport) -> dict[str, Any]:
    return report.to_json()


def run(
    label: str,
    operation: Callable[[ShardProgress], MergeReport],
    *,
    as_json_flag: bool,
    all_rows: bool,
) -> None:
    """Run a merge or unmerge with its progress display, then print its report (JSON: every row)."""
    with ShardProgress(label, quiet=as_json_flag) as bar:
        report = operation(bar)
    if as_json_flag:
        emit_json(as_json(report))
    else:
        render(report, all_rows=all_rows)


# Shared with unmerge.
json_option = click.option(
    "--json", "as_json_flag", is_flag=True, help="Print the report as one JSON document."
)
all_option = click.option(
    "--all",
    "all_rows",
    is_flag=True,
    help=f"List every weight's fidelity, in natural order (default: the {WORST_ROWS} worst lossy "
    "weights; --json always has every weight).",
)
output_option = click.option(
    "-o",
    "--output",
    "--out",
    "out",
    required=True,
    type=click.Path(),
    help="Output checkpoint (new path).",
)
device_option = click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where ΔW is computed; auto = cuda when available.",
)


@click.command("merge")
@click.argument("base", type=click.Path())
@click.argument("adapters", nargs=-1, required=True)
@output_option
@click.option(
    "--weight",
    "weights",
    multiple=True,
    type=float,
    help="Weight of each adapter, once per ADAPTER in order (default 1.0 each).",
)
@click.option(
    "--dtype",
    type=click.Choice(["keep", "f32", "bf16", "f16"]),
    default="keep",
    show_default=True,
    help="Floating dtype of the output; keep = the base's.",
)
@device_option
@click.option(
    "--reversible",
    is_flag=True,
    help="Also write a sidecar of rounding corrections so unmerge restores the base bit for bit.",
)
@click.option(
    "--onto-quantized",
    is_flag=True,
    help="For an adapter trained with --quantize: merge onto dequantise(W4) of BASE (the weights "
    "it trained against) instead of the original weights; by default the report says how far "
    "the two differ.",
)
@click.option("--force", is_flag=True, help="Replace OUT; accept a differing base fingerprint.")
@json_option
@all_option
def command(
    base: str,
    adapters: tuple[str, ...],
    out: str,
    weights: tuple[float, ...],
    dtype: str,
    device: str,
    reversible: bool,
    onto_quantized: bool,
    force: bool,
    as_json_flag: bool,
    all_rows: bool,
) -> None:
    """Merge ADAPTERS into the checkpoint BASE and write it to OUT.

    BASE is a Hugging Face checkpoint directory (sharded or not) or one .safetensors file; each
    ADAPTER is anything `convert` reads. OUT keeps BASE's shards, index, dtypes and other files.
    Weights are streamed one tensor at a time: memory does not grow with the model.
    An adapter trained on a quantised base (train --quantize) is merged onto the original weights
    unless --onto-quantized; the report gives the quantisation's relative error per target.
    """
    from ..quant.merging import merge

    run(
        "merge",
        lambda bar: merge(
            base,
            list(adapters),
            out,
            weights=list(weights) or None,
            dtype=dtype,
            device=device,
            reversible=reversible,
            force=force,
            progress=bar,
            onto_quantized=onto_quantized,
        ),
        as_json_flag=as_json_flag,
        all_rows=all_rows,
    )
