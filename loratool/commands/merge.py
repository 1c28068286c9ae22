"""``loratool merge``: adapters into a base checkpoint, streamed, with a fidelity report."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

import click

from ..console import emit_json, human_bytes, info, stderr_console, warn

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from ..merging import MergeReport, ProgressEvent


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


def render(report: MergeReport) -> None:
    """The human summary on stderr: what went where, how much of ΔW survived, what unmerge gets."""
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
    for t in sorted(report.lossy, key=lambda t: -(t.error or 0.0))[:5]:
        info(f"    {t.key}: retained {t.retained:.3f}, error {t.error:.1%}")
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


# Shared with unmerge.
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
@click.option("--force", is_flag=True, help="Replace OUT; accept a differing base fingerprint.")
@click.option("--json", "as_json_flag", is_flag=True, help="Print the report as one JSON document.")
def command(
    base: str,
    adapters: tuple[str, ...],
    out: str,
    weights: tuple[float, ...],
    dtype: str,
    device: str,
    reversible: bool,
    force: bool,
    as_json_flag: bool,
) -> None:
    """Merge ADAPTERS into the checkpoint BASE and write it to OUT.

    BASE is a Hugging Face checkpoint directory (sharded or not) or one .safetensors file; each
    ADAPTER is anything `convert` reads. OUT keeps BASE's shards, index, dtypes and other files.
    Weights are streamed one tensor at a time: memory does not grow with the model.
    """
    from ..merging import merge

    with ShardProgress("merge", quiet=as_json_flag) as bar:
        report = merge(
            base,
            list(adapters),
            out,
            weights=list(weights) or None,
            dtype=dtype,
            device=device,
            reversible=reversible,
            force=force,
            progress=bar,
        )
    if as_json_flag:
        emit_json(as_json(report))
    else:
        render(report)
