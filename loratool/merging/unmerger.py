"""``unmerge``: the adapters of the last merge subtracted again, bit-exact with its sidecar."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter
from ..checkpoint import Checkpoint
from ..errors import UsageError
from .compute import Context, Outcome, memory_loop
from .inputs import MemoryCheckpoint, digest_inputs, open_inputs, resolve_device
from .output import check_paths, copy_other_files, output_dest, shard_namer, write_layout
from .pipeline import one_thread, stream_files
from .plan import module_names, plan_jobs
from .provenance import (
    match_record,
    read_records,
    restore_dtypes,
    shard_metadata_with,
    unmerge_record,
)
from .report import MergeReport, Progress
from .sidecar import Sidecar, open_sidecar

if TYPE_CHECKING:
    import torch


def unmerge(
    merged: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    out: str | os.PathLike[str] | None = None,
    *,
    weights: Sequence[float] | None = None,
    device: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
    record: Mapping[str, Any] | None = None,
    sidecar: Sidecar | None = None,
) -> MergeReport:
    """Subtract ``adapters`` from ``merged``: the inverse of ``merge``.

    For a checkpoint, the last merge record in its metadata must list exactly these adapters
    (by content digest; order does not matter) — their weights, order, original dtypes and the
    reversible sidecar come from it. Otherwise a ``CompatibilityError``, unless ``force``: then
    the adapters are subtracted with ``weights`` (default 1.0) and the record is kept, with an
    unmerge record added. For a state dict pass the merge's ``record`` and ``sidecar``
    (``MergeReport.record``, ``MergeReport.sidecar``) to get the same checks and exactness.
    """
    with one_thread():
        return _unmerge(
            merged,
            adapters,
            out,
            weights=weights,
            device=device,
            force=force,
            progress=progress,
            record=record,
            sidecar=sidecar,
        )


def _unmerge(
    merged: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    out: str | os.PathLike[str] | None,
    *,
    weights: Sequence[float] | None,
    device: str,
    force: bool,
    progress: Progress | None,
    record: Mapping[str, Any] | None,
    sidecar: Sidecar | None,
) -> MergeReport:
    import torch

    started = time.perf_counter()
    memory = isinstance(merged, Mapping)
    if memory and out is not None:
        raise UsageError("a state-dict unmerge returns its result; out must be None")
    if not memory and out is None:
        raise UsageError("no output path", hint="pass -o OUT")
    dev = resolve_device(device)
    if isinstance(merged, Mapping):
        ckpt: Checkpoint = MemoryCheckpoint(merged)
        where = "<state dict>"
        records = [dict(record)] if record is not None else []
    else:
        out_path = Path(out)  # type: ignore[arg-type]
        check_paths(Path(merged), out_path, force=force)
        ckpt = Checkpoint(merged)
        where = str(merged)
        records = read_records(ckpt)
    inputs = open_inputs(adapters, weights)
    plan_jobs(ckpt, inputs, sign=-1.0, out_dtype=lambda name, cur: cur, force=force)  # fits?
    digest_inputs(inputs)
    top, matched = match_record(records, inputs, weights is not None, where=where, force=force)
    restore = restore_dtypes(top, where) if matched and top else {}
    jobs = plan_jobs(
        ckpt, inputs, sign=-1.0, out_dtype=lambda name, cur: restore.get(name, cur), force=force
    )

    side = open_sidecar(ckpt, top, sidecar, matched=matched, memory=memory, force=force)
    remaining = records[:-1] if matched else [*records, unmerge_record(inputs)]
    recorded = top.get("product") if matched and top else None
    precise = dev == "cuda" or recorded == "fp64" or (recorded is None and side is not None)
    ctx = Context(
        dev,
        precise,
        module_names(inputs),
        roundtrip=False,
        collect=False,
        hash_in=False,
        hash_out=side is not None,
        corrections=side.corrections if side else lambda k: None,
        progress=progress,
        where=where,
    )
    outcome = Outcome()
    undone = dict(top) if matched and top else unmerge_record(inputs)
    report = MergeReport(
        "unmerge",
        where,
        None if memory else str(out),
        [i.entry() for i in inputs],
        "restore" if restore else "keep",
        dev,
        [],
        undone,
    )
    if isinstance(ckpt, MemoryCheckpoint):
        with torch.inference_mode():
            report.state_dict = memory_loop(ckpt, jobs, ctx, outcome)
        report.base_bytes = sum(t.numel() * t.element_size() for t in ckpt.state.values())
    else:
        out_path = Path(out)  # type: ignore[arg-type]
        drop_format = bool(matched and top and top.get("format_added") and not remaining)

        def metadata(shard: Path) -> dict[str, str]:
            meta = shard_metadata_with(
                ckpt.shard_metadata[shard], remaining, add_format=bool(remaining)
            )
            if drop_format:
                meta.pop("format", None)
            return meta

        skip = {top["reversible"]} if matched and top and top.get("reversible") else set()
        with (
            torch.inference_mode(),
            output_dest(out_path, directory=ckpt.is_dir, force=force) as dest,
        ):
            sizes = stream_files(
                ckpt, jobs, dest, ctx, outcome, metadata, shard_namer(ckpt, out_path)
            )
            if ckpt.is_dir:
                write_layout(ckpt, dest, jobs)
                report.copied_files, report.skipped_files = copy_other_files(ckpt, dest, skip)
        report.shards = list(sizes)
        report.base_bytes = sum(os.path.getsize(s) for s in ckpt.shards)
        report.out_bytes = sum(sizes.values())
    report.targets = [outcome.reports[k] for k in sorted(outcome.reports)]
    if side is not None:
        for t in report.targets:
            want = side.sha256.get(t.key)
            t.verified = want is not None and outcome.hashes.get(t.key) == want
        report.exact = "verified" if all(t.verified for t in report.targets) else "mismatch"
        if report.exact == "mismatch":
            bad = [t.key for t in report.targets if not t.verified]
            report.warnings.append(
                f"{len(bad)} weights differ from the original after applying the sidecar "
                f"(e.g. '{bad[0]}')"
            )
    else:
        report.exact = "unknown"
        rt = top.get("roundtrip") if matched and top else None
        if isinstance(rt, dict) and rt.get("elements"):
            report.warnings.append(
                f"not bit-exact: the merge measured {rt['elements']:,} elements in "
                f"{rt.get('tensors', '?')} weights that come back up to {rt.get('max_ulp', '?')} "
                "ULP off the base (merge with --reversible to restore it exactly)"
            )
    report.seconds = time.perf_counter() - started
    return report
