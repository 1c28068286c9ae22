"""What merge and unmerge share: the checks and set-up before any weight is read, the output around
the streamed shards, and the sizes and targets the report ends with.

Both operations check in one order, so the first mistake named is the same for either: the output
path (and whether the base is a state dict), the dtype, the device, the base, the adapters and how
they fit it; only then are the factors read once for their digests.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..adapter import Adapter
from ..checkpoint import Checkpoint
from ..errors import UsageError
from .compute import Context, Outcome, memory_loop
from .inputs import Input, MemoryCheckpoint, digest_inputs, open_inputs, resolve_device
from .output import check_paths, copy_other_files, output_dest, write_layout
from .plan import Job, check_reversible_dtypes, dtype_rule, module_names, plan_jobs
from .report import MergeReport, Progress

if TYPE_CHECKING:
    import torch


@dataclass
class Prepared:
    """A checked merge or unmerge: its base, adapters and plan; nothing written yet."""

    ckpt: Checkpoint  # a MemoryCheckpoint for a state dict
    where: str  # the base as messages name it
    out: Path | None  # None for a state dict
    device: str  # "cpu" or "cuda", resolved
    inputs: list[Input]
    jobs: dict[str, Job]
    force: bool

    @property
    def memory(self) -> bool:
        return isinstance(self.ckpt, MemoryCheckpoint)

    def context(
        self,
        *,
        precise: bool,
        progress: Progress | None,
        roundtrip: bool = False,
        collect: bool = False,
        hash_in: bool = False,
        hash_out: bool = False,
        corrections: Callable[[str], tuple[torch.Tensor, torch.Tensor] | None] | None = None,
    ) -> Context:
        """The compute context for this plan; the flags say what the operation measures."""
        return Context(
            self.device,
            precise,
            module_names(self.inputs),
            roundtrip=roundtrip,
            collect=collect,
            hash_in=hash_in,
            hash_out=hash_out,
            corrections=corrections or (lambda key: None),
            progress=progress,
            where=self.where,
        )


def prepare(
    operation: str,
    base: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    out: str | os.PathLike[str] | None,
    *,
    weights: Sequence[float] | None,
    dtype: str,
    device: str,
    reversible: bool,
    force: bool,
) -> Prepared:
    """Check a merge (``operation`` "merge": adds) or unmerge (subtracts) and plan every tensor.

    ``dtype`` is the output dtype rule (unmerge plans with "keep" first, then re-plans once the
    merge record says which dtypes to restore); ``reversible`` refuses narrowing casts.
    """
    if isinstance(base, Mapping):
        if out is not None:
            raise UsageError(f"a state-dict {operation} returns its result; out must be None")
    elif out is None:
        raise UsageError("no output path", hint="pass -o OUT")
    else:
        check_paths(Path(base), Path(out), force=force)
    rule = dtype_rule(dtype)
    dev = resolve_device(device)
    if isinstance(base, Mapping):
        ckpt: Checkpoint = MemoryCheckpoint(base)
        where, out_path = "<state dict>", None
    else:
        ckpt, where, out_path = Checkpoint(Path(base)), str(Path(base)), Path(out)  # type: ignore[arg-type]
    inputs = open_inputs(adapters, weights)
    sign = 1.0 if operation == "merge" else -1.0
    jobs = plan_jobs(ckpt, inputs, sign=sign, out_dtype=rule, force=force)
    if reversible:
        check_reversible_dtypes(jobs)
    digest_inputs(inputs)
    return Prepared(ckpt, where, out_path, dev, inputs, jobs, force)


def in_memory(
    prepared: Prepared, jobs: dict[str, Job], ctx: Context, outcome: Outcome
) -> dict[str, torch.Tensor]:
    """Every planned tensor of a state dict, computed without autograd."""
    import torch

    assert isinstance(prepared.ckpt, MemoryCheckpoint)
    with torch.inference_mode():
        return memory_loop(prepared.ckpt, jobs, ctx, outcome)


@contextlib.contextmanager
def written(
    prepared: Prepared, jobs: Mapping[str, Job], report: MergeReport, *, skip: set[str]
) -> Iterator[Path]:
    """The atomic destination the shards are streamed into, without autograd; once they are in,
    a sharded base's index.json and its other files (but ``skip``) go beside them."""
    import torch

    assert prepared.out is not None
    ckpt = prepared.ckpt
    with (
        torch.inference_mode(),
        output_dest(prepared.out, directory=ckpt.is_dir, force=prepared.force) as dest,
    ):
        yield dest
        if ckpt.is_dir:
            write_layout(ckpt, dest, jobs)
            report.copied_files, report.skipped_files = copy_other_files(ckpt, dest, skip)


def finish(
    report: MergeReport, prepared: Prepared, outcome: Outcome, sizes: Mapping[str, int] | None
) -> None:
    """The report's targets (by key) and sizes: the shards written, or the state dict's bytes."""
    report.targets = [outcome.reports[k] for k in sorted(outcome.reports)]
    ckpt = prepared.ckpt
    if isinstance(ckpt, MemoryCheckpoint):
        report.base_bytes = sum(t.numel() * t.element_size() for t in ckpt.state.values())
        return
    assert sizes is not None
    report.shards = list(sizes)
    report.base_bytes = sum(os.path.getsize(s) for s in ckpt.shards)
    report.out_bytes = sum(sizes.values())
