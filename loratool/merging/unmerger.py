"""``unmerge``: the adapters of the last merge subtracted again, bit-exact with its sidecar."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter
from .compute import Outcome
from .output import shard_namer
from .pipeline import one_thread, stream_files
from .plan import plan_jobs
from .prepare import finish, in_memory, prepare, written
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


@one_thread()  # one intra-op thread for the whole call (see pipeline.one_thread)
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
    started = time.perf_counter()
    p = prepare(
        "unmerge",
        merged,
        adapters,
        out,
        weights=weights,
        dtype="keep",  # until the merge record says which dtypes to restore
        device=device,
        reversible=False,
        force=force,
    )
    ckpt, inputs, where = p.ckpt, p.inputs, p.where
    given = [dict(record)] if record is not None else []  # a state dict has no metadata
    records = given if p.memory else read_records(ckpt)
    top, matched = match_record(records, inputs, weights is not None, where=where, force=force)
    restore = restore_dtypes(top, where) if matched and top else {}
    jobs = plan_jobs(
        ckpt, inputs, sign=-1.0, out_dtype=lambda name, cur: restore.get(name, cur), force=force
    )

    side = open_sidecar(ckpt, top, sidecar, matched=matched, memory=p.memory, force=force)
    remaining = records[:-1] if matched else [*records, unmerge_record(inputs)]
    recorded = top.get("product") if matched and top else None
    precise = p.device == "cuda" or recorded == "fp64" or (recorded is None and side is not None)
    ctx = p.context(
        precise=precise,
        progress=progress,
        hash_out=side is not None,
        corrections=side.corrections if side else None,
    )
    outcome = Outcome()
    undone = dict(top) if matched and top else unmerge_record(inputs)
    report = MergeReport(
        "unmerge",
        where,
        None if p.out is None else str(p.out),
        [i.entry() for i in inputs],
        "restore" if restore else "keep",
        p.device,
        [],
        undone,
    )
    sizes = None
    if p.memory:
        report.state_dict = in_memory(p, jobs, ctx, outcome)
    else:
        assert p.out is not None
        drop_format = bool(matched and top and top.get("format_added") and not remaining)

        def metadata(shard: Path) -> dict[str, str]:
            meta = shard_metadata_with(
                ckpt.shard_metadata[shard], remaining, add_format=bool(remaining)
            )
            if drop_format:
                meta.pop("format", None)
            return meta

        skip = {top["reversible"]} if matched and top and top.get("reversible") else set()
        with written(p, jobs, report, skip=skip) as dest:
            namer = shard_namer(ckpt, p.out)
            sizes = stream_files(ckpt, jobs, dest, ctx, outcome, metadata, namer)
    finish(report, p, outcome, sizes)
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
